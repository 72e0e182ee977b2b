"""Hessian-vector products for curvature measurement: double backward on a kept graph vs torch.func
forward-over-reverse (jvp of grad), side by side in one process, on an LCNN ResNet-18 (32×32).

    python -m benchmarks.hvp_methods [--batch 16] [--products 10] [--repeats 3]

Prints the median time of each method and the ratio forward-over-reverse / double-backward.
"""
import argparse
import json
import statistics
import time

import timm
import torch
import torch.nn.functional as F
from torch.func import grad, jvp

from lcnn_zoo import lcnnify


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--products", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = lcnnify(timm.create_model("resnet18", num_classes=10), input_size=(3, 32, 32)).eval()
    x = torch.rand(args.batch, 3, 32, 32)
    y = torch.randint(0, 10, (args.batch,))
    v = torch.randn_like(x)

    def loss(z):
        return F.cross_entropy(model(z), y, reduction="sum")

    def double_backward():
        xx = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(loss(xx), xx, create_graph=True)
        for _ in range(args.products):
            (hv,) = torch.autograd.grad(g, xx, v, retain_graph=True)
        return hv

    def forward_over_reverse():
        for _ in range(args.products):
            _, hv = jvp(grad(loss), (x,), (v,))
        return hv

    a, b = double_backward(), forward_over_reverse()
    agree = float((a - b).norm() / a.norm())
    times = {"double_backward": [], "forward_over_reverse": []}
    for _ in range(args.repeats):  # interleaved: A B A B ...
        for name, fn in (("double_backward", double_backward), ("forward_over_reverse", forward_over_reverse)):
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {"batch": args.batch, "products": args.products, "threads": args.threads, "median_s": med,
              "ratio_for_over_db": med["forward_over_reverse"] / med["double_backward"], "rel_diff": agree}
    print(f"{'method':<24}{'median s':>10}")
    for k, t in med.items():
        print(f"{k:<24}{t:>10.3f}")
    print(f"forward-over-reverse / double-backward: {result['ratio_for_over_db']:.2f}x  (HVPs agree to {agree:.1e})")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
