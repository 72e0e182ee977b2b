"""The zoo's model builder: every ``lcnn_*`` entry point builds through :func:`create`, and every
family's ``default_cfgs`` through :func:`family_cfgs` (timm's ``_builder.py`` + one file per family).

* A zoo model is built as the plain net, then, for the LCNN flavour, converted by
  :func:`lcnn_zoo.lcnnify` — the same path as a user's model (:func:`finalize`).
* The pretrained cfgs are static data: they come from the package's own manifests, read once at
  import (:func:`lcnn_zoo.hub.package_tags`, :func:`lcnn_zoo.hub.weights_location` with
  ``user=False``). A tag the user uploaded is resolved when it is built (:func:`create`).
"""
from contextlib import nullcontext
from functools import partial
from typing import Any, Dict, Optional, Sequence, Tuple, Type, Union

import timm
from timm.layers import is_exportable
from timm.models import build_model_with_cfg
from torch import nn

from ..conversion import lcnnify
from ..errors import shown
from ..folding import fold
from ..hub import PretrainedLoadError, package_tags, recipe_hint, safe_build, user_upload, weights_location
from ..layers import CONVERGENCE_TOL, CenteredSoftplus, converge_spectral_norms
from ..layers.spectral_norm import deferred_convergence
from ..penalty import LCNNPenalty, attach_penalty

__all__ = ["FLAVOURS", "act_layer_for", "finalize", "zoo_cfg", "new_tag_cfg", "family_cfgs", "create",
           "STAGE_FEATURES", "CIFAR_DATA", "FMNIST_DATA"]

FLAVOURS = ("lcnn", "softplus", "relu")
# timm's feature extraction of the zoo's staged nets: the stem and each stage (flattened Sequentials).
STAGE_FEATURES = dict(feature_cfg=dict(out_indices=(0, 1, 2, 3), flatten_sequential=True))


FLAVOURS = ("lcnn", "softplus", "relu")


def act_layer_for(flavour: str):
    """The activation factory of a flavour: the LCNN's ReLUs are converted by lcnnify; softplus is β=1e3, fixed."""
    if flavour not in FLAVOURS:
        raise ValueError(f"flavour must be one of {FLAVOURS}, got {flavour!r}")
    if flavour == "softplus":
        return partial(CenteredSoftplus, beta_init=1e3, learnable=False)
    return nn.ReLU  # the LCNN's ReLUs are converted by lcnnify


def finalize(model: nn.Module, flavour: str, in_chans: int, img_size: Union[int, Sequence[int]], beta_init: float,
             gamma_init: float, device=None, dtype=None) -> None:
    """Move a freshly built plain net, and make the ``lcnn`` flavour an LCNN with :func:`lcnnify`
    (strict: every operation covered) for inputs of ``in_chans`` × ``img_size``."""
    if device is not None or dtype is not None:
        model.to(device=device, dtype=dtype)
    if flavour == "lcnn":
        # timm's convention: img_size=64 means 64 x 64 (create_model(..., img_size=64))
        size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        lcnnify(model, input_size=(in_chans, *size), bn_affine=False, beta_init=beta_init,
                gamma_init=gamma_init, strict=True)



_PAPER = "Efficient Training of Low-Curvature Neural Networks"


def zoo_cfg(variant: str, tag: Optional[str], *, num_classes: int, input_size: Tuple[int, int, int] = (3, 32, 32),
            pool_size: Tuple[int, int] = (4, 4), notes: str = "", user: bool = False, **kwargs: Any) -> Dict[str, Any]:
    """The timm pretrained cfg of ``variant.tag`` (``tag=None``: the architecture alone).

    Args:
        variant: the architecture, e.g. ``lcnn_resnet20``.
        tag: the dataset tag, e.g. ``fmnist_gradreg``, or None.
        num_classes: the classifier's outputs.
        input_size: (C, H, W) the convolutions' operator norms are computed for.
        pool_size: the final feature map's (H, W).
        notes: timm's ``notes``; by default what trains a tag that has no weights.
        user: whether the user's uploads may say where the weights are (at build time; the registry
            built at import is made of the package's files only).
        **kwargs: further cfg fields (``label_names``, ``crop_pct``, …).

    Returns:
        the cfg as a dict, with a download location (``file`` or ``hf_hub_id``) only where weights
        exist, so that ``timm.list_pretrained`` lists what loads.
    """
    where = weights_location(variant, tag, strict=False, user=user) if tag is not None else {}
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
        out[f"{variant}.{ds}"] = zoo_cfg(variant, ds, **kw)
        if gradreg:
            out[f"{variant}.{ds}_gradreg"] = zoo_cfg(variant, f"{ds}_gradreg", **kw)
    for tag, kw in _PACKAGE_TAGS.get(variant, {}).items():  # added by a bundle (push --model <arch>.<new> --bundle)
        if f"{variant}.{tag}" not in out:
            out[f"{variant}.{tag}"] = new_tag_cfg(variant, tag, kw)
    return dict(sorted(out.items(), key=lambda item: not _has_weights(item[1])))


def _has_weights(cfg: Dict[str, Any]) -> bool:
    return bool(cfg.get("file") or cfg.get("hf_hub_id"))


def new_tag_cfg(variant: str, tag: str, shapes: Dict[str, Any], user: bool = False) -> Dict[str, Any]:
    """The cfg of a tag the zoo does not define (a bundle's or an upload's): the classes and input
    size its manifest entry records, a pool of a quarter of the input (the zoo's nets downsample by 4)."""
    pool = tuple(max(1, side // 4) for side in shapes["input_size"][1:])
    return zoo_cfg(variant, tag, num_classes=shapes["num_classes"], input_size=tuple(shapes["input_size"]),
                   pool_size=pool, user=user)


# The class names in label order, as timm's save_for_hf keeps them (``pretrained_cfg["label_names"]``):
# inference.py labels its predictions with them, and ``model.pretrained_cfg`` says what each output is.
# The datasets' own orders: torchvision's FashionMNIST.classes, CIFAR-10's batches.meta, CIFAR-100's
# fine labels (alphabetical).
FMNIST_LABELS = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                 "Ankle boot")
CIFAR10_LABELS = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR100_LABELS = tuple("""
    apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly camel can
    castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup dinosaur dolphin
    elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion lizard lobster
    man maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree pear pickup_truck
    pine_tree plain plate poppy porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk
    skyscraper snail snake spider squirrel streetcar sunflower sweet_pepper table tank telephone television tiger
    tractor train trout tulip turtle wardrobe whale willow_tree wolf woman worm""".split())
CIFAR_DATA = {"cifar10": dict(num_classes=10, label_names=CIFAR10_LABELS),
              "cifar100": dict(num_classes=100, label_names=CIFAR100_LABELS)}
FMNIST_DATA = {"fmnist": dict(num_classes=10, input_size=(1, 28, 28), pool_size=(7, 7), label_names=FMNIST_LABELS)}
# Read once, at import, from the package's own manifests (the registry is static data).
_PACKAGE_TAGS = package_tags()


def family_cfgs(name: str, datasets: Dict[str, Dict[str, Any]]) -> Dict[str, Dict[str, Any]]:
    """The cfgs of an architecture's three variants (``lcnn_<name>``, ``_softplus``, ``_relu``) on
    ``datasets`` (tag → cfg fields), with the GradReg tags of the first two."""
    cfgs = {}
    cfgs.update(_tags_for(f"lcnn_{name}", datasets, gradreg=True))
    cfgs.update(_tags_for(f"lcnn_{name}_softplus", datasets, gradreg=True))
    cfgs.update(_tags_for(f"lcnn_{name}_relu", datasets, gradreg=False))
    return cfgs


def create(model_cls: Type[nn.Module], variant: str, pretrained: bool, model_args: Dict[str, Any],
           **kwargs: Any) -> nn.Module:
    """Build a zoo model the way every entry point does: timm's ``build_model_with_cfg`` through
    :func:`lcnn_zoo.hub.safe_build` (checked weights, one-sentence errors), then the penalty and the
    folding asked for.

    Args:
        model_cls: the family's class (``CifarResNet``, ``LcnnResNet``, ``WideResNet``).
        variant: the registered name, e.g. ``lcnn_resnet20``.
        pretrained: load the tag's weights.
        model_args: the variant's own constructor arguments (depth, flavour, …).
        **kwargs: ``timm.create_model``'s (``pretrained_cfg``, ``num_classes``, ``img_size``, …) and
            the zoo's ``lcnn_penalty`` (λ, or True for the paper's) and ``folded``.

    Returns:
        the model (folded with ``folded=True`` or timm's ``exportable=True``).
    """
    _resolve_upload(variant, kwargs)
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


def _resolve_upload(variant: str, kwargs: Dict[str, Any]) -> None:
    """A tag the static registry does not know, that the user uploaded (``lcnn-zoo push --upload``
    records it in ``$LCNN_ZOO_PUBLISHED``): its cfg is built now, from that entry, and passed to timm
    as a dict. Any other unknown tag is left for timm to refuse ("Invalid pretrained tag")."""
    tag = kwargs.get("pretrained_cfg")
    if not isinstance(tag, str) or not tag:
        return
    try:
        timm.models.get_pretrained_cfg(f"{variant}.{tag}")
        return  # the registry's own
    except RuntimeError:
        pass
    shapes = user_upload(variant, tag)
    if shapes is not None:
        kwargs["pretrained_cfg"] = {**new_tag_cfg(variant, tag, shapes, user=True), "architecture": variant, "tag": tag}


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

