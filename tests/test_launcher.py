"""Unit tests of start_app.py's steps and of app/diagnose.py, on a CPU, without installing anything."""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import socket
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from app import diagnose  # noqa: E402
from ports import free_port  # noqa: E402


def _load_start_app():
    spec = importlib.util.spec_from_file_location("start_app", ROOT / "start_app.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["start_app"] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


start_app = _load_start_app()

# The flags every launcher offers (the README documents them), and the one switch only tests and CI use.
LAUNCHER_FLAGS = {"--port", "--listen", "--model", "--offline", "--device", "--diagnose", "--share", "--auth", "--help"}
TEST_ONLY_FLAGS = {"--skip-install"}

# /proc/version of real kernels.
WSL2_KERNELS = [
    "Linux version 5.15.153.1-microsoft-standard-WSL2 (root@941d701f84f1) (gcc (GCC) 11.2.0, GNU ld (GNU Binutils)"
    " 2.37) #1 SMP Fri Mar 29 23:14:13 UTC 2024",
    "Linux version 6.6.87.2-microsoft-standard-WSL2 (root@439a258ad544) (gcc (GCC) 11.2.0, GNU ld (GNU Binutils)"
    " 2.37) #1 SMP PREEMPT_DYNAMIC Thu Jun  5 18:30:46 UTC 2025",
    "Linux version 4.19.128-microsoft-standard (oe-user@oe-host) (gcc version 8.2.0 (GCC)) #1 SMP Tue Jun 23"
    " 12:58:10 UTC 2020",
]
WSL1_KERNEL = ("Linux version 4.4.0-19041-Microsoft (Microsoft@Microsoft.com) (gcc version 5.4.0 (GCC) ) "
               "#1237-Microsoft Sat Sep 11 14:32:00 PST 2021")
NATIVE_KERNELS = [
    "Linux version 6.1.0-18-amd64 (debian-kernel@lists.debian.org) (gcc-12 (Debian 12.2.0-14) 12.2.0, GNU ld (GNU"
    " Binutils for Debian) 2.40) #1 SMP PREEMPT_DYNAMIC Debian 6.1.76-1 (2024-02-01)",
    "Linux version 6.8.0-45-generic (buildd@lcy02-amd64-115) (x86_64-linux-gnu-gcc-13 (Ubuntu 13.2.0-23ubuntu4) 13.2.0,"
    " GNU ld (GNU Binutils for Ubuntu) 2.42) #45-Ubuntu SMP PREEMPT_DYNAMIC Fri Aug 30 12:02:04 UTC 2024",
    "Linux version 5.15.0-1064-azure (buildd@lcy02-amd64-031) (gcc (Ubuntu 9.4.0-1ubuntu1~20.04.2) 9.4.0, GNU ld (GNU"
    " Binutils for Ubuntu) 2.34) #73~20.04.1-Ubuntu SMP Mon May 6 09:43:44 UTC 2024",
]

# nvidia-smi output as printed on real machines.
SMI_WINDOWS_CSV = "NVIDIA GeForce RTX 4090, 566.36, 24564, 22938, WDDM\n"
SMI_LINUX_CSV = "NVIDIA H100 80GB HBM3, 580.159.04, 81559, 81079, [N/A]\n"
SMI_TWO_GPUS_CSV = "NVIDIA GeForce RTX 3060, 551.86, 12288, 11000, WDDM\nNVIDIA RTX A6000, 551.86, 49140, 48000, TCC\n"
SMI_HEADER = (
    "+-----------------------------------------------------------------------------------------+\n"
    "| NVIDIA-SMI 580.159.04             Driver Version: 580.159.04     CUDA Version: 13.0     |\n"
    "+-----------------------------------------+------------------------+----------------------+\n"
)
CPU_TORCH = {"installed": True, "version": "2.9.1+cpu", "cuda": None, "available": False}
CUDA_TORCH = {"installed": True, "version": "2.9.1+cu128", "cuda": "12.8", "available": True}


@contextmanager
def listening_socket(host: str = "127.0.0.1", port: int = 0):
    """A port that is really in use: bound and listening, as a running server's would be."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind((host, port))
        sock.listen(1)
        yield sock.getsockname()[1]
    finally:
        sock.close()


def make_project(root: Path, port: int = 7860) -> Path:
    """A project folder with the files start_app.py reads: configs/config.yaml and pyproject.toml."""
    (root / "configs").mkdir(parents=True)
    text = (ROOT / "configs" / "config.yaml").read_text(encoding="utf-8").replace("port: 7860", f"port: {port}")
    (root / "configs" / "config.yaml").write_text(text, encoding="utf-8")
    (root / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text(encoding="utf-8"), encoding="utf-8")
    return root


def make_model(folder: Path, *, with_weights: bool = True) -> Path:
    """A hub-layout folder shaped like I2VGen-XL's (empty weight files are enough for the presence check)."""
    index = {"_class_name": "I2VGenXLPipeline",
             "unet": ["diffusers", "I2VGenXLUNet"], "vae": ["diffusers", "AutoencoderKL"],
             "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
             "image_encoder": ["transformers", "CLIPVisionModelWithProjection"],
             "feature_extractor": ["transformers", "CLIPImageProcessor"], "scheduler": ["diffusers", "DDIMScheduler"]}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model_index.json").write_text(json.dumps(index), encoding="utf-8")
    weights = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model",
               "image_encoder": "model"}
    for part, stem in weights.items():
        (folder / part).mkdir(exist_ok=True)
        (folder / part / "config.json").write_text("{}", encoding="utf-8")
        if with_weights:
            (folder / part / f"{stem}.fp16.safetensors").write_bytes(b"")
    for part in ("tokenizer", "scheduler", "feature_extractor"):
        (folder / part).mkdir(exist_ok=True)
    return folder


class Recorder:
    """Stands in for run_visible (pip, venv, download) and for the handover; remembers every command."""

    def __init__(self, rc: int = 0, fail_on: str | None = None, fail_rc: int = 1):
        self.calls: list[list[str]] = []
        self.rc, self.fail_on, self.fail_rc = rc, fail_on, fail_rc

    def __call__(self, cmd, cwd=None, env=None, **_):
        cmd = [str(c) for c in cmd]
        self.calls.append(cmd)
        if "venv" in cmd and "-m" in cmd:
            python = start_app.venv_python(Path(cmd[-1]))
            python.parent.mkdir(parents=True, exist_ok=True)
            python.write_text("")
        if self.fail_on and self.fail_on in cmd:
            return self.fail_rc
        return self.rc

    def pip_installs(self) -> list[list[str]]:
        return [c for c in self.calls if c[1:4] == ["-m", "pip", "install"]]


@pytest.fixture
def quiet_machine(monkeypatch):
    """No GPU, no WSL, and no real torch probe: what every machine without a GPU would report."""
    monkeypatch.setattr(diagnose, "nvidia_smi_query", lambda *a, **k: diagnose.SmiResult(found=False))
    monkeypatch.setattr(diagnose, "read_proc_version", lambda: NATIVE_KERNELS[0])


def launch(argv, root, environ, handover=None, run=None):
    handover = handover or Recorder()
    run = run or Recorder()
    rc = start_app.main(argv, environ=environ, root=root, handover=handover, run=run)
    return rc, handover, run


def base_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {"I2V_SKIP_INSTALL": "1", "HF_HOME": str(tmp_path / "hf-home"), "PATH": os.environ.get("PATH", "")}
    env.update(extra)
    return env


# --- Flags --------------------------------------------------------------------------------------

def test_parser_has_exactly_the_documented_flags():
    parser = start_app.build_parser()
    flags = {s for a in parser._actions for s in a.option_strings if s.startswith("--")}
    assert flags - TEST_ONLY_FLAGS == LAUNCHER_FLAGS


def test_serve_accepts_every_flag_the_launcher_forwards():
    cli = pytest.importorskip("app.cli")
    args = start_app.build_parser().parse_args(
        ["--listen", "--model", "tiny", "--offline", "--device", "cpu", "--share", "--auth", "alice:se cret"])
    cmd = start_app.serve_command(Path("python"), 7861, args)
    assert cmd[1:4] == ["-m", "app", "serve"]
    parsed = cli.build_parser().parse_args(cmd[3:])
    assert (parsed.port, parsed.listen, parsed.model, parsed.offline, parsed.device, parsed.share, parsed.auth) == (
        7861, True, "tiny", True, "cpu", True, "alice:se cret")


def test_flags_after_double_dash_go_to_serve_unchanged():
    own, extra = start_app.split_passthrough(["--port", "7861", "--", "--low-vram", "on"])
    assert own == ["--port", "7861"] and extra == ["--low-vram", "on"]
    args = start_app.build_parser().parse_args(own)
    assert start_app.serve_command(Path("py"), 7861, args, extra)[-2:] == ["--low-vram", "on"]


@pytest.mark.parametrize("argv", [["--port", "0"], ["--port", "70000"], ["--port", "x"], ["--auth", "nopassword"]])
def test_bad_flags_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        start_app.build_parser().parse_args(argv)
    assert exc.value.code == start_app.EXIT_USAGE


def test_docs_list_every_flag_exit_code_and_env_var():
    doc = (ROOT / "README.md").read_text(encoding="utf-8")
    for flag in LAUNCHER_FLAGS | TEST_ONLY_FLAGS:
        assert f"`{flag}" in doc, f"{flag} is not documented"
    for name in dir(start_app):
        if name.startswith("EXIT_"):
            assert f"| {getattr(start_app, name)} " in doc, f"exit code {name} is not in the table"
    for var in ("I2V_SKIP_INSTALL", "HF_HUB_OFFLINE", "I2V_SERVER__PORT"):
        assert var in doc
    for error in ("'bash' is not recognized", "Errno 22", "CUDA out of memory"):
        assert error in doc, f"troubleshooting lacks {error!r}"


# --- Step 1: Python version -----------------------------------------------------------------------

def test_old_python_gets_one_clear_line():
    line = start_app.python_too_old((3, 9, 18, "final", 0))
    assert "3.10+" in line and "3.9.18" in line and "\n" not in line
    assert start_app.python_too_old((3, 10, 0)) is None
    assert start_app.python_too_old((3, 13, 1)) is None


def test_old_python_exits_10_before_importing_anything():
    code = ("import runpy, sys; sys.version_info = (3, 8, 10, 'final', 0); "
            f"runpy.run_path({str(ROOT / 'start_app.py')!r}, run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == start_app.EXIT_PYTHON
    assert proc.stderr.count("\n") == 1 and "3.8.10" in proc.stderr


def test_start_app_parses_on_old_pythons_so_they_reach_the_version_check():
    ast.parse((ROOT / "start_app.py").read_text(encoding="utf-8"), feature_version=(3, 7))


# --- Config --------------------------------------------------------------------------------------

def test_config_reader_gets_port_host_and_folders_from_the_real_config():
    raw = start_app.parse_simple_yaml((ROOT / "configs" / "config.yaml").read_text(encoding="utf-8"))
    assert raw["server"]["port"] == "7860" and raw["server"]["host"] == "127.0.0.1"
    assert raw["paths"] == {"outputs": "outputs", "logs": "logs", "models": "models"}
    assert raw["model"]["source"] == "ali-vilab/i2vgen-xl"
    assert "resolution" not in raw["presets"], "nested preset values must not leak into the section"


def test_config_env_overrides_and_fallbacks(tmp_path):
    config = start_app.load_config(tmp_path, {})  # no config file at all: defaults
    assert (config.port, config.host, config.port_from_env) == (7860, "127.0.0.1", False)
    config = start_app.load_config(ROOT, {"I2V_SERVER__PORT": "7999", "I2V_PATHS__OUTPUTS": "/data/videos"})
    assert (config.port, config.port_from_env) == (7999, True)
    assert config.path("outputs") == Path("/data/videos") and config.path("logs") == ROOT / "logs"


def test_a_config_passed_through_to_serve_is_the_one_the_launcher_reads(tmp_path, quiet_machine):
    root = make_project(tmp_path / "p")
    port = free_port()
    text = (root / "configs" / "config.yaml").read_text(encoding="utf-8")
    text = text.replace("port: 7860", f"port: {port}").replace("outputs: outputs", "outputs: 别的 outputs")
    (root / "configs" / "其他 config.yaml").write_text(text, encoding="utf-8")
    for flags in (["--config", "configs/其他 config.yaml"], ["--config=configs/其他 config.yaml"]):
        rc, handover, run = launch(["--", *flags], root, base_env(tmp_path), run=Recorder(fail_on="download"))
        assert rc == 0
        (cmd,) = handover.calls
        assert cmd[cmd.index("--port") + 1] == str(port) and cmd[-len(flags):] == flags
        assert (root / "别的 outputs").is_dir()
        (download,) = run.calls
        assert download[1:] == ["-m", "app", "download", "--config", "configs/其他 config.yaml"]


# --- Step 2: environment and install marker -------------------------------------------------------

def test_find_env_uses_an_active_venv_or_conda_env_else_the_project_venv(tmp_path):
    venv = tmp_path / "myenv"
    env = start_app.find_env(tmp_path, prefix=str(venv), base_prefix="/usr", executable=str(venv / "bin/python"),
                             environ={}, windows=False)
    assert (env.kind, env.python) == ("venv", venv / "bin/python")
    conda = tmp_path / "conda/envs/i2v"
    conda.mkdir(parents=True)
    env = start_app.find_env(tmp_path, prefix=str(conda), base_prefix=str(conda), executable="python",
                             environ={"CONDA_PREFIX": str(conda), "CONDA_DEFAULT_ENV": "i2v"}, windows=False)
    assert env.kind == "conda"
    env = start_app.find_env(tmp_path, prefix=str(conda), base_prefix=str(conda), executable="python",
                             environ={"CONDA_PREFIX": str(conda), "CONDA_DEFAULT_ENV": "base"}, windows=True)
    assert (env.kind, env.python) == ("project", tmp_path / ".venv" / "Scripts" / "python.exe")


def test_install_marker_skips_reinstall_until_pyproject_changes(tmp_path):
    root = make_project(tmp_path / "项目 with spaces")
    env = start_app.Env("venv", tmp_path / "env", Path(sys.executable))
    env.prefix.mkdir()

    run = Recorder()
    assert start_app.ensure_env(env, root, cuda_torch=False, run=run) is True
    assert [c[-2:] for c in run.pip_installs()] == [["-e", str(root)]]
    assert json.loads(env.marker.read_text(encoding="utf-8"))["pyproject_sha256"] == start_app.project_hash(root)

    run = Recorder()
    assert start_app.ensure_env(env, root, cuda_torch=False, run=run) is False
    assert run.calls == [], "a matching marker must skip pip entirely"

    with (root / "pyproject.toml").open("a", encoding="utf-8") as f:
        f.write('\n# a new dependency\n')
    run = Recorder()
    assert start_app.ensure_env(env, root, cuda_torch=False, run=run) is True
    assert len(run.pip_installs()) == 1


def test_failed_install_leaves_no_marker_and_says_how_to_retry(tmp_path, capsys):
    root = make_project(tmp_path / "p")
    env = start_app.Env("project", root / ".venv", start_app.venv_python(root / ".venv"))
    ok = Recorder()
    start_app.ensure_env(env, root, cuda_torch=False, run=ok, check=lambda *a, **k: 1)
    assert env.marker.exists()
    (root / "pyproject.toml").write_text((root / "pyproject.toml").read_text() + "\n#changed\n")

    failing = Recorder(fail_on="-e")
    with pytest.raises(start_app.LauncherError) as exc:
        start_app.ensure_env(env, root, cuda_torch=False, run=failing, check=lambda *a, **k: 0)
    assert exc.value.code == start_app.EXIT_INSTALL
    assert "run start_app again" in exc.value.fix and ".venv" in exc.value.fix
    assert not env.marker.exists(), "the next start must not trust a failed install"

    retry = Recorder()
    assert start_app.ensure_env(env, root, cuda_torch=False, run=retry, check=lambda *a, **k: 0) is True
    assert retry.pip_installs() and env.marker.exists()


def test_fresh_project_venv_is_created_then_pip_upgraded_then_installed(tmp_path):
    root = make_project(tmp_path / "Image to Video 张三")
    env = start_app.Env("project", root / ".venv", start_app.venv_python(root / ".venv"))
    run = Recorder()
    start_app.ensure_env(env, root, cuda_torch=True, run=run, check=lambda *a, **k: 1)
    assert run.calls[0][1:3] == ["-m", "venv"] and run.calls[0][-1] == str(root / ".venv")
    installs = run.pip_installs()
    assert installs[0][-2:] == ["--upgrade", "pip"]
    assert installs[1][-2:] == ["--index-url", "https://download.pytorch.org/whl/cu128"]
    assert installs[1][-3].startswith("torch>=")
    assert installs[2][-2:] == ["-e", str(root)]


def test_a_failed_venv_creation_is_removed(tmp_path):
    root = make_project(tmp_path / "p")
    env = start_app.Env("project", root / ".venv", start_app.venv_python(root / ".venv"))

    def broken_venv(cmd, cwd=None):
        (root / ".venv" / "half").mkdir(parents=True)
        return 1

    with pytest.raises(start_app.LauncherError) as exc:
        start_app.ensure_env(env, root, cuda_torch=False, run=broken_venv, check=lambda *a, **k: 1)
    assert exc.value.code == start_app.EXIT_INSTALL and not (root / ".venv").exists()


@pytest.mark.parametrize("torch_now, expect_torch_step, force", [
    (None, True, False),                 # nothing installed yet
    (CPU_TORCH, True, True),             # PyPI's CPU torch is there: pip would keep it without --force-reinstall
    (CUDA_TORCH, False, False),          # already the CUDA build
])
def test_windows_with_nvidia_installs_cuda_torch_first(tmp_path, torch_now, expect_torch_step, force):
    env = start_app.Env("venv", tmp_path, Path("python"))
    plan = start_app.install_plan(env, ROOT, cuda_torch=True, fresh_venv=False, torch_now=torch_now)
    cmds = [cmd for _, cmd in plan]
    torch_steps = [c for c in cmds if "--index-url" in c]
    assert bool(torch_steps) == expect_torch_step
    if torch_steps:
        assert cmds.index(torch_steps[0]) < cmds.index(cmds[-1])
        assert ("--force-reinstall" in torch_steps[0]) == force
    assert cmds[-1][-2:] == ["-e", str(ROOT)]


def test_linux_installs_torch_from_pypi(tmp_path):
    env = start_app.Env("venv", tmp_path, Path("python"))
    plan = start_app.install_plan(env, ROOT, cuda_torch=False, fresh_venv=False, torch_now=None)
    assert not any("--index-url" in cmd for _, cmd in plan)


def test_torch_requirement_follows_pyproject():
    assert start_app.torch_requirement(ROOT).startswith("torch>=")


# --- Step 3: port -----------------------------------------------------------------------------------

def test_named_port_in_use_is_an_error():
    with listening_socket() as busy:
        with pytest.raises(start_app.LauncherError) as exc:
            start_app.choose_port(7860, busy, "127.0.0.1")
    assert exc.value.code == start_app.EXIT_PORT_BUSY == 12
    assert str(busy) in exc.value.en and f"--port {busy + 1}" in exc.value.fix


def test_default_port_in_use_moves_to_the_next_free_one():
    with listening_socket() as busy:
        port, note = start_app.choose_port(busy, None, "127.0.0.1")
        assert port > busy and not start_app.port_in_use("127.0.0.1", port)
    assert note and str(busy) in note and str(port) in note


def test_free_default_port_is_kept():
    port = free_port()
    assert start_app.choose_port(port, None, "127.0.0.1") == (port, None)


def test_no_free_port_anywhere_is_exit_13():
    with pytest.raises(start_app.LauncherError) as exc:
        start_app.choose_port(7860, None, "127.0.0.1", in_use=lambda host, port: True)
    assert exc.value.code == start_app.EXIT_NO_FREE_PORT


def test_main_with_a_busy_named_port_exits_12_before_handing_over(tmp_path, quiet_machine, capsys):
    root = make_project(tmp_path / "p")
    with listening_socket() as busy:
        rc, handover, _ = launch(["--port", str(busy)], root, base_env(tmp_path))
    assert rc == 12 and handover.calls == []
    err = capsys.readouterr().err
    assert f"[ERROR] 端口被占用:{busy}。 / Port {busy} is in use" in err


def test_main_with_a_busy_default_port_hands_over_the_next_one(tmp_path, quiet_machine, capsys):
    with listening_socket() as busy:
        root = make_project(tmp_path / "p", port=busy)
        rc, handover, _ = launch(["--model", "tiny"], root, base_env(tmp_path))
    assert rc == 0
    cmd = handover.calls[0]
    chosen = int(cmd[cmd.index("--port") + 1])
    assert chosen > busy
    assert f"Port {busy} is in use; using port {chosen}" in capsys.readouterr().out


# --- Step 4: folders -------------------------------------------------------------------------------

def test_folders_are_created_under_paths_with_spaces_and_chinese(tmp_path):
    root = tmp_path / "C 盘" / "Users" / "张三" / "Image to Video"
    root.mkdir(parents=True)
    config = start_app.load_config(root, {"I2V_PATHS__MODELS": str(tmp_path / "大 模型")})
    made = start_app.ensure_folders(config)
    assert made == [root / "outputs", root / "logs", tmp_path / "大 模型"]
    assert all(p.is_dir() for p in made)
    assert start_app.ensure_folders(config) == made, "running twice is fine"


def test_a_folder_that_cannot_be_created_is_exit_14(tmp_path):
    (tmp_path / "outputs").write_text("a file where the folder should be")
    with pytest.raises(start_app.LauncherError) as exc:
        start_app.ensure_folders(start_app.load_config(tmp_path, {}))
    assert exc.value.code == start_app.EXIT_FOLDERS and "outputs" in exc.value.en


# --- Step 5: GPU and platform ----------------------------------------------------------------------

@pytest.mark.parametrize("text", WSL2_KERNELS)
def test_wsl2_is_detected_from_proc_version(text):
    assert diagnose.is_wsl(text) and diagnose.wsl_version(text) == 2


def test_wsl1_is_told_apart():
    assert diagnose.is_wsl(WSL1_KERNEL) and diagnose.wsl_version(WSL1_KERNEL) == 1


@pytest.mark.parametrize("text", NATIVE_KERNELS + [""])
def test_native_kernels_are_not_wsl(text):
    assert not diagnose.is_wsl(text) and diagnose.wsl_version(text) is None


def test_nvidia_smi_csv_is_parsed_with_wddm_and_tcc():
    (gpu,) = diagnose.parse_nvidia_smi_csv(SMI_WINDOWS_CSV)
    assert (gpu.name, gpu.driver, gpu.total_mib, gpu.free_mib, gpu.driver_model) == (
        "NVIDIA GeForce RTX 4090", "566.36", 24564, 22938, "WDDM")
    (gpu,) = diagnose.parse_nvidia_smi_csv(SMI_LINUX_CSV)
    assert gpu.driver_model is None and round(gpu.total_gib, 1) == 79.6
    assert [g.driver_model for g in diagnose.parse_nvidia_smi_csv(SMI_TWO_GPUS_CSV)] == ["WDDM", "TCC"]
    assert diagnose.parse_cuda_version(SMI_HEADER) == "13.0"


def test_nvidia_smi_query_retries_without_the_windows_only_field():
    calls = []

    def fake_run(cmd, **kwargs):
        calls.append(cmd)
        if "driver_model" in " ".join(cmd):
            return subprocess.CompletedProcess(cmd, 2, "", 'Field "driver_model.current" is not a valid field')
        if len(cmd) == 1:
            return subprocess.CompletedProcess(cmd, 0, SMI_HEADER, "")
        return subprocess.CompletedProcess(cmd, 0, "Tesla T4, 535.104.05, 15360, 14900\n", "")

    result = diagnose.nvidia_smi_query("nvidia-smi", run=fake_run)
    assert len(calls) == 3 and result.cuda_version == "13.0"
    assert [(g.name, g.total_mib) for g in result.gpus] == [("Tesla T4", 15360)]


def test_nvidia_smi_without_a_driver_is_a_problem_with_a_fix():
    def fake_run(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 9, "NVIDIA-SMI has failed because it couldn't communicate with the "
                                                   "NVIDIA driver.\n", "")
    result = diagnose.nvidia_smi_query("nvidia-smi", run=fake_run)
    assert result.found and not result.gpus and "couldn't communicate" in result.error
    findings = diagnose.assess(facts(smi=result))
    assert findings[0].key == "nvidia-smi-failed" and "driver" in findings[0].fix


def facts(**kw) -> diagnose.Facts:
    base = dict(os_name="test", is_windows=False, wsl=None, python_version="3.11", python_exe="python",
                torch=CUDA_TORCH, smi=diagnose.SmiResult(found=False), fix_python=".venv/bin/python")
    base.update(kw)
    return diagnose.Facts(**base)


def windows_gpu() -> diagnose.SmiResult:
    return diagnose.SmiResult(found=True, gpus=diagnose.parse_nvidia_smi_csv(SMI_WINDOWS_CSV), cuda_version="12.7")


def test_cpu_only_torch_next_to_an_nvidia_gpu_is_detected():
    gpus = windows_gpu().gpus
    assert diagnose.cpu_only_torch_with_nvidia_gpu(CPU_TORCH, gpus)
    assert not diagnose.cpu_only_torch_with_nvidia_gpu(CUDA_TORCH, gpus)
    assert not diagnose.cpu_only_torch_with_nvidia_gpu(CPU_TORCH, [])
    assert not diagnose.cpu_only_torch_with_nvidia_gpu({"installed": False}, gpus)


def test_cpu_only_torch_on_windows_gets_the_cu128_reinstall_command(tmp_path):
    fix_python = diagnose.fix_python_for(tmp_path / ".venv" / "Scripts" / "python.exe", tmp_path, is_windows=True)
    findings = diagnose.assess(facts(is_windows=True, torch=CPU_TORCH, smi=windows_gpu(), fix_python=fix_python))
    assert findings[0].level == "problem" and findings[0].key == "cpu-only-torch"
    assert findings[0].fix == (r".venv\Scripts\python -m pip install --force-reinstall torch "
                               "--index-url https://download.pytorch.org/whl/cu128")
    assert "RTX 4090" in findings[0].en


def test_cuda_torch_that_cannot_reach_the_gpu_asks_for_a_newer_driver():
    torch = dict(CUDA_TORCH, available=False)
    (finding,) = [f for f in diagnose.assess(facts(torch=torch, smi=windows_gpu())) if f.level == "problem"]
    assert finding.key == "cuda-unavailable" and "Update the NVIDIA driver" in finding.fix


def test_wsl2_without_a_gpu_points_to_the_windows_driver():
    findings = diagnose.assess(facts(wsl=2, torch=CPU_TORCH))
    keys = [f.key for f in findings]
    assert "wsl2" in keys and "wsl-no-gpu" in keys and "no-gpu" not in keys
    fix = next(f.fix for f in findings if f.key == "wsl-no-gpu")
    assert "NVIDIA driver for Windows" in fix and "Do not install a Linux NVIDIA driver inside WSL" in fix


def test_small_gpu_and_missing_model_are_warnings_not_problems(tmp_path):
    gpus = diagnose.parse_nvidia_smi_csv("NVIDIA GeForce RTX 3060, 551.86, 8192, 7000, WDDM")
    smi = diagnose.SmiResult(found=True, gpus=gpus)
    findings = diagnose.assess(facts(smi=smi, models_dir=tmp_path, models_free=500 * 1024**3))
    assert {f.key: f.level for f in findings} == {"low-vram": "warning", "model-missing": "warning"}


def test_a_full_disk_for_a_missing_model_is_a_problem(tmp_path):
    findings = diagnose.assess(facts(models_dir=tmp_path, models_free=2 * 1024**3, smi=windows_gpu()))
    assert findings[0].key == "disk-models" and findings[0].level == "problem"


def test_render_shows_every_fact_and_a_verdict(tmp_path):
    f = facts(is_windows=True, torch=CPU_TORCH, smi=windows_gpu(), models_dir=tmp_path, models_free=100 * 1024**3,
              outputs_dir=tmp_path, outputs_free=100 * 1024**3)
    text = diagnose.render(f, diagnose.assess(f))
    for part in ("OS", "native", "Python", "2.9.1+cpu", "CPU-only", "RTX 4090", "24.0 GiB", "566.36", "WDDM",
                 "CUDA 12.7", "100.0 GiB free", "Verdict", "problem(s) found", "--index-url"):
        assert part in text, part


def test_diagnose_run_on_this_machine_returns_an_exit_code(tmp_path, capsys):
    config = start_app.load_config(tmp_path, {})
    rc = diagnose.run(config)
    out = capsys.readouterr().out
    assert rc in (0, 1)
    assert "Environment check" in out and "Verdict" in out and str(tmp_path / "models") in out


def test_platform_report_in_the_launcher_warns_about_cpu_only_torch(tmp_path):
    lines = start_app.platform_report(windows_gpu(), None, CPU_TORCH, device=None, is_windows=True,
                                      fix_python=r".venv\Scripts\python")
    text = "\n".join(f"[{level}] {line}" for level, line in lines)
    assert "[SUCCESS] GPU: NVIDIA GeForce RTX 4090" in text and "WDDM" in text
    assert "[WARN]" in text and "--index-url https://download.pytorch.org/whl/cu128" in text


def test_platform_report_is_calm_when_the_user_chose_the_cpu():
    lines = start_app.platform_report(diagnose.SmiResult(found=False), None, None, device="cpu", is_windows=False,
                                      fix_python="python")
    assert all(level != "WARN" for level, _ in lines)


def test_platform_report_warns_without_a_gpu_unless_the_demo_model_was_chosen():
    args = dict(device=None, is_windows=False, fix_python="python")
    plain = start_app.platform_report(diagnose.SmiResult(found=False), None, None, **args)
    assert any(level == "WARN" and "No NVIDIA GPU" in line for level, line in plain)
    demo = start_app.platform_report(diagnose.SmiResult(found=False), None, None, demo=True, **args)
    assert all(level != "WARN" for level, _ in demo)


# --- Step 6: model --------------------------------------------------------------------------------

def test_model_is_found_in_models_or_the_hf_cache(tmp_path):
    root = make_project(tmp_path / "p")
    config = start_app.load_config(root, {})
    env = {"HF_HUB_CACHE": str(tmp_path / "cache")}
    assert start_app.check_model(None, config, env, tmp_path).found is None
    snap = make_model(tmp_path / "cache" / "models--ali-vilab--i2vgen-xl" / "snapshots" / "abc123")
    assert start_app.check_model(None, config, env, tmp_path).found == snap
    local = make_model(root / "models" / "i2vgen-xl")
    assert start_app.check_model(None, config, env, tmp_path).found == local


def test_hf_cache_location_follows_the_hf_variables(tmp_path):
    assert diagnose.hf_hub_cache({"HF_HUB_CACHE": "/a"}) == Path("/a")
    assert diagnose.hf_hub_cache({"HF_HOME": "/b"}) == Path("/b/hub")
    assert diagnose.hf_hub_cache({"XDG_CACHE_HOME": "/c"}) == Path("/c/huggingface/hub")
    assert diagnose.hf_hub_cache({}) == Path.home() / ".cache" / "huggingface" / "hub"


def test_an_unfinished_download_does_not_count_as_present(tmp_path):
    folder = make_model(tmp_path / "m", with_weights=False)
    assert "no weights" in diagnose.model_folder_problem(folder)


def test_model_flag_kinds(tmp_path):
    config = start_app.load_config(tmp_path, {})
    assert start_app.check_model("tiny", config, {}, tmp_path).kind == "tiny"
    folder = make_model(tmp_path / "my models" / "i2v")
    check = start_app.check_model("my models/i2v", config, {}, tmp_path)
    assert (check.kind, check.found) == ("path", folder)
    check = start_app.check_model("someone/other-model", config, {"HF_HUB_CACHE": str(tmp_path)}, tmp_path)
    assert (check.kind, check.found, check.downloadable) == ("hub", None, False)


def test_missing_model_with_offline_warns_and_still_hands_over(tmp_path, quiet_machine, capsys):
    root = make_project(tmp_path / "Image to Video 张三")
    handover = Recorder(rc=0)
    rc, handover, run = launch(["--offline"], root, base_env(tmp_path), handover=handover)
    assert rc == 0
    assert not any("download" in c for c in run.calls), "--offline must not download"
    (cmd,) = handover.calls
    assert cmd[1:6] == ["-m", "app", "serve", "--port", cmd[5]] and "--offline" in cmd
    out = capsys.readouterr().out
    assert "[WARN] 未找到模型 / Model not found: ali-vilab/i2vgen-xl" in out
    assert "-m app download" in out and "--model tiny" in out and "noise" in out
    assert all((root / name).is_dir() for name in ("outputs", "logs", "models"))


def test_the_apps_exit_code_is_passed_through(tmp_path, quiet_machine):
    root = make_project(tmp_path / "p")
    rc, _, _ = launch(["--offline"], root, base_env(tmp_path), handover=Recorder(rc=3))
    assert rc == 3


def test_missing_model_is_downloaded_and_a_failed_download_still_starts(tmp_path, quiet_machine, capsys):
    root = make_project(tmp_path / "p")
    run = Recorder(fail_on="download", fail_rc=3)
    rc, handover, run = launch([], root, base_env(tmp_path), run=run)
    assert rc == 0 and handover.calls
    assert [c[1:] for c in run.calls] == [["-m", "app", "download"]]
    out = capsys.readouterr().out
    assert "Download failed (exit code 3)" in out and "--model tiny" in out


def test_tiny_model_skips_the_model_check(tmp_path, quiet_machine, capsys):
    root = make_project(tmp_path / "p")
    rc, handover, run = launch(["--model", "tiny"], root, base_env(tmp_path))
    assert rc == 0 and run.calls == [] and "--model" in handover.calls[0]
    assert "Demo model" in capsys.readouterr().out


def test_hf_hub_offline_counts_as_offline(tmp_path, quiet_machine):
    root = make_project(tmp_path / "p")
    rc, _, run = launch([], root, base_env(tmp_path, HF_HUB_OFFLINE="1"))
    assert rc == 0 and run.calls == []


def test_a_relative_model_path_is_passed_absolute(tmp_path, quiet_machine, monkeypatch):
    root = make_project(tmp_path / "p")
    folder = make_model(tmp_path / "elsewhere" / "weights")
    monkeypatch.chdir(tmp_path / "elsewhere")
    _, handover, _ = launch(["--model", "weights"], root, base_env(tmp_path))
    cmd = handover.calls[0]
    assert cmd[cmd.index("--model") + 1] == str(folder)


# --- Step 7: hand over ----------------------------------------------------------------------------

def test_handover_passes_the_childs_exit_code(tmp_path):
    assert start_app.run_child([sys.executable, "-c", "raise SystemExit(4)"], cwd=tmp_path) == 4
    assert start_app.run_child([sys.executable, "-c", "pass"], cwd=tmp_path) == 0


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_a_child_killed_by_a_signal_maps_to_the_shell_convention(tmp_path):
    code = "import os, signal; os.kill(os.getpid(), signal.SIGTERM)"
    assert start_app.run_child([sys.executable, "-c", code], cwd=tmp_path) == 128 + 15


def test_diagnose_flag_prints_the_check_and_never_installs(tmp_path, quiet_machine, capsys):
    root = make_project(tmp_path / "p")
    run, handover = Recorder(), Recorder()
    rc = start_app.main(["--diagnose"], environ={"HF_HOME": str(tmp_path)}, root=root, handover=handover, run=run)
    assert rc in (0, 1) and run.calls == [] and handover.calls == []
    assert "Verdict" in capsys.readouterr().out
