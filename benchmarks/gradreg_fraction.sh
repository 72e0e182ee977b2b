#!/usr/bin/env bash
# Finite-difference GradReg on a random fraction of each batch vs the full batch, on the quickstart's
# LCNN + GradReg recipe (real Fashion-MNIST), 3 seeds each: accuracy, curvature and PGD accuracy must
# stay within the run-to-run noise of the full-cost version.
#
#   bash benchmarks/gradreg_fraction.sh [OUT] [FRACTION]    # ~20 min on 2 CPU cores
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/gradreg_fraction}
FRACTION=${2:-0.25}
recipe=(--dataset fmnist --train-subset 6000 --epochs 3 --batch-size 64 --lr 0.05 --sched cosine --aug-pad 2
        --weight-decay 5e-4 --eval-every 1000 --model lcnn_resnet20 --model-kwargs logit_scale=4
        --reg lcnn_gradreg --gradreg fd --lambda-grad 0.01 --lambda-beta 1e-3 --lambda-gamma 1e-3
        --no-progress --output "$OUT" --resume auto)
runs=()
for seed in 0 1 2; do
  for f in 1.0 "$FRACTION"; do
    lcnn-zoo train "${recipe[@]}" --seed "$seed" --gradreg-fraction "$f" --experiment "f${f}_s${seed}"
    runs+=("$OUT/f${f}_s${seed}")
  done
done
[ -f "$OUT/eval/eval.json" ] || lcnn-zoo eval "${runs[@]}" --dataset fmnist --geom-samples 100 --pgd-samples 200 \
  --noise-samples 8 --hvp-iters 10 --output "$OUT/eval" --no-progress > /dev/null
python - "$OUT" "$FRACTION" <<'PY'
import json, statistics, sys
from pathlib import Path
out, frac = Path(sys.argv[1]), sys.argv[2]
res = json.loads((out / "eval" / "eval.json").read_text())["results"]
print(f"| fraction | accuracy (%) | E C(x) | PGD ε=0.2 (%) | epoch time (s) |\n|---|---|---|---|---|")
for f in ("1.0", frac):
    rows = [res[f"f{f}_s{s}"] for s in range(3)]
    times = [statistics.mean(h["train_epoch_time_s"] for h in json.loads((out / f"f{f}_s{s}" / "summary.json").read_text())["history"]) for s in range(3)]
    def ms(vals): return f"{statistics.mean(vals):.4g} ± {statistics.stdev(vals):.2g}"
    print(f"| {f} | {ms([r['accuracy'] for r in rows])} | {ms([r['curvature_mean'] for r in rows])} | "
          f"{ms([r['pgd_l2']['0.2'] for r in rows])} | {ms(times)} |")
PY
