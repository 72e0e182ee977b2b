"""Where a training step's time goes: torch.profiler's per-op table for one variant of the
train_step benchmark (CIFAR ResNet-18, batch 64, 3×32×32, 100 classes).

    python -m benchmarks.profile_step [--variant lcnn] [--threads 2] [--steps 3] [--rows 25] [--out file.txt]
"""
from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.train_step import VARIANTS, make_step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", default="lcnn", choices=VARIANTS)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    step = make_step(args.variant, args.batch)
    step()  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            step()
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows)
    text = (f"torch.profiler, {args.variant} training step, CIFAR ResNet-18, batch {args.batch}, "
            f"{args.threads} threads, {args.steps} steps (self CPU time, sorted)\n\n{table}")
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
