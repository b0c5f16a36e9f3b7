#!/bin/bash
# Session 14, call 2: (1) appstart, default config (graph store on), a first start and two restarts, each start's
# 3-step 512p frames compared with the first start's and with the start before; (2) one UNet call (512p) with the
# regions from the graph store vs the same regions through Dynamo and the compile cache: ms per call, error vs
# eager fp16 and fp32.
T0=$(date +%s)
left() { echo $((575 - ($(date +%s) - T0))); }
python3 -m pip install -q --no-index --no-deps --no-cache-dir --upgrade --target /tmp/site .whl/diffusers*.whl .whl/importlib*.whl .whl/zipp*.whl 2>&1 | tail -2
export PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
B=/tmp/bench
echo "== APPSTART $(date +%T), $(left) s left"
timeout 250 python3 scripts/benchmark.py --out $B/a --model-dir $B/model --parts appstart --appstart-starts 3 \
  > $OUT/appstart-log.txt 2>&1; echo "rc $?"
cp $B/a/appstart.json $OUT/ 2>/dev/null
python3 - <<'PY'
import json
d = json.load(open("/tmp/bench/a/appstart.json"))
for k, v in d["default"].items():
    a = v.get("accel") or {}
    print(k, "wall", round(v.get("wall_s") or 0, 1), "load", round(v.get("load_engine_s") or 0, 1), "warm-up",
          v.get("warmup_s"), "probe", v.get("probe_s"), "vs first", v.get("frames_vs_first_start"), "vs previous",
          v.get("frames_vs_previous_start"), "store", a.get("graph_store_stats"), a.get("notes"), str(v.get("error", ""))[-800:])
PY
echo "== UNETCALL $(date +%T), $(left) s left"
mkdir -p $B/u && ln -sfn $B/a/app-models-0/.compile-cache $B/u/compile-cache
timeout $(( $(left) - 10 )) python3 scripts/benchmark.py --out $B/u --model-dir $B/model --parts unetcall512 \
  --variants layers+conv2d+graphs+ttri+share+store,layers+conv2d+graphs+ttri+share > $OUT/unet-log.txt 2>&1; echo "rc $?"
grep -E "^-- part|^== unetcall" $OUT/unet-log.txt | cut -c1-2500; cp $B/u/*.json $OUT/ 2>/dev/null
echo "== END $(date +%T), $(left) s left"
