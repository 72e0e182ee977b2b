"""timm's ResNet in the zoo: the paper's CIFAR ResNet-18/34 (a 3×3 stride-1 stem, no max-pool) and
timm's ImageNet ResNet-50 / Wide-ResNet-50-2 (architectures only).

Its three variants (``lcnn_<arch>``, ``_softplus``, ``_relu``) and the input convention: :mod:`lcnn_zoo.models`.
"""
# No `from __future__ import annotations` here: torch.fx copies forward()'s annotations into the code
# it generates, and TorchScript (timm's fx + torchscript test) cannot read them as strings.
from typing import TYPE_CHECKING, Any, Dict, Sequence, Type, cast

import torch
from timm.models import generate_default_cfgs, register_model
from timm.models.resnet import BasicBlock, Bottleneck, ResNet
from torch import nn

from ._base import ScaledHead, add_logit_scale, checkpointed
from ._builder import CIFAR_DATA, act_layer_for, create, family_cfgs, finalize, zoo_cfg

__all__ = ["LcnnResNet"]

_IN1K: Dict[str, Any] = dict(num_classes=1000, input_size=(3, 224, 224), pool_size=(7, 7), crop_pct=0.875,
                             notes="architecture only: no weights and no recipe")

default_cfgs = generate_default_cfgs({
    **family_cfgs("resnet18", CIFAR_DATA),
    **family_cfgs("resnet34", CIFAR_DATA),
    "lcnn_resnet50": zoo_cfg("lcnn_resnet50", None, **_IN1K),
    "lcnn_wide_resnet50_2": zoo_cfg("lcnn_wide_resnet50_2", None, **_IN1K),
})


class LcnnResNet(ScaledHead, ResNet):
    """timm's :class:`~timm.models.resnet.ResNet` (any block/depth), optionally with the CIFAR stem
    (3×3 stride-1 conv, no max-pool); ``flavour`` is "lcnn", "softplus" (β=1e3) or "relu"."""

    def __init__(self, block: Type[nn.Module], layers: Sequence[int], *, flavour: str = "lcnn",
                 cifar_stem: bool = True, img_size: Sequence[int] = (32, 32), in_chans: int = 3,
                 beta_init: float = 5.0, gamma_init: float = 10.0, logit_scale: float = 1.0,
                 device=None, dtype=None, **kwargs: Any) -> None:
        # (timm annotates `block` as an instance of BasicBlock | Bottleneck, and `layers` as a tuple)
        super().__init__(block, layers, in_chans=in_chans, act_layer=act_layer_for(flavour),  # type: ignore[arg-type]
                         **kwargs)
        self.flavour = flavour
        add_logit_scale(self, logit_scale)
        if cifar_stem:
            # (timm's ResNet types conv1 and maxpool as nn.Sequential, their deep-stem / anti-aliased form)
            self.conv1 = nn.Conv2d(in_chans, cast(nn.Conv2d, self.conv1).out_channels, 3,  # type: ignore[assignment]
                                   stride=1, padding=1, bias=False)
            self.maxpool = nn.Identity()  # type: ignore[assignment]
            for info in self.feature_info:  # the stem no longer downsamples by 4
                info["reduction"] = max(1, cast(int, info["reduction"]) // (4 if info["module"] != "act1" else 2))
        finalize(self, flavour, in_chans, img_size, beta_init, gamma_init, device, dtype)

    if TYPE_CHECKING:  # added by timm's ResNet with add_module (declared for type checkers only)
        layer1: nn.Sequential
        layer2: nn.Sequential
        layer3: nn.Sequential
        layer4: nn.Sequential

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The stem and the four stages: (N, C, H, W) → (N, num_features, H', W')."""
        # timm's ResNet.forward_features, with the zoo's checkpointing (timm's checkpoint_seq recomputes
        # in training mode: BatchNorm statistics and power iterations would advance twice per step)
        x = self.maxpool(self.act1(self.bn1(self.conv1(x))))
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return self._checkpointed_layers(x)
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    @torch.jit.ignore
    def _checkpointed_layers(self, x: torch.Tensor) -> torch.Tensor:
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = checkpointed(layer, x)
        return x



def _resnet(variant: str, pretrained: bool, block, layers, flavour: str, cifar_stem: bool = True,
            **kwargs: Any) -> nn.Module:
    args = dict(block=block, layers=layers, flavour=flavour, cifar_stem=cifar_stem)
    return create(LcnnResNet, variant, pretrained, args, **kwargs)



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
