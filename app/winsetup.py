"""Native Windows: make compiled layers possible (Triton for torch.compile), or say exactly why they are off.

PyPI's `triton` has no Windows wheels; the community's `triton-windows` package (same `triton` module, with a
bundled TinyCC compiler and CUDA toolchain) does. On Windows with an NVIDIA GPU the launcher installs the
triton-windows minor that matches the installed torch, compiles and runs one small test kernel in a child
process, and records the outcome in the environment (`RECORD_NAME` in its prefix). The app reads that record
to run eager, and to say why and how to fix it, when Triton cannot work here (`recorded_blocker`).

Standard library only: start_app.py uses this module before anything is installed. Every probe and runner is
an argument, so the tests drive each branch without Windows, a GPU or a real pip.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The one table of torch minor -> Triton minor. On Linux torch names its Triton (Requires-Dist
# `triton==X.Y.Z; platform_system == "Linux"`); its Windows wheels name none, so the launcher looks the torch up
# here. Sources: triton-windows' README table (torch 2.6-2.10) and the Linux requirement of torch's own wheels
# (2.10-2.14; tests/test_windows_triton.py keeps the two in agreement). Torch 2.4 and 2.5 pair with Triton 3.1,
# whose Windows wheels are on GitHub only, not on PyPI, so they are left out: such a torch runs eager.
TORCH_TO_TRITON: dict[tuple[int, int], tuple[int, int]] = {
    (2, 6): (3, 2),
    (2, 7): (3, 3),
    (2, 8): (3, 4),
    (2, 9): (3, 5),
    (2, 10): (3, 6),
    (2, 11): (3, 6),
    (2, 12): (3, 7),
    (2, 13): (3, 7),
    (2, 14): (3, 8),
}
TRITON_PACKAGE = "triton-windows"
RECORD_NAME = "i2v-triton.json"
VCREDIST_URL = "https://aka.ms/vs/17/release/vc_redist.x64.exe"
VCREDIST_DLLS = ("vcruntime140.dll", "vcruntime140_1.dll", "msvcp140.dll")
DRIVER_URL = "https://www.nvidia.com/Download/index.aspx"
LONG_PATHS_COMMAND = ("New-ItemProperty -Path HKLM:\\SYSTEM\\CurrentControlSet\\Control\\FileSystem "
                      "-Name LongPathsEnabled -Value 1 -PropertyType DWORD -Force")
SHORT_ASCII_FOLDER = "C:\\i2v-app"
# The first compile of the test kernel builds Triton's CUDA launcher with TinyCC too: seconds on a usual PC, so a
# minute is plenty; a hung driver must not hold the start-up longer.
CHECK_TIMEOUT_S = 120.0
# Inductor's cache paths add about 150 characters below the cache folder; Windows' classic limit is 260.
LONG_PATH_CHARS = 100
# A failed download is tried again after this long (not at every start: offline, pip would wait on its timeouts).
PIP_RETRY_S = 24 * 3600.0

# Runs in the environment's Python: what the Triton step needs to know, from package metadata (importing
# torch would take seconds and lock its DLLs).
PROBE = r"""
import importlib.metadata as md, json, sys, sysconfig, tempfile

def version(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None

try:
    requires = md.requires("torch") or []
except md.PackageNotFoundError:
    requires = []
print(json.dumps({"python": sys.version.split()[0], "free_threaded": bool(sysconfig.get_config_var("Py_GIL_DISABLED")),
                  "base_prefix": sys.base_prefix, "temp": tempfile.gettempdir(), "torch": version("torch"),
                  "torch_requires": requires, "triton_windows": version("triton-windows"),
                  "triton": version("triton")}))
"""

# The test kernel: Triton compiles it (TinyCC builds the launcher, ptxas the kernel) and runs it on the GPU.
# argv[1] names the device ("cuda"; the tests run it on "cpu" in Triton's interpreter).
CHECK_SCRIPT = r"""
import sys
import torch
import triton
import triton.language as tl

@triton.jit
def add(x_ptr, y_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    tl.store(out_ptr + offsets, tl.load(x_ptr + offsets, mask=mask) + tl.load(y_ptr + offsets, mask=mask), mask=mask)

device = sys.argv[1] if len(sys.argv) > 1 else "cuda"
x = torch.arange(1000, dtype=torch.float32, device=device)
out = torch.zeros_like(x)
add[(triton.cdiv(1000, 256),)](x, x, out, 1000, BLOCK=256)
if device == "cuda":
    torch.cuda.synchronize()
assert torch.equal(out, x + x), "the test kernel computed a wrong sum"
print("TRITON-CHECK-OK", triton.__version__)
"""
CHECK_OK = "TRITON-CHECK-OK"


# ---------------------------------------------------------------------------------------------
# Versions
# ---------------------------------------------------------------------------------------------

def minor_of(version: str | None) -> tuple[int, int] | None:
    """(2, 13) from '2.13.0+cu128', None when it does not start with two numbers."""
    match = re.match(r"\s*(\d+)\.(\d+)", version or "")
    return (int(match.group(1)), int(match.group(2))) if match else None


def is_cuda_build(torch_version: str | None) -> bool:
    """True for torch's CUDA wheels ('2.9.1+cu128'); PyPI's Windows torch ('2.9.1') and '+cpu' have no CUDA."""
    return "+cu" in (torch_version or "")


def triton_minor_for(torch_version: str | None) -> tuple[int, int] | None:
    """The Triton minor this torch was built with, from TORCH_TO_TRITON; None when the table does not know it."""
    minor = minor_of(torch_version)
    return TORCH_TO_TRITON.get(minor) if minor else None


def linux_triton_minor(requires_dist: Iterable[str]) -> tuple[int, int] | None:
    """The Triton minor a torch wheel's metadata names ('triton==3.6.0; platform_system == "Linux"',
    'triton~=3.8.0; ...'), or None when it names none (CPU and Windows wheels)."""
    for requirement in requires_dist:
        match = re.match(r"\s*triton\s*\(?\s*(?:==|~=|>=)\s*(\d+)\.(\d+)", requirement.split(";")[0])
        if match:
            return int(match.group(1)), int(match.group(2))
    return None


def requirement_for(triton_minor: tuple[int, int]) -> str:
    """'triton-windows>=3.8,<3.9': any release of the minor (their versions are 3.8.0.postN, 3.8.1.postN, ...)."""
    major, minor = triton_minor
    return f"{TRITON_PACKAGE}>={major}.{minor},<{major}.{minor + 1}"


def installed_minor_matches(version: str | None, triton_minor: tuple[int, int]) -> bool:
    return minor_of(version) == triton_minor


def known_torch_range() -> str:
    first, last = min(TORCH_TO_TRITON), max(TORCH_TO_TRITON)
    return f"{first[0]}.{first[1]}-{last[0]}.{last[1]}"


# ---------------------------------------------------------------------------------------------
# Paths
# ---------------------------------------------------------------------------------------------

def compile_cache_dir(models_dir: Path) -> Path:
    """Where Inductor's and Triton's caches live: app.speedups and the launcher's Triton check share it."""
    return models_dir / ".compile-cache"


def triton_env(cache_dir: Path) -> dict[str, str]:
    """Triton's own folders under `cache_dir`, not under the user profile: TRITON_CACHE_DIR for compiled kernels,
    TRITON_HOME for the rest (its default is the home folder, whose name may be Chinese or sit in OneDrive)."""
    return {"TRITON_CACHE_DIR": str(cache_dir / "triton"), "TRITON_HOME": str(cache_dir)}


def temp_override(cache_dir: Path, temp_dir: str) -> dict[str, str]:
    """TMP and TEMP under `cache_dir` when the temp folder's path is not ASCII (a Chinese user name) and the cache
    folder's is: Triton builds its launcher there with TinyCC, which may not open such paths. Else nothing."""
    if temp_dir.isascii() or not str(cache_dir).isascii():
        return {}
    folder = str(cache_dir / "tmp")
    return {"TMP": folder, "TEMP": folder}


def non_ascii(paths: Iterable[tuple[str, str]]) -> tuple[str, str] | None:
    """The first (what, path) whose path has a character outside ASCII, else None."""
    return next(((what, path) for what, path in paths if not path.isascii()), None)


def read_long_paths_enabled() -> bool | None:
    """Windows' LongPathsEnabled switch; None when it cannot be read (not Windows, no such value)."""
    try:
        import winreg  # noqa: PLC0415 - Windows only
    except ImportError:
        return None
    try:
        with winreg.OpenKey(winreg.HKEY_LOCAL_MACHINE, r"SYSTEM\CurrentControlSet\Control\FileSystem") as key:
            return winreg.QueryValueEx(key, "LongPathsEnabled")[0] == 1
    except OSError:
        return None


def long_path_warning(cache_dir: Path, long_paths_enabled: bool | None) -> tuple[str, str] | None:
    """(en, zh) when the compile cache's path is long enough that Inductor's files may pass Windows' 260-character
    limit and long paths are not switched on; else None."""
    length = len(str(cache_dir))
    if length <= LONG_PATH_CHARS or long_paths_enabled:
        return None
    return (f"The compile cache {cache_dir} is {length} characters long; compiled files below it may pass Windows' "
            f"260-character path limit and fail. Fix: enable long paths (PowerShell as administrator: "
            f"{LONG_PATHS_COMMAND}) and reboot, or move the project to a short folder such as {SHORT_ASCII_FOLDER}.",
            f"编译缓存路径 {cache_dir} 长 {length} 个字符,其中的编译文件可能超过 Windows 260 字符的路径限制而失败。"
            f"解决:启用长路径(以管理员身份打开 PowerShell 运行 {LONG_PATHS_COMMAND})并重启,"
            f"或将项目移到较短的文件夹,例如 {SHORT_ASCII_FOLDER}。")


def vcredist_present(system_root: str | None = None, exists: Callable[[Path], bool] = Path.is_file) -> bool:
    """True when the Visual C++ runtime DLLs that Triton's libtriton.pyd links against are in System32."""
    root = Path(system_root or os.environ.get("SystemRoot") or "C:\\Windows")
    return all(exists(root / "System32" / dll) for dll in VCREDIST_DLLS)


def defender_hint(models_dir: Path, is_windows: bool) -> str | None:
    """The one-line tip about real-time virus scanning (Windows only): Defender scans every file the app reads and
    writes, which slows reading the weights and the compile cache's thousands of small files."""
    if not is_windows:
        return None
    return (f"提示 / Tip: Windows Defender scans each file the app reads; excluding the models folder speeds up "
            f"loading and compiling (PowerShell as administrator: Add-MpPreference -ExclusionPath \"{models_dir}\") "
            f"/ 将模型文件夹加入病毒扫描排除项可加快加载与编译。")


# ---------------------------------------------------------------------------------------------
# The record of the last check
# ---------------------------------------------------------------------------------------------

def record_path(prefix: Path) -> Path:
    return Path(prefix) / RECORD_NAME


def read_record(prefix: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(record_path(prefix).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_record(prefix: Path, record: Mapping[str, Any]) -> None:
    """Write atomically: a half-written record would be read as no record, and the check would run again."""
    path = record_path(prefix)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, path)


def needs_check(record: Mapping[str, Any] | None, fingerprint: Mapping[str, Any], now: float) -> bool:
    """Check again when there is no record, when anything a fix would change differs (torch, Python, the driver,
    the project folder, the VC++ runtime, long paths), or a download failed more than PIP_RETRY_S ago."""
    if not record or record.get("fingerprint") != dict(fingerprint):
        return True
    return record.get("reason") == "pip" and now - float(record.get("checked", 0)) > PIP_RETRY_S


def recorded_blocker(prefix: Path, torch_version: str) -> tuple[str, str] | None:
    """(en, zh) saying why compile is off and how to fix it, when the launcher's check failed for this torch in this
    environment; None when it passed, never ran, or was made for another torch."""
    record = read_record(prefix)
    if not record or record.get("status") != "failed":
        return None
    if (record.get("fingerprint") or {}).get("torch") != torch_version:
        return None
    return str(record.get("en", "")), str(record.get("zh", ""))


# ---------------------------------------------------------------------------------------------
# The check
# ---------------------------------------------------------------------------------------------

@dataclass
class Outcome:
    """What the Triton step found. status: 'ok', 'failed' or 'skipped' (not recorded: offline, CPU-only torch)."""

    status: str
    reason: str
    en: str
    zh: str
    detail: str = ""
    triton: str | None = None


def _last_error_line(output: str) -> str:
    """The line that names the error (the last 'SomethingError: ...'), else the last non-empty line."""
    lines = [line.strip() for line in output.strip().splitlines() if line.strip()]
    errors = [line for line in lines if re.match(r"[\w.]*(Error|Exception)\b", line)]
    return (errors or lines or ["no output"])[-1][:300]


def classify_check_failure(output: str, odd_path: tuple[str, str] | None) -> str:
    """The reason key for a failed test kernel, from its output and any non-ASCII path involved."""
    if re.search(r"DLL load failed", output):
        return "vcredist"
    if re.search(r"UNSUPPORTED_PTX_VERSION|driver version is insufficient|CUDA driver version|unsupported toolchain",
                 output, re.IGNORECASE):
        return "driver"
    if re.search(r"WinError 206|filename or extension is too long", output, re.IGNORECASE):
        return "long-path"
    if odd_path is not None:
        return "non-ascii"
    return "check"


def messages(reason: str, facts: Mapping[str, Any]) -> tuple[str, str]:
    """(en, zh), one line each, with the concrete fix. facts: the names the reason's text uses."""
    f = {"python": "python", "torch": "?", "spec": "", "code": "?", "detail": "", "driver": "?", "path": "",
         "triton": "?", "record": RECORD_NAME, "index_url": "", **facts}
    off_en, off_zh = "Compile off (the app runs uncompiled, slower): ", "编译已关闭(应用不编译运行,较慢):"
    if reason == "ok":
        return (f"Compile on: {TRITON_PACKAGE} {f['triton']} compiled and ran a test kernel.",
                f"编译已启用:{TRITON_PACKAGE} {f['triton']} 已成功编译并运行测试内核。")
    if reason == "free-threaded":
        return (off_en + f"Triton's bundled compiler does not work with free-threaded Python {f['python']}. "
                "Fix: make the environment with the regular Python build (python.exe, not python3.13t.exe): "
                "delete .venv and run start_app.bat with it.",
                off_zh + f"Triton 自带的编译器不支持自由线程版 Python {f['python']}。"
                "解决:用常规版 Python(python.exe,而非 python3.13t.exe)重建环境:删除 .venv 后用它运行 start_app.bat。")
    if reason == "vcredist":
        return (off_en + "the Microsoft Visual C++ runtime (vcruntime140.dll, msvcp140.dll) is missing or too old "
                f"for Triton. Fix: install {VCREDIST_URL}, then run start_app.bat again.",
                off_zh + "缺少 Microsoft Visual C++ 运行库(vcruntime140.dll、msvcp140.dll)或版本过旧。"
                f"解决:安装 {VCREDIST_URL},然后重新运行 start_app.bat。")
    if reason == "no-release":
        update = f"{f['python']} -m pip install --force-reinstall \"torch>=2.6\" --index-url {f['index_url']}"
        return (off_en + f"no {TRITON_PACKAGE} release is known to match torch {f['torch']} (known: torch "
                f"{known_torch_range()}). Fix: update torch: {update}",
                off_zh + f"没有已知与 torch {f['torch']} 匹配的 {TRITON_PACKAGE} 版本(支持 torch "
                f"{known_torch_range()})。解决:更新 torch:{update}")
    if reason == "pip":
        return (off_en + f"installing {f['spec']} failed (pip exit code {f['code']}: {f['detail']}). Fix: check the "
                "internet connection (behind a proxy set HTTPS_PROXY); start_app.bat tries again after a day, or "
                f"install it now: {f['python']} -m pip install \"{f['spec']}\"",
                off_zh + f"安装 {f['spec']} 失败(pip 退出码 {f['code']})。解决:检查网络连接(使用代理时设置 "
                f"HTTPS_PROXY);start_app.bat 一天后会重试,或立即手动安装:{f['python']} -m pip install \"{f['spec']}\"")
    if reason == "offline":
        return (off_en + f"{TRITON_PACKAGE} is not installed, and --offline forbids installing it. "
                "Fix: start once without --offline.",
                off_zh + f"未安装 {TRITON_PACKAGE},且 --offline 禁止安装。解决:不带 --offline 启动一次。")
    if reason == "driver":
        return (off_en + f"the NVIDIA driver {f['driver']} is too old for Triton's kernels ({f['detail']}). "
                f"Fix: update the driver ({DRIVER_URL}), then run start_app.bat again.",
                off_zh + f"NVIDIA 驱动 {f['driver']} 太旧,无法运行 Triton 内核。"
                f"解决:更新驱动({DRIVER_URL}),然后重新运行 start_app.bat。")
    if reason == "long-path":
        return (off_en + f"a compiled file's path was too long for Windows ({f['detail']}). Fix: enable long paths "
                f"(PowerShell as administrator: {LONG_PATHS_COMMAND}) and reboot, or move the project to a short "
                f"folder such as {SHORT_ASCII_FOLDER}; then run start_app.bat again.",
                off_zh + f"编译文件的路径超过 Windows 的长度限制。解决:启用长路径(以管理员身份在 PowerShell 运行 "
                f"{LONG_PATHS_COMMAND})并重启,或将项目移到较短的文件夹(例如 {SHORT_ASCII_FOLDER}),"
                "然后重新运行 start_app.bat。")
    if reason == "non-ascii":
        where = f.get("what", "project")
        fix_en = (f"move the project to a folder whose path has only English letters and digits, such as "
                  f"{SHORT_ASCII_FOLDER}" if where == "project" else
                  "install Python into a folder whose path has only English letters and digits (python.org's "
                  "installer, \"Install for all users\", uses C:\\Program Files), then delete .venv")
        fix_zh = (f"将项目移到路径只含英文字母和数字的文件夹,例如 {SHORT_ASCII_FOLDER}" if where == "project" else
                  "将 Python 安装到路径只含英文字母和数字的文件夹(python.org 安装程序选择“为所有用户安装”会装到 "
                  "C:\\Program Files),然后删除 .venv")
        return (off_en + f"Triton's test kernel failed ({f['detail']}), and {f['path']} has non-ASCII characters, "
                f"which Triton's bundled TinyCC compiler may not handle. Fix: {fix_en}; then run start_app.bat again.",
                off_zh + f"Triton 测试内核失败,且路径 {f['path']} 含非 ASCII 字符(如中文),Triton 自带的 TinyCC "
                f"编译器可能无法处理。解决:{fix_zh},然后重新运行 start_app.bat。")
    # "check": Triton imports but the test kernel fails for a reason not known here.
    return (off_en + f"{TRITON_PACKAGE} {f['triton']} is installed, but its test kernel failed: {f['detail']}. "
            f"Fix: see docs/windows.md; to check again after a fix, delete {f['record']} and run start_app.bat.",
            off_zh + f"已安装 {TRITON_PACKAGE} {f['triton']},但测试内核失败:{f['detail']}。"
            f"解决:参见 docs/windows.md;修复后删除 {f['record']} 并重新运行 start_app.bat 以重新检测。")


def probe_env(python: Path, timeout: float = 60) -> dict[str, Any]:
    """PROBE's facts about `python`'s environment; {} when it cannot run."""
    try:
        proc = subprocess.run([str(python), "-c", PROBE], capture_output=True, text=True, encoding="utf-8",
                              errors="replace", timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return {}
    return last_json_line(proc.stdout) or {}


def last_json_line(output: str) -> Any:
    """The last line of a child's output that parses as JSON (how the probes report, after whatever their imports
    print), or None."""
    for line in reversed(output.strip().splitlines()):
        try:
            return json.loads(line)
        except ValueError:
            continue
    return None


def run_captured(cmd: list[str], env: Mapping[str, str] | None = None,
                 timeout: float | None = None) -> tuple[int, str]:
    """(exit code, stdout + stderr); 124 on timeout, 127 when it cannot start."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, encoding="utf-8", errors="replace",
                              env=None if env is None else dict(env), timeout=timeout)
    except subprocess.TimeoutExpired:
        return 124, f"no answer after {timeout:.0f} s"
    except OSError as exc:
        return 127, f"cannot run {cmd[0]}: {exc}"
    return proc.returncode, proc.stdout + proc.stderr


def run_teed(cmd: list[str], env: Mapping[str, str] | None = None) -> tuple[int, str]:
    """Run with the output on the console as it comes (pip's download lines), and return (exit code, its tail)."""
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, encoding="utf-8",
                                errors="replace", env=None if env is None else dict(env))
    except OSError as exc:
        return 127, f"cannot run {cmd[0]}: {exc}"
    tail: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        print(line, end="", flush=True)
        tail = (tail + [line])[-40:]
    return proc.wait(), "".join(tail)


def setup_triton(*, python: Path, prefix: Path, project: Path, models_dir: Path, driver: str | None,
                 offline: bool, index_url: str, environ: Mapping[str, str],
                 probe: Callable[[Path], Mapping[str, Any]] = probe_env,
                 pip: Callable[..., tuple[int, str]] = run_teed,
                 check: Callable[..., tuple[int, str]] = run_captured,
                 vcredist: Callable[[], bool] = vcredist_present,
                 long_paths: Callable[[], bool | None] = read_long_paths_enabled,
                 now: Callable[[], float] = time.time,
                 note: Callable[[str, str], None] = lambda level, text: None) -> Outcome:
    """Install the triton-windows that matches the environment's torch and check it, unless the record of an
    earlier check still holds. Failures are recorded (so they are not retried at every start) and returned with
    their bilingual fix; `note(level, line)` hears what happens meanwhile. Raises only OSError (the models folder
    cannot be created)."""
    facts = dict(probe(python))
    torch_version = facts.get("torch")
    cache_dir = compile_cache_dir(models_dir)
    long_paths_enabled = long_paths()
    warning = long_path_warning(cache_dir, long_paths_enabled)
    if warning:
        note("WARN", warning[0])
        note("WARN", warning[1])
    if not is_cuda_build(torch_version):  # no torch or a CPU-only one: the GPU report says what to do
        return Outcome("skipped", "no-cuda-torch", "", "")
    fingerprint = {"torch": torch_version, "python": facts.get("python"), "driver": driver, "project": str(project),
                   "vcredist": vcredist(), "long_paths": long_paths_enabled}
    record = read_record(prefix)
    if not needs_check(record, fingerprint, now()):
        assert record is not None
        return Outcome(str(record["status"]), str(record["reason"]), str(record.get("en", "")),
                       str(record.get("zh", "")), str(record.get("detail", "")), record.get("triton"))

    triton_minor = triton_minor_for(torch_version)
    spec = requirement_for(triton_minor) if triton_minor else ""
    words: dict[str, Any] = {"python": str(python), "torch": torch_version, "spec": spec, "driver": driver or "?",
                             "index_url": index_url, "record": str(record_path(prefix))}
    installed = facts.get("triton_windows")

    def done(status: str, reason: str, detail: str = "", triton: str | None = None, **more: Any) -> Outcome:
        en, zh = messages(reason, {**words, "detail": detail, "triton": triton or "?", **more})
        outcome = Outcome(status, reason, en, zh, detail, triton)
        if status != "skipped":
            try:
                write_record(prefix, {"status": status, "reason": reason, "en": en, "zh": zh, "detail": detail,
                                      "triton": triton, "requirement": spec, "fingerprint": fingerprint,
                                      "checked": now()})
            except OSError:
                pass  # not writable: the check simply runs again next time
        return outcome

    if facts.get("free_threaded"):
        return done("failed", "free-threaded")
    if not fingerprint["vcredist"]:
        return done("failed", "vcredist")
    if triton_minor is None:
        return done("failed", "no-release")
    if not installed_minor_matches(installed, triton_minor):
        if offline:
            return done("skipped", "offline")
        pip_base = [str(python), "-m", "pip"]
        if facts.get("triton") and not installed:
            # PyPI's `triton` (or an old hand-made wheel) owns the same module folder: remove it first.
            pip([*pip_base, "uninstall", "-y", "triton"], env=environ)
        note("INFO", f"安装 / Installing {spec} for torch {torch_version} (compiled layers on Windows)")
        rc, output = pip([*pip_base, "install", "--disable-pip-version-check", spec], env=environ)
        installed = dict(probe(python)).get("triton_windows") if rc == 0 else None
        if rc != 0 or not installed:
            return done("failed", "pip", _last_error_line(output), code=rc)

    cache_dir.mkdir(parents=True, exist_ok=True)
    temp = str(facts.get("temp") or tempfile.gettempdir())
    override = temp_override(cache_dir, temp)
    for folder in set(override.values()):
        Path(folder).mkdir(parents=True, exist_ok=True)
    temp = override.get("TMP", temp)
    check_env = {**environ, **triton_env(cache_dir), **override, "PYTHONUTF8": "1"}
    note("INFO", f"检测 Triton / Checking Triton {installed} with a test kernel (once per torch and driver)")
    rc, output = check([str(python), "-c", CHECK_SCRIPT, "cuda"], env=check_env, timeout=CHECK_TIMEOUT_S)
    if rc == 0 and CHECK_OK in output:
        return done("ok", "ok", triton=installed)
    odd = non_ascii([("project", str(cache_dir)), ("python", str(facts.get("base_prefix") or "")),
                     ("project", temp)])
    reason = classify_check_failure(output, odd)
    extra = {"what": odd[0], "path": odd[1]} if reason == "non-ascii" and odd else {}
    return done("failed", reason, _last_error_line(output), triton=installed, **extra)
