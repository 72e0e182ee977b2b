"""Input-space geometry of the loss (paper §3.1, §5.2, §5.4).

For a classifier f and per-sample loss ℓᵢ(x) = ℓ(f(x), yᵢ):

* gradient norm ‖∇ₓℓᵢ‖₂,
* Hessian spectral norm ‖∇²ₓℓᵢ‖₂ (largest |eigenvalue| of the symmetric input Hessian),
* normalised curvature C = ‖∇²ₓℓᵢ‖₂ / (‖∇ₓℓᵢ‖₂ + ε).

Hessian-vector products use double backward on a graph built once: the input gradient is
computed with ``create_graph=True`` and every product is one extra backward through it. We prefer
it to torch.func's forward-over-reverse (``jvp(grad(f))``), which re-runs the whole forward and
backward for each product; double backward pays the forward once and each iteration costs a
single backward of the gradient graph. Samples are processed as one batch: in eval mode the
Hessian of Σᵢℓᵢ is block-diagonal, so one product with a batch of vectors gives every Hᵢvᵢ.

The spectral norm is estimated with batched Lanczos (full re-orthogonalisation; the extreme Ritz
values converge much faster than the power method's estimate), or with the power method the
reference code uses (``method="power"``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Literal, Optional, Sequence, Tuple, Union, overload

import torch
import torch.nn.functional as F
from torch import nn

from .layers import eval_mode
from .linalg import lanczos, power_method

__all__ = ["CurvatureStats", "curvature_stats", "gradient_robustness", "relative_discrepancy"]

SumLossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _ce_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, targets, reduction="sum")


@dataclass
class CurvatureStats:
    """Per-sample input-space geometry of the loss, as :func:`curvature_stats` returns it.

    Attributes:
        grad_norm: ‖∇ₓℓᵢ‖₂, shape (B,).
        hessian_norm: ‖∇²ₓℓᵢ‖₂ (an estimate from below: Lanczos or power iterations), shape (B,).
        curvature: C = hessian_norm / (grad_norm + ε), shape (B,).
    """

    grad_norm: torch.Tensor
    hessian_norm: torch.Tensor
    curvature: torch.Tensor

    def summary(self) -> Dict[str, float]:
        """Mean and standard deviation of each measure (floats)."""
        out = {}
        for k in ("grad_norm", "hessian_norm", "curvature"):
            v = getattr(self, k).double()
            out[f"{k}_mean"] = float(v.mean())
            out[f"{k}_std"] = float(v.std()) if v.numel() > 1 else 0.0
        return out


@overload
def _input_grad(model: nn.Module, x: torch.Tensor, targets: torch.Tensor, loss_fn: SumLossFn,
                create_graph: Literal[True]) -> Tuple[torch.Tensor, torch.Tensor]: ...


@overload
def _input_grad(model: nn.Module, x: torch.Tensor, targets: torch.Tensor, loss_fn: SumLossFn,
                create_graph: Literal[False]) -> torch.Tensor: ...


def _input_grad(model: nn.Module, x: torch.Tensor, targets: torch.Tensor, loss_fn: SumLossFn,
                create_graph: bool) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """The input gradient of the summed loss at ``x``; with ``create_graph`` (x, gradient), x the leaf
    the gradient's graph starts from."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = loss_fn(model(x), targets)
        (g,) = torch.autograd.grad(loss, x, create_graph=create_graph)
    return (x, g) if create_graph else g


def curvature_stats(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, n_iter: int = 10, *,
                    method: str = "lanczos", loss_fn: SumLossFn = _ce_sum, eps: float = 1e-6,
                    generator: Optional[torch.Generator] = None) -> CurvatureStats:
    """Per-sample ‖∇ₓℓ‖₂, ‖∇²ₓℓ‖₂ and normalised curvature C = ‖∇²ₓℓ‖₂ / (‖∇ₓℓ‖₂ + eps).

    Args:
        model: classifier; evaluated in eval mode (restored afterwards), so samples are independent.
        inputs: (B, ...) inputs, in the units the model consumes (pixel units in [0, 1] for the
            zoo's models).
        targets: (B,) class indices (or whatever ``loss_fn`` takes).
        n_iter: Hessian-vector products per sample (Lanczos steps or power iterations).
        method: "lanczos" (default) or "power" (the reference code's estimator).
        loss_fn: *summed* per-sample loss, ``(logits, targets) -> 0-dim``; default cross-entropy.
        eps: the ε of the curvature definition (1e-6 as in the reference code).
        generator: for the random start vectors (reproducibility).

    Returns:
        :class:`CurvatureStats` with three (B,) tensors (detached).

    Raises:
        ValueError: ``method`` is unknown, or ``inputs`` and ``targets`` differ in batch size.
    """
    if method not in ("lanczos", "power"):
        raise ValueError(f"curvature_stats: method must be 'lanczos' or 'power', got {method!r}")
    if inputs.shape[0] != targets.shape[0]:
        raise ValueError(f"curvature_stats: {inputs.shape[0]} inputs but {targets.shape[0]} targets")
    b = inputs.shape[0]
    d = inputs[0].numel()
    with eval_mode(model), torch.enable_grad():
        x, g = _input_grad(model, inputs, targets, loss_fn, create_graph=True)
        grad_norm = g.detach().flatten(1).norm(dim=1)

        def hvp(v: torch.Tensor) -> torch.Tensor:
            (hv,) = torch.autograd.grad(g, x, grad_outputs=v.reshape(x.shape), retain_graph=True)
            return hv.detach().reshape(b, d)

        q0 = torch.randn(b, d, generator=generator, dtype=g.dtype).to(g.device)
        if method == "lanczos":
            hess, _ = lanczos(hvp, q0, n_iter, generator)
        else:
            hess = power_method(hvp, q0, n_iter)
    return CurvatureStats(grad_norm, hess, hess / (grad_norm + eps))


@torch.no_grad()
def _random_directions(shape: Sequence[int], like: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    e = torch.randn(*shape, generator=generator, dtype=like.dtype).to(like.device)
    return e / e.flatten(1).norm(dim=1).reshape(-1, *([1] * (e.dim() - 1)))


def gradient_robustness(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
                        noise_norms: Sequence[float] = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1), *,
                        loss_fn: SumLossFn = _ce_sum, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Relative gradient change ‖∇ℓ(x+ε) − ∇ℓ(x)‖ / ‖∇ℓ(x)‖ under random ε with ‖ε‖₂ = each norm (§5.2).

    Proposition 1 predicts ≈ ‖ε‖·C(x) for small ε. The model runs in eval mode (restored afterwards).

    Args:
        model: classifier.
        inputs: (B, ...) inputs, in the units the model consumes.
        targets: (B,) class indices (or whatever ``loss_fn`` takes).
        noise_norms: the ‖ε‖₂ of the perturbations, per sample, in input units; one random direction
            per sample and norm.
        loss_fn: *summed* per-sample loss, ``(logits, targets) -> 0-dim``; default cross-entropy.
        generator: for the random directions (reproducibility).

    Returns:
        A tensor of shape (len(noise_norms), B).
    """
    with eval_mode(model):
        g0 = _input_grad(model, inputs, targets, loss_fn, create_graph=False)
        g0n = g0.flatten(1).norm(dim=1)
        rows = []
        for r in noise_norms:
            e = _random_directions(inputs.shape, inputs, generator) * float(r)
            g = _input_grad(model, inputs + e, targets, loss_fn, create_graph=False)
            rows.append((g - g0).flatten(1).norm(dim=1) / g0n.clamp_min(torch.finfo(g0n.dtype).tiny))
    return torch.stack(rows)


def relative_discrepancy(train: CurvatureStats, test: CurvatureStats) -> Dict[str, float]:
    """Train/test relative discrepancy Δ = |E_test g − E_train g| / E_test g for each measure (§5.4).

    Args:
        train: :func:`curvature_stats` on training samples.
        test: :func:`curvature_stats` on test samples.

    Returns:
        ``{"grad_norm": Δ, "hessian_norm": Δ, "curvature": Δ}`` (floats; NaN where E_test g = 0).
    """
    out = {}
    for k in ("grad_norm", "hessian_norm", "curvature"):
        te = float(getattr(test, k).double().mean())
        tr = float(getattr(train, k).double().mean())
        out[k] = abs(te - tr) / te if te != 0 else float("nan")
    return out
