#!/usr/bin/env bash
# The training walkthrough of docs/training.md, end to end on real Fashion-MNIST data (about 6 minutes on 2 CPU
# cores): train; kill a run and resume it (same weights as the uninterrupted run); DDP on 2 processes;
# fine-tune a shipped model on a new image folder; evaluate the runs side by side.
#   bash examples/walkthrough.sh [output folder, default runs/walkthrough]
set -euo pipefail
out=${1:-runs/walkthrough}
if [ -d "$out" ] && [ -n "$(ls -A "$out")" ]; then  # its steps name their run folders: start from a new one
  echo "$out holds files already: pass a new folder (bash examples/walkthrough.sh runs/walkthrough2)" >&2; exit 2
fi
mkdir -p "$out"
common=(--model lcnn_resnet20 --model-kwargs logit_scale=4 --reg lcnn_gradreg --gradreg fd --lambda-grad 0.01
        --dataset fmnist --train-subset 6000 --test-subset 2000 --epochs 2 --batch-size 64 --lr 0.05
        --sched cosine --aug-pad 2 --seed 0 --no-progress --output "$out")

echo "== 1. train"
lcnn-zoo train "${common[@]}" --experiment full

echo "== 2. kill a run after its first checkpoint (SIGKILL), then resume it"
lcnn-zoo train "${common[@]}" --experiment killed > "$out/killed.log" 2>&1 &
pid=$!
until [ -f "$out/killed/last.pth" ]; do sleep 0.2; done
kill -9 "$pid"; wait "$pid" 2>/dev/null || true
echo "killed after: $(grep -c '^epoch' "$out/killed.log") epoch(s)"
lcnn-zoo train "${common[@]}" --experiment killed --resume auto
python - "$out" <<'PY'
import sys
from pathlib import Path
from safetensors.torch import load_file
a, b = (load_file(Path(sys.argv[1]) / run / "model.safetensors") for run in ("full", "killed"))
print("resumed weights identical to the uninterrupted run:", a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a))
PY

echo "== 3. DDP: 2 processes (gloo on CPU)"
OMP_NUM_THREADS=1 torchrun --nproc_per_node=2 -m lcnn_zoo train "${common[@]}" --experiment ddp 2>&1 | grep -v "^W\|OMP_NUM_THREADS\|^\*\*\*"

echo "== 4. fine-tune the shipped lcnn_resnet20.fmnist on a new 3-class image folder"
python examples/fmnist_footwear_folder.py "$out/footwear" --per-class 300
lcnn-zoo train --config configs/finetune_folder.yaml --dataset "folder:$out/footwear" --input-size 1 28 28 \
    --epochs 2 --no-progress --output "$out"

echo "== 5. evaluate the runs side by side"
lcnn-zoo eval "$out/full" "$out/ddp" --dataset fmnist --limit 1000 --geom-samples 50 --pgd-samples 100 \
    --noise-samples 16 --output "$out/eval" --no-progress
