#!/usr/bin/env python3
"""Start the Image-to-Video app: from a fresh Linux, WSL2 or Windows machine to a running UI.

Standard library only, so it runs on Python >= 3.10 before anything is installed. In order:
  1. Python version
  2. environment: the active venv/conda env, else the project's .venv (created if needed);
     `pip install -e .` on the first run and whenever pyproject.toml changes
     (Windows + NVIDIA GPU: torch's CUDA build from PyTorch's index first)
  3. port: a port you name must be free; if the default is taken, the next free one is used
  4. folders: outputs/, logs/, models/
  5. GPU and platform report (WSL2, CPU-only torch next to an NVIDIA GPU, ...); on Windows with an NVIDIA GPU,
     the triton-windows that matches torch, checked with a test kernel (else the app runs uncompiled, and says why)
  6. model: found, or downloaded (`python -m app download`) unless --offline
  7. hand over to `<env python> -m app serve --port N ...` and pass its exit code through
`start_app worker ...` starts a GPU worker instead (docs/scale-out.md): steps 1, 2 (with Celery) and 4, then
`<env python> -m app worker ...` with every argument after `worker` unchanged.

Exit codes (start_app.sh and start_app.bat return the same):
  0   the app stopped normally          10  Python missing or older than 3.10
  2   bad launcher flags                11  creating the environment or installing failed
  130 stopped with Ctrl+C               12  the port you named (--port) is in use
  1, 3-6  the app's own codes           13  no free port near the default one
          (see app/errors.py)           14  outputs/, logs/ or models/ cannot be created

Environment variables:
  I2V_SKIP_INSTALL=1   same as --skip-install: use the environment as it is (tests, CI, your own env)
  I2V_CONFIG, I2V_SERVER__PORT, I2V_SERVER__HOST, I2V_PATHS__*, I2V_MODEL__SOURCE/LOCAL_DIR
                       the config overrides the app itself reads (configs/config.yaml)
  HF_HOME, HF_HUB_CACHE, HF_HUB_OFFLINE   where the model is looked for; HF_HUB_OFFLINE=1 acts as --offline
"""

from __future__ import annotations

import sys

MIN_PYTHON = (3, 10)
EXIT_OK = 0
EXIT_USAGE = 2
EXIT_PYTHON = 10
EXIT_INSTALL = 11
EXIT_PORT_BUSY = 12
EXIT_NO_FREE_PORT = 13
EXIT_FOLDERS = 14
EXIT_INTERRUPTED = 130


def python_too_old(version_info: tuple[int, ...]) -> str | None:
    """The one line to print when this Python is older than MIN_PYTHON, else None."""
    if tuple(version_info[:2]) >= MIN_PYTHON:
        return None
    have = ".".join(str(n) for n in version_info[:3])
    need = ".".join(str(n) for n in MIN_PYTHON)
    return (f"[ERROR] Python {need}+ is needed, this is Python {have} ({sys.executable}). "
            f"Install Python {need} or newer (https://www.python.org/downloads/) and run start_app again. "
            f"/ 需要 Python {need}+,当前为 {have}。")


# Step 1 runs before anything else is imported, so an old Python gets one clear line, not a traceback.
if __name__ == "__main__" and python_too_old(sys.version_info):
    print(python_too_old(sys.version_info), file=sys.stderr)
    sys.exit(EXIT_PYTHON)

import argparse  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
from collections.abc import Callable, Mapping, Sequence  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from types import SimpleNamespace  # noqa: E402

ROOT = Path(__file__).resolve().parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from app import diagnose  # noqa: E402  (stdlib-only at import time: torch is probed lazily)
from app.hub import DEFAULT_HUB_ID, looks_like_hub_id  # noqa: E402  (stdlib-only too)
from app import winsetup  # noqa: E402  (stdlib-only too)

IS_WINDOWS = sys.platform == "win32"
MARKER_NAME = "i2v-app-install.json"
PORT_SEARCH_SPAN = 100
HANDOVER_GRACE_S = 5.0
# The keys of configs/config.yaml the launcher reads, with app.config's defaults for them (a test keeps the two
# equal). Nothing else of the config is read here: the app itself validates and uses the rest.
DEFAULTS = {
    ("server", "port"): "7860",
    ("server", "host"): "127.0.0.1",
    ("paths", "outputs"): "outputs",
    ("paths", "logs"): "logs",
    ("paths", "models"): "models",
    ("model", "source"): DEFAULT_HUB_ID,
    ("model", "local_dir"): "models/i2vgen-xl",
}
FLAG_HELP_EPILOG = """\
exit codes / 退出码:
  0 ok · 2 bad flags · 10 Python missing or < 3.10 · 11 environment/install failed
  12 the port you named is in use · 13 no free port · 14 folders cannot be created
  130 Ctrl+C · any other: the app's own code (1 unexpected, 3 model missing, 4 out of GPU memory, 6 config)

environment:
  I2V_SKIP_INSTALL=1   like --skip-install
  HF_HUB_OFFLINE=1     like --offline
  after "--", flags go to `python -m app serve` unchanged, e.g. start_app.py -- --low-vram on

GPU worker (docs/scale-out.md; Linux and WSL2):
  start_app.py worker --gpu 0 [--name NAME] ...   everything after `worker` goes to `python -m app worker`
  (with -- --config FILE the launcher takes the port, folders and model from FILE too)
"""


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------

def setup_console() -> None:
    """UTF-8 on Windows (the console defaults to a legacy code page); never crash on a character."""
    for stream in (sys.stdout, sys.stderr):
        try:
            if IS_WINDOWS:
                stream.reconfigure(encoding="utf-8", errors="replace")
            else:
                stream.reconfigure(errors="replace")
        except (AttributeError, ValueError):
            pass


def say(level: str, text: str) -> None:
    """One structured line: [INFO], [SUCCESS], [WARN] or [ERROR]."""
    stream = sys.stderr if level == "ERROR" else sys.stdout
    print(f"[{level}] {text}", file=stream, flush=True)


class LauncherError(Exception):
    """A step failed: `en`/`zh` say what, `fix` says what to do, `code` is the exit code."""

    def __init__(self, code: int, en: str, zh: str = "", fix: str = ""):
        super().__init__(en)
        self.code, self.en, self.zh, self.fix = code, en, zh, fix


# ---------------------------------------------------------------------------------------------
# Config: a tiny reader for the few keys the launcher needs (PyYAML is not installed yet)
# ---------------------------------------------------------------------------------------------

_YAML_ESCAPES = {"0": "\0", "a": "\a", "b": "\b", "t": "\t", "\t": "\t", "n": "\n", "v": "\v", "f": "\f", "r": "\r",
                 "e": "\x1b", " ": " ", '"': '"', "/": "/", "\\": "\\", "N": "\x85", "_": "\xa0", "L": "\u2028",
                 "P": "\u2029"}
_YAML_HEX_DIGITS = {"x": 2, "u": 4, "U": 8}


def _scalar(text: str) -> str:
    """A one-line YAML scalar as PyYAML reads it: 'single' ('' is a quote), "double" (with \\ escapes), or
    plain up to a ` #` comment. Windows paths are often written in double quotes with doubled backslashes."""
    text = text.strip()
    out: list[str] = []
    i = 1
    if text.startswith("'"):
        while i < len(text):
            if text[i] == "'":
                if text[i + 1:i + 2] != "'":
                    break
                i += 1
            out.append(text[i])
            i += 1
        return "".join(out)
    if text.startswith('"'):
        while i < len(text) and text[i] != '"':
            if text[i] == "\\" and i + 1 < len(text):
                code = text[i + 1]
                digits = _YAML_HEX_DIGITS.get(code, 0)
                try:
                    out.append(chr(int(text[i + 2:i + 2 + digits], 16)) if digits else _YAML_ESCAPES[code])
                    i += 2 + digits
                    continue
                except (KeyError, ValueError):
                    pass  # not an escape YAML knows: PyYAML refuses the file, so the app stops with exit 6
            out.append(text[i])
            i += 1
        return "".join(out)
    return re.split(r"\s+#", text, maxsplit=1)[0].strip()


def parse_simple_yaml(text: str) -> dict[str, dict[str, str]]:
    """{section: {key: value}} for the `section:` / `  key: value` lines of configs/config.yaml.

    Deeper levels (presets) are skipped; values stay strings.
    """
    out: dict[str, dict[str, str]] = {}
    section: str | None = None
    child_indent: int | None = None
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#") or ":" not in stripped:
            continue
        indent = len(line) - len(line.lstrip())
        key, _, value = stripped.partition(":")
        if indent == 0:
            section, child_indent = key.strip(), None
            out.setdefault(section, {})
            continue
        if section is None:
            continue
        if child_indent is None:
            child_indent = indent
        if indent == child_indent and _scalar(value):
            out[section][key.strip()] = _scalar(value)
    return out


@dataclass
class LauncherConfig:
    """The settings the launcher needs; duck-compatible with app.config.Settings for app.diagnose.

    No defaults here: load_config fills every field, from the file, the environment or DEFAULTS.
    """

    root: Path
    port: int
    port_from_env: bool
    host: str
    folders: dict[str, str]
    model: SimpleNamespace

    def path(self, name: str) -> Path:
        value = Path(self.folders[name]).expanduser()
        return value if value.is_absolute() else self.root / value

    @property
    def model_local_dir(self) -> Path:
        value = Path(self.model.local_dir).expanduser()
        return value if value.is_absolute() else self.root / value


def load_config(root: Path, environ: Mapping[str, str]) -> LauncherConfig:
    """configs/config.yaml (or I2V_CONFIG) plus I2V_<SECTION>__<KEY> overrides; defaults if unreadable."""
    path = Path(environ.get("I2V_CONFIG") or root / "configs" / "config.yaml")
    if not path.is_absolute():
        path = root / path
    try:
        # utf-8-sig: Windows Notepad may start the file with a BOM, which PyYAML skips too.
        raw = parse_simple_yaml(path.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError):
        raw = {}

    def get(section: str, key: str) -> str:
        env = environ.get(f"I2V_{section.upper()}__{key.upper()}")
        return env if env else raw.get(section, {}).get(key) or DEFAULTS[(section, key)]

    try:
        port = int(get("server", "port"))
    except ValueError:
        port = int(DEFAULTS[("server", "port")])
    return LauncherConfig(
        root=root,
        port=port,
        port_from_env=bool(environ.get("I2V_SERVER__PORT")),
        host=get("server", "host"),
        folders={name: get("paths", name) for name in ("outputs", "logs", "models")},
        model=SimpleNamespace(source=get("model", "source"), local_dir=get("model", "local_dir")),
    )


# ---------------------------------------------------------------------------------------------
# Step 2: environment and install
# ---------------------------------------------------------------------------------------------

@dataclass
class Env:
    """The Python environment the app runs in. kind: 'project' (.venv we manage), 'venv' or 'conda'."""

    kind: str
    prefix: Path
    python: Path

    @property
    def marker(self) -> Path:
        return self.prefix / MARKER_NAME


def venv_python(venv: Path, windows: bool = IS_WINDOWS) -> Path:
    return venv / ("Scripts/python.exe" if windows else "bin/python")


def _same_path(a: str | Path, b: str | Path) -> bool:
    try:
        return Path(a).resolve() == Path(b).resolve()
    except OSError:
        return False


def find_env(root: Path, *, prefix: str = sys.prefix, base_prefix: str = sys.base_prefix,
             executable: str = sys.executable, environ: Mapping[str, str] = os.environ,
             windows: bool = IS_WINDOWS) -> Env:
    """The active venv or conda env if this Python runs inside one, else the project's .venv.

    Conda's base env counts as "no env": `conda init` activates it in every shell, so being in it
    says nothing about where the user wants the app installed.
    """
    venv = root / ".venv"
    if prefix != base_prefix:
        kind = "project" if _same_path(prefix, venv) else "venv"
        return Env(kind, Path(prefix), Path(executable))
    conda = environ.get("CONDA_PREFIX")
    if conda and _same_path(conda, prefix) and environ.get("CONDA_DEFAULT_ENV", "base") != "base":
        return Env("conda", Path(prefix), Path(executable))
    return Env("project", venv, venv_python(venv, windows))


def project_hash(root: Path) -> str:
    return hashlib.sha256((root / "pyproject.toml").read_bytes()).hexdigest()


def install_stamp(root: Path, cuda_torch: bool) -> dict[str, str]:
    """What the marker must say for the install to be trusted: same pyproject.toml, folder and torch index."""
    return {
        "pyproject_sha256": project_hash(root),
        "project": str(root),
        "torch_index": diagnose.CUDA_INDEX_URL if cuda_torch else "pypi",
    }


def read_marker(marker: Path) -> dict[str, str] | None:
    try:
        return json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def torch_requirement(root: Path) -> str:
    """torch's requirement from pyproject.toml (e.g. 'torch>=2.4,<2.15'), so the CUDA build matches it."""
    try:
        text = (root / "pyproject.toml").read_text(encoding="utf-8")
    except OSError:
        return "torch"
    match = re.search(r"""^\s*["'](torch\s*[<>=!~][^"']*)["']""", text, re.MULTILINE)
    return match.group(1).replace(" ", "") if match else "torch"


def install_plan(env: Env, root: Path, *, cuda_torch: bool, fresh_venv: bool,
                 torch_now: Mapping[str, object] | None) -> list[tuple[str, list[str]]]:
    """The pip commands to run, each with what it does. torch_now: torch_facts of the env, if known."""
    py = str(env.python)
    pip = [py, "-m", "pip", "install", "--disable-pip-version-check"]
    plan = []
    if fresh_venv:
        # Python 3.10's own pip predates editable installs of a pyproject.toml-only project.
        plan.append(("upgrading pip / 更新 pip", [py, "-m", "pip", "install", "--disable-pip-version-check",
                                                 "--upgrade", "pip"]))
    if cuda_torch:
        has_cuda_torch = bool(torch_now and torch_now.get("installed") and torch_now.get("cuda"))
        if not has_cuda_torch:
            # A CPU torch already satisfies the requirement, so pip would keep it without --force-reinstall.
            force = ["--force-reinstall"] if torch_now and torch_now.get("installed") else []
            plan.append(("installing torch with CUDA from PyTorch's index / 安装 CUDA 版 torch",
                         [*pip, *force, torch_requirement(root), "--index-url", diagnose.CUDA_INDEX_URL]))
    plan.append(("installing the app and its dependencies / 安装应用及依赖", [*pip, "-e", str(root)]))
    return plan


def run_visible(cmd: Sequence[str], cwd: Path | None = None) -> int:
    """Run a command with its output (pip's progress) straight on the console; return its exit code."""
    try:
        return subprocess.run(list(cmd), cwd=cwd).returncode
    except OSError as exc:
        say("ERROR", f"cannot run {cmd[0]}: {exc}")
        return 127


def create_venv(env: Env, run: Callable[..., int] = run_visible) -> None:
    """Create the project's .venv, removing whatever is left of it if that fails."""
    say("INFO", f"创建虚拟环境 / Creating the environment {env.prefix} (first run)")
    rc = run([sys.executable, "-m", "venv", str(env.prefix)])
    if rc != 0 or not env.python.exists():
        shutil.rmtree(env.prefix, ignore_errors=True)
        fix = ("On Debian, Ubuntu or WSL: sudo apt install python3-venv (or python3.X-venv for your version), "
               "then run start_app again." if not IS_WINDOWS else
               "Reinstall Python from https://www.python.org/downloads/windows/, then run start_app.bat again.")
        raise LauncherError(EXIT_INSTALL, f"Could not create the environment {env.prefix} (exit code {rc}).",
                            f"无法创建虚拟环境 {env.prefix}。", fix)


def env_is_healthy(env: Env, run: Callable[..., int]) -> bool:
    return env.python.exists() and run([str(env.python), "-c", "import sys"]) == 0


def _quiet(cmd: Sequence[str], cwd: Path | None = None) -> int:
    try:
        return subprocess.run(list(cmd), cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode
    except OSError:
        return 127


def probe_torch(python: Path) -> Mapping[str, object]:
    """torch's facts as `python` sees them, always in a child process (see diagnose.torch_facts)."""
    return diagnose.torch_facts(python, isolate=True)


def ensure_env(env: Env, root: Path, *, cuda_torch: bool, run: Callable[..., int] = run_visible,
               check: Callable[..., int] = _quiet,
               probe: Callable[[Path], Mapping[str, object]] = probe_torch) -> bool:
    """Create .venv if needed and install the project unless the marker matches. True if it installed.

    The marker is deleted before and written only after every step succeeded, so a failed or
    interrupted install is never trusted by the next start.
    """
    fresh = False
    if env.kind == "project" and not env_is_healthy(env, check):
        if env.prefix.exists():
            say("WARN", f"环境已损坏,正在重建 / {env.prefix} is broken (its Python does not run); recreating it.")
            shutil.rmtree(env.prefix, ignore_errors=True)
        create_venv(env, run)
        fresh = True
    wanted = install_stamp(root, cuda_torch)
    if not fresh and read_marker(env.marker) == wanted:
        say("SUCCESS", f"环境就绪 / Environment ready: {env.prefix} (installed; pyproject.toml unchanged)")
        return False

    env.marker.unlink(missing_ok=True)
    say("INFO", f"安装中 / Installing into {env.prefix}: first run or pyproject.toml changed; "
                "this downloads a few GB the first time. pip's progress follows.")
    torch_now = probe(env.python) if cuda_torch and not fresh else None
    retry = ("Read pip's message above; check the internet connection (behind a proxy set HTTPS_PROXY) and the "
             "free disk space, then run start_app again: it retries the install.")
    if env.kind == "project":
        retry += f" To start over, delete the {env.prefix.name} folder."
    for what, cmd in install_plan(env, root, cuda_torch=cuda_torch, fresh_venv=fresh, torch_now=torch_now):
        say("INFO", what)
        rc = run(cmd, cwd=root)
        if rc != 0:
            raise LauncherError(EXIT_INSTALL,
                                f"Install failed while {what.split(' / ')[0]} (exit code {rc}): {' '.join(cmd)}",
                                "安装失败,详见上方 pip 的输出。", retry)
    if run([str(env.python), "-c", "import torch"], cwd=root) != 0:
        fix = ("Install the Microsoft Visual C++ Redistributable (x64) from "
               "https://aka.ms/vs/17/release/vc_redist.x64.exe, then run start_app.bat again." if IS_WINDOWS
               else "Read the error above, then run start_app again.")
        raise LauncherError(EXIT_INSTALL, "The install finished, but torch cannot be imported.",
                            "安装完成,但无法导入 torch。", fix)
    env.marker.write_text(json.dumps(wanted, indent=2), encoding="utf-8")
    say("SUCCESS", "安装完成 / Installed. Later starts skip this until pyproject.toml changes.")
    return True


def skip_install_env(env: Env) -> Env:
    """With --skip-install: the chosen env if its Python exists, else this interpreter."""
    if env.python.exists():
        return env
    say("WARN", f"{env.python} does not exist; using this Python as it is: {sys.executable}")
    return Env("venv", Path(sys.prefix), Path(sys.executable))


# ---------------------------------------------------------------------------------------------
# Step 3: port
# ---------------------------------------------------------------------------------------------

def port_in_use(host: str, port: int) -> bool:
    """True when something listens on `port`: binding fails, or a connection to it succeeds."""
    bind_host = "" if host in ("0.0.0.0", "") else host
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        if not IS_WINDOWS:
            # What uvicorn does too: a port in TIME_WAIT after the last run is free, not busy.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((bind_host, port))
        except OSError:
            return True
    # Windows lets 127.0.0.1 bind next to a 0.0.0.0 listener, so also ask whether anyone answers.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.3)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def choose_port(default: int, named: int | None, host: str,
                in_use: Callable[[str, int], bool] = port_in_use) -> tuple[int, str | None]:
    """(the port to use, a note when it isn't the one expected). Raises LauncherError 12/13."""
    if named is not None:
        if in_use(host, named):
            raise LauncherError(
                EXIT_PORT_BUSY, f"Port {named} is in use (you asked for it with --port or I2V_SERVER__PORT).",
                f"端口被占用:{named}。",
                f"Stop the program that uses port {named} (maybe the app is already running: look for its window), "
                f"or choose another port, e.g. --port {named + 1}, or leave --port out to pick a free one.")
        return named, None
    for port in range(default, min(default + PORT_SEARCH_SPAN, 65536)):
        if not in_use(host, port):
            note = None if port == default else f"端口被占用 / Port {default} is in use; using port {port} instead."
            return port, note
    raise LauncherError(EXIT_NO_FREE_PORT, f"No free port between {default} and {default + PORT_SEARCH_SPAN - 1}.",
                        "找不到空闲端口。", "Close other web apps, or name a port: --port 8080")


# ---------------------------------------------------------------------------------------------
# Step 4: folders
# ---------------------------------------------------------------------------------------------

def ensure_folders(config: LauncherConfig) -> list[Path]:
    """Create outputs/, logs/ and models/ (any depth; spaces and non-ASCII names are fine)."""
    made = []
    for name in ("outputs", "logs", "models"):
        path = config.path(name)
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise LauncherError(EXIT_FOLDERS, f"Cannot create the {name} folder {path}: {exc}",
                                f"无法创建目录 {path}。",
                                f"Check that you may write there, or set paths.{name} in configs/config.yaml "
                                "to a folder you own.") from None
        made.append(path)
    return made


# ---------------------------------------------------------------------------------------------
# Step 5: GPU and platform
# ---------------------------------------------------------------------------------------------

def platform_report(smi: diagnose.SmiResult, wsl: int | None, torch: Mapping[str, object] | None,
                    *, device: str | None, is_windows: bool, fix_python: str,
                    demo: bool = False) -> list[tuple[str, str]]:
    """(level, line) pairs for step 5, made from the same findings as `python -m app diagnose`."""
    lines = []
    kind = {None: "", 1: " (WSL1)", 2: " (WSL2)"}[wsl]
    lines.append(("INFO", f"系统 / System: {diagnose.os_description()}{kind} · Python {sys.version.split()[0]}"))
    for gpu in smi.gpus:
        mode = f" · {gpu.driver_model}" if gpu.driver_model else ""
        total = f"{gpu.total_gib:.1f}" if gpu.total_gib is not None else "?"
        free = f"{gpu.free_gib:.1f}" if gpu.free_gib is not None else "?"
        lines.append(("SUCCESS", f"GPU: {gpu.name} · 显存 / VRAM {total} GiB ({free} GiB free) · "
                                 f"driver {gpu.driver} · CUDA {smi.cuda_version or '?'}{mode}"))
    if torch and torch.get("installed"):
        build = f"CUDA {torch['cuda']}" if torch.get("cuda") else "CPU-only"
        lines.append(("INFO", f"torch {torch.get('version')} ({build} build)"))
    facts = diagnose.Facts(os_name="", is_windows=is_windows, wsl=wsl, python_version="", python_exe="",
                           torch=torch, smi=smi, wsl_gpu_bridge=Path("/dev/dxg").exists(), fix_python=fix_python)
    for finding in diagnose.assess(facts):
        if (device == "cpu" or demo) and finding.key in ("no-gpu", "wsl-no-gpu"):
            continue  # the user chose the CPU or the demo model on purpose
        level = {"problem": "WARN", "warning": "WARN", "info": "INFO"}[finding.level]
        lines.append((level, f"{finding.zh} / {finding.en}"))
        if finding.fix:
            lines.append((level, f"  Fix / 解决: {finding.fix}"))
    return lines


def windows_compile_step(env: Env, root: Path, config: LauncherConfig, smi: diagnose.SmiResult, offline: bool,
                         environ: Mapping[str, str]) -> winsetup.Outcome:
    """Native Windows with an NVIDIA GPU: the triton-windows that matches torch, or why compile stays off.

    The check's outcome is recorded in the environment, so it runs again only when something it depends on
    changes; the app reads the record and runs uncompiled when it failed."""
    driver = smi.gpus[0].driver if smi.gpus else None
    try:
        outcome = winsetup.setup_triton(python=env.python, prefix=env.prefix, project=root,
                                        models_dir=config.path("models"), driver=driver, offline=offline,
                                        index_url=diagnose.CUDA_INDEX_URL, environ=environ, note=say)
    except OSError as exc:  # the models folder vanished, a full disk: the app runs uncompiled, with its own note
        say("WARN", f"Triton check skipped ({exc}). / 跳过 Triton 检测。")
        return winsetup.Outcome("skipped", "error", "", "")
    if outcome.status == "ok":
        say("SUCCESS", f"{outcome.zh} / {outcome.en}")
    elif outcome.en:
        say("WARN", outcome.en)
        say("WARN", outcome.zh)
    return outcome


# ---------------------------------------------------------------------------------------------
# Step 6: model
# ---------------------------------------------------------------------------------------------

@dataclass
class ModelCheck:
    """kind: 'tiny', 'path' or 'hub'. found: the complete model folder, if any."""

    kind: str
    target: str
    found: Path | None = None
    problem: str | None = None
    downloadable: bool = False


def check_model(model: str | None, config: LauncherConfig, environ: Mapping[str, str], cwd: Path) -> ModelCheck:
    """Where the model for `--model` (or the config's model.source) is, and whether launcher may download it."""
    if model == "tiny":
        return ModelCheck("tiny", "tiny")
    source = model or config.model.source
    as_path = Path(source).expanduser()
    # A path typed on the command line is relative to where the user is; one in the config, to the project.
    as_path = as_path if as_path.is_absolute() else (cwd if model else config.root) / as_path
    if not looks_like_hub_id(source) or (model and as_path.exists()):
        problem = diagnose.model_folder_problem(as_path)
        return ModelCheck("path", str(as_path), None if problem else as_path, problem)
    is_configured = source == config.model.source
    found, searched = diagnose.find_model(config.model_local_dir if is_configured else None, source, environ)
    problem = None if found else "not found in " + " or ".join(str(p) for p in searched)
    # `python -m app download` fills model.local_dir, which is where the configured model is looked for.
    return ModelCheck("hub", source, found, problem, downloadable=is_configured)


def launcher_command() -> str:
    return "start_app.bat" if IS_WINDOWS else "./start_app.sh"


def model_missing_help(check: ModelCheck, python: Path, offline: bool) -> list[str]:
    """The [WARN] lines for a missing model: what is missing, how to get it, and the demo offer."""
    lines = [f"未找到模型 / Model not found: {check.target} ({check.problem})."]
    if check.kind == "hub":
        if offline:
            lines.append("--offline / HF_HUB_OFFLINE=1: not downloading. / 离线模式,不下载。")
        lines.append(f"Download it (several GB, resumes if interrupted) / 下载: {launcher_command()}   "
                     f"(or: \"{python}\" -m app download)")
        lines.append("Without internet: copy the i2vgen-xl folder from another PC into "
                     "models/i2vgen-xl (it must contain model_index.json).")
    else:
        lines.append("Point --model at a folder that contains model_index.json and the component folders.")
    lines.append(f"The app starts anyway; to try it now use the demo model (videos are noise): "
                 f"{launcher_command()} --model tiny / 演示模型 (输出为噪声)")
    return lines


# ---------------------------------------------------------------------------------------------
# Step 7: hand over
# ---------------------------------------------------------------------------------------------

def serve_command(python: Path, port: int, args: argparse.Namespace, extra: Sequence[str] = ()) -> list[str]:
    """`<python> -m app serve --port N` plus the flags the user gave."""
    cmd = [str(python), "-m", "app", "serve", "--port", str(port)]
    if args.listen:
        cmd.append("--listen")
    if args.model:
        cmd += ["--model", args.model]
    if args.offline:
        cmd.append("--offline")
    if args.device:
        cmd += ["--device", args.device]
    if args.share:
        cmd.append("--share")
    if args.auth:
        cmd += ["--auth", args.auth]
    return cmd + list(extra)


def child_env(environ: Mapping[str, str], cache_dir: Path | None = None, windows: bool | None = None,
              temp_dir: str | None = None) -> dict[str, str]:
    env = dict(environ)
    if IS_WINDOWS if windows is None else windows:
        # UTF-8 for the app's files and pipes too, not only for this console.
        env.setdefault("PYTHONUTF8", "1")
        env.setdefault("PYTHONIOENCODING", "utf-8")
        if cache_dir is not None:
            # A temp folder under a Chinese user name: Triton builds with TinyCC there (winsetup.temp_override).
            override = winsetup.temp_override(cache_dir, temp_dir or tempfile.gettempdir())
            for key, value in override.items():
                env[key] = value
                Path(value).mkdir(parents=True, exist_ok=True)
    return env


def run_child(cmd: Sequence[str], cwd: Path, env: Mapping[str, str] | None = None,
              grace_s: float = HANDOVER_GRACE_S) -> int:
    """Run the app as a child and return its exit code; Ctrl+C stops it and returns 130.

    Ctrl+C reaches the child too (same console, same process group), so first give it time to
    shut down by itself; only then pass the interrupt on, and finally kill it.
    """
    proc = subprocess.Popen(list(cmd), cwd=cwd, env=None if env is None else dict(env))
    restore = _forward_sigterm(proc)
    try:
        rc = proc.wait()
    except KeyboardInterrupt:
        say("INFO", "正在停止 / Stopping (Ctrl+C)…")
        _stop(proc, grace_s)
        return EXIT_INTERRUPTED
    finally:
        restore()
    if rc < 0:  # killed by a signal (POSIX): the shell's convention is 128 + signal number
        return EXIT_INTERRUPTED if -rc == signal.SIGINT else 128 - rc
    return rc


def _forward_sigterm(proc: subprocess.Popen) -> Callable[[], None]:
    """`kill <launcher>` or a service manager's stop must not leave the app running on its own."""
    if IS_WINDOWS:
        return lambda: None
    try:
        previous = signal.signal(signal.SIGTERM, lambda *_: proc.terminate())
    except ValueError:  # not the main thread: nothing to forward
        return lambda: None
    return lambda: signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def _stop(proc: subprocess.Popen, grace_s: float) -> None:
    """Wait for the child to stop by itself, then interrupt it, then kill it; another Ctrl+C skips ahead."""
    for action in ("wait", "interrupt", "kill"):
        try:
            if action == "interrupt":
                # Windows has no SIGINT for a child sharing our console; terminate is the nearest.
                proc.terminate() if IS_WINDOWS else proc.send_signal(signal.SIGINT)
            elif action == "kill":
                proc.kill()
            proc.wait(timeout=grace_s)
            return
        except (subprocess.TimeoutExpired, KeyboardInterrupt):
            continue
        except OSError:  # it is already gone
            return


# ---------------------------------------------------------------------------------------------
# Flags and main
# ---------------------------------------------------------------------------------------------

def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a port; use 1-65535")
    return value


def _auth(text: str) -> str:
    user, sep, password = text.partition(":")
    if not (sep and user and password):
        raise argparse.ArgumentTypeError("use USER:PASS, e.g. --auth alice:secret")
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="start_app",
        description="Start the Image-to-Video app (I2VGen-XL): sets up Python, installs on the first run, "
                    "then opens the web UI. / 一键启动图像转视频应用。",
        epilog=FLAG_HELP_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=_port, help="port of the web UI; it must be free (default: server.port "
                                                   "from configs/config.yaml, 7860, or the next free one)")
    parser.add_argument("--listen", action="store_true",
                        help="accept connections from other machines (bind 0.0.0.0, not 127.0.0.1)")
    parser.add_argument("--model", metavar="tiny|PATH|HUB_ID",
                        help="tiny (demo model, videos are noise), a model folder, or a Hugging Face hub id "
                             "(default: model.source, ali-vilab/i2vgen-xl)")
    parser.add_argument("--offline", action="store_true", help="never download (the app starts without the model "
                                                               "and says how to get it)")
    parser.add_argument("--device", help="auto, cpu, cuda or cuda:N (default: model.device from "
                                         "configs/config.yaml, auto)")
    parser.add_argument("--diagnose", action="store_true",
                        help="print the environment check (OS, Python, torch, GPU, driver, disk) and exit")
    parser.add_argument("--share", action="store_true", help="also create a public Gradio share link (off by default)")
    parser.add_argument("--auth", type=_auth, metavar="USER:PASS", help="require this login in the web UI")
    parser.add_argument("--skip-install", action="store_true",
                        help="use the environment as it is: no .venv creation, no pip (tests and CI; "
                             "same as I2V_SKIP_INSTALL=1)")
    return parser


def split_passthrough(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """(launcher flags, flags after `--` that go to `python -m app serve` unchanged)."""
    argv = list(argv)
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []


def passthrough_config(extra: Sequence[str]) -> str | None:
    """The file named by `--config` after `--`: the app reads its settings from it, so the launcher must too."""
    for i, arg in enumerate(extra):
        if arg == "--config" and i + 1 < len(extra):
            return extra[i + 1]
        if arg.startswith("--config="):
            return arg.partition("=")[2]
    return None


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None,
         root: Path = ROOT, handover: Callable[..., int] = run_child,
         run: Callable[..., int] = run_visible) -> int:
    setup_console()
    argv = list(sys.argv[1:] if argv is None else argv)
    environ = os.environ if environ is None else environ
    try:
        if argv[:1] == ["worker"]:
            return launch_worker(argv[1:], environ, root, handover, run)
        own, extra = split_passthrough(argv)
        args = build_parser().parse_args(own)
        return launch(args, extra, environ, root, handover, run)
    except LauncherError as exc:
        say("ERROR", f"{exc.zh} / {exc.en}" if exc.zh else exc.en)
        if exc.fix:
            say("ERROR", f"Fix / 解决: {exc.fix}")
        return exc.code
    except KeyboardInterrupt:
        say("WARN", "已中断 / Interrupted (Ctrl+C).")
        return EXIT_INTERRUPTED


def launch(args: argparse.Namespace, extra: Sequence[str], environ: Mapping[str, str], root: Path,
           handover: Callable[..., int], run: Callable[..., int]) -> int:
    """Steps 2-7 (step 1 ran at import)."""
    config_file = passthrough_config(extra)
    config = load_config(root, {**environ, "I2V_CONFIG": config_file} if config_file else environ)
    env = find_env(root, environ=environ)
    skip = args.skip_install or _truthy(environ.get("I2V_SKIP_INSTALL"))

    if args.diagnose:
        if env.python.exists():
            return diagnose.run(config, python=env.python, prefix=env.prefix)
        return diagnose.run(config, python=Path(sys.executable))

    say("INFO", f"图像转视频 / Image-to-Video · {root}")
    say("SUCCESS", f"Python {sys.version.split()[0]} ({sys.executable})")
    # 2. Environment
    smi = diagnose.nvidia_smi_query()
    cuda_torch = IS_WINDOWS and bool(smi.gpus)
    if skip:
        say("WARN", "Skipping the environment setup (--skip-install / I2V_SKIP_INSTALL=1).")
        env = skip_install_env(env)
    else:
        say("INFO", {"project": f"环境 / Environment: {env.prefix}",
                     "venv": f"环境 / Using the active virtual environment {env.prefix}",
                     "conda": f"环境 / Using the active conda environment {env.prefix}"}[env.kind])
        installed = ensure_env(env, root, cuda_torch=cuda_torch, run=run)
        hint = winsetup.defender_hint(config.path("models"), IS_WINDOWS) if installed else None
        if hint:
            say("INFO", hint)

    # 3. Port
    named = args.port if args.port is not None else (config.port if config.port_from_env else None)
    host = "0.0.0.0" if args.listen else config.host
    port, note = choose_port(config.port, named, host)
    if note:
        say("WARN", note)
    else:
        say("SUCCESS", f"端口空闲 / Port {port} is free.")

    # 4. Folders
    folders = ensure_folders(config)
    say("SUCCESS", "目录 / Folders ready: " + ", ".join(str(p) for p in folders))

    # 5. GPU and platform
    wsl = diagnose.wsl_version(diagnose.read_proc_version()) if sys.platform.startswith("linux") else None
    torch = probe_torch(env.python) if smi.gpus else None
    fix_python = diagnose.fix_python_for(env.python, root, IS_WINDOWS)
    for level, line in platform_report(smi, wsl, torch, device=args.device, is_windows=IS_WINDOWS,
                                       fix_python=fix_python, demo=args.model == "tiny"):
        say(level, line)

    offline = args.offline or _truthy(environ.get("HF_HUB_OFFLINE"))
    if cuda_torch and not skip and args.device != "cpu":
        windows_compile_step(env, root, config, smi, offline, environ)

    # 6. Model
    check = check_model(args.model, config, environ, Path.cwd())
    if check.kind == "tiny":
        say("WARN", "演示模型 (输出为噪声) / Demo model: --model tiny makes random-noise videos.")
    elif check.found:
        say("SUCCESS", f"模型 / Model found: {check.found}")
    else:
        if check.downloadable and not offline:
            say("INFO", f"下载模型 / Downloading {check.target} (resumes if interrupted; Ctrl+C to stop)")
            config_flag = ["--config", config_file] if config_file else []
            rc = run([str(env.python), "-m", "app", "download", *config_flag], cwd=root)
            check = check_model(args.model, config, environ, Path.cwd())
            if check.found:
                say("SUCCESS", f"模型 / Model downloaded: {check.found}")
            else:
                say("WARN", f"Download failed (exit code {rc}). / 下载失败。")
        if not check.found:
            for line in model_missing_help(check, env.python, offline):
                say("WARN", line)
    if check.kind == "path" and args.model:
        # The app runs in the project folder, so a path relative to the user's folder goes absolute.
        args = argparse.Namespace(**{**vars(args), "model": check.target})

    # 7. Hand over
    cmd = serve_command(env.python, port, args, extra)
    say("INFO", "启动应用 / Starting the app: " + " ".join(_quote(c) for c in cmd))
    return handover(cmd, cwd=root, env=child_env(environ, winsetup.compile_cache_dir(config.path("models"))))


def ensure_cluster(env: Env, root: Path, run: Callable[..., int] = run_visible,
                   check: Callable[..., int] = _quiet) -> None:
    """Celery and redis-py (the project's `cluster` extra), which a worker needs and the UI alone does not."""
    if check([str(env.python), "-c", "import celery, redis"], cwd=root) == 0:
        return
    say("INFO", "安装 Celery / Installing Celery and redis-py for the worker (the project's cluster extra)")
    cmd = [str(env.python), "-m", "pip", "install", "--disable-pip-version-check", "-e", f"{root}[cluster]"]
    rc = run(cmd, cwd=root)
    if rc != 0:
        raise LauncherError(EXIT_INSTALL, f"Installing Celery failed (exit code {rc}): {' '.join(cmd)}",
                            "安装 Celery 失败,详见上方 pip 的输出。",
                            "Read pip's message above, check the connection, then run start_app worker again.")


def launch_worker(args: Sequence[str], environ: Mapping[str, str], root: Path, handover: Callable[..., int],
                  run: Callable[..., int]) -> int:
    """`start_app worker ...`: the environment (with Celery), the folders, then `<env python> -m app worker ...`
    with the arguments unchanged. No port (a worker serves no page) and no download: the worker reads the
    model this machine has (python -m app download fetches it)."""
    if IS_WINDOWS:
        raise LauncherError(EXIT_USAGE, "Celery does not support Windows: run the GPU workers on Linux or WSL2, "
                                        "and on Windows the app with service.backend: local.",
                            "Celery 不支持 Windows:请在 Linux 或 WSL2 上运行 GPU worker,Windows 上使用"
                            " service.backend: local 运行应用。", "See docs/scale-out.md.")
    config = load_config(root, environ)
    env = find_env(root, environ=environ)
    say("INFO", f"图像转视频 GPU worker / Image-to-Video GPU worker · {root}")
    if _truthy(environ.get("I2V_SKIP_INSTALL")):
        say("WARN", "Skipping the environment setup (I2V_SKIP_INSTALL=1).")
        env = skip_install_env(env)
    else:
        ensure_env(env, root, cuda_torch=False, run=run)
        ensure_cluster(env, root, run)
    folders = ensure_folders(config)
    say("SUCCESS", "目录 / Folders ready: " + ", ".join(str(p) for p in folders))
    cmd = [str(env.python), "-m", "app", "worker", *args]
    say("INFO", "启动 GPU worker / Starting the worker: " + " ".join(_quote(c) for c in cmd))
    return handover(cmd, cwd=root, env=child_env(environ))


def _quote(text: str) -> str:
    return f'"{text}"' if (" " in text or not text) else text


if __name__ == "__main__":
    sys.exit(main())
