#!/usr/bin/env bash
# Run the test suite on a CPU: makes .venv on first use, installs the project with its test extra, runs pytest
# on a few worker processes (pytest-xdist). Extra arguments go to pytest after ours, so they win
# (e.g. ./scripts/test.sh -k engine, or -n 0 for one process). I2V_TEST_WORKERS sets the number of workers.
# Browser, Wine, ffprobe and Triton-interpreter tests skip with a reason when their tool is missing;
# .ci/run installs them all and sets I2V_REQUIRE_ALL_TESTS=1, which makes any skip a failure.
# Works with the .venv that ./start_app.sh makes too (PyPI's CUDA torch, Triton importable).
set -euo pipefail
cd "$(dirname "$0")/.."
py=.venv/bin/python
if [ ! -x "$py" ]; then
  python3 -m venv .venv
  # The CPU build of torch: small, and all the tests need (the GPU is for benchmarks, not tests).
  "$py" -m pip install --upgrade pip
  "$py" -m pip install "torch==2.13.0" || "$py" -m pip install torch --index-url https://download.pytorch.org/whl/cpu
fi

# pip install only when pyproject.toml changed since the last successful install into this .venv (even with
# nothing to do, pip takes a while to find that out). The marker is written after pip succeeded.
marker=.venv/i2v-test-install.sha256
stamp="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ "$(cat "$marker" 2>/dev/null)" != "$stamp" ]; then
  "$py" -m pip install -e ".[test]"
  echo "$stamp" > "$marker"
fi

# Triton for running the GPU attention kernel in Triton's interpreter (tests/test_speedups_triton_attention.py),
# kept out of the test environment itself: importable there, it would make Inductor compile in other tests.
# The version is the one this torch asks for, if it names one (PyPI's CUDA torch requires the Triton it was
# built with, which is then importable in .venv too), else the newest 3.x.
triton_dir=.venv/triton-interpret
triton_req="$("$py" - <<'EOF'
import importlib.metadata as md
import re
for req in md.requires("torch") or []:
    req = req.split(";")[0].strip()  # e.g. 'triton~=3.8.0; platform_system == "Linux"'
    name = re.match(r"[A-Za-z0-9._-]*", req).group()
    if name.lower() == "triton":
        print("triton" + req[len(name):].strip(" ()").replace(" ", ""))
        break
else:
    print("triton>=3.2,<4")
EOF
)"
if [ "$(cat "$triton_dir/.requirement" 2>/dev/null)" != "$triton_req" ]; then
  rm -rf "$triton_dir"
  if "$py" -m pip install --no-deps --target "$triton_dir" "$triton_req"; then
    echo "$triton_req" > "$triton_dir/.requirement"
  else
    echo "[WARN] $triton_req could not be installed in $triton_dir;" \
         "tests/test_speedups_triton_attention.py will be skipped" >&2
  fi
fi

# Workers: the suite waits much of its time on subprocesses, servers and the browser, so one more worker
# than cores keeps both cores busy. tests/conftest.py schedules them: the files that share a costly fixture
# (a server, the browser, the Wine prefix) each on one worker, the long tests first. Each worker's torch gets
# one thread, so workers do not fight over cores.
workers="${I2V_TEST_WORKERS:-$(( $(nproc) + 1 ))}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
set +e
"$py" -m pytest -n "$workers" "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "[ERROR] pytest collected no tests: the suite is missing or a filter matched nothing." >&2
  exit 1
fi
exit "$rc"
