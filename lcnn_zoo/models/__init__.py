"""timm registrations of the zoo's models (imported by ``import lcnn_zoo``)."""
from .lcnn_resnet import CifarResNet, LcnnResNet, PreActBlock, WideResNet

__all__ = ["CifarResNet", "LcnnResNet", "PreActBlock", "WideResNet"]
