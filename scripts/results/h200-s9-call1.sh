#!/bin/bash
# Session 9, call 1: first start with 8 compile helpers, the warm-up following them region by region (8) vs
# waiting for all first (8all), same machine; then the app's own start-up (appstart, default config).
T0=$(date +%s)
left() { echo $((570 - ($(date +%s) - T0))); }
python3 -m pip install -q --no-index --no-deps --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>&1 | tail -2
export PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; nproc; free -g | head -2
B=/tmp/bench
echo "== CS $(date +%T), $(left) s left"
timeout $(( $(left) - 150 )) python3 scripts/benchmark.py --out $B/cs --model-dir $B/model --parts coldstart \
  --coldstart-helpers 8,8all > $OUT/cs-log.txt 2>&1; echo "rc $?"
cp $B/cs/*.json $OUT/ 2>/dev/null
echo "== APP $(date +%T), $(left) s left"
timeout $(( $(left) - 5 )) python3 scripts/benchmark.py --out $B/app --model-dir $B/model --parts appstart \
  > $OUT/app-log.txt 2>&1; echo "rc $?"
cp $B/app/*.json $OUT/ 2>/dev/null
ls $B/app/app-models/.compile-cache 2>/dev/null | head; echo "== END $(date +%T), $(left) s left"
