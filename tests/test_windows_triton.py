"""Native Windows: Triton for compiled layers (app/winsetup.py, the launcher's step, the app's decision, the
status bar and diagnose), the Windows paths, and reading the weights in one go.

No Windows, GPU or network here: the platform, probes, pip and the kernel check are injected, and the test
kernel itself runs in Triton's CPU interpreter.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from app import diagnose, winsetup  # noqa: E402
from test_launcher import Recorder, base_env, make_project, start_app  # noqa: E402

TRITON_DIR = Path(os.environ.get("I2V_TEST_TRITON_DIR", ROOT / ".venv" / "triton-interpret"))

# torch's own Linux wheels on PyPI, their Requires-Dist line for Triton (copied from each wheel's METADATA).
LINUX_TORCH_REQUIREMENTS = {
    "2.10.0": 'triton==3.6.0; platform_system == "Linux" and platform_machine == "x86_64"',
    "2.11.0": 'triton==3.6.0; platform_system == "Linux"',
    "2.12.1": 'triton==3.7.1; platform_system == "Linux"',
    "2.13.0": 'triton==3.7.1; platform_system == "Linux" and python_version < "3.15"',
    "2.14.1": 'triton~=3.8.0; platform_system == "Linux" and python_version < "3.15"',
}
CUDA_TORCH = "2.14.1+cu128"


# --- Which triton-windows ------------------------------------------------------------------------

@pytest.mark.parametrize("torch_version, line", LINUX_TORCH_REQUIREMENTS.items())
def test_the_table_names_the_triton_each_torch_wheel_requires_on_linux(torch_version, line):
    assert winsetup.triton_minor_for(torch_version) == winsetup.linux_triton_minor([line, "filelock"])


def test_the_table_agrees_with_the_torch_installed_here():
    version = md.version("torch")
    named = winsetup.linux_triton_minor(md.requires("torch") or [])
    if named is None:  # the CPU build names no Triton; a CUDA build always does
        assert not winsetup.is_cuda_build(version) and "+cpu" in version, version
    else:
        assert winsetup.triton_minor_for(version) == named, (version, named)


def test_the_requirement_takes_any_release_of_the_minor():
    assert winsetup.triton_minor_for("2.14.1+cu128") == (3, 8)
    assert winsetup.requirement_for((3, 8)) == "triton-windows>=3.8,<3.9"
    assert winsetup.installed_minor_matches("3.8.0.post29", (3, 8))
    assert not winsetup.installed_minor_matches("3.7.1.post27", (3, 8))
    # 2.4 and 2.5 pair with Triton 3.1, whose Windows wheels are not on PyPI; the future is not guessed.
    assert winsetup.triton_minor_for("2.5.1+cu124") is None and winsetup.triton_minor_for("2.15.0+cu130") is None
    assert winsetup.is_cuda_build("2.9.1+cu128") and not winsetup.is_cuda_build("2.9.1")


# --- The launcher's Triton step, with fakes --------------------------------------------------------

class FakeMachine:
    """A Windows environment as the Triton step sees it; each runner records its calls."""

    def __init__(self, tmp_path: Path, *, torch: str = CUDA_TORCH, installed: str | None = None,
                 pip_result=(0, "Successfully installed triton-windows-3.8.0.post29"),
                 check_result=(0, "TRITON-CHECK-OK 3.8.0"), project: Path | None = None, **facts):
        self.prefix = tmp_path / "venv"
        self.prefix.mkdir(parents=True, exist_ok=True)
        self.project = project or tmp_path / "project"
        self.facts = {"python": "3.12.8", "free_threaded": False, "base_prefix": "C:\\Python312",
                      "temp": "C:\\Users\\alice\\AppData\\Local\\Temp", "torch": torch, "torch_requires": [],
                      "triton_windows": installed, "triton": installed, **facts}
        self.pip_result, self.check_result = pip_result, check_result
        self.pip_calls: list[list[str]] = []
        self.check_calls: list[tuple[list[str], dict]] = []
        # Long paths on, so a deep tmp_path gives no warning; the long-path test switches them off.
        self.vcredist, self.long_paths, self.now = True, True, 1_000_000.0
        self.notes: list[tuple[str, str]] = []

    def probe(self, python):
        return dict(self.facts)

    def pip(self, cmd, env=None):
        self.pip_calls.append(cmd)
        if cmd[3] == "install" and self.pip_result[0] == 0:
            self.facts["triton_windows"] = self.facts["triton"] = "3.8.0.post29"
        return self.pip_result if cmd[3] == "install" else (0, "")

    def check(self, cmd, env=None, timeout=None):
        self.check_calls.append((cmd, dict(env or {})))
        return self.check_result

    def run(self, offline: bool = False, driver: str = "572.16") -> winsetup.Outcome:
        return winsetup.setup_triton(
            python=Path("C:/p/.venv/Scripts/python.exe"), prefix=self.prefix, project=self.project,
            models_dir=self.project / "models", driver=driver, offline=offline,
            index_url="https://download.pytorch.org/whl/cu128", environ={"PATH": "x"}, probe=self.probe,
            pip=self.pip, check=self.check, vcredist=lambda: self.vcredist, long_paths=lambda: self.long_paths,
            now=lambda: self.now, note=lambda level, text: self.notes.append((level, text)))

    @property
    def record(self):
        return winsetup.read_record(self.prefix)


def test_a_good_machine_installs_the_matching_triton_checks_it_once_and_records_ok(tmp_path):
    m = FakeMachine(tmp_path)
    outcome = m.run()
    assert outcome.status == "ok" and outcome.triton == "3.8.0.post29"
    assert m.pip_calls == [["C:/p/.venv/Scripts/python.exe", "-m", "pip", "install", "--disable-pip-version-check",
                            "triton-windows>=3.8,<3.9"]]
    cmd, env = m.check_calls[0]
    assert cmd[1:3] == ["-c", winsetup.CHECK_SCRIPT] and cmd[3] == "cuda"
    # Triton's folders are under the project's compile cache, never in the user profile.
    cache = m.project / "models" / ".compile-cache"
    assert env["TRITON_CACHE_DIR"] == str(cache / "triton") and env["TRITON_HOME"] == str(cache)
    assert "TMP" not in env  # an ASCII temp folder is left alone
    assert m.record["status"] == "ok" and m.record["fingerprint"]["torch"] == CUDA_TORCH
    assert "Compile on: triton-windows 3.8.0.post29" in outcome.en and "编译已启用" in outcome.zh
    assert [level for level, _ in m.notes] == ["INFO", "INFO"]  # installing, then checking

    # The next start trusts the record: no pip, no kernel.
    again = m.run()
    assert again.status == "ok" and len(m.pip_calls) == 1 and len(m.check_calls) == 1


def test_an_installed_matching_triton_is_only_checked(tmp_path):
    m = FakeMachine(tmp_path, installed="3.8.0.post29")
    assert m.run().status == "ok" and m.pip_calls == [] and len(m.check_calls) == 1


def test_a_new_torch_or_driver_checks_again(tmp_path):
    m = FakeMachine(tmp_path, installed="3.8.0.post29")
    m.run()
    m.run(driver="581.42")
    assert len(m.check_calls) == 2
    m.facts["torch"] = "2.13.0+cu128"  # torch changed: the 3.7 minor is installed in place of 3.8
    m.run(driver="581.42")
    assert m.pip_calls[-1][-1] == "triton-windows>=3.7,<3.8" and len(m.check_calls) == 3


def test_pypi_triton_is_removed_before_triton_windows_goes_in(tmp_path):
    m = FakeMachine(tmp_path, triton="2.1.0")
    m.run()
    assert [c[3] for c in m.pip_calls] == ["uninstall", "install"] and m.pip_calls[0][-1] == "triton"


# Each reason the app may have to run uncompiled: the machine, the reason, and words its fix must contain.
FAILURES = {
    "free-threaded": (dict(free_threaded=True), ["python.exe", "delete .venv"], "自由线程"),
    "vcredist": (dict(vcredist=False), [winsetup.VCREDIST_URL], "运行库"),
    "no-release": (dict(torch="2.5.1+cu124"), ["torch 2.5.1+cu124", "pip install --force-reinstall \"torch>=2.6\"",
                                              "--index-url https://download.pytorch.org/whl/cu128"], "更新 torch"),
    "pip": (dict(pip_result=(1, "ERROR: Could not find a version that satisfies the requirement triton-windows\n"
                                "ERROR: No matching distribution found for triton-windows<3.9,>=3.8\n")),
            ["pip exit code 1", "No matching distribution", "HTTPS_PROXY",
             'pip install "triton-windows>=3.8,<3.9"'], "网络"),
    "driver": (dict(check_result=(1, "Traceback (most recent call last):\n  ...\nRuntimeError: Triton Error [CUDA]: "
                                     "CUDA_ERROR_UNSUPPORTED_PTX_VERSION\n")),
               ["driver 572.16 is too old", winsetup.DRIVER_URL], "更新驱动"),
    "vcredist-dll": (dict(check_result=(1, "ImportError: DLL load failed while importing libtriton: "
                                           "The specified module could not be found.\n")),
                     [winsetup.VCREDIST_URL], "运行库"),
    "long-path": (dict(check_result=(1, "OSError: [WinError 206] The filename or extension is too long: 'C:\\...'\n")),
                  ["LongPathsEnabled", "reboot", winsetup.SHORT_ASCII_FOLDER], "长路径"),
    "non-ascii": (dict(check_result=(1, "tcc: error: file 'C:/项目/x.c' not found\nsubprocess.CalledProcessError: "
                                        "Command '['tcc.exe']' returned non-zero exit status 1.\n"), chinese=True),
                  ["non-ASCII", winsetup.SHORT_ASCII_FOLDER, "CalledProcessError"], "非 ASCII"),
    "check": (dict(check_result=(1, "AssertionError: the test kernel computed a wrong sum\n")),
              ["the test kernel computed a wrong sum", "docs/windows.md", winsetup.RECORD_NAME], "测试内核失败"),
    "timeout": (dict(check_result=(124, "no answer after 120 s")), ["no answer after 120 s"], "测试内核失败"),
}


@pytest.mark.parametrize("case", FAILURES)
def test_each_failure_is_recorded_with_its_reason_and_a_concrete_fix_in_both_languages(tmp_path, case):
    setup, fix_words, zh_word = FAILURES[case]
    setup = dict(setup)
    vcredist = setup.pop("vcredist", True)
    project = tmp_path / "视频 项目" if setup.pop("chinese", False) else None
    m = FakeMachine(tmp_path, project=project, **setup)
    m.vcredist = vcredist
    outcome = m.run()
    reason = {"vcredist-dll": "vcredist", "timeout": "check"}.get(case, case)
    assert outcome.status == "failed" and outcome.reason == reason
    assert outcome.en.startswith("Compile off (the app runs uncompiled, slower): ")
    assert outcome.zh.startswith("编译已关闭(应用不编译运行,较慢):") and zh_word in outcome.zh
    for words in fix_words:
        assert words in outcome.en, (words, outcome.en)
    assert "\n" not in outcome.en and "\n" not in outcome.zh  # one line each
    record = m.record
    assert record["status"] == "failed" and record["reason"] == reason
    assert (record["en"], record["zh"]) == (outcome.en, outcome.zh)
    # Not retried at the next start: the same machine gives the same answer without pip or the kernel.
    pip_calls, check_calls = len(m.pip_calls), len(m.check_calls)
    assert m.run().reason == reason and (len(m.pip_calls), len(m.check_calls)) == (pip_calls, check_calls)


def test_the_checks_that_need_no_triton_run_before_pip(tmp_path):
    for i, setup in enumerate((dict(free_threaded=True), dict(torch="2.5.1+cu124"))):
        m = FakeMachine(tmp_path / str(i), **setup)
        m.run()
        assert m.pip_calls == [] and m.check_calls == []


def test_installing_the_vc_runtime_makes_the_next_start_check_again(tmp_path):
    m = FakeMachine(tmp_path)
    m.vcredist = False
    assert m.run().reason == "vcredist" and m.pip_calls == []
    m.vcredist = True
    assert m.run().status == "ok" and len(m.check_calls) == 1


def test_a_failed_download_is_tried_again_after_a_day_not_at_every_start(tmp_path):
    m = FakeMachine(tmp_path, pip_result=(1, "ERROR: connection timed out"))
    assert m.run().reason == "pip"
    m.now += 3600
    m.run()
    assert len(m.pip_calls) == 1
    m.now += winsetup.PIP_RETRY_S
    m.pip_result = (0, "")
    assert m.run().status == "ok" and len(m.pip_calls) == 2


def test_offline_installs_nothing_and_records_nothing(tmp_path):
    m = FakeMachine(tmp_path)
    outcome = m.run(offline=True)
    assert outcome.status == "skipped" and outcome.reason == "offline" and "without --offline" in outcome.en
    assert m.pip_calls == [] and m.check_calls == [] and m.record is None


def test_a_cpu_only_torch_is_left_to_the_gpu_report(tmp_path):
    for torch in ("2.9.1", "2.13.0+cpu", None):
        m = FakeMachine(tmp_path, torch=torch)
        assert m.run().status == "skipped" and m.pip_calls == [] and m.check_calls == [] and m.record is None


def test_a_chinese_temp_folder_moves_under_the_compile_cache_for_the_check(tmp_path):
    m = FakeMachine(tmp_path, installed="3.8.0.post29", temp="C:\\Users\\张三\\AppData\\Local\\Temp")
    m.run()
    env = m.check_calls[0][1]
    tmp = m.project / "models" / ".compile-cache" / "tmp"
    assert env["TMP"] == env["TEMP"] == str(tmp) and tmp.is_dir()


def test_a_long_cache_path_warns_with_the_long_paths_fix_unless_long_paths_are_on(tmp_path):
    deep = tmp_path / ("a-rather-long-folder-name-" * 4)
    m = FakeMachine(tmp_path, installed="3.8.0.post29", project=deep)
    m.long_paths = None  # the switch cannot be read, as when it was never set
    m.run()
    warnings = [text for level, text in m.notes if level == "WARN"]
    assert len(warnings) == 2 and "LongPathsEnabled" in warnings[0] and "长路径" in warnings[1]
    m.long_paths = True
    m.notes.clear()
    m.run()
    assert not [text for level, text in m.notes if level == "WARN"]
    short = winsetup.compile_cache_dir(Path("C:/i2v-app/models"))
    assert winsetup.long_path_warning(short, None) is None


# --- Paths -----------------------------------------------------------------------------------------

def test_temp_override_only_for_a_non_ascii_temp_and_an_ascii_cache():
    cache = Path("C:/i2v-app/models/.compile-cache")
    assert winsetup.temp_override(cache, "C:\\Users\\张三\\AppData\\Local\\Temp") == {
        "TMP": str(cache / "tmp"), "TEMP": str(cache / "tmp")}
    assert winsetup.temp_override(cache, "C:\\Users\\alice\\AppData\\Local\\Temp") == {}
    assert winsetup.temp_override(Path("C:/视频/models/.compile-cache"), "C:\\Users\\张三\\Temp") == {}


def test_the_first_non_ascii_path_is_named():
    assert winsetup.non_ascii([("project", "C:\\i2v"), ("python", "C:\\Users\\张三\\Python312")]) == (
        "python", "C:\\Users\\张三\\Python312")
    assert winsetup.non_ascii([("project", "C:\\My Projects\\i2v")]) is None  # spaces are fine


def test_the_vc_runtime_is_looked_for_in_system32():
    seen = []
    assert winsetup.vcredist_present("C:\\Windows", exists=lambda p: seen.append(p.name) or True)
    assert seen == list(winsetup.VCREDIST_DLLS)
    assert not winsetup.vcredist_present("C:\\Windows", exists=lambda p: p.name != "msvcp140.dll")


def test_the_virus_scan_hint_is_for_windows_only(tmp_path):
    models = tmp_path / "Image to Video" / "models"
    hint = winsetup.defender_hint(models, is_windows=True)
    assert f'Add-MpPreference -ExclusionPath "{models}"' in hint and "病毒扫描" in hint and "\n" not in hint
    assert winsetup.defender_hint(models, is_windows=False) is None


def test_the_app_gets_an_ascii_temp_folder_when_the_users_is_not(tmp_path):
    cache = tmp_path / "models" / ".compile-cache"
    env = start_app.child_env({"PATH": "x"}, cache, windows=True, temp_dir="C:\\Users\\张三\\Temp")
    assert env["TMP"] == env["TEMP"] == str(cache / "tmp") and (cache / "tmp").is_dir()
    assert env["PYTHONUTF8"] == "1"
    assert "TMP" not in start_app.child_env({"PATH": "x"}, cache, windows=True, temp_dir="C:\\Users\\bob\\Temp")
    assert start_app.child_env({"PATH": "x"}, cache, windows=False, temp_dir="C:\\Users\\张三\\Temp") == {"PATH": "x"}


# --- The launcher runs the step on Windows with an NVIDIA GPU --------------------------------------

def test_the_launcher_on_windows_installs_triton_prints_why_not_and_the_virus_scan_hint_once(tmp_path, monkeypatch,
                                                                                              capsys):
    root = make_project(tmp_path / "C 盘 项目")
    gpu = diagnose.GpuInfo("NVIDIA GeForce RTX 4090", "566.36", 24564, 22938, "WDDM")
    monkeypatch.setattr(start_app, "IS_WINDOWS", True)
    monkeypatch.setattr(diagnose, "nvidia_smi_query", lambda *a, **k: diagnose.SmiResult(True, [gpu], "12.7"))
    monkeypatch.setattr(start_app, "probe_torch", lambda python: {"installed": True, "version": CUDA_TORCH,
                                                                  "cuda": "12.8", "available": True})
    installs = iter([True, False])
    monkeypatch.setattr(start_app, "ensure_env", lambda *a, **k: next(installs))
    calls = []

    def fake_setup(**kw):
        calls.append(kw)
        en, zh = winsetup.messages("vcredist", {})
        return winsetup.Outcome("failed", "vcredist", en, zh)

    monkeypatch.setattr(winsetup, "setup_triton", fake_setup)
    environ = {"HF_HOME": str(tmp_path / "hf"), "PATH": os.environ.get("PATH", "")}
    for _ in range(2):
        rc = start_app.main(["--model", "tiny"], environ=environ, root=root, handover=Recorder(), run=Recorder())
        assert rc == 0
    out = capsys.readouterr().out
    assert len(calls) == 2 and calls[0]["driver"] == "566.36"
    assert calls[0]["prefix"] == start_app.find_env(root).prefix and calls[0]["project"] == root
    assert calls[0]["models_dir"] == root / "models" and calls[0]["offline"] is False
    assert out.count("[WARN] Compile off (the app runs uncompiled, slower): the Microsoft Visual C++ runtime") == 2
    assert out.count("[WARN] 编译已关闭") == 2
    assert out.count("Add-MpPreference -ExclusionPath") == 1  # the first start only


def test_the_launcher_skips_the_step_on_linux_with_skip_install_and_on_the_cpu(tmp_path, monkeypatch):
    root = make_project(tmp_path / "p")
    gpu = diagnose.GpuInfo("NVIDIA H100", "580.1", 81559, 81079)
    monkeypatch.setattr(diagnose, "nvidia_smi_query", lambda *a, **k: diagnose.SmiResult(True, [gpu], "13.0"))
    monkeypatch.setattr(start_app, "probe_torch", lambda python: {"installed": True, "version": CUDA_TORCH,
                                                                  "cuda": "12.8", "available": True})
    monkeypatch.setattr(start_app, "ensure_env", lambda *a, **k: False)
    monkeypatch.setattr(winsetup, "setup_triton", lambda **kw: pytest.fail("the Triton step ran"))
    environ = {"HF_HOME": str(tmp_path / "hf"), "PATH": os.environ.get("PATH", "")}
    assert start_app.main(["--model", "tiny"], environ=environ, root=root, handover=Recorder(), run=Recorder()) == 0
    monkeypatch.setattr(start_app, "IS_WINDOWS", True)
    for argv, env in ((["--model", "tiny"], base_env(tmp_path)), (["--model", "tiny", "--device", "cpu"], environ)):
        assert start_app.main(argv, environ=env, root=root, handover=Recorder(), run=Recorder()) == 0


# --- The app's decision, its status bar and diagnose ------------------------------------------------

def _failed_record(prefix: Path, torch_version: str) -> tuple[str, str]:
    en, zh = winsetup.messages("driver", {"driver": "531.79", "detail": "CUDA_ERROR_UNSUPPORTED_PTX_VERSION"})
    winsetup.write_record(prefix, {"status": "failed", "reason": "driver", "en": en, "zh": zh,
                                   "fingerprint": {"torch": torch_version}})
    return en, zh


def test_a_failed_check_for_this_torch_turns_compile_off_with_its_reason(tmp_path, monkeypatch, tiny_model_dir):
    import torch

    from app.engine.components import load_components
    from app.engine.sampler import I2VGenXLSampler
    from app.speedups import unet

    en, zh = _failed_record(tmp_path, torch.__version__)
    assert winsetup.recorded_blocker(tmp_path, torch.__version__) == (en, zh)
    assert winsetup.recorded_blocker(tmp_path, "2.1.0+cu121") is None  # made for another torch: not this one's

    sampler = I2VGenXLSampler(load_components(tiny_model_dir, dtype=torch.float32), "cpu", torch.float32)
    monkeypatch.setattr(sys, "prefix", str(tmp_path))
    monkeypatch.setattr(sampler, "device", torch.device("cuda"))  # nothing below touches the GPU
    assert not unet.has_triton()
    report = unet.apply_accel(sampler, "regional")
    assert report.compile == "off" and report.notes[0] == en and report.notice == [en, zh]
    assert sampler.denoise_fn == sampler._unet_forward


def test_an_ok_record_or_none_leaves_the_decision_to_the_import(tmp_path, monkeypatch):
    from app.speedups import unet

    monkeypatch.setattr(sys, "prefix", str(tmp_path))
    import importlib.util
    expected = importlib.util.find_spec("triton") is not None
    assert unet.has_triton() is expected
    winsetup.write_record(tmp_path, {"status": "ok", "fingerprint": {"torch": "x"}})
    assert unet.has_triton() is expected


def test_the_status_bar_shows_why_compile_is_off_in_the_pages_language(make_service, tiny_engine):
    from app.ui import render_status

    en, zh = winsetup.messages("vcredist", {})
    engine = replace(tiny_engine, speedups={"compile": "off", "notes": [en], "notice": [en, zh]})
    status = make_service(engine=engine).status()
    assert status["notice"].en == en
    assert winsetup.VCREDIST_URL in render_status(status, "en") and "运行库" in render_status(status, "zh")
    assert "notice" not in make_service().status()  # compile was never asked for: nothing to say


def test_diagnose_reports_the_triton_check_on_windows_only(tmp_path):
    en, zh = _failed_record(tmp_path, CUDA_TORCH)
    record = winsetup.read_record(tmp_path)
    facts = diagnose.Facts(os_name="Windows 11", is_windows=True, wsl=None, python_version="3.12.8",
                           python_exe="python", torch=None, smi=diagnose.SmiResult(found=False), triton=record)
    finding = next(f for f in diagnose.assess(facts) if f.key == "triton")
    assert (finding.level, finding.en, finding.zh) == ("warning", en, zh)
    text = diagnose.render(facts, diagnose.assess(facts))
    assert "Compile / 编译:  off · driver (see below)" in text and en in text
    ok = {"status": "ok", "triton": "3.8.0.post29"}
    assert "Compile / 编译:  on · triton-windows 3.8.0.post29" in diagnose.render(replace(facts, triton=ok), [])
    assert "Compile / 编译:  not checked yet" in diagnose.render(replace(facts, triton=None), [])
    linux = replace(facts, is_windows=False)
    assert not [f for f in diagnose.assess(linux) if f.key == "triton"] and "Compile" not in diagnose.render(linux, [])


# --- The test kernel itself ------------------------------------------------------------------------

def test_the_check_kernel_adds_correctly_in_tritons_interpreter(tmp_path):
    if not (TRITON_DIR / "triton").is_dir():
        pytest.skip(f"triton for the interpreter is not installed in {TRITON_DIR} (scripts/test.sh installs it)")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(TRITON_DIR),
           **winsetup.triton_env(tmp_path / ".compile-cache")}
    rc, output = winsetup.run_captured([sys.executable, "-c", winsetup.CHECK_SCRIPT, "cpu"], env=env, timeout=300)
    assert rc == 0 and winsetup.CHECK_OK in output, output[-2000:]


def test_a_failing_check_is_reported_by_its_error_line(tmp_path):
    # This environment has no triton importable: the real runner, the real script, the failure it gives.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    rc, output = winsetup.run_captured([sys.executable, "-c", winsetup.CHECK_SCRIPT, "cpu"], env=env, timeout=300)
    assert rc != 0 and winsetup.CHECK_OK not in output
    assert winsetup._last_error_line(output) == "ModuleNotFoundError: No module named 'triton'"
    assert winsetup.classify_check_failure(output, None) == "check"
    assert winsetup.classify_check_failure(output, ("project", "C:\\视频")) == "non-ascii"


def test_the_probe_reads_the_environment_from_package_metadata():
    facts = winsetup.probe_env(Path(sys.executable))
    assert facts["torch"] == md.version("torch") and facts["python"] == sys.version.split()[0]
    assert facts["free_threaded"] is False and facts["base_prefix"] == sys.base_prefix
    assert winsetup.probe_env(Path("/no/such/python")) == {}


# --- Reading the weights ---------------------------------------------------------------------------

def test_weights_read_ahead_or_not_are_identical_and_each_file_is_read_once(tiny_model_dir, monkeypatch):
    import torch

    import app.engine.components as components

    assert components.read_ahead_default("win32") and not components.read_ahead_default("linux")
    passes = []
    real = components.read_ahead
    monkeypatch.setattr(components, "read_ahead", lambda files: passes.append(files) or real(files))
    mapped = components.load_components(tiny_model_dir, dtype=torch.float32, read_ahead_files=False)
    assert passes == []
    ahead = components.load_components(tiny_model_dir, dtype=torch.float32, read_ahead_files=True)
    weight_files = sorted(p for name in ("unet", "vae", "text_encoder", "image_encoder")
                          for p in (tiny_model_dir / name).glob("*.safetensors"))
    assert sorted(f for files in passes for f in files) == weight_files
    for name, module in mapped.modules.items():
        a, b = module.state_dict(), ahead.modules[name].state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a), name


def test_read_ahead_picks_the_files_of_the_variant_and_reads_every_byte(tmp_path):
    from app.engine.components import read_ahead, weight_files

    names = ["diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
             "model.fp16-00001-of-00002.safetensors", "model.fp16-00002-of-00002.safetensors",
             "model-00001-of-00002.safetensors", "config.json"]
    for i, name in enumerate(names):
        (tmp_path / name).write_bytes(bytes([i]) * (1000 + i))
    fp16 = weight_files(tmp_path, "fp16")
    assert [f.name for f in fp16] == ["diffusion_pytorch_model.fp16.safetensors",
                                      "model.fp16-00001-of-00002.safetensors", "model.fp16-00002-of-00002.safetensors"]
    assert [f.name for f in weight_files(tmp_path, None)] == ["diffusion_pytorch_model.safetensors",
                                                               "model-00001-of-00002.safetensors"]
    assert read_ahead(fp16, block=256) == 1001 + 1002 + 1003
    assert read_ahead([tmp_path / "missing.safetensors"]) == 0  # left to the loader, which names the file
