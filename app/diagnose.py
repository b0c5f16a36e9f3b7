"""Environment check (环境检测): what this machine offers I2VGen-XL, and what to fix.

`python -m app diagnose` and `start_app.py --diagnose` print the report made here. The module
imports only the standard library (and app.hub, which does too), because start_app.py
uses it before anything is installed; torch is probed lazily, in this interpreter or in another one (the project's .venv).

Exit code of `run`: 0 when nothing blocks the app (warnings allowed), 1 when problems were found.
"""

from __future__ import annotations

import csv
import io
import os
import platform
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app import winsetup
from app.hub import DEFAULT_HUB_ID, snapshot_problem

PROJECT_ROOT = Path(__file__).resolve().parent.parent

# PyPI's torch for Windows is CPU-only; PyTorch's own index has the CUDA builds.
CUDA_INDEX_URL = "https://download.pytorch.org/whl/cu128"
# The fp16 weights take several GB; the rest is room for the download's temp files and compile caches.
MODEL_DISK_GIB = 10.0
OUTPUTS_DISK_GIB = 1.0
# Below this much VRAM the app switches to its low-VRAM mode (configs/config.yaml, model.low_vram_threshold_gib).
LOW_VRAM_GIB = 12.0

SMI_FIELDS = "name,driver_version,memory.total,memory.free,driver_model.current"
SMI_FIELDS_NO_MODEL = "name,driver_version,memory.total,memory.free"
WSL_NVIDIA_SMI = "/usr/lib/wsl/lib/nvidia-smi"
WINDOWS_NVIDIA_SMI = r"C:\Program Files\NVIDIA Corporation\NVSMI\nvidia-smi.exe"

Runner = Callable[..., "subprocess.CompletedProcess[str]"]


# ---------------------------------------------------------------------------------------------
# Pure helpers (unit-tested with real texts)
# ---------------------------------------------------------------------------------------------

def wsl_version(proc_version_text: str) -> int | None:
    """1 or 2 when /proc/version's text is a WSL kernel's, None for a native Linux kernel.

    WSL2 kernels are named `...-microsoft-standard-WSL2` (older ones `...-microsoft-standard`);
    WSL1 fakes a kernel named `4.4.0-<build>-Microsoft`.
    """
    text = proc_version_text.lower()
    if "microsoft" not in text:
        return None
    if "wsl2" in text or "microsoft-standard" in text:
        return 2
    return 1


def is_wsl(proc_version_text: str) -> bool:
    """True when /proc/version's text comes from a WSL kernel (WSL1 or WSL2)."""
    return wsl_version(proc_version_text) is not None


@dataclass
class GpuInfo:
    """One NVIDIA GPU as nvidia-smi sees it. Memory in MiB; driver_model is WDDM or TCC (Windows only)."""

    name: str
    driver: str
    total_mib: int | None
    free_mib: int | None
    driver_model: str | None = None

    @property
    def total_gib(self) -> float | None:
        return None if self.total_mib is None else self.total_mib / 1024

    @property
    def free_gib(self) -> float | None:
        return None if self.free_mib is None else self.free_mib / 1024


@dataclass
class SmiResult:
    """What nvidia-smi said: found is False when there is no nvidia-smi at all."""

    found: bool
    gpus: list[GpuInfo] = field(default_factory=list)
    cuda_version: str | None = None
    error: str | None = None


def _na(value: str) -> str | None:
    value = value.strip()
    return None if not value or value.startswith("[") or value.upper() in ("N/A", "NOT SUPPORTED") else value


def _mib(value: str) -> int | None:
    value = _na(value) or ""
    try:
        return int(float(value))
    except ValueError:
        return None


def parse_nvidia_smi_csv(text: str) -> list[GpuInfo]:
    """GPUs from `nvidia-smi --query-gpu=<SMI_FIELDS or SMI_FIELDS_NO_MODEL> --format=csv,noheader,nounits`."""
    gpus = []
    for row in csv.reader(io.StringIO(text), skipinitialspace=True):
        if len(row) < 4 or not row[0].strip():
            continue
        gpus.append(GpuInfo(
            name=row[0].strip(),
            driver=_na(row[1]) or "?",
            total_mib=_mib(row[2]),
            free_mib=_mib(row[3]),
            driver_model=_na(row[4]) if len(row) > 4 else None,
        ))
    return gpus


def parse_cuda_version(nvidia_smi_text: str) -> str | None:
    """The highest CUDA version the driver supports, from plain `nvidia-smi` output ("CUDA Version: 12.8")."""
    match = re.search(r"CUDA Version\s*:\s*([0-9][0-9.]*)", nvidia_smi_text)
    return match.group(1) if match else None


def cpu_only_torch_with_nvidia_gpu(torch: Mapping[str, Any], gpus: Sequence[GpuInfo]) -> bool:
    """True when torch is installed as a CPU-only build (torch.version.cuda is None) on a PC with an NVIDIA GPU."""
    return bool(gpus) and bool(torch.get("installed")) and not torch.get("cuda") and not torch.get("hip")


def windows_name(release: str, version: str) -> str:
    """'Windows 11 (10.0.22631)' from platform.release() and platform.version(); builds >= 22000 are Windows 11."""
    try:
        build = int(version.split(".")[2])
    except (IndexError, ValueError):
        build = 0
    name = "11" if release == "10" and build >= 22000 else release
    return f"Windows {name} ({version})"


def gib(n_bytes: int | float | None) -> str:
    return "?" if n_bytes is None else f"{n_bytes / 1024**3:.1f} GiB"


# ---------------------------------------------------------------------------------------------
# Probes of this machine (each takes its dependencies as arguments so tests can fake them)
# ---------------------------------------------------------------------------------------------

def find_nvidia_smi(which: Callable[[str], str | None] = shutil.which) -> str | None:
    """nvidia-smi's path: on PATH, or where WSL2 and the Windows driver put it when it isn't."""
    exe = which("nvidia-smi")
    if exe:
        return exe
    for candidate in (WSL_NVIDIA_SMI, WINDOWS_NVIDIA_SMI):
        if Path(candidate).is_file():
            return candidate
    return None


def nvidia_smi_query(exe: str | None = None, run: Runner = subprocess.run, timeout: float = 20) -> SmiResult:
    """Name, driver, total/free VRAM and (Windows) WDDM/TCC of each NVIDIA GPU, plus the driver's CUDA version."""
    exe = exe or find_nvidia_smi()
    if not exe:
        return SmiResult(found=False)

    def call(*args: str) -> subprocess.CompletedProcess[str] | None:
        try:
            return run([exe, *args], capture_output=True, text=True, encoding="utf-8",
                       errors="replace", timeout=timeout)
        except (OSError, subprocess.SubprocessError):
            return None

    # driver_model.current is a Windows field; older drivers reject it elsewhere, so retry without it.
    proc = call(f"--query-gpu={SMI_FIELDS}", "--format=csv,noheader,nounits")
    if proc is None or proc.returncode != 0:
        proc = call(f"--query-gpu={SMI_FIELDS_NO_MODEL}", "--format=csv,noheader,nounits")
    if proc is None or proc.returncode != 0:
        said = "" if proc is None else (proc.stdout + proc.stderr).strip().splitlines()
        detail = said[0] if said else "it did not answer"
        return SmiResult(found=True, error=f"nvidia-smi failed: {detail}")
    result = SmiResult(found=True, gpus=parse_nvidia_smi_csv(proc.stdout))
    plain = call()
    if plain is not None and plain.returncode == 0:
        result.cuda_version = parse_cuda_version(plain.stdout)
    return result


def torch_facts_here() -> dict[str, Any]:
    """Facts about the torch of this interpreter: installed, version, CUDA build, CUDA available, device."""
    try:
        import torch  # noqa: PLC0415 - lazy on purpose: torch may be absent, and importing it is slow
    except Exception as exc:  # a broken install raises OSError (DLL load) as often as ImportError
        return {"installed": False, "error": f"{type(exc).__name__}: {exc}"}
    facts: dict[str, Any] = {
        "installed": True,
        "version": torch.__version__,
        "cuda": torch.version.cuda,
        "hip": getattr(torch.version, "hip", None),
        "available": False,
    }
    try:
        facts["available"] = bool(torch.cuda.is_available())
        if facts["available"]:
            facts["device"] = torch.cuda.get_device_name(0)
    except Exception as exc:  # a driver too old for the build raises here rather than returning False
        facts["error"] = f"{type(exc).__name__}: {exc}"
    return facts


_PROBE = (
    "import json, sys; sys.path.insert(0, sys.argv[1]); "
    "from app.diagnose import torch_facts_here; print(json.dumps(torch_facts_here()))"
)


def torch_facts(python: str | os.PathLike[str] | None = None, run: Runner = subprocess.run,
                timeout: float = 180, isolate: bool = False) -> dict[str, Any]:
    """torch_facts_here() for this interpreter, or for `python` (e.g. the project's .venv) in a child process.

    isolate=True probes in a child even for this interpreter: the launcher must not hold torch's
    DLLs open (Windows locks them, and pip may have to replace them) for the app's whole lifetime.
    """
    if not isolate and (python is None or Path(python) == Path(sys.executable)):
        return torch_facts_here()
    python = python or sys.executable
    try:
        proc = run([str(python), "-c", _PROBE, str(PROJECT_ROOT)], capture_output=True, text=True,
                   encoding="utf-8", errors="replace", timeout=timeout)
    except (OSError, subprocess.SubprocessError) as exc:
        return {"installed": False, "error": f"could not run {python}: {exc}"}
    facts = winsetup.last_json_line(proc.stdout)
    if facts is not None:
        return facts
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {"installed": False, "error": f"{python} could not probe torch: {tail}"}


def disk_free(path: Path) -> int | None:
    """Free bytes on the disk that holds `path` (or its nearest existing parent)."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            try:
                return shutil.disk_usage(candidate).free
            except OSError:
                return None
    return None


def hf_hub_cache(environ: Mapping[str, str]) -> Path:
    """The Hugging Face hub cache folder, resolved the way huggingface_hub does."""
    for key in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if environ.get(key):
            return Path(environ[key]).expanduser()
    if environ.get("HF_HOME"):
        return Path(environ["HF_HOME"]).expanduser() / "hub"
    base = Path(environ["XDG_CACHE_HOME"]).expanduser() if environ.get("XDG_CACHE_HOME") else Path.home() / ".cache"
    return base / "huggingface" / "hub"


# One definition of "complete" for the launcher, diagnose and the loader.
model_folder_problem = snapshot_problem


def find_model(local_dir: Path | None, hub_id: str, environ: Mapping[str, str]) -> tuple[Path | None, list[Path]]:
    """Where the model's weights are: `local_dir`, then the HF cache's snapshots of `hub_id`.

    Returns (the complete folder or None, the places searched).
    """
    searched: list[Path] = []
    if local_dir is not None:
        searched.append(local_dir)
        if model_folder_problem(local_dir) is None:
            return local_dir, searched
    repo = hf_hub_cache(environ) / ("models--" + hub_id.replace("/", "--"))
    searched.append(repo)
    snapshots = repo / "snapshots"
    if snapshots.is_dir():
        for snap in sorted(snapshots.iterdir(), key=lambda p: p.stat().st_mtime, reverse=True):
            if model_folder_problem(snap) is None:
                return snap, searched
    return None, searched


def read_proc_version() -> str:
    try:
        return Path("/proc/version").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def os_description() -> str:
    """'Windows 11 (10.0.22631)', 'Debian GNU/Linux 12 (bookworm) · kernel 6.1.0-18-amd64', ..."""
    system = platform.system()
    if system == "Windows":
        return windows_name(platform.release(), platform.version())
    if system == "Linux":
        try:
            pretty = platform.freedesktop_os_release().get("PRETTY_NAME", "Linux")
        except OSError:
            pretty = "Linux"
        return f"{pretty} · kernel {platform.release()}"
    if system == "Darwin":
        return f"macOS {platform.mac_ver()[0]}"
    return f"{system} {platform.release()}"


# ---------------------------------------------------------------------------------------------
# The verdict
# ---------------------------------------------------------------------------------------------

@dataclass
class Facts:
    """Everything the verdict is made from. None means "not checked"."""

    os_name: str
    is_windows: bool
    wsl: int | None
    python_version: str
    python_exe: str
    torch: Mapping[str, Any] | None
    smi: SmiResult
    wsl_gpu_bridge: bool = False
    models_dir: Path | None = None
    models_free: int | None = None
    outputs_dir: Path | None = None
    outputs_free: int | None = None
    model_found: Path | None = None
    model_searched: list[Path] = field(default_factory=list)
    fix_python: str = "python"
    triton: Mapping[str, Any] | None = None  # native Windows: the launcher's Triton check (app.winsetup's record)


@dataclass
class Finding:
    """One line of the verdict. level: 'problem' (blocks the real model), 'warning' or 'info'; key names the case."""

    level: str
    key: str
    en: str
    zh: str
    fix: str | None = None


def fix_python_for(python: str | os.PathLike[str], root: Path, is_windows: bool) -> str:
    """How to spell `python` in a fix the user can paste: `.venv\\Scripts\\python` inside the project."""
    path = Path(python)
    venv = root / ".venv"
    try:
        inside = path.resolve().is_relative_to(venv.resolve()) or path.absolute().is_relative_to(venv.absolute())
    except OSError:
        inside = False
    if inside:
        return r".venv\Scripts\python" if is_windows else ".venv/bin/python"
    text = str(path)
    return f'"{text}"' if " " in text else text


def assess(facts: Facts) -> list[Finding]:
    """The findings for these facts, problems first. Pure, so every branch is unit-tested."""
    out: list[Finding] = []
    gpus = facts.smi.gpus
    torch = facts.torch
    py = facts.fix_python
    reinstall = f"{py} -m pip install --force-reinstall torch --index-url {CUDA_INDEX_URL}"

    if facts.wsl == 1:
        out.append(Finding(
            "problem", "wsl1", "This is WSL1, which has no GPU access.", "当前是 WSL1,无法使用 GPU。",
            "In Windows PowerShell run `wsl --set-version <distro> 2` (see `wsl -l -v`), then reopen the distro."))
    elif facts.wsl == 2:
        out.append(Finding(
            "info", "wsl2", "WSL2: the GPU is reached through the Windows NVIDIA driver (the WSL CUDA driver).",
            "WSL2:GPU 通过 Windows 的 NVIDIA 驱动 (WSL CUDA 驱动) 访问。"))

    if torch is not None and not torch.get("installed"):
        why = torch.get("error") or "not installed"
        out.append(Finding(
            "problem", "torch-missing", f"torch cannot be imported ({why}).", f"无法导入 torch ({why})。",
            "Run start_app again: it installs the app and torch into .venv."
            + (" If it says a DLL failed to load, install the Microsoft Visual C++ Redistributable (x64)"
               " from https://aka.ms/vs/17/release/vc_redist.x64.exe." if facts.is_windows else "")))

    if gpus and torch is not None and cpu_only_torch_with_nvidia_gpu(torch, gpus):
        version, gpu_name = torch.get("version"), gpus[0].name
        out.append(Finding(
            "problem", "cpu-only-torch",
            f"torch {version} is a CPU-only build, but this PC has an NVIDIA GPU ({gpu_name}).",
            f"torch {version} 是仅 CPU 版本,但本机有 NVIDIA GPU ({gpu_name})。",
            reinstall))
    elif gpus and torch is not None and torch.get("installed") and torch.get("cuda") and not torch.get("available"):
        build, driver_cuda = torch.get("cuda"), facts.smi.cuda_version or "?"
        detail = f": {torch['error']}" if torch.get("error") else ""
        out.append(Finding(
            "problem", "cuda-unavailable",
            f"torch is built for CUDA {build}, but it cannot use the GPU "
            f"(the driver supports CUDA {driver_cuda}){detail}.",
            f"torch 为 CUDA {build} 构建,但无法使用 GPU (驱动支持 CUDA {driver_cuda})。",
            "Update the NVIDIA driver (https://www.nvidia.com/Download/index.aspx)"
            + (" on Windows; WSL2 uses it too" if facts.wsl else "") + ", then restart."))

    if facts.smi.error:
        fix = ("Reinstall or update the NVIDIA Windows driver, then run `wsl --shutdown` in PowerShell and reopen WSL."
               if facts.wsl else "Reinstall or update the NVIDIA driver, then reboot.")
        out.append(Finding("problem", "nvidia-smi-failed", facts.smi.error, f"nvidia-smi 出错:{facts.smi.error}", fix))
    elif not gpus and facts.wsl == 2:
        out.append(Finding(
            "warning", "wsl-no-gpu", "No NVIDIA GPU is visible inside WSL2.", "WSL2 中看不到 NVIDIA GPU。",
            "Install the NVIDIA driver for Windows (Game Ready or Studio, with WSL support) on the Windows side, "
            "then run `wsl --update` and `wsl --shutdown` in PowerShell. "
            "Do not install a Linux NVIDIA driver inside WSL."
            + ("" if facts.wsl_gpu_bridge else " (/dev/dxg is missing: the WSL GPU bridge is not active.)")))
    elif not gpus:
        out.append(Finding(
            "warning", "no-gpu", "No NVIDIA GPU found: the real model is far too slow on a CPU.",
            "未检测到 NVIDIA GPU:真实模型在 CPU 上太慢。",
            "Use an NVIDIA GPU with a current driver, or try the demo model: --model tiny (output is noise)."))

    for gpu in gpus:
        if gpu.total_gib is not None and gpu.total_gib < LOW_VRAM_GIB:
            out.append(Finding(
                "warning", "low-vram",
                f"{gpu.name} has {gpu.total_gib:.1f} GiB of VRAM: the app will use its low-VRAM mode (slower).",
                f"{gpu.name} 显存 {gpu.total_gib:.1f} GiB:将使用低显存模式 (较慢)。",
                "Prefer the fast preset (512p, 16 frames); high quality (768p, 24 frames) may run out of GPU memory."))

    if facts.model_found is None and facts.models_dir is not None:
        free = facts.models_free
        if free is not None and free < MODEL_DISK_GIB * 1024**3:
            out.append(Finding(
                "problem", "disk-models",
                f"Only {gib(free)} free for models/; the model needs about {MODEL_DISK_GIB:.0f} GiB.",
                f"models/ 所在磁盘仅剩 {gib(free)},模型需要约 {MODEL_DISK_GIB:.0f} GiB。",
                "Free some disk space, or point paths.models in configs/config.yaml to a bigger disk."))
        out.append(Finding(
            "warning", "model-missing", "The I2VGen-XL weights are not downloaded yet.",
            "未找到模型 (I2VGen-XL 权重尚未下载)。",
            f"{py} -m app download   (or start the demo model: --model tiny, output is noise)"))
    if facts.outputs_free is not None and facts.outputs_free < OUTPUTS_DISK_GIB * 1024**3:
        out.append(Finding(
            "warning", "disk-outputs", f"Only {gib(facts.outputs_free)} free for outputs/.",
            f"outputs/ 所在磁盘仅剩 {gib(facts.outputs_free)}。",
            "Delete old videos from outputs/, or point paths.outputs in configs/config.yaml to a bigger disk."))

    if facts.is_windows and facts.triton and facts.triton.get("status") == "failed":
        # The recorded lines carry their own fix.
        out.append(Finding("warning", "triton", str(facts.triton.get("en")), str(facts.triton.get("zh"))))

    order = {"problem": 0, "warning": 1, "info": 2}
    return sorted(out, key=lambda f: order[f.level])


def render(facts: Facts, findings: Sequence[Finding]) -> str:
    """The report as text: one fact per line, then the verdict and the fixes."""
    torch = facts.torch or {}
    if facts.torch is None:
        torch_line = "not checked"
    elif torch.get("installed"):
        build = (f"CUDA {torch['cuda']}" if torch.get("cuda")
                 else f"ROCm {torch['hip']}" if torch.get("hip") else "CPU-only")
        available = bool(torch.get("available"))
        torch_line = f"{torch.get('version')} · build: {build} · torch.cuda.is_available(): {available}"
    else:
        torch_line = f"not importable ({torch.get('error', 'not installed')})"

    lines = ["[INFO] 环境检测 / Environment check"]
    platform_kind = {None: "native", 1: "WSL1", 2: "WSL2"}[facts.wsl]
    lines.append(f"  OS / 系统:       {facts.os_name} · {platform_kind}")
    lines.append(f"  Python:          {facts.python_version} ({facts.python_exe})")
    lines.append(f"  torch:           {torch_line}")
    if facts.smi.gpus:
        for i, gpu in enumerate(facts.smi.gpus):
            mode = f" · {gpu.driver_model}" if gpu.driver_model else ""
            total = f"{gpu.total_gib:.1f}" if gpu.total_gib is not None else "?"
            free = f"{gpu.free_gib:.1f}" if gpu.free_gib is not None else "?"
            lines.append(f"  GPU {i}:           {gpu.name} · VRAM / 显存 {total} GiB ({free} GiB free)"
                         f" · driver {gpu.driver} · CUDA {facts.smi.cuda_version or '?'}{mode}")
    else:
        none = "none found" if facts.smi.found else "none found (no nvidia-smi)"
        lines.append(f"  GPU:             {facts.smi.error or none}")
    if facts.is_windows:
        record = facts.triton or {}
        compile_state = {"ok": f"on · {winsetup.TRITON_PACKAGE} {record.get('triton')}",
                         "failed": f"off · {record.get('reason')} (see below)"}.get(
            str(record.get("status")), "not checked yet (start_app.bat checks Triton)")
        lines.append(f"  Compile / 编译:  {compile_state}")
    if facts.models_dir is not None:
        lines.append(f"  Disk / 磁盘:     {gib(facts.models_free)} free for {facts.models_dir}")
    if facts.outputs_dir is not None:
        lines.append(f"                   {gib(facts.outputs_free)} free for {facts.outputs_dir}")
    if facts.models_dir is not None:
        searched = ", ".join(map(str, facts.model_searched))
        where = str(facts.model_found) if facts.model_found else f"not found in {searched}"
        lines.append(f"  Model / 模型:    {where}")

    for f in findings:
        tag = {"problem": "[ERROR]", "warning": "[WARN]", "info": "[INFO]"}[f.level]
        lines.append(f"{tag} {f.zh} / {f.en}")
        if f.fix:
            lines.append(f"        Fix / 解决: {f.fix}")
    problems = sum(f.level == "problem" for f in findings)
    if problems:
        lines.append(f"[ERROR] 结论 / Verdict: {problems} problem(s) found; fix them as shown above.")
    else:
        warnings = sum(f.level == "warning" for f in findings)
        lines.append("[SUCCESS] 结论 / Verdict: ready (就绪)" + (f" · {warnings} warning(s) above" if warnings else ""))
    return "\n".join(lines)


def gather(settings: Any, python: str | os.PathLike[str] | None = None,
           environ: Mapping[str, str] | None = None, prefix: Path | None = None) -> Facts:
    """Probe this machine. `settings` needs .path(name), .model_local_dir, .model.source and .root;
    `prefix` is the environment of `python` (default: this interpreter's)."""
    environ = os.environ if environ is None else environ
    is_windows = sys.platform == "win32"
    if prefix is None and (python is None or str(python) == sys.executable):
        prefix = Path(sys.prefix)
    wsl = wsl_version(read_proc_version()) if sys.platform.startswith("linux") else None
    python = str(python or sys.executable)
    models_dir = settings.path("models")
    outputs_dir = settings.path("outputs")
    found, searched = find_model(Path(settings.model_local_dir), settings.model.source, environ)
    if python == sys.executable:
        py_version = platform.python_version()
    else:
        try:
            py_version = subprocess.run([str(python), "-c", "import platform; print(platform.python_version())"],
                                        capture_output=True, text=True, timeout=60).stdout.strip() or "?"
        except (OSError, subprocess.SubprocessError):
            py_version = "?"
    return Facts(
        os_name=os_description(),
        is_windows=is_windows,
        wsl=wsl,
        python_version=py_version,
        python_exe=str(python),
        torch=torch_facts(python),
        smi=nvidia_smi_query(),
        wsl_gpu_bridge=Path("/dev/dxg").exists(),
        models_dir=models_dir,
        models_free=disk_free(models_dir),
        outputs_dir=outputs_dir,
        outputs_free=disk_free(outputs_dir),
        model_found=found,
        model_searched=searched,
        fix_python=fix_python_for(python, Path(settings.root), is_windows),
        triton=winsetup.read_record(prefix) if is_windows and prefix is not None else None,
    )


def run(settings: Any, *, python: str | os.PathLike[str] | None = None, prefix: Path | None = None,
        out: Callable[[str], None] = print) -> int:
    """Print the environment check for `settings` and return 0 (ready) or 1 (problems found).

    `python` is the interpreter whose torch to inspect (the default is this one), `prefix` its environment.
    """
    facts = gather(settings, python, prefix=prefix)
    findings = assess(facts)
    out(render(facts, findings))
    return 1 if any(f.level == "problem" for f in findings) else 0
