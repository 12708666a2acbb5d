#!/usr/bin/env bash
# GPU check, about 4 minutes on one H200 (5 at most: each part has its own time limit).
#
#   bash benchmarks/gpu_check.sh DATA_DIR [OUT_DIR]
#
# 1. train_speed for the report's CNN at 224 px: the project's step at batch 512, compiled,
#    against a plain eager loop at batch 32 (the report's batch).
# 2. the same for ResNet-18 (the strong recipe's settings).
# 3. `pneumoscan train --recipe strong` on DATA_DIR, from the command to the saved model, timed.
#
# DATA_DIR is a Kermany-style folder (train/NORMAL, train/PNEUMONIA). On a machine that receives
# only the repository tree, copy the data into a git-ignored folder of the tree first and send
# it along (42 MB at 224 px), e.g. from the repository root:
#     mkdir -p runs && cp -r ../shared/data/chest_xray_224 runs/chest_xray_224   # runs/ is ignored
#     bash benchmarks/gpu_check.sh runs/chest_xray_224 "$OUT"
# Needs only torch (with CUDA), torchvision, timm, numpy, Pillow, scikit-learn, scipy,
# matplotlib, safetensors and tqdm; nothing is installed, the code runs from src/.
# OUT_DIR (default $OUT, else /tmp/gpu_check) receives the logs, each benchmark's JSON line
# (speed.jsonl) and the run's small files (not the weights).

set -uo pipefail
cd "$(dirname "$0")/.."

DATA=${1:?usage: bash benchmarks/gpu_check.sh DATA_DIR [OUT_DIR]}
OUT_DIR=${2:-${OUT:-/tmp/gpu_check}}
PYTHON=${PYTHON:-python}
RUN=/tmp/gpu_check_strong  # the weights stay here: only small files are copied to OUT_DIR
mkdir -p "$OUT_DIR"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export PNEUMOSCAN_CACHE=${PNEUMOSCAN_CACHE:-/tmp/pneumoscan-cache}  # decoded images
TIMEFORMAT='wall %1R s (user %1U s, sys %1S s)'
failed=()

if [ ! -d "$DATA" ]; then
    echo "gpu_check: data folder $DATA not found (see the header of this script)" >&2
    exit 2
fi
"$PYTHON" - <<'EOF' || exit 2
import torch
assert torch.cuda.is_available(), "no CUDA device visible"
print(f"torch {torch.__version__}, {torch.cuda.get_device_name(0)}")
EOF
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

speed() {  # name, time limit in s, train_speed arguments...
    local name=$1 limit=$2
    shift 2
    echo "== train_speed $name: $*"
    if time timeout "$limit" "$PYTHON" benchmarks/train_speed.py --device cuda "$@" \
            2>&1 | tee "$OUT_DIR/speed_$name.log"; then
        grep '^{' "$OUT_DIR/speed_$name.log" | tail -n 1 >> "$OUT_DIR/speed.jsonl"
    else
        failed+=("speed_$name")
    fi
}

# Compilation takes 30-50 s a model; 100 timed steps after 5 warm-up ones.
speed seed_cnn 80 --model seed_cnn --image-size 224 --batch-size 512 --plain-batch-size 32 \
    --compile --steps 100
speed resnet18 80 --model resnet18 --image-size 224 --batch-size 512 --plain-batch-size 32 \
    --compile --steps 100

echo "== pneumoscan train --recipe strong on $DATA"
rm -rf "$RUN"
if time timeout 130 "$PYTHON" -m pneumoscan train --data "$DATA" --recipe strong \
        --device cuda --out "$RUN" --quiet 2>&1 | tee "$OUT_DIR/strong.log"; then
    ls -l "$RUN/model.safetensors" "$RUN/model.json"
else
    failed+=("strong")
fi
for f in config.json metrics.jsonl model.json test_metrics.json; do
    [ -f "$RUN/$f" ] && cp "$RUN/$f" "$OUT_DIR/strong_$f"
done
if [ -f "$RUN/metrics.jsonl" ]; then  # seconds and images/s of every epoch
    "$PYTHON" - "$RUN/metrics.jsonl" <<'EOF'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
for r in rows:
    print(f"epoch {r['epoch']:2d}  {r['seconds']:6.2f} s  {r['images_per_s']:8.0f} img/s  "
          f"val_loss {r.get('val_loss', float('nan')):.4f}  val_acc {r.get('val_accuracy', 0):.4f}")
print(f"{len(rows)} epochs, {sum(r['seconds'] for r in rows):.1f} s in the training loop")
EOF
fi

if [ ${#failed[@]} -gt 0 ]; then
    echo "gpu_check: failed or timed out: ${failed[*]}" >&2
    exit 1
fi
echo "gpu_check: all parts done; JSON lines in $OUT_DIR/speed.jsonl"
