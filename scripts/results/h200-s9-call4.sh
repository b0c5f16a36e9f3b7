#!/bin/bash
# Session 9, call 4: one UNet call with the Conv2d weights channels-last (+cl) vs the default, same machine, with profiles.
T0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>&1 | tail -2
export PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
B=/tmp/bench
timeout 400 python3 scripts/benchmark.py --out $B/u --parts unetcall512 \
  --variants layers+conv2d+graphs+ttri,layers+conv2d+graphs+ttri+cl,layers+conv2d+ttri+cl+prof \
  > $OUT/unetcall-log.txt 2>&1; echo "rc $?"
cp $B/u/*.json $OUT/ 2>/dev/null
echo "== END $(date +%T), $(( $(date +%s) - T0 )) s"
