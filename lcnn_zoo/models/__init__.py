"""The zoo's models, registered in timm by ``import lcnn_zoo``: one file per family (timm's layout), built
through :mod:`lcnn_zoo.models._builder`.

* :mod:`~lcnn_zoo.models.resnet` — timm's ResNet: the paper's CIFAR ResNet-18/34, ImageNet ResNet-50
  and Wide-ResNet-50-2;
* :mod:`~lcnn_zoo.models.cifar_resnet` — He et al.'s CIFAR ResNet-20/56;
* :mod:`~lcnn_zoo.models.wide_resnet` — the pre-activation wide ResNets WRN-16-8 / WRN-28-10.
"""
from .cifar_resnet import CifarResNet
from .resnet import LcnnResNet
from .wide_resnet import PreActBlock, WideResNet

__all__ = ["CifarResNet", "LcnnResNet", "PreActBlock", "WideResNet"]
