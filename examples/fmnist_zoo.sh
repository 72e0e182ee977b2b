#!/usr/bin/env bash
# Train, measure and ship the four Fashion-MNIST ResNet-20 tags (the weights in lcnn_zoo/weights/).
#
#   bash examples/fmnist_zoo.sh            # ~45 min on 2 CPU cores; safe to re-run: every step resumes
#
# 1. trains each tag from its committed config (configs/fmnist_resnet20_*.yaml), resuming if stopped;
# 2. writes each Hub repo folder (hub/<model>.<tag>/) and ships the weights in the package (--bundle);
# 3. measures the *shipped* tags by name, the command a user can re-run after `pip install`:
#    its eval.md / eval.json / gradient_robustness.png go to a new folder, $EVAL (default: a new
#    runs/fmnist_zoo_eval.* folder; eval never writes over an earlier one — copy it to docs/fmnist_zoo/);
# 4. rewrites the repo folders and the manifest with those measured metrics.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-runs}
THREADS=${THREADS:-2}

declare -A TAGS=(
  [standard]=lcnn_resnet20_softplus.fmnist
  [gradreg]=lcnn_resnet20_softplus.fmnist_gradreg
  [lcnn]=lcnn_resnet20.fmnist
  [lcnn_gradreg]=lcnn_resnet20.fmnist_gradreg
)
ORDER=(standard gradreg lcnn lcnn_gradreg)

for v in "${ORDER[@]}"; do
  lcnn-zoo train --config "configs/fmnist_resnet20_$v.yaml" --output "$RUNS" --resume auto \
    --threads "$THREADS" --no-progress
done

mkdir -p "$RUNS"
EVAL=${EVAL:-$(mktemp -d "$RUNS/fmnist_zoo_eval.XXXXXX")}  # new and empty: eval writes into it
EVAL_CMD="lcnn-zoo eval ${TAGS[standard]} ${TAGS[gradreg]} ${TAGS[lcnn]} ${TAGS[lcnn_gradreg]} --dataset fmnist --output $EVAL"

push() {  # push <variant> [extra args]: repo folder + bundled weights
  local v=$1; shift
  lcnn-zoo push "$RUNS/fmnist_resnet20_$v/model.safetensors" --model "${TAGS[$v]}" \
    --recipe "configs/fmnist_resnet20_$v.yaml" --output-dir "hub/${TAGS[$v]}" --bundle --replace-shipped "$@"
}

for v in "${ORDER[@]}"; do push "$v"; done
$EVAL_CMD --threads "$THREADS" --no-progress
for v in "${ORDER[@]}"; do
  push "$v" --metrics "$EVAL/eval.json" --eval-command "$EVAL_CMD"
done
