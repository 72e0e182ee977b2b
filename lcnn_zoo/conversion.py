"""Turning any timm / torchvision CNN into an LCNN (:func:`lcnnify`, paper §3.3–3.4) and back into
plain, exportable torch modules for deployment (:func:`fold`).

What lcnnify rewrites is one table, :data:`RULES`: each row says which modules it takes and how it
rewrites them, or — for modules it keeps — why the bound does not cover them. The report attached
to the converted model (:class:`ConversionReport`) comes from :mod:`lcnn_zoo.coverage`, which
checks the traced graph and asks this table about the modules it does not know.
"""
from __future__ import annotations

import copy
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from .coverage import analyse
from .layers import (DEFAULT_BETA_INIT, DEFAULT_GAMMA_INIT, CenteredSoftplus, FrozenCenteredSoftplus,
                     LipschitzBatchNorm2d, LipschitzBatchNormAct2d, Scale, conv_padding, remove_spectral_norm,
                     spectral_norm, spectral_norm_modules, spectral_norm_of)
from .layers.spectral_norm import CONVERGENCE_TOL, MAX_INIT_ITERATIONS

__all__ = ["lcnnify", "fold", "set_input_size", "average_residual", "ConversionReport", "LCNNConversionWarning",
           "LCNNInputSizeWarning", "RULES", "Rule", "ACTIVATION_TYPES", "RESIDUAL_TYPES"]


class LCNNConversionWarning(UserWarning):
    """Something in the model is not covered by the LCNN bound (see ``model.lcnn_report``)."""


class LCNNInputSizeWarning(UserWarning):
    """An LCNN is run at another input size than its convolution norms were computed for."""


@dataclass
class ConversionReport:
    """What :func:`lcnnify` did and what the bound covers, attached to the model as ``model.lcnn_report``.

    Attributes:
        input_size: (C, H, W) the convolution operator norms are computed for (None until the first
            forward when lcnnify was given none).
        converted: counts per kind of rewrite, e.g. ``{"activation": 17, "batchnorm": 20, ...}``.
        unconverted: (module name, operation or type, reason) for every operation whose bound the
            conversion does not establish.
        gains: (module name, factor) of fixed factors above 1 (e.g. a logit scale): covered, and the
            network's bound is multiplied by them.
        analysis: "graph" (torch.fx), "modules" (tracing failed: module-level check, said in
            ``unconverted``) or "pending" (no input size yet).
    """

    input_size: Optional[Tuple[int, int, int]] = None
    converted: Dict[str, int] = field(default_factory=dict)
    unconverted: List[Tuple[str, str, str]] = field(default_factory=list)
    gains: List[Tuple[str, float]] = field(default_factory=list)
    analysis: str = "pending"

    @property
    def ok(self) -> bool:
        """True when the analysis ran and found every operation covered by the bound."""
        return self.analysis == "graph" and not self.unconverted

    def __str__(self) -> str:
        lines = [f"lcnnify: input_size={self.input_size}, converted " +
                 ", ".join(f"{k}={v}" for k, v in sorted(self.converted.items()))]
        if self.analysis == "pending":
            lines.append("  coverage not checked yet: it runs at the first forward (no input_size was given)")
        for name, factor in self.gains:
            lines.append(f"  fixed gain ×{factor:.4g} at {name}: the network's Lipschitz bound is multiplied by it")
        for name, typ, reason in self.unconverted:
            lines.append(f"  not covered: {name or '<root>'} ({typ}): {reason}")
        if self.ok:
            lines.append("  every operation is covered: each nonlinear layer's input is at most "
                         "(Π γ × fixed gains)-Lipschitz in the model input (eval mode)")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# The rules
# --------------------------------------------------------------------------------------------
@dataclass
class _Context:
    beta_init: float
    gamma_init: float
    bn_affine: Optional[bool]
    average_residuals: bool
    replace_maxpool: bool
    sn_kwargs: Dict[str, object]
    conv_shapes: Dict[str, Tuple[int, ...]]
    act_kw: Dict[str, object]


@dataclass(frozen=True)
class Rule:
    """One row of lcnnify's table. ``matches(module, ctx)`` selects modules; ``rewrite(module, name,
    ctx)`` returns the replacement (or None when it rewrote the module in place) and is counted
    under ``kind``; a rule without ``rewrite`` keeps the module and gives the ``reason`` the bound
    does not cover it. ``before_children`` rules see a block before its children are converted."""

    kind: str
    matches: Callable[[nn.Module, _Context], bool]
    rewrite: Optional[Callable[[nn.Module, str, _Context], Optional[nn.Module]]] = None
    reason: str = ""
    before_children: bool = False


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


ACTIVATION_TYPES = _activation_types()


def _residual_types() -> Tuple[type, ...]:
    from timm.models.resnet import BasicBlock, Bottleneck
    from torchvision.models import resnet as tv

    return (BasicBlock, Bottleneck, tv.BasicBlock, tv.Bottleneck)


RESIDUAL_TYPES = _residual_types()


def _is_maxpool(m: nn.Module) -> bool:
    from timm.layers.pool2d_same import MaxPool2dSame

    return isinstance(m, (nn.MaxPool2d, MaxPool2dSame))


def average_residual(block: nn.Module, name: str = "", ctx: Optional[_Context] = None) -> None:
    """The rewrite lcnnify applies to ResNet blocks: make ``out = branch + shortcut`` into ``out = (branch + shortcut) / 2`` in the ResNet blocks
    of timm and torchvision, by scaling both summands with :class:`Scale` (0.5) modules placed where
    each block's forward applies them."""
    from timm.models.resnet import BasicBlock as TBasic, Bottleneck as TBottle
    from torchvision.models.resnet import BasicBlock as VBasic

    half = Scale(0.5)
    if isinstance(block, (TBasic, TBottle)):
        # timm: ... bn2/bn3 -> se -> drop_path -> (+ downsample(shortcut)). drop_path is the last
        # module on the branch (and is skipped when None), so the scale goes there.
        block.drop_path = half if block.drop_path is None else nn.Sequential(block.drop_path, half)
    else:
        last = "bn2" if isinstance(block, VBasic) else "bn3"
        setattr(block, last, nn.Sequential(getattr(block, last), half))
    if block.downsample is None:
        block.downsample = Scale(0.5)
    elif isinstance(block.downsample, nn.Sequential):
        block.downsample.append(Scale(0.5))  # keeps the existing state-dict keys
    else:
        block.downsample = nn.Sequential(block.downsample, Scale(0.5))


def _halve_residual_scale(block: nn.Module, name: str, ctx: _Context) -> None:
    block.residual_scale = 0.5  # blocks computing (branch + shortcut) * residual_scale


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


def _conv_rewrite(module: nn.Module, name: str, ctx: _Context) -> Optional[nn.Module]:
    conv = _effective_conv(module)
    spectral_norm(conv, ctx.conv_shapes.get(name), **ctx.sn_kwargs)
    return conv if conv is not module else None


def _linear_rewrite(module: nn.Module, name: str, ctx: _Context) -> None:
    spectral_norm(module, **ctx.sn_kwargs)


def _lipschitz_bn(bn: nn.Module, name: str, ctx: _Context) -> LipschitzBatchNorm2d:
    if not bn.track_running_stats:
        raise ValueError(f"lcnnify: {name or 'the model'} is a BatchNorm2d(track_running_stats=False): it has no "
                         "running variance to bound the Lipschitz constant with")
    affine = bn.affine if ctx.bn_affine is None else ctx.bn_affine
    fk = {"device": bn.running_mean.device, "dtype": bn.running_mean.dtype}
    kw = dict(eps=bn.eps, momentum=bn.momentum, affine=affine, gamma_init=ctx.gamma_init, **fk)
    from timm.layers import BatchNormAct2d

    if isinstance(bn, BatchNormAct2d):  # its act was converted with its children
        new = LipschitzBatchNormAct2d(bn.num_features, act=bn.act, drop=bn.drop, **kw)
    else:
        new = LipschitzBatchNorm2d(bn.num_features, **kw)
    with torch.no_grad():
        new.running_mean.copy_(bn.running_mean)
        new.running_var.copy_(bn.running_var)
        new.num_batches_tracked.copy_(bn.num_batches_tracked)
        if affine and bn.affine:
            new.weight.copy_(bn.weight)
            new.bias.copy_(bn.bias)
    new.train(bn.training)
    return new


def _maxpool_to_avgpool(module: nn.Module, name: str, ctx: _Context) -> nn.Module:
    from timm.layers.pool2d_same import AvgPool2dSame, MaxPool2dSame

    if isinstance(module, MaxPool2dSame):
        return AvgPool2dSame(module.kernel_size, module.stride, ceil_mode=module.ceil_mode)
    return nn.AvgPool2d(module.kernel_size, module.stride, module.padding, ceil_mode=module.ceil_mode,
                        count_include_pad=True)


def _is_plain_maxpool(m: nn.Module, ctx: _Context) -> bool:
    return (_is_maxpool(m) and ctx.replace_maxpool and m.dilation in (1, (1, 1))
            and not getattr(m, "return_indices", False))


_NOT_COVERED_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d,
                      nn.LocalResponseNorm, nn.BatchNorm1d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.RMSNorm)
_UNNORMALISED_LINEAR = (nn.Conv1d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
                        nn.Bilinear)

RULES: Tuple[Rule, ...] = (
    Rule("residual_average", lambda m, c: c.average_residuals and isinstance(m, RESIDUAL_TYPES),
         average_residual, before_children=True),
    Rule("residual_average", lambda m, c: c.average_residuals and isinstance(getattr(m, "residual_scale", None), float),
         _halve_residual_scale, before_children=True),
    Rule("activation", lambda m, c: isinstance(m, ACTIVATION_TYPES)
         or (isinstance(m, CenteredSoftplus) and not isinstance(m.log_beta, nn.Parameter)),
         lambda m, n, c: CenteredSoftplus(c.beta_init, **c.act_kw)),
    Rule("batchnorm", lambda m, c: isinstance(m, nn.BatchNorm2d) and not isinstance(m, nn.SyncBatchNorm),
         _lipschitz_bn),
    Rule("conv_spectral_norm", lambda m, c: isinstance(m, nn.Conv2d), _conv_rewrite),
    Rule("linear_spectral_norm", lambda m, c: isinstance(m, nn.Linear), _linear_rewrite),
    Rule("maxpool_to_avgpool", _is_plain_maxpool, _maxpool_to_avgpool),
    Rule("max_pooling", lambda m, c: _is_maxpool(m) or isinstance(m, (nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d)),
         reason="max-pooling is not smooth"),
    Rule("hard_gate", lambda m, c: isinstance(m, (nn.Hardsigmoid, nn.Hardtanh)),
         reason="piecewise-linear gate: not smooth"),
    Rule("normalisation", lambda m, c: isinstance(m, _NOT_COVERED_NORMS),
         reason="normalisation other than BatchNorm2d: not covered by the bound"),
    Rule("attention", lambda m, c: isinstance(m, nn.MultiheadAttention) or "Attention" in type(m).__name__,
         reason="attention is not covered by the bound"),
    Rule("linear_layer", lambda m, c: isinstance(m, _UNNORMALISED_LINEAR),
         reason="linear layer without spectral normalisation (lcnnify normalises Conv2d and Linear)"),
)


def _reason_for(module: nn.Module) -> str:
    """Why a module the coverage analysis meets is not covered: from the rules table."""
    ctx = _Context(DEFAULT_BETA_INIT, DEFAULT_GAMMA_INIT, None, True, True, {}, {}, {})
    matching = [r for r in RULES if not r.before_children and r.matches(module, ctx)]
    reasons = [r.reason for r in matching if r.rewrite is None]
    if reasons:
        return reasons[0]
    if matching:
        return f"{type(module).__name__} is not converted (added after lcnnify?)"
    return f"unknown module {type(module).__name__}: not covered by the bound"


# --------------------------------------------------------------------------------------------
# lcnnify
# --------------------------------------------------------------------------------------------
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


def _convert(module: nn.Module, prefix: str, ctx: _Context, counts: Counter) -> Optional[nn.Module]:
    """Apply the table to ``module`` and its descendants; returns its replacement or None."""
    for rule in RULES:
        if rule.before_children and rule.rewrite is not None and rule.matches(module, ctx):
            rule.rewrite(module, prefix, ctx)
            counts[rule.kind] += 1
            break
    for name, child in list(module.named_children()):
        new = _convert(child, f"{prefix}.{name}" if prefix else name, ctx, counts)
        if new is not None:
            setattr(module, name, new)
    for rule in RULES:
        if not rule.before_children and rule.matches(module, ctx):
            if rule.rewrite is None:
                return None
            counts[rule.kind] += 1
            return rule.rewrite(module, prefix, ctx)
    return None


def lcnnify(
    model: nn.Module,
    *,
    input_size: Optional[Sequence[int]] = None,
    beta_init: float = DEFAULT_BETA_INIT,
    gamma_init: float = DEFAULT_GAMMA_INIT,
    bn_affine: Optional[bool] = None,
    average_residuals: bool = True,
    replace_maxpool: bool = True,
    n_power_iterations: int = 1,
    init_iterations: int = MAX_INIT_ITERATIONS,
    strict: bool = False,
) -> nn.Module:
    """Convert ``model`` into a low-curvature network in place and return it.

    Rewrites (paper §3.3–3.4; the table :data:`RULES`):

    * ReLU / ReLU6 / LeakyReLU / GELU / SiLU / Hardswish / ELU / Mish … (torch's and timm's
      classes), and fixed-β centered softplus → :class:`~lcnn_zoo.layers.CenteredSoftplus`
      (learnable β = ``beta_init``).
    * ``BatchNorm2d`` → :class:`~lcnn_zoo.layers.LipschitzBatchNorm2d` (γ = ``gamma_init``, running
      statistics and affine parameters copied); timm's ``BatchNormAct2d`` →
      :class:`~lcnn_zoo.layers.LipschitzBatchNormAct2d`, keeping (and converting) its activation.
    * ``Conv2d`` (incl. timm's ``Conv2dSame``; ``StdConv2d`` variants become plain convs with their
      current standardised weight) and ``Linear`` → spectrally normalised on the true operator,
      converged to 1e-3 at once (at most ``init_iterations`` power iterations).
    * ResNet ``BasicBlock``/``Bottleneck`` (timm and torchvision): the residual sum becomes the
      average of the two branches (``average_residuals``), as in the paper's reference ResNet. Any
      other block that computes ``(branch + shortcut) * self.residual_scale`` (a float) gets 0.5.
    * ``MaxPool2d`` → ``AvgPool2d`` with the same window (``replace_maxpool``): max-pooling is not
      smooth, average pooling is linear.

    Conversion keeps the architecture and the weights, not the function: a trained network's
    outputs change (BatchNorm loses its affine parameters with ``bn_affine=False``, activations
    become centered softplus, weights are divided by their norms), so a converted pretrained
    network is an initialisation to fine-tune, not a drop-in replacement.

    The converted model's graph is then checked (:mod:`lcnn_zoo.coverage`): every operation whose
    Lipschitz bound the conversion does not establish — residual sums and concatenations outside
    the blocks it rewrites, upsampling, gates, learned scales, other normalisations, attention,
    unknown modules — is listed in ``model.lcnn_report`` (:class:`ConversionReport`) and announced
    with one :class:`LCNNConversionWarning`, or raised with ``strict=True``. ``model.reset_classifier``
    keeps the new head spectrally normalised, and running the model at another input size than
    ``input_size`` warns once (:class:`LCNNInputSizeWarning`; :func:`set_input_size` recomputes).

    Args:
        model: any ``nn.Module`` (NCHW CNN) without LCNN layers.
        input_size: (C, H, W) the convolution operator norms are computed for. Default:
            ``model.pretrained_cfg["input_size"]``, else the shape of the first forward pass.
        bn_affine: None keeps each BatchNorm's ``affine`` setting; True/False forces it (the
            paper uses False).
        n_power_iterations: power iterations per training forward (1 in the paper).
        init_iterations: at most this many power iterations at conversion.

    Returns:
        ``model`` (same object), converted.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"lcnnify expects an nn.Module, got {type(model).__name__}")
    done = next((n for n, m in model.named_modules()
                 if isinstance(m, LipschitzBatchNorm2d) or spectral_norm_of(m) is not None), None)
    if done is not None or getattr(model, "lcnn_report", None) is not None:
        raise ValueError(f"lcnnify: the model already contains LCNN layers ({done or 'lcnn_report'}): it has been "
                         "converted; convert the original model instead")
    size = _resolve_input_size(model, input_size)
    if strict and size is None:
        raise ValueError("lcnnify: strict=True needs input_size=(C, H, W): the coverage check runs at that size")
    ref = next((p for p in model.parameters() if p.is_floating_point()), None)
    ctx = _Context(beta_init, gamma_init, bn_affine, average_residuals, replace_maxpool,
                   dict(n_power_iterations=n_power_iterations, init_iterations=init_iterations,
                        init_tol=CONVERGENCE_TOL),
                   _trace_conv_inputs(model, size) if size is not None else {},
                   {"device": ref.device, "dtype": ref.dtype} if ref is not None else {})
    counts: Counter = Counter()
    if _convert(model, "", ctx, counts) is not None:  # the model itself is a single layer
        raise ValueError(f"lcnnify: the model itself is a {type(model).__name__}; wrap it in a container")

    _keep_head_spectral(model)
    model.lcnn_report = ConversionReport(input_size=size, converted=dict(counts))
    model._lcnn_input_size = size
    model._lcnn_size_warned = False
    model.register_forward_pre_hook(_input_size_hook)
    if size is not None:
        _check_coverage(model, strict=strict, stacklevel=3)
    return model


def _check_coverage(model: nn.Module, *, strict: bool = False, stacklevel: int = 2) -> None:
    report = model.lcnn_report
    cov = analyse(model, report.input_size, _reason_for)
    report.unconverted = [(f.name, f.op, f.reason) for f in cov.findings]
    report.gains = cov.gains
    report.analysis = cov.method
    unconverged = [(n, r) for n, r in _unconverged_layers(model)]
    report.unconverted += [(n, "spectral norm", f"σ converged only to a relative residual of {r:.1e} "
                            f"(> {CONVERGENCE_TOL:g}); run lcnn_zoo.converge_spectral_norms")
                           for n, r in unconverged]
    if report.unconverted:
        msg = str(report)
        if strict:
            raise ValueError(msg)
        warnings.warn(msg, LCNNConversionWarning, stacklevel=stacklevel)


def _unconverged_layers(model: nn.Module):
    for name, m in model.named_modules():
        sn = spectral_norm_of(m)
        if sn is not None and getattr(sn, "last_residual", 0.0) > CONVERGENCE_TOL:
            yield name, sn.last_residual


def _input_size_hook(model: nn.Module, args) -> None:
    """Root forward pre-hook: the first forward fixes an unknown input size (and checks coverage);
    another size than the norms were computed for warns once."""
    x = args[0] if args else None
    if not isinstance(x, torch.Tensor) or x.dim() < 2:
        return
    size = tuple(x.shape[1:])
    expected = model._lcnn_input_size
    if expected is None:
        if torch.compiler.is_compiling():
            return
        model._lcnn_input_size = size
        model.lcnn_report.input_size = size
        _check_coverage(model, stacklevel=4)
    elif size != expected and not model._lcnn_size_warned:
        model._lcnn_size_warned = True
        warnings.warn(
            f"lcnn_zoo: this LCNN's convolution norms were computed for inputs of size {expected}, and it is run "
            f"at {size}: zero-padded convolutions' norms change with the input size, so its layers are not "
            f"guaranteed 1-Lipschitz at this size. Call lcnn_zoo.set_input_size(model, {size}) to recompute them "
            f"(this warning is shown once per model).", LCNNInputSizeWarning, stacklevel=3)


def set_input_size(model: nn.Module, input_size: Sequence[int]) -> nn.Module:
    """Recompute every convolution's operator norm for inputs of ``input_size`` = (C, H, W) (the
    singular vectors are re-allocated and converged to 1e-3) and re-check coverage at that size.
    Returns ``model``."""
    if getattr(model, "lcnn_report", None) is None:
        raise ValueError("set_input_size: the model was not converted with lcnnify")
    size = _resolve_input_size(model, input_size)
    model._lcnn_input_size = size  # before the tracing forward below, which would warn otherwise
    model._lcnn_size_warned = False
    shapes = _trace_conv_inputs(model, size)
    for name, m in model.named_modules():
        sn = spectral_norm_of(m)
        if sn is not None and sn.kind == "conv2d" and name in shapes:
            sn.op.padding = conv_padding(m, shapes[name][1:])
            sn.initialize(m.parametrizations.weight.original, shapes[name])
    model.lcnn_report.input_size = size
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, dict) and "input_size" in cfg:
        model.pretrained_cfg = {**cfg, "input_size": size}
    _check_coverage(model)
    return model


# ---- reset_classifier keeps the head inside the bound ---------------------------------------
_SPECTRAL_HEAD_CLASSES: Dict[type, type] = {}


def _reset_classifier(self: nn.Module, *args, **kwargs):
    """timm's ``reset_classifier``, then the new head's Linear/Conv2d layers spectrally normalised."""
    out = type(self).__bases__[0].reset_classifier(self, *args, **kwargs)
    head = self.get_classifier() if hasattr(self, "get_classifier") else None
    if isinstance(head, nn.Module):
        for m in head.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)) and spectral_norm_of(m) is None:
                spectral_norm(m)  # a conv head gets its input size at the first forward
    return out


def _keep_head_spectral(model: nn.Module) -> None:
    """Give the model a subclass of its own class whose ``reset_classifier`` keeps the new head
    spectrally normalised (the way torch's parametrize gives layers a subclass)."""
    base = type(model)
    if not callable(getattr(model, "reset_classifier", None)) or getattr(base, "_lcnn_spectral_head", False):
        return
    cls = _SPECTRAL_HEAD_CLASSES.get(base)
    if cls is None:
        cls = type(base.__name__, (base,), {"reset_classifier": _reset_classifier, "_lcnn_spectral_head": True,
                                            "__module__": base.__module__, "__qualname__": base.__qualname__,
                                            "__doc__": base.__doc__})
        _SPECTRAL_HEAD_CLASSES[base] = cls
    model.__class__ = cls


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


def _strip_lcnn_state(model: nn.Module) -> None:
    """Remove what lcnnify attached to the root: the report, the input-size hook, the head subclass."""
    for key in [k for k, h in model._forward_pre_hooks.items() if h is _input_size_hook]:
        del model._forward_pre_hooks[key]
    for attr in ("lcnn_report", "_lcnn_input_size", "_lcnn_size_warned"):
        if attr in model.__dict__:
            delattr(model, attr)
    if getattr(type(model), "_lcnn_spectral_head", False) and type(model) in _SPECTRAL_HEAD_CLASSES.values():
        model.__class__ = type(model).__bases__[0]


@torch.no_grad()
def fold(model: nn.Module, *, example_input: Optional[torch.Tensor] = None, inplace: bool = False,
         rtol: float = 1e-5) -> nn.Module:
    """Turn a (trained) LCNN into plain torch modules with identical eval-mode outputs.

    * spectral normalisation is baked into the weights (W / σ with the current singular vectors),
      and the parametrizations and every lcnn_zoo state-dict hook are removed;
    * each γ-Lipschitz BN becomes the equivalent affine ``BatchNorm2d``, fused into the preceding
      convolution when it consumes that convolution's output alone;
    * :class:`CenteredSoftplus` becomes :class:`FrozenCenteredSoftplus` (``softplus(x, β) − log2/β``,
      constant β). It and :class:`~lcnn_zoo.layers.Scale` (the residual average's ×0.5) are the
      lcnn_zoo classes left in a folded model — each one line of plain torch ops, for which torch.nn
      has no module; the zoo's own architectures keep their classes (``lcnn_zoo.models``);
    * the report, the input-size hook and the ``reset_classifier`` subclass lcnnify added go.

    The result is in eval mode; its own state dict loads into it, and it scripts (TorchScript),
    traces, exports (``torch.export``) and exports to ONNX. A self-check compares its outputs on
    ``example_input`` (default: random, of the ``model.lcnn_report.input_size``) with the LCNN's and
    raises if the maximum deviation exceeds ``rtol`` times the largest output magnitude.

    Args:
        inplace: modify ``model`` itself instead of a deep copy.
    """
    if not any(spectral_norm_of(m) is not None or isinstance(m, (LipschitzBatchNorm2d, CenteredSoftplus))
               for m in model.modules()):
        raise ValueError("fold: the model has no LCNN layers to fold (is it folded already?)")
    folded = model if inplace else copy.deepcopy(model)
    folded.eval()
    if example_input is None:
        size = getattr(getattr(model, "lcnn_report", None), "input_size", None)
        if size is None:
            shapes = [sn.input_shape for _, sn in spectral_norm_modules(folded)
                      if sn.kind == "conv2d" and sn.input_shape]
            if not shapes:
                raise ValueError("fold: pass example_input (the model's input size is unknown)")
            size = shapes[0]
        p = next(folded.parameters())
        gen = torch.Generator(device="cpu").manual_seed(0)
        example_input = torch.rand(2, *size, generator=gen).to(device=p.device, dtype=p.dtype)
    reference = folded(example_input)

    for m, _ in list(spectral_norm_modules(folded)):
        remove_spectral_norm(m)

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
    _strip_lcnn_state(folded)
    _fuse_conv_bn(folded, example_input)
    for p in folded.parameters():
        p.requires_grad_(False)
    out = folded(example_input)
    err = (out - reference).abs().max()
    scale = reference.abs().max().clamp_min(1e-12)
    if not torch.isfinite(out).all() or err > rtol * scale:
        raise RuntimeError(f"fold: folded outputs deviate from the LCNN by {float(err):.3g} "
                           f"(> {rtol} x {float(scale):.3g}); please report this model")
    return folded
