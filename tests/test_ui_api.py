"""app/ui.py over HTTP: the real server on a free port with the tiny model, driven by gradio_client.

/generate returns an H.264 MP4, bad input comes back as the error text (in the caller's language),
two clients get their own videos, /cancel stops a run without a file, and the file route serves
outputs/ and nothing else.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
import urllib.parse
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError as ClientAppError
from gradio_client.utils import Status
from mp4probe import probe
from ports import free_port

# No test may reach the network; gradio_client's telemetry obeys only these.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.filterwarnings("ignore::Warning:gradio.queueing")  # pandas deprecations in Gradio
UPLOAD_LIMIT_MB = 1  # small, so the upload-limit test needs no big file
FAST = {"resolution": 64, "num_frames": 4, "fps": 8, "steps": 2, "guidance_scale": 9.0}


def _ui_root(base: Path) -> Path:
    """A throwaway project root: the shipped configs and empty outputs/ and logs/."""
    shutil.copytree(REPO / "configs", base / "configs")
    for name in ("outputs", "logs"):
        (base / name).mkdir()
    return base


def _ui_settings(root: Path, models: Path, **limits):
    from app.config import load_settings

    return load_settings(root / "configs" / "config.yaml", root=root, environ={},
                         overrides={"paths": {"models": str(models)}, "limits": limits})


def _launch(service, settings, **kw):
    """run_server on a free port. Tests run in parallel processes, so another one may take the port between
    the probe and the bind: then try another."""
    from app.errors import InputError
    from app.ui import run_server

    for attempt in range(5):
        port = free_port()
        try:
            demo = run_server(service, settings, host="127.0.0.1", port=port, block=False, **kw)
        except InputError as exc:
            if "in use" not in str(exc) or attempt == 4:
                raise
            continue
        return demo, f"http://127.0.0.1:{port}/"
    raise AssertionError("unreachable")


@pytest.fixture(scope="module")
def ui_models_dir(shared_models_dir: Path) -> Path:
    """The run's models folder (tests/conftest.py): the tiny model is built once for all test files."""
    return shared_models_dir


@pytest.fixture(scope="module")
def api_server(tmp_path_factory, ui_models_dir):
    """The real app on a free port: tiny model, loading in the background as `serve` does."""
    from app.engine.loader import load_engine
    from app.service import GenerationService

    root = _ui_root(tmp_path_factory.mktemp("ui-api"))
    settings = _ui_settings(root, ui_models_dir, max_upload_mb=UPLOAD_LIMIT_MB)
    service = GenerationService(settings, lambda: load_engine(settings, source="tiny"))
    service.start_loading()
    demo, url = _launch(service, settings)
    image = root / "input.png"
    _draw_input(image)
    yield SimpleNamespace(url=url, service=service, settings=settings, demo=demo, root=root,
                          outputs=settings.path("outputs"), image=image)
    demo.close()


def _draw_input(path: Path) -> None:
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (120, 90), (30, 80, 160))
    ImageDraw.Draw(img).ellipse([30, 20, 80, 70], fill=(250, 200, 60))
    _make_unique(img)
    img.save(path)


def _make_unique(img) -> None:
    """Give an input image its own bytes. Gradio keeps an upload under a name made from its content, in one
    folder for every server on the machine, and a server deletes its uploads when it closes: a server of another
    test process that received the same picture would delete this one's copy while it is in use."""
    img.putpixel((0, 0), tuple(os.urandom(3)))


def _client(url: str, **headers: str) -> Client:
    return Client(url, verbose=False, headers=headers or None, analytics_enabled=False)


def _generate(client: Client, image: Path, prompt: str = "a sun rising over the sea", **params):
    more = {name: params.pop(name) for name in ("segments", "crossfade", "exports") if name in params}
    values = {**FAST, "seed": -1, **params}
    return client.predict(handle_file(str(image)), prompt, "", values["resolution"], values["num_frames"],
                          values["fps"], values["steps"], values["guidance_scale"], values["seed"], **more,
                          api_name="/generate")


def _listing(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


# The API -----------------------------------------------------------------------------------------

def test_public_api_is_generate_and_cancel(api_server):
    api = _client(api_server.url).view_api(print_info=False, return_format="dict")
    assert set(api["named_endpoints"]) == {"/generate", "/cancel"}
    params = [p["parameter_name"] for p in api["named_endpoints"]["/generate"]["parameters"]]
    assert params == ["image", "prompt", "negative_prompt", "resolution", "num_frames", "fps", "steps",
                      "guidance_scale", "seed", "segments", "crossfade", "exports"]


def test_generate_returns_h264_mp4_with_its_info(api_server):
    # Keyword arguments, as in the README's example.
    video, info, details = _client(api_server.url).predict(
        handle_file(str(api_server.image)), "a sun rising over the sea", resolution=64, num_frames=4, fps=8,
        steps=2, seed=1234, api_name="/generate")

    meta = probe(Path(video))
    assert meta["codec"] == "h264" and meta["pix_fmt"] == "yuv420p"
    assert (meta["width"], meta["height"], meta["nb_frames"], meta["fps"]) == (64, 64, 4, 8)
    assert details["seed"] == 1234 and details["prompt"] == "a sun rising over the sea"
    assert (api_server.outputs / details["file"]).is_file()
    assert Path(video).name == details["file"]
    for word in ("1234", details["file"], "encode", "denoise", "decode", "total", "Demo model (output is noise)"):
        assert word in info


def test_generate_with_two_segments_and_exports(api_server):
    video, info, details = _client(api_server.url).predict(
        handle_file(str(api_server.image)), "a sun rising over the sea", resolution=64, num_frames=4, fps=8,
        steps=1, seed=77, segments=2, crossfade=1, exports=["loop", "gif"], api_name="/generate")
    meta = probe(Path(video))
    assert (meta["codec"], meta["pix_fmt"], meta["nb_frames"], meta["fps"]) == ("h264", "yuv420p", 4 + 3 - 1, 8)
    assert [(s["index"], s["seed"]) for s in details["segments"]] == [(1, 77), (2, 78)]
    assert details["crossfade"] == 1 and "2 segments · cross-fade 1 frames" in info
    stem = Path(details["file"]).stem
    assert details["exports"] == {"loop": f"{stem}_loop.mp4", "gif": f"{stem}.gif"}
    assert all((api_server.outputs / name).is_file() for name in details["exports"].values())


def test_raw_http_with_the_first_nine_values_still_generates(api_server):
    """A caller of the plain HTTP API that sends /generate's values up to seed gets the defaults for the rest."""
    upload = httpx.post(api_server.url + "gradio_api/upload",
                        files={"files": ("in.png", api_server.image.read_bytes(), "image/png")})
    image = {"path": upload.json()[0], "meta": {"_type": "gradio.FileData"}}
    data = [image, "a sun rising over the sea", "", 64, 4, 8, 1, 9.0, 5]
    event = httpx.post(api_server.url + "gradio_api/call/generate", json={"data": data}).json()["event_id"]
    events = httpx.get(api_server.url + f"gradio_api/call/generate/{event}", timeout=120).text
    assert "event: complete" in events, events
    details = next(item for item in json.loads(events.rpartition("data: ")[2]) if isinstance(item, dict)
                   and "seed" in item)
    assert (details["seed"], len(details["segments"]), details["crossfade"], details["exports"]) == (5, 1, 0, {})
    info = probe(api_server.outputs / details["file"])
    assert (info["codec"], info["pix_fmt"], info["nb_frames"], info["fps"]) == ("h264", "yuv420p", 4, 8)


@pytest.mark.parametrize(("params", "headers", "expected"), [
    ({"prompt": "   "}, {}, "The prompt is empty"),
    ({"resolution": 100}, {}, "resolution 100 must be a multiple of 64"),
    ({"steps": 1000}, {}, "steps is 1000, outside the allowed range"),
    ({"prompt": ""}, {"Accept-Language": "zh-CN,zh;q=0.9,en;q=0.8"}, "提示词为空"),
    ({"num_frames": 99}, {"Accept-Language": "zh-CN"}, "帧数为 99,超出允许范围"),
    ({"segments": 20}, {}, "segments is 20, outside the allowed range 1–8 (limits.max_segments = 8)"),
    ({"exports": "gif,avi"}, {"Accept-Language": "zh-CN"}, "未知的导出格式 'avi'"),
], ids=["empty-prompt", "resolution", "steps", "zh-empty-prompt", "zh-frames", "segments", "zh-exports"])
def test_bad_input_returns_the_error_text(api_server, params, headers, expected):
    before = _listing(api_server.outputs)
    with pytest.raises(ClientAppError) as err:
        _generate(_client(api_server.url, **headers), api_server.image, **params)
    assert expected in str(err.value)
    assert "Traceback" not in str(err.value)
    assert _listing(api_server.outputs) == before


def test_generate_cannot_read_server_files_as_its_image(api_server):
    """A raw FileData naming a server path (not an upload) is refused before the service sees it."""
    before = _listing(api_server.outputs)
    for path in ("/etc/passwd", str(api_server.image)):
        payload = {"path": path, "meta": {"_type": "gradio.FileData"}}
        r = httpx.post(api_server.url + "gradio_api/call/generate",
                       json={"data": [payload, "a cat", "", 64, 4, 8, 2, 9.0, 1]})
        assert r.status_code == 200, r.text
        events = httpx.get(api_server.url + f"gradio_api/call/generate/{r.json()['event_id']}", timeout=60).text
        assert "event: error" in events and "event: complete" not in events, events
    assert _listing(api_server.outputs) == before


def test_missing_image_returns_the_error_text(api_server):
    with pytest.raises(ClientAppError, match="Please upload an input image"):
        _client(api_server.url).predict(None, "a cat", "", 64, 4, 8, 2, 9.0, -1, api_name="/generate")


def test_two_concurrent_clients_each_get_their_own_video(api_server):
    clients = [_client(api_server.url), _client(api_server.url)]
    jobs = [c.submit(handle_file(str(api_server.image)), f"prompt number {i}", "", 64, 4, 8, 3, 9.0, 100 + i,
                     api_name="/generate") for i, c in enumerate(clients)]
    results = [job.result(timeout=180) for job in jobs]

    files = {details["file"] for _, _, details in results}
    assert len(files) == 2
    for i, (video, _, details) in enumerate(results):
        assert details["prompt"] == f"prompt number {i}" and details["seed"] == 100 + i
        assert probe(Path(video))["nb_frames"] == 4
        assert (api_server.outputs / details["file"]).is_file()


def test_a_waiting_client_is_told_its_queue_position(api_server):
    first, second = _client(api_server.url), _client(api_server.url)
    assert api_server.service.wait_until_loaded(120)
    long_job = first.submit(handle_file(str(api_server.image)), "long", "", 64, 24, 8, 100, 9.0, 1,
                            api_name="/generate")
    while not api_server.service.status()["busy"]:
        time.sleep(0.02)
    waiting = second.submit(handle_file(str(api_server.image)), "waits its turn", "", 64, 4, 8, 2, 9.0, 2,
                            api_name="/generate")
    deadline = time.monotonic() + 20
    update = waiting.status()
    while not (update.code == Status.IN_QUEUE and update.rank is not None):
        assert time.monotonic() < deadline, f"never told its place in the queue: {update}"
        time.sleep(0.02)
        update = waiting.status()
    assert update.rank == 0 and update.queue_size >= 1
    first.predict(api_name="/cancel")
    with pytest.raises(ClientAppError):
        long_job.result(timeout=60)
    _, _, details = waiting.result(timeout=120)
    assert details["prompt"] == "waits its turn"


def test_cancel_stops_the_run_and_writes_no_file(api_server):
    client = _client(api_server.url)
    service = api_server.service
    assert service.wait_until_loaded(120)
    before = _listing(api_server.outputs)
    job = client.submit(handle_file(str(api_server.image)), "a long run", "", 64, 24, 8, 100, 9.0, 7,
                        api_name="/generate")
    deadline = time.monotonic() + 60
    while not service.status()["busy"]:
        assert time.monotonic() < deadline, "the run never started"
        time.sleep(0.05)

    reply = client.predict(api_name="/cancel")

    assert "Cancelling" in reply
    with pytest.raises(ClientAppError, match="Cancelled by the user; no video was written"):
        job.result(timeout=60)
    while service.status()["busy"]:
        time.sleep(0.05)
    assert _listing(api_server.outputs) == before


def test_cancel_only_touches_the_callers_own_run(api_server):
    """Another client's /cancel must not stop this run."""
    job = _client(api_server.url).submit(handle_file(str(api_server.image)), "mine", "", 64, 4, 8, 4, 9.0, 3,
                                         api_name="/generate")
    while not api_server.service.status()["busy"] and not job.done():
        time.sleep(0.02)
    assert "No run of yours is in progress" in _client(api_server.url).predict(api_name="/cancel")
    _, _, details = job.result(timeout=120)
    assert details["prompt"] == "mine"


# Safe defaults -----------------------------------------------------------------------------------

def test_launch_uses_the_safe_defaults(api_server):
    demo = api_server.demo
    assert demo.allowed_paths == [str(api_server.outputs.resolve())]
    assert demo.share is False
    assert demo.show_error is False
    assert demo.run_history is False
    assert demo.analytics_enabled is False
    assert demo.max_file_size == UPLOAD_LIMIT_MB * 1024 * 1024
    assert demo._queue.max_size == api_server.settings.server.max_queue_size
    assert demo.server_name == "127.0.0.1"


def test_auth_guards_the_page_and_the_api(tmp_path, ui_models_dir):
    from app.service import GenerationService

    settings = _ui_settings(_ui_root(tmp_path / "root"), ui_models_dir)
    demo, url = _launch(GenerationService(settings, lambda: None), settings, auth=("alice", "s3cret"))
    try:
        assert httpx.get(url + "config").status_code == 401
        assert httpx.get(url + "gradio_api/info").status_code == 401
        with pytest.raises(ValueError, match="Could not login"):
            Client(url, auth=("alice", "wrong"), verbose=False, analytics_enabled=False)
        client = Client(url, auth=("alice", "s3cret"), verbose=False, analytics_enabled=False)
        assert "No run of yours is in progress" in client.predict(api_name="/cancel")
    finally:
        demo.close()


def test_upload_over_the_limit_is_refused(api_server):
    big = os.urandom(UPLOAD_LIMIT_MB * 1024 * 1024 + 4096)
    r = httpx.post(api_server.url + "gradio_api/upload", files={"files": ("big.png", big, "image/png")})
    assert r.status_code == 413


def test_file_route_serves_outputs_and_nothing_else(api_server):
    _, _, details = _generate(_client(api_server.url), api_server.image, seed=5)
    video = (api_server.outputs / details["file"]).resolve()
    outputs = api_server.outputs.resolve()
    config = (api_server.root / "configs" / "config.yaml").resolve()
    base = api_server.url + "gradio_api/file="

    ok = httpx.get(base + str(video))
    assert ok.status_code == 200 and ok.content == video.read_bytes()

    refused = [
        str(config),                                     # the project's own config
        "/etc/passwd",                                   # an absolute system path
        f"{outputs}/../configs/config.yaml",             # ../ out of outputs/
        f"{outputs}/%2e%2e/configs/config.yaml",         # encoded ../
        urllib.parse.quote(f"{outputs}/../configs/config.yaml", safe=""),
        f"{outputs}/../../{config.parent.parent.name}/configs/config.yaml",
        "configs/config.yaml",                           # relative to the server's working directory
        "../" * 12 + "etc/passwd",
        str(REPO / "pyproject.toml"),                    # the working tree itself
        str(api_server.settings.path("logs")),           # a folder
    ]
    for path in refused:
        r = httpx.get(base + path)
        assert r.status_code in (403, 404), (path, r.status_code)
        assert b"root:" not in r.content and b"max_queue_size" not in r.content
    for legacy in ("file=", "gradio_api/file/"):
        r = httpx.get(api_server.url + legacy + str(config))
        assert r.status_code in (403, 404), (legacy, r.status_code)
        assert b"max_queue_size" not in r.content


# Startup -----------------------------------------------------------------------------------------

def test_page_answers_while_the_model_loads_and_generate_then_says_why(tmp_path, ui_models_dir):
    """The page is up at once; a model that turns out missing gives its reason, not a hang."""
    from app.errors import ModelMissingError
    from app.service import GenerationService

    release = threading.Event()

    def slow_missing_loader():
        release.wait(60)
        raise ModelMissingError("No weights in models/i2vgen-xl: run `python -m app download` first.",
                                "models/i2vgen-xl 中没有模型权重:请先运行 python -m app download。")

    settings = _ui_settings(_ui_root(tmp_path / "root"), ui_models_dir)
    service = GenerationService(settings, slow_missing_loader)
    service.start_loading()
    demo, url = _launch(service, settings)
    try:
        started = time.monotonic()
        page = httpx.get(url, timeout=10)
        assert page.status_code == 200
        assert time.monotonic() - started < 3
        assert service.state.value == "loading"

        client = _client(url)
        job = client.submit(handle_file(str(REPO / "tests" / "mp4probe.py")), "x", "", 64, 4, 8, 2, 9.0, 1,
                            api_name="/generate")
        with pytest.raises(ClientAppError, match="is not an image"):
            job.result(timeout=60)  # bad input is refused before waiting for the model
        image = tmp_path / "in.png"
        _draw_input(image)
        job = client.submit(handle_file(str(image)), "a cat", "", 64, 4, 8, 2, 9.0, 1, api_name="/generate")
        time.sleep(0.5)
        assert not job.done()  # it waits for the model...
        release.set()
        with pytest.raises(ClientAppError, match="run `python -m app download` first"):
            job.result(timeout=60)  # ...and then says why it can't
    finally:
        release.set()
        demo.close()


def test_mcp_without_the_extra_fails_clearly(tmp_path, ui_models_dir, monkeypatch):
    import importlib.util

    from app.errors import InputError
    from app.service import GenerationService
    from app.ui import run_server

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mcp" else real_find_spec(name, *a))
    settings = _ui_settings(_ui_root(tmp_path / "root"), ui_models_dir)
    with pytest.raises(InputError, match=r'pip install "gradio\[mcp\]"'):
        run_server(GenerationService(settings, lambda: None), settings, host="127.0.0.1", port=free_port(),
                   mcp=True, block=False)


def test_mcp_exposes_generate_as_a_tool(tmp_path, ui_models_dir):
    import importlib.util

    from app.service import GenerationService

    if importlib.util.find_spec("mcp") is None:
        pytest.skip('gradio[mcp] is not installed (pip install "gradio[mcp]")')
    settings = _ui_settings(_ui_root(tmp_path / "root"), ui_models_dir)
    demo, url = _launch(GenerationService(settings, lambda: None), settings, mcp=True)
    try:
        tools = httpx.get(url + "gradio_api/mcp/schema").json()
    finally:
        demo.close()
    generate = next(t for t in tools if t["name"] == "generate")
    assert {"image", "prompt", "resolution", "num_frames", "fps", "steps", "guidance_scale", "seed"} <= set(
        generate["inputSchema"]["properties"])


def test_importing_the_ui_starts_nothing_and_building_it_writes_no_source_file(tmp_path, ui_models_dir):
    import subprocess
    import sys

    code = "import sys, app.ui; print('gradio' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"  # gradio is imported by build_ui/run_server, never at import

    from app.service import GenerationService
    from app.ui import build_ui

    stubs = set((REPO / "app").rglob("*.pyi"))
    settings = _ui_settings(_ui_root(tmp_path / "root"), ui_models_dir)
    build_ui(GenerationService(settings, lambda: None), settings)
    assert set((REPO / "app").rglob("*.pyi")) == stubs  # Gradio writes one for a careless component subclass


# Strings -----------------------------------------------------------------------------------------

@pytest.mark.parametrize(("header", "lang"), [
    (None, "en"), ("", "en"), ("fr-FR,fr;q=0.9", "en"), ("zh-CN", "zh"), ("zh-TW,zh;q=0.9", "zh"),
    ("en-US,en;q=0.9,zh-CN;q=0.8", "en"), ("fr;q=1.0,zh-CN;q=0.7,en;q=0.5", "zh"), ("en;q=0.2,zh;q=0.3", "zh"),
])
def test_language_comes_from_accept_language(header, lang):
    from app.ui_strings import pick_lang

    assert pick_lang(header) == lang


def test_every_string_exists_in_both_languages():
    from app.config import Settings
    from app.ui_strings import STRINGS, translations

    for key, (en, zh) in STRINGS.items():
        assert en.strip() and zh.strip(), key
        assert any("\u4e00" <= ch <= "\u9fff" for ch in zh), key
    tables = translations(Settings())
    assert set(tables["en"]) == set(tables["zh"])
    assert tables["zh"]["preset:standard"].startswith("标准质量模式")


def test_status_bar_shows_gpu_vram_demo_and_why_a_model_is_missing():
    from app.service import Message
    from app.ui import render_status

    ready = {"state": "ready", "message": Message("Model ready", "模型就绪"), "demo": True, "model": "tiny",
             "device": "cuda", "low_vram": True, "busy": True, "gpu_name": "NVIDIA GeForce RTX 4090",
             "vram_total_gib": 23.99, "vram_free_gib": 20.5, "vram_used_by_app_gib": 2.25}
    en, zh = render_status(ready, "en"), render_status(ready, "zh")
    for part in ("Model ready · tiny", "Demo model (output is noise)", "NVIDIA GeForce RTX 4090",
                 "VRAM used by the app 2.2 GiB", "free 20.5 / 24.0 GiB", "Low-VRAM mode", "Generating"):
        assert part in en
    for part in ("模型就绪", "演示模型 (输出为噪声)", "本程序占用显存 2.2 GiB", "空闲 20.5 / 24.0 GiB", "低显存模式", "正在生成"):
        assert part in zh
    missing = {"state": "missing", "message": Message("Run `python -m app download` <first>.", "请先下载模型。"),
               "demo": False, "model": "ali-vilab/i2vgen-xl", "device": "cuda", "low_vram": False, "busy": False}
    assert "Model missing" in render_status(missing, "en")
    assert "Run `python -m app download` &lt;first&gt;." in render_status(missing, "en")
    assert "未找到模型" in render_status(missing, "zh") and "请先下载模型" in render_status(missing, "zh")


def test_an_error_stays_on_screen_until_closed_and_a_cancel_note_goes_away():
    from app.errors import CancelledError, InputError
    from app.ui import CANCEL_NOTE_S, unexpected_error, user_error
    from app.ui_strings import text

    error = user_error(InputError("Please upload an input image.", "请上传输入图片。"), "zh")
    assert error.duration is None
    assert error.message == "请上传输入图片。"
    assert error.title == text("error_title", "zh")
    note = user_error(CancelledError(), "en")
    assert note.duration == CANCEL_NOTE_S
    assert note.title == text("cancelled_title", "en")
    assert "no video was written" in note.message
    crash = unexpected_error(KeyError("x"), "zh", "/srv/i2v/logs")
    assert crash.duration is None and crash.title == text("error_title", "zh")
    assert crash.message == text("unexpected", "zh", kind="KeyError", logs="/srv/i2v/logs")
