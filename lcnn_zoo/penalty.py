"""Regularisers: the LCNN penalty (paper eq. 5) and gradient-norm regularisation (GradReg, §5).

GradReg is defined **per sample** here:

    R(θ) = (1/B) · Σᵢ ‖∇ₓ ℓ(f(xᵢ), yᵢ)‖²,     total loss = L + λ_grad · R,   L = (1/B) Σᵢ ℓᵢ

The reference code (kylematoba/lcnn) uses ``λ_ref · 1e5 · Σᵢ ‖∇_{xᵢ} L‖² / B`` with the *mean* loss
L, i.e. λ_ref·1e5/B² · R; so ``lambda_grad = λ_ref · 1e5 / B²`` reproduces it (λ_ref = 1e-3 and
B = 128 give lambda_grad ≈ 6.1e-3), and ours does not change strength with the batch size.
In training mode BatchNorm couples the samples of a batch; like the reference, the input gradient
is then that of the batch loss.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .layers import CenteredSoftplus, LipschitzBatchNorm2d, frozen_state

__all__ = ["LCNNPenalty", "GradRegOutput", "gradreg_exact", "gradreg_fd_backward", "param_groups",
           "curvature_parameters"]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def curvature_parameters(model: nn.Module) -> Dict[str, List[nn.Parameter]]:
    """The learnable β (``log_beta``) and γ (``gamma_raw``) parameters of ``model``."""
    out: Dict[str, List[nn.Parameter]] = {"beta": [], "gamma": []}
    for m in model.modules():
        if isinstance(m, CenteredSoftplus) and isinstance(m.log_beta, nn.Parameter):
            out["beta"].append(m.log_beta)
        elif isinstance(m, LipschitzBatchNorm2d):
            out["gamma"].append(m.gamma_raw)
    return out


class LCNNPenalty:
    """R = λβ · Σᵢ βᵢ + λγ · Σⱼ log γⱼ over every CenteredSoftplus β and γ-Lipschitz BN γ (eq. 5).

    Found by walking ``model.modules()`` (no forward hooks); returns a 0-dim tensor that is
    differentiable w.r.t. the β and γ parameters (0 for a model without such layers).
    """

    def __init__(self, lambda_beta: float = 1e-2, lambda_gamma: float = 1e-2) -> None:
        if lambda_beta < 0 or lambda_gamma < 0:
            raise ValueError(f"LCNNPenalty: lambdas must be >= 0, got {lambda_beta}, {lambda_gamma}")
        self.lambda_beta = float(lambda_beta)
        self.lambda_gamma = float(lambda_gamma)

    @staticmethod
    def terms(model: nn.Module) -> Dict[str, torch.Tensor]:
        """{"sum_beta": Σβ, "sum_log_gamma": Σ log γ} as 0-dim tensors (for logging)."""
        betas, gammas = [], []
        for m in model.modules():
            if isinstance(m, CenteredSoftplus):
                betas.append(m.beta)
            elif isinstance(m, LipschitzBatchNorm2d):
                gammas.append(m.gamma)
        ref = next(model.parameters(), None)
        zero = torch.zeros((), device=ref.device if ref is not None else None)
        return {
            "sum_beta": torch.stack(betas).sum() if betas else zero,
            "sum_log_gamma": torch.stack(gammas).log().sum() if gammas else zero,
        }

    def __call__(self, model: nn.Module) -> torch.Tensor:
        t = self.terms(model)
        return self.lambda_beta * t["sum_beta"] + self.lambda_gamma * t["sum_log_gamma"]

    def __repr__(self) -> str:
        return f"LCNNPenalty(lambda_beta={self.lambda_beta}, lambda_gamma={self.lambda_gamma})"


class GradRegOutput(NamedTuple):
    """loss: mean task loss L (0-dim); penalty: R = mean ‖∇ₓℓᵢ‖² (0-dim); logits: (B, K)."""

    loss: torch.Tensor
    penalty: torch.Tensor
    logits: torch.Tensor


def gradreg_exact(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
                  loss_fn: LossFn = F.cross_entropy) -> GradRegOutput:
    """Exact GradReg by double backpropagation.

    Returns (L, R, logits) with R still attached to the graph (``create_graph=True``), so
    ``(L + lambda_grad * R).backward()`` gives the exact parameter gradient.
    ``loss_fn`` must return the *mean* loss over the batch.
    """
    x = inputs.detach().requires_grad_(True)
    logits = model(x)
    loss = loss_fn(logits, targets)
    n = x.shape[0]
    (gx,) = torch.autograd.grad(loss * n, x, create_graph=True)  # per-sample ∇ₓℓᵢ
    penalty = gx.pow(2).sum() / n
    return GradRegOutput(loss, penalty, logits)


def gradreg_fd_backward(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, lambda_grad: float, *,
                        loss_fn: LossFn = F.cross_entropy, step: float = 1e-2) -> GradRegOutput:
    """Finite-difference GradReg: accumulates ∇θ(L + λ·R) into ``.grad`` without double backward.

    With G = (∇ₓℓᵢ)ᵢ the per-sample input gradients (held constant), ∇θR = (2/B)·∇θ⟨∇ₓΣℓ, G⟩ and
    the directional derivative is a finite difference along G:

        ∇θ(L + λR) ≈ ∇θL(x) + (2λ/h) · (∇θL(x + hG) − ∇θL(x))

    The step h = ``step``·√B / ‖G‖ moves each sample by ``step`` input units in RMS, whatever the
    gradient scale. Cost: two forward/backward passes; works with ``torch.compile`` and DDP. The
    second pass runs in :func:`~lcnn_zoo.layers.frozen_state`: BatchNorm running statistics and the
    spectral-norm singular vectors are updated once per call, not twice.

    Returns (L, R, logits), detached; R is the exact penalty at x (from the first pass).
    ``loss_fn`` must return the mean loss over the batch.
    """
    if step <= 0:
        raise ValueError(f"gradreg_fd_backward: step must be > 0, got {step}")
    params = [p for p in model.parameters() if p.requires_grad]
    x = inputs.detach().requires_grad_(True)
    logits = model(x)
    loss = loss_fn(logits, targets)
    n = x.shape[0]
    grads = torch.autograd.grad(loss, [x] + params, allow_unused=True)
    per_sample = grads[0].detach() * n  # G, (B, ...)
    g_norm = per_sample.norm()
    penalty = g_norm.square() / n
    h = step * math.sqrt(n) / g_norm.clamp_min(1e-12)
    with frozen_state(model):
        loss2 = loss_fn(model((x.detach() + h * per_sample)), targets)
        grads2 = torch.autograd.grad(loss2, params, allow_unused=True)
    c = (2.0 * lambda_grad) / h
    for p, g1, g2 in zip(params, grads[1:], grads2):
        if g1 is None and g2 is None:
            continue
        g1 = torch.zeros_like(p) if g1 is None else g1
        g2 = torch.zeros_like(p) if g2 is None else g2
        total = g1 + c * (g2 - g1)
        if p.grad is None:
            p.grad = total
        else:
            p.grad.add_(total)
    return GradRegOutput(loss.detach(), penalty.detach(), logits.detach())


def param_groups(model: nn.Module, weight_decay: float, *, exclude_1d: bool = False) -> List[dict]:
    """Optimizer parameter groups with β and γ excluded from weight decay (as the reference does).

    ``exclude_1d=True`` also exempts biases and norm weights (timm's ``filter_bias_and_bn``).
    The result can be passed to ``torch.optim`` or ``timm.optim.create_optimizer_v2``.
    """
    curv = {id(p) for ps in curvature_parameters(model).values() for p in ps}
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        if id(p) in curv or (exclude_1d and p.ndim <= 1):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]
