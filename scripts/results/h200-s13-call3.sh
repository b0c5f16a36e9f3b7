#!/bin/bash
# Session 13, call 3: the shipped app (Dynamo cache taken out) with the fixed frame check: appstart, first start
# and a restart, each making the same 3-step 512p video; then the fast preset (25 steps, opt-in) end to end with
# the current default speedups (last measured in session 9, before the shared CFG prefix).
T0=$(date +%s)
left() { echo $((575 - ($(date +%s) - T0))); }
python3 -m pip install -q --no-index --no-deps --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>&1 | tail -2
export PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
B=/tmp/bench
echo "== APPSTART $(date +%T), $(left) s left"
timeout 240 python3 scripts/benchmark.py --out $B/a --model-dir $B/model --parts appstart --appstart-starts 2 \
  > $OUT/appstart-log.txt 2>&1; echo "rc $?"
cp $B/a/appstart.json $OUT/ 2>/dev/null
python3 - <<'PY'
import json
d = json.load(open("/tmp/bench/a/appstart.json"))
for k, v in d["default"].items():
    c = v.get("counters", {})
    print(k, "load", round(v.get("load_engine_s") or 0, 1), "warm-up", v.get("warmup_s"), "probe", v.get("probe_s"),
          "frames", v.get("frames_vs_first_start"), c.get("aot_autograd"), v.get("accel", {}).get("notes"), v.get("error", "")[-500:])
PY
echo "== FAST $(date +%T), $(left) s left"
timeout $(( $(left) - 10 )) python3 scripts/benchmark.py --out $B/f --model-dir $B/model --parts compile512 --steps 25 \
  --runs 3 > $OUT/fast-log.txt 2>&1; echo "rc $?"
grep -E "^-- part|^== compile512" $OUT/fast-log.txt | cut -c1-700; cp $B/f/*.json $OUT/ 2>/dev/null
echo "== END $(date +%T), $(left) s left"
