#!/bin/bash
# Session 9, call 2: first start with the 28-call plan (follow, 8 helpers); then, on the warm cache, the default
# at 512p, the induced OOM, low-VRAM mode, and the fast preset (25 steps), all with the Triton temporal attention.
T0=$(date +%s)
left() { echo $((570 - ($(date +%s) - T0))); }
python3 -m pip install -q --no-index --no-deps --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>&1 | tail -2
export PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
B=/tmp/bench
echo "== MAIN $(date +%T), $(left) s left"
timeout $(( $(left) - 80 )) python3 scripts/benchmark.py --out $B/b --model-dir $B/model \
  --parts coldstart,compile512,oom --coldstart-helpers 8 --runs 3 > $OUT/main-log.txt 2>&1; echo "rc $?"
cp $B/b/*.json $OUT/ 2>/dev/null
echo "== LOWVRAM $(date +%T), $(left) s left"
timeout $(( $(left) - 60 )) python3 scripts/benchmark.py --out $B/lv --model-dir $B/model --parts lowvram --runs 3 \
  > $OUT/lowvram-log.txt 2>&1; echo "rc $?"
cp $B/lv/*.json $OUT/ 2>/dev/null
echo "== FAST $(date +%T), $(left) s left"
timeout $(( $(left) - 5 )) python3 scripts/benchmark.py --out $B/b --model-dir $B/model --parts compile512 \
  --steps 25 --runs 3 > $OUT/fast-log.txt 2>&1; echo "rc $?"
mkdir -p $OUT/fast; cp $B/b/compile512.json $OUT/fast/ 2>/dev/null
echo "== END $(date +%T), $(left) s left"
