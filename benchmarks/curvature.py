"""Curvature measurement cost and accuracy on a CIFAR ResNet-18 (or a shipped trained model): our batched Lanczos vs a
straightforward implementation of the reference algorithm (power iteration with double backward on
a kept graph, 10 iterations). Accuracy is judged against a long Lanczos run (40 steps), itself
checked against a long power iteration (--check-iters, default 100).

    python -m benchmarks.curvature [--threads 2] [--batch 8] [--json out.json]
"""
from __future__ import annotations

import argparse
import time

import timm
import torch
import torch.nn.functional as F

from lcnn_zoo import curvature_stats

from benchmarks.timing import dump, machine


def reference_power(model, x, y, n_iter=10):
    """The reference code's estimator: power iteration on Hessian-vector products, 1e-6 stabiliser."""
    x = x.clone().requires_grad_(True)
    loss = F.cross_entropy(model(x), y, reduction="none").sum()
    (g,) = torch.autograd.grad(loss, x, create_graph=True)
    u = torch.randn_like(x)
    u = u / u.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    for _ in range(n_iter):
        (hv,) = torch.autograd.grad((g * u).sum(), x, retain_graph=True)
        u = hv / (hv.flatten(1).norm(dim=1).view(-1, 1, 1, 1) + 1e-6)
    (hv,) = torch.autograd.grad((g * u).sum(), x)
    hess = (hv * u).flatten(1).sum(1).abs()
    return hess / (g.flatten(1).norm(dim=1) + 1e-6)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--model", default="lcnn_resnet18_softplus",
                    help="registry name; with a pretrained tag (e.g. lcnn_resnet20.fmnist_gradreg) the shipped "
                         "weights and real test images of its dataset are used")
    ap.add_argument("--check-iters", type=int, default=100, help="power iterations of the ground-truth check")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    # An *untrained* LCNN is no test case: its input gradients are ~1e-8 (its output hardly depends on
    # the input yet), below the 1e-6 stabilisers of the curvature formula. Default: the untrained
    # softplus ResNet-18 (same architecture and cost, ordinary gradient scale); or a trained model.
    if "." in args.model:
        from lcnn_zoo.commands.data import build_dataset
        from lcnn_zoo.hub import tag_dataset

        model = timm.create_model(args.model, pretrained=True).eval()
        ds = build_dataset(tag_dataset(args.model), train=False)
        x, y = ds.images[:args.batch].float() / 255.0, ds.labels[:args.batch]
    else:
        model = timm.create_model(args.model, num_classes=10).eval()
        x, y = torch.rand(args.batch, 3, 32, 32), torch.randint(0, 10, (args.batch,))
    truth = curvature_stats(model, x, y, n_iter=40, generator=torch.Generator().manual_seed(1)).curvature
    # Independent check of the ground truth: a long power iteration (another algorithm, another start).
    long_power = curvature_stats(model, x, y, n_iter=args.check_iters, method="power",
                                 generator=torch.Generator().manual_seed(2)).curvature
    truth_check = ((long_power - truth).abs() / truth).max().item()
    rows = {}
    methods = {f"reference power x{k}": (lambda k=k: reference_power(model, x, y, k)) for k in (10, 20, 40)}
    methods.update({f"ours lanczos x{k}": (lambda k=k: curvature_stats(model, x, y, n_iter=k).curvature)
                    for k in (5, 8, 10, 15, 20)})
    for name, fn in methods.items():
        fn()  # warm-up
        t = time.perf_counter()
        c = fn()
        dt = time.perf_counter() - t
        err = (c - truth).abs() / truth
        rows[name] = {"s_per_image": dt / args.batch, "max_rel_error": err.max().item(),
                      "mean_rel_error": err.mean().item()}
    ref = rows["reference power x10"]["s_per_image"]
    print(f"Normalised curvature, {args.model}, batch {args.batch}, {args.threads} threads "
          f"(error vs 40-step Lanczos, which agrees with a {args.check_iters}-step power iteration "
          f"to {truth_check:.2%})\n")
    print("| method | s / image | × reference x10 | max relative error | mean relative error |\n|---|---|---|---|---|")
    for k, r in rows.items():
        print(f"| {k} | {r['s_per_image']:.3f} | {r['s_per_image'] / ref:.2f} | {r['max_rel_error']:.2%} | "
              f"{r['mean_rel_error']:.2%} |")
    if args.json:
        dump(args.json, {"machine": machine(), "rows": rows, "truth_vs_long_power": truth_check})


if __name__ == "__main__":
    main()
