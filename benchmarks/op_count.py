"""Operations dispatched per training step: a deterministic, machine-independent proxy for kernel launches.

    python -m benchmarks.op_count [--variants timm_relu softplus lcnn lcnn_gradreg_fd] [--batch 8] [--top 0] [--json f]

Every ATen (or custom) operation one training step dispatches, counted with a ``TorchDispatchMode``:
forward, loss, LCNN penalty, backward and an SGD step with momentum and ``foreach=True`` (the GPU
default) for every variant; CIFAR ResNet-18, 3×32×32, 100 classes (the variants of
``benchmarks.train_step``). The count does not depend on the batch size or the machine. Views and
``detach`` count too.

A fused centered-softplus op counts as one operation here, but on CUDA it is more than one launch
(the backward's sum of per-block partials, a cast, a layout copy: ``lcnn_zoo.layers._kernels.cuda_launches``).
The column "CUDA path" is the same count with each fused op replaced by the launches its CUDA path
makes for those arguments (computed from sizes, dtypes and layouts: it runs on the CPU too).
"""
from __future__ import annotations

import argparse
import collections
import json
from typing import Counter, Dict

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import lcnn_zoo
from lcnn_zoo.layers import _kernels

from benchmarks.train_step import _model

__all__ = ["count_step", "count_step_ops", "phase_counts"]

VARIANTS = ["timm_relu", "relu", "softplus", "lcnn", "lcnn_gradreg_fd"]


class _Count(TorchDispatchMode):
    """Counts dispatched operations (``ops``) and the same with each fused op counted as the CUDA
    launches of its Triton path (``cuda_path``)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = collections.Counter()
        self.cuda_path = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        self.ops[name] += 1
        self.cuda_path += _kernels.cuda_launches(name, *args) if name.startswith("lcnn_zoo.centered_softplus_") else 1
        return func(*args, **(kwargs or {}))


def _step(variant: str, batch: int, model=None):
    torch.manual_seed(0)
    model = model if model is not None else _model(variant, 100).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, foreach=True)
    x, y = torch.rand(batch, 3, 32, 32), torch.randint(0, 100, (batch,))
    pen = lcnn_zoo.LCNNPenalty() if variant.startswith("lcnn") else None

    def run(phases: Dict[str, _Count] = None):
        def phase(name):
            return phases[name] if phases else _Null()

        opt.zero_grad(set_to_none=True)
        if "_fd" in variant:
            with phase("gradreg_fd (forward + backward, both passes)"):
                lcnn_zoo.gradreg_fd_backward(model, x, y, 6e-3, extra_loss=(lambda: pen(model)) if pen else None)
        else:
            with phase("forward + loss"):
                loss = F.cross_entropy(model(x), y)
            if pen is not None:
                with phase("LCNN penalty"):
                    loss = loss + pen(model)
            with phase("backward"):
                loss.backward()
        with phase("optimizer"):
            opt.step()

    return run


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def count_step(variant: str, batch: int = 8, model=None) -> _Count:
    """The counter of one training step (after two warm-up steps): ``.ops`` by operation name and
    ``.cuda_path``, the total with the fused ops counted as their CUDA launches."""
    run = _step(variant, batch, model)
    run()
    run()
    with _Count() as c:
        run()
    return c


def count_step_ops(variant: str, batch: int = 8, model=None) -> Counter[str]:
    """Operations of one training step (after two warm-up steps), by operation name."""
    return count_step(variant, batch, model).ops


def phase_counts(variant: str, batch: int = 8) -> Dict[str, int]:
    """The same step's operations by phase (forward + loss, penalty, backward, optimizer)."""
    run = _step(variant, batch)
    run()
    run()
    names = ["forward + loss", "LCNN penalty", "backward", "optimizer", "gradreg_fd (forward + backward, both passes)"]
    phases = {n: _Count() for n in names}
    run(phases)
    return {n: sum(p.ops.values()) for n, p in phases.items() if p.ops}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--top", type=int, default=0, help="also print the N most frequent operations per variant")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    res = {}
    for v in args.variants:
        c = count_step(v, args.batch)
        res[v] = {"total": sum(c.ops.values()), "cuda_path": c.cuda_path, "phases": phase_counts(v, args.batch),
                  "top": c.ops.most_common(args.top)}
    ref = res.get("timm_relu", res[args.variants[0]])
    base, base_cuda = ref["total"], ref["cuda_path"]
    print(f"operations per training step (batch {args.batch}, CIFAR ResNet-18, SGD momentum foreach; "
          f"torch {torch.__version__})")
    print("| variant | ops | × timm_relu | CUDA path (fused ops as their launches) | × timm_relu | by phase |\n"
          "|---|---|---|---|---|---|")
    for v, r in res.items():
        phases = ", ".join(f"{k} {n}" for k, n in r["phases"].items())
        print(f"| {v} | {r['total']} | {r['total'] / base:.2f} | {r['cuda_path']} | {r['cuda_path'] / base_cuda:.2f} "
              f"| {phases} |")
    for v, r in res.items():
        if r["top"]:
            print(f"\n{v}: " + ", ".join(f"{k} {n}" for k, n in r["top"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
