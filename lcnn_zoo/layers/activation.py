"""Centered softplus, the LCNN's activation with trainable curvature (paper §3.3, eq. 3–4).

s0(x; β) = (1/β)·log((1 + exp(βx)) / 2): s0(0) = 0, s0 → x/2 as β → 0 and → ReLU as β → ∞, and its
curvature |s0''/s0'| is at most β, which the LCNN penalty (eq. 5) pushes down.

All tensors are elementwise (any shape); β is dimensionless.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Tuple

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from . import prepared
from ._kernels import centered_softplus_bwd, centered_softplus_fwd, fused_enabled, fused_requested

__all__ = ["CenteredSoftplus", "FrozenCenteredSoftplus", "centered_softplus", "DEFAULT_BETA_INIT"]

DEFAULT_BETA_INIT = 5.0  # the reference code's initial β
_SERIES_BELOW = 5e-3  # |u| under which ∂s0/∂β uses its series (the closed form cancels there)
_FROZEN_THRESHOLD = 20.0  # F.softplus switches to the identity above βx = 20: error e^-20/β, below float32's
# Above u = βy = 64, e^{−u} < 2e-28 is under every dtype's rounding of 2: σ(βx) = 1 and t·σ(t) − u = log 2 to
# the last bit, so capping u there changes no finite result and keeps u·(σ − 1) from being ∞·0 = NaN at y = +∞.
_U_CAP = 64.0


def _centered_softplus_t(t: torch.Tensor) -> torch.Tensor:
    """g(t) = log((1 + e^t) / 2), written as t/2 + log cosh(t/2) and evaluated without overflow.

    log cosh(u) = |u| + log1p(expm1(-2|u|) / 2). The expm1/log1p pair keeps full relative
    precision for tiny |t| (where g(t) ≈ t/2) and never overflows for large |t|.
    """
    u = 0.5 * t
    a = u.abs()
    # u + |u| written max(0, t): the same number (2·(t/2) = t, up to a subnormal t's last bit), in as many ops,
    # but 0 rather than ∞ − ∞ = NaN at t = −∞, so g(−∞) = −log 2. torch.maximum, not relu or clamp: it
    # propagates a NaN, and its derivative at the tie t = 0 is 1/2 (as that of u + |u|), which autograd of this
    # function (the TorchScript path) needs for g'(0) = 1/2. (0 first: the tie at t = −0 gives +0, as before.)
    return torch.maximum(t.new_zeros(()), t) + torch.log1p(0.5 * torch.expm1(-2.0 * a))


def _derivatives_from_output(y: torch.Tensor, beta: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(∂s0/∂x, ∂s0/∂β) at the point whose *output* is y = s0(x; β), without x.

    The backward needs only the output, like ReLU's, so autograd keeps one activation-sized tensor
    per activation, the one the next layer saves anyway. With u = βy = g(βx) and d = 2 − e^{−u}:

        σ(βx) = d / 2,   ∂s0/∂β = (t·σ(t) − u) / β²   with   t·σ(t) = (u·d + d·log d) / 2.

    Near t = 0 the difference cancels: there t = 2u − u² + u³ (error O(u⁴) for small |u|) and the
    series t²/8·(1 − t²/8) is used. Saturated units (d = 0 in floating point) give d·log d = 0, with
    a zero derivative, so double backward stays finite. t·σ(t) − u is written σ·log 2σ + u·(σ − 1),
    as in the fused kernels, and u is capped at _U_CAP (y capped before the product with β, so that
    double backward has no 0·∞ either): x = +∞ gives σ = 1 and ∂s0/∂β = log(2)/β², its limit.
    """
    u = torch.minimum(y, _U_CAP / beta.detach()) * beta  # u ≤ _U_CAP: no ∞·0 at y = +∞; NaN stays NaN
    d = (2.0 - torch.exp(-u)).clamp_min(0.0)  # an output rounded below −log(2)/β: a saturated unit
    grad_x = 0.5 * d
    dl = d.clamp_min(1e-30)
    direct = (0.5 * dl * torch.log(dl) + u * (0.5 * d - 1.0)) / (beta * beta)
    small = u.abs() < _SERIES_BELOW
    us = torch.where(small, u, torch.zeros_like(u))
    t = us * (2.0 - us * (1.0 - us))  # t = log(2e^u − 1) = 2u − u² + u³ + O(u⁴): no transcendental op
    series = 0.125 * t * t * (1.0 - 0.125 * t * t) / (beta * beta)
    return grad_x, torch.where(small, series, direct)


def _fast_backward(grad_out: torch.Tensor, y: torch.Tensor, beta: torch.Tensor, need_x: bool,
                   need_beta: bool) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """The formulas of :func:`_derivatives_from_output` with in-place ops and only what is needed
    (no β part for a fixed β): for backward passes that are not differentiated again.

    Deliberately a second, in-place copy of those formulas: the differentiable one allocates a tensor
    per op, which costs more than the arithmetic on large activations.
    test_fast_backward_matches_differentiable_backward keeps the two equal."""
    # e^{−u}, σ(βx) = 1 − e/2. u is capped where e^{−u} would leave the normal range (σ is 1 to the last
    # bit either way): an underflowing exp takes CPU's slow subnormal path (β = 1e3 models). The capped u
    # is also the one in u·(σ − 1) below: σ − 1 = 0 there, and at y = +∞ this is 0, not ∞·0 = NaN.
    neg_u = torch.mul(y, -beta).clamp_min_(math.log(torch.finfo(y.dtype).tiny) + 2.0)
    e = neg_u.exp() if need_beta else neg_u.exp_()
    grad_x = torch.addcmul(grad_out, grad_out, e, value=-0.5) if need_x else None  # three passes in all
    grad_beta = None
    if need_beta:
        u = neg_u.neg_()
        sig = e.mul_(-0.5).add_(1.0).clamp_min_(0.0)
        f = (2.0 * sig).clamp_min_(1e-30)
        f.log_().mul_(sig)                      # σ·log 2σ
        f.add_(sig.sub_(1.0).mul_(u))           # + u·(σ − 1) = t·σ(t) − u
        small = u.abs() < _SERIES_BELOW
        us = torch.where(small, u, 0.0)
        t2 = us.mul(us.neg().add_(1.0)).neg_().add_(2.0).mul_(us).square_()  # t = 2u − u² + u³, squared
        series = t2.mul(0.125).mul_(t2.mul_(-0.125).add_(1.0))  # t²/8·(1 − t²/8)
        f = torch.where(small, series, f)
        grad_beta = (grad_out * f).sum().div(beta * beta).reshape(beta.shape)
    return grad_x, grad_beta


class _CenteredSoftplusFn(torch.autograd.Function):
    """Fused centered softplus. Saves only its output and β (see :func:`_derivatives_from_output`).

    Forward and ordinary backward run the one-pass kernels of :mod:`._kernels` (CPU and CUDA), also in
    a torch.compile graph, where each is one opaque op (two per activation, against ~50 ATen ops of the
    formulas for inductor to compile); under ``create_graph`` (exact GradReg, Hessian-vector products)
    the backward is the differentiable formulas, so double backward works. This class has no ``jvp``
    so that torch.compile traces it without a graph break; :class:`_CenteredSoftplusFnFwdAD` adds
    forward-mode AD for eager use.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
        if _kernels_serve(x):
            return centered_softplus_fwd(x, beta)
        return _centered_softplus_t(x * beta) / beta

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, beta = inputs
        ctx.save_for_backward(output, beta)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        y, beta = ctx.saved_tensors
        need_x, need_beta = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not torch.is_grad_enabled():  # an ordinary backward (no create_graph): one fused pass
            if _kernels_serve(y):
                gx, gb = centered_softplus_bwd(grad_out, y, beta, need_beta)
                return (gx if need_x else None), (gb if need_beta else None)
            return _fast_backward(grad_out, y, beta, need_x, need_beta)
        d_x, d_beta = _derivatives_from_output(y, beta)
        grad_x = grad_out * d_x if need_x else None
        grad_beta = (grad_out * d_beta).sum().reshape(beta.shape) if need_beta else None
        return grad_x, grad_beta


class _CenteredSoftplusFnFwdAD(_CenteredSoftplusFn):
    """The same Function with a ``jvp`` (forward-mode AD, e.g. torch.func.jvp / forward-over-reverse).
    It saves the output for the jvp too, so the input is not kept alive."""

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, beta = inputs
        ctx.save_for_backward(output, beta)
        ctx.save_for_forward(output, beta)

    @staticmethod
    def jvp(ctx, x_t: Optional[torch.Tensor], beta_t: Optional[torch.Tensor]):
        y, beta = ctx.saved_tensors
        d_x, d_beta = _derivatives_from_output(y, beta)
        out = torch.zeros_like(y)
        if x_t is not None:
            out = out + d_x * x_t
        if beta_t is not None:
            out = out + d_beta * beta_t
        return out


def _kernels_serve(x: torch.Tensor) -> bool:
    # While torch.compile traces: whether the kernels are asked for, without recording anything (a side
    # effect inside the Function would break the graph there); the ops fall back to the formulas themselves.
    return fused_requested(x) if torch.compiler.is_dynamo_compiling() else fused_enabled(x)


def centered_softplus(x: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """Apply the centered softplus s0(x; β) = (1/β)·log((1 + exp(βx)) / 2) elementwise (paper eq. 4).

    torch.fx records calls to this function as single nodes (it is ``torch.fx.wrap``-ped), so FX
    tracing — timm's and torchvision's feature extraction, FX quantisation — sees the activation
    as one operation and runs it as is.

    Args:
        x: the input, any shape.
        beta: β, a positive 0-dim tensor (dimensionless); gradients flow to it.

    Returns:
        s0(x; β), of ``x``'s shape.
    """
    # torch.compile cannot trace a Function with a custom jvp; eager mode keeps forward-mode AD.
    fn = _CenteredSoftplusFn if torch.compiler.is_compiling() else _CenteredSoftplusFnFwdAD
    return fn.apply(x, beta)


torch.fx.wrap("centered_softplus")


def _centered_softplus_plain(x: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """The same function with plain torch ops (TorchScript compiles this; autograd differentiates it)."""
    return _centered_softplus_t(x * beta) / beta


class CenteredSoftplus(nn.Module):
    """Centered softplus activation with a learnable per-layer scalar β > 0 (paper §3.3).

    s0(x; β) = (1/β)·log((1 + exp(βx)) / 2): s0(0) = 0, s0 → x/2 as β → 0 and → ReLU as β → ∞.
    Its curvature |s0''/s0'| is bounded by β, which the LCNN penalty (eq. 5) pushes down.
    β is stored as ``log_beta`` (β = exp(log_beta) > 0 by construction). The computation is a fused
    autograd Function that is stable for |βx| up to 1e4 and β in [1e-4, 1e4]; under TorchScript
    the same formula runs with plain ops.

    Args:
        beta_init: initial β (finite, > 0; dimensionless). The reference code uses 5.
        inplace: accepted for drop-in compatibility with ``act_layer(inplace=True)``; ignored
            (the op is never computed in place).
        learnable: if False, β is a fixed buffer (e.g. the paper's β = 1e3 "standard" model).
        device: device of ``log_beta``.
        dtype: dtype of ``log_beta`` (default: torch's default dtype).

    Shape:
        - Input: (*), any shape.
        - Output: (*), the input's shape (elementwise).

    Raises:
        ValueError: ``beta_init`` is not a finite positive number.
    """

    def __init__(self, beta_init: float = DEFAULT_BETA_INIT, inplace: bool = False, learnable: bool = True,
                 device=None, dtype=None) -> None:
        super().__init__()
        beta_init = float(beta_init)
        if not (math.isfinite(beta_init) and beta_init > 0.0):
            raise ValueError(f"CenteredSoftplus: beta_init must be a finite positive number, got {beta_init}")
        log_beta = torch.tensor(math.log(beta_init), device=device, dtype=dtype or torch.get_default_dtype())
        if learnable:
            self.log_beta = nn.Parameter(log_beta)
        else:
            self.register_buffer("log_beta", log_beta)
        self.inplace = inplace

    @property
    def beta(self) -> torch.Tensor:
        """The β used in the formula (0-dim tensor, carries grad when learnable)."""
        return self.log_beta.exp()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply s0(x; β) elementwise."""
        if torch.jit.is_scripting():
            return _centered_softplus_plain(x, self.log_beta.exp())
        return self._fused(x)

    @torch.jit.unused
    def _fused(self, x: torch.Tensor) -> torch.Tensor:
        # β as the model's pre-forward computed it for all activations at once, if it did
        given = prepared.for_graph(self, False)  # (compiled)
        beta = given[0] if given is not None else prepared.take(self, (self.log_beta,), False)
        return centered_softplus(x, beta if beta is not None else self.log_beta.exp())

    def extra_repr(self) -> str:
        """β and whether it is learnable, as printed in the module's repr."""
        return f"beta={self.beta.item():.4g}, learnable={isinstance(self.log_beta, nn.Parameter)}"


def _beta_from_buffer(module: "FrozenCenteredSoftplus", incompatible_keys: Any) -> None:
    module._set_beta(float(module.frozen_beta.item()))


class FrozenCenteredSoftplus(nn.Module):
    """Inference-only centered softplus with a constant β: ``F.softplus(x, β) − log(2)/β``.

    What :func:`lcnn_zoo.fold` produces. Written with ``softplus`` and a subtraction only, so
    TorchScript, ``torch.export`` and both ONNX exporters (the dynamo one and the legacy
    TorchScript-based one) take it. Within 2e-7·log(2)/β (absolute) of s0 in float32. β is a
    Python float of the forward and the ``frozen_beta`` buffer of the state dict (loading sets both).

    Args:
        beta: the constant β (finite, > 0; dimensionless).

    Shape:
        - Input: (*), any shape.
        - Output: (*), the input's shape (elementwise).

    Raises:
        ValueError: ``beta`` (or a loaded ``frozen_beta``) is not finite and positive.
    """

    def __init__(self, beta: float) -> None:
        super().__init__()
        self.threshold = _FROZEN_THRESHOLD
        # β is a constant of the forward (a Python float: TorchScript and the exporters take it as one)
        # and a buffer of the state dict, so that a folded model's saved weights hold it: loading them
        # into another folded model of the architecture (timm's save_for_hf / local-dir:) sets the float.
        self.frozen_beta: torch.Tensor
        self.register_buffer("frozen_beta", torch.zeros(()))
        self._set_beta(float(beta))
        self.register_load_state_dict_post_hook(_beta_from_buffer)  # (a module-level function: pickles)

    @torch.jit.unused
    def _set_beta(self, beta: float) -> None:
        if not (math.isfinite(beta) and beta > 0.0):
            raise ValueError(f"FrozenCenteredSoftplus: beta must be finite and positive, got {beta}")
        self.beta = beta
        self.shift = math.log(2.0) / beta
        self.frozen_beta.fill_(beta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply ``softplus(x, β) − log(2)/β`` elementwise."""
        return F.softplus(x, beta=self.beta, threshold=self.threshold) - self.shift

    def extra_repr(self) -> str:
        """β, as printed in the module's repr."""
        return f"beta={self.beta:.6g}"
