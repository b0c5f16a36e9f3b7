#!/bin/bash
# Session 9, call 3: a machine of 8 cores (taskset): first start with auto's 4 helpers vs none; then the app's own
# start-up (appstart, default config) on all 16 cores with the 28-call plan.
T0=$(date +%s)
left() { echo $((570 - ($(date +%s) - T0))); }
python3 -m pip install -q --no-index --no-deps --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>&1 | tail -2
export PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
B=/tmp/bench
echo "== APP $(date +%T), $(left) s left"
timeout 200 python3 scripts/benchmark.py --out $B/app --model-dir $B/model --parts appstart > $OUT/app-log.txt 2>&1
echo "rc $?"; cp $B/app/*.json $OUT/ 2>/dev/null
echo "== CS8 $(date +%T), $(left) s left"
timeout $(( $(left) - 5 )) taskset -c 0-7 python3 scripts/benchmark.py --out $B/cs8 --model-dir $B/model \
  --parts coldstart --coldstart-helpers 4,0 > $OUT/cs8-log.txt 2>&1; echo "rc $?"
cp $B/cs8/*.json $OUT/ 2>/dev/null
echo "== END $(date +%T), $(left) s left"
