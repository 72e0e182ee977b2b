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

import logging
import math
import weakref
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from .layers import CenteredSoftplus, LipschitzBatchNorm2d, frozen_state
from .layers.preforward import prepared_penalty_terms

__all__ = ["LCNNPenalty", "attach_penalty", "PenaltyHandle", "GradRegOutput", "gradreg_exact", "gradreg_fd_backward",
           "param_groups",
           "curvature_parameters"]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _curvature_layers(model: nn.Module) -> Tuple[List[CenteredSoftplus], List[LipschitzBatchNorm2d]]:
    """Every centered softplus and every γ-Lipschitz BatchNorm of ``model``, in module order."""
    acts, bns = [], []
    for m in model.modules():
        if isinstance(m, CenteredSoftplus):
            acts.append(m)
        elif isinstance(m, LipschitzBatchNorm2d):
            bns.append(m)
    return acts, bns


def _zero(model: nn.Module) -> torch.Tensor:
    """A 0-dim zero on the model's device (the penalty of a model without β or γ)."""
    ref = next(model.parameters(), None)
    return torch.zeros((), device=ref.device if ref is not None else None)


def curvature_parameters(model: nn.Module) -> Dict[str, List[nn.Parameter]]:
    """The learnable β (``log_beta``) and γ (``gamma_raw``) parameters of ``model``."""
    acts, bns = _curvature_layers(model)
    return {"beta": [a.log_beta for a in acts if isinstance(a.log_beta, nn.Parameter)],
            "gamma": [b.gamma_raw for b in bns]}


class LCNNPenalty:
    """The LCNN penalty R = λβ · Σᵢ βᵢ + λγ · Σⱼ log γⱼ (paper eq. 5), to add to the loss.

    The sums run over every CenteredSoftplus β and γ-Lipschitz BatchNorm γ of the model, found by
    walking ``model.modules()`` (no forward hooks). Calling the penalty on a model returns R, a 0-dim
    tensor differentiable w.r.t. the β and γ parameters (0 for a model without such layers).

    Args:
        lambda_beta: λβ (≥ 0). The default is the reference code's (``reg_beta`` in its
            ``train_curvature.py``).
        lambda_gamma: λγ (≥ 0); likewise ``reg_gamma``.

    Raises:
        ValueError: a λ is negative.

    Example::

        loss = F.cross_entropy(model(x), y) + LCNNPenalty()(model)
    """

    def __init__(self, lambda_beta: float = 1e-3, lambda_gamma: float = 1e-3) -> None:
        if lambda_beta < 0 or lambda_gamma < 0:
            raise ValueError(f"LCNNPenalty: lambdas must be >= 0, got {lambda_beta}, {lambda_gamma}")
        self.lambda_beta = float(lambda_beta)
        self.lambda_gamma = float(lambda_gamma)

    @staticmethod
    def terms(model: nn.Module) -> Dict[str, torch.Tensor]:
        """{"sum_beta": Σβ, "sum_log_gamma": Σ log γ} as 0-dim tensors (for logging)."""
        acts, bns = _curvature_layers(model)
        betas, gammas = [a.beta for a in acts], [b.gamma for b in bns]
        zero = _zero(model)
        return {
            "sum_beta": torch.stack(betas).sum() if betas else zero,
            "sum_log_gamma": torch.stack(gammas).log().sum() if gammas else zero,
        }

    def __call__(self, model: nn.Module) -> torch.Tensor:
        """λβ·Σβ + λγ·Σ log γ (0-dim), the value of :meth:`terms` combined, in a constant number of
        ``torch._foreach_*`` ops for all layers (forward and backward) instead of a few per layer."""
        acts, bns = _curvature_layers(model)
        if not acts and not bns:
            return _zero(model)
        ready = prepared_penalty_terms(acts, bns)
        if ready is not None:  # the sums the model's pre-forward computed with β and the γ-clips
            sum_beta, sum_log_gamma = ready
            return torch.add(sum_beta * self.lambda_beta, sum_log_gamma, alpha=self.lambda_gamma)
        log_betas, gamma_raws = [a.log_beta for a in acts], [b.gamma_raw for b in bns]
        return _PenaltyFn.apply(self.lambda_beta, self.lambda_gamma, len(log_betas), *log_betas, *gamma_raws)

    def __repr__(self) -> str:
        return f"LCNNPenalty(lambda_beta={self.lambda_beta}, lambda_gamma={self.lambda_gamma})"


# ---- the penalty at every optimizer step, for loops that only compute the task loss ------------
# model → its attached penalty, what the step hook applies; weak, so that a model that is gone drops out.
_ATTACHED: "weakref.WeakKeyDictionary[nn.Module, LCNNPenalty]" = weakref.WeakKeyDictionary()
# Models whose attached penalty has said, once, that an optimizer step applied it (timm's train.py
# logs nothing about model keywords; a user must be able to see that the penalty is on, and its λ).
_ANNOUNCED: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()
_logger = logging.getLogger(__name__)
# One global optimizer step pre-hook, registered at the first attach_penalty and kept: the only hook that reaches
# an optimizer created after the model (timm's train.py builds it later); a per-optimizer hook needs the optimizer.
_STEP_HOOK = None


class PenaltyHandle:
    """Returned by :func:`attach_penalty`; ``remove()`` detaches the penalty from the model."""

    def __init__(self, model: nn.Module) -> None:
        self._model = weakref.ref(model)

    def remove(self) -> None:
        """Detach the penalty from the model (nothing happens if it is gone or detached already)."""
        model = self._model()
        if model is not None:
            _ATTACHED.pop(model, None)


def attach_penalty(model: nn.Module, penalty: Optional[LCNNPenalty] = None) -> PenaltyHandle:
    """Add the LCNN penalty's gradient to ``model``'s β and γ at every optimizer step, so that any
    training loop — timm's train.py, a user's own — trains with loss + R (paper eq. 5) while its
    loss code computes only the task loss.

    R is a function of the parameters alone, so its gradient needs no forward pass: it is added to
    ``.grad`` of the β/γ parameters by a global optimizer step pre-hook (``torch.optim``'s public
    ``register_optimizer_step_pre_hook``), once per ``optimizer.step()`` of an optimizer that holds
    them. So with gradient accumulation it is added once per step; under AMP, ``GradScaler.step``
    unscales the gradients before it calls ``step`` (an optimizer that unscales inside its own step,
    such as a fused Adam, gets R's gradient multiplied by its ``grad_scale``), and a step the scaler
    skips adds nothing. Gradient clipping before the step does not clip R's gradient (a handful of
    scalars; clipping would have to see them first). An EMA copy of the model is not penalised (its
    parameters are in no optimizer). It is *instead of* :class:`LCNNPenalty` in the loss, never
    with it: both would count the penalty twice (``lcnn-zoo train --reg lcnn`` refuses
    ``--model-kwargs lcnn_penalty``).

    Args:
        model: an LCNN (its ``CenteredSoftplus``/``LipschitzBatchNorm2d`` layers); kept by weak reference.
        penalty: the weights (default :class:`LCNNPenalty`'s, the reference code's 1e-3 each).

    Returns:
        a handle whose ``remove()`` stops it. Also reachable as the model keyword argument
        ``lcnn_penalty=<λ>`` of the zoo's ``lcnn_*`` models (λβ = λγ = λ; ``True`` for the defaults),
        which is how timm's train.py passes it: ``--model-kwargs lcnn_penalty=1e-3``.

    Raises:
        ValueError: ``model`` has no learnable β or γ (it is not an LCNN).
    """
    global _STEP_HOOK
    if not any(curvature_parameters(model).values()):
        raise ValueError(f"attach_penalty: {type(model).__name__} has no learnable β or γ to penalise "
                         "(is it an LCNN?)")
    _ATTACHED[model] = penalty if penalty is not None else LCNNPenalty()
    if _STEP_HOOK is None:
        _STEP_HOOK = register_optimizer_step_pre_hook(_add_penalty_gradients)
    return PenaltyHandle(model)


def _add_penalty_gradients(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    if not _ATTACHED:
        return
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for model, penalty in list(_ATTACHED.items()):
        params = [p for ps in curvature_parameters(model).values() for p in ps if p.requires_grad and id(p) in held]
        if not params:
            continue
        with torch.enable_grad():
            grads = torch.autograd.grad(penalty(model), params, allow_unused=True)
        scale = getattr(optimizer, "grad_scale", None)  # gradients still scaled (an optimizer that unscales itself)
        with torch.no_grad():
            for p, g in zip(params, grads):
                if g is None:
                    continue
                g = g if scale is None else g * scale.to(g)
                if p.grad is None:
                    p.grad = g.to(p.dtype)
                else:
                    p.grad.add_(g)
        if model not in _ANNOUNCED:
            _ANNOUNCED.add(model)
            _logger.info("LCNN penalty (lcnn_zoo.attach_penalty) applied at this and every optimizer step: "
                         "λβ %g, λγ %g on the %d β/γ parameters of %s the optimizer holds",
                         penalty.lambda_beta, penalty.lambda_gamma, len(params), type(model).__name__)


#: what the ``torch._foreach_*`` ops take (and return: a tuple)
_Tensors = Union[Tuple[torch.Tensor, ...], List[torch.Tensor]]


class _PenaltyFn(torch.autograd.Function):
    """λβ·Σᵢ exp(log βᵢ) + λγ·Σⱼ log(1 + softplus(rⱼ)) over two lists of 0-dim tensors, with foreach ops.

    ∂/∂log βᵢ = λβ·βᵢ;  ∂/∂rⱼ = λγ·sigmoid(rⱼ)/γⱼ, with sigmoid(r) = −expm1(−softplus(r))."""

    @staticmethod
    def forward(ctx, lambda_beta: float, lambda_gamma: float, n_beta: int, *params: torch.Tensor
                ) -> torch.Tensor:
        log_betas, raws = list(params[:n_beta]), list(params[n_beta:])
        betas: _Tensors = torch._foreach_exp(log_betas) if log_betas else []
        terms: _Tensors = torch._foreach_mul(betas, lambda_beta) if betas else []
        softplus: _Tensors = []
        if raws:  # softplus(r) = max(r, 0) + log1p(exp(−|r|)), without overflow
            softplus = torch._foreach_log1p(torch._foreach_exp(torch._foreach_neg(torch._foreach_abs(raws))))
            torch._foreach_add_(softplus, torch._foreach_maximum(raws, 0.0))
            log_gamma = torch._foreach_log1p(softplus)
            torch._foreach_mul_(log_gamma, lambda_gamma)
            terms = [*terms, *log_gamma]  # (not terms + log_gamma: [] + a tuple is a TypeError)
        ctx.n_beta, ctx.lambdas = n_beta, (lambda_beta, lambda_gamma)
        ctx.save_for_backward(*betas, *softplus)
        return torch.stack(terms).sum()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        saved = ctx.saved_tensors
        betas, softplus = list(saved[:ctx.n_beta]), list(saved[ctx.n_beta:])
        lambda_beta, lambda_gamma = ctx.lambdas
        grads: _Tensors = torch._foreach_mul(betas, grad * lambda_beta) if betas else []
        if softplus:
            sig = torch._foreach_expm1(torch._foreach_neg(softplus))  # −sigmoid(r)
            torch._foreach_div_(sig, torch._foreach_add(softplus, 1.0))
            torch._foreach_mul_(sig, grad * -lambda_gamma)
            grads = [*grads, *sig]
        return (None, None, None, *grads)


class GradRegOutput(NamedTuple):
    """loss: mean task loss L (0-dim); penalty: R = mean ‖∇ₓℓᵢ‖² (0-dim); logits: (B, K)."""

    loss: torch.Tensor
    penalty: torch.Tensor
    logits: torch.Tensor


def gradreg_exact(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
                  loss_fn: LossFn = F.cross_entropy, *, loss_scale: Optional[torch.Tensor] = None) -> GradRegOutput:
    """Exact GradReg by double backpropagation: the task loss L and R = (1/B) Σᵢ ‖∇ₓℓᵢ‖² (module docs).

    R stays attached to the graph (``create_graph=True``), so ``(L + lambda_grad * R).backward()``
    gives the exact parameter gradient. One forward, and a backward that is differentiated again.

    Args:
        model: the classifier (its current train/eval mode is used).
        inputs: (B, ...) a batch of inputs; the gradient is taken w.r.t. them (in their units).
        targets: what ``loss_fn`` takes, e.g. (B,) class indices.
        loss_fn: ``(logits, targets) -> 0-dim`` *mean* loss over the batch; default cross-entropy.
        loss_scale: with fp16 autocast and a ``GradScaler``, pass ``scaler.get_scale()``: the inner
            input gradient is taken of the scaled loss (so it does not underflow) and unscaled before
            it is squared — PyTorch's gradient-penalty recipe for AMP.

    Returns:
        :class:`GradRegOutput` (loss L, penalty R, logits (B, K)); L and R are 0-dim, R in at least float32.
    """
    x = inputs.detach().requires_grad_(True)
    logits = model(x)
    loss = loss_fn(logits, targets)
    n = x.shape[0]
    outer = loss * n if loss_scale is None else loss * (n * loss_scale)
    (gx,) = torch.autograd.grad(outer, x, create_graph=True)  # per-sample ∇ₓℓᵢ (× loss_scale)
    if loss_scale is not None:
        gx = gx / loss_scale
    penalty = _at_least_fp32(gx).pow(2).sum() / n
    return GradRegOutput(loss, penalty, logits)


def _at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _global_sum(value: torch.Tensor) -> torch.Tensor:
    """Sum over data-parallel processes (identity when not distributed)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        value = value.clone()
        dist.all_reduce(value)
    return value


def gradreg_fd_backward(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, lambda_grad: float, *,
                        loss_fn: LossFn = F.cross_entropy, step: float = 1e-2,
                        extra_loss: Optional[Callable[[], torch.Tensor]] = None,
                        loss_scale: Optional[torch.Tensor] = None, fraction: float = 1.0,
                        generator: Optional[torch.Generator] = None) -> GradRegOutput:
    """Finite-difference GradReg: accumulate ∇θ(L + λ·R) into ``.grad`` with two forward/backward passes.

    No double backward. With G = (∇ₓℓᵢ)ᵢ the per-sample input gradients (held constant),
    ∇θR = (2/B)·∇θ⟨∇ₓΣℓ, G⟩ and the directional derivative is a finite difference along G:

        ∇θ(L + λR) ≈ (1 − c)·∇θL(x) + c·∇θL(x + hG),   c = 2λ/h

    The step h = ``step``·√B / ‖G‖ moves each sample by ``step`` input units in RMS, whatever the
    gradient scale (‖G‖ is summed over data-parallel processes, so every process uses the same h).
    The second pass runs in :func:`~lcnn_zoo.layers.frozen_state`: BatchNorm running statistics and
    the spectral-norm singular vectors are updated once per call, and each γ-Lipschitz BN clips with
    the scale of the first pass (its update of the running variance does not change the second's).
    Both passes are ordinary ``backward()`` calls, so DDP averages the gradients as usual and
    ``torch.compile`` applies. Call it with zeroed gradients (they are rescaled by 1 − c after the
    first pass).

    Args:
        model: the classifier (its current train/eval mode is used).
        inputs: (B, ...) a batch of inputs, in the model's input units.
        targets: what ``loss_fn`` takes, e.g. (B,) class indices.
        lambda_grad: λ, the weight of R.
        loss_fn: ``(logits, targets) -> 0-dim`` *mean* loss over the batch; default cross-entropy.
        step: the finite-difference step, in input units (RMS per sample; > 0).
        extra_loss: a closure (e.g. ``lambda: LCNNPenalty()(model)``) whose value is added, unscaled,
            to the second pass.
        loss_scale: the GradScaler scale for fp16 (the accumulated gradients are then scaled, as
            ``scaler.step`` expects).
        fraction: in (0, 1]. Below 1, the penalty's gradient comes from a random subset S of
            ⌈fraction·B⌉ samples, an unbiased estimate of the per-sample mean: the second pass runs
            x_S + hG_S and x_S together (one forward, so BatchNorm sees both, and one backward) and
            adds c·∇θ[L_S(x_S + hG_S) − L_S(x_S)]; the first pass's gradient stays unscaled. It costs
            1 + 2·fraction passes instead of 2.
        generator: draws the subset S.

    Returns:
        :class:`GradRegOutput` (L, R, logits), detached; R is exact at x.

    Raises:
        ValueError: ``step`` is not > 0, or ``fraction`` is not in (0, 1].
    """
    if step <= 0:
        raise ValueError(f"gradreg_fd_backward: step must be > 0, got {step}")
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"gradreg_fd_backward: fraction must be in (0, 1], got {fraction}")
    return _fd_passes(model, inputs, targets, lambda_grad, loss_fn, step, extra_loss, loss_scale, fraction, generator)


def _fd_passes(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, lambda_grad: float, loss_fn: LossFn,
               step: float, extra_loss: Optional[Callable[[], torch.Tensor]],
               loss_scale: Optional[torch.Tensor], fraction: float,
               generator: Optional[torch.Generator]) -> GradRegOutput:
    params = [p for p in model.parameters() if p.requires_grad]
    scale = 1.0 if loss_scale is None else loss_scale
    x = inputs.detach().requires_grad_(True)
    logits = model(x)
    loss = loss_fn(logits, targets)
    (loss * scale).backward()
    n = x.shape[0]
    assert x.grad is not None  # (set by the backward just made)
    per_sample = _at_least_fp32(x.grad.detach()) * n / scale  # G, (B, ...)
    local_sq = per_sample.pow(2).sum()
    penalty = local_sq / n
    m = max(1, math.ceil(fraction * n))
    if m < n:
        _fd_subset(model, x.detach(), targets, per_sample, m, lambda_grad, loss_fn, step, extra_loss, scale, generator)
        return GradRegOutput(loss.detach(), penalty.detach(), logits.detach())
    h, c = _fd_step(local_sq, n, step, lambda_grad, x.device)
    with torch.no_grad():
        grads = [p.grad for p in params if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, (1.0 - c).to(grads[0].dtype))
    with frozen_state(model):
        x2 = (x.detach() + h * per_sample).to(x.dtype)
        _plus_extra(loss_fn(model(x2), targets) * (c * scale), extra_loss, scale).backward()
    return GradRegOutput(loss.detach(), penalty.detach(), logits.detach())


def _fd_step(sq_sum: torch.Tensor, count: int, step: float, lambda_grad: float,
             device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """(h, c) of the finite difference: h = step·√B / ‖G‖ over all processes' ``count`` samples whose
    squared input gradients sum to ``sq_sum`` here, and c = 2λ/h (see :func:`gradreg_fd_backward`)."""
    g_norm = _global_sum(sq_sum).sqrt()
    root_n: Union[float, torch.Tensor]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        # torch.full writes the count on the device (torch.tensor would copy it from the host)
        root_n = _global_sum(torch.full((), float(count), device=device)).sqrt()
    else:
        root_n = math.sqrt(count)
    h = step * root_n / g_norm.clamp_min(1e-12)
    return h, (2.0 * lambda_grad) / h


def _plus_extra(total: torch.Tensor, extra_loss: Optional[Callable[[], torch.Tensor]], scale) -> torch.Tensor:
    """``total`` + ``extra_loss()``·scale (the second pass's unscaled extra term), or ``total``."""
    return total if extra_loss is None else total + extra_loss() * scale


def _fd_subset(model: nn.Module, x: torch.Tensor, targets: torch.Tensor, per_sample: torch.Tensor, m: int,
               lambda_grad: float, loss_fn: LossFn, step: float, extra_loss: Optional[Callable[[], torch.Tensor]],
               scale, generator: Optional[torch.Generator]) -> None:
    """The second pass of FD GradReg on a random subset of m samples (see :func:`gradreg_fd_backward`)."""
    idx = torch.randperm(x.shape[0], generator=generator)[:m].to(x.device)
    g = per_sample[idx]
    h, c = _fd_step(g.pow(2).sum(), m, step, lambda_grad, x.device)
    xs, ys = x[idx], targets[idx]
    with frozen_state(model):
        out = model(torch.cat([(xs + h * g).to(x.dtype), xs]))
        diff = loss_fn(out[:m], ys) - loss_fn(out[m:], ys)
        _plus_extra(diff * (c * scale), extra_loss, scale).backward()


def param_groups(model: nn.Module, weight_decay: float, *, exclude_1d: bool = False) -> List[dict]:
    """Optimizer parameter groups with β and γ excluded from weight decay (as the reference does).

    Args:
        model: the model; parameters with ``requires_grad=False`` are left out.
        weight_decay: the decay of the first group.
        exclude_1d: also exempt biases and norm weights (every parameter of at most one dimension;
            timm's ``filter_bias_and_bn``).

    Returns:
        ``[{"params": decayed, "weight_decay": weight_decay}, {"params": exempt, "weight_decay": 0.0}]``,
        for ``torch.optim`` or ``timm.optim.create_optimizer_v2``.
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
