#!/bin/bash
# Session 13, call 1: Dynamo's traced-code cache (accel.dynamo_cache, new, on) against the same app without it
# (accel.dynamo_cache=false), on one machine: the app's own load_engine in fresh processes, a first start then
# two restarts each, every start making the same 3-step 512p video to compare frames with its first start.
T0=$(date +%s)
left() { echo $((575 - ($(date +%s) - T0))); }
python3 -m pip install -q --no-index --no-deps --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>&1 | tail -2
export PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
echo "cores $(nproc)"
B=/tmp/bench
echo "== APPSTART $(date +%T), $(left) s left"
timeout $(( $(left) - 15 )) python3 scripts/benchmark.py --out $B/a --model-dir $B/model --parts appstart \
  --appstart-configs default,accel.dynamo_cache=false --appstart-starts 3 > $OUT/appstart-log.txt 2>&1
echo "rc $?"; grep -E "^-- part|^saved|Error|error" $OUT/appstart-log.txt | cut -c1-300 | head -20
cp $B/a/appstart.json $OUT/ 2>/dev/null
python3 - <<'PY'
import json
d = json.load(open("/tmp/bench/a/appstart.json"))
for cfg, starts in d.items():
    if not isinstance(starts, dict):
        continue
    for k, v in starts.items():
        c = v.get("counters", {})
        print(cfg, k, "load", round(v.get("load_engine_s") or 0, 1), "warm-up", v.get("warmup_s"), "probe", v.get("probe_s"),
              "frames", v.get("frames_vs_first_start"), c.get("dynamo_cache"), c.get("stats"),
              c.get("inductor", {}).get("fxgraph_cache_hit"), c.get("aot_autograd"), v.get("accel", {}).get("notes"),
              v.get("error", "")[-800:])
        for line in v.get("log", [])[:6]:
            print("   ", line[:250])
PY
echo "== END $(date +%T), $(left) s left"
