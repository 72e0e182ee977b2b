"""The zoo's models, registered in timm: LCNN ResNets and their baselines.

Every architecture comes in three variants so experiments run side by side from the registry:

* ``lcnn_<arch>``          — the LCNN (paper §3): built as the plain net, then :func:`lcnn_zoo.lcnnify`
  (centered softplus β₀=5, γ-Lipschitz BN without affine parameters γ₀=10, true-operator spectral
  norm, averaged residuals), as in the paper's reference code;
* ``lcnn_<arch>_softplus`` — the paper's "standard" baseline: the same net with softplus β=1e3
  (fixed; centered, which changes no derivative), ordinary BN, convs and residual sums;
* ``lcnn_<arch>_relu``     — the plain ReLU net.

Architectures: the paper's CIFAR ResNet-18/34 (timm's ResNet with a 3×3 stride-1 stem and no
max-pool), He et al.'s CIFAR ResNet-20/56 (3 stages of 16/32/64 channels, 1×1-conv projection
shortcuts), the pre-activation wide ResNets WRN-16-8 / WRN-28-10 (Zagoruyko & Komodakis; the
robustness literature's usual backbone), and timm's ImageNet ResNet-50 / Wide-ResNet-50-2.

Input convention: images in [0, 1], **no normalisation** (``mean=(0,0,0)``, ``std=(1,1,1)`` in every
``pretrained_cfg``), as in the reference code, so ℓ2 radii ε mean the same as in the paper. The
convolution operator norms are computed for the cfg's ``input_size`` (``fixed_input_size=True``:
timm passes ``img_size``; override with ``pretrained_cfg_overlay=dict(input_size=...)``).

Every model takes ``logit_scale`` (default 1, as the reference code): a fixed factor on the logits,
stored as a persistent buffer. An LCNN's 1-Lipschitz classifier on about-unit-size features bounds
its logit margins by the feature norm, which is small for nets with few features (ResNet-20/56: 64);
the factor restores trainable margins without changing any logit's normalised curvature.
"""
# No `from __future__ import annotations` here: torch.fx copies forward()'s annotations into the code
# it generates, and TorchScript (timm's fx + torchscript test) cannot read them as strings.
import math
from contextlib import nullcontext
from functools import partial
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Sequence, Tuple, Type, Union, cast

import torch
import torch.nn.functional as F
from timm.layers import DropPath, create_classifier, is_exportable
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import (
    feature_take_indices,  # the helper every timm model's forward_intermediates uses
)
from timm.models.resnet import BasicBlock, Bottleneck, ResNet
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..conversion import lcnnify
from ..errors import shown
from ..folding import fold
from ..hub import PretrainedLoadError, extra_tags, recipe_hint, safe_build, weights_location
from ..layers import CONVERGENCE_TOL, CenteredSoftplus, converge_spectral_norms
from ..layers.preforward import checkpoint_contexts
from ..layers.spectral_norm import deferred_convergence
from ..penalty import LCNNPenalty, attach_penalty
from ..weight_checks import state_mismatch

if TYPE_CHECKING:
    from timm.layers import SelectAdaptivePool2d

__all__ = ["CifarResNet", "LcnnResNet", "PreActBlock", "WideResNet"]

FLAVOURS = ("lcnn", "softplus", "relu")


def _act_layer(flavour: str):
    if flavour not in FLAVOURS:
        raise ValueError(f"flavour must be one of {FLAVOURS}, got {flavour!r}")
    if flavour == "softplus":
        return partial(CenteredSoftplus, beta_init=1e3, learnable=False)
    return nn.ReLU  # the LCNN's ReLUs are converted by lcnnify


def _finalize(model: nn.Module, flavour: str, in_chans: int, img_size: Union[int, Sequence[int]], beta_init: float,
              gamma_init: float, device=None, dtype=None) -> None:
    if device is not None or dtype is not None:
        model.to(device=device, dtype=dtype)
    if flavour == "lcnn":
        # timm's convention: img_size=64 means 64 x 64 (create_model(..., img_size=64))
        size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        lcnnify(model, input_size=(in_chans, *size), bn_affine=False, beta_init=beta_init,
                gamma_init=gamma_init, strict=True)


def _add_logit_scale(model: nn.Module, value: float) -> None:
    """Give ``model`` its ``logit_scale``: a fixed factor on the logits, kept as a persistent 0-dim buffer.

    Being in the state dict, the factor travels with the weights (safetensors, checkpoints, the Hub):
    loading weights sets it, so a model is never evaluated with another scale than it was trained
    with. Weights saved before the buffer existed (no ``logit_scale`` key) were trained at 1 and load
    into a model built with the default; for them the model keeps the value it was built with.
    """
    value = float(value)
    if not (math.isfinite(value) and value > 0.0):
        raise ValueError(f"logit_scale must be a finite positive number, got {value}")
    model.register_buffer("logit_scale", torch.tensor(value))
    model.register_load_state_dict_pre_hook(_logit_scale_if_missing)


def _logit_scale_if_missing(module: nn.Module, state_dict: Dict[str, Any], prefix: str, *args: Any) -> None:
    key = prefix + "logit_scale"
    if key not in state_dict:
        state_dict[key] = cast(torch.Tensor, module.logit_scale).detach().clone()


@torch.jit.ignore
def _checkpointed(stage: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``stage(x)`` under gradient checkpointing, its recompute in :func:`~lcnn_zoo.layers.frozen_state`
    with the values the model's pre-forward prepared for the forward: no power iteration, no BatchNorm
    statistics recorded a second time, so the recompute computes exactly the function of the forward it
    replays (and saves the same tensors)."""
    return checkpoint(stage, x, use_reentrant=False, context_fn=lambda: checkpoint_contexts(stage))


class _ScaledHead:
    """The zoo's classifier head: timm's ResNet head (pool, dropout, fc), then the logit scale. A mixin
    before timm's ResNet (TorchScript cannot call ``super()``) and in the zoo's own nets."""

    if TYPE_CHECKING:  # what the host module has (declared for type checkers only: TorchScript reads annotations)
        training: bool
        drop_rate: float
        global_pool: SelectAdaptivePool2d
        fc: nn.Module
        logit_scale: torch.Tensor

    # Its entry points take folded=True (the model lcnn_zoo.fold makes), so a folded model saved by
    # timm's save_for_hf is rebuilt by its architecture name (fold records folded=True in _model_args).
    builds_folded = True

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """``nn.Module.load_state_dict``; weights that do not fit say why in one sentence (another
        architecture, another number of input channels, other sizes) instead of torch's list of
        keys, or the layer hooks' shape errors, that timm's ``checkpoint_path=`` would show."""
        try:
            return super().load_state_dict(state_dict, strict=strict, assign=assign)  # type: ignore[misc]
        except RuntimeError as e:
            reason = state_mismatch(cast(nn.Module, self), state_dict)
            if reason is None:
                raise
            raise RuntimeError(f"Error(s) in loading state_dict for {type(self).__name__}: {reason}") from e

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        if self.drop_rate:
            x = F.dropout(x, p=float(self.drop_rate), training=self.training)
        return x if pre_logits else self.fc(x) * self.logit_scale


def _kaiming_convs(model: nn.Module) -> None:
    """He-normal (fan-out) initialisation of every Conv2d, as timm's ResNet initialises its own."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")


class LcnnResNet(_ScaledHead, ResNet):
    """timm's :class:`~timm.models.resnet.ResNet` (any block/depth), optionally with the CIFAR stem
    (3×3 stride-1 conv, no max-pool); ``flavour`` is "lcnn", "softplus" (β=1e3) or "relu"."""

    def __init__(self, block: Type[nn.Module], layers: Sequence[int], *, flavour: str = "lcnn",
                 cifar_stem: bool = True, img_size: Sequence[int] = (32, 32), in_chans: int = 3,
                 beta_init: float = 5.0, gamma_init: float = 10.0, logit_scale: float = 1.0,
                 device=None, dtype=None, **kwargs: Any) -> None:
        # (timm annotates `block` as an instance of BasicBlock | Bottleneck, and `layers` as a tuple)
        super().__init__(block, layers, in_chans=in_chans, act_layer=_act_layer(flavour),  # type: ignore[arg-type]
                         **kwargs)
        self.flavour = flavour
        _add_logit_scale(self, logit_scale)
        if cifar_stem:
            # (timm's ResNet types conv1 and maxpool as nn.Sequential, their deep-stem / anti-aliased form)
            self.conv1 = nn.Conv2d(in_chans, cast(nn.Conv2d, self.conv1).out_channels, 3,  # type: ignore[assignment]
                                   stride=1, padding=1, bias=False)
            self.maxpool = nn.Identity()  # type: ignore[assignment]
            for info in self.feature_info:  # the stem no longer downsamples by 4
                info["reduction"] = max(1, cast(int, info["reduction"]) // (4 if info["module"] != "act1" else 2))
        _finalize(self, flavour, in_chans, img_size, beta_init, gamma_init, device, dtype)

    if TYPE_CHECKING:  # added by timm's ResNet with add_module (declared for type checkers only)
        layer1: nn.Sequential
        layer2: nn.Sequential
        layer3: nn.Sequential
        layer4: nn.Sequential

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        # timm's ResNet.forward_features, with the zoo's checkpointing (timm's checkpoint_seq recomputes
        # in training mode: BatchNorm statistics and power iterations would advance twice per step)
        x = self.maxpool(self.act1(self.bn1(self.conv1(x))))
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return self._checkpointed_layers(x)
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    @torch.jit.ignore
    def _checkpointed_layers(self, x: torch.Tensor) -> torch.Tensor:
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = _checkpointed(layer, x)
        return x


class _StagedNet(_ScaledHead, nn.Module):
    """timm's model API for the zoo's own CIFAR nets — a stem, ``stages``, an optional final norm,
    ``global_pool`` + ``fc`` (+ dropout) — with gradient checkpointing, ``group_matcher``,
    ``forward_intermediates`` and ``prune_intermediate_layers`` as timm's models have them.

    Gradient checkpointing recomputes each stage in :func:`~lcnn_zoo.layers.frozen_state`, so the
    recompute runs no power iteration and records no BatchNorm statistics: it computes exactly the
    function of the forward it replays.
    """

    if TYPE_CHECKING:  # set by the subclasses (declared for type checkers only: TorchScript reads annotations)
        conv1: nn.Conv2d
        stages: nn.Sequential

    def _init_head(self, num_features: int, num_classes: int, global_pool: str, drop_rate: float,
                   logit_scale: float) -> None:
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.num_features = self.head_hidden_size = num_features
        self.global_pool, self.fc = create_classifier(num_features, num_classes, pool_type=global_pool)
        self.grad_checkpointing = False
        _add_logit_scale(self, logit_scale)

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return x

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(stem=r"^conv1|^bn1", blocks=r"^stages\.(\d+)" if coarse else r"^stages\.(\d+)\.(\d+)")

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        pool = global_pool if global_pool is not None else self.global_pool.pool_type
        ref = self.conv1.weight
        self.global_pool, self.fc = create_classifier(self.num_features, num_classes, pool_type=pool)
        for m in (self.global_pool, self.fc):
            m.to(device=ref.device, dtype=ref.dtype).train(self.training)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            for stage in self.stages:
                x = _checkpointed(stage, x)
        else:
            x = self.stages(x)
        return self.final_norm(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(self, x: torch.Tensor, indices: Optional[Union[int, List[int]]] = None,
                              norm: bool = False, stop_early: bool = False, output_fmt: str = "NCHW",
                              intermediates_only: bool = False) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """timm's forward_intermediates: features after the stem (index 0) and each stage (1…)."""
        assert output_fmt in ("NCHW",), "Output shape must be NCHW."
        intermediates = []
        take_indices, max_index = feature_take_indices(len(self.stages) + 1, indices)
        x = self.stem(x)
        if 0 in take_indices:
            intermediates.append(x)
        stages = self.stages if torch.jit.is_scripting() or not stop_early else self.stages[:max_index]
        for i, stage in enumerate(stages, start=1):
            x = stage(x)
            if i in take_indices:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        return self.final_norm(x), intermediates

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        """Keep the stages ``indices`` need (timm's API); returns the indices taken."""
        take_indices, max_index = feature_take_indices(len(self.stages) + 1, indices)
        self.stages = self.stages[:max_index]
        if prune_norm:
            self._prune_norm()
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices

    def _prune_norm(self) -> None:
        pass


def _drop_path_rates(rate: float, n: int) -> List[float]:
    """Stochastic-depth rates growing linearly over the ``n`` blocks (timm's convention)."""
    return [rate * i / max(n - 1, 1) for i in range(n)]


class CifarResNet(_StagedNet):
    """He et al. (2016) CIFAR ResNet with 6n+2 layers: 3×3 conv stem, stages of n timm
    ``BasicBlock``s with ``channels`` widths (stride 2 between stages, 1×1-conv projection
    shortcuts), global average pooling and a linear classifier. Timm model API."""

    def __init__(self, layers: Sequence[int] = (3, 3, 3), channels: Sequence[int] = (16, 32, 64), *,
                 num_classes: int = 10, in_chans: int = 3, flavour: str = "lcnn", img_size: Sequence[int] = (32, 32),
                 global_pool: str = "avg", drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 beta_init: float = 5.0, gamma_init: float = 10.0, logit_scale: float = 1.0,
                 norm_layer: Type[nn.Module] = nn.BatchNorm2d, device=None, dtype=None) -> None:
        super().__init__()
        act_layer = _act_layer(flavour)
        self.flavour = flavour
        self.in_chans = in_chans
        self.conv1 = nn.Conv2d(in_chans, channels[0], 3, padding=1, bias=False)
        self.bn1 = norm_layer(channels[0])
        self.act1 = act_layer(inplace=True)
        self.feature_info: List[Dict[str, Any]] = [dict(num_chs=channels[0], reduction=1, module="act1")]
        in_chs, reduction = channels[0], 1
        dpr = iter(_drop_path_rates(drop_path_rate, sum(layers)))
        self.stages = nn.Sequential()
        for i, (n, c) in enumerate(zip(layers, channels)):
            stride = 1 if i == 0 else 2
            reduction *= stride
            blocks = []
            for j in range(n):
                s = stride if j == 0 else 1
                down = None
                if s != 1 or in_chs != c:
                    down = nn.Sequential(nn.Conv2d(in_chs, c, 1, stride=s, bias=False), norm_layer(c))
                rate = next(dpr)
                blocks.append(BasicBlock(in_chs, c, stride=s, downsample=down, act_layer=act_layer,
                                         norm_layer=norm_layer, drop_path=DropPath(rate) if rate > 0 else None))
                in_chs = c
            self.stages.add_module(str(i), nn.Sequential(*blocks))
            self.feature_info.append(dict(num_chs=c, reduction=reduction, module=f"stages.{i}"))
        self._init_head(in_chs, num_classes, global_pool, drop_rate, logit_scale)
        _kaiming_convs(self)
        _finalize(self, flavour, in_chans, img_size, beta_init, gamma_init, device, dtype)

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.act1(self.bn1(self.conv1(x)))


class PreActBlock(nn.Module):
    """Pre-activation wide-ResNet block: BN-act-conv3×3-BN-act-(dropout)-conv3×3, plus the shortcut
    (identity, or a 1×1 conv on the pre-activated input when the shape changes).

    ``residual_scale`` multiplies both summands; :func:`lcnn_zoo.lcnnify` sets it to 0.5 (the average
    of the two branches) — any block exposing this attribute is averaged the same way.
    """

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1, *, act_layer=nn.ReLU,
                 norm_layer=nn.BatchNorm2d, drop_rate: float = 0.0, drop_path_rate: float = 0.0) -> None:
        super().__init__()
        self.bn1 = norm_layer(in_chs)
        self.act1 = act_layer(inplace=True)
        self.conv1 = nn.Conv2d(in_chs, out_chs, 3, stride=stride, padding=1, bias=False)
        self.bn2 = norm_layer(out_chs)
        self.act2 = act_layer(inplace=True)
        self.drop = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(out_chs, out_chs, 3, padding=1, bias=False)
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0 else nn.Identity()
        self.shortcut = None
        if stride != 1 or in_chs != out_chs:
            self.shortcut = nn.Conv2d(in_chs, out_chs, 1, stride=stride, bias=False)
        self.residual_scale = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = self.act1(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(o)
        out = self.drop_path(self.conv2(self.drop(self.act2(self.bn2(self.conv1(o))))))
        if self.residual_scale != 1.0:  # ×0.5 is exact in floating point: the same sum, bit for bit
            return out * self.residual_scale + shortcut * self.residual_scale
        return out + shortcut


class WideResNet(_StagedNet):
    """WRN-depth-k for 32×32 inputs (Zagoruyko & Komodakis 2016): 3×3 conv stem (16), three groups of
    (depth-4)/6 :class:`PreActBlock`s with 16k/32k/64k channels, final BN-act, global pool, linear."""

    def __init__(self, depth: int = 28, widen_factor: int = 10, *, num_classes: int = 10, in_chans: int = 3,
                 flavour: str = "lcnn", img_size: Sequence[int] = (32, 32), global_pool: str = "avg",
                 drop_rate: float = 0.0, block_drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 beta_init: float = 5.0, gamma_init: float = 10.0, logit_scale: float = 1.0,
                 norm_layer: Type[nn.Module] = nn.BatchNorm2d, device=None, dtype=None) -> None:
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        act_layer = _act_layer(flavour)
        widths = (16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        self.flavour = flavour
        self.in_chans = in_chans
        self.conv1 = nn.Conv2d(in_chans, 16, 3, padding=1, bias=False)
        self.feature_info: List[Dict[str, Any]] = [dict(num_chs=16, reduction=1, module="conv1")]
        self.stages = nn.Sequential()
        in_chs, reduction = 16, 1
        dpr = iter(_drop_path_rates(drop_path_rate, 3 * n))
        for i, w in enumerate(widths):
            stride = 1 if i == 0 else 2
            reduction *= stride
            blocks = [PreActBlock(in_chs if j == 0 else w, w, stride if j == 0 else 1, act_layer=act_layer,
                                  norm_layer=norm_layer, drop_rate=block_drop_rate, drop_path_rate=next(dpr))
                      for j in range(n)]
            in_chs = w
            self.stages.add_module(str(i), nn.Sequential(*blocks))
            self.feature_info.append(dict(num_chs=w, reduction=reduction, module=f"stages.{i}"))
        self.bn = norm_layer(in_chs)
        self.act = act_layer(inplace=True)
        self._init_head(in_chs, num_classes, global_pool, drop_rate, logit_scale)
        _kaiming_convs(self)
        _finalize(self, flavour, in_chans, img_size, beta_init, gamma_init, device, dtype)

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv1(x)

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(x))

    def _prune_norm(self) -> None:
        self.bn, self.act = nn.Identity(), nn.Identity()


# --------------------------------------------------------------------------------------------
# Pretrained configurations
# --------------------------------------------------------------------------------------------
_PAPER = "Efficient Training of Low-Curvature Neural Networks"


def _cfg(variant: str, tag: Optional[str], *, num_classes: int, input_size: Tuple[int, int, int] = (3, 32, 32),
         pool_size: Tuple[int, int] = (4, 4), notes: str = "", **kwargs: Any) -> Dict[str, Any]:
    # A download location only where weights exist (shipped or published): list_pretrained lists what loads.
    where = weights_location(variant, tag, strict=False) if tag is not None else {}
    if tag is not None and not where:
        notes = notes or f"recipe only: train with {recipe_hint(variant, tag)}"
    return {
        **where,
        "num_classes": num_classes,
        "input_size": input_size,
        "fixed_input_size": True,
        "pool_size": pool_size,
        "crop_pct": 1.0,
        "interpolation": "bilinear",
        "mean": (0.0,) * input_size[0],
        "std": (1.0,) * input_size[0],
        "first_conv": "conv1",
        "classifier": "fc",
        "license": "apache-2.0",
        "paper_name": _PAPER,
        "paper_ids": "arXiv:2206.07144",
        "origin_url": "https://github.com/kylematoba/lcnn",
        "notes": notes,
        **kwargs,
    }


def _tags_for(variant: str, datasets: Dict[str, Dict[str, Any]], gradreg: bool) -> Dict[str, Dict[str, Any]]:
    """The variant's tags, those with weights first: timm's default tag (the first) then has weights
    wherever any tag does."""
    out = {}
    for ds, kw in datasets.items():
        out[f"{variant}.{ds}"] = _cfg(variant, ds, **kw)
        if gradreg:
            out[f"{variant}.{ds}_gradreg"] = _cfg(variant, f"{ds}_gradreg", **kw)
    for tag, kw in _EXTRA_TAGS.get(variant, {}).items():  # added by a bundle or upload (push --model <arch>.<new>)
        if f"{variant}.{tag}" not in out:
            pool = tuple(max(1, s // 4) for s in kw["input_size"][1:])
            out[f"{variant}.{tag}"] = _cfg(variant, tag, **kw, pool_size=pool)
    return dict(sorted(out.items(), key=lambda item: not _has_weights(item[1])))


def _has_weights(cfg: Dict[str, Any]) -> bool:
    return bool(cfg.get("file") or cfg.get("hf_hub_id"))


# The class names in label order, as timm's save_for_hf keeps them (``pretrained_cfg["label_names"]``):
# inference.py labels its predictions with them, and ``model.pretrained_cfg`` says what each output is.
# The datasets' own orders: torchvision's FashionMNIST.classes, CIFAR-10's batches.meta, CIFAR-100's
# fine labels (alphabetical).
_FMNIST_LABELS = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                  "Ankle boot")
_CIFAR10_LABELS = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
_CIFAR100_LABELS = tuple("""
    apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly camel can
    castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup dinosaur dolphin
    elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion lizard lobster
    man maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree pear pickup_truck
    pine_tree plain plate poppy porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk
    skyscraper snail snake spider squirrel streetcar sunflower sweet_pepper table tank telephone television tiger
    tractor train trout tulip turtle wardrobe whale willow_tree wolf woman worm""".split())
_CIFAR = {"cifar10": dict(num_classes=10, label_names=_CIFAR10_LABELS),
          "cifar100": dict(num_classes=100, label_names=_CIFAR100_LABELS)}
_EXTRA_TAGS = extra_tags()


def _family(name: str, datasets: Dict[str, Dict[str, Any]]) -> Dict[str, Dict[str, Any]]:
    cfgs = {}
    cfgs.update(_tags_for(f"lcnn_{name}", datasets, gradreg=True))
    cfgs.update(_tags_for(f"lcnn_{name}_softplus", datasets, gradreg=True))
    cfgs.update(_tags_for(f"lcnn_{name}_relu", datasets, gradreg=False))
    return cfgs


# A variant's default tag is one with weights where any has (lcnn_resnet20 → .fmnist, 1×28×28), else CIFAR-10's.
_RESNET20_DATA = {**{k: dict(v, pool_size=(8, 8)) for k, v in _CIFAR.items()},
                  "fmnist": dict(num_classes=10, input_size=(1, 28, 28), pool_size=(7, 7),
                                label_names=_FMNIST_LABELS)}
_WRN_DATA = {k: dict(v, pool_size=(8, 8)) for k, v in _CIFAR.items()}
_IN1K: Dict[str, Any] = dict(num_classes=1000, input_size=(3, 224, 224), pool_size=(7, 7), crop_pct=0.875,
                             notes="architecture only: no weights and no recipe")

default_cfgs = generate_default_cfgs({
    **_family("resnet18", _CIFAR),
    **_family("resnet34", _CIFAR),
    **_family("resnet20", _RESNET20_DATA),
    **_family("resnet56", _RESNET20_DATA),
    **_family("wide_resnet16_8", _WRN_DATA),
    **_family("wide_resnet28_10", _WRN_DATA),
    "lcnn_resnet50": _cfg("lcnn_resnet50", None, **_IN1K),
    "lcnn_wide_resnet50_2": _cfg("lcnn_wide_resnet50_2", None, **_IN1K),
})


def _create(model_cls: Type[nn.Module], variant: str, pretrained: bool, model_args: Dict[str, Any],
            **kwargs: Any) -> nn.Module:
    penalty = kwargs.pop("lcnn_penalty", None)  # λ (or True): the LCNN penalty at every optimizer step
    if penalty is not None and not isinstance(penalty, (bool, int, float)):
        raise ValueError(f"lcnn_penalty must be a number (λβ = λγ) or True, got {type(penalty).__name__}")
    # folded=True: the deployable form (lcnn_zoo.fold), as timm's exportable=True builds it. A folded
    # model saved with timm's save_for_hf records folded=True in its model_args (fold sets it), so its
    # config.json rebuilds the folded architecture, and its weights (folded: they no longer fit the
    # LCNN's layers) are loaded after folding.
    _check_img_size(kwargs.get("img_size"))
    folded = bool(kwargs.pop("folded", False)) or is_exportable()
    weights_folded = pretrained and bool((kwargs.get("pretrained_model_args") or {}).get("folded"))
    if weights_folded and not folded:
        raise PretrainedLoadError(f"these {variant} weights are folded (saved from lcnn_zoo.fold): build the "
                                  f"folded architecture (folded=True) to load them")
    # With pretrained weights the checkpoint brings converged singular vectors: converging the
    # random initial weights' norms first would be thrown away.
    with deferred_convergence() if pretrained and not weights_folded else nullcontext():
        model = safe_build(build_model_with_cfg, model_cls, variant, pretrained, **dict(model_args, **kwargs),
                           before_loading=_fold_now if weights_folded else None)
    if penalty is not None and penalty is not False:
        attach_penalty(model, LCNNPenalty() if penalty is True else LCNNPenalty(float(penalty), float(penalty)))
    _cfg_for_built_channels(model)
    if folded and not weights_folded and getattr(model, "lcnn_report", None) is not None:
        # timm's create_model(..., exportable=True), which its onnx_export.py passes: the deployable form,
        # the same eval-mode function in plain layers (an unfolded LCNN refuses export, pointing to fold)
        model = _fold_now(model)
    return model


def _check_img_size(img_size: Any) -> None:
    """timm's ``img_size``: an int (square) or a pair of ints (H, W), all > 0; None leaves the default.
    (A string reached timm's own check as "'<=' not supported between 'str' and 'int'".)"""
    if img_size is None:
        return
    sizes = list(img_size) if isinstance(img_size, (tuple, list)) else [img_size]
    if (isinstance(img_size, (tuple, list)) and len(sizes) != 2) or not all(
            isinstance(s, int) and not isinstance(s, bool) for s in sizes):
        raise TypeError(f"img_size must be an int or a pair of ints (H, W), got {shown(img_size)}")
    if any(s <= 0 for s in sizes):
        raise ValueError(f"img_size must be positive, got {shown(img_size)}")


def _fold_now(model: nn.Module) -> nn.Module:
    converge_spectral_norms(model, tol=CONVERGENCE_TOL)  # what the first eval forward would do
    return fold(model, inplace=True)


def _cfg_for_built_channels(model: nn.Module) -> None:
    """A model built with another ``in_chans`` than its tag's (timm adapts the stem of pretrained
    weights) says so in its pretrained_cfg: the input size and per-channel mean/std timm's data config
    resolves (validate.py, inference.py, onnx_export.py) are those of the channels it takes."""
    cfg = getattr(model, "pretrained_cfg", None)
    conv = getattr(model, "conv1", None)
    if not isinstance(cfg, dict) or not cfg.get("input_size") or not isinstance(conv, nn.Conv2d):
        return
    c = conv.in_channels
    if cfg["input_size"][0] == c:
        return
    fix = {"input_size": (c, *cfg["input_size"][1:])}
    for key in ("mean", "std"):
        values = tuple(cfg.get(key) or ())
        if values and len(set(values)) == 1:  # the zoo's are (0, …) and (1, …): one value per channel
            fix[key] = values[:1] * c
    # (timm's pretrained_cfg is a dict attribute; nn.Module's stubs type attributes as Tensor | Module)
    model.pretrained_cfg = {**cfg, **fix}  # type: ignore[assignment]
    if hasattr(model, "default_cfg"):
        model.default_cfg = model.pretrained_cfg  # timm's alias


def _resnet(variant: str, pretrained: bool, block, layers, flavour: str, cifar_stem: bool = True,
            **kwargs: Any) -> nn.Module:
    args = dict(block=block, layers=layers, flavour=flavour, cifar_stem=cifar_stem)
    return _create(LcnnResNet, variant, pretrained, args, **kwargs)


_STAGE_FEATURES = dict(feature_cfg=dict(out_indices=(0, 1, 2, 3), flatten_sequential=True))


def _cifar_resnet(variant: str, pretrained: bool, n: int, flavour: str, **kwargs: Any) -> nn.Module:
    return _create(CifarResNet, variant, pretrained, dict(layers=(n, n, n), flavour=flavour, **_STAGE_FEATURES), **kwargs)


def _wrn(variant: str, pretrained: bool, depth: int, k: int, flavour: str, **kwargs: Any) -> nn.Module:
    args = dict(depth=depth, widen_factor=k, flavour=flavour, **_STAGE_FEATURES)
    return _create(WideResNet, variant, pretrained, args, **kwargs)


# ---- CIFAR ResNet-18/34 (the paper's) ----
@register_model
def lcnn_resnet18(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """LCNN ResNet-18, CIFAR stem (the paper's main model)."""
    return _resnet("lcnn_resnet18", pretrained, BasicBlock, (2, 2, 2, 2), "lcnn", **kwargs)


@register_model
def lcnn_resnet18_softplus(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """The paper's "standard" ResNet-18: softplus β=1e3, CIFAR stem."""
    return _resnet("lcnn_resnet18_softplus", pretrained, BasicBlock, (2, 2, 2, 2), "softplus", **kwargs)


@register_model
def lcnn_resnet18_relu(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """Plain ReLU ResNet-18, CIFAR stem."""
    return _resnet("lcnn_resnet18_relu", pretrained, BasicBlock, (2, 2, 2, 2), "relu", **kwargs)


@register_model
def lcnn_resnet34(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """LCNN ResNet-34, CIFAR stem."""
    return _resnet("lcnn_resnet34", pretrained, BasicBlock, (3, 4, 6, 3), "lcnn", **kwargs)


@register_model
def lcnn_resnet34_softplus(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """Softplus-β=1e3 ResNet-34, CIFAR stem."""
    return _resnet("lcnn_resnet34_softplus", pretrained, BasicBlock, (3, 4, 6, 3), "softplus", **kwargs)


@register_model
def lcnn_resnet34_relu(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """Plain ReLU ResNet-34, CIFAR stem."""
    return _resnet("lcnn_resnet34_relu", pretrained, BasicBlock, (3, 4, 6, 3), "relu", **kwargs)


# ---- He et al. CIFAR ResNet-20/56 (compact) ----
@register_model
def lcnn_resnet20(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """LCNN ResNet-20 (He et al. CIFAR ResNet, 0.27 M parameters)."""
    return _cifar_resnet("lcnn_resnet20", pretrained, 3, "lcnn", **kwargs)


@register_model
def lcnn_resnet20_softplus(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """Softplus-β=1e3 ResNet-20."""
    return _cifar_resnet("lcnn_resnet20_softplus", pretrained, 3, "softplus", **kwargs)


@register_model
def lcnn_resnet20_relu(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """Plain ReLU ResNet-20."""
    return _cifar_resnet("lcnn_resnet20_relu", pretrained, 3, "relu", **kwargs)


@register_model
def lcnn_resnet56(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """LCNN ResNet-56 (He et al. CIFAR ResNet)."""
    return _cifar_resnet("lcnn_resnet56", pretrained, 9, "lcnn", **kwargs)


@register_model
def lcnn_resnet56_softplus(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """Softplus-β=1e3 ResNet-56."""
    return _cifar_resnet("lcnn_resnet56_softplus", pretrained, 9, "softplus", **kwargs)


@register_model
def lcnn_resnet56_relu(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """Plain ReLU ResNet-56."""
    return _cifar_resnet("lcnn_resnet56_relu", pretrained, 9, "relu", **kwargs)


# ---- Wide ResNets (RobustBench's usual backbones) ----
@register_model
def lcnn_wide_resnet16_8(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """LCNN WRN-16-8."""
    return _wrn("lcnn_wide_resnet16_8", pretrained, 16, 8, "lcnn", **kwargs)


@register_model
def lcnn_wide_resnet16_8_softplus(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """Softplus-β=1e3 WRN-16-8."""
    return _wrn("lcnn_wide_resnet16_8_softplus", pretrained, 16, 8, "softplus", **kwargs)


@register_model
def lcnn_wide_resnet16_8_relu(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """Plain ReLU WRN-16-8."""
    return _wrn("lcnn_wide_resnet16_8_relu", pretrained, 16, 8, "relu", **kwargs)


@register_model
def lcnn_wide_resnet28_10(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """LCNN WRN-28-10."""
    return _wrn("lcnn_wide_resnet28_10", pretrained, 28, 10, "lcnn", **kwargs)


@register_model
def lcnn_wide_resnet28_10_softplus(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """Softplus-β=1e3 WRN-28-10."""
    return _wrn("lcnn_wide_resnet28_10_softplus", pretrained, 28, 10, "softplus", **kwargs)


@register_model
def lcnn_wide_resnet28_10_relu(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """Plain ReLU WRN-28-10."""
    return _wrn("lcnn_wide_resnet28_10_relu", pretrained, 28, 10, "relu", **kwargs)


# ---- ImageNet architectures via lcnnify ----
@register_model
def lcnn_resnet50(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """LCNN of timm's ResNet-50 (ImageNet stem, 224×224). No weights published."""
    return _resnet("lcnn_resnet50", pretrained, Bottleneck, (3, 4, 6, 3), "lcnn", cifar_stem=False, **kwargs)


@register_model
def lcnn_wide_resnet50_2(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """LCNN of timm's Wide-ResNet-50-2 (ImageNet stem, 224×224). No weights published."""
    return _resnet("lcnn_wide_resnet50_2", pretrained, Bottleneck, (3, 4, 6, 3), "lcnn", cifar_stem=False,
                   base_width=128, **kwargs)
