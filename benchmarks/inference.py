"""Inference cost: eval forward of the CIFAR ResNet-18 at batch 64 and batch 1 — plain ReLU, the
paper's softplus-β=1e3 model, the LCNN unfolded (eval mode: σ recomputed from the weights at every
call), the same inside ``torch.nn.utils.parametrize.cached()`` (normalised weights computed once per
block) and ``fold(LCNN)``. LCNN machinery is judged against the softplus model (same activation cost).
Each timed call runs several forwards (8 at batch 1, 2 at batch 64), the cached variant all of them in
one ``cached()`` block — how a user evaluating a dataset would use it.

    python -m benchmarks.inference [--threads 2] [--rounds 10] [--json out.json]
"""
from __future__ import annotations

import argparse
import contextlib

import timm
import torch
from torch.nn.utils import parametrize

import lcnn_zoo

from benchmarks.timing import dump, interleaved, machine, report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    models = {
        "relu": timm.create_model("lcnn_resnet18_relu", num_classes=100).eval(),
        "softplus": timm.create_model("lcnn_resnet18_softplus", num_classes=100).eval(),
        "lcnn_unfolded": timm.create_model("lcnn_resnet18", num_classes=100).eval(),
    }
    models["lcnn_folded"] = lcnn_zoo.fold(models["lcnn_unfolded"])
    out = {"machine": machine()}
    for batch in (64, 1):
        x = torch.rand(batch, 3, 32, 32)

        reps = 8 if batch == 1 else 2

        def run(m, cached=False):
            def f():
                with torch.no_grad(), (parametrize.cached() if cached else contextlib.nullcontext()):
                    for _ in range(reps):
                        m(x)
            return f
        variants = {k: run(m) for k, m in models.items()}
        variants["lcnn_unfolded_cached"] = run(models["lcnn_unfolded"], cached=True)
        res = interleaved(variants, rounds=args.rounds)
        base = res["softplus"]["median_s"]
        cols = {"× softplus": {k: f"{v['median_s'] / base:.3f}" for k, v in res.items()}}
        print(report(f"Eval forward, batch {batch}, {args.threads} threads, median of {args.rounds} "
                     f"({out['machine']['cpu']}); each time is {reps} forwards", res, "relu", cols))
        print()
        out[f"batch{batch}"] = res
    if args.json:
        dump(args.json, out)


if __name__ == "__main__":
    main()
