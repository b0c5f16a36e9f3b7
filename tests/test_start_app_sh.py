"""Execute start_app.sh with bash, the way a Linux or WSL2 user would, from a folder with spaces and Chinese.

The project is copied with a fake `app` package whose `python -m app ...` writes its arguments to a
file, and I2V_SKIP_INSTALL=1 skips the environment setup, so nothing is installed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ports import free_port

ROOT = Path(__file__).resolve().parents[1]
BASH = shutil.which("bash") or "/bin/bash"

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="start_app.sh is for Linux and WSL2")

FAKE_APP_MAIN = '''\
"""Fake `python -m app`: records how it was called, then exits as the test asks."""
import json, os, sys, time

command = sys.argv[1] if len(sys.argv) > 1 else ""
with open(os.environ["I2V_TEST_RECORD"], "a", encoding="utf-8") as f:
    f.write(json.dumps({"argv": sys.argv[1:], "cwd": os.getcwd(), "executable": sys.executable}) + "\\n")
if command == "serve":
    print("📍 访问地址 / Local URL: http://127.0.0.1:PORT", flush=True)
try:
    time.sleep(float(os.environ.get("I2V_TEST_SLEEP_" + command.upper(), "0")))
except KeyboardInterrupt:
    sys.exit(130)
sys.exit(int(os.environ.get("I2V_TEST_EXIT_" + command.upper(), "0")))
'''


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A copy of the launcher in `Image to Video 图像转视频/`, with the fake app in place of the real one."""
    root = tmp_path / "Image to Video 图像转视频"
    (root / "app").mkdir(parents=True)
    (root / "configs").mkdir()
    # Only the stdlib-only modules the launcher imports before anything is installed: if it needed
    # another part of the app, these tests would fail.
    for name in ("start_app.sh", "start_app.py", "pyproject.toml", "configs/config.yaml",
                 "app/__init__.py", "app/diagnose.py", "app/hub.py", "app/winsetup.py"):
        shutil.copy2(ROOT / name, root / name)
    (root / "app" / "__main__.py").write_text(FAKE_APP_MAIN, encoding="utf-8")
    return root


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """A clean environment: python3 on PATH is this test's interpreter, no venv or conda is active."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").symlink_to(sys.executable)
    keep = {k: v for k, v in os.environ.items()
            if k not in ("VIRTUAL_ENV", "CONDA_PREFIX", "CONDA_DEFAULT_ENV", "PYTHONPATH", "PYTHONHOME")
            and not k.startswith("I2V_") and not k.startswith("HF_")}
    keep.update({
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}",
        "I2V_SKIP_INSTALL": "1",
        "I2V_TEST_RECORD": str(tmp_path / "record.jsonl"),
        "HF_HOME": str(tmp_path / "hf-home"),
        "LC_ALL": "C.UTF-8",
    })
    return keep


def records(env: dict[str, str]) -> list[dict]:
    path = Path(env["I2V_TEST_RECORD"])
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def run_sh(script: Path | str, args: list[str], env: dict[str, str], cwd: Path, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([BASH, str(script), *args], cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, encoding="utf-8", timeout=60, **kw)


def test_the_script_is_executable_bash_with_lf_endings():
    script = ROOT / "start_app.sh"
    data = script.read_bytes()
    assert data.startswith(b"#!/usr/bin/env bash\n") and b"\r" not in data
    assert os.access(script, os.X_OK), "chmod +x start_app.sh"


def test_every_argument_passes_through_and_the_exit_code_comes_back(project, env, tmp_path):
    port = free_port()
    args = ["--port", str(port), "--listen", "--model", "tiny", "--device", "cpu", "--share",
            "--auth", "alice:pa ss 密码", "--", "--low-vram", "on"]
    env["I2V_TEST_EXIT_SERVE"] = "4"
    elsewhere = tmp_path / "somewhere else"
    elsewhere.mkdir()
    proc = run_sh(project / "start_app.sh", args, env, cwd=elsewhere)
    assert proc.returncode == 4, proc.stdout + proc.stderr
    (serve,) = records(env)
    assert serve["argv"] == ["serve", "--port", str(port), "--listen", "--model", "tiny", "--device", "cpu",
                             "--share", "--auth", "alice:pa ss 密码", "--low-vram", "on"]
    assert Path(serve["cwd"]) == project, "the app runs in the project folder, wherever the user was"
    assert "[INFO]" in proc.stdout and "Local URL" in proc.stdout


def test_worker_hands_every_argument_after_it_to_the_apps_worker_command(project, env, tmp_path):
    env["I2V_TEST_EXIT_WORKER"] = "6"
    proc = run_sh(project / "start_app.sh", ["worker", "--gpu", "1", "--name", "gpu 1", "--model", "tiny"], env,
                  cwd=tmp_path)
    assert proc.returncode == 6, proc.stdout + proc.stderr
    (worker,) = records(env)
    assert worker["argv"] == ["worker", "--gpu", "1", "--name", "gpu 1", "--model", "tiny"]
    assert Path(worker["cwd"]) == project
    assert "Starting the worker" in proc.stdout


def test_it_works_through_symlinks_and_as_an_executable(project, env, tmp_path):
    links = tmp_path / "links dir"
    links.mkdir()
    (links / "start").symlink_to(project / "start_app.sh")
    (links / "start-again").symlink_to("start")  # a relative link to a link
    for command in ([BASH, str(links / "start-again")], ["./start"]):
        proc = subprocess.run([*command, "--model", "tiny"], cwd=links, env=env, stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, encoding="utf-8", timeout=60)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    assert [Path(r["cwd"]) for r in records(env)] == [project, project]


def test_missing_model_offline_warns_and_still_starts(project, env, tmp_path):
    proc = run_sh(project / "start_app.sh", ["--offline"], env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "[WARN] 未找到模型 / Model not found" in proc.stdout and "--model tiny" in proc.stdout
    (serve,) = records(env)
    assert serve["argv"][0] == "serve" and "--offline" in serve["argv"]
    assert int(serve["argv"][serve["argv"].index("--port") + 1]) >= 7860
    assert all((project / name).is_dir() for name in ("outputs", "logs", "models"))


def test_missing_model_is_downloaded_first_and_a_failed_download_still_starts(project, env, tmp_path):
    env["I2V_TEST_EXIT_DOWNLOAD"] = "3"
    proc = run_sh(project / "start_app.sh", [], env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert [r["argv"][0] for r in records(env)] == ["download", "serve"]
    assert "Download failed (exit code 3)" in proc.stdout


def test_a_busy_named_port_exits_12(project, env, tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        busy = sock.getsockname()[1]
        proc = run_sh(project / "start_app.sh", ["--port", str(busy)], env, cwd=tmp_path)
    assert proc.returncode == 12
    assert f"Port {busy} is in use" in proc.stderr and records(env) == []


def test_a_pre_made_venv_is_used(project, env, tmp_path):
    venv_python = project / ".venv" / "bin" / "python"
    venv_python.parent.mkdir(parents=True)
    venv_python.symlink_to(sys.executable)
    proc = run_sh(project / "start_app.sh", ["--model", "tiny"], env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (serve,) = records(env)
    assert serve["executable"] == str(venv_python)


# Start the launcher as a terminal does, with SIGINT at its default. A test run started in the background
# (`cmd &`) inherits SIGINT as ignored, bash cannot un-ignore it, and Ctrl+C could never reach the app.
# A one-line exec wrapper resets it; the pid stays the same all the way to start_app.py.
DEFAULT_SIGINT = [sys.executable, "-c", "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
                  "os.execv(sys.argv[1], sys.argv[1:])"]


def test_ctrl_c_stops_the_app_and_exits_130(project, env, tmp_path):
    env["I2V_TEST_SLEEP_SERVE"] = "30"
    proc = subprocess.Popen([*DEFAULT_SIGINT, BASH, str(project / "start_app.sh"), "--model", "tiny"], cwd=tmp_path,
                            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while not records(env) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert records(env), "the app never started"
        os.killpg(proc.pid, signal.SIGINT)  # what the terminal does on Ctrl+C: the whole foreground group
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, out.decode() + err.decode()
    assert b"Traceback" not in err


def test_no_python_says_what_to_install(project, tmp_path):
    empty = tmp_path / "empty bin"
    empty.mkdir()
    proc = subprocess.run([BASH, str(project / "start_app.sh")], cwd=tmp_path, env={"PATH": str(empty)},
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 10
    assert "Python 3 was not found" in proc.stderr and "sudo apt install python3 python3-venv" in proc.stderr


def test_too_old_python_is_named_and_skipped_for_a_newer_one(project, env, tmp_path):
    old_bin = tmp_path / "old bin"
    old_bin.mkdir()
    fake = old_bin / "python3"
    fake.write_text("#!/bin/sh\n"
                    "case \"$2\" in *version_info*) exit 1 ;; esac\n"
                    "echo 3.8.10\n", encoding="utf-8")
    fake.chmod(0o755)
    proc = subprocess.run([BASH, str(project / "start_app.sh")], cwd=tmp_path, env={"PATH": str(old_bin)},
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 10
    assert "found only Python 3.8.10" in proc.stderr

    # A newer versioned python next to the old python3 is picked instead.
    (old_bin / "python3.12").symlink_to(sys.executable)
    env["PATH"] = str(old_bin)
    proc = run_sh(project / "start_app.sh", ["--model", "tiny"], env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert records(env)[0]["argv"][0] == "serve"
