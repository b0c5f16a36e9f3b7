#!/bin/bash
# Session 10, call 2: temporal convolutions as one matmul (+tmm) vs as 2-D convolutions (+conv2d), one UNet call on
# the same machine (shared CFG prefix on in both), a profile, then 512p and 768p end to end with +tmm, and 512p
# end to end without it (the shared prefix alone).
T0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>&1 | tail -2
export PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
B=/tmp/bench
M=layers+tmm+graphs+ttri+share
timeout 400 python3 scripts/benchmark.py --out $B/u --parts unetcall512,compile512,compile768 --accel $M \
  --variants layers+conv2d+graphs+ttri+share,$M,layers+tmm+ttri+share+prof \
  > $OUT/bench-log.txt 2>&1; echo "bench rc $?"
grep -E "^unetcall|^== compile" $OUT/bench-log.txt | cut -c1-420
cp $B/u/unetcall512.json $B/u/compile512.json $B/u/compile768.json $OUT/ 2>/dev/null
mkdir -p $B/e && cp -r $B/u/compile-cache $B/e/
timeout $(( 560 - ($(date +%s) - T0) )) python3 scripts/benchmark.py --out $B/e --parts compile512 \
  --accel layers+conv2d+graphs+ttri+share > $OUT/bench-share-log.txt 2>&1; echo "bench2 rc $?"
grep -E "^== compile" $OUT/bench-share-log.txt | cut -c1-420
cp $B/e/compile512.json $OUT/compile512-share.json 2>/dev/null
echo "== END $(date +%T), $(( $(date +%s) - T0 )) s"
