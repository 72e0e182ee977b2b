"""Turning any timm / torchvision CNN into an LCNN (:func:`lcnnify`, paper §3.3–3.4); back into plain
torch modules is :func:`lcnn_zoo.fold` (:mod:`lcnn_zoo.folding`).

What lcnnify rewrites is one table, :data:`RULES`: each row says which modules it takes and how it
rewrites them, or — for modules it keeps — why the bound does not cover them. The report attached
to the converted model (:class:`ConversionReport`) comes from :mod:`lcnn_zoo.coverage`, which
checks the traced graph and asks this table about the modules it does not know.
"""
from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from timm.layers import (
    BatchNormAct2d,
    Conv2dSame,
    ScaledStdConv2d,
    ScaledStdConv2dSame,
    StdConv2d,
    StdConv2dSame,
)
from timm.layers import activations as timm_acts
from timm.layers import activations_me as timm_acts_me
from timm.layers.pool2d_same import AvgPool2dSame, MaxPool2dSame
from timm.models.resnet import BasicBlock as TimmBasic
from timm.models.resnet import Bottleneck as TimmBottleneck
from torch import nn
from torchvision.models import resnet as tv_resnet

from .coverage import analyse, measure_norm, trained_buffers
from .graph_rules import apply_graph_rules, is_gate_finding
from .layers import (
    DEFAULT_BETA_INIT,
    DEFAULT_GAMMA_INIT,
    CenteredSoftplus,
    LipschitzBatchNorm2d,
    LipschitzBatchNormAct2d,
    Scale,
    conv_padding,
    eval_mode,
    preforward,
    spectral_norm,
    spectral_norm_of,
)
from .layers.spectral_norm import CONVERGENCE_TOL, MAX_INIT_ITERATIONS, drop_hooks

__all__ = ["lcnnify", "set_input_size", "average_residual", "detach_lcnn_state", "ConversionReport",
           "LCNNConversionWarning", "LCNNInputSizeWarning", "RULES", "Rule", "ACTIVATION_TYPES", "RESIDUAL_TYPES"]


#: An ``nn.Module`` carrying the attributes lcnnify sets (``lcnn_report``, ``_lcnn_input_size``…) and
#: that timm's models have (``reset_classifier``, ``pretrained_cfg``): torch's stubs type every
#: dynamic attribute as ``Tensor | Module``, so these functions take it untyped.
LCNNModel = Any


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
        converted: counts per category of rewrite, e.g. ``{"activation": 17, "batchnorm": 20, ...}``.
        unconverted: (module name, operation or type, reason) for every operation whose bound the
            conversion does not establish.
        gains: (module name, factor) of fixed factors above 1 (e.g. a logit scale): covered, and the
            network's bound is multiplied by them.
        analysis: "graph" (torch.fx), "modules" (tracing failed: module-level check, said in
            ``unconverted``) or "pending" (no input size yet).
        gates: lcnnify's ``gates`` option ("keep" or "remove").
        refused: module name → why a merge the analysis found in it was not rewritten (its forward
            could not be traced alone, takes optional arguments, differs in train and eval…).
    """

    input_size: Optional[Tuple[int, int, int]] = None
    converted: Dict[str, int] = field(default_factory=dict)
    unconverted: List[Tuple[str, str, str]] = field(default_factory=list)
    gains: List[Tuple[str, float]] = field(default_factory=list)
    analysis: str = "pending"
    gates: str = "keep"
    refused: Dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True when the analysis ran and found every operation covered by the bound."""
        return self.analysis == "graph" and not self.unconverted

    @property
    def verdict(self) -> str:
        """One sentence: whether the curvature bound applies to the converted model."""
        if self.analysis == "pending":
            return "not known yet: the coverage analysis runs at the first forward (no input_size was given)"
        if self.ok:
            return "the curvature bound holds: every operation is covered"
        places = len({name for name, _, _ in self.unconverted})
        return (f"the curvature bound does NOT apply to this model: {len(self.unconverted)} operation(s) in "
                f"{places} place(s) are not covered (listed below)")

    def __str__(self) -> str:
        lines = [f"lcnnify: input_size={self.input_size}, converted " +
                 ", ".join(f"{k}={v}" for k, v in sorted(self.converted.items())), f"  verdict: {self.verdict}"]
        for name, factor in self.gains:
            lines.append(f"  fixed gain ×{factor:.4g} at {name}: the network's Lipschitz bound is multiplied by it")
        # One line per kind of finding (operation, reason), naming a few of its places: a transformer's
        # 40 identical findings are one line, not 40.
        kinds: Dict[Tuple[str, str], List[str]] = {}
        for name, typ, reason in self.unconverted:
            why_not = self.refused.get(name)
            places = kinds.setdefault((typ, reason + (f"; not rewritten: {why_not}" if why_not else "")), [])
            if (name or "<root>") not in places:
                places.append(name or "<root>")
        for (typ, reason), places in kinds.items():
            shown_places = ", ".join(places[:3]) + (f" and {len(places) - 3} more" if len(places) > 3 else "")
            lines.append(f"  not covered: {shown_places} ({typ}): {reason}")
        if self.gates == "keep" and any(is_gate_finding(reason) for _, _, reason in self.unconverted):
            lines.append('  gates="keep" (the default) keeps squeeze-excite and other gates, which have no bound; '
                         'lcnnify(..., gates="remove") replaces gate modules by identities')
        if self.ok:
            lines.append("  every operation is covered: each nonlinear layer's input is at most "
                         "(Π γ × fixed gains)-Lipschitz in the model input (eval mode)")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# The rules
# --------------------------------------------------------------------------------------------
@dataclass
class _Context:
    """What the rules need to know about one conversion: lcnnify's options, the spectral-norm
    arguments, each conv's traced input shape (by module name) and the new layers' device/dtype."""

    beta_init: float = DEFAULT_BETA_INIT
    gamma_init: float = DEFAULT_GAMMA_INIT
    bn_affine: Optional[bool] = None
    average_residuals: bool = True
    replace_maxpool: bool = True
    sn_kwargs: Dict[str, Any] = field(default_factory=dict)
    conv_shapes: Dict[str, Tuple[int, ...]] = field(default_factory=dict)
    act_kw: Dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Rule:
    """One row of lcnnify's table. ``matches(module, ctx)`` selects modules; ``rewrite(module, name,
    ctx)`` returns the replacement (or None when it rewrote the module in place) and is counted
    under ``category``; a rule without ``rewrite`` keeps the module and gives the ``reason`` the bound
    does not cover it. ``before_children`` rules see a block before its children are converted."""

    category: str
    matches: Callable[[nn.Module, _Context], bool]
    rewrite: Optional[Callable[[nn.Module, str, _Context], Optional[nn.Module]]] = None
    reason: str = ""
    before_children: bool = False


#: ReLU-family and other non-gating activations that become CenteredSoftplus (torch's and timm's).
ACTIVATION_TYPES: Tuple[type, ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Hardswish, nn.ELU, nn.CELU, nn.SELU, nn.Mish, nn.PReLU,
    nn.RReLU, nn.Softplus,
    *(getattr(timm_acts, n) for n in ("Swish", "Mish", "HardSwish", "HardMish", "GELU", "GELUTanh", "QuickGELU",
                                      "PReLU") if hasattr(timm_acts, n)),
    *(getattr(timm_acts_me, n) for n in ("SwishMe", "MishMe", "HardSwishMe", "HardMishMe") if hasattr(timm_acts_me, n)),
)
#: ResNet blocks whose residual sum lcnnify averages (timm's and torchvision's).
RESIDUAL_TYPES: Tuple[type, ...] = (TimmBasic, TimmBottleneck, tv_resnet.BasicBlock, tv_resnet.Bottleneck)


def _is_maxpool(m: nn.Module) -> bool:

    return isinstance(m, (nn.MaxPool2d, MaxPool2dSame))


def average_residual(block: Any, name: str = "", ctx: Optional[_Context] = None) -> None:
    """The rewrite lcnnify applies to ResNet blocks: ``out = branch + shortcut`` becomes ``(branch + shortcut) / 2``.

    For the ResNet blocks of timm and torchvision, by scaling both summands with :class:`Scale` (0.5)
    modules placed where each block's forward applies them (in place).

    Args:
        block: a timm or torchvision ``BasicBlock``/``Bottleneck``.
        name: the block's module path (unused; the signature of a rule's rewrite).
        ctx: lcnnify's conversion context (unused; idem).
    """

    half = Scale(0.5)
    if isinstance(block, (TimmBasic, TimmBottleneck)):
        # timm: ... bn2/bn3 -> se -> drop_path -> (+ downsample(shortcut)). drop_path is the last
        # module on the branch (and is skipped when None), so the scale goes there.
        block.drop_path = half if block.drop_path is None else nn.Sequential(block.drop_path, half)
    else:
        last = "bn2" if isinstance(block, tv_resnet.BasicBlock) else "bn3"
        setattr(block, last, nn.Sequential(getattr(block, last), half))
    if block.downsample is None:
        block.downsample = Scale(0.5)
    elif isinstance(block.downsample, nn.Sequential):
        block.downsample.append(Scale(0.5))  # keeps the existing state-dict keys
    else:
        block.downsample = nn.Sequential(block.downsample, Scale(0.5))


def _halve_residual_scale(block: Any, name: str, ctx: _Context) -> None:
    block.residual_scale = 0.5  # blocks computing (branch + shortcut) * residual_scale


def _effective_conv(conv: Any) -> nn.Conv2d:
    """Replace timm's weight-standardised convs by a plain conv with the standardised weight.

    Weight standardisation is scale-invariant, so it would undo spectral normalisation; the LCNN
    keeps the function the conv computes now and drops the standardisation from then on.
    """

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
    geometry: Dict[str, Any] = dict(kernel_size=conv.kernel_size, stride=conv.stride,
                                    padding=0 if same else conv.padding, dilation=conv.dilation,
                                    groups=conv.groups, bias=conv.bias is not None)
    new = cls(conv.in_channels, conv.out_channels, **geometry, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        new.weight.copy_(eff)
        if conv.bias is not None and new.bias is not None:
            new.bias.copy_(conv.bias)
    return new


def _conv_rewrite(module: Any, name: str, ctx: _Context) -> Optional[nn.Module]:
    conv = _effective_conv(module)
    spectral_norm(conv, ctx.conv_shapes.get(name), **ctx.sn_kwargs)
    return conv if conv is not module else None


def _linear_rewrite(module: nn.Module, name: str, ctx: _Context) -> None:
    spectral_norm(module, **ctx.sn_kwargs)


def _lipschitz_bn(bn: Any, name: str, ctx: _Context) -> LipschitzBatchNorm2d:
    if not bn.track_running_stats:
        raise ValueError(f"lcnnify: {name or 'the model'} is a BatchNorm2d(track_running_stats=False): it has no "
                         "running variance to bound the Lipschitz constant with")
    affine = bn.affine if ctx.bn_affine is None else ctx.bn_affine
    fk = {"device": bn.running_mean.device, "dtype": bn.running_mean.dtype}
    kw: Dict[str, Any] = dict(eps=bn.eps, momentum=bn.momentum, affine=affine, gamma_init=ctx.gamma_init, **fk)

    new: LipschitzBatchNorm2d
    if isinstance(bn, BatchNormAct2d):  # its act was converted with its children
        new = LipschitzBatchNormAct2d(bn.num_features, act=bn.act, drop=bn.drop, **kw)
    else:
        new = LipschitzBatchNorm2d(bn.num_features, **kw)
    with torch.no_grad():
        new.running_mean.copy_(bn.running_mean)
        new.running_var.copy_(bn.running_var)
        # The statistics were recorded for the unconverted network (its convolutions were not normalised):
        # counted as unseen, so a short fine-tune recomputes them at its end (training._recalibrate_if_short).
        new.num_batches_tracked.zero_()
        if affine and bn.affine and new.weight is not None and new.bias is not None:
            new.weight.copy_(bn.weight)
            new.bias.copy_(bn.bias)
    new.train(bn.training)
    return new


def _maxpool_to_avgpool(module: Any, name: str, ctx: _Context) -> nn.Module:

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
    ctx = _Context()  # the rules as lcnnify applies them with its default options
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
    try:
        with eval_mode(model):
            model(x)
    except Exception as e:  # noqa: BLE001 - re-raised with context
        raise ValueError(f"lcnnify: a forward pass at input_size={input_size} failed ({e}); "
                         "pass the input_size the model is used with") from e
    finally:
        for h in handles:
            h.remove()
    return shapes


def _convert(module: nn.Module, prefix: str, ctx: _Context, counts: Counter) -> Optional[nn.Module]:
    """Apply the table to ``module`` and its descendants; returns its replacement or None."""
    for rule in RULES:
        if rule.before_children and rule.rewrite is not None and rule.matches(module, ctx):
            rule.rewrite(module, prefix, ctx)
            counts[rule.category] += 1
            break
    for name, child in list(module.named_children()):
        new = _convert(child, f"{prefix}.{name}" if prefix else name, ctx, counts)
        if new is not None:
            setattr(module, name, new)
    for rule in RULES:
        if not rule.before_children and rule.matches(module, ctx):
            if rule.rewrite is None:
                return None
            counts[rule.category] += 1
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
    gates: str = "keep",
    n_power_iterations: int = 1,
    init_iterations: int = MAX_INIT_ITERATIONS,
    strict: bool = False,
) -> nn.Module:
    """Convert ``model`` into a low-curvature network in place and return it.

    Rewrites (paper §3.3–3.4; the table :data:`RULES`):

    * ReLU / ReLU6 / LeakyReLU / GELU / SiLU / Hardswish / ELU / Mish … (torch's and timm's
      classes), and fixed-β centered softplus → :class:`~lcnn_zoo.layers.CenteredSoftplus`.
    * ``BatchNorm2d`` → :class:`~lcnn_zoo.layers.LipschitzBatchNorm2d` (running statistics and affine
      parameters copied); timm's ``BatchNormAct2d`` → :class:`~lcnn_zoo.layers.LipschitzBatchNormAct2d`,
      keeping (and converting) its activation.
    * ``Conv2d`` (incl. timm's ``Conv2dSame``; ``StdConv2d`` variants become plain convs with their
      current standardised weight) and ``Linear`` → spectrally normalised on the true operator,
      converged to 1e-3 at once.
    * ResNet ``BasicBlock``/``Bottleneck`` (timm, torchvision) average their residual sum, as the
      paper's ResNet; any other block computing ``(branch + shortcut) * self.residual_scale`` gets 0.5.
    * On the traced graph (:mod:`lcnn_zoo.graph_rules`): other sums of k tensors are averaged, concatenations
      scaled by 1/√k, ``nn.Upsample`` by 1/its norm; ``gates="remove"``: gates ``x * g(x)`` (SE, ECA) → identity.
    * ``MaxPool2d`` → ``AvgPool2d`` with the same window: max-pooling is not smooth, average pooling is linear.

    Conversion keeps the architecture and the weights, not the function (activations change, weights
    are divided by their norms…): a converted pretrained network is an initialisation to fine-tune.
    The converted graph is then checked (:mod:`lcnn_zoo.coverage`): every operation whose Lipschitz
    bound the conversion does not establish (sums outside the rewritten blocks, gates, learned scales,
    other normalisations, attention, unknown modules…) is listed in ``model.lcnn_report``
    (:class:`ConversionReport`) and announced with one :class:`LCNNConversionWarning`.
    ``model.reset_classifier`` keeps a new head spectrally normalised; a forward at another input size
    warns once (:class:`LCNNInputSizeWarning`; see :func:`set_input_size`).

    Args:
        model: any ``nn.Module`` (NCHW CNN) without LCNN layers.
        input_size: (C, H, W) the convolution operator norms are computed for. Default:
            ``model.pretrained_cfg["input_size"]``, else the shape of the first forward pass.
        beta_init: initial β of every centered softplus (> 0).
        gamma_init: initial γ of every γ-Lipschitz BatchNorm (> 1).
        bn_affine: None keeps each BatchNorm's ``affine`` setting; True/False forces it (the paper uses False).
        average_residuals: average sums, rescale concatenations (False keeps them, reported).
        replace_maxpool: max-pooling → average pooling (False keeps it, reported).
        gates: "keep" (default: gates are kept, reported) or "remove".
        n_power_iterations: power iterations per training forward (1 in the paper).
        init_iterations: at most this many power iterations at conversion.
        strict: raise ``ValueError`` instead of warning when an operation is not covered.

    Returns:
        ``model`` (same object), converted.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, or holds a TorchScript module.
        ValueError: ``model`` is already converted or a single layer; ``gates``, ``input_size``, ``beta_init``
            or ``gamma_init`` is out of range; ``strict`` without an input size, or an operation not covered.
    """
    size = _check_convertible(model, input_size, strict, gates)
    ref = next((p for p in model.parameters() if p.is_floating_point()), None)
    ctx = _Context(beta_init=beta_init, gamma_init=gamma_init, bn_affine=bn_affine,
                   average_residuals=average_residuals, replace_maxpool=replace_maxpool,
                   sn_kwargs=dict(n_power_iterations=n_power_iterations, init_iterations=init_iterations,
                                  init_tol=CONVERGENCE_TOL),
                   conv_shapes=_trace_conv_inputs(model, size) if size is not None else {},
                   act_kw={"device": ref.device, "dtype": ref.dtype} if ref is not None else {})
    counts: Counter = Counter()
    if _convert(model, "", ctx, counts) is not None:  # the model itself is a single layer
        raise ValueError(f"lcnnify: the model itself is a {type(model).__name__}; wrap it in a container")

    _attach_state(model, ConversionReport(input_size=size, converted=dict(counts), gates=gates))
    if size is not None:
        _graph_rules(model, size, average_residuals, gates)
        _check_coverage(model, strict=strict, stacklevel=3)
    return model


def _attach_state(model: LCNNModel, report: ConversionReport) -> None:
    """The report, the input-size hooks (root and stem) and the spectral ``reset_classifier``."""
    _keep_head_spectral(model)
    model.lcnn_report = report
    model._lcnn_input_size = report.input_size
    model._lcnn_size_warned = False
    model.register_forward_pre_hook(_input_size_hook)
    preforward.install(model)  # after the input-size hook: a lazily-shaped layer is prepared from its 2nd call
    _hook_stem(model, report.input_size)


def _graph_rules(model: LCNNModel, size: Tuple[int, int, int], merges: bool, gates: str) -> None:
    """The rewrites found on the traced graph (:mod:`lcnn_zoo.graph_rules`), until the analysis finds
    nothing more to rewrite (a rewrite can uncover the next merge downstream)."""
    if any(p.is_meta for p in model.parameters()):
        return
    report = model.lcnn_report
    trained = trained_buffers(model, size)  # once: the rewrites add no buffer
    for _ in range(4):
        cov = analyse(model, size, _reason_for, trained)
        before = {name: m.__dict__.get("forward") for name, m in model.named_modules()}
        counts, refused = apply_graph_rules(model, cov, merges=merges, gates=gates,
                                            measure=lambda m: _measure_module(model, size, m))
        report.refused = {**report.refused, **dict(refused)}
        if not counts:
            return
        try:
            _forward_at(model, size)
        except Exception as e:  # noqa: BLE001 - a rewritten forward that fails: undo this round's rewrites
            for name, m in model.named_modules():
                if name in before and m.__dict__.get("forward") is not before[name]:
                    m.__dict__.pop("forward", None)
                    report.refused[name] = f"its traced forward failed ({type(e).__name__})"
            return
        for k, v in counts.items():
            report.converted[k] = report.converted.get(k, 0) + v


def _forward_at(model: nn.Module, size: Tuple[int, int, int]) -> None:
    """One eval forward of zeros at ``size`` (nothing recorded)."""
    p = next((t for t in model.parameters() if t.is_floating_point()), None)
    with eval_mode(model), torch.no_grad():
        model(torch.zeros(1, *size, device=p.device if p is not None else None,
                          dtype=p.dtype if p is not None else None))


def _measure_module(model: nn.Module, size: Tuple[int, int, int], module: nn.Module) -> Optional[float]:
    """Operator norm of a parameter-free linear module at the input a forward at ``size`` gives it."""
    seen: List[torch.Tensor] = []
    handle = module.register_forward_pre_hook(lambda m, a: seen.append(a[0]) if not seen else None)
    try:
        _forward_at(model, size)
    finally:
        handle.remove()
    if not seen or not isinstance(seen[0], torch.Tensor):
        return None
    return measure_norm(lambda t: module(t), seen[0])


def _check_convertible(model: nn.Module, input_size: Optional[Sequence[int]], strict: bool, gates: str = "keep"
                       ) -> Optional[Tuple[int, int, int]]:
    """The input size to convert at; refuses what lcnnify cannot convert (once more, or strictly blind)."""
    if gates not in ("keep", "remove"):
        raise ValueError(f"lcnnify: gates must be 'keep' or 'remove', got {gates!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"lcnnify expects an nn.Module, got {type(model).__name__}")
    scripted = next((n or "the model" for n, m in model.named_modules() if isinstance(m, torch.jit.ScriptModule)), None)
    if scripted is not None:  # compiled code: its layers cannot be replaced nor hooked
        raise TypeError(f"lcnnify: {scripted} is a TorchScript module (torch.jit.script or trace): convert the "
                        f"original nn.Module, then script the folded model (lcnn_zoo.fold) if you need TorchScript")
    done = next((n for n, m in model.named_modules()
                 if isinstance(m, LipschitzBatchNorm2d) or spectral_norm_of(m) is not None), None)
    if done is not None or getattr(model, "lcnn_report", None) is not None:
        raise ValueError(f"lcnnify: the model already contains LCNN layers ({done or 'lcnn_report'}): it has been "
                         "converted; convert the original model instead")
    size = _resolve_input_size(model, input_size)
    if strict and size is None:
        raise ValueError("lcnnify: strict=True needs input_size=(C, H, W): the coverage check runs at that size")
    return size


def _check_coverage(model: LCNNModel, *, strict: bool = False, stacklevel: int = 2) -> None:
    report = model.lcnn_report
    if any(p.is_meta for p in model.parameters()):
        report.analysis = "pending"  # no values on the meta device: checked by set_input_size once materialised
        return
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


def _size_warning(expected: Tuple[int, ...], size: Tuple[int, ...]) -> None:
    warnings.warn(
        f"lcnn_zoo: this LCNN's convolution norms were computed for inputs of size {expected}, and it is run "
        f"at {size}: zero-padded convolutions' norms change with the input size, so its layers are not "
        f"guaranteed 1-Lipschitz at this size. Call lcnn_zoo.set_input_size(model, {size}) to recompute them "
        f"(this warning is shown once per model).", LCNNInputSizeWarning, stacklevel=4)


def _hook_stem(model: LCNNModel, size: Optional[Tuple[int, int, int]]) -> None:
    """The input-size check on the stem (the first convolution that takes the model's input) as well
    as on the root: ``forward_features``, ``forward_intermediates`` and other entry points than
    ``forward`` reach the stem, not the root's hook."""
    if size is None:
        return
    for m in model.modules():
        sn = spectral_norm_of(m)
        if sn is not None and sn.layer_type == "conv2d" and sn.input_shape == tuple(size):
            m._lcnn_size_warned = False
            m.register_forward_pre_hook(_stem_size_hook)
            model._lcnn_stem_checked = True
            return


def _stem_size_hook(conv: LCNNModel, args) -> None:
    x = args[0] if args else None
    sn = spectral_norm_of(conv)
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or sn is None or sn.input_shape is None:
        return
    if x.shape[1] != sn.input_shape[0]:  # another channel count: the convolution itself refuses it
        return
    if tuple(x.shape[1:]) != sn.input_shape and not conv._lcnn_size_warned:
        conv._lcnn_size_warned = True
        _size_warning(sn.input_shape, tuple(x.shape[1:]))


def _input_size_hook(model: LCNNModel, args) -> None:
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
        _hook_stem(model, size)  # type: ignore[arg-type]  # a (C, H, W) from a 4-d input
    elif (size != expected and size[:1] == tuple(expected)[:1] and not model._lcnn_size_warned
          and not getattr(model, "_lcnn_stem_checked", False)):
        model._lcnn_size_warned = True  # no stem found: the root warns
        _size_warning(expected, size)


def set_input_size(model: LCNNModel, input_size: Sequence[int]) -> nn.Module:
    """Recompute every convolution's operator norm for inputs of a new size, and re-check coverage there.

    The singular vectors are re-allocated and converged to 1e-3; ``model.pretrained_cfg["input_size"]``
    (if any) and the input-size checks follow the new size. An operation not covered at that size
    warns (:class:`LCNNConversionWarning`), as in :func:`lcnnify`.

    Args:
        model: a model converted by :func:`lcnnify`.
        input_size: (C, H, W) of one input sample, positive ints.

    Returns:
        ``model`` (same object).

    Raises:
        ValueError: the model was not converted with :func:`lcnnify`, or ``input_size`` is not (C, H, W)
            with positive entries.
    """
    if getattr(model, "lcnn_report", None) is None:
        raise ValueError("set_input_size: the model was not converted with lcnnify")
    size = _resolve_input_size(model, input_size)
    assert size is not None  # input_size given
    model._lcnn_input_size = size  # before the tracing forward below, which would warn otherwise
    model._lcnn_size_warned = False
    shapes = _trace_conv_inputs(model, size)
    for name, m in model.named_modules():
        sn = spectral_norm_of(m)
        if sn is not None and sn.layer_type == "conv2d" and name in shapes:
            sn.op.padding = conv_padding(m, shapes[name][1:])
            sn.initialize(m.parametrizations.weight.original, shapes[name])
    model.lcnn_report.input_size = size
    _unhook_stem(model)
    _hook_stem(model, size)
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, dict) and "input_size" in cfg:
        model.pretrained_cfg = {**cfg, "input_size": size}
    _check_coverage(model)
    return model


# ---- reset_classifier keeps the head inside the bound ---------------------------------------
class _SpectralHeadReset:
    """The model's ``reset_classifier``, then the new head's Linear/Conv2d layers spectrally
    normalised. Set on the instance (not a generated subclass): the model keeps its own class, so
    pickling and ``isinstance`` see the class the user built."""

    def __init__(self, model: LCNNModel) -> None:
        self.model = model

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        model = self.model
        out = type(model).reset_classifier(model, *args, **kwargs)
        head = model.get_classifier() if hasattr(model, "get_classifier") else None
        if isinstance(head, nn.Module):
            for m in head.modules():
                if isinstance(m, (nn.Linear, nn.Conv2d)) and spectral_norm_of(m) is None:
                    spectral_norm(m)  # a conv head gets its input size at the first forward
                    m.train(model.training)
        return out


def _keep_head_spectral(model: LCNNModel) -> None:
    """Make ``model.reset_classifier`` keep a new head spectrally normalised."""
    if callable(getattr(type(model), "reset_classifier", None)):
        model.reset_classifier = _SpectralHeadReset(model)


def _unhook_stem(model: nn.Module) -> None:
    for m in model.modules():
        drop_hooks(m._forward_pre_hooks, _stem_size_hook)
        if m is not model:
            m.__dict__.pop("_lcnn_size_warned", None)
    model.__dict__.pop("_lcnn_stem_checked", None)


def detach_lcnn_state(model: nn.Module) -> None:
    """Remove what lcnnify attached to the model itself: the report, the input-size hook and the
    ``reset_classifier`` wrapper (what :func:`lcnn_zoo.fold` does once the layers are plain)."""
    drop_hooks(model._forward_pre_hooks, _input_size_hook)  # fold works on a deep copy: no handle
    preforward.uninstall(model)
    _unhook_stem(model)
    for attr in ("lcnn_report", "_lcnn_input_size", "_lcnn_size_warned", "_lcnn_stem_checked"):
        if attr in model.__dict__:
            delattr(model, attr)
    if isinstance(model.__dict__.get("reset_classifier"), _SpectralHeadReset):
        del model.__dict__["reset_classifier"]
