#!/bin/bash
# Session 14, call 3: is the start-to-start frame difference the compile's? appstart with everything off (eager,
# no CUDA graphs, no shared prefix) and with only compile off, two starts each, same 3-step 512p video.
T0=$(date +%s)
left() { echo $((575 - ($(date +%s) - T0))); }
python3 -m pip install -q --no-index --no-deps --no-cache-dir --upgrade --target /tmp/site .whl/diffusers*.whl .whl/importlib*.whl .whl/zipp*.whl 2>&1 | tail -2
export PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
B=/tmp/bench
timeout 400 python3 scripts/benchmark.py --out $B/a --model-dir $B/model --parts appstart --appstart-starts 2 \
  --appstart-configs "accel.compile=off+accel.cuda_graphs=false+accel.share_cfg_prefix=false,accel.compile=off" \
  > $OUT/appstart-log.txt 2>&1; echo "rc $?"
cp $B/a/appstart.json $OUT/ 2>/dev/null
python3 - <<'PY'
import json
d = json.load(open("/tmp/bench/a/appstart.json"))
for cfg, starts in d.items():
    if not isinstance(starts, dict): continue
    for k, v in starts.items():
        if not isinstance(v, dict): continue
        a = v.get("accel") or {}
        print(cfg, k, "load", round(v.get("load_engine_s") or 0, 1), "probe", v.get("probe_s"), "vs first",
              v.get("frames_vs_first_start"), a.get("compile"), a.get("cuda_graphs"), a.get("share_cfg_prefix"),
              str(v.get("error", ""))[-600:])
PY
echo "== END $(date +%T), $(left) s left"
