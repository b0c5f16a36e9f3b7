#!/bin/bash
# Session 10, call 1: temporal-conv forms (conv_study), one UNet call with and without the shared CFG prefix and
# with each spatial attention backend (same machine), then 512p end to end with the new default.
T0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>&1 | tail -2
export PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
B=/tmp/bench
timeout 60 python3 scripts/conv_study.py --out $OUT/conv_study.json > $OUT/conv-log.txt 2>&1; echo "conv rc $?"
tail -12 $OUT/conv-log.txt
V=layers+conv2d+graphs+ttri
timeout 420 python3 scripts/benchmark.py --out $B/u --parts unetcall512,compile512 \
  --variants $V,$V+share,layers+conv2d+ttri+share+prof,$V+share+sdpaflash \
  > $OUT/unetcall-log.txt 2>&1; echo "bench rc $?"
grep -E "^unetcall|^== compile512" $OUT/unetcall-log.txt | cut -c1-400
cp $B/u/*.json $OUT/ 2>/dev/null
echo "== END $(date +%T), $(( $(date +%s) - T0 )) s"
