"""The zoo's models, registered in timm by ``import lcnn_zoo``: one file per family (timm's layout), built
through :mod:`lcnn_zoo.models._builder`.

* :mod:`~lcnn_zoo.models.resnet` — timm's ResNet: the paper's CIFAR ResNet-18/34, ImageNet ResNet-50
  and Wide-ResNet-50-2;
* :mod:`~lcnn_zoo.models.cifar_resnet` — He et al.'s CIFAR ResNet-20/56;
* :mod:`~lcnn_zoo.models.wide_resnet` — the pre-activation wide ResNets WRN-16-8 / WRN-28-10.

Each architecture comes in three variants, side by side in the registry: ``lcnn_<arch>`` (the LCNN,
paper §3: built plain, then :func:`lcnn_zoo.lcnnify`), ``lcnn_<arch>_softplus`` (the paper's
"standard" baseline: softplus β=1e3) and ``lcnn_<arch>_relu`` (the plain ReLU net).

Input convention (every family): images in [0, 1], **no normalisation** (``mean=(0,0,0)``,
``std=(1,1,1)`` in every ``pretrained_cfg``), as in the reference code, so ℓ2 radii ε mean the same as
in the paper. The convolution operator norms are computed for the cfg's ``input_size``
(``fixed_input_size=True``: timm passes ``img_size``). Every model takes ``logit_scale`` (default 1) —
see :func:`lcnn_zoo.models._base.add_logit_scale` — and ``lcnn_penalty`` / ``folded`` (see
:func:`lcnn_zoo.models._builder.create`).
"""
from .cifar_resnet import CifarResNet
from .resnet import LcnnResNet
from .wide_resnet import PreActBlock, WideResNet

__all__ = ["CifarResNet", "LcnnResNet", "PreActBlock", "WideResNet"]
