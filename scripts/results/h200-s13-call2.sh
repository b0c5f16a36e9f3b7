#!/bin/bash
# Session 13, call 2: after call 1 (Dynamo cache on: guard pickling failed on the GPU, the app fell back to
# eager), the temporal convs now swap their class instead of a bound forward. First a tiny-model diagnostic on
# CUDA (backend eager, dynamo cache on) for the math and the Triton temporal attention, run twice each (save,
# then load); then appstart for the default and for math attention, first start and restart each.
T0=$(date +%s)
left() { echo $((575 - ($(date +%s) - T0))); }
python3 -m pip install -q --no-index --no-deps --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>&1 | tail -2
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
for m in math triton; do for i in 1 2; do
  timeout 90 python3 scripts/results/h200-s13-call2-diag.py $m /tmp/diag/dyn-$m > $OUT/diag-$m-$i.txt 2>&1; echo "diag $m $i rc $?"
  grep -v "dropped with" $OUT/diag-$m-$i.txt | grep -E "DIAG|Error|error|pickl" | tail -6 | cut -c1-400
done; done
echo "== APPSTART $(date +%T), $(left) s left"
B=/tmp/bench
timeout $(( $(left) - 15 )) python3 scripts/benchmark.py --out $B/a --model-dir $B/model --parts appstart \
  --appstart-configs default,accel.temporal_attention=math --appstart-starts 2 > $OUT/appstart-log.txt 2>&1
echo "rc $?"; cp $B/a/appstart.json $OUT/ 2>/dev/null
python3 - <<'PY'
import json
d = json.load(open("/tmp/bench/a/appstart.json"))
for cfg, starts in d.items():
    if not isinstance(starts, dict):
        continue
    for k, v in starts.items():
        c = v.get("counters", {})
        h = v.get("helpers") or {}
        print(cfg, k, "load", round(v.get("load_engine_s") or 0, 1), "warm-up", v.get("warmup_s"), "probe", v.get("probe_s"),
              "frames", v.get("frames_vs_first_start"), c.get("dynamo_cache"), c.get("stats"),
              c.get("inductor", {}).get("fxgraph_cache_hit"), c.get("aot_autograd"), "helpers failed", h.get("failed"),
              v.get("accel", {}).get("notes"), v.get("error", "")[-600:])
        t = v.get("dynamo_compile_times") or ""
        print("   ", " | ".join(l.strip() for l in t.splitlines() if any(x in l for x in ("compile_inner", "bytecode_tracing", "build_guards", "call_user_compiler"))))
PY
echo "== END $(date +%T), $(left) s left"
