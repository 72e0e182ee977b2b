"""Cost of converting at a converged spectral norm: ``lcnnify`` (and a zoo model's construction)
with σ converged to 1e-3, against the 3 power iterations conversion ran before, and how far those
3 iterations left the true operator norms (the largest ratio true / estimate over the layers).

    python -m benchmarks.conversion [--threads 2] [--json out.json]
"""
from __future__ import annotations

import argparse
import importlib
import time
import warnings

import timm
import torch

import lcnn_zoo
from lcnn_zoo.layers import spectral_norm_modules

from benchmarks.timing import dump, machine

# The module, not the `spectral_norm()` function that `lcnn_zoo.layers` exports under the same name.
SN = importlib.import_module("lcnn_zoo.layers.spectral_norm")

CASES = (("CIFAR ResNet-20", "lcnn_resnet20_relu", (3, 32, 32)), ("CIFAR ResNet-18", "lcnn_resnet18_relu", (3, 32, 32)),
         ("ResNet-50", "resnet50", (3, 224, 224)))


def _convert(arch: str, size, init_iterations: int):
    model = timm.create_model(arch, num_classes=10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = time.perf_counter()
        if init_iterations:
            lcnn_zoo.lcnnify(model, input_size=size)
        else:  # the old behaviour: 3 plain power iterations and no convergence test
            saved = SN.LANCZOS_STEPS
            SN.LANCZOS_STEPS = 1
            try:
                lcnn_zoo.lcnnify(model, input_size=size, init_iterations=3)
            finally:
                SN.LANCZOS_STEPS = saved
        return model, time.perf_counter() - t


@torch.no_grad()
def _worst_ratio(model) -> float:
    worst = 1.0
    for m, sn in spectral_norm_modules(model):
        w = m.parametrizations.weight.original
        est = float(sn.sigma(w))
        sn.converge(w, 2000, 1e-6)
        worst = max(worst, float(sn.sigma(w)) / est)
    return worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = {"machine": machine(), "cases": {}}
    print(f"lcnnify cost, {args.threads} threads ({out['machine']['cpu']})\n")
    print("| model | input | 3 iterations: s | worst true/estimate | converged: s | worst true/estimate |")
    print("|---|---|---|---|---|---|")
    for label, arch, size in CASES:
        old, t_old = _convert(arch, size, 0)
        new, t_new = _convert(arch, size, 1)
        r_old, r_new = _worst_ratio(old), _worst_ratio(new)
        out["cases"][label] = {"seconds_3_iterations": t_old, "seconds_converged": t_new,
                               "worst_ratio_3_iterations": r_old, "worst_ratio_converged": r_new}
        print(f"| {label} | {'×'.join(map(str, size))} | {t_old:.2f} | {r_old:.4f} | {t_new:.2f} | {r_new:.5f} |")
    if args.json:
        dump(args.json, out)


if __name__ == "__main__":
    main()
