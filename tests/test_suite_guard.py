"""The guard in tests/conftest.py: with I2V_REQUIRE_ALL_TESTS=1 a skipped test fails the run (CI must
not pass with the browser, Wine, ffprobe or Triton checks left out); without it a skip stays a skip.

Each case runs a small pytest session of its own (pytester) with this suite's conftest.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

CONFTEST = (Path(__file__).resolve().parent / "conftest.py").read_text(encoding="utf-8")

TESTS = """
import shutil
import pytest

def test_runs():
    pass

@pytest.mark.skipif(True, reason="needs a tool that is not here")
def test_marked_skip():
    pass

def test_skips_inside():
    pytest.skip("chromium is not installed")

@pytest.fixture
def tool():
    pytest.skip("wine is not installed")

def test_fixture_skips(tool):
    pass

@pytest.mark.xfail(reason="known", strict=True)
def test_expected_failure():
    assert False
"""


@pytest.fixture
def guarded(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    pytester.makeconftest(CONFTEST)
    # The inner sessions start clean: no guard unless a test sets it, and not taken for an xdist worker.
    for name in ("I2V_REQUIRE_ALL_TESTS", "PYTEST_ADDOPTS", "PYTEST_XDIST_WORKER", "PYTEST_XDIST_WORKER_COUNT",
                 "PYTEST_XDIST_TESTRUNUID"):
        monkeypatch.delenv(name, raising=False)
    return pytester


def _run(pytester: pytest.Pytester) -> pytest.RunResult:
    return pytester.runpytest_inprocess("-p", "no:cacheprovider", "-p", "no:xdist", "-ra")


def test_without_the_variable_skips_stay_skips(guarded):
    guarded.makepyfile(test_tools=TESTS)
    result = _run(guarded)
    result.assert_outcomes(passed=1, skipped=3, xfailed=1)
    assert result.ret == 0
    result.stdout.fnmatch_lines(["*SKIPPED*chromium is not installed*"])


@pytest.mark.parametrize("value", ["1", "yes"])
def test_with_the_variable_every_skip_fails(guarded, monkeypatch, value):
    monkeypatch.setenv("I2V_REQUIRE_ALL_TESTS", value)
    guarded.makepyfile(test_tools=TESTS)
    result = _run(guarded)
    # A skipif mark and a fixture's skip act in setup, so pytest counts them as errors; an xfail is no skip.
    result.assert_outcomes(passed=1, failed=1, errors=2, xfailed=1)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines([
        "*ERROR at setup of test_marked_skip*",
        "skipped, but I2V_REQUIRE_ALL_TESTS=1 requires every test to run: needs a tool that is not here",
        "*ERROR at setup of test_fixture_skips*",
        "skipped, but I2V_REQUIRE_ALL_TESTS=1 requires every test to run: wine is not installed",
        "*test_skips_inside*",
        "skipped, but I2V_REQUIRE_ALL_TESTS=1 requires every test to run: chromium is not installed",
    ])


def test_the_variable_set_to_0_is_off(guarded, monkeypatch):
    monkeypatch.setenv("I2V_REQUIRE_ALL_TESTS", "0")
    guarded.makepyfile(test_tools=TESTS)
    assert _run(guarded).ret == 0


def test_a_module_skipped_at_import_fails_the_run(guarded, monkeypatch):
    guarded.makepyfile(
        test_ok="def test_ok():\n    pass\n",
        test_browser="import pytest\n"
                     "pytest.importorskip('no_such_module_for_the_guard')\n"
                     "def test_never_collected():\n    pass\n",
    )
    assert _run(guarded).ret == 0
    monkeypatch.setenv("I2V_REQUIRE_ALL_TESTS", "1")
    result = _run(guarded)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["*skipped collections*", "*test_browser.py*no_such_module_for_the_guard*"])


def test_the_guard_works_under_xdist(guarded, monkeypatch):
    """CI runs the suite with pytest-xdist: workers' skips and skipped modules must reach the verdict."""
    pytest.importorskip("xdist")
    monkeypatch.setenv("I2V_REQUIRE_ALL_TESTS", "1")
    guarded.makepyfile(
        test_tools=TESTS,
        test_browser="import pytest\npytest.importorskip('no_such_module_for_the_guard')\n",
    )
    result = guarded.runpytest_subprocess("-p", "no:cacheprovider", "-n", "2", "-ra")
    result.assert_outcomes(passed=1, failed=1, errors=2, skipped=1, xfailed=1)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["*skipped collections*", "*no_such_module_for_the_guard*"])


def test_a_one_worker_file_runs_on_one_worker(guarded):
    """tests/conftest.py's scheduler: the tests of a file in ONE_WORKER_FILES (they share a server, a browser or
    a Wine prefix) all run on one worker, while other tests are spread."""
    pytest.importorskip("xdist")
    note = "import os, pathlib\n" \
           "def _note(name):\n" \
           "    pathlib.Path('seen', name).write_text(os.environ['PYTEST_XDIST_WORKER'])\n"
    guarded.mkdir("seen")
    guarded.makepyfile(
        test_ui_api=note + "".join(f"def test_api_{i}():\n    _note('api-{i}')\n" for i in range(6)),
        test_other=note + "import time\n" + "".join(
            f"def test_other_{i}():\n    time.sleep(0.1)\n    _note('other-{i}')\n" for i in range(6)),
    )
    result = guarded.runpytest_subprocess("-p", "no:cacheprovider", "-n", "2")
    result.assert_outcomes(passed=12)
    seen = {path.name: path.read_text() for path in (guarded.path / "seen").iterdir()}
    assert len(seen) == 12
    assert len({seen[f"api-{i}"] for i in range(6)}) == 1, seen
