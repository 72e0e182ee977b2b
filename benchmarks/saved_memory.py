"""Memory autograd keeps for the backward of one training step, side by side (issue 30, target 4).

    python -m benchmarks.saved_memory [--variants timm_relu softplus lcnn] [--batch 64]

The forward, loss and (for the LCNN) penalty of one training step of each variant of
``benchmarks.train_step`` (CIFAR ResNet-18, 3×32×32, 100 classes), run under
``torch.autograd.graph.saved_tensors_hooks``: every tensor saved for backward is recorded by its
storage, each storage counted once. "kept" is the sum; "of it, parameters" is the part that is
the model's own parameters (alive anyway, whatever autograd keeps); "extra" is the rest, what
the backward costs in memory. The counts are bytes, deterministic for a given torch version:
they do not depend on the machine. The LCNN's layers hand this probe every saved tensor but their W/σ,
which they keep as W and σ and recompute in the backward (``lcnn_zoo.layers.preforward``); that no
W/σ outlives the forward is tested by weak references in ``tests/test_preforward.py``.
"""
from __future__ import annotations

import argparse
from typing import Dict

import torch
import torch.nn.functional as F

import lcnn_zoo

from benchmarks.train_step import _model

__all__ = ["saved_bytes"]

MIB = 2 ** 20


def saved_bytes(variant: str, batch: int = 64, classes: int = 100) -> Dict[str, int]:
    """Bytes of the distinct storages one training forward (+ loss, + LCNN penalty) saves for backward.

    Args:
        variant: a variant of ``benchmarks.train_step`` (``timm_relu``, ``relu``, ``softplus``, ``lcnn``).
        batch: the batch size (inputs 3×32×32).
        classes: the classifier's outputs.

    Returns:
        ``{"kept": bytes, "parameters": bytes of it that are parameters' storages, "extra": the rest}``.
    """
    torch.manual_seed(0)
    model = _model(variant, classes).train()
    x, y = torch.rand(batch, 3, 32, 32), torch.randint(0, classes, (batch,))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: Dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = F.cross_entropy(model(x), y)
        if variant.startswith("lcnn"):
            loss = loss + lcnn_zoo.LCNNPenalty()(model)
    loss.backward()  # the graph was whole: what it saved is what a step keeps
    kept = sum(storages.values())
    of_params = sum(n for ptr, n in storages.items() if ptr in params)
    return {"kept": kept, "parameters": of_params, "extra": kept - of_params}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", nargs="+", default=["timm_relu", "softplus", "lcnn"])
    ap.add_argument("--batch", type=int, default=64)
    args = ap.parse_args()
    rows = {v: saved_bytes(v, args.batch) for v in args.variants}
    base = rows[args.variants[0]]
    print(f"memory autograd keeps for backward, one training step, batch {args.batch}, 3x32x32, 100 classes "
          f"(torch {torch.__version__}); ratios to {args.variants[0]}")
    print("| variant | kept MiB | of it, parameters MiB | extra MiB | kept ratio | extra ratio |")
    print("|---|---|---|---|---|---|")
    for v, r in rows.items():
        print(f"| {v} | {r['kept'] / MIB:.1f} | {r['parameters'] / MIB:.1f} | {r['extra'] / MIB:.1f} | "
              f"{r['kept'] / base['kept']:.2f} | {r['extra'] / base['extra']:.2f} |")


if __name__ == "__main__":
    main()
