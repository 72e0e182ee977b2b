"""Turning any timm / torchvision CNN into an LCNN (:func:`lcnnify`) and back into plain,
exportable torch modules for deployment (:func:`fold`)."""
from __future__ import annotations

import copy
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.fusion import fuse_conv_bn_eval

from .layers import (
    CenteredSoftplus,
    FrozenCenteredSoftplus,
    LipschitzBatchNorm2d,
    LipschitzBatchNormAct2d,
    Scale,
    SpectralNorm,
    spectral_norm,
)

__all__ = ["lcnnify", "fold", "ConversionReport", "LCNNConversionWarning"]


class LCNNConversionWarning(UserWarning):
    """Something in the model is left unconverted and is not covered by the curvature bound."""


@dataclass
class ConversionReport:
    """What :func:`lcnnify` did, attached to the model as ``model.lcnn_report``.

    Attributes:
        input_size: (C, H, W) the convolution operator norms are computed for (None: from the
            first forward).
        converted: counts per kind of rewrite, e.g. ``{"activation": 17, "batchnorm": 20, ...}``.
        unconverted: (module name, type name, reason) for everything that breaks or is not
            covered by the paper's layer-wise curvature bound.
    """

    input_size: Optional[Tuple[int, int, int]] = None
    converted: Dict[str, int] = field(default_factory=dict)
    unconverted: List[Tuple[str, str, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when every module is covered by the curvature bound."""
        return not self.unconverted

    def __str__(self) -> str:
        lines = [f"lcnnify: input_size={self.input_size}, converted " +
                 ", ".join(f"{k}={v}" for k, v in sorted(self.converted.items()))]
        for name, typ, reason in self.unconverted:
            lines.append(f"  not covered: {name or '<root>'} ({typ}): {reason}")
        return "\n".join(lines)


def _activation_types() -> Tuple[type, ...]:
    """ReLU-family and other non-gating activations that become CenteredSoftplus."""
    from timm.layers import activations as ta

    types = [nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Hardswish, nn.ELU, nn.CELU,
             nn.SELU, nn.Mish, nn.PReLU, nn.RReLU, nn.Softplus]
    for name in ("Swish", "Mish", "HardSwish", "HardMish", "GELU", "GELUTanh", "QuickGELU", "PReLU"):
        if hasattr(ta, name):
            types.append(getattr(ta, name))
    try:
        from timm.layers import activations_me as tme
        for name in ("SwishMe", "MishMe", "HardSwishMe", "HardMishMe"):
            if hasattr(tme, name):
                types.append(getattr(tme, name))
    except ImportError:  # pragma: no cover - older timm
        pass
    return tuple(types)


# Smooth, bounded-curvature, 1-Lipschitz-or-less elementwise maps used as gates (SE blocks):
# kept as they are. Hard variants are piecewise linear: kept but reported (not smooth).
_SMOOTH_GATES = (nn.Sigmoid, nn.Tanh)
_NONSMOOTH_GATES = (nn.Hardsigmoid, nn.Hardtanh)
_NOT_COVERED = (nn.LayerNorm, nn.GroupNorm, nn.InstanceNorm2d, nn.LocalResponseNorm, nn.MultiheadAttention,
                nn.BatchNorm1d, nn.BatchNorm3d, nn.Conv1d, nn.Conv3d, nn.ConvTranspose2d)


def _resolve_input_size(model: nn.Module, input_size: Optional[Sequence[int]]) -> Optional[Tuple[int, int, int]]:
    if input_size is None:
        cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
        input_size = cfg.get("input_size") if isinstance(cfg, dict) else None
    if input_size is None:
        return None
    input_size = tuple(int(s) for s in input_size)
    if len(input_size) != 3 or min(input_size) <= 0:
        raise ValueError(f"lcnnify: input_size must be (C, H, W) with positive entries, got {input_size}")
    return input_size


@torch.no_grad()
def _trace_conv_inputs(model: nn.Module, input_size: Tuple[int, int, int]) -> Dict[str, Tuple[int, ...]]:
    """Per-sample input shape of every Conv2d reached by a forward pass at ``input_size``."""
    shapes: Dict[str, Tuple[int, ...]] = {}
    handles = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            def hook(mod, args, _name=name):
                shapes.setdefault(_name, tuple(args[0].shape[1:]))
            handles.append(m.register_forward_pre_hook(hook))
    p = next(model.parameters(), None)
    x = torch.zeros(1, *input_size, device=p.device if p is not None else None,
                    dtype=p.dtype if p is not None and p.is_floating_point() else None)
    was_training = model.training
    model.eval()
    try:
        model(x)
    except Exception as e:  # noqa: BLE001 - re-raised with context
        raise ValueError(f"lcnnify: a forward pass at input_size={input_size} failed ({e}); "
                         "pass the input_size the model is used with") from e
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return shapes


def _effective_conv(conv: nn.Conv2d) -> nn.Conv2d:
    """Replace timm's weight-standardised convs by a plain conv with the standardised weight.

    Weight standardisation is scale-invariant, so it would undo spectral normalisation; the LCNN
    keeps the function the conv computes now and drops the standardisation from then on.
    """
    from timm.layers import Conv2dSame, ScaledStdConv2d, ScaledStdConv2dSame, StdConv2d, StdConv2dSame

    if not isinstance(conv, (StdConv2d, StdConv2dSame, ScaledStdConv2d, ScaledStdConv2dSame)):
        return conv
    w = conv.weight
    scale_w = None
    if isinstance(conv, (ScaledStdConv2d, ScaledStdConv2dSame)):
        scale_w = (conv.gain * conv.scale).view(-1)
    with torch.no_grad():
        eff = F.batch_norm(w.reshape(1, conv.out_channels, -1), None, None, weight=scale_w,
                           training=True, momentum=0.0, eps=conv.eps).reshape_as(w)
    same = bool(getattr(conv, "same_pad", False))
    cls = Conv2dSame if same else nn.Conv2d
    new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
              0 if same else conv.padding, conv.dilation, conv.groups, conv.bias is not None,
              device=w.device, dtype=w.dtype)
    with torch.no_grad():
        new.weight.copy_(eff)
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    return new


def _lipschitz_bn(bn: nn.BatchNorm2d, affine: Optional[bool], gamma_init: float,
                  act: Optional[nn.Module] = None, drop: Optional[nn.Module] = None) -> LipschitzBatchNorm2d:
    if not bn.track_running_stats:
        raise ValueError("lcnnify: BatchNorm2d(track_running_stats=False) has no running variance to "
                         "bound the Lipschitz constant with")
    affine = bn.affine if affine is None else affine
    fk = {"device": bn.running_mean.device, "dtype": bn.running_mean.dtype}
    kw = dict(eps=bn.eps, momentum=bn.momentum, affine=affine, gamma_init=gamma_init, **fk)
    new = (LipschitzBatchNormAct2d(bn.num_features, act=act, drop=drop, **kw) if act is not None or drop is not None
           else LipschitzBatchNorm2d(bn.num_features, **kw))
    with torch.no_grad():
        new.running_mean.copy_(bn.running_mean)
        new.running_var.copy_(bn.running_var)
        new.num_batches_tracked.copy_(bn.num_batches_tracked)
        if affine and bn.affine:
            new.weight.copy_(bn.weight)
            new.bias.copy_(bn.bias)
    new.train(bn.training)
    return new


def _average_residual(block: nn.Module) -> bool:
    """Make ``out = branch + shortcut`` into ``out = (branch + shortcut) / 2`` in the ResNet blocks
    of timm and torchvision, by scaling both summands with :class:`Scale` (0.5) modules placed where
    each block's forward applies them. Returns False for blocks of unknown layout."""
    from timm.models.resnet import BasicBlock as TBasic, Bottleneck as TBottle

    half = Scale(0.5)
    if isinstance(block, (TBasic, TBottle)):
        # timm: ... bn2/bn3 -> se -> drop_path -> (+ downsample(shortcut)). drop_path is the last
        # module on the branch (and is skipped when None), so the scale goes there.
        block.drop_path = half if block.drop_path is None else nn.Sequential(block.drop_path, half)
    else:
        try:
            from torchvision.models.resnet import BasicBlock as VBasic, Bottleneck as VBottle
        except ImportError:  # pragma: no cover
            return False
        if not isinstance(block, (VBasic, VBottle)):
            return False
        last = "bn2" if isinstance(block, VBasic) else "bn3"
        setattr(block, last, nn.Sequential(getattr(block, last), half))
    if block.downsample is None:
        block.downsample = Scale(0.5)
    elif isinstance(block.downsample, nn.Sequential):
        block.downsample.append(Scale(0.5))  # keeps the existing state-dict keys
    else:
        block.downsample = nn.Sequential(block.downsample, Scale(0.5))
    return True


def _residual_types() -> Tuple[type, ...]:
    from timm.models.resnet import BasicBlock, Bottleneck

    types: List[type] = [BasicBlock, Bottleneck]
    try:
        from torchvision.models import resnet as tv
        types += [tv.BasicBlock, tv.Bottleneck]
    except ImportError:  # pragma: no cover
        pass
    return tuple(types)


def lcnnify(
    model: nn.Module,
    *,
    input_size: Optional[Sequence[int]] = None,
    beta_init: float = 5.0,
    gamma_init: float = 10.0,
    bn_affine: Optional[bool] = None,
    average_residuals: bool = True,
    replace_maxpool: bool = True,
    n_power_iterations: int = 1,
    init_iterations: int = 3,
    strict: bool = False,
) -> nn.Module:
    """Convert ``model`` into a low-curvature network in place and return it.

    Rewrites (paper §3.3–3.4):

    * ReLU / ReLU6 / LeakyReLU / GELU / SiLU / Hardswish / ELU / Mish … (torch's and timm's
      classes) → :class:`~lcnn_zoo.layers.CenteredSoftplus` (β = ``beta_init``).
    * ``BatchNorm2d`` → :class:`~lcnn_zoo.layers.LipschitzBatchNorm2d` (γ = ``gamma_init``, running
      statistics and affine parameters copied); timm's ``BatchNormAct2d`` →
      :class:`~lcnn_zoo.layers.LipschitzBatchNormAct2d`, keeping (and converting) its activation.
    * ``Conv2d`` (incl. timm's ``Conv2dSame``; ``StdConv2d`` variants become plain convs with their
      current standardised weight) and ``Linear`` → spectrally normalised on the true operator.
    * ResNet ``BasicBlock``/``Bottleneck`` (timm and torchvision): the residual sum becomes the
      average of the two branches (``average_residuals``), as in the paper's reference ResNet, so the
      network's Lipschitz bound is the product of its layers' bounds. Any other block that
      computes ``(branch + shortcut) * self.residual_scale`` (a float attribute) gets 0.5.
    * ``MaxPool2d`` → ``AvgPool2d`` with the same window (``replace_maxpool``, on by default):
      max-pooling is not smooth, average pooling is linear and non-expansive.

    SE gates (Sigmoid/Tanh) are kept; they, and everything else the curvature bound does not cover
    (LayerNorm, GroupNorm, attention, unknown activations, residual sums in other architectures…),
    are listed in ``model.lcnn_report`` (:class:`ConversionReport`) and announced with one
    :class:`LCNNConversionWarning` — or an error with ``strict=True``.

    Args:
        model: any ``nn.Module`` (NCHW CNN).
        input_size: (C, H, W) the convolution operator norms are computed for. Default:
            ``model.pretrained_cfg["input_size"]``, else the shape of the first forward pass.
        bn_affine: None keeps each BatchNorm's ``affine`` setting; True/False forces it (the
            paper uses False).
        n_power_iterations: power iterations per training forward (1 in the paper).
        init_iterations: power iterations run once at conversion.

    Returns:
        ``model`` (same object), converted.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"lcnnify expects an nn.Module, got {type(model).__name__}")
    if getattr(model, "lcnn_report", None) is not None:
        raise ValueError("lcnnify: this model has already been converted (it has an lcnn_report)")
    size = _resolve_input_size(model, input_size)
    conv_shapes = _trace_conv_inputs(model, size) if size is not None else {}

    act_types = _activation_types()
    residual_types = _residual_types()
    from timm.layers import BatchNormAct2d
    from timm.layers.pool2d_same import AvgPool2dSame, MaxPool2dSame

    report = ConversionReport(input_size=size)
    counts: Counter = Counter()

    ref = next((p for p in model.parameters() if p.is_floating_point()), None)
    act_kw = {"device": ref.device, "dtype": ref.dtype} if ref is not None else {}

    def make_act(m: nn.Module) -> CenteredSoftplus:
        return CenteredSoftplus(beta_init, **act_kw)

    def convert(module: nn.Module, prefix: str) -> Optional[nn.Module]:
        """Return the replacement for ``module`` (or None to keep it); recurses into children."""
        if isinstance(module, residual_types) and average_residuals:
            if _average_residual(module):
                counts["residual_average"] += 1
        elif isinstance(getattr(module, "residual_scale", None), float) and average_residuals:
            module.residual_scale = 0.5  # blocks computing (branch + shortcut) * residual_scale
            counts["residual_average"] += 1
        if isinstance(module, BatchNormAct2d):
            act = convert_child_value(module.act, prefix + ".act")
            drop = module.drop
            counts["batchnorm"] += 1
            return _lipschitz_bn(module, bn_affine, gamma_init, act=act, drop=drop)
        for name, child in list(module.named_children()):
            new = convert(child, f"{prefix}.{name}" if prefix else name)
            if new is not None:
                setattr(module, name, new)
        if isinstance(module, act_types):
            counts["activation"] += 1
            return make_act(module)
        if isinstance(module, nn.BatchNorm2d):
            counts["batchnorm"] += 1
            return _lipschitz_bn(module, bn_affine, gamma_init)
        if isinstance(module, nn.Conv2d):
            conv = _effective_conv(module)
            spectral_norm(conv, conv_shapes.get(prefix), n_power_iterations=n_power_iterations,
                          init_iterations=init_iterations)
            counts["conv_spectral_norm"] += 1
            return conv if conv is not module else None
        if isinstance(module, nn.Linear):
            spectral_norm(module, n_power_iterations=n_power_iterations, init_iterations=init_iterations)
            counts["linear_spectral_norm"] += 1
            return None
        if isinstance(module, (nn.MaxPool2d, MaxPool2dSame)):
            if not replace_maxpool:
                report.unconverted.append((prefix, type(module).__name__, "max-pooling is not smooth"))
                return None
            if module.dilation not in (1, (1, 1)) or getattr(module, "return_indices", False):
                report.unconverted.append((prefix, type(module).__name__, "dilated/indexed max-pooling kept"))
                return None
            counts["maxpool_to_avgpool"] += 1
            if isinstance(module, MaxPool2dSame):
                return AvgPool2dSame(module.kernel_size, module.stride, ceil_mode=module.ceil_mode)
            return nn.AvgPool2d(module.kernel_size, module.stride, module.padding, ceil_mode=module.ceil_mode,
                                count_include_pad=True)
        if isinstance(module, (nn.AdaptiveMaxPool2d,)):
            report.unconverted.append((prefix, type(module).__name__, "max-pooling is not smooth"))
        elif isinstance(module, _NONSMOOTH_GATES):
            report.unconverted.append((prefix, type(module).__name__, "kept as a gate; piecewise linear, not smooth"))
        elif isinstance(module, _NOT_COVERED):
            report.unconverted.append((prefix, type(module).__name__, "not covered by the LCNN curvature bound"))
        elif getattr(module, "pool_type", None) in ("max", "avgmax", "catavgmax"):
            report.unconverted.append((prefix, type(module).__name__, f"pool_type={module.pool_type} is not smooth"))
        elif "Attention" in type(module).__name__:
            report.unconverted.append((prefix, type(module).__name__, "attention is not covered by the bound"))
        elif getattr(module, "has_skip", False) or getattr(module, "has_residual", False):
            report.unconverted.append((prefix, type(module).__name__,
                                       "residual sum not averaged: its Lipschitz bound is 1 + branch"))
        elif hasattr(module, "gate") and hasattr(module, "conv_reduce"):
            report.unconverted.append((prefix, type(module).__name__,
                                       "squeeze-excite gating x*gate(x) is not covered by the bound"))
        return None

    def convert_child_value(child: nn.Module, prefix: str) -> nn.Module:
        new = convert(child, prefix)
        return child if new is None else new

    new_root = convert(model, "")
    if new_root is not None:  # the model itself is a single layer
        raise ValueError(f"lcnnify: the model itself is a {type(model).__name__}; wrap it in a container")

    report.converted = dict(counts)
    model.lcnn_report = report
    if report.unconverted:
        msg = str(report)
        if strict:
            raise ValueError(msg)
        warnings.warn(msg, LCNNConversionWarning, stacklevel=2)
    return model


# --------------------------------------------------------------------------------------------
# Folding for deployment
# --------------------------------------------------------------------------------------------
def _plain_bn(lbn: LipschitzBatchNorm2d) -> nn.BatchNorm2d:
    """The eval-mode γ-Lipschitz BN as an ordinary affine BatchNorm2d (exact)."""
    c = lbn.lipschitz_scale().detach()
    fk = {"device": lbn.running_mean.device, "dtype": lbn.running_mean.dtype}
    bn = nn.BatchNorm2d(lbn.num_features, eps=lbn.eps, affine=True, **fk)
    with torch.no_grad():
        w = lbn.weight if lbn.weight is not None else torch.ones(lbn.num_features, **fk)
        b = lbn.bias if lbn.bias is not None else torch.zeros(lbn.num_features, **fk)
        bn.weight.copy_(w * c)
        bn.bias.copy_(b * c)
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
            return fuse_conv_bn_eval(m, conv_ids[id(m)])
        if id(m) in bn_ids:
            return nn.Identity()
        return None

    _replace_modules(model, swap)
    return len(pairs)


def _bake_weight(m: nn.Module) -> None:
    """Replace a parametrized weight by a plain parameter holding its current (eval) value.

    Not ``parametrize.remove_parametrizations``: on a deep copy it deletes the property from the
    parametrized class that the copy *shares* with the original model, breaking the original.
    """
    if set(m.parametrizations.keys()) != {"weight"}:
        raise ValueError(f"fold: {type(m).__name__} has parametrizations other than 'weight'")
    w = m.weight.detach().clone()
    hook = getattr(m, "_lcnn_lazy_hook", None)
    if hook is not None:  # the lazy spectral-norm initialisation hook is no longer needed
        hook.remove()
        del m._lcnn_lazy_hook
    m.__class__ = type(m).__bases__[0]  # parametrize injects a direct subclass of the layer's class
    del m._modules["parametrizations"]
    m.register_parameter("weight", nn.Parameter(w))


@torch.no_grad()
def fold(model: nn.Module, *, example_input: Optional[torch.Tensor] = None, inplace: bool = False,
         rtol: float = 1e-5) -> nn.Module:
    """Turn a (trained) LCNN into plain torch modules with identical eval-mode outputs.

    * spectral normalisation is baked into the weights (W / σ with the current singular vectors);
    * each γ-Lipschitz BN becomes the equivalent affine ``BatchNorm2d``, fused into the preceding
      convolution when it consumes that convolution's output alone;
    * :class:`CenteredSoftplus` becomes :class:`FrozenCenteredSoftplus` (plain ops, constant β).

    The result is in eval mode and exportable with ``torch.jit.trace``/``torch.export``/ONNX. A
    self-check compares its outputs on ``example_input`` (default: random, of the
    ``model.lcnn_report.input_size``) with the LCNN's and raises if the maximum deviation exceeds
    ``rtol`` times the largest output magnitude.

    Args:
        inplace: modify ``model`` itself instead of a deep copy.
    """
    folded = model if inplace else copy.deepcopy(model)
    folded.eval()
    if example_input is None:
        report = getattr(model, "lcnn_report", None)
        size = getattr(report, "input_size", None)
        if size is None:
            shapes = [sn.input_shape for m in folded.modules() for sn in
                      (m.parametrizations.weight if parametrize.is_parametrized(m, "weight") else [])
                      if isinstance(sn, SpectralNorm) and sn.kind == "conv2d" and sn.input_shape]
            if not shapes:
                raise ValueError("fold: pass example_input (the model's input size is unknown)")
            size = shapes[0]
        p = next(folded.parameters())
        gen = torch.Generator(device="cpu").manual_seed(0)
        example_input = torch.rand(2, *size, generator=gen).to(device=p.device, dtype=p.dtype)
    reference = folded(example_input)

    for m in list(folded.modules()):
        if parametrize.is_parametrized(m, "weight"):
            _bake_weight(m)

    def swap(m: nn.Module) -> Optional[nn.Module]:
        if isinstance(m, LipschitzBatchNormAct2d):
            inner = [_plain_bn(m)] + [swap(x) or x for x in (m.drop, m.act) if not isinstance(x, nn.Identity)]
            return nn.Sequential(*inner)
        if isinstance(m, LipschitzBatchNorm2d):
            return _plain_bn(m)
        if isinstance(m, CenteredSoftplus):
            return FrozenCenteredSoftplus(float(m.beta.detach()))
        return None

    _replace_modules(folded, swap)
    _fuse_conv_bn(folded, example_input)
    for p in folded.parameters():
        p.requires_grad_(False)
    if hasattr(folded, "lcnn_report"):
        del folded.lcnn_report
    out = folded(example_input)
    err = (out - reference).abs().max()
    scale = reference.abs().max().clamp_min(1e-12)
    if not torch.isfinite(out).all() or err > rtol * scale:
        raise RuntimeError(f"fold: folded outputs deviate from the LCNN by {float(err):.3g} "
                           f"(> {rtol} x {float(scale):.3g}); please report this model")
    return folded
