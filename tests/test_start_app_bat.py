"""Execute start_app.bat under Wine's cmd.exe with stub python.exe / py.exe / where.exe built by mingw-w64.

Wine's cmd.exe runs the real batch file on Linux, so it is tested without a Windows machine or a
Windows Python. The stubs (tests/winstub/) stand in for Python: they record their arguments and
working directory and exit with a chosen code, so the tests prove what the batch file does: it
changes to its own folder, picks .venv, then `py -3`, then `python`, passes every argument through,
and on failure shows the error and pauses. Wine's cmd.exe differs from Windows' in details (it
takes a `&&` branch after a failed command), so the batch file uses only constructs both run alike.

Needs: apt-get install -y --no-install-recommends wine wine64 gcc-mingw-w64-x86-64
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STUB_SOURCES = ROOT / "tests" / "winstub"
MINGW = "x86_64-w64-mingw32-gcc"
PAUSE_PROMPT = "Press any key to continue"

pytestmark = pytest.mark.wine


def winpath(path: Path) -> str:
    """The Windows form of a Unix path under Wine (its Z: drive maps to /)."""
    return "Z:" + str(path).replace("/", "\\")


@dataclass
class Wine:
    env: dict[str, str]
    bin_dir: Path
    stub: Path


def _quiet(cmd: list[str], env: dict[str, str], timeout: float) -> None:
    # Wine's background services keep inherited pipes open, so never capture here.
    subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   timeout=timeout, check=False)


def _wait_until_cmd_runs(base: Path, env: dict[str, str], attempts: int = 20) -> None:
    """Wait until cmd.exe really runs a batch file in the new prefix.

    `wineboot -i` can return while the prefix is still being set up, and a batch file started then
    can exit 1 with no output at all. A probe that must echo a marker settles that.
    """
    probe = base / "probe.bat"
    probe.write_bytes(b"@echo wine-ready\r\n")
    last = ""
    for _ in range(attempts):
        proc = subprocess.run(["wine", winpath(probe)], env=env, stdin=subprocess.DEVNULL, capture_output=True,
                              timeout=60, check=False)
        last = (proc.stdout + proc.stderr).decode("utf-8", errors="replace")
        if proc.returncode == 0 and "wine-ready" in last:
            return
        time.sleep(1)
    pytest.fail(f"Wine's cmd.exe never ran a probe batch file in the new prefix; last output: {last!r}")


@pytest.fixture(scope="session")
def wine(tmp_path_factory) -> Wine:
    """A private Wine prefix with a persistent wineserver, and the stubs built once."""
    missing = [tool for tool in ("wine", "wineserver", MINGW) if not shutil.which(tool)]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed; CI installs them with: apt-get install -y "
                    "--no-install-recommends wine wine64 gcc-mingw-w64-x86-64")
    base = tmp_path_factory.mktemp("wine")
    bin_dir = base / "bin"
    bin_dir.mkdir()
    # The stubs compile while Wine sets up its prefix (each takes seconds); py.exe is a copy of python.exe.
    builds = [subprocess.Popen([MINGW, "-municode", "-O2", "-o", str(bin_dir / exe), str(STUB_SOURCES / source)],
                               stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
              for source, exe in (("stub.c", "python.exe"), ("where.c", "where.exe"))]

    prefix = base / "prefix"
    prefix.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY") and not k.startswith("WINE")}
    env.update({
        "WINEPREFIX": str(prefix),
        "WINEDEBUG": "-all",
        "WINEDLLOVERRIDES": "mscoree,mshtml=",  # no Mono or Gecko prompts
        # Wine turns Unix arguments into Windows ones through the locale: it must be UTF-8 for Chinese.
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
    })
    _quiet(["wineserver", "-p"], env, 60)
    _quiet(["wine", "wineboot", "-i"], env, 300)
    for build in builds:
        out, _ = build.communicate(timeout=120)
        assert build.returncode == 0, f"{build.args}: {out.decode(errors='replace')}"
    shutil.copy2(bin_dir / "python.exe", bin_dir / "py.exe")
    _wait_until_cmd_runs(base, env)
    yield Wine(env=env, bin_dir=bin_dir, stub=bin_dir / "python.exe")
    _quiet(["wineserver", "-k"], env, 60)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    root = tmp_path / "Image to Video 图像转视频"
    root.mkdir()
    shutil.copy2(ROOT / "start_app.bat", root / "start_app.bat")
    return root


@dataclass
class BatRun:
    rc: int
    out: str
    calls: list[list[str]]  # one per stub call: [exe name, working directory, *arguments]


def run_bat(wine: Wine, project: Path, args: list[str], *, where_finds: str = "", exit_code: int = 0) -> BatRun:
    """Run start_app.bat from another folder; `where` reports the names in where_finds ("py,python")."""
    log = project.parent / "stub-calls.log"
    log.unlink(missing_ok=True)
    elsewhere = project.parent / "elsewhere"
    elsewhere.mkdir(exist_ok=True)
    env = dict(wine.env, STUB_LOG=winpath(log), STUB_EXIT=str(exit_code), STUB_WHERE_FOUND=where_finds,
               WINEPATH=winpath(wine.bin_dir))
    for _ in range(2):
        proc = subprocess.run(["wine", winpath(project / "start_app.bat"), *args], cwd=elsewhere, env=env,
                              input=b"\r\n", capture_output=True, timeout=60)
        # Every path through the batch file prints something or calls a stub. Exit 1 with neither means
        # Wine never started it (which happens on a loaded machine); run it once more rather than report
        # that as the batch file's failure. A real failure of the batch file repeats and is reported.
        if proc.returncode == 0 or proc.stdout or proc.stderr or log.exists():
            break
    calls = []
    if log.exists():
        calls = [line.split("\t") for line in log.read_text(encoding="utf-8").splitlines()]
    out = (proc.stdout + proc.stderr).decode("utf-8", errors="replace")
    return BatRun(proc.returncode, out, calls)


def make_venv(wine: Wine, project: Path) -> None:
    scripts = project / ".venv" / "Scripts"
    scripts.mkdir(parents=True)
    shutil.copy2(wine.stub, scripts / "python.exe")


ARGS = ["--port", "7861", "--model", r"D:\模型 folder\i2vgen-xl", "--auth", "alice:pa ss", "--listen", "--offline"]


def test_the_bat_file_is_crlf_without_bom_or_bashisms():
    data = (ROOT / "start_app.bat").read_bytes()
    assert not data.startswith(b"\xef\xbb\xbf"), "a BOM breaks the first line in cmd.exe"
    assert data.count(b"\n") == data.count(b"\r\n"), "every line must end in CRLF"
    text = data.decode("utf-8")
    for needed in ('cd /d "%~dp0"', "chcp 65001", "%*", "pause", r".venv\Scripts\python.exe", "py -3"):
        assert needed in text
    for bashism in ("#!/", "$(", "${", "export ", "[[", "fi\r"):
        assert bashism not in text
    code = [line for line in text.splitlines() if not line.lower().startswith("rem ")]
    assert not any("&&" in line for line in code), "Wine's cmd mishandles && chains; use if errorlevel"


def test_gitattributes_keep_crlf_for_the_bat_file():
    rules = (ROOT / ".gitattributes").read_text(encoding="utf-8").split()
    assert rules[rules.index("*.bat") + 1:rules.index("*.bat") + 3] == ["text", "eol=crlf"]
    if shutil.which("git") and (ROOT / ".git").exists():
        out = subprocess.run(["git", "check-attr", "eol", "--", "start_app.bat", "start_app.sh"], cwd=ROOT,
                             capture_output=True, text=True, timeout=30).stdout
        assert "start_app.bat: eol: crlf" in out and "start_app.sh: eol: lf" in out


def test_prefers_the_venv_and_passes_every_argument_from_its_own_folder(wine, project):
    make_venv(wine, project)
    run = run_bat(wine, project, ARGS, where_finds="py,python")
    assert run.rc == 0, run.out
    (call,) = run.calls
    assert call[0] == "python.exe"
    assert call[1] == winpath(project), "the .bat must cd to its own folder"
    assert call[2:] == ["start_app.py", *ARGS]
    assert PAUSE_PROMPT not in run.out, "no pause when all went well"


def test_uses_py_launcher_when_there_is_no_venv(wine, project):
    run = run_bat(wine, project, ARGS, where_finds="py,python")
    assert run.rc == 0, run.out
    (call,) = run.calls
    assert call[0] == "py.exe" and call[1] == winpath(project)
    assert call[2:] == ["-3", "start_app.py", *ARGS]


def test_falls_back_to_python_on_path(wine, project):
    run = run_bat(wine, project, ["--model", "tiny"], where_finds="python")
    assert run.rc == 0, run.out
    (call,) = run.calls
    assert call[0] == "python.exe" and call[2:] == ["start_app.py", "--model", "tiny"]


def test_a_failure_shows_the_error_pauses_and_keeps_the_exit_code(wine, project):
    make_venv(wine, project)
    run = run_bat(wine, project, ["--port", "7860"], exit_code=12)
    assert run.rc == 12
    assert "[ERROR] start_app.py stopped with exit code 12" in run.out
    assert "start_app.bat --diagnose" in run.out
    assert PAUSE_PROMPT in run.out, "the window must stay open on failure"


def test_ctrl_c_exit_does_not_pause(wine, project):
    make_venv(wine, project)
    run = run_bat(wine, project, [], exit_code=130)
    assert run.rc == 130 and PAUSE_PROMPT not in run.out


def test_no_python_says_what_to_install_and_pauses(wine, project):
    run = run_bat(wine, project, ["--port", "7861"], where_finds="")
    assert run.rc == 10 and run.calls == []
    assert "[ERROR] Python 3.10 or newer was not found." in run.out
    assert "https://www.python.org/downloads/windows/" in run.out
    assert PAUSE_PROMPT in run.out


def test_the_microsoft_store_alias_counts_as_no_python(wine, project):
    # The Store's python.exe stand-in is on PATH, and running it gives 9009 ("not recognized").
    run = run_bat(wine, project, [], where_finds="python", exit_code=9009)
    assert run.rc == 10
    assert "[ERROR] Python 3.10 or newer was not found." in run.out and PAUSE_PROMPT in run.out
