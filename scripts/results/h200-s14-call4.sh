#!/bin/bash
# Session 14, call 4: Inductor's deterministic mode (accel.deterministic). appstart with it (first start, two
# restarts: are the frames now the same start to start?), then one 512p UNet call with it from that store vs
# without (ms per call, error).
T0=$(date +%s)
left() { echo $((575 - ($(date +%s) - T0))); }
python3 -m pip install -q --no-index --no-deps --no-cache-dir --upgrade --target /tmp/site .whl/diffusers*.whl .whl/importlib*.whl .whl/zipp*.whl 2>&1 | tail -2
export PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
B=/tmp/bench
timeout 250 python3 scripts/benchmark.py --out $B/a --model-dir $B/model --parts appstart --appstart-starts 3 \
  --appstart-configs accel.deterministic=true > $OUT/appstart-log.txt 2>&1; echo "rc $?"
cp $B/a/appstart.json $OUT/ 2>/dev/null
python3 - <<'PY'
import json
d = json.load(open("/tmp/bench/a/appstart.json"))
for cfg, starts in d.items():
    if not isinstance(starts, dict): continue
    for k, v in starts.items():
        if not isinstance(v, dict): continue
        a = v.get("accel") or {}
        print(cfg, k, "wall", round(v.get("wall_s") or 0, 1), "load", round(v.get("load_engine_s") or 0, 1), "warm-up",
              v.get("warmup_s"), "probe", v.get("probe_s"), "vs first", v.get("frames_vs_first_start"), "vs previous",
              v.get("frames_vs_previous_start"), "store", a.get("graph_store_stats"), a.get("deterministic"), a.get("notes"),
              str(v.get("error", ""))[-800:])
PY
echo "== UNETCALL $(date +%T), $(left) s left"
mkdir -p $B/u && ln -sfn $B/a/app-models-0/.compile-cache $B/u/compile-cache
timeout $(( $(left) - 10 )) python3 scripts/benchmark.py --out $B/u --model-dir $B/model --parts unetcall512 \
  --variants layers+conv2d+graphs+ttri+share+store+det,layers+conv2d+graphs+ttri+share+store > $OUT/unet-log.txt 2>&1; echo "rc $?"
cp $B/u/*.json $OUT/ 2>/dev/null
python3 - <<'PY'
import json
d = json.load(open("/tmp/bench/u/unetcall512.json"))
for k, v in d["variants"].items():
    print(k, {a: b for a, b in v.items() if a != "report"}, (v.get("report") or {}).get("notes"), (v.get("report") or {}).get("graph_store_stats"))
PY
echo "== END $(date +%T), $(left) s left"
