"""Training-step cost of the LCNN machinery: CIFAR ResNet-18, batch 64, 3×32×32, 100 classes.

    python -m benchmarks.train_step [--threads 2] [--rounds 10] [--batch 64] [--json out.json]

Variants (forward + loss + backward + SGD step), interleaved in one process, medians, as ratios
to the plain ReLU model; peak memory measured per variant in a fresh subprocess (VmHWM above the RSS before the steps).
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys

import timm
import torch
import torch.nn.functional as F

import lcnn_zoo
from benchmarks.timing import dump, interleaved, machine, report

VARIANTS = ["relu", "softplus", "lcnn", "gradreg_exact", "gradreg_fd", "lcnn_gradreg_exact", "lcnn_gradreg_fd"]


def make_step(variant: str, batch: int, classes: int = 100):
    arch = {"relu": "lcnn_resnet18_relu", "softplus": "lcnn_resnet18_softplus"}.get(
        variant, "lcnn_resnet18" if variant.startswith("lcnn") else "lcnn_resnet18_softplus")
    torch.manual_seed(0)
    model = timm.create_model(arch, num_classes=classes).train()
    opt = torch.optim.SGD(lcnn_zoo.param_groups(model, 5e-4), lr=0.01, momentum=0.9)
    x = torch.rand(batch, 3, 32, 32)
    y = torch.randint(0, classes, (batch,))
    pen = lcnn_zoo.LCNNPenalty() if variant.startswith("lcnn") else None
    lam = 6e-3

    def step():
        opt.zero_grad(set_to_none=True)
        if variant.endswith("_fd"):
            lcnn_zoo.gradreg_fd_backward(model, x, y, lam, extra_loss=(lambda: pen(model)) if pen else None)
        else:
            if variant.endswith("_exact"):
                out = lcnn_zoo.gradreg_exact(model, x, y)
                total = out.loss + lam * out.penalty
            else:
                total = F.cross_entropy(model(x), y)
            if pen is not None:
                total = total + pen(model)
            total.backward()
        opt.step()

    return step


def _vm_kib(field: str) -> int:
    """A /proc/self/status field in KiB (Linux)."""
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_memory_mb(variant: str, batch: int, threads: int, repeats: int = 3) -> float:
    """Peak resident memory of two training steps of ``variant`` above the resident memory before them,
    in a fresh interpreter (MiB).

    The peak is VmHWM, the high-water mark of the new process's own address space. (``ru_maxrss``
    would not do: Linux carries it over from the parent through fork + exec, so a child of a large
    parent never reports growth.)
    """
    code = (f"import torch; torch.set_num_threads({threads});"
            f"from benchmarks.train_step import make_step, _vm_kib; s = make_step({variant!r}, {batch});"
            "import gc; gc.collect(); r0 = _vm_kib('VmRSS'); s(); s(); print((_vm_kib('VmHWM') - r0) / 1024)")
    runs = []
    for _ in range(repeats):  # the allocator makes single readings vary by ~15 %: median of fresh processes
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        runs.append(float(out.stdout.strip().splitlines()[-1]))
    return statistics.median(runs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS)
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    steps = {v: make_step(v, args.batch) for v in args.variants}
    res = interleaved(steps, warmup=args.warmup, rounds=args.rounds)
    mem = {} if args.no_memory else {v: peak_memory_mb(v, args.batch, args.threads) for v in args.variants}
    base_mem = mem.get("relu")
    cols = {}
    if mem:
        cols["peak MiB"] = {k: f"{v:.0f}" for k, v in mem.items()}
        if base_mem:
            cols["× relu mem"] = {k: f"{v / base_mem:.2f}" for k, v in mem.items()}
    print(report(f"Training step, CIFAR ResNet-18, batch {args.batch}, {args.threads} threads, "
                 f"median of {args.rounds} (interleaved)", res, "relu" if "relu" in res else args.variants[0], cols))
    if args.json:
        dump(args.json, {"machine": machine(), "args": vars(args), "time": res, "peak_memory_mib": mem})


if __name__ == "__main__":
    main()
