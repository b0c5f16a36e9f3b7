#!/bin/bash
# Session 12, call 2: the app's own start (load_engine with configs/config.yaml, first start and restart) with the
# new default; then one UNet call with the default vs the same with Inductor's Triton matmul templates
# autotuned against cuBLAS (+mat, a study); then low-VRAM mode and the fast preset, as time allows.
T0=$(date +%s)
left() { echo $((570 - ($(date +%s) - T0))); }
python3 -m pip install -q --no-index --no-deps --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>&1 | tail -2
export PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
echo "cores $(nproc)"
B=/tmp/bench
V=layers+conv2d+graphs+ttri+share
echo "== APPSTART $(date +%T), $(left) s left"
timeout 200 python3 scripts/benchmark.py --out $B/a --model-dir $B/model --parts appstart > $OUT/appstart-log.txt 2>&1
echo "rc $?"; grep -E "^-- part|^saved" $OUT/appstart-log.txt | cut -c1-300
cp $B/a/appstart.json $OUT/ 2>/dev/null
echo "== MAT $(date +%T), $(left) s left"
timeout $(( $(left) - 70 )) python3 scripts/benchmark.py --out $B/u --model-dir $B/model --parts unetcall512 \
  --variants $V,$V+mat > $OUT/mat-log.txt 2>&1; echo "rc $?"
grep -E "^unetcall|^-- part" $OUT/mat-log.txt | cut -c1-400
cp $B/u/unetcall512.json $OUT/ 2>/dev/null
echo "== LOWVRAM $(date +%T), $(left) s left"
timeout $(( $(left) - 5 )) python3 scripts/benchmark.py --out $B/lv --model-dir $B/model --parts lowvram --runs 3 \
  > $OUT/lowvram-log.txt 2>&1; echo "rc $?"
grep -E "^== lowvram|^-- part" $OUT/lowvram-log.txt | cut -c1-400
cp $B/lv/lowvram.json $OUT/ 2>/dev/null
echo "== END $(date +%T), $(left) s left"
