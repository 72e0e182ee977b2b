#!/usr/bin/env bash
# Train, measure and publish the paper's CIFAR zoo: ResNet-18 on CIFAR-10 and CIFAR-100, each as the
# paper's four variants (standard, GradReg, LCNN, LCNN+GradReg), from the committed configs.
#
#   bash examples/cifar_zoo.sh              # on a GPU machine with a network and `hf auth login`
#   bash examples/cifar_zoo.sh --dry-run    # tiny stand-in data, one step each, no upload (CI runs this)
#
# Every step resumes: training with --resume auto, evaluation only where eval.json is missing, and a
# push rewrites only its own repo folder. Expected wall time: see "Publishing" in docs/zoo.md
# (8 runs of 200 epochs).
#
# Environment: RUNS (run folders, default runs/cifar_zoo), EVAL (docs/cifar_zoo), HUB (hub),
# UPLOAD=0 to write the repo folders without uploading, THREADS (CPU threads, default 0 = torch's).
set -euo pipefail
cd "$(dirname "$0")/.."

DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; fi
RUNS=${RUNS:-runs/cifar_zoo}
EVAL=${EVAL:-docs/cifar_zoo}
HUB=${HUB:-hub}
UPLOAD=${UPLOAD:-1}
THREADS=${THREADS:-0}
TRAIN_EXTRA=(--download)
EVAL_EXTRA=(--download)
if [ "$DRY" = 1 ]; then
  tmp=$(mktemp -d -t cifar-zoo-dry-XXXXXX)
  trap 'rm -rf "$tmp"' EXIT  # the dry run's own temporary folder
  RUNS=$tmp/runs; EVAL=$tmp/eval; HUB=$tmp/hub; UPLOAD=0
  python examples/cifar_standin.py "$tmp/data" --train 32 --test 32
  TRAIN_EXTRA=(--data-dir "$tmp/data" --epochs 1 --train-subset 32 --test-subset 32 --batch-size 32)
  EVAL_EXTRA=(--data-dir "$tmp/data" --limit 32 --geom-samples 4 --pgd-samples 4 --pgd-steps 1 --noise-samples 2
              --hvp-iters 2)
  echo "dry run in $tmp"
fi

declare -A ARCH=([standard]=lcnn_resnet18_softplus [gradreg]=lcnn_resnet18_softplus [lcnn]=lcnn_resnet18
                 [lcnn_gradreg]=lcnn_resnet18)
declare -A SUFFIX=([standard]="" [gradreg]=_gradreg [lcnn]="" [lcnn_gradreg]=_gradreg)
VARIANTS=(standard gradreg lcnn lcnn_gradreg)

for ds in cifar10 cifar100; do
  runs=()
  for v in "${VARIANTS[@]}"; do
    cfg="configs/${ds}_resnet18_${v}.yaml"
    lcnn-zoo train --config "$cfg" --output "$RUNS" --resume auto --threads "$THREADS" --no-progress "${TRAIN_EXTRA[@]}"
    runs+=("$RUNS/${ds}_resnet18_${v}")
  done
  eval_cmd=(lcnn-zoo eval "${runs[@]}" --dataset "$ds" --output "$EVAL/$ds" --threads "$THREADS" --no-progress
            "${EVAL_EXTRA[@]}")
  if [ ! -f "$EVAL/$ds/eval.json" ]; then "${eval_cmd[@]}"; fi
  for v in "${VARIANTS[@]}"; do
    tag="${ARCH[$v]}.${ds}${SUFFIX[$v]}"
    upload=()
    if [ "$UPLOAD" = 1 ]; then upload=(--upload); fi
    lcnn-zoo push "$RUNS/${ds}_resnet18_${v}" --model "$tag" --recipe "configs/${ds}_resnet18_${v}.yaml" \
      --metrics "$EVAL/$ds/eval.json" --metrics-key "${ds}_resnet18_${v}" --eval-command "${eval_cmd[*]}" \
      --output-dir "$HUB/$tag" "${upload[@]}"
  done
done
echo "done: runs in $RUNS, tables in $EVAL, repo folders in $HUB"
