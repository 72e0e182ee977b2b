"""Folding a trained LCNN into plain, exportable torch modules for deployment (:func:`fold`)."""
from __future__ import annotations

import copy
import warnings
from collections import Counter
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from .conversion import detach_lcnn_state
from .layers import (
    CenteredSoftplus,
    FrozenCenteredSoftplus,
    LipschitzBatchNorm2d,
    LipschitzBatchNormAct2d,
    remove_spectral_norm,
    spectral_norm_modules,
    spectral_norm_of,
)
from .weight_checks import meta_tensor, weight_problem

__all__ = ["fold", "stale_spectral_norms"]


def _plain_bn(lbn: LipschitzBatchNorm2d) -> nn.BatchNorm2d:
    """The eval-mode γ-Lipschitz BN as an ordinary affine BatchNorm2d (exact)."""
    c = lbn.lipschitz_scale().detach()
    fk: Dict[str, Any] = {"device": lbn.running_mean.device, "dtype": lbn.running_mean.dtype}
    bn = nn.BatchNorm2d(lbn.num_features, eps=lbn.eps, affine=True, **fk)
    with torch.no_grad():
        w = lbn.weight if lbn.weight is not None else torch.ones(lbn.num_features, **fk)
        b = lbn.bias if lbn.bias is not None else torch.zeros(lbn.num_features, **fk)
        bn.weight.copy_(w * c)
        bn.bias.copy_(b * c)
        # (track_running_stats, the default: the BatchNorm2d built above has all three buffers)
        assert bn.running_mean is not None and bn.running_var is not None and bn.num_batches_tracked is not None
        bn.running_mean.copy_(lbn.running_mean)
        bn.running_var.copy_(lbn.running_var)
        bn.num_batches_tracked.copy_(lbn.num_batches_tracked)
    return bn.eval()


def _replace_modules(model: nn.Module, fn: Callable[[nn.Module], Optional[nn.Module]]) -> None:
    for name, child in list(model.named_children()):
        new = fn(child)
        if new is not None:
            setattr(model, name, new)
        else:
            _replace_modules(child, fn)


@torch.no_grad()
def _fuse_conv_bn(model: nn.Module, x: torch.Tensor) -> int:
    """Fuse every BatchNorm2d whose input is exactly the output of a Conv2d (and of nothing else)."""
    produced: Dict[int, Tuple[nn.Module, torch.Tensor]] = {}
    consumers: Counter = Counter()
    bn_inputs: List[Tuple[nn.BatchNorm2d, int]] = []
    handles = []
    keep: List[torch.Tensor] = []  # keep tensors alive so ids stay unique during the trace

    def hook(mod, args, out):
        if args and isinstance(args[0], torch.Tensor):
            consumers[id(args[0])] += 1
            keep.append(args[0])
            if isinstance(mod, nn.BatchNorm2d):
                bn_inputs.append((mod, id(args[0])))
        if isinstance(out, torch.Tensor):
            keep.append(out)
            if isinstance(mod, nn.Conv2d):
                produced[id(out)] = (mod, out)

    leaves = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.BatchNorm2d)) or not list(m.children())]
    for m in leaves:
        handles.append(m.register_forward_hook(hook))
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    pairs = {}
    for bn, tid in bn_inputs:
        if tid in produced and consumers[tid] == 1:
            pairs[id(bn)] = (produced[tid][0], bn)
    if not pairs:
        return 0
    conv_ids = {id(c): b for c, b in pairs.values()}
    bn_ids = set(pairs)

    def swap(m: nn.Module) -> Optional[nn.Module]:
        if id(m) in conv_ids:
            assert isinstance(m, nn.Conv2d)  # conv_ids holds the ids of the Conv2d modules in `produced`
            return fuse_conv_bn_eval(m, conv_ids[id(m)])
        if id(m) in bn_ids:
            return nn.Identity()
        return None

    _replace_modules(model, swap)
    return len(pairs)


STALE_RESIDUAL = 2e-3  # σ is within half the residual of a singular value: above this, over the stated 1e-3


def stale_spectral_norms(model: nn.Module, tol: float = STALE_RESIDUAL) -> List[Tuple[str, float]]:
    """List the spectrally normalised layers whose singular vectors are not converged for their current weights.

    Args:
        model: the model; layers whose input size is still unknown are not checked.
        tol: the largest relative residual accepted (see :meth:`~lcnn_zoo.layers.SpectralNorm.residual`).

    Returns:
        (layer name, relative residual) of each layer whose residual is above ``tol``.
    """
    out = []
    for name, m in model.named_modules():
        sn = spectral_norm_of(m)
        if sn is not None and sn.input_shape is not None:
            r = sn.residual(m.parametrizations.weight.original)
            if r > tol:
                out.append((name, r))
    return out



def _warn_unreached_convs(folded: nn.Module) -> None:
    """A conv no forward reached and whose input size is still unknown (an unused auxiliary head) has
    no σ: remove_spectral_norm bakes it with a bound valid at every input size. Say so, once."""
    unsized = [name for name, m in folded.named_modules()
               if (sn := spectral_norm_of(m)) is not None and (sn._v is None or sn.padding is None)]
    if unsized:
        warnings.warn(f"fold: {len(unsized)} convolution(s) no forward has reached ({', '.join(unsized[:5])}"
                      f"{', …' if len(unsized) > 5 else ''}) have no input size, so no operator norm: they are "
                      "folded as W / (a bound on their norm at every input size), 1-Lipschitz at any size; "
                      "run a forward that reaches them before fold to fold them with their exact norm",
                      stacklevel=4)  # the frame above fold (this, _fold, fold, the caller)


def _example_input(model: nn.Module) -> torch.Tensor:
    """Two random inputs of the model's input size (lcnnify's, else its first convolution's), for fold's self-check."""
    size = getattr(getattr(model, "lcnn_report", None), "input_size", None)
    if size is None:
        shapes = [sn.input_shape for _, sn in spectral_norm_modules(model)
                  if sn.layer_type == "conv2d" and sn.input_shape]
        if not shapes:
            raise ValueError("fold: pass example_input (the model's input size is unknown)")
        size = shapes[0]
    p = next(model.parameters())
    gen = torch.Generator(device="cpu").manual_seed(0)
    return torch.rand(2, *size, generator=gen).to(device=p.device, dtype=p.dtype)


def _refuse_unfoldable(model: nn.Module) -> None:
    """Raise fold's user-facing errors (see :func:`fold`'s ``Raises:``) before any work is done."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"fold expects an nn.Module, got {type(model).__name__}")
    if not any(spectral_norm_of(m) is not None or isinstance(m, (LipschitzBatchNorm2d, CenteredSoftplus))
               for m in model.modules()):
        raise ValueError("fold: the model has no LCNN layers to fold (is it folded already?)")
    meta = meta_tensor(model)
    if meta is not None:  # folding computes with the weights: σ, the BatchNorm scales, the self-check
        raise ValueError(f"fold: the model is on the meta device ({meta} has a shape but no values): load its "
                         f"weights first (model.to_empty(device='cpu'), then load_state_dict)")
    problem = weight_problem([*model.named_parameters(), *model.named_buffers()])
    if problem is not None:  # else the self-check in fold fails and blames the package ("please report")
        raise ValueError(f"fold: {problem}: these weights cannot be folded")


def _plain_module(m: nn.Module) -> Optional[nn.Module]:
    """The plain-torch replacement of one γ-BN (with its act) or CenteredSoftplus; None for any other module."""
    if isinstance(m, LipschitzBatchNormAct2d):
        inner = [_plain_bn(m)] + [_plain_module(x) or x for x in (m.drop, m.act) if not isinstance(x, nn.Identity)]
        return nn.Sequential(*inner)
    if isinstance(m, LipschitzBatchNorm2d):
        return _plain_bn(m)
    if isinstance(m, CenteredSoftplus):
        return FrozenCenteredSoftplus(float(m.beta.detach()))
    return None


def _bake_lcnn_layers(folded: nn.Module) -> None:
    """Replace every LCNN layer of ``folded`` by plain torch, in place, and drop what lcnnify attached."""
    for m, _ in list(spectral_norm_modules(folded)):
        remove_spectral_norm(m)
    _replace_modules(folded, _plain_module)
    detach_lcnn_state(folded)


def _check_folded(out: torch.Tensor, reference: torch.Tensor, rtol: float) -> None:
    """Raise RuntimeError unless the folded outputs ``out`` match the LCNN's ``reference`` (fold's self-check)."""
    err = (out - reference).abs().max()
    # Relative to the outputs' size, with a floor of √eps of the dtype: a freshly converted model's
    # logits can be ~1e-15, far below the rounding of its unit-sized activations, where any purely
    # relative test fails; an error of the size a folding mistake makes is still far above it.
    scale = reference.abs().max().clamp_min(torch.finfo(reference.dtype).eps ** 0.5)
    if not torch.isfinite(out).all() or err > rtol * scale:
        raise RuntimeError(f"fold: folded outputs deviate from the LCNN by {float(err):.3g} "
                           f"(> {rtol} x {float(scale):.3g}); please report this model")


def fold(model: nn.Module, *, example_input: Optional[torch.Tensor] = None, inplace: bool = False,
         rtol: float = 1e-5) -> nn.Module:
    """Turn a (trained) LCNN into plain torch modules with identical eval-mode outputs.

    * spectral normalisation is baked into the weights (W / σ with the current singular vectors),
      and the parametrizations and every lcnn_zoo state-dict hook are removed; a convolution that
      no forward has reached (input size unknown, so no σ) gets W / σ̄ with σ̄ a bound on its
      norm at every input size (and a warning);
    * each γ-Lipschitz BN becomes the equivalent affine ``BatchNorm2d``, fused into the preceding
      convolution when it consumes that convolution's output alone;
    * :class:`CenteredSoftplus` becomes :class:`FrozenCenteredSoftplus` (``softplus(x, β) − log2/β``,
      constant β). It and :class:`~lcnn_zoo.layers.Scale` (the residual average's ×0.5) are the
      lcnn_zoo classes left in a folded model — each one line of plain torch ops, for which torch.nn
      has no module; the zoo's own architectures keep their classes (``lcnn_zoo.models``);
    * the report, the input-size hook and the ``reset_classifier`` wrapper lcnnify added go.

    The result is in eval mode; its own state dict loads into it, and it scripts (TorchScript),
    traces, exports (``torch.export``) and exports to ONNX. A self-check compares its outputs on
    ``example_input`` with the LCNN's (eval mode). Singular vectors not converged for their weights
    (an averaged EMA/SWA copy) warn: run :func:`~lcnn_zoo.converge_spectral_norms` first.

    Args:
        model: the LCNN (from :func:`~lcnn_zoo.lcnnify` or a zoo ``lcnn_*`` model).
        example_input: a batch for the self-check, (N, C, H, W). Default: two random inputs in [0, 1)
            of ``model.lcnn_report.input_size``, else of the first convolution's input size.
        inplace: modify ``model`` itself instead of a deep copy.
        rtol: the self-check's tolerance: the largest deviation of the outputs, relative to the largest
            output magnitude (taken as at least √eps of the dtype).

    Returns:
        The folded model, in eval mode, its parameters with ``requires_grad=False`` (``model`` itself
        when ``inplace``).

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: the model has no LCNN layers, is on the meta device (no weights to fold), has weights
            :func:`~lcnn_zoo.weight_checks.weight_problem` refuses (the message names the tensor), or
            has no known input size and no ``example_input`` is given.
        RuntimeError: the self-check failed (a bug: please report the model).
    """
    _refuse_unfoldable(model)
    with torch.no_grad():  # a with-block, not a decorator: the warnings' stacklevels count fold's frame
        return _fold(model, example_input, inplace, rtol)


def _fold(model: nn.Module, example_input: Optional[torch.Tensor], inplace: bool, rtol: float) -> nn.Module:
    """fold's steps, under torch.no_grad (the reference forward and the self-check build no graph)."""
    stale = stale_spectral_norms(model)
    if stale:
        worst = max(stale, key=lambda t: t[1])
        warnings.warn(f"fold: the singular vectors of {len(stale)} layer(s) are not converged for their weights "
                      f"(worst {worst[0]}, residual {worst[1]:.2g}), so their baked-in norms may exceed 1 (an "
                      f"averaged EMA/SWA copy?): run lcnn_zoo.converge_spectral_norms(model, tol=1e-3) first",
                      stacklevel=3)  # the frame above fold (_fold, fold, the caller)
    folded = model if inplace else copy.deepcopy(model)
    folded.eval()
    if example_input is None:
        example_input = _example_input(folded)
    reference = folded(example_input)

    _warn_unreached_convs(folded)  # called from _fold: its warning's stacklevel counts the frames above
    _bake_lcnn_layers(folded)
    _fuse_conv_bn(folded, example_input)
    for p in folded.parameters():
        p.requires_grad_(False)
    _check_folded(folded(example_input), reference, rtol)
    if getattr(type(folded), "builds_folded", False):
        # A zoo architecture builds its folded form with folded=True: timm's save_for_hf writes the
        # model's _model_args into config.json, so the folded weights load back by that name.
        setattr(folded, "_model_args", {**getattr(folded, "_model_args", {}), "folded": True})  # (a plain attribute)
    return folded
