#!/usr/bin/env bash
# Train configs/train-pbc-gpu.yaml and configs/train-pbc-gpu-wide.yaml side by side on one GPU, then calibrate
# (on the GPU in float32, TF32 off, so the calibration holds on CPU) and evaluate on PBC val each weight set.
# Run from the repository root on the GPU machine, after packing the data where it can be read:
#   here:   python examples/gpu_training/pack_data.py ../shared/data/pbc .gpu    # 27 MB; or, 17 MB without val:
#           python examples/gpu_training/pack_data.py ../shared/data/pbc .gpu --split train --exclude ig,erythroblast
#   there:  MIN=6 bash examples/gpu_training/run.sh 2>&1 | tee run.log
# Results: $R/models/{v1,v2}-{raw,ema}/ (float16 weights, calibration.json, feature bank), $R/metrics/*-val.json,
# $R/logs/, and tars of them in $OUT. Python packages missing there can come as wheels in .whl/ (WHEELS=1).
# A local dry run on CPU (minutes): PY=.venv/bin/python WHEELS= DEV=cpu MIN=0.15 PER=2 BANK=8 LIMIT=2 \
#   OUT=/tmp/o R=/tmp/r SCOPE_STREAM_DATA=/tmp/sd bash examples/gpu_training/run.sh
set -u
T0=$(date +%s)
el() { echo "[$(( $(date +%s) - T0 ))s] $*"; }
HERE=examples/gpu_training
export PYTHONUNBUFFERED=1 SCOPE_STREAM_DATA=${SCOPE_STREAM_DATA:-/tmp/ssdata} OMP_NUM_THREADS=${OMP_NUM_THREADS:-3}
OUT=${OUT:-/tmp/ssout}; R=${R:-/tmp/ssruns}; MIN=${MIN:-6}; DEV=${DEV:-cuda}; PY=${PY:-python3}; PACKED=${PACKED:-.gpu}
PER=${PER:-30}; BANK=${BANK:-500}; LIMIT=${LIMIT:-}
mkdir -p "$OUT" "$R/logs" "$R/metrics" "$R/models"
if [ -n "${WHEELS-1}" ] && [ -d .whl ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site || exit 1
fi
(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true)
$PY -c "import torch, diffusers, pydantic; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" || exit 1
[ -f "$SCOPE_STREAM_DATA/pbc/labels.csv" ] || $PY $HERE/unpack_data.py "$PACKED" "$SCOPE_STREAM_DATA/pbc" || exit 1
el "data ready"

train() {  # name config
  $PY -m scope_stream train -c "$2" --out "$R/$1" --max-minutes "$MIN" > "$R/logs/train-$1.log" 2>&1
  echo "train $1 exit $?"; grep -E "^training|^done|^step [0-9]*000 " "$R/logs/train-$1.log" | tail -8
}
train v1 configs/train-pbc-gpu.yaml & train v2 configs/train-pbc-gpu-wide.yaml & wait
el "trained"
for v in v1 v2; do for w in raw ema; do
  [ -f "$R/$v/$w/model.safetensors" ] && rm -rf "$R/models/$v-$w" && cp -r "$R/$v/$w" "$R/models/$v-$w"
done; done
$PY $HERE/to_fp16.py "$R"/models/*

pack() {  # each model dir as a tar in $OUT (split above 15 MB), and the small results
  for m in v1-raw v1-ema v2-ema; do
    [ -d "$R/models/$m" ] || continue
    tar -C "$R/models" -cf "$R/$m.tar" "$m"
    rm -f "$OUT/$m.tar" "$OUT/$m.tar.part-"*
    if [ "$(stat -c %s "$R/$m.tar")" -gt 15000000 ]; then split -b 15000000 -a 1 "$R/$m.tar" "$OUT/$m.tar.part-"
    else cp "$R/$m.tar" "$OUT/$m.tar"; fi
  done
  tar -C "$R" -cf "$OUT/results.tar" logs metrics v1/holdout.json v1/train_log.jsonl v2/train_log.jsonl \
    $(cd "$R" && ls models/*/calibration.json 2>/dev/null)
}
pack; el "weights packed"

caleval() {  # model dir name
  local m=$1 run=${1%%-*} lim=()
  [ -n "$LIMIT" ] && lim=(--limit-per-class "$LIMIT")
  $PY -m scope_stream calibrate --model "$R/models/$m" --run "$R/$run" --per-class "$PER" --noises 2 \
    --centre-sigma 0.22 --feature-bank "$BANK" --device "$DEV" --precision fp32 > "$R/logs/cal-$m.log" 2>&1 \
    || { echo "calibrate $m failed"; tail -5 "$R/logs/cal-$m.log"; return; }
  if ! grep -qE $',val\r?$' "$SCOPE_STREAM_DATA/pbc/labels.csv"; then echo "$m: calibrated; no val rows packed, evaluate it on the CPU"; return; fi
  $PY -m scope_stream evaluate classifier --data "$SCOPE_STREAM_DATA/pbc" --split val --model "$R/models/$m" \
    --anomaly-classes ig,erythroblast --device "$DEV" --precision fp32 --json "$R/metrics/$m-val.json" "${lim[@]}" \
    > "$R/logs/eval-$m.log" 2>&1 || { echo "evaluate $m failed"; tail -5 "$R/logs/eval-$m.log"; return; }
  $PY - "$R/metrics/$m-val.json" "$m" <<'PYEOF'
import json, sys
d = json.load(open(sys.argv[1]))
print(sys.argv[2], "bal_acc %.4f" % d["balanced_accuracy"], "ece %.4f" % d["ece_15"], "auroc", d.get("anomaly_auroc"))
PYEOF
}
for m in v1-raw v1-ema v2-raw v2-ema; do [ -d "$R/models/$m" ] && caleval $m & done; wait
el "calibrated and evaluated"
pack; el "packed"
ls -la "$OUT"
