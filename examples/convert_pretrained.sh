#!/usr/bin/env bash
# Converting a trained model: what lcnnify keeps, and whether pretrained weights still help after it.
#
#   bash examples/convert_pretrained.sh [OUT]      # ~3 min on 2 CPU cores; OUT defaults to runs/convert
#
# 1. The shipped standard model (lcnn_resnet20_softplus.fmnist) before and after lcnnify, and after
#    recomputing its BatchNorm statistics, on the first 1,000 Fashion-MNIST test images.
# 2. Fine-tuning on a small folder of new classes (Fashion-MNIST's three footwear classes, 300 training
#    images each), the same LCNN recipe and budget, from (a) that standard model converted by lcnnify,
#    (b) scratch, (c) the shipped LCNN tag. With timm ImageNet weights the same command reads
#    `--model resnet18 --pretrained --lcnnify --input-size 3 224 224` for (a).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/convert}
mkdir -p "$OUT"
[ -d "$OUT/footwear" ] || python examples/fmnist_footwear_folder.py "$OUT/footwear" --per-class 300

python - "$OUT" <<'PY'
import sys, warnings, torch, timm, lcnn_zoo
from lcnn_zoo.commands.data import build_dataset
from lcnn_zoo.layers import recalibrate_batchnorm
torch.manual_seed(0)
test, train = build_dataset("fmnist", train=False), build_dataset("fmnist", train=True)
x, y = test.images[:1000].float() / 255, test.labels[:1000]
acc = lambda m: 100.0 * (m.eval()(x).argmax(1) == y).float().mean().item()
model = timm.create_model("lcnn_resnet20_softplus.fmnist", pretrained=True)
rows = [("lcnn_resnet20_softplus.fmnist, as shipped", acc(model))]
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    lcnn_zoo.lcnnify(model, input_size=(1, 28, 28))
rows.append(("after lcnnify", acc(model)))
g = torch.Generator().manual_seed(0)
idx = torch.randperm(len(train), generator=g)[:50 * 64]
recalibrate_batchnorm(model, (train.images[idx[i:i + 64]].float() / 255 for i in range(0, len(idx), 64)))
rows.append(("after lcnnify + BatchNorm statistics recomputed on 50 training batches", acc(model)))
with torch.no_grad():
    print("| model | accuracy (%), first 1,000 test images |\n|---|---|")
    for name, a in rows:
        print(f"| {name} | {a:.1f} |")
PY

common=(--dataset "folder:$OUT/footwear" --input-size 1 28 28 --epochs 3 --batch-size 64 --lr 0.01 --sched cosine
        --aug-pad 2 --reg lcnn --model-kwargs logit_scale=4 --seed 0 --no-progress --output "$OUT" --resume auto)
lcnn-zoo train --model lcnn_resnet20_softplus.fmnist --pretrained --lcnnify "${common[@]}" --experiment converted
lcnn-zoo train --model lcnn_resnet20 "${common[@]}" --experiment scratch
lcnn-zoo train --model lcnn_resnet20.fmnist --pretrained "${common[@]}" --experiment shipped_lcnn

python - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
print("\n| start (3 epochs, 900 images, 3 classes) | val accuracy (%) |\n|---|---|")
for name, label in (("converted", "lcnn_resnet20_softplus.fmnist → lcnnify"), ("scratch", "random initialisation"),
                    ("shipped_lcnn", "lcnn_resnet20.fmnist (shipped LCNN)")):
    s = json.loads((out / name / "summary.json").read_text())
    print(f"| {label} | {s['final']['top1']:.2f} |")
PY
