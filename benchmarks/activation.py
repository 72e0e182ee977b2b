"""The CPU forward of the centered softplus (exp/log with Kahan's identities) against the exact
expm1/log1p form, inside whole training steps: timm's ResNet-18 (CIFAR stem), and the zoo's softplus
and LCNN ResNet-18s with each form of the forward, interleaved in one process (batch 64, 100 classes).

    python -m benchmarks.activation [--threads 2] [--rounds 5]
"""
from __future__ import annotations

import argparse

import torch

from benchmarks.timing import interleaved, machine, report
from benchmarks.train_step import make_step
from lcnn_zoo.cli import keep_freed_memory
from lcnn_zoo.layers import activation


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    keep_freed_memory()
    torch.set_num_threads(args.threads)
    forms = {"fast": activation._centered_softplus_t_cpu, "exact": activation._centered_softplus_t}
    steps = {k: make_step(k, 64) for k in ("timm_relu", "softplus", "lcnn")}

    def with_form(variant: str, form: str):
        def step():
            activation._centered_softplus_t_cpu = forms[form]  # what the Function's CPU forward calls
            steps[variant]()
        return step
    variants = {"timm_relu": steps["timm_relu"]}
    variants.update({f"{v}_{f}": with_form(v, f) for v in ("softplus", "lcnn") for f in ("exact", "fast")})
    try:
        res = interleaved(variants, warmup=2, rounds=args.rounds)
    finally:
        activation._centered_softplus_t_cpu = forms["fast"]
    print(report(f"Training step, CIFAR ResNet-18, batch 64, {args.threads} threads, median of {args.rounds} "
                 f"(interleaved), {machine()['cpu']}", res, "timm_relu", {}))


if __name__ == "__main__":
    main()
