#!/bin/bash
# Session 14, call 1: the graph store (accel.graph_store, on by default). appstart: the default config (first
# start, two restarts) and the same with the store off (first start, restart), each start making the same 3-step
# 512p video; then 512p end to end with the regions run from the default config's store (its cache linked in).
T0=$(date +%s)
left() { echo $((575 - ($(date +%s) - T0))); }
python3 -m pip install -q --no-index --no-deps --no-cache-dir --upgrade --target /tmp/site .whl/diffusers*.whl .whl/importlib*.whl .whl/zipp*.whl 2>&1 | tail -2
export PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
git log --oneline | head -1
B=/tmp/bench
echo "== APPSTART $(date +%T), $(left) s left"
timeout 330 python3 scripts/benchmark.py --out $B/a --model-dir $B/model --parts appstart --appstart-starts 3 \
  --appstart-configs default,accel.graph_store=false > $OUT/appstart-log.txt 2>&1; echo "rc $?"
cp $B/a/appstart.json $OUT/ 2>/dev/null
python3 - <<'PY'
import json
d = json.load(open("/tmp/bench/a/appstart.json"))
for cfg, starts in d.items():
    if not isinstance(starts, dict) or cfg in ("part",):
        continue
    for k, v in starts.items():
        if not isinstance(v, dict):
            continue
        c = v.get("counters", {})
        a = v.get("accel") or {}
        print(cfg, k, "load", round(v.get("load_engine_s") or 0, 1), "warm-up", v.get("warmup_s"), "probe", v.get("probe_s"),
              "frames", v.get("frames_vs_first_start"), "store", a.get("graph_store_stats"), c.get("aot_autograd"),
              c.get("stats"), a.get("notes"), str(v.get("error", ""))[-800:])
        h = v.get("helpers") or {}
        for r in h.get("results", [])[:8]:
            print("   helper", r.get("helper"), r.get("total_s"), r.get("graph_store"), r.get("notes"), str(r.get("error", ""))[-600:])
PY
echo "== COMPILE512 from the store $(date +%T), $(left) s left"
mkdir -p $B/f && ln -sfn $B/a/app-models-0/.compile-cache $B/f/compile-cache
timeout $(( $(left) - 10 )) python3 scripts/benchmark.py --out $B/f --model-dir $B/model --parts compile512 \
  --runs 3 > $OUT/c512-log.txt 2>&1; echo "rc $?"
grep -E "^-- part|^== compile512|graph store|warm" $OUT/c512-log.txt | cut -c1-900 | head -20; cp $B/f/*.json $OUT/ 2>/dev/null
python3 -c "
import json; d=json.load(open('/tmp/bench/f/compile512.json')); a=d.get('accel') or {}
print({k: d.get(k) for k in d if k not in ('accel','runs')}); print(a.get('graph_store_stats'), a.get('notes'))" 2>&1 | cut -c1-1500
echo "== END $(date +%T), $(left) s left"
