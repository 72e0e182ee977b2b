"""The pre-activation wide ResNets WRN-16-8 / WRN-28-10 in the zoo (Zagoruyko & Komodakis 2016; the
robustness literature's usual backbones).

Its three variants (``lcnn_<arch>``, ``_softplus``, ``_relu``) and the input convention: :mod:`lcnn_zoo.models`.
"""
# No `from __future__ import annotations` here: torch.fx copies forward()'s annotations into the code
# it generates, and TorchScript (timm's fx + torchscript test) cannot read them as strings.
from typing import Any, Dict, List, Sequence, Type

import torch
from timm.layers import DropPath
from timm.models import generate_default_cfgs, register_model
from torch import nn

from ._base import StagedNet, drop_path_rates, kaiming_convs
from ._builder import CIFAR_DATA, STAGE_FEATURES, act_layer_for, create, family_cfgs, finalize

__all__ = ["PreActBlock", "WideResNet"]

_DATA = {k: dict(v, pool_size=(8, 8)) for k, v in CIFAR_DATA.items()}

default_cfgs = generate_default_cfgs({
    **family_cfgs("wide_resnet16_8", _DATA),
    **family_cfgs("wide_resnet28_10", _DATA),
})


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
        """(N, in_chs, H, W) → (N, out_chs, H / stride, W / stride)."""
        o = self.act1(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(o)
        out = self.drop_path(self.conv2(self.drop(self.act2(self.bn2(self.conv1(o))))))
        if self.residual_scale != 1.0:  # ×0.5 is exact in floating point: the same sum, bit for bit
            return out * self.residual_scale + shortcut * self.residual_scale
        return out + shortcut


class WideResNet(StagedNet):
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
        act_layer = act_layer_for(flavour)
        widths = (16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        self.flavour = flavour
        self.in_chans = in_chans
        self.conv1 = nn.Conv2d(in_chans, 16, 3, padding=1, bias=False)
        self.feature_info: List[Dict[str, Any]] = [dict(num_chs=16, reduction=1, module="conv1")]
        self.stages = nn.Sequential()
        in_chs, reduction = 16, 1
        dpr = iter(drop_path_rates(drop_path_rate, 3 * n))
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
        kaiming_convs(self)
        finalize(self, flavour, in_chans, img_size, beta_init, gamma_init, device, dtype)

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        """conv1 (the blocks pre-activate)."""
        return self.conv1(x)

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        """The last BN and activation (pre-activation blocks end un-normalised)."""
        return self.act(self.bn(x))

    def _prune_norm(self) -> None:
        self.bn, self.act = nn.Identity(), nn.Identity()



def _wrn(variant: str, pretrained: bool, depth: int, k: int, flavour: str, **kwargs: Any) -> nn.Module:
    args = dict(depth=depth, widen_factor=k, flavour=flavour, **STAGE_FEATURES)
    return create(WideResNet, variant, pretrained, args, **kwargs)



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

