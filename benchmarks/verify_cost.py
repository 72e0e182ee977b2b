"""The self-check's cost beside the conversion's, side by side in one process: `lcnnify` then
`verify_bounds` (10 power iterations, one random input) on a few timm families at 3×32×32.

    python -m benchmarks.verify_cost [--models regnetx_002 mobilenetv2_050 resnet18]

Prints, per model, both times and their ratio, and whether every check held."""
from __future__ import annotations

import argparse
import platform
import time
import warnings

import timm
import torch

import lcnn_zoo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["regnetx_002", "mobilenetv2_050", "resnet18"])
    parser.add_argument("--size", type=int, default=32)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, timm {timm.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads")
    lcnn_zoo.lcnnify(timm.create_model("resnet10t", num_classes=4), input_size=(3, 16, 16))  # warm-up: kernels
    for name in args.models:
        torch.manual_seed(0)
        model = timm.create_model(name, num_classes=10)
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            lcnn_zoo.lcnnify(model, input_size=(3, args.size, args.size), gates="remove")
        t1 = time.perf_counter()
        checks = lcnn_zoo.verify_bounds(model, iterations=10, points=1)
        t2 = time.perf_counter()
        print(f"{name:20s} lcnnify {t1 - t0:6.1f} s  verify_bounds {t2 - t1:6.1f} s  "
              f"ratio {(t2 - t1) / (t1 - t0):4.2f}  "
              f"{len(checks)} maps, all ok: {all(c.ok for c in checks)}")


if __name__ == "__main__":
    main()
