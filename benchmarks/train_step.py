"""Training-step cost of the LCNN machinery: CIFAR ResNet-18, batch 64, 3×32×32, 100 classes.

    python -m benchmarks.train_step [--threads 2] [--rounds 10] [--batch 64] [--compile] [--json out.json]

Variants (forward + loss + backward + SGD step), interleaved in one process (glibc malloc set as the
``lcnn-zoo`` command sets it: :func:`lcnn_zoo.commands.cli.keep_freed_memory`), medians, as ratios to
timm's own resnet18 with the CIFAR stem (``timm_relu``: the fastest plain net a user would otherwise
train) and to the zoo's ReLU net; peak memory measured per variant in a fresh subprocess (VmHWM above
the RSS before the steps). ``lcnn_gradreg_fd_f25`` is FD GradReg on a quarter of each batch.
``--compile``: every variant through ``torch.compile`` (the same mode for all), with compile times: the
first compiled step's time less a later step's, after inductor's own start-up (a tiny function compiled
first) and one eager step of the variant (its lazy initialisation and the activation's CPU kernels, which
eager training compiles too). Run with ``TORCHINDUCTOR_FORCE_DISABLE_CACHES=1`` for cold compiles
(otherwise inductor's disk caches may serve graphs an earlier run compiled).
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

import timm
import torch
import torch.nn.functional as F

import lcnn_zoo
from lcnn_zoo.commands.cli import keep_freed_memory

from benchmarks.timing import dump, interleaved, machine, report

VARIANTS = ["timm_relu", "relu", "softplus", "lcnn", "gradreg_exact", "gradreg_fd", "lcnn_gradreg_exact",
            "lcnn_gradreg_fd", "lcnn_gradreg_fd_f25"]


def _model(variant: str, classes: int) -> torch.nn.Module:
    if variant == "timm_relu":
        model = timm.create_model("resnet18", num_classes=classes)
        model.conv1 = torch.nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)  # the CIFAR stem
        model.maxpool = torch.nn.Identity()
        return model
    arch = {"relu": "lcnn_resnet18_relu", "softplus": "lcnn_resnet18_softplus"}.get(
        variant, "lcnn_resnet18" if variant.startswith("lcnn") else "lcnn_resnet18_softplus")
    return timm.create_model(arch, num_classes=classes)


def make_step(variant: str, batch: int, classes: int = 100, compile_: bool = False):
    torch.manual_seed(0)
    model = _model(variant, classes).train()
    module = model
    if compile_:
        model = torch.compile(model)
    opt = torch.optim.SGD(lcnn_zoo.param_groups(module, 5e-4), lr=0.01, momentum=0.9)
    x = torch.rand(batch, 3, 32, 32)
    y = torch.randint(0, classes, (batch,))
    pen = lcnn_zoo.LCNNPenalty() if variant.startswith("lcnn") else None
    lam = 6e-3
    fraction = 0.25 if variant.endswith("_f25") else 1.0

    def step():
        opt.zero_grad(set_to_none=True)
        if "_fd" in variant:
            lcnn_zoo.gradreg_fd_backward(model, x, y, lam, extra_loss=(lambda: pen(module)) if pen else None,
                                         fraction=fraction, generator=torch.Generator().manual_seed(0))
        else:
            if variant.endswith("_exact"):
                out = lcnn_zoo.gradreg_exact(model, x, y)
                total = out.loss + lam * out.penalty
            else:
                total = F.cross_entropy(model(x), y)
            if pen is not None:
                total = total + pen(module)
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
            "from lcnn_zoo.commands.cli import keep_freed_memory; keep_freed_memory();"
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
    ap.add_argument("--compile", action="store_true", help="torch.compile every variant")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    keep_freed_memory()  # as the lcnn-zoo command does: freed memory stays in the heap
    torch.set_num_threads(args.threads)
    steps, compile_s = {}, {}
    if args.compile:  # inductor's start-up, paid once per process, is no variant's
        torch.compile(lambda t: (t * 2.0).sum())(torch.rand(8))
    for v in args.variants:
        if args.compile:
            make_step(v, args.batch)()  # (lazy initialisation and eager kernels: not compile work)
        steps[v] = make_step(v, args.batch, compile_=args.compile)
        if args.compile:  # the first call compiles: its time less a second call's
            t = time.perf_counter()
            steps[v]()
            first = time.perf_counter() - t
            t = time.perf_counter()
            steps[v]()
            compile_s[v] = first - (time.perf_counter() - t)
    res = interleaved(steps, warmup=args.warmup, rounds=args.rounds)
    mem = {} if args.no_memory or args.compile else {v: peak_memory_mb(v, args.batch, args.threads)
                                                     for v in args.variants}
    base_mem = mem.get("timm_relu")
    zoo = res.get("relu", res[args.variants[0]])["median_s"]
    cols = {"× zoo relu": {k: f"{r['median_s'] / zoo:.2f}" for k, r in res.items()}}
    if mem:
        cols["peak MiB"] = {k: f"{v:.0f}" for k, v in mem.items()}
        if base_mem:
            cols["× timm mem"] = {k: f"{v / base_mem:.2f}" for k, v in mem.items()}
    if compile_s:
        cols["compile s"] = {k: f"{v:.1f}" for k, v in compile_s.items()}
        cols["× timm compile"] = {k: f"{v / compile_s.get('timm_relu', v):.2f}" for k, v in compile_s.items()}
    mode = "compiled" if args.compile else "eager"
    print(report(f"Training step ({mode}), CIFAR ResNet-18, batch {args.batch}, {args.threads} threads, median of "
                 f"{args.rounds} (interleaved), {machine()['cpu']}", res,
                 "timm_relu" if "timm_relu" in res else args.variants[0], cols))
    if args.json:
        dump(args.json, {"machine": machine(), "args": vars(args), "time": res, "peak_memory_mib": mem,
                         "compile_s": compile_s})


if __name__ == "__main__":
    main()
