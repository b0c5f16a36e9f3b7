#!/bin/bash
# Session 12, call 3: why the app's own restart warm-up took 16.3 s in call 2 against the benchmark's 10.2 s
# (coldstart, kept cache, call 1): appstart again with the children's Dynamo counters, recompile reasons and the
# app's log lines; then coldstart with 8 helpers on the same machine for comparison.
T0=$(date +%s)
left() { echo $((330 - ($(date +%s) - T0))); }
python3 -m pip install -q --no-index --no-deps --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>&1 | tail -2
export PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
B=/tmp/bench
echo "== APPSTART $(date +%T), $(left) s left"
timeout 170 python3 scripts/benchmark.py --out $B/a --model-dir $B/model --parts appstart > $OUT/appstart-log.txt 2>&1
echo "rc $?"; grep -E "^-- part|^saved" $OUT/appstart-log.txt | cut -c1-300
cp $B/a/appstart.json $OUT/ 2>/dev/null
python3 - <<'PY'
import json
d = json.load(open("/tmp/bench/a/appstart.json"))
for k in ("first_start", "restart"):
    v = d.get(k, {})
    c = v.get("counters", {})
    print(k, round(v.get("load_engine_s", 0), 1), v.get("warmup_s"), c.get("stats"), c.get("inductor", {}).get("fxgraph_cache_hit"),
          c.get("inductor", {}).get("fxgraph_cache_miss"), c.get("aot_autograd"))
    for line in v.get("log", [])[:12]:
        print("   ", line[:250])
PY
echo "== COLDSTART $(date +%T), $(left) s left"
timeout $(( $(left) - 5 )) python3 scripts/benchmark.py --out $B/c --model-dir $B/model \
  --parts coldstart --coldstart-helpers 8 > $OUT/coldstart-log.txt 2>&1; echo "rc $?"
grep -E "^-- part" $OUT/coldstart-log.txt; cp $B/c/coldstart.json $OUT/ 2>/dev/null
echo "== END $(date +%T), $(left) s left"
