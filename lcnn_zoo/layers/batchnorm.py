"""γ-Lipschitz BatchNorm (paper §3.4.2), with batch statistics synchronised across DDP processes.

In eval mode BatchNorm is the diagonal affine map x ↦ w·(x − μ)/sqrt(var + eps) + b, whose
Lipschitz constant is ‖BN‖₂ = maxᵢ |wᵢ| / sqrt(running_varᵢ + eps). The γ-Lipschitz layer scales
it by min(γ, ‖BN‖₂)/‖BN‖₂, so its Lipschitz constant is at most γ. Tensors are NCHW.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from . import prepared

__all__ = ["LipschitzBatchNorm2d", "LipschitzBatchNormAct2d", "sync_batchnorm", "DEFAULT_GAMMA_INIT"]

DEFAULT_GAMMA_INIT = 10.0  # the reference code's initial γ


def _inv_softplus(y: float) -> float:
    return y + math.log(-math.expm1(-y))


class LipschitzBatchNorm2d(nn.Module):
    """γ-Lipschitz BatchNorm (paper §3.4.2) with a learnable γ ≥ 1.

    output = min(γ, ‖BN‖₂) · BN(x) / ‖BN‖₂,   ‖BN‖₂ = maxᵢ |wᵢ| / sqrt(running_varᵢ + eps)

    (wᵢ = 1 when ``affine=False``). In eval mode BN is the diagonal affine map with that norm, so
    the layer's Lipschitz constant is ≤ γ exactly; in training mode BN(x) uses batch statistics
    (like :class:`torch.nn.BatchNorm2d`): the bound is an eval-mode property. γ = 1 + softplus(``gamma_raw``).

    * The scale uses the running variance before this batch updates it, folded into BatchNorm's
      weight (as in the reference implementations). A forward in :func:`~lcnn_zoo.layers.frozen_state`
      (FD GradReg's second pass, a gradient-checkpoint recompute) reuses the scale of the last forward
      that updated the statistics, so both compute one function.
    * Buffers and parameters keep the ``torch.nn.BatchNorm2d`` names (``weight``, ``bias``,
      ``running_mean``, ``running_var``, ``num_batches_tracked``). Deliberately *not* a ``_BatchNorm``
      subclass, so that generic rewrites such as ``nn.SyncBatchNorm.convert_sync_batchnorm`` cannot
      silently drop the clipping.

    Args:
        num_features: C of an (N, C, H, W) input (> 0).
        eps: added to the variance, as in ``nn.BatchNorm2d``.
        momentum: of the running statistics' exponential average; the first 1/momentum batches are
            averaged cumulatively (no trace of the initial (0, 1) statistics). None: the cumulative
            average throughout.
        affine: learnable per-channel weight/bias. The paper uses ``False``.
        gamma_init: initial γ (finite, > 1). The reference code uses 10.
        device: device of the parameters and buffers.
        dtype: dtype of the floating-point parameters and buffers.

    Shape:
        - Input: (N, C, H, W), any memory format.
        - Output: (N, C, H, W), same shape as the input.

    Raises:
        ValueError: ``gamma_init`` is not finite and > 1, or ``num_features`` is not positive; at
            forward, an input that is not 4-D.
    """

    if TYPE_CHECKING:  # registered in __init__ (declared for type checkers only: TorchScript reads annotations)
        weight: Optional[nn.Parameter]
        bias: Optional[nn.Parameter]
        running_mean: torch.Tensor
        running_var: torch.Tensor
        num_batches_tracked: torch.Tensor
        scale_var: torch.Tensor
        batch_mean: torch.Tensor
        batch_var: torch.Tensor

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = False, gamma_init: float = DEFAULT_GAMMA_INIT, device=None, dtype=None) -> None:
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
        # The running variance the last recording forward computed its γ-clip from: a frozen forward
        # (FD GradReg's second pass, a gradient-checkpoint recompute) clips with the same scale.
        self.register_buffer("scale_var", torch.ones(num_features, **fk), persistent=False)
        # The last recorded batch's statistics (F.batch_norm writes them at momentum 1): see _early_momentum.
        self.register_buffer("batch_mean", torch.zeros(num_features, **fk), persistent=False)
        self.register_buffer("batch_var", torch.ones(num_features, **fk), persistent=False)
        self.update_stats = True  # False inside `frozen_state`: batch stats are used, not recorded
        self._recorded: Optional[Tuple[int, int, int]] = None  # (n, data_ptr, _version): see _record_momentum
        self._late = False  # n ≥ 1/momentum: the plain exponential average from now on
        self.process_group: Optional[Any] = None  # set by `sync_batchnorm`: batch statistics over all DDP processes

    @property
    def gamma(self) -> torch.Tensor:
        """The Lipschitz cap γ ≥ 1 (0-dim tensor, carries grad)."""
        return 1.0 + F.softplus(self.gamma_raw)

    def bn_lipschitz(self, running_var: Optional[torch.Tensor] = None) -> torch.Tensor:
        """‖BN‖₂ of the eval-mode BatchNorm (0-dim tensor): maxᵢ |wᵢ| / sqrt(running_varᵢ + eps)."""
        var = self.running_var if running_var is None else running_var
        inv_std = torch.rsqrt(var + self.eps)
        if self.weight is not None:
            inv_std = self.weight.abs() * inv_std
        return inv_std.max()

    def lipschitz_scale(self, running_var: Optional[torch.Tensor] = None) -> torch.Tensor:
        """min(γ, ‖BN‖₂) / ‖BN‖₂ — the factor applied to the BatchNorm output (0-dim)."""
        # Written as γ / max(‖BN‖, γ): no division by zero when ‖BN‖ = 0 (e.g. timm's zero-init last BN
        # of a residual branch), and finite gradients everywhere.
        gamma = self.gamma
        return gamma / torch.maximum(self.bn_lipschitz(running_var), gamma)

    def reset_running_stats(self) -> None:
        """Reset the running statistics to (mean 0, variance 1) and the batch count to 0, as ``nn.BatchNorm2d``."""
        self._recorded, self._late = None, False
        self.running_mean.zero_()
        self.running_var.fill_(1.0)
        self.scale_var.fill_(1.0)
        self.num_batches_tracked.zero_()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._recorded, self._late = None, False  # the loaded count is read at the next recorded batch
        with torch.no_grad():
            self.scale_var.copy_(self.running_var)

    def _scaled_affine(self, var: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """BatchNorm's (weight, bias) with the Lipschitz scale folded in: (s·w, s·b), or s per channel."""
        if self.weight is None:
            # A real (C,) tensor, not a stride-0 expand: F.batch_norm's CPU backward gives wrong
            # gradients for channels_last inputs with an expanded weight.
            return _ChannelScale.apply(self.gamma_raw, var, self.eps, self.num_features), None
        scale = self.lipschitz_scale(var)
        assert self.bias is not None  # affine: weight and bias are both parameters
        return self.weight * scale, self.bias * scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """BatchNorm of ``x`` scaled by :meth:`lipschitz_scale` (training mode updates the running statistics,
        except within :func:`~lcnn_zoo.layers.frozen_state`)."""
        if isinstance(x, torch.Tensor) and x.dim() != 4:  # (an FX proxy is not checked)
            raise ValueError(f"{type(self).__name__} expects a 4D (N, C, H, W) input, got shape {tuple(x.shape)}")
        # The scale is folded into BatchNorm's affine weight, so F.batch_norm saves only its input for
        # backward (multiplying its output by the scale would keep one more activation-sized tensor per
        # layer) and no extra pass over the activation is made. It is computed from the running variance
        # *before* this batch updates it (in eval mode there is no update); the gradient still reaches γ
        # (and w, b) through the folded weight.
        record = self.training and self.update_stats
        # The clip weight the model's pre-forward computed for all BatchNorms at once, if any; it also
        # made the scale-variance copy of a recording forward.
        given = prepared.for_graph(self, record) if self.training else None  # compiled: the clip, computed before
        ready = prepared.take(self, (self.gamma_raw, self.scale_var), record) if self.training else None
        if given is not None:
            weight, bias = given[0], None
        elif ready is not None:
            weight, bias = ready, None
        else:
            if record:  # the scale of this step: the running variance before this batch updates it
                with torch.no_grad():
                    self.scale_var.copy_(self.running_var)
            weight, bias = self._scaled_affine(self.scale_var if self.training else self.running_var)
        momentum = 0.0 if self.momentum is None else self.momentum
        compiled = prepared.tracing()  # (read once: the two branches below must agree)
        if record:
            # Counted here, not in the pre-forward: _record_momentum tells this increment from other
            # writes by the counter's version, which a foreach increment does not move under a
            # dispatch mode (so the step would read the counter on the host).
            self.num_batches_tracked.add_(1)
            if not compiled:
                momentum = self._record_momentum()
        if self.training and self.process_group is not None and _world_size(self.process_group) > 1:
            return self._synced_batch_norm(x, weight, bias, record, momentum)
        if record and compiled:
            # Compiled, n is a tensor (a Python count would recompile the graph at every step): this
            # batch's statistics land in two vectors (momentum 1), then the running ones move towards
            # them by max(momentum, 1/n) (1/n: the cumulative average) in tensor ops, which inductor fuses.
            out = F.batch_norm(x, self.batch_mean, self.batch_var, weight, bias, True, 1.0, self.eps)
            with torch.no_grad():
                step = (given[1] if given is not None and len(given) > 1
                        else self._early_momentum()).to(self.running_var.dtype)
                self.running_mean.lerp_(self.batch_mean, step)
                self.running_var.lerp_(self.batch_var, step)
            return out
        if self.training and not record:
            # A frozen forward passes the running statistics with momentum 0 (they stay as they are)
            # rather than None: F.batch_norm then saves the same tensors for backward as the recording
            # forward, which a gradient-checkpoint recompute must (torch.utils.checkpoint checks).
            momentum = 0.0
        return F.batch_norm(x, self.running_mean, self.running_var, weight, bias, self.training, momentum, self.eps)

    def _record_momentum(self) -> float:
        """Eager mode: max(momentum, 1/n) for the n-th recorded batch (see :meth:`_early_momentum`; 1/n,
        the cumulative average, when ``momentum`` is None) as a Python float, so F.batch_norm makes the
        update itself (no extra op). Once n ≥ 1/momentum it is the momentum for good (until a reset or
        a load). Before that n is counted here and read from the tensor (one device sync, which a GPU
        step must not make at every step) only when it changed otherwise: the first step, after a load
        or a reset, after compiled or DDP-broadcast writes. ``Tensor._version`` (no public API exposes
        it) counts a tensor's in-place writes; the increment just made is one."""
        momentum = self.momentum
        if self._late and momentum is not None:
            return momentum
        counter = self.num_batches_tracked
        key = (counter.data_ptr(), counter._version)
        mirror = self._recorded
        n = mirror[0] + 1 if mirror is not None and mirror[1:] == (key[0], key[1] - 1) else int(counter)
        self._recorded = (n, *key)
        if momentum is None:
            return 1.0 / n
        self._late = n * momentum >= 1.0
        return max(momentum, 1.0 / n)

    def _early_momentum(self) -> torch.Tensor:
        """max(momentum, 1/n) for the n-th recorded batch (0-dim tensor: no device sync).

        The first 1/momentum batches are averaged, so the running statistics hold no trace of their
        initial (0, 1) and eval mode is right after a few steps, in any training loop: the plain
        exponential average keeps (1 − momentum)ⁿ of the initial variance of 1 after n steps, while an
        LCNN's first activations have a variance near 1e-3. After those batches (and for loaded
        statistics, which have seen many) it is the plain exponential average. With ``momentum=None`` it
        is 1/n throughout: the cumulative average."""
        inverse = self.num_batches_tracked.reciprocal()
        return inverse if self.momentum is None else torch.clamp_min(inverse, self.momentum)

    def _synced_batch_norm(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], record: bool,
                           momentum: Union[float, torch.Tensor]) -> torch.Tensor:
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
                if prepared.tracing():
                    momentum = self._early_momentum().to(mean.dtype)
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), momentum)
                unbiased = var.detach() * (n.detach() / (n.detach() - 1).clamp_min(1.0))
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), momentum)
        y = (x - mean[None, :, None, None]) * (torch.rsqrt(var + self.eps) * weight.to(x.dtype))[None, :, None, None]
        if bias is not None:
            y = y + bias.to(x.dtype)[None, :, None, None]
        return y

    def extra_repr(self) -> str:
        """The constructor's settings and the current γ, as printed in the module's repr."""
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
                f"gamma={self.gamma.item():.4g}")


class LipschitzBatchNormAct2d(LipschitzBatchNorm2d):
    """:class:`LipschitzBatchNorm2d` followed by dropout and activation modules: act(drop(γ-BN(x))).

    The counterpart of timm's ``BatchNormAct2d`` (same ``drop``/``act`` attribute names, so
    state-dict keys line up).

    Args:
        num_features: C of an (N, C, H, W) input.
        act: the activation module (default: ``nn.Identity``).
        drop: the dropout module (default: ``nn.Identity``).
        **kwargs: the other arguments of :class:`LipschitzBatchNorm2d` (``eps``, ``momentum``,
            ``affine``, ``gamma_init``, ``device``, ``dtype``).

    Shape:
        - Input: (N, C, H, W).
        - Output: (N, C, H, W) for an elementwise ``act`` and ``drop``.

    Raises:
        ValueError: as :class:`LipschitzBatchNorm2d`.
    """

    def __init__(self, num_features: int, act: Optional[nn.Module] = None, drop: Optional[nn.Module] = None,
                 **kwargs) -> None:
        super().__init__(num_features, **kwargs)
        self.drop = drop if drop is not None else nn.Identity()
        self.act = act if act is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """act(drop(γ-BN(x)))."""
        return self.act(self.drop(super().forward(x)))


class _ChannelScale(torch.autograd.Function):
    """The γ-clip of a BatchNorm without affine weight, as a (C,) weight: every entry is
    s = min(γ, ‖BN‖₂)/‖BN‖₂ = min(1, γ·sqrt(min(var) + eps)), γ = 1 + softplus(gamma_raw).

    The same value as :meth:`LipschitzBatchNorm2d.lipschitz_scale`, in a handful of small ops with a
    two-op backward (∂s/∂gamma_raw = sigmoid(gamma_raw)·sqrt(min var + eps) where s < 1, else 0),
    instead of autograd through max/maximum/repeat. The running variance is a buffer (no gradient).
    Differentiable backward ops, so a create_graph backward records it."""

    @staticmethod
    def forward(ctx, gamma_raw: torch.Tensor, var: torch.Tensor, eps: float, channels: int) -> torch.Tensor:
        inv_norm = var.amin().add_(eps).sqrt_()  # 1 / ‖BN‖₂
        unclipped = torch.addcmul(inv_norm, F.softplus(gamma_raw), inv_norm)  # γ / ‖BN‖₂
        ctx.save_for_backward(gamma_raw, inv_norm, unclipped)
        return unclipped.clamp_max(1.0).expand(channels).contiguous()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gamma_raw, inv_norm, unclipped = ctx.saved_tensors
        slope = torch.sigmoid(gamma_raw).mul_(inv_norm).mul_(unclipped < 1.0)
        return grad.sum() * slope, None, None, None


class _AllReduceSum(torch.autograd.Function):
    """Differentiable all-reduce (sum): its gradient is the all-reduced gradient, itself differentiable
    (so double backward through synchronised BatchNorm works)."""

    @staticmethod
    def forward(ctx, t: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        out = t.clone()
        torch.distributed.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _AllReduceSum.apply(grad.contiguous(), ctx.group), None


def _world_size(group) -> int:
    dist = torch.distributed
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def sync_batchnorm(model: nn.Module, process_group=None) -> nn.Module:
    """Synchronise batch statistics across DDP processes: γ-Lipschitz BNs sync themselves (any
    backend); ordinary BatchNorms become ``nn.SyncBatchNorm`` (which PyTorch supports on GPUs only,
    so they are left alone on CPU). Returns the model."""
    group = process_group if process_group is not None else torch.distributed.group.WORLD
    for m in model.modules():
        if isinstance(m, LipschitzBatchNorm2d):
            m.process_group = group
    p = next(model.parameters(), None)
    if p is not None and p.device.type != "cpu":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model, process_group)
    return model
