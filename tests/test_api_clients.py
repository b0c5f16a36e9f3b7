"""The public API as real clients use it: the `mcp` package's streamable-HTTP client against `serve --mcp`, and
gradio_client, on one server with the tiny model.

Each public endpoint is called by both clients; a parameter a client leaves out takes the service's default
(here the demo defaults, as the tiny model is the demo model), never the page's slider value.
"""

from __future__ import annotations

import asyncio
import base64
import re
import shutil
import time
from fractions import Fraction
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
import yaml
from gradio_client import handle_file
from mp4probe import probe
from test_ui_api import REPO, _client, _draw_input, _launch

pytestmark = pytest.mark.filterwarnings("ignore::Warning:gradio.queueing")  # pandas deprecations in Gradio

# The demo defaults of this server: small, and each number unlike the config's defaults (512 px, 16 frames,
# 8 FPS, 50 steps), so a video made from defaults shows which of the two filled it in.
DEMO = {"resolution": 64, "num_frames": 3, "fps": 5, "steps": 2, "guidance_scale": 4.0}
PUBLIC_ENDPOINTS = {"/generate", "/cancel"}
MCP_TOOLS = {"generate", "cancel"}
VIDEO_URL = re.compile(r"http://[^\s'\"]+/gradio_api/file=[^\s'\"]+\.mp4")


@pytest.fixture(scope="module")
def mcp_server(tmp_path_factory, shared_models_dir):
    """`serve --mcp` on a free port: the tiny model, loaded before the first request, demo defaults = DEMO."""
    from app.config import load_settings
    from app.engine.loader import load_engine
    from app.service import GenerationService

    root = tmp_path_factory.mktemp("api-clients")
    shutil.copytree(REPO / "configs", root / "configs")
    config = root / "configs" / "config.yaml"
    raw = yaml.safe_load(config.read_text(encoding="utf-8"))
    raw["demo"] = DEMO
    config.write_text(yaml.safe_dump(raw, allow_unicode=True, sort_keys=False), encoding="utf-8")
    settings = load_settings(config, root=root, environ={}, overrides={"paths": {"models": str(shared_models_dir)}})
    service = GenerationService(settings, lambda: load_engine(settings, source="tiny"))
    service.load()
    demo, url = _launch(service, settings, mcp=True)
    image = root / "input.png"
    _draw_input(image)
    yield SimpleNamespace(url=url, service=service, settings=settings, outputs=settings.path("outputs"),
                          image=image)
    demo.close()


def _data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


async def _session(url: str, work, headers: dict[str, str] | None = None):
    """`await work(session)` in one session of the mcp package's streamable-HTTP client."""
    from mcp import ClientSession
    from mcp.client.streamable_http import streamable_http_client

    async with httpx.AsyncClient(headers=headers, timeout=httpx.Timeout(60, read=300)) as http:
        async with streamable_http_client(url + "gradio_api/mcp/", http_client=http) as (read, write, _):
            async with ClientSession(read, write) as session:
                await session.initialize()
                return await work(session)


def _mcp(url: str, work, headers: dict[str, str] | None = None):
    return asyncio.run(_session(url, work, headers))


def _texts(result) -> list[str]:
    return [c.text for c in result.content if c.type == "text"]


def _fetch_video(url: str, folder: Path) -> Path:
    """Download a video the server names by URL, as an MCP client does."""
    reply = httpx.get(url, timeout=30)
    assert reply.status_code == 200, (url, reply.status_code)
    path = folder / url.rsplit("/", 1)[-1]
    path.write_bytes(reply.content)
    return path


def _check_video(path: Path, params: dict) -> None:
    meta = probe(path)
    assert (meta["codec"], meta["pix_fmt"]) == ("h264", "yuv420p")
    assert (meta["width"], meta["height"]) == (params["resolution"], params["resolution"])
    assert meta["nb_frames"] == params["num_frames"]
    assert meta["fps"] == Fraction(params["fps"])


# What is public ----------------------------------------------------------------------------------

def test_the_public_endpoints_are_generate_and_cancel_for_both_clients(mcp_server):
    """A new public endpoint or MCP tool fails here until a test in this file calls it."""
    api = _client(mcp_server.url).view_api(print_info=False, return_format="dict")
    assert set(api["named_endpoints"]) == PUBLIC_ENDPOINTS
    assert api["unnamed_endpoints"] == {}
    params = {p["parameter_name"]: p for p in api["named_endpoints"]["/generate"]["parameters"]}
    assert list(params) == ["image", "prompt", "negative_prompt", "resolution", "num_frames", "fps", "steps",
                            "guidance_scale", "seed", "segments", "crossfade", "exports"]
    # Only image and prompt are required; every other parameter defaults to None (the service's default).
    assert [n for n, p in params.items() if not p["parameter_has_default"]] == ["image", "prompt"]
    assert {n: p["parameter_default"] for n, p in params.items() if p["parameter_has_default"]} == dict.fromkeys(
        ["negative_prompt", "resolution", "num_frames", "fps", "steps", "guidance_scale", "seed", "segments",
         "crossfade", "exports"])
    assert len(api["named_endpoints"]["/generate"]["returns"]) == 3  # video, info, all parameters

    async def tools(session):
        return (await session.list_tools()).tools

    listed = {tool.name: tool for tool in _mcp(mcp_server.url, tools)}
    assert set(listed) == MCP_TOOLS
    schema = listed["generate"].inputSchema
    assert schema["required"] == ["image", "prompt"]
    assert schema["properties"]["num_frames"]["type"] == "integer"
    assert "64 to 768, a multiple of 64" in schema["properties"]["resolution"]["description"]
    assert "64 px, 3 frames, 5 FPS, 2 steps, guidance 4.0" in listed["generate"].description  # this server's demo
    assert listed["cancel"].inputSchema["properties"] == {}


# MCP -----------------------------------------------------------------------------------------------

def test_mcp_generate_with_image_and_prompt_returns_a_video_url_made_with_the_demo_defaults(mcp_server, tmp_path):
    """The call an assistant makes: a data-URL image and a prompt, no progress token. The video's URL comes
    back in the result and serves an MP4 of the demo defaults."""
    async def work(session):
        return await session.call_tool("generate", {"image": _data_url(mcp_server.image), "prompt": "a sunrise"})

    result = _mcp(mcp_server.url, work)

    assert not result.isError, _texts(result)
    text = "\n".join(_texts(result))
    urls = VIDEO_URL.findall(text)
    assert len(set(urls)) == 1, text
    _check_video(_fetch_video(urls[0], tmp_path), DEMO)
    assert "Demo model (output is noise)" in text


def test_mcp_generate_with_parameters_reports_progress(mcp_server, tmp_path, hold_decode):
    """With a progress token, the tool reports each step and returns video, info and parameters apart."""
    hold_decode(mcp_server.service.engine.sampler)
    params = {"resolution": 64, "num_frames": 2, "fps": 7, "steps": 2, "guidance_scale": 1.5}
    messages: list[str] = []

    async def on_progress(progress, total, message):
        messages.append(message or "")

    async def work(session):
        return await session.call_tool("generate", {"image": _data_url(mcp_server.image), "prompt": "a cat",
                                                    "negative_prompt": "", "seed": 77, **params},
                                       progress_callback=on_progress)

    result = _mcp(mcp_server.url, work)

    assert not result.isError, _texts(result)
    video_url, info, details = _texts(result)
    assert VIDEO_URL.fullmatch(video_url), video_url
    _check_video(_fetch_video(video_url, tmp_path), params)
    assert "`77`" in info
    assert "'seed': 77" in details and "'negative_prompt': ''" in details
    assert any("Step 2/2" in m for m in messages), messages


@pytest.mark.parametrize(("headers", "expected"), [
    (None, "The prompt is empty"),
    ({"Accept-Language": "zh-CN,zh;q=0.9"}, "提示词为空"),
], ids=["en", "zh"])
def test_mcp_bad_input_is_an_error_result_in_the_callers_language(mcp_server, headers, expected):
    before = set(mcp_server.outputs.iterdir())

    async def work(session):
        return await session.call_tool("generate", {"image": _data_url(mcp_server.image), "prompt": "  "})

    result = _mcp(mcp_server.url, work, headers)

    assert result.isError
    assert expected in _texts(result)[0] and "Traceback" not in _texts(result)[0]
    assert set(mcp_server.outputs.iterdir()) == before


def test_mcp_cancel_stops_an_mcp_run_and_writes_no_file(mcp_server):
    """Gradio's MCP server is stateless: a cancel from any MCP session stops the running MCP generate."""
    service = mcp_server.service
    before = set(mcp_server.outputs.iterdir())

    async def idle(session):
        return await session.call_tool("cancel", {})

    nothing = _mcp(mcp_server.url, idle)
    assert not nothing.isError and _texts(nothing) == ["No run of yours is in progress."]

    async def long_run(session):
        return await session.call_tool("generate", {"image": _data_url(mcp_server.image), "prompt": "long",
                                                    "resolution": 64, "num_frames": 24, "steps": 100})

    async def cancel_when_busy(session):
        deadline = time.monotonic() + 60
        while not service.status()["busy"]:
            assert time.monotonic() < deadline, "the run never started"
            await asyncio.sleep(0.05)
        return await session.call_tool("cancel", {})

    async def both():
        return await asyncio.gather(_session(mcp_server.url, long_run), _session(mcp_server.url, cancel_when_busy))

    run, cancelled = asyncio.run(both())

    assert _texts(cancelled) == ["Cancelling: the run stops after the current step and writes no file."]
    assert run.isError and "Cancelled by the user; no video was written." in _texts(run)[0]
    assert set(mcp_server.outputs.iterdir()) == before


# gradio_client -------------------------------------------------------------------------------------

def test_gradio_client_generate_with_image_and_prompt_takes_the_demo_defaults(mcp_server):
    video, info, details = _client(mcp_server.url).predict(handle_file(str(mcp_server.image)), "a sunrise",
                                                           api_name="/generate")

    _check_video(Path(video), DEMO)
    assert {k: details[k] for k in DEMO} == DEMO
    settings = mcp_server.settings
    assert details["negative_prompt"] == settings.defaults.negative_prompt
    assert details["seed_was_random"] is True  # the config's seed, -1
    assert (mcp_server.outputs / details["file"]).is_file() and details["file"] in info


def test_gradio_client_values_given_win_and_the_rest_take_the_demo_defaults(mcp_server):
    _, _, details = _client(mcp_server.url).predict(handle_file(str(mcp_server.image)), "a sunrise",
                                                    num_frames=2, seed=5, api_name="/generate")

    assert {k: details[k] for k in DEMO} == {**DEMO, "num_frames": 2}
    assert details["seed"] == 5 and details["seed_was_random"] is False


def test_gradio_client_cancel(mcp_server):
    assert _client(mcp_server.url).predict(api_name="/cancel") == "No run of yours is in progress."
    zh = _client(mcp_server.url, **{"Accept-Language": "zh-CN"}).predict(api_name="/cancel")
    assert zh == "你当前没有正在进行的生成。"

