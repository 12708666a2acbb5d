#!/usr/bin/env bash
# GPU check: about 10 minutes on one H200 (each part has its own time limit; see PARTS).
#
#   bash benchmarks/gpu_check.sh DATA_DIR [OUT_DIR]
#
# 0. The process's start-up, each piece in a fresh process, the first time and the best of three
#    (benchmarks/cli_startup.py --gpu): Python, torch, timm, scikit-learn, the CUDA context, cuDNN.
#    First in PARTS, on a machine just started, its first column is the cold start.
# 1. `pneumoscan train --recipe strong` on DATA_DIR from the command to the saved model, decoding
#    included (empty cache), twice: how much the second, with the libraries in the page cache,
#    differs.
# 2. Recipe figures on a patient-grouped hold-out of DATA_DIR's train split (benchmarks/holdout.py):
#    three seeds of each variant below, the runs side by side on the one GPU (they share it, so
#    their timings mean nothing; part 1 gives the timings).
# 3. train_speed for the report's CNN and for ResNet-18 at 224 px: the project's step at batch 512
#    eager, with CUDA graphs (as `train` runs uncompiled on a GPU), compiled, and compiled with
#    CUDA graphs, against a plain eager loop at batch 32 (the report's batch); and ResNet-18 at
#    the strong recipe's batch 64, eager against CUDA graphs.
# 4. The seed recipe's epoch on DATA_DIR's train split: the project's step against the plain loop,
#    both at the report's batch 32 (the report: 55 s an epoch); then a profile of part 3's eager
#    step for each model: the kernels that take its time, and the operators by input shape; then
#    each model's convolutions timed alone in both layouts (benchmarks/conv_layers.py).
# 5. torchrun with one process on the GPU (NCCL), two epochs of the strong recipe.
#
# DATA_DIR is a Kermany-style folder (train/NORMAL, train/PNEUMONIA). On a machine that receives
# only the repository tree, copy the data into a git-ignored folder of the tree and send it along
# (42 MB at 224 px), e.g. from the repository root:
#     mkdir -p runs && cp -r ../shared/data/chest_xray_224 runs/chest_xray_224   # runs/ is ignored
#     bash benchmarks/gpu_check.sh runs/chest_xray_224 "$OUT"
# Needs only torch (with CUDA), torchvision, timm, numpy, Pillow, scikit-learn, scipy,
# matplotlib, safetensors and tqdm; nothing is installed, the code runs from src/.
# OUT_DIR (default $OUT, else /tmp/gpu_check) receives gpu_check.log (everything printed),
# speed.jsonl (each benchmark's JSON line) and runs.tgz (the runs' small files, no weights: the
# validation and hold-out predictions come back, for comparing threshold rules offline with
# benchmarks/threshold_rules.py).
# SMOKE=1 runs every part on the CPU at 32 px for one epoch and a few steps: a check of the
# script itself, in about 5 minutes on a 2-core CPU, before spending GPU time.
# PARTS="1 2" (default "0 1 2 3 4 5") runs only those parts: the whole script's time limits add up
# to more than one device command may take, so run it as two calls, PARTS="0 1 2" then
# PARTS="3 4 5", each with its own OUT_DIR. STARTUP_REPEAT (default 3): part 0's runs of each.

set -uo pipefail
cd "$(dirname "$0")/.."

DATA=${1:?usage: bash benchmarks/gpu_check.sh DATA_DIR [OUT_DIR]}
OUT_DIR=${2:-${OUT:-/tmp/gpu_check}}
PARTS=" ${PARTS:-0 1 2 3 4 5} "
part() { [[ $PARTS == *" $1 "* ]]; }
PYTHON=${PYTHON:-python3}
WORK=/tmp/gpu_check_work  # runs and weights stay here; small files are packed into OUT_DIR
HOLDOUT=$WORK/holdout
SEEDS="0 1 2"
# name: extra train options. The hold-out variants; strong is the recipe as it stands.
VARIANTS=(
    "strong:"
    "strong_30ep:--epochs 30"
    "strong_10ep:--epochs 10"
)
DEVICE=cuda TRAIN_SMALL=() SPEED_SMALL=() LAYERS_SMALL=() MODES=eager,graphs,compile,cudagraphs SMALL_MODES=eager,graphs
HOLDOUT_LIMIT=${HOLDOUT_LIMIT:-170}  # seconds for each hold-out run (they run side by side)
if [ "${SMOKE:-0}" = 1 ]; then
    DEVICE=cpu TRAIN_SMALL=(--image-size 32 --epochs 1) MODES=eager SMALL_MODES=eager
    SPEED_SMALL=(--image-size 32 --batch-size 16 --plain-batch-size 16 --steps 2 --warmup 1)
    LAYERS_SMALL=(--image-size 32 --batch-size 4 --iters 1 --warmup 1)
    VARIANTS=("${VARIANTS[@]:0:2}") SEEDS="0 1" HOLDOUT_LIMIT=400
    # Part 2 runs its trainings side by side: on a small CPU, threads of four processes
    # competing for two cores spin far more than they compute.
    export OMP_NUM_THREADS=1
fi
mkdir -p "$OUT_DIR" "$WORK"
exec > >(tee -a "$OUT_DIR/gpu_check.log") 2>&1
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export PNEUMOSCAN_CACHE=$WORK/cache  # decoded images
TIMEFORMAT='wall %1R s (user %1U s, sys %1S s)'
failed=()

pack() {  # the runs' small files, refreshed after every part so a timeout keeps what was done
    (cd "$WORK" && find . -path ./cache -prune -o -type f \( -name '*.json' -o -name '*.jsonl' \
        -o -name '*.png' -o -name '*_predictions.npz' \) -print |
        tar czf "$OUT_DIR/runs.tgz" -T -) 2>/dev/null || true
}

# ---- 0. start-up, before anything else has read the libraries
if part 0; then
    echo "== 0. start-up pieces: benchmarks/cli_startup.py"
    gpu_flag=(--gpu)
    [ "$DEVICE" = cuda ] || gpu_flag=()
    timeout 120 "$PYTHON" benchmarks/cli_startup.py --repeat "${STARTUP_REPEAT:-3}" \
        "${gpu_flag[@]}" |
        tee "$WORK/startup.log" || failed+=("startup")
    grep '^{' "$WORK/startup.log" | tail -n 1 >> "$OUT_DIR/speed.jsonl"
    # Whether imports read compiled bytecode or compile every time, and the slowest imports.
    "$PYTHON" - <<'EOF'
import importlib.util, os, sys, torch
cached = importlib.util.cache_from_source(torch.__file__)
print(f"python {sys.version.split()[0]}; torch {torch.__file__}; its bytecode cached: "
      f"{os.path.exists(cached)}; writable: {os.access(os.path.dirname(torch.__file__), os.W_OK)}; "
      f"dont_write_bytecode {sys.flags.dont_write_bytecode}")
EOF
    "$PYTHON" -X importtime -c "import torch, timm, sklearn.metrics" 2> "$WORK/importtime.log"
    echo "slowest imports (cumulative microseconds):"
    sort -t'|' -k2 -n "$WORK/importtime.log" | tail -n 12
fi

if [ ! -d "$DATA" ]; then
    echo "gpu_check: data folder $DATA not found (see the header of this script)"
    exit 2
fi
"$PYTHON" - "$DEVICE" <<'EOF' || exit 2
import os, sys, torch
print(f"torch {torch.__version__}, {os.cpu_count()} CPUs")
if sys.argv[1] == "cuda":
    assert torch.cuda.is_available(), "no CUDA device visible"
    p = torch.cuda.get_device_properties(0)
    print(f"{p.name}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs")
EOF
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm \
    --format=csv,noheader || true
date

# ---- 1. strong recipe, command to saved model, decoding included
e2e() {  # name, extra options...
    local name=$1
    shift
    rm -rf "$PNEUMOSCAN_CACHE" "$WORK/$name"
    echo "== 1. pneumoscan train --data $DATA --recipe strong $* (empty cache)"
    if time timeout 100 "$PYTHON" -m pneumoscan train --data "$DATA" --recipe strong \
            --device "$DEVICE" --out "$WORK/$name" --quiet "${TRAIN_SMALL[@]}" "$@"; then
        ls -l "$WORK/$name/model.safetensors"
        "$PYTHON" - "$WORK/$name/metrics.jsonl" <<'EOF'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
for r in rows[:2] + rows[-2:]:
    print(f"  epoch {r['epoch']:2d}  {r['seconds']:6.2f} s  {r['images_per_s']:8.0f} img/s  "
          f"val_acc {r.get('val_accuracy', 0):.4f}")
print(f"  {len(rows)} epochs, {sum(r['seconds'] for r in rows):.1f} s in the training loop, "
      f"median {sorted(r['images_per_s'] for r in rows)[len(rows) // 2]:.0f} img/s")
EOF
    else
        failed+=("e2e_$name")
    fi
    pack
}
if part 1; then
    e2e e2e_strong
    e2e e2e_strong_again
fi

# ---- 2. recipe variants on a patient-grouped hold-out, three seeds each, side by side
holdout_variants() {
echo "== 2. hold-out variants: ${VARIANTS[*]}"
rm -rf "$HOLDOUT"
"$PYTHON" benchmarks/holdout.py --data "$DATA" --out "$HOLDOUT/data" &&
    "$PYTHON" -c "from pneumoscan.data.dataset import load_data; \
load_data('$HOLDOUT/data', ${TRAIN_SMALL[1]:-224}, progress=False)" || failed+=("holdout_data")
pids=()
for variant in "${VARIANTS[@]}"; do
    name=${variant%%:*}
    read -r -a extra <<< "${variant#*:}"
    for seed in $SEEDS; do
        timeout "$HOLDOUT_LIMIT" "$PYTHON" -m pneumoscan train --data "$HOLDOUT/data" \
            --recipe strong \
            --device "$DEVICE" --seed "$seed" --out "$HOLDOUT/$name/seed-$seed" --quiet \
            "${TRAIN_SMALL[@]}" "${extra[@]}" \
            > "$HOLDOUT/$name-$seed.log" 2>&1 &
        pids+=($!)
    done
done
time for pid in "${pids[@]}"; do wait "$pid" || failed+=("holdout_pid_$pid"); done
for f in "$HOLDOUT"/*.log; do grep -H -i -E "error|traceback" "$f" | head -n 5; done
"$PYTHON" - "$HOLDOUT" <<'EOF'
import json, statistics, sys
from pathlib import Path
root = Path(sys.argv[1])
print(f"{'variant':18s} {'accuracy (seeds)':34s} {'ROC AUC':8s} {'sens':6s} {'spec':6s} val_acc")
for variant in sorted(p for p in root.iterdir() if p.is_dir() and p.name != "data"):
    rows = []
    for run in sorted(variant.glob("seed-*")):
        try:
            test = json.loads((run / "test_metrics.json").read_text())
            val = json.loads((run / "model.json").read_text())["validation"]
        except (OSError, ValueError, KeyError):
            continue
        rows.append((test["accuracy"], test["roc_auc"], test["sensitivity"],
                     test["specificity"], val["accuracy"]))
    if not rows:
        print(f"{variant.name:18s} no finished run")
        continue
    mean = [statistics.fmean(c) for c in zip(*rows)]
    seeds = ", ".join(f"{r[0]:.3f}" for r in rows)
    print(f"{variant.name:18s} {mean[0]:.4f} ({seeds}) {'':6s} {mean[1]:.4f}   {mean[2]:.3f}  "
          f"{mean[3]:.3f}  {mean[4]:.4f}")
EOF
pack
}
if part 2; then holdout_variants; fi

# ---- 3. training-step throughput against a plain eager loop, same model
speed() {  # name, time limit in s, train_speed arguments...
    local name=$1 limit=$2
    shift 2
    echo "== 3. train_speed $name: $*"
    if time timeout "$limit" "$PYTHON" benchmarks/train_speed.py --device "$DEVICE" "$@" \
            "${SPEED_SMALL[@]}" \
            > "$WORK/speed_$name.log" 2>&1; then
        grep -v '^{' "$WORK/speed_$name.log" | grep -v -i -E "warn|USDT" | tail -n 24
        grep '^{' "$WORK/speed_$name.log" | tail -n 1 | tee -a "$OUT_DIR/speed.jsonl"
    else
        tail -n 20 "$WORK/speed_$name.log"
        failed+=("speed_$name")
    fi
}
if part 3; then
    speed seed_cnn 150 --model seed_cnn --image-size 224 --batch-size 512 --plain-batch-size 32 \
        --modes "$MODES" --steps 100
    speed resnet18 150 --model resnet18 --image-size 224 --batch-size 512 --plain-batch-size 32 \
        --modes "$MODES" --steps 100
    # The same comparison at one batch for both: how much of the gain is the batch alone.
    speed seed_cnn_same_batch 60 --model seed_cnn --image-size 224 --batch-size 512 \
        --modes eager --steps 30
    speed resnet18_same_batch 60 --model resnet18 --image-size 224 --batch-size 512 \
        --modes eager --steps 30
    speed resnet18_b64 60 --model resnet18 --image-size 224 --batch-size 64 \
        --modes "$SMALL_MODES" --steps 100 --skip-plain
fi

# ---- 4. the report's recipe: one epoch of its train split, project against plain, batch 32
if part 4; then
    speed seed_epoch 60 --data "$DATA" --recipe seed --modes "$SMALL_MODES"
    # Where the eager step's time goes, kernel by kernel, for the two models of part 3.
    speed profile_seed_cnn 60 --model seed_cnn --image-size 224 --batch-size 512 --modes eager \
        --steps 10 --skip-plain --profile 5
    speed profile_resnet18 60 --model resnet18 --image-size 224 --batch-size 512 --modes eager \
        --steps 10 --skip-plain --profile 5    # Each convolution alone, forward and backward, in both layouts: which layers cost most.
    for model in seed_cnn resnet18; do
        echo "== 4. conv_layers $model"
        timeout 90 "$PYTHON" benchmarks/conv_layers.py --model "$model" --device "$DEVICE" \
            "${LAYERS_SMALL[@]}" > "$WORK/layers_$model.log" 2>&1 || failed+=("layers_$model")
        grep -v '^{' "$WORK/layers_$model.log" | tail -n 30
        grep '^{' "$WORK/layers_$model.log" | tail -n 1 >> "$OUT_DIR/speed.jsonl"
    done
fi

# ---- 5. the distributed path with NCCL: torchrun, one process on the one GPU, two epochs
if part 5; then
    echo "== 5. torchrun --nproc_per_node=1 -m pneumoscan train (NCCL)"
    rm -rf "$WORK/ddp"
    time timeout 90 "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node=1 \
        -m pneumoscan train --data "$DATA" --recipe strong --epochs 2 --device "$DEVICE" \
        --out "$WORK/ddp" --quiet "${TRAIN_SMALL[@]}" 2>&1 |
        grep -v -E "^ |^$|^figure|^actual" || failed+=("torchrun")
fi

date
pack
if [ ${#failed[@]} -gt 0 ]; then
    echo "gpu_check: failed or timed out: ${failed[*]}"
    exit 1
fi
echo "gpu_check: all parts done"
