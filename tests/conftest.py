"""Shared fixtures (a throwaway project root, the tiny model built once per run and loaded once per
process) and the guard that makes a skipped test a failure where every test must run.

With I2V_REQUIRE_ALL_TESTS=1 (set by .ci/run) a skip is not an answer: a test that skips because
chromium, Wine, ffprobe or the interpreter's Triton is missing fails instead, so CI cannot pass
green with those checks silently left out. Without it, such tests skip with the reason (-ra lists them).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest

# pytester runs small pytest sessions inside tests (tests/test_suite_guard.py checks the guard below).
pytest_plugins = ("pytester",)

REPO = Path(__file__).resolve().parent.parent
REQUIRE_ALL_TESTS = "I2V_REQUIRE_ALL_TESTS"

# No test may reach the network: the hub is offline, telemetry and analytics are off.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
# Gradio keeps uploads by content in one temp folder, and a server that closes deletes its own: each test
# process gets a folder of its own, so one worker's server never removes another's upload.
os.environ.setdefault("GRADIO_TEMP_DIR", str(Path(tempfile.gettempdir()) / f"i2v-tests-gradio-{os.getpid()}"))
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
warnings.filterwarnings("ignore", category=FutureWarning)


def make_root(base: Path) -> Path:
    """A project root with the shipped configs and empty outputs/, logs/ and models/."""
    base.mkdir(parents=True, exist_ok=True)
    shutil.copytree(REPO / "configs", base / "configs", dirs_exist_ok=True)
    for name in ("outputs", "logs", "models"):
        (base / name).mkdir(exist_ok=True)
    return base


@pytest.fixture
def project_root(tmp_path: Path) -> Path:
    return make_root(tmp_path / "project")


@pytest.fixture
def settings(project_root: Path):
    from app.config import load_settings

    return load_settings(root=project_root, environ={})


@pytest.fixture(scope="session")
def shared_models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models folder for the whole run, shared by pytest-xdist's workers (each has its own basetemp
    under one run folder). The tiny model is built in it once: ensure_tiny_model is atomic, so workers
    that start together each build a copy, the first rename wins and the others are dropped."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent
    folder = base / "shared-models"
    folder.mkdir(exist_ok=True)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(shared_models_dir: Path) -> Path:
    """The tiny model's folder (read-only for tests: copy it to change it)."""
    from app.engine.tiny import ensure_tiny_model

    return ensure_tiny_model(shared_models_dir)


@pytest.fixture(scope="session")
def tiny_engine(tiny_model_dir: Path):
    """The tiny model loaded through the real loader on the CPU (shared: tests must not mutate it)."""
    import torch

    from app.engine.components import load_components
    from app.engine.loader import LoadedEngine
    from app.engine.sampler import I2VGenXLSampler

    components = load_components(tiny_model_dir, dtype=torch.float32, model_id="tiny")
    sampler = I2VGenXLSampler(components, "cpu", torch.float32)
    sampler.place()
    return LoadedEngine(sampler=sampler, model_id="tiny", revision=None, demo=True,
                        device=torch.device("cpu"), dtype_name="float32", offload=False)


@pytest.fixture
def make_service(settings, tiny_engine):
    """Build a loaded GenerationService around the shared tiny engine (or a given one)."""
    from app.service import GenerationService

    def build(engine=None, **kw):
        svc = GenerationService(kw.pop("settings", settings), lambda: engine or tiny_engine)
        svc.load()
        return svc

    return build


@pytest.fixture
def hold_decode(monkeypatch):
    """`hold_decode(sampler)` makes the sampler wait half a second before it decodes. Gradio sends only the
    latest progress update every 10 ms, and the tiny model decodes at once: without the wait, the last
    step's "Step n/n" can be overwritten by the decode's message before it is sent."""
    import time

    def hold(sampler, seconds: float = 0.5) -> None:
        decode = sampler.decode
        monkeypatch.setattr(sampler, "decode", lambda *a, **kw: (time.sleep(seconds), decode(*a, **kw))[1])

    return hold


@pytest.fixture
def image_rgb() -> np.ndarray:
    """A 100x120 image with structure (a gradient plus a square), never zeros."""
    y, x = np.mgrid[0:100, 0:120]
    img = np.stack([x * 2, y * 2, (x + y) % 256], axis=-1).astype(np.uint8)
    img[30:60, 40:80] = (250, 30, 30)
    return img


# Parallel runs (pytest-xdist) ------------------------------------------------------------------

# Test files whose tests share a costly module- or session-scoped fixture: each runs on one worker as a whole
# (one server and browser per file instead of one per worker, a single Wine prefix). Every other test goes
# to whichever worker is free. xdist's own --dist loadgroup cannot do this on pytest 9.2 (it marks a group
# by rewriting node ids, which pytest no longer reads back), so the scheduler below groups by file name.
ONE_WORKER_FILES = ("test_ui_api.py", "test_ui_browser.py", "test_start_app_bat.py", "test_torture_inputs.py",
                    "test_security.py", "test_api_clients.py", "test_load.py", "test_ui_queue.py", "test_celery.py",
                    "test_cfg_parallel.py")

# The longest tests (Inductor compiles in child processes, diffusers' reference pipeline), longest first.
# They are handed out first, so that none of them starts late and keeps one worker busy after the others
# are done; each is followed by other work, because a worker holds the test it runs and the next one: a long
# test's next is short, and the other long tests stay free for the next idle worker. The other work starts
# with the one-worker files (mostly waiting on servers, the browser and Wine, which overlaps well with
# compiling). Only the order depends on this list: a renamed test still runs, later.
LONG_TESTS = (
    "test_speedups_precompile.py::test_a_helpers_compile_is_a_cache_hit_for_the_app",
    "test_benchmark.py::test_benchmark_tiny_coldstart_with_a_compile_helper",
    "test_speedups_precompile.py::test_a_helpers_graphs_are_stored_and_the_app_runs_them_without_dynamo",
    "test_benchmark.py::test_benchmark_tiny_appstart_restarts",
    "test_speedups_graphstore.py::test_real_inductor_graphs_saved_in_one_process",
    "test_engine.py::test_frames_match_diffusers_reference_pipeline",
    "test_speedups_precompile.py::test_the_warm_up_meets_every_region_call",
    "test_benchmark.py::test_benchmark_tiny_unet_call_with_the_shared_cfg_prefix",
    "test_speedups_precompile.py::test_the_full_size_plan_has_one_call_per_dynamo_graph",
    "test_speedups_graphstore.py::test_a_graph_file_that_does_not_load_is_compiled_again",
    "test_speedups_unet.py::test_a_new_resolution_compiles_again",
    "test_cli.py::test_generate_tiny_writes_mp4",
    "test_speedups_graphstore.py::test_a_second_start_runs_every_region_from_the_store",
    "test_benchmark.py::test_benchmark_tiny_runs_every_cpu_part",
    "test_engine.py::test_same_seed_same_frames_other_seed_other_frames",
    "test_faults.py::test_sigkill_while_denoising_leaves_no_file_and_the_next_start_is_clean",
    "test_jobqueue.py::test_an_app_killed_mid_job_makes_every_queued_job_exactly_once_after_a_restart",
)


def _long_rank(item) -> int:
    name = f"{item.path.name}::{item.name}"
    return next((i for i, prefix in enumerate(LONG_TESTS) if name.startswith(prefix)), len(LONG_TESTS))


def pytest_collection_modifyitems(config, items):
    """Under xdist (the scheduler below hands out tests in this order): the long tests first, longest first,
    each followed by one unit of other work (a one-worker file as a whole, or one test)."""
    if not hasattr(config, "workerinput"):  # one process runs the files in their order
        return
    long = sorted((item for item in items if _long_rank(item) < len(LONG_TESTS)), key=_long_rank)
    groups: dict[str, list] = {}
    for item in items:
        if item.path.name in ONE_WORKER_FILES:
            groups.setdefault(item.path.name, []).append(item)
    others = [*groups.values(), *([item] for item in items
                                  if _long_rank(item) == len(LONG_TESTS) and item.path.name not in groups)]
    order = []
    for i in range(max(len(long), len(others))):
        order += long[i:i + 1] + (others[i] if i < len(others) else [])
    assert len(order) == len(items)
    items[:] = order


def _file_name(nodeid: str) -> str:
    return nodeid.split("::", 1)[0].rsplit("/", 1)[-1]


@pytest.hookimpl(optionalhook=True)  # a hook of xdist's: unknown to a run with -p no:xdist
def pytest_xdist_make_scheduler(config, log):
    """For xdist's default --dist load: units of one test, or of one whole file for ONE_WORKER_FILES, handed
    out in collection order, one test ahead per worker (so a long test does not sit queued behind another
    while a worker is free). Any other --dist mode is xdist's own."""
    if config.getvalue("dist") != "load":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class FileGroupScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return nodeid.split("::", 1)[0] if _file_name(nodeid) in ONE_WORKER_FILES else nodeid

        def _reschedule(self, node) -> None:
            if node.shutting_down:
                return
            if not self.workqueue:
                node.shutdown()
                return
            # A worker runs a test once it holds the next one (its teardown needs to know it): keep the test
            # running and one more, no queue beyond that.
            if self._pending_of(self.assigned_work[node]) > 1:
                return
            self._assign_work_unit(node)

    config.option.loadscopereorder = False  # keep the order of pytest_collection_modifyitems
    return FileGroupScheduling(config, log)


# The guard -------------------------------------------------------------------------------------

def require_all_tests() -> bool:
    return os.environ.get(REQUIRE_ALL_TESTS, "").strip() not in ("", "0")


def _skip_reason(longrepr) -> str:
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """A test (or its fixture) that skips fails instead while I2V_REQUIRE_ALL_TESTS is set."""
    report = yield
    if report.skipped and not hasattr(report, "wasxfail") and require_all_tests():
        report.outcome = "failed"
        report.longrepr = (f"skipped, but {REQUIRE_ALL_TESTS}=1 requires every test to run: "
                           f"{_skip_reason(report.longrepr)}")
    return report


_skipped_collections: list[str] = []


def pytest_collectreport(report):
    """A whole module skipped at import (importorskip, allow_module_level) has no test report to turn
    into a failure; it is remembered here (under xdist, on the controller, which receives the workers'
    skipped collections) and fails the session in pytest_sessionfinish."""
    if report.skipped and require_all_tests():
        _skipped_collections.append(f"{report.nodeid}: {_skip_reason(report.longrepr)}")


def pytest_sessionfinish(session, exitstatus):
    if _skipped_collections and exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter):
    if _skipped_collections:
        terminalreporter.section(f"skipped collections ({REQUIRE_ALL_TESTS}=1 fails the run)", red=True)
        for line in dict.fromkeys(_skipped_collections):
            terminalreporter.line(line)
