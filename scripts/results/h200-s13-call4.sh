#!/bin/bash
# Session 13, call 4 (the command as run, on call 3's warm machine): after call 3 found the restart's frames
# 2.4e-2 from the first start's on the live-temporal-conv model, the same appstart on PERF.md's model (the
# temporal convs' last layer at zero, `--temporal-convs zero`): is the difference amplified by the model?
python3 -m pip install -q --no-index --no-deps --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>&1 | tail -2
export PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
timeout 170 python3 scripts/benchmark.py --out /tmp/bench/z --model-dir /tmp/bench/model0 --temporal-convs zero \
  --parts appstart --appstart-starts 2 > $OUT/appstart-zero-log.txt 2>&1; echo rc $?
cp /tmp/bench/z/appstart.json $OUT/appstart-zero.json
