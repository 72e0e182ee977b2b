"""He et al.'s CIFAR ResNet-20/56 in the zoo (3 stages of 16/32/64 channels, 1×1-conv projection
shortcuts): the compact nets the shipped Fashion-MNIST weights are for.

Its three variants (``lcnn_<arch>``, ``_softplus``, ``_relu``) and the input convention: :mod:`lcnn_zoo.models`.
"""
# No `from __future__ import annotations` here: torch.fx copies forward()'s annotations into the code
# it generates, and TorchScript (timm's fx + torchscript test) cannot read them as strings.
from typing import Any, Dict, List, Sequence, Type

import torch
from timm.layers import DropPath
from timm.models import generate_default_cfgs, register_model
from timm.models.resnet import BasicBlock
from torch import nn

from ._base import StagedNet, drop_path_rates, kaiming_convs
from ._builder import CIFAR_DATA, FMNIST_DATA, STAGE_FEATURES, act_layer_for, create, family_cfgs, finalize

__all__ = ["CifarResNet"]

# A variant's default tag is one with weights where any has (lcnn_resnet20 → .fmnist, 1×28×28), else CIFAR-10's.
_DATA = {**{k: dict(v, pool_size=(8, 8)) for k, v in CIFAR_DATA.items()}, **FMNIST_DATA}

default_cfgs = generate_default_cfgs({
    **family_cfgs("resnet20", _DATA),
    **family_cfgs("resnet56", _DATA),
})


class CifarResNet(StagedNet):
    """He et al. (2016) CIFAR ResNet with 6n+2 layers: 3×3 conv stem, stages of n timm
    ``BasicBlock``s with ``channels`` widths (stride 2 between stages, 1×1-conv projection
    shortcuts), global average pooling and a linear classifier. Timm model API."""

    def __init__(self, layers: Sequence[int] = (3, 3, 3), channels: Sequence[int] = (16, 32, 64), *,
                 num_classes: int = 10, in_chans: int = 3, flavour: str = "lcnn", img_size: Sequence[int] = (32, 32),
                 global_pool: str = "avg", drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 beta_init: float = 5.0, gamma_init: float = 10.0, logit_scale: float = 1.0,
                 norm_layer: Type[nn.Module] = nn.BatchNorm2d, device=None, dtype=None) -> None:
        super().__init__()
        act_layer = act_layer_for(flavour)
        self.flavour = flavour
        self.in_chans = in_chans
        self.conv1 = nn.Conv2d(in_chans, channels[0], 3, padding=1, bias=False)
        self.bn1 = norm_layer(channels[0])
        self.act1 = act_layer(inplace=True)
        self.feature_info: List[Dict[str, Any]] = [dict(num_chs=channels[0], reduction=1, module="act1")]
        in_chs, reduction = channels[0], 1
        dpr = iter(drop_path_rates(drop_path_rate, sum(layers)))
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
        kaiming_convs(self)
        finalize(self, flavour, in_chans, img_size, beta_init, gamma_init, device, dtype)

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        """conv1 → bn1 → act1."""
        return self.act1(self.bn1(self.conv1(x)))



def _cifar_resnet(variant: str, pretrained: bool, n: int, flavour: str, **kwargs: Any) -> nn.Module:
    return create(CifarResNet, variant, pretrained, dict(layers=(n, n, n), flavour=flavour, **STAGE_FEATURES), **kwargs)



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

