"""Weights checked before use: every path that loads weights to measure or publish them goes through
:func:`check_weights` (a state dict, before it is loaded) and :func:`check_outputs` (the model's
first outputs), and the analyses refuse a model through :func:`weight_problem`.

A safetensors or ``.pth`` file can be valid as a file and wrong in content: NaN or infinite weights,
a float tensor relabelled as integers (``I32`` in the safetensors header: ``load_state_dict`` would
cast the integers to float silently, a model of garbage), a negative BatchNorm variance, a NaN β
(``log_beta``) or γ (``gamma_raw``). Measured, such a model gives an "accuracy" of the argmax of NaN
logits next to NaN geometry, and the plot fails after the work; the checks here refuse it first, in
one line naming the file and the tensor.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Iterable, List, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from .errors import UserError, shown

__all__ = ["WeightsError", "weight_problem", "check_weights", "check_outputs", "meta_tensor", "state_mismatch",
           "load_mismatch"]

Where = Union[str, "os.PathLike[str]"]

# What a tensor of these names is, for the message (the LCNN's own parameters, paper §3.4).
_ROLES = {"log_beta": "β of a centered softplus, as log β", "gamma_raw": "γ of a Lipschitz BatchNorm, before softplus",
          "running_var": "a BatchNorm running variance"}


class WeightsError(UserError):
    """Weights that cannot be used as they are (not finite, of the wrong dtype, a negative variance);
    the message names the file and the tensor."""


def _kind(dtype: torch.dtype) -> str:
    """The kind a load may convert within: a float16 checkpoint loads into a float32 model (the same
    numbers, rounded), but integers loaded into a float tensor are new numbers (a float weight
    relabelled ``I32`` would be its bit patterns read as integers)."""
    if dtype.is_complex:
        return "complex"
    if dtype.is_floating_point:
        return "floating"
    return "bool" if dtype == torch.bool else "integer"


def _role(name: str) -> str:
    role = _ROLES.get(name.rsplit(".", 1)[-1])
    return f" ({role})" if role else ""


def weight_problem(tensors: Iterable[Tuple[str, torch.Tensor]],
                   expected: Optional[Mapping[str, torch.Tensor]] = None) -> Optional[str]:
    """The first reason why ``tensors`` cannot be used as weights, as a phrase naming the tensor, or None.

    Checked, in this order for each tensor: its dtype is of the kind ``expected[name]`` has (floating,
    integer, bool, complex; precision may differ); a floating tensor is finite; a ``running_var``
    is ≥ 0 (a BatchNorm divides by its square root); β = exp(``log_beta``) is finite and > 0; a
    spectral norm's singular vector (``weight_u``/``weight_v``) is not all zeros (unless its weight is).

    Args:
        tensors: (name, tensor) pairs: a state dict's ``items()``, or a model's named parameters and buffers.
        expected: the tensors the weights are for (``model.state_dict()``): the dtypes they must have.
            Names absent from it are not compared (a loader reports unexpected keys itself).
    """
    pairs = list(tensors)
    by_name = dict(pairs)
    for name, t in pairs:
        if not isinstance(t, torch.Tensor):  # a loader names what is not a tensor itself
            continue
        want = expected.get(name) if expected is not None else None
        if isinstance(want, torch.Tensor) and _kind(t.dtype) != _kind(want.dtype):
            return (f"tensor {shown(name)} is stored as {str(t.dtype).removeprefix('torch.')} where the model has "
                    f"{str(want.dtype).removeprefix('torch.')} (it would be cast, not read)")
        if not (t.is_floating_point() or t.is_complex()) or t.is_meta or t.numel() == 0:
            continue
        finite = torch.isfinite(t.detach())
        if not bool(finite.all()):
            bad = t.detach()[~finite]
            what = "nan" if bool(bad.isnan().any()) else "inf"
            return f"tensor {shown(name)}{_role(name)} holds {what} ({int(bad.numel())} of {t.numel()} values)"
        last = name.rsplit(".", 1)[-1]
        if last == "running_var" and bool((t.detach() < 0).any()):
            return (f"tensor {shown(name)}{_role(name)} holds a negative value ({float(t.detach().min()):.3g}); "
                    f"a variance is >= 0")
        if last == "log_beta":  # finite log β can still overflow: exp(100) is inf and exp(-200) is 0 in float32
            beta = t.detach().exp()
            bad = ~(torch.isfinite(beta) & (beta > 0))
            if bool(bad.any()):
                return (f"tensor {shown(name)}{_role(name)} holds {float(t.detach()[bad].flatten()[0]):.4g}: "
                        f"β = exp(log_beta) is not a finite positive number in {str(t.dtype).removeprefix('torch.')}")
        vector = _singular_vector_weight(name)
        if vector is not None and not t.is_complex() and float(t.detach().double().norm()) == 0.0:
            weight = by_name.get(vector)
            if not (isinstance(weight, torch.Tensor) and not weight.is_meta and not bool(weight.detach().any())):
                return (f"tensor {shown(name)} (a spectral norm's singular vector) is all zeros: σ would read as "
                        f"converged at a wrong value")
    return None


def _singular_vector_weight(name: str) -> Optional[str]:
    """The weight a spectral norm's singular vector ``name`` belongs to (in a state dict: ``<layer>.weight_u``;
    in a model: ``<layer>.parametrizations.weight.0._u``), or None when ``name`` is not one. A zero
    vector has residual 0 and is taken as converged: σ = 0 (clamped), outputs off by 1e12."""
    for suffix in ("weight_u", "weight_v"):
        if name == suffix or name.endswith("." + suffix):
            return name[: -len(suffix)] + "weight"
    for suffix in (".parametrizations.weight.0._u", ".parametrizations.weight.0._v"):
        if name.endswith(suffix):
            return name[: -len(suffix)] + ".parametrizations.weight.original"
    return None


def _where(where: Where) -> str:
    return shown(Path(where)) if isinstance(where, os.PathLike) else shown(where, 160)


def check_weights(state: Mapping[str, torch.Tensor], where: Where, model: Optional[nn.Module] = None) -> None:
    """Refuse a state dict that cannot be used as weights, before it is loaded (see :func:`weight_problem`).

    Args:
        state: the tensors read from the file.
        where: the file (or the model name) for the message.
        model: the model they will be loaded into: its tensors' dtypes are the expected ones.

    Raises:
        WeightsError: one line naming ``where`` and the tensor.
    """
    problem = weight_problem(state.items(), model.state_dict() if model is not None else None)
    if problem is not None:
        raise WeightsError(f"{_where(where)}: {problem}: these weights cannot be used (damaged, or not written by "
                           f"training); restore or retrain them")


def check_outputs(model: nn.Module, x: torch.Tensor, where: Where, y: Optional[torch.Tensor] = None) -> None:
    """Refuse a model whose outputs on ``x`` (its first batch) are not finite: weights that pass
    :func:`check_weights` can still overflow, and the argmax of NaN logits is not an accuracy.
    With the labels ``y``, also the cross-entropy loss and its gradient in ``x`` (what the
    measurements differentiate): finite logits of 1e30 (a huge ``logit_scale``) give an infinite
    gradient, measured as "inf ± nan" and an empty plot.

    Raises:
        WeightsError: one line naming ``where``.
    """
    xg = x.detach().clone().requires_grad_(y is not None)
    with torch.set_grad_enabled(y is not None):
        out = model(xg)
    outs = out if isinstance(out, (tuple, list)) else [out]
    for o in outs:
        if isinstance(o, torch.Tensor) and o.is_floating_point() and not bool(torch.isfinite(o).all()):
            raise WeightsError(f"{_where(where)} computes outputs that are not finite "
                               f"({int((~torch.isfinite(o)).sum())} of {o.numel()} on its first {x.shape[0]} "
                               f"inputs): it cannot be measured or published; check its weights")
    logits = outs[0] if outs and isinstance(outs[0], torch.Tensor) else None
    if y is None or logits is None or not logits.requires_grad:
        return
    loss = nn.functional.cross_entropy(logits, y.to(logits.device), reduction="sum")
    (grad,) = torch.autograd.grad(loss, xg)
    norms = grad.flatten(1).norm(dim=1) if grad.dim() > 1 else grad.norm()  # what is measured: ‖∇ₓℓ‖ per input
    for what, t in (("loss", loss), ("input gradient", grad), ("input-gradient norm", norms)):
        if not bool(torch.isfinite(t.detach()).all()):
            raise WeightsError(f"{_where(where)}: its {what} is not finite on its first {x.shape[0]} inputs "
                               f"(its outputs are finite: a huge logit_scale?): it cannot be measured; "
                               f"check its weights")


def meta_tensor(model: nn.Module) -> Optional[str]:
    """The name of a parameter or buffer of ``model`` on the meta device (shapes without values), or None."""
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.is_meta:
            return name
    return None


_QUOTED = re.compile(r'"([^"]+)"')  # the keys in torch's message: "fc.weight", "fc.bias".


def _keys(keys: List[str], limit: int = 3) -> str:
    shown_keys = ", ".join(shown(k, 60) for k in keys[:limit])
    return shown_keys + (f" … ({len(keys)} in all)" if len(keys) > limit else "")


def _comparable(key: str) -> bool:
    # Keys the zoo's load hooks reconcile themselves: singular vectors of another input size (recomputed;
    # named weight_u/weight_v in a state dict, _u/_v inside the parametrization), a missing logit scale
    # (the built one kept), an adapted stem's gain.
    return not (key.endswith(("._u", "._v", ".weight_u", ".weight_v", ".weight_gain"))
                or key.rsplit(".", 1)[-1] == "logit_scale")


def state_mismatch(model: nn.Module, state_dict: Mapping[str, Any], *, sizes_only: bool = False,
                   partial: bool = False) -> Optional[str]:
    """Why ``state_dict`` does not fit ``model``, in a phrase, or None when its tensors do fit (the
    failure was something else): another architecture (other tensor names), another number of input
    channels (the stem), or the same architecture at other sizes (the first tensor that differs; the
    singular vectors, which loading recomputes for another input size, are not compared).
    The zoo's models raise it from ``load_state_dict``, so timm's ``checkpoint_path=`` says it too.

    Args:
        model: the model the weights are for.
        state_dict: the weights.
        sizes_only: None unless both have the same tensor names and some differ in size (what fails a
            load whatever ``strict`` is): the zoo's models ask this before loading, so weights of other
            sizes are refused before any layer's load hook does work for them.
        partial: the weights may name only some of the model's tensors (``load_state_dict(strict=False)``):
            the tensors both have are compared, whatever the names.
    """
    own = {k: v for k, v in model.state_dict().items() if _comparable(k)}
    theirs = {k: v for k, v in state_dict.items() if _comparable(k)}
    cfg = getattr(model, "pretrained_cfg", None) or {}
    arch = cfg.get("architecture") or type(model).__name__
    unexpected, missing = sorted(set(theirs) - set(own)), sorted(set(own) - set(theirs))
    if (unexpected or missing) and not partial:
        if sizes_only:
            return None  # (torch decides: with strict=True they are explained after it fails)
        parts = ([f"missing keys {_keys(missing)}"] if missing else []) + (
            [f"unexpected keys {_keys(unexpected)}"] if unexpected else [])
        return (f"these weights are for another architecture than {arch} ({len(theirs)} tensors for its {len(own)}): "
                + "; ".join(parts))
    own = {k: v for k, v in own.items() if k in theirs}
    shape = {k: tuple(getattr(theirs[k], "shape", ())) for k in own}
    stem = cfg.get("first_conv") or "conv1"
    for key in (f"{stem}.weight", f"{stem}.parametrizations.weight.original"):
        if key in own and len(shape[key]) == 4 and shape[key][1] != own[key].shape[1]:
            return (f"these weights take {shape[key][1]}-channel input and this {arch} was built for "
                    f"{own[key].shape[1]}: build it with in_chans={shape[key][1]}")
    other = [k for k in own if shape[k] != tuple(own[k].shape)
             and not (own[k].dim() == 0 and shape[k] == (1,))]  # (torch loads [1] into a 0-dim tensor)
    if other:
        k = other[0]
        return (f"these weights are for {arch} at other sizes: {shown(k)} is {list(shape[k])} in them and "
                f"{list(own[k].shape)} here ({len(other)} tensors differ: another num_classes or width?)")
    return None


def load_mismatch(error: RuntimeError) -> str:
    """What torch's ``load_state_dict`` error says, as one bounded phrase: the first missing and
    unexpected keys and size mismatches (its first line, "Error(s) in loading state_dict for
    CifarResNet:", names none of them)."""
    lines = [ln.strip() for ln in str(error).splitlines()[1:] if ln.strip()]
    parts = []
    for ln in lines:
        for label, what in (("Missing key(s)", "missing keys"), ("Unexpected key(s)", "unexpected keys")):
            if ln.startswith(label):
                parts.append(f"{what} {_keys(_QUOTED.findall(ln))}")
    sizes = [ln for ln in lines if ln.startswith("size mismatch for")]
    if sizes:
        parts.append(shown(sizes[0], 200).strip("'\"") + (f" (and {len(sizes) - 1} more)" if len(sizes) > 1 else ""))
    if not parts:  # another message: its first lines, bounded
        return shown(" ".join(str(error).split()), 240).strip("'\"")
    return "; ".join(parts)
