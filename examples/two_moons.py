"""Figure 1 of the paper: decision boundaries of a standard MLP and an LCNN on two moons.

    python examples/two_moons.py [--output two_moons.png] [--steps 3000]

Both are 2-64-64-2 MLPs trained with Adam on the same 300 noisy points. The standard one uses
softplus β=1e3 (the paper's baseline); the LCNN is the same net after `lcnnify` (spectrally
normalised linear layers, centered softplus with learnable β) trained with the LCNN penalty.
"""
import argparse
import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from lcnn_zoo import CenteredSoftplus, LCNNPenalty, curvature_stats, lcnnify  # noqa: E402


def two_moons(n: int, noise: float, gen: torch.Generator):
    t = torch.rand(n, generator=gen) * math.pi
    upper = torch.rand(n, generator=gen) < 0.5
    x = torch.where(upper[:, None], torch.stack([t.cos(), t.sin()], 1), torch.stack([1 - t.cos(), 0.5 - t.sin()], 1))
    return x + noise * torch.randn(n, 2, generator=gen), (~upper).long()


def mlp(act):
    return nn.Sequential(nn.Linear(2, 64), act(), nn.Linear(64, 64), act(), nn.Linear(64, 2))


def fit(model, x, y, steps, penalty=None):
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        if penalty is not None:
            loss = loss + penalty(model)
        loss.backward()
        opt.step()
    return model.eval()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output", default="two_moons.png")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--lambda-beta", type=float, default=1e-2, help="LCNN penalty weight on Σβ (eq. 5)")
    ap.add_argument("--scale", type=float, default=4.0, help="input spread (standardised data × scale)")
    args = ap.parse_args()
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    x, y = two_moons(300, 0.15, gen)
    # Spectral normalisation makes the LCNN's logits 1-Lipschitz in its input: spread the points out
    # (standardise, then ×args.scale) so that margins of a few units are possible.
    x = (x - x.mean(0)) / x.std(0) * args.scale
    standard = fit(mlp(lambda: CenteredSoftplus(1e3, learnable=False)), x, y, args.steps)
    lcnn = fit(lcnnify(mlp(nn.ReLU), beta_init=5.0), x, y, args.steps, LCNNPenalty(args.lambda_beta, 0.0))
    grid = torch.stack(torch.meshgrid(torch.linspace(-2.5, 2.5, 300) * args.scale,
                                      torch.linspace(-2.5, 2.5, 300) * args.scale,
                                      indexing="xy"), -1).reshape(-1, 2)
    fig, axes = plt.subplots(1, 2, figsize=(9, 4.2))
    for ax, (name, model) in zip(axes, [("standard (softplus β=1e3)", standard), ("LCNN", lcnn)]):
        with torch.no_grad():
            p = model(grid).softmax(1)[:, 1].reshape(300, 300)
            acc = (model(x).argmax(1) == y).float().mean().item() * 100
        curv = curvature_stats(model, x, y, n_iter=2).curvature.mean().item()  # 2-D input: Lanczos is exact
        ax.contourf(grid[:, 0].reshape(300, 300), grid[:, 1].reshape(300, 300), p, levels=20, cmap="RdBu", alpha=0.8)
        ax.contour(grid[:, 0].reshape(300, 300), grid[:, 1].reshape(300, 300), p, levels=[0.5], colors="k")
        ax.scatter(x[:, 0], x[:, 1], c=y, cmap="RdBu", edgecolors="k", s=12)
        ax.set_title(f"{name}\ntrain acc {acc:.0f}%, mean curvature {curv:.3g}")
        ax.set_xticks([]), ax.set_yticks([])
        print(f"{name}: train accuracy {acc:.1f}%, mean normalised curvature {curv:.4g}")
    fig.tight_layout()
    fig.savefig(args.output, dpi=110)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
