#!/bin/bash
# Session 12, call 1: the new default (shared CFG prefix, 30-graph helpers' plan): first start and restart with
# 8 helpers; then, on the cache they left, 512p x 16 end to end, 20 generations in a row (failures,
# allocated-memory drift) and 768p x 24. One benchmark process; each part's JSON is written as it finishes.
T0=$(date +%s)
left() { echo $((570 - ($(date +%s) - T0))); }
python3 -m pip install -q --no-index --no-deps --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>&1 | tail -2
export PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
echo "cores $(nproc)"
B=/tmp/bench
echo "== MAIN $(date +%T), $(left) s left"
timeout $(( $(left) - 10 )) python3 scripts/benchmark.py --out $B/b --model-dir $B/model \
  --parts coldstart,compile512,stability,compile768 --coldstart-helpers 8 --runs 3 > $OUT/main-log.txt 2>&1; echo "rc $?"
grep -E "^-- part|^saved" $OUT/main-log.txt | cut -c1-300
grep -E "^== stab|^== compile768" $OUT/main-log.txt | cut -c1-700
cp $B/b/*.json $OUT/ 2>/dev/null
echo "== END $(date +%T), $(left) s left"
