"""ℓ2 projected gradient descent (Madry et al.) for off-the-shelf robustness (paper §5.3, Table 2).

A small, tested implementation rather than a library: torchattacks 3.5.1 (the maintained
candidate) pins ``requests~=2.25.1`` and downgrades requests for the whole environment, breaking
other packages. The attack here is the standard one the paper uses through CleverHans: normalised
gradient-ascent steps on the cross-entropy, projection onto the ℓ2 ball of radius ε, and clipping
to the valid image box [0, 1]. It is checked against a linear model, where the optimal ℓ2 attack
is analytic (tests/test_robustness.py).
"""
from __future__ import annotations

from typing import Callable, Dict, Iterable, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .layers import eval_mode

__all__ = ["pgd_l2", "pgd_accuracy"]


def _per_sample_norm(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).norm(dim=1).reshape(-1, *([1] * (t.dim() - 1)))


def pgd_l2(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, *, steps: int = 10,
           step_size: Optional[float] = None, random_start: bool = False,
           clamp: Optional[Tuple[float, float]] = (0.0, 1.0),
           loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
           generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Return adversarial inputs x' with ‖x' − x‖₂ ≤ ``eps`` per sample (and x' in ``clamp``).

    Args:
        model: classifier, used as is (call ``model.eval()`` first for deterministic BN/dropout).
        x: (B, ...) clean inputs; y: (B,) labels.
        eps: ℓ2 radius in input units (pixels in [0, 1] for the zoo's models).
        steps: gradient steps; step_size: default 2.5·eps/steps (Madry et al.).
        random_start: start from a uniformly random point of the ball.
        clamp: valid input box, or None for an unconstrained attack.
    """
    if eps < 0:
        raise ValueError(f"pgd_l2: eps must be >= 0, got {eps}")
    if eps == 0 or steps <= 0:
        return x.detach().clone()
    alpha = 2.5 * eps / steps if step_size is None else step_size
    x = x.detach()
    delta = torch.zeros_like(x)
    if random_start:
        d = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
        r = torch.rand(x.shape[0], generator=generator, dtype=x.dtype).to(x.device) ** (1.0 / x[0].numel())
        delta = d / _per_sample_norm(d) * r.reshape(-1, *([1] * (x.dim() - 1))) * eps
    for _ in range(steps):
        delta.requires_grad_(True)
        with torch.enable_grad():
            loss = loss_fn(model(x + delta), y)
            (g,) = torch.autograd.grad(loss, delta)
        with torch.no_grad():
            delta = delta + alpha * g / _per_sample_norm(g).clamp_min(1e-12)
            delta = delta * (eps / _per_sample_norm(delta).clamp_min(1e-12)).clamp(max=1.0)
            if clamp is not None:
                delta = (x + delta).clamp(*clamp) - x
    return (x + delta).detach()


def pgd_accuracy(model: nn.Module, batches: Iterable[Tuple[torch.Tensor, torch.Tensor]], eps_list: Sequence[float],
                 *, steps: int = 10, device: Optional[torch.device] = None, progress: bool = False,
                 **kwargs) -> Dict[float, float]:
    """Accuracy (%) under ℓ2-PGD at each radius in ``eps_list`` (0 gives clean accuracy).

    The radii are attacked in increasing order, each only on the samples still classified correctly:
    an input misclassified clean, or fooled within a smaller radius, is fooled within every larger one
    (the smaller ball lies inside the larger), so it counts as an error there without a new attack —
    as RobustBench counts. This never reports a higher accuracy than independent attacks would, and the
    accuracies are non-increasing in ε by construction; the attacks cost only what the survivors need.
    The model is evaluated in eval mode (restored afterwards). Returns {eps: accuracy}.
    """
    radii = sorted({float(e) for e in eps_list})
    if radii and radii[0] < 0:
        raise ValueError(f"pgd_accuracy: radii must be >= 0, got {radii[0]}")
    correct = {e: 0 for e in radii}
    total = 0
    with eval_mode(model):
        for x, y in tqdm(batches, desc="PGD-ℓ2", leave=False, disable=not progress):
            if device is not None:
                x, y = x.to(device), y.to(device)
            total += y.numel()
            with torch.no_grad():
                alive = model(x).argmax(1) == y  # (B,) still correct at the radii attacked so far
            for e in radii:
                idx = alive.nonzero().flatten()
                if e > 0 and idx.numel():
                    adv = pgd_l2(model, x[idx], y[idx], e, steps=steps, **kwargs)
                    with torch.no_grad():
                        alive[idx] = model(adv).argmax(1) == y[idx]
                correct[e] += int(alive.sum())
    return {e: 100.0 * correct[float(e)] / max(total, 1) for e in eps_list}
