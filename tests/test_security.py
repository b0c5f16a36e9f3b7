"""Security of the app as `python -m app serve` starts it: the address it binds, what it serves, the login,
what a visitor can learn about the machine, and where the compile cache (code the app executes) lives.

One server for the module, started through cli.main() with --auth, as a user starts it. Its project folder
lies in a home folder of its own (HOME points there), so that an absolute path leaking to a visitor is
recognisable. docs/security.md describes the same points; tests/test_ui_api.py covers the others (the launch
settings, the upload limit, the file route's basic path tricks, a wrong password through gradio_client).
"""

from __future__ import annotations

import json
import urllib.parse
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from gradio_client import Client, handle_file
from PIL import Image

from app import cli
from app.logging_setup import remove_logging
from ports import free_port

pytestmark = pytest.mark.filterwarnings("ignore::Warning:gradio.queueing")  # pandas deprecations in Gradio

USER, PASSWORD = "alice", "pw-Tr0ub4dor-3"
HF_TOKEN = "hf_SecretTokenThatMustNotLeak42"


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_engine):
    """`python -m app serve --model tiny --auth alice:…` through cli.main(); the engine is the shared tiny
    one, reporting paths a real start on a GPU would report (a model folder and a compile cache)."""
    import app.engine.loader as loader
    import app.ui

    home = tmp_path_factory.mktemp("home")
    root = home / "I2V App"
    dirs = {name: root / name for name in ("outputs", "logs", "models")}
    for folder in dirs.values():
        folder.mkdir(parents=True)
    engine = replace(tiny_engine, model_id=str(dirs["models"] / "i2vgen-xl"), speedups={
        "compile": "regional", "cache_dir": str(dirs["models"] / ".compile-cache"),
        "graph_store": str(dirs["models"] / ".compile-cache" / "graphs"), "notes": []})
    launched: dict = {}
    real_run_server = app.ui.run_server

    def run_server(*args, **kwargs):  # as `serve` calls it, but returning once the server is up
        launched.update(kwargs, demo=real_run_server(*args, **{**kwargs, "block": False}))

    with pytest.MonkeyPatch.context() as mp:
        for key in ("HOME", "USERPROFILE"):
            mp.setenv(key, str(home))
        mp.setenv("HF_TOKEN", HF_TOKEN)
        for name, folder in dirs.items():
            mp.setenv(f"I2V_PATHS__{name.upper()}", str(folder))
        with pytest.MonkeyPatch.context() as launch:  # only while serve starts: the service keeps its loader
            launch.setattr(loader, "load_engine", lambda *a, **k: engine)
            launch.setattr(app.ui, "run_server", run_server)
            for attempt in range(5):  # another test process may take the port between the probe and the bind
                port = free_port()
                code = cli.main(["serve", "--model", "tiny", "--port", str(port), "--auth", f"{USER}:{PASSWORD}"])
                if code == 0 or attempt == 4:
                    break
        assert code == 0
        demo = launched["demo"]
        url = f"http://127.0.0.1:{port}/"
        login = httpx.Client(base_url=url, timeout=30)
        assert login.post("login", data={"username": USER, "password": PASSWORD}).status_code == 200
        try:
            yield SimpleNamespace(url=url, demo=demo, launched=launched, home=home, root=root, login=login, **dirs)
        finally:
            login.close()
            demo.close()
            remove_logging()


def _output(served, name: str = "video_20240101_120000_000.mp4") -> Path:
    path = served.outputs / name
    if not path.exists():
        path.write_bytes(b"\x00\x00\x00\x18ftypmp42 a video")
    return path


# Bind address ----------------------------------------------------------------------------------------

def test_serve_binds_127_0_0_1_unless_told_to_listen(served):
    from app.config import ServerSettings, load_settings

    assert ServerSettings().host == "127.0.0.1"
    assert load_settings(environ={}).server.host == "127.0.0.1"  # the shipped configs/config.yaml
    parser = cli.build_parser()
    assert "host" not in cli._overrides(parser.parse_args(["serve"]))["server"]
    assert cli._overrides(parser.parse_args(["serve", "--listen"]))["server"]["host"] == "0.0.0.0"

    assert served.launched["host"] == "127.0.0.1" and served.launched["share"] is False
    bound = {sock.getsockname()[0] for server in served.demo.server.servers for sock in server.sockets}
    assert bound == {"127.0.0.1"}  # what the operating system reports, not only what was asked for
    assert served.demo.share_url is None


def test_listen_or_share_without_a_login_warns_and_a_malformed_login_is_refused(tmp_path, monkeypatch, capsys,
                                                                                tiny_engine):
    import app.engine.loader as loader
    import app.ui

    calls = []
    for name in ("outputs", "logs", "models"):
        monkeypatch.setenv(f"I2V_PATHS__{name.upper()}", str(tmp_path / name))
    monkeypatch.setattr(loader, "load_engine", lambda *a, **k: tiny_engine)
    monkeypatch.setattr(app.ui, "run_server", lambda *a, **k: calls.append(k))
    try:
        assert cli.main(["serve", "--model", "tiny", "--listen"]) == 0
        err = capsys.readouterr().err
        assert calls[-1]["host"] == "0.0.0.0" and calls[-1]["auth"] is None
        assert "[WARN] The app is open to other machines with no login; add --auth USER:PASS." in err
        assert "share link" not in err
        assert cli.main(["serve", "--model", "tiny", "--share"]) == 0
        err = capsys.readouterr().err
        assert calls[-1]["share"] is True and calls[-1]["host"] == "127.0.0.1"
        assert "[WARN] The share link is public with no login: anyone who has it can use this GPU" in err
        assert "公开链接无需登录" in err
        assert cli.main(["serve", "--model", "tiny", "--share", "--auth", "alice:pw"]) == 0
        assert "share link is public" not in capsys.readouterr().err
        for bad in ("alice", "alice:", ":secret"):
            assert cli.main(["serve", "--model", "tiny", "--auth", bad]) == 2
            assert "--auth needs USER:PASS" in capsys.readouterr().err
        # Gradio's MCP server has no login: its tool list and /cancel answer anyone, so the two don't mix.
        assert cli.main(["serve", "--model", "tiny", "--auth", "alice:pw", "--mcp"]) == 2
        err = capsys.readouterr().err
        assert "[ERROR] --mcp cannot be used with --auth: Gradio's MCP server has no login" in err
        assert "--mcp 不能与 --auth 同时使用" in err
        assert len(calls) == 3
    finally:
        remove_logging()


# Login -----------------------------------------------------------------------------------------------

def test_the_login_guards_the_page_the_api_uploads_and_files(served):
    video = _output(served)
    anonymous = httpx.Client(base_url=served.url, timeout=30)
    page = anonymous.get("")
    assert page.status_code == 200 and "negative-prompt" not in page.text  # the login form, not the app
    requests = [
        ("GET", "config", {}), ("GET", "gradio_api/info", {}),
        ("GET", f"gradio_api/file={video}", {}),
        ("POST", "gradio_api/upload", {"files": {"files": ("a.png", b"png", "image/png")}}),
        ("POST", "gradio_api/call/generate", {"json": {"data": [None, "a cat", "", 64, 2, 8, 1, 9.0, 1]}}),
        ("POST", "gradio_api/queue/join", {"json": {"data": [], "fn_index": 0, "session_hash": "x"}}),
        ("POST", "gradio_api/call/cancel", {"json": {"data": []}}),
    ]
    for method, path, kwargs in requests:
        r = anonymous.request(method, path, **kwargs)
        assert r.status_code == 401, (path, r.status_code, r.text[:200])
    wrong = anonymous.post("login", data={"username": USER, "password": PASSWORD + "x"})
    assert wrong.status_code in (400, 401) and "access-token" not in wrong.cookies
    anonymous.close()
    ok = served.login.get(f"gradio_api/file={video}")
    assert ok.status_code == 200 and ok.content == video.read_bytes()


# What is served ----------------------------------------------------------------------------------------

def test_only_outputs_is_served_whatever_the_path_says(served):
    """Tricks beyond tests/test_ui_api.py's: other project folders, links out of outputs/, backslashes,
    double encoding."""
    video = _output(served)
    config = served.root / "configs" / "config.yaml"
    config.parent.mkdir(exist_ok=True)
    config.write_text("server:\n  max_queue_size: 8\n", encoding="utf-8")
    secret = "SECRET-CONTENT-1234"
    (served.models / "weights.safetensors").write_text(secret, encoding="utf-8")
    (served.logs / "app_2024-01-01.log").write_text(secret, encoding="utf-8")
    (served.outputs / "config-link.mp4").symlink_to(config)
    (served.outputs / "models-link").symlink_to(served.models, target_is_directory=True)
    out = str(served.outputs)
    quote = urllib.parse.quote
    refused = [
        str(served.models / "weights.safetensors"),                # the models folder
        str(served.logs / "app_2024-01-01.log"),                   # the logs
        str(served.outputs / "config-link.mp4"),                   # a link in outputs/ to a file outside
        str(served.outputs / "models-link" / "weights.safetensors"),  # ... and to a folder outside
        f"{out}/../models/weights.safetensors",
        out.replace("/", "\\") + "\\..\\configs\\config.yaml",     # backslashes
        f"{out}\\..\\configs\\config.yaml",
        f"{out}/..%5cconfigs%5cconfig.yaml",                       # encoded backslashes
        f"{out}/..%2fconfigs%2fconfig.yaml",                       # encoded slashes
        f"{out}/%252e%252e/configs/config.yaml",                   # double-encoded ../
        quote(quote(f"{out}/../configs/config.yaml", safe=""), safe=""),
        f"{out}/./../configs/config.yaml",
        f"//{config}",
        f"file://{config}",
        str(served.outputs),                                       # a folder listing
    ]
    for path in refused:
        r = served.login.get("gradio_api/file=" + path)
        assert r.status_code in (403, 404), (path, r.status_code)
        assert secret.encode() not in r.content and b"max_queue_size" not in r.content, path
    r = served.login.get("gradio_api/file=" + str(video))
    assert r.status_code == 200 and r.content == video.read_bytes()


def _leaks(text: str, served) -> list[str]:
    """The secrets and the home folder (as written, and as a URL writes it) found in `text`."""
    home = str(served.home)
    return [word for word in (home, urllib.parse.quote(home), PASSWORD, HF_TOKEN) if word in text]


def test_no_secret_or_home_path_in_the_page_the_schema_or_what_a_run_returns(served):
    for path in ("", "config", "gradio_api/info"):
        r = served.login.get(path)
        assert r.status_code == 200, path
        assert not _leaks(r.text, served), path
    image = served.root / "input.png"
    Image.new("RGB", (64, 48), (40, 90, 170)).save(image)
    client = Client(served.url, auth=(USER, PASSWORD), verbose=False, analytics_enabled=False)
    video, info, details = client.predict(
        image=handle_file(str(image)), prompt="a boat on a lake", negative_prompt="", resolution=64, num_frames=2,
        fps=8, steps=1, guidance_scale=9.0, seed=3, api_name="/generate")
    assert not _leaks(info + json.dumps(details, ensure_ascii=False), served)
    # The metadata JSON is served like the video: what anyone with the link reads.
    metadata = served.outputs / Path(details["file"]).with_suffix(".json")
    served_json = served.login.get(f"gradio_api/file={metadata}")
    assert served_json.status_code == 200
    assert not _leaks(served_json.text, served)
    meta = served_json.json()
    assert not Path(meta["model"]["id"]).is_absolute() and not Path(meta["speedups"]["cache_dir"]).is_absolute()
    assert Path(video).name == details["file"]


# The compile cache ---------------------------------------------------------------------------------

class _Stop(Exception):
    pass


def test_the_compile_cache_lives_only_under_the_models_folder(tmp_path, shared_models_dir, monkeypatch):
    """The cache holds compiled kernels the app loads and runs: it lives in the models folder, whose files
    are trusted like the app's own, and nowhere else (not /tmp, not a folder other users can write)."""
    import torch

    import app.engine.loader as loader
    import app.speedups
    from app.config import load_settings
    from app.speedups.precompile import graph_store_root
    from app.speedups.unet import compile_cache_env

    settings = load_settings(environ={}, overrides={"paths": {"models": str(shared_models_dir)}})
    seen = {}

    def start(options, *, models_dir, **kwargs):
        seen["models_dir"] = models_dir
        raise _Stop

    monkeypatch.setattr(loader, "speedups_skipped", lambda *a: None)  # as on a GPU: the speedups start
    monkeypatch.setattr(app.speedups, "start", start)
    with pytest.raises(_Stop):
        loader.load_engine(settings, source="tiny")
    models = settings.path("models")
    assert seen["models_dir"] == models
    monkeypatch.undo()  # the real start() below

    speedups = app.speedups.start(settings.speedups, models_dir=models, model_dir=tmp_path,
                                  device=torch.device("cpu"), dtype=torch.float32, offload=False,
                                  warmup_shape=(64, 2, True))
    cache = speedups.cache_dir
    assert cache == models / ".compile-cache"
    env = compile_cache_env(cache, environ={})
    assert {key for key in env if key.endswith("_DIR")} == {"TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"}
    for key in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
        assert Path(env[key]).is_relative_to(cache), key
    assert graph_store_root(cache).is_relative_to(cache)
    no_cache = settings.speedups.model_copy(update={"compile_cache": False})
    assert app.speedups.start(no_cache, models_dir=models, model_dir=tmp_path, device=torch.device("cpu"),
                              dtype=torch.float32, offload=False, warmup_shape=(64, 2, True)).cache_dir is None
