#!/usr/bin/env bash
# Reproduce every shipped SR weights file (sr_engine/weights/<model>_<mode>_x<scale>.safetensors).
# CPU only, 2 threads; total roughly 25-40 minutes on 2 shared cores.  Training data: scikit-image
# natural images + synthetic phantoms generated on the fly (never medical images from packages).
# Usage: scripts/train_all.sh [model ...]   (default: all, in priority order)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-sr_engine/weights}
CKPT=${CKPT:-/tmp/srnode_train_ckpt}
MODELS=${*:-fast residual srcnn srgan}

steps() {  # model mode scale -> steps
  case "$1:$2:$3" in
    fast:slice:2) echo 6000 ;;
    fast:*) echo 3000 ;;
    srcnn:*) echo 3000 ;;
    residual:slice:2) echo 5000 ;;
    residual:*) echo 3000 ;;
    srgan:*) echo 600 ;;
  esac
}

run() {
  "$PY" -m sr_engine.training --model "$1" --mode "$2" --scale "$3" \
    --steps "$(steps "$1" "$2" "$3")" --out "$OUT" --checkpoints "$CKPT" --seed 0 --threads 2
}

for model in $MODELS; do
  for task in "slice 2" "slice 4" "volume 2" "volume 3" "volume 4"; do
    # shellcheck disable=SC2086
    run "$model" $task
  done
done
