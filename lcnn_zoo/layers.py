"""LCNN building blocks (paper §3.3–3.4).

* :class:`CenteredSoftplus` — s0(x; β) = (1/β)·log((1 + exp(βx)) / 2) with learnable β > 0 (eq. 4).
* :class:`LipschitzBatchNorm2d` — γ-Lipschitz BatchNorm with learnable γ ≥ 1 (§3.4.2).
* :class:`SpectralNorm` — a weight parametrization W ↦ W / ‖A_W‖₂ where A_W is the *true* linear
  operator of a Linear or Conv2d layer (for convolutions the unrolled operator on a fixed input
  size, Ryu et al. 2019), registered with :func:`torch.nn.utils.parametrize.register_parametrization`.
* :class:`Scale` — multiplication by a constant (used to average residual branches).

All tensors are NCHW; β, γ are dimensionless, spectral norms are input-unit per output-unit.
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterator, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

__all__ = [
    "CenteredSoftplus",
    "FrozenCenteredSoftplus",
    "LipschitzBatchNorm2d",
    "LipschitzBatchNormAct2d",
    "SpectralNorm",
    "Scale",
    "centered_softplus",
    "spectral_norm",
    "spectral_norm_modules",
    "converge_spectral_norms",
    "frozen_state",
    "sync_batchnorm",
]

_LOG2 = math.log(2.0)


# --------------------------------------------------------------------------------------------
# Centered softplus
# --------------------------------------------------------------------------------------------
def _centered_softplus_t(t: torch.Tensor) -> torch.Tensor:
    """g(t) = log((1 + e^t) / 2), written as t/2 + log cosh(t/2) and evaluated without overflow.

    log cosh(u) = |u| + log1p(expm1(-2|u|) / 2). The expm1/log1p pair keeps full relative
    precision for tiny |t| (where g(t) ≈ t/2) and never overflows for large |t|.
    """
    u = 0.5 * t
    a = u.abs()
    return u + a + torch.log1p(0.5 * torch.expm1(-2.0 * a))


def _derivatives_from_output(y: torch.Tensor, beta: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(∂s0/∂x, ∂s0/∂β) at the point whose *output* is y = s0(x; β), without x.

    The backward needs only the output, like ReLU's, so autograd keeps one activation-sized tensor
    per activation, the one the next layer saves anyway. With u = βy = g(βx) and d = 2 − e^{−u}:

        σ(βx) = d / 2,   ∂s0/∂β = (t·σ(t) − u) / β²   with   t·σ(t) = (u·d + d·log d) / 2.

    Near t = 0 the difference cancels: there t = 2u − u² + u³ (error O(u⁴) for |u| < 5e-3) and the series
    t²/8·(1 − t²/8) is used. Saturated units (d = 0 in floating point) give d·log d = 0, with a
    zero derivative, so double backward stays finite.
    """
    u = y * beta
    d = 2.0 - torch.exp(-u)
    grad_x = 0.5 * d
    dl = d.clamp_min(1e-30)
    direct = (0.5 * (u * d + dl * torch.log(dl)) - u) / (beta * beta)
    small = u.abs() < 5e-3
    us = torch.where(small, u, torch.zeros_like(u))
    t = us * (2.0 - us * (1.0 - us))  # t = log(2e^u − 1) = 2u − u² + u³ + O(u⁴): no transcendental op
    series = 0.125 * t * t * (1.0 - 0.125 * t * t) / (beta * beta)
    return grad_x, torch.where(small, series, direct)


def _fast_backward(grad_out: torch.Tensor, y: torch.Tensor, beta: torch.Tensor, need_x: bool,
                   need_beta: bool) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """The formulas of :func:`_derivatives_from_output` with in-place ops and only what is needed
    (no β part for a fixed β): for backward passes that are not differentiated again.

    Deliberately a second, in-place copy of those formulas: calling the differentiable one for the
    β part measured 1.6× slower on a 64×64×32×32 activation. test_fast_backward_matches_differentiable_backward
    keeps the two equal."""
    e = torch.mul(y, -beta).exp_()  # e^{−u}, σ(βx) = 1 − e/2
    grad_x = torch.addcmul(grad_out, grad_out, e, value=-0.5) if need_x else None  # three passes in all
    grad_beta = None
    if need_beta:
        u = y * beta
        sig = e.mul_(-0.5).add_(1.0)
        f = (2.0 * sig).clamp_min_(1e-30)
        f.log_().mul_(sig)                      # σ·log 2σ
        f.add_(sig.sub_(1.0).mul_(u))           # + u·(σ − 1) = t·σ(t) − u
        small = u.abs() < 5e-3
        us = torch.where(small, u, 0.0)
        t2 = us.mul(us.neg().add_(1.0)).neg_().add_(2.0).mul_(us).square_()  # t = 2u − u² + u³, squared
        series = t2.mul(0.125).mul_(t2.mul_(-0.125).add_(1.0))  # t²/8·(1 − t²/8)
        f = torch.where(small, series, f)
        grad_beta = (grad_out * f).sum().div(beta * beta).reshape(beta.shape)
    return grad_x, grad_beta


class _CenteredSoftplusFn(torch.autograd.Function):
    """Fused centered softplus. Saves only its output and β (see :func:`_derivatives_from_output`).

    The backward is written with differentiable torch ops, so double backward (exact GradReg,
    Hessian-vector products) works. This class has no ``jvp`` so that torch.compile traces it
    without a graph break; :class:`_CenteredSoftplusFnFwdAD` adds forward-mode AD for eager use.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return _centered_softplus_t(x * beta) / beta

    @staticmethod
    def setup_context(ctx, inputs, output):  # type: ignore[override]
        _, beta = inputs
        ctx.save_for_backward(output, beta)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        y, beta = ctx.saved_tensors
        need_x, need_beta = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not torch.is_grad_enabled():  # an ordinary backward (no create_graph): in place, fewer passes
            return _fast_backward(grad_out, y, beta, need_x, need_beta)
        d_x, d_beta = _derivatives_from_output(y, beta)
        grad_x = grad_out * d_x if need_x else None
        grad_beta = (grad_out * d_beta).sum().reshape(beta.shape) if need_beta else None
        return grad_x, grad_beta


class _CenteredSoftplusFnFwdAD(_CenteredSoftplusFn):
    """The same Function with a ``jvp`` (forward-mode AD, e.g. torch.func.jvp / forward-over-reverse).
    It saves the output for the jvp too, so the input is not kept alive."""

    @staticmethod
    def setup_context(ctx, inputs, output):  # type: ignore[override]
        _, beta = inputs
        ctx.save_for_backward(output, beta)
        ctx.save_for_forward(output, beta)

    @staticmethod
    def jvp(ctx, x_t: Optional[torch.Tensor], beta_t: Optional[torch.Tensor]):  # type: ignore[override]
        y, beta = ctx.saved_tensors
        d_x, d_beta = _derivatives_from_output(y, beta)
        out = torch.zeros_like(y)
        if x_t is not None:
            out = out + d_x * x_t
        if beta_t is not None:
            out = out + d_beta * beta_t
        return out


def _fn() -> type:
    # torch.compile cannot trace a Function with a custom jvp; eager mode keeps forward-mode AD.
    return _CenteredSoftplusFn if torch.compiler.is_compiling() else _CenteredSoftplusFnFwdAD


def centered_softplus(x: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """Functional centered softplus s0(x; β) (paper eq. 4). ``beta``: positive tensor, 0-dim."""
    return _fn().apply(x, beta)


class CenteredSoftplus(nn.Module):
    """Centered softplus activation with a learnable per-layer scalar β > 0 (paper §3.3).

    s0(x; β) = (1/β)·log((1 + exp(βx)) / 2): s0(0) = 0, s0 → x/2 as β → 0 and → ReLU as β → ∞.
    Its curvature |s0''/s0'| is bounded by β, which the LCNN penalty (eq. 5) pushes down.

    β is stored as ``log_beta`` (β = exp(log_beta) > 0 by construction). The computation is a fused
    autograd Function that is stable for |βx| up to 1e4 and β in [1e-4, 1e4].

    Args:
        beta_init: initial β (> 0). The reference code uses 5.
        inplace: accepted for drop-in compatibility with ``act_layer(inplace=True)``; ignored
            (the op is never computed in place).
        learnable: if False, β is a fixed buffer (e.g. the paper's β = 1e3 "standard" model).

    Shape: any; elementwise.
    """

    def __init__(self, beta_init: float = 5.0, inplace: bool = False, learnable: bool = True,
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
        return _fn().apply(x, self.beta)

    def extra_repr(self) -> str:
        return f"beta={self.beta.item():.4g}, learnable={isinstance(self.log_beta, nn.Parameter)}"


class FrozenCenteredSoftplus(nn.Module):
    """Inference-only centered softplus with a constant β, written in plain torch ops so that
    torch.jit / torch.export / ONNX can export it (what :func:`lcnn_zoo.fold` produces)."""

    def __init__(self, beta: float) -> None:
        super().__init__()
        if not (math.isfinite(beta) and beta > 0.0):
            raise ValueError(f"FrozenCenteredSoftplus: beta must be finite and positive, got {beta}")
        self.beta = float(beta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _centered_softplus_t(x * self.beta) / self.beta

    def extra_repr(self) -> str:
        return f"beta={self.beta:.6g}"


# --------------------------------------------------------------------------------------------
# γ-Lipschitz BatchNorm
# --------------------------------------------------------------------------------------------
def _inv_softplus(y: float) -> float:
    return y + math.log(-math.expm1(-y))


class LipschitzBatchNorm2d(nn.Module):
    """γ-Lipschitz BatchNorm (paper §3.4.2) with a learnable γ ≥ 1.

    output = min(γ, ‖BN‖₂) · BN(x) / ‖BN‖₂,   ‖BN‖₂ = maxᵢ |wᵢ| / sqrt(running_varᵢ + eps)

    (wᵢ = 1 when ``affine=False``). In eval mode BN is the diagonal affine map with that norm, so
    the layer's Lipschitz constant is ≤ γ exactly. In training mode BN(x) uses batch statistics
    (like :class:`torch.nn.BatchNorm2d`) and the norm uses the running variance before this batch updates it
    (the scale is folded into BatchNorm's weight, as in the reference implementations).

    γ = 1 + softplus(``gamma_raw``) ≥ 1 by construction. Buffers and parameters keep the
    ``torch.nn.BatchNorm2d`` names (``weight``, ``bias``, ``running_mean``, ``running_var``,
    ``num_batches_tracked``). Deliberately *not* a ``_BatchNorm`` subclass, so that generic
    rewrites such as ``nn.SyncBatchNorm.convert_sync_batchnorm`` cannot silently drop the clipping.

    Args:
        num_features: C of an (N, C, H, W) input.
        gamma_init: initial γ (> 1). The reference code uses 10.
        affine: learnable per-channel weight/bias. The paper uses ``False``.

    Shape: (N, C, H, W) → (N, C, H, W).
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = False, gamma_init: float = 10.0, device=None, dtype=None) -> None:
        super().__init__()
        gamma_init = float(gamma_init)
        if not (math.isfinite(gamma_init) and gamma_init > 1.0):
            raise ValueError(f"LipschitzBatchNorm2d: gamma_init must be finite and > 1, got {gamma_init}")
        if num_features <= 0:
            raise ValueError(f"LipschitzBatchNorm2d: num_features must be positive, got {num_features}")
        fk = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features, **fk))
            self.bias = nn.Parameter(torch.zeros(num_features, **fk))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.register_buffer("running_mean", torch.zeros(num_features, **fk))
        self.register_buffer("running_var", torch.ones(num_features, **fk))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))
        self.gamma_raw = nn.Parameter(torch.tensor(_inv_softplus(gamma_init - 1.0), **fk))
        self.update_stats = True  # False inside `frozen_state`: batch stats are used, not recorded
        self.process_group = None  # set by `sync_batchnorm`: batch statistics over all DDP processes

    @property
    def gamma(self) -> torch.Tensor:
        """The Lipschitz cap γ ≥ 1 (0-dim tensor, carries grad)."""
        return 1.0 + F.softplus(self.gamma_raw)

    def bn_lipschitz(self) -> torch.Tensor:
        """‖BN‖₂ of the eval-mode BatchNorm (0-dim tensor): maxᵢ |wᵢ| / sqrt(running_varᵢ + eps)."""
        inv_std = torch.rsqrt(self.running_var + self.eps)
        if self.weight is not None:
            inv_std = self.weight.abs() * inv_std
        return inv_std.max()

    def lipschitz_scale(self) -> torch.Tensor:
        """min(γ, ‖BN‖₂) / ‖BN‖₂ — the factor applied to the BatchNorm output (0-dim)."""
        # Written as γ / max(‖BN‖, γ): no division by zero when ‖BN‖ = 0 (e.g. timm's zero-init last BN
        # of a residual branch), and finite gradients everywhere.
        gamma = self.gamma
        return gamma / torch.maximum(self.bn_lipschitz(), gamma)

    def reset_running_stats(self) -> None:
        self.running_mean.zero_()
        self.running_var.fill_(1.0)
        self.num_batches_tracked.zero_()

    def _scaled_affine(self) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """BatchNorm's (weight, bias) with the Lipschitz scale folded in: (s·w, s·b), or s per channel."""
        scale = self.lipschitz_scale()
        if self.weight is None:
            return scale.expand(self.num_features), None
        return self.weight * scale, self.bias * scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"{type(self).__name__} expects a 4D (N, C, H, W) input, got shape {tuple(x.shape)}")
        # The scale is folded into BatchNorm's affine weight, so F.batch_norm saves only its input for
        # backward (multiplying its output by the scale would keep one more activation-sized tensor per
        # layer) and no extra pass over the activation is made. It is computed from the running variance
        # *before* this batch updates it (in eval mode there is no update); the gradient still reaches γ
        # (and w, b) through the folded weight.
        weight, bias = self._scaled_affine()
        record = self.training and self.update_stats
        momentum = 0.0 if self.momentum is None else self.momentum
        if record:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                momentum = 1.0 / float(self.num_batches_tracked)
        if self.training and self.process_group is not None and _world_size(self.process_group) > 1:
            return self._synced_batch_norm(x, weight, bias, record, momentum)
        use_running = (not self.training) or record
        return F.batch_norm(
            x,
            self.running_mean if use_running else None,
            self.running_var if use_running else None,
            weight, bias, self.training, momentum, self.eps,
        )

    def _synced_batch_norm(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], record: bool,
                           momentum: float) -> torch.Tensor:
        """Training-mode BN with batch statistics summed over the process group (differentiable,
        so double backward works). Works on any backend, gloo on CPU included."""
        c = x.shape[1]
        count = torch.full((1,), x.numel() / c, device=x.device, dtype=x.dtype)
        stats = _AllReduceSum.apply(torch.cat([x.sum((0, 2, 3)), (x * x).sum((0, 2, 3)), count]), self.process_group)
        n = stats[-1]
        mean = stats[:c] / n
        var = (stats[c:2 * c] / n - mean * mean).clamp_min(0.0)
        if record:
            with torch.no_grad():
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), momentum)
                unbiased = var.detach() * (n.detach() / (n.detach() - 1).clamp_min(1.0))
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), momentum)
        y = (x - mean[None, :, None, None]) * (torch.rsqrt(var + self.eps) * weight.to(x.dtype))[None, :, None, None]
        if bias is not None:
            y = y + bias.to(x.dtype)[None, :, None, None]
        return y

    def extra_repr(self) -> str:
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
                f"gamma={self.gamma.item():.4g}")


class LipschitzBatchNormAct2d(LipschitzBatchNorm2d):
    """:class:`LipschitzBatchNorm2d` followed by dropout/activation modules, the counterpart of
    timm's ``BatchNormAct2d`` (same ``drop``/``act`` attribute names, so state-dict keys line up)."""

    def __init__(self, num_features: int, act: Optional[nn.Module] = None, drop: Optional[nn.Module] = None,
                 **kwargs) -> None:
        super().__init__(num_features, **kwargs)
        self.drop = drop if drop is not None else nn.Identity()
        self.act = act if act is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(super().forward(x)))


class Scale(nn.Module):
    """y = scale · x. Used to average residual branches: (branch + shortcut) / 2 is non-expansive."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = float(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale

    def extra_repr(self) -> str:
        return f"{self.scale}"


# --------------------------------------------------------------------------------------------
# Spectral normalisation on the true operator
# --------------------------------------------------------------------------------------------
def _normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    return x / x.norm().clamp_min(eps)


class SpectralNorm(nn.Module):
    """Parametrization W ↦ W / σ(W), σ = spectral norm of the layer's linear operator.

    * ``kind="linear"``: the operator is the matrix W (out, in).
    * ``kind="conv2d"``: the operator is the full convolution x ↦ conv2d(pad(x), W) on inputs of
      shape (C_in, H, W) = ``input_shape`` — stride, padding (any mode, symmetric or the
      asymmetric TF-'same' padding of timm's ``Conv2dSame``), dilation and groups included, bias
      excluded (it does not change the Lipschitz constant). The singular "vectors" are tensors of
      the input shape (``_v``: (1, C_in, H, W)) and output shape (``_u``: (1, C_out, H_out, W_out));
      the adjoint is ``conv_transpose2d`` (autograd's VJP for non-zero padding modes). Grouped and
      depthwise convolutions are exact: the adjoint of a grouped conv is the grouped transpose.

    The operator norm of a zero-padded convolution depends on the input size (it grows with H, W
    towards the norm of the convolution on the infinite grid), so it is computed for the size the
    layer sees when the model is fed inputs of the size given to :func:`lcnn_zoo.lcnnify`. Inputs of
    another size still run, but their per-layer Lipschitz constant is only approximately 1.

    Power iteration: one step per training-mode forward (``n_power_iterations``), on persistent
    buffers; ``σ = ‖A_W v‖`` is differentiated w.r.t. W (u, v treated as constants, as in Miyato et
    al.). In eval mode no iteration runs, and when no gradient is needed the normalised weight is
    cached until the weight or the buffers change. σ under-estimates the true norm until the
    iteration has converged; :func:`converge_spectral_norms` runs extra iterations on demand.

    Buffers are allocated at construction when the input shape is known, so a state_dict loads
    into a freshly built model without a dummy forward. With ``input_shape=None`` the buffers are
    allocated by ``initialize`` (the first forward) or taken from a loaded state_dict.
    """

    def __init__(self, weight: torch.Tensor, kind: str = "linear", *,
                 input_shape: Optional[Sequence[int]] = None,
                 stride: Tuple[int, int] = (1, 1), padding: Optional[Tuple[int, int, int, int]] = (0, 0, 0, 0),
                 dilation: Tuple[int, int] = (1, 1), groups: int = 1, padding_mode: str = "zeros",
                 n_power_iterations: int = 1, init_iterations: int = 3, eps: float = 1e-12) -> None:
        super().__init__()
        if kind not in ("linear", "conv2d"):
            raise ValueError(f"SpectralNorm: kind must be 'linear' or 'conv2d', got {kind!r}")
        if kind == "linear" and weight.dim() != 2:
            raise ValueError(f"SpectralNorm(kind='linear') needs a 2D weight, got shape {tuple(weight.shape)}")
        if kind == "conv2d" and weight.dim() != 4:
            raise ValueError(f"SpectralNorm(kind='conv2d') needs a 4D weight, got shape {tuple(weight.shape)}")
        if n_power_iterations < 0:
            raise ValueError(f"SpectralNorm: n_power_iterations must be >= 0, got {n_power_iterations}")
        self.kind = kind
        self.stride = tuple(stride)
        # (left, right, top, bottom) as for F.pad; None until known (dynamic 'same' padding).
        self.padding = None if padding is None else tuple(padding)
        self.dilation = tuple(dilation)
        self.groups = groups
        self.padding_mode = padding_mode
        self.n_power_iterations = n_power_iterations
        self.init_iterations = init_iterations
        self.eps = eps
        self.frozen = False  # True inside `frozen_state`: no power iteration
        self._cache: Optional[Tuple[tuple, torch.Tensor]] = None
        self.register_buffer("_u", None)
        self.register_buffer("_v", None)
        if kind == "linear":
            self.initialize(weight)
        elif input_shape is not None:
            self.initialize(weight, input_shape)

    # ---- shapes ---------------------------------------------------------------------------
    @property
    def input_shape(self) -> Optional[Tuple[int, ...]]:
        """Shape of one input sample the operator acts on (None until known)."""
        return None if self._v is None else tuple(self._v.shape[1:]) if self.kind == "conv2d" else tuple(self._v.shape)

    def _output_shape(self, weight: torch.Tensor, input_shape: Sequence[int]) -> Tuple[int, ...]:
        c, h, w = input_shape
        l, r, t, b = self.padding
        kh, kw = weight.shape[-2:]
        ho = (h + t + b - self.dilation[0] * (kh - 1) - 1) // self.stride[0] + 1
        wo = (w + l + r - self.dilation[1] * (kw - 1) - 1) // self.stride[1] + 1
        if ho <= 0 or wo <= 0:
            raise ValueError(f"SpectralNorm: input shape {tuple(input_shape)} is too small for kernel "
                             f"{(kh, kw)}, stride {self.stride}, dilation {self.dilation}")
        return weight.shape[0], ho, wo

    @torch.no_grad()
    def initialize(self, weight: torch.Tensor, input_shape: Optional[Sequence[int]] = None) -> None:
        """Allocate random unit singular vectors and run ``init_iterations`` power iterations."""
        fk = {"device": weight.device, "dtype": weight.dtype}
        if self.kind == "linear":
            v_shape, u_shape = (weight.shape[1],), (weight.shape[0],)
        else:
            if input_shape is None or len(input_shape) != 3:
                raise ValueError(f"SpectralNorm(conv2d) needs input_shape=(C, H, W), got {input_shape}")
            c_in = weight.shape[1] * self.groups
            if input_shape[0] != c_in:
                raise ValueError(f"SpectralNorm: input has {input_shape[0]} channels, the conv expects {c_in}")
            v_shape = (1, *input_shape)
            u_shape = (1, *self._output_shape(weight, input_shape))
        self._v = _normalize(torch.randn(v_shape, **fk), self.eps)
        self._u = _normalize(torch.randn(u_shape, **fk), self.eps)
        self._cache = None
        self.power_iteration(weight, self.init_iterations)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:
        # Lazily-shaped buffers take their shape from the checkpoint (no dummy forward needed).
        for name in ("_u", "_v"):
            key = prefix + name
            if getattr(self, name) is None and key in state_dict:
                setattr(self, name, torch.empty_like(state_dict[key]))
        self._cache = None
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    # ---- the operator and its adjoint --------------------------------------------------------
    def _symmetric_padding(self) -> Optional[Tuple[int, int]]:
        l, r, t, b = self.padding
        if self.padding_mode == "zeros" and l == r and t == b:
            return (t, l)
        return None

    def operator(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """A_W x (bias-free). Linear: (in,) → (out,); conv2d: (N, C_in, H, W) → (N, C_out, H_out, W_out)."""
        if self.kind == "linear":
            return torch.mv(weight, x)
        sym = self._symmetric_padding()
        if sym is None:
            mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
            x = F.pad(x, self.padding, mode=mode)
            sym = (0, 0)
        return F.conv2d(x, weight, None, self.stride, sym, self.dilation, self.groups)

    def adjoint(self, y: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """A_Wᵀ y, the exact adjoint of :meth:`operator`."""
        if self.kind == "linear":
            return torch.mv(weight.t(), y)
        shape = self._v.shape
        if self.padding_mode != "zeros":
            # Reflect/replicate/circular padding: let autograd build the adjoint (a VJP).
            with torch.enable_grad():
                x = torch.zeros(shape, device=y.device, dtype=y.dtype, requires_grad=True)
                (out,) = torch.autograd.grad(self.operator(x, weight.detach()), x, y)
            return out
        l, r, t, b = self.padding
        hp, wp = shape[-2] + t + b, shape[-1] + l + r
        kh, kw = weight.shape[-2:]
        base_h = (y.shape[-2] - 1) * self.stride[0] + self.dilation[0] * (kh - 1) + 1
        base_w = (y.shape[-1] - 1) * self.stride[1] + self.dilation[1] * (kw - 1) + 1
        # Rows/columns the conv never reads (hp - base < stride) get a zero adjoint: output_padding.
        out_pad = (hp - base_h, wp - base_w)
        sym = self._symmetric_padding()
        if sym is not None:
            return F.conv_transpose2d(y, weight, None, self.stride, sym, out_pad, self.groups, self.dilation)
        x = F.conv_transpose2d(y, weight, None, self.stride, 0, out_pad, self.groups, self.dilation)
        return x[..., t:t + shape[-2], l:l + shape[-1]]

    # ---- power iteration --------------------------------------------------------------------
    @torch.no_grad()
    def power_iteration(self, weight: torch.Tensor, n_iter: int) -> None:
        """Run ``n_iter`` full power iterations on the buffers (in place)."""
        if self._v is None:
            raise RuntimeError("SpectralNorm: singular vectors not initialised (input size unknown)")
        weight = weight.detach()
        u, v = self._u, self._v
        for _ in range(n_iter):
            v = _normalize(self.adjoint(u, weight), self.eps)
            u = _normalize(self.operator(v, weight), self.eps)
        if n_iter:
            self._u.copy_(u)
            self._v.copy_(v)
            self._cache = None

    def sigma(self, weight: torch.Tensor) -> torch.Tensor:
        """Current estimate of ‖A_W‖₂ = ‖A_W v‖ (0-dim, differentiable w.r.t. ``weight``)."""
        return self.operator(self._v, weight).norm().clamp_min(self.eps)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if self._v is None or self.padding is None:
            raise RuntimeError(
                "SpectralNorm: the conv input size is unknown. Pass input_size=(C, H, W) to lcnnify(), "
                "run one forward pass, or load a state_dict that contains the '_u'/'_v' buffers.")
        if self.training and not self.frozen and self.n_power_iterations > 0:
            with torch.no_grad():
                w = weight.detach()
                u = self._u
                for _ in range(self.n_power_iterations - 1):
                    u = _normalize(self.operator(_normalize(self.adjoint(u, w), self.eps), w), self.eps)
                v = _normalize(self.adjoint(u, w), self.eps)
            av = self.operator(v, weight)
            sigma = av.norm().clamp_min(self.eps)
            with torch.no_grad():
                self._v.copy_(v)
                self._u.copy_(av.detach() / sigma.detach())
            self._cache = None
            return weight / sigma
        if torch.is_grad_enabled() and weight.requires_grad:
            return weight / self.sigma(weight)
        key = (weight._version, weight.data_ptr(), weight.dtype, self._v._version, self._v.data_ptr())
        if self._cache is None or self._cache[0] != key:
            with torch.no_grad():
                self._cache = (key, weight / self.sigma(weight))
        return self._cache[1]

    def extra_repr(self) -> str:
        s = f"kind={self.kind}, input_shape={self.input_shape}"
        if self.kind == "conv2d":
            s += f", stride={self.stride}, padding={self.padding}, dilation={self.dilation}, groups={self.groups}"
        return s


def _conv_padding(conv: nn.Conv2d, input_hw: Optional[Sequence[int]]) -> Tuple[int, int, int, int]:
    """Explicit (left, right, top, bottom) padding of ``conv`` for inputs of spatial size ``input_hw``."""
    from timm.layers import Conv2dSame
    from timm.layers.padding import pad_same_arg

    kh, kw = conv.kernel_size
    if isinstance(conv, Conv2dSame) or getattr(conv, "same_pad", False):
        if input_hw is None:
            raise ValueError(f"{type(conv).__name__} pads dynamically: the input size must be known")
        # timm computes TF-'same' padding from the actual input size; use its own helper.
        return tuple(pad_same_arg(list(input_hw), [kh, kw], list(conv.stride), list(conv.dilation)))
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            return (0, 0, 0, 0)
        # 'same' (stride 1): total d(k-1), the odd extra element goes to the right/bottom.
        th, tw = conv.dilation[0] * (kh - 1), conv.dilation[1] * (kw - 1)
        return (tw // 2, tw - tw // 2, th // 2, th - th // 2)
    ph, pw = conv.padding
    return (pw, pw, ph, ph)


def spectral_norm(module: nn.Module, input_shape: Optional[Sequence[int]] = None, *,
                  n_power_iterations: int = 1, init_iterations: int = 3) -> nn.Module:
    """Register :class:`SpectralNorm` on ``module.weight`` (an ``nn.Linear`` or ``nn.Conv2d``).

    For convolutions ``input_shape=(C, H, W)`` is the per-sample input shape the operator norm is
    computed for; if None, it is taken from the first forward (a one-shot pre-hook) or from a loaded
    state_dict. Returns ``module``.

    State-dict layout (like torch's legacy ``spectral_norm``): ``weight`` holds the *unnormalised*
    weight, ``weight_u``/``weight_v`` the singular vectors. Keeping the plain ``weight`` key means
    ordinary checkpoints (e.g. timm ImageNet weights) load into a converted model, and timm's
    classifier/stem adaptation, which works on ``<layer>.weight``, keeps working.
    """
    if isinstance(module, nn.Linear):
        sn = SpectralNorm(module.weight.detach(), "linear", n_power_iterations=n_power_iterations,
                          init_iterations=init_iterations)
    elif isinstance(module, nn.Conv2d):
        hw = None
        if input_shape is not None:
            input_shape = tuple(int(s) for s in input_shape)
            hw = input_shape[1:]
        # Dynamic TF-'same' padding with an unknown input size: the padding is set on first forward.
        padding = None if hw is None and _needs_input_size(module) else _conv_padding(module, hw)
        sn = SpectralNorm(
            module.weight.detach(), "conv2d", input_shape=input_shape, stride=module.stride, padding=padding,
            dilation=module.dilation, groups=module.groups, padding_mode=module.padding_mode,
            n_power_iterations=n_power_iterations, init_iterations=init_iterations,
        )
        if sn._v is None or sn.padding is None:
            module._lcnn_lazy_hook = module.register_forward_pre_hook(_lazy_init_hook)
    else:
        raise TypeError(f"spectral_norm supports nn.Linear and nn.Conv2d, got {type(module).__name__}")
    # A lazily-shaped conv cannot be evaluated yet: skip parametrize's eager consistency check.
    lazy = sn._v is None or sn.padding is None
    parametrize.register_parametrization(module, "weight", sn, unsafe=lazy)
    module.register_state_dict_post_hook(_sn_state_dict_hook)
    module.register_load_state_dict_pre_hook(_sn_load_pre_hook)
    return module


# parametrize's internal key  <->  public key
_SN_KEYS = (("parametrizations.weight.original", "weight"),
            ("parametrizations.weight.0._u", "weight_u"),
            ("parametrizations.weight.0._v", "weight_v"))


def _sn_state_dict_hook(module: nn.Module, state_dict, prefix: str, local_metadata) -> None:
    for internal, public in _SN_KEYS:
        if prefix + internal in state_dict:
            state_dict[prefix + public] = state_dict.pop(prefix + internal)


def _sn_load_pre_hook(module: nn.Module, state_dict, prefix: str, local_metadata, strict, missing_keys,
                      unexpected_keys, error_msgs) -> None:
    for internal, public in _SN_KEYS:
        if prefix + public in state_dict and prefix + internal not in state_dict:
            state_dict[prefix + internal] = state_dict.pop(prefix + public)


def _needs_input_size(conv: nn.Conv2d) -> bool:
    from timm.layers import Conv2dSame
    return isinstance(conv, Conv2dSame) or bool(getattr(conv, "same_pad", False))


def _lazy_init_hook(module: nn.Module, args) -> None:
    if not parametrize.is_parametrized(module, "weight"):
        return
    sn = module.parametrizations.weight[0]
    x = args[0]
    if sn.padding is None:
        sn.padding = _conv_padding(module, x.shape[-2:])
    if sn._v is None:
        sn.initialize(module.parametrizations.weight.original, tuple(x.shape[1:]))


def spectral_norm_modules(model: nn.Module) -> Iterator[Tuple[nn.Module, SpectralNorm]]:
    """Yield (layer, SpectralNorm parametrization) for every spectrally normalised weight."""
    for m in model.modules():
        if parametrize.is_parametrized(m, "weight"):
            for p in m.parametrizations.weight:
                if isinstance(p, SpectralNorm):
                    yield m, p


@torch.no_grad()
def converge_spectral_norms(model: nn.Module, n_iter: int = 50, tol: Optional[float] = None) -> int:
    """Run up to ``n_iter`` extra power iterations on every spectrally normalised layer.

    Use after training with few iterations, after averaging weights (EMA/SWA — averaged singular
    vectors are not singular vectors), or before export. If ``tol`` is given, stops a layer once σ
    changes by less than ``tol`` (relative). Returns the number of layers processed.
    """
    count = 0
    for m, sn in spectral_norm_modules(model):
        if sn._v is None:
            continue
        w = m.parametrizations.weight.original
        prev = sn.sigma(w)
        for _ in range(n_iter):
            sn.power_iteration(w, 1)
            if tol is not None:
                cur = sn.sigma(w)
                if abs(float(cur - prev)) <= tol * float(cur):
                    break
                prev = cur
        count += 1
    return count


class _AllReduceSum(torch.autograd.Function):
    """Differentiable all-reduce (sum): its gradient is the all-reduced gradient, itself differentiable
    (so double backward through synchronised BatchNorm works)."""

    @staticmethod
    def forward(ctx, t: torch.Tensor, group) -> torch.Tensor:  # type: ignore[override]
        import torch.distributed as dist

        ctx.group = group
        out = t.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return _AllReduceSum.apply(grad.contiguous(), ctx.group), None


def _world_size(group) -> int:
    import torch.distributed as dist

    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def sync_batchnorm(model: nn.Module, process_group=None) -> nn.Module:
    """Synchronise batch statistics across DDP processes: γ-Lipschitz BNs sync themselves (any
    backend); ordinary BatchNorms become ``nn.SyncBatchNorm`` (which PyTorch supports on GPUs only,
    so they are left alone on CPU). Returns the model."""
    for m in model.modules():
        if isinstance(m, LipschitzBatchNorm2d):
            m.process_group = process_group if process_group is not None else _default_group()
    p = next(model.parameters(), None)
    if p is not None and p.device.type != "cpu":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model, process_group)
    return model


def _default_group():
    import torch.distributed as dist

    return dist.group.WORLD


@contextlib.contextmanager
def frozen_state(model: nn.Module) -> Iterator[nn.Module]:
    """Context in which forward passes change no state: no power iteration, no BatchNorm
    running-statistics update (batch statistics are still *used* in training mode).

    Used for the second forward of finite-difference GradReg, so one optimisation step updates
    BatchNorm statistics and spectral-norm vectors exactly once.
    """
    saved = []
    for m in model.modules():
        if isinstance(m, LipschitzBatchNorm2d):
            saved.append((m, "update_stats", m.update_stats))
            m.update_stats = False
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            saved.append((m, "track_running_stats", m.track_running_stats))
            m.track_running_stats = False
        elif isinstance(m, SpectralNorm):
            saved.append((m, "frozen", m.frozen))
            m.frozen = True
    try:
        yield model
    finally:
        for m, name, value in saved:
            setattr(m, name, value)
