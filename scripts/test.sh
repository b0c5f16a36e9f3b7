#!/usr/bin/env bash
# Run the test suite on a CPU: makes .venv on first use, installs the project with its test extra, runs pytest.
# Extra arguments go to pytest (e.g. ./scripts/test.sh -k engine). Browser and Wine tests skip with a reason
# when chromium or wine is not installed; .ci/run installs both.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
  # The CPU build of torch: small, and all the tests need (the GPU is for benchmarks, not tests).
  .venv/bin/python -m pip install --upgrade pip
  .venv/bin/python -m pip install "torch==2.13.0" || .venv/bin/python -m pip install torch --index-url https://download.pytorch.org/whl/cpu
fi
.venv/bin/python -m pip install -e ".[test]"
# Triton for running the GPU attention kernel in Triton's interpreter (tests/test_triton_attention.py),
# kept out of the test environment itself: importable there, it would make Inductor compile in other tests.
if [ ! -d .venv/triton-interpret/triton ]; then
  .venv/bin/python -m pip install --no-deps --target .venv/triton-interpret "triton>=3.2,<4" \
    || echo "[WARN] triton could not be installed here; tests/test_triton_attention.py will be skipped" >&2
fi
set +e
.venv/bin/python -m pytest "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "[ERROR] pytest collected no tests: the suite is missing or a filter matched nothing." >&2
  exit 1
fi
exit "$rc"
