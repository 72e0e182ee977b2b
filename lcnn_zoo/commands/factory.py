"""The one way the package builds a model from a name: :func:`create_model`.

Training, evaluation, publishing and bundling all call it, so a model tag is parsed, an input size
is applied and LCNN-ness is decided in one place. ``input_size`` = (C, H, W) is the single name for
the size a model is built for: the zoo's architectures take it as their ``in_chans``/``img_size``
(their spectral norms are computed for it), any other LCNN gets its norms recomputed for it
(:func:`lcnn_zoo.set_input_size`), and ``model.pretrained_cfg["input_size"]`` says it afterwards.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

import timm
import torch
from timm.models import parse_model_name, split_model_name_tag
from torch import nn

from ..conversion import lcnnify, set_input_size
from ..errors import UserError, shown
from ..hub import HUB_FILENAME, check_hub_spec
from ..weight_checks import check_weights
from .checkpoint import RunFolder, load_state_dict, read_json

__all__ = ["create_model", "is_lcnn", "is_zoo_architecture", "input_size_of", "split_spec", "load_initial",
           "state_dict_shapes"]


def split_spec(spec: str) -> Tuple[str, str]:
    """(architecture, tag) of a registry name (``lcnn_resnet20.fmnist`` → ``lcnn_resnet20``, ``fmnist``);
    ``hf-hub:``/``local-dir:`` names have no tag."""
    try:
        source = parse_model_name(spec)[0]
    except ValueError as e:  # timm: a name that looks like a path or a Hub id
        raise UserError(f"{shown(spec)} is neither a model name nor a checkpoint: use local-dir:<folder> or "
                        f"hf-hub:<repo> for a Hub repo, or a .pth / .safetensors file") from e
    if source in ("hf-hub", "local-dir"):
        return spec, ""
    return split_model_name_tag(spec)


def is_zoo_architecture(spec: str) -> bool:
    """Whether ``spec`` names one of the zoo's registered architectures (``lcnn_*``)."""
    arch, _ = split_spec(spec)
    return arch.startswith("lcnn_") and arch in timm.list_models("lcnn_*")


def is_lcnn(model: nn.Module) -> bool:
    """Whether ``model`` was converted by lcnnify (the zoo's ``lcnn_*`` models are)."""
    return getattr(model, "lcnn_report", None) is not None


def input_size_of(model: nn.Module) -> Optional[Tuple[int, int, int]]:
    """(C, H, W) the model was built for: its LCNN norms' size, else its pretrained_cfg's."""
    report = getattr(model, "lcnn_report", None)
    if report is not None and report.input_size is not None:
        return tuple(report.input_size)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    size = cfg.get("input_size") if isinstance(cfg, dict) else None
    return tuple(size) if size else None


def create_model(spec: str, *, input_size: Optional[Sequence[int]] = None, num_classes: Optional[int] = None,
                 model_kwargs: Optional[Dict[str, Any]] = None, pretrained: bool = False,
                 drop_rate: Optional[float] = None, convert: bool = False) -> nn.Module:
    """Build ``spec`` (a registry name[.tag], ``hf-hub:``/``local-dir:`` name) with timm.

    Args:
        input_size: (C, H, W) to build for (default: the tag's / architecture's). With pretrained
            weights of another channel count or size, timm adapts the stem and the spectral norms
            are recomputed from the loaded weights.
        num_classes: a new head (timm re-initialises the classifier when the weights have another).
        model_kwargs: further ``timm.create_model`` keyword arguments (e.g. ``logit_scale``).
        convert: ``lcnnify`` a model that is not an LCNN yet.
    """
    kwargs: Dict[str, Any] = dict(model_kwargs or {})
    if num_classes is not None:
        kwargs["num_classes"] = int(num_classes)
    if drop_rate is not None:
        kwargs["drop_rate"] = float(drop_rate)
    size = tuple(int(s) for s in input_size) if input_size is not None else None
    if size is not None:
        kwargs["in_chans"] = size[0]
        if is_zoo_architecture(spec):
            kwargs["img_size"] = size[1:]
    check_hub_spec(spec)  # hf-hub: names fail in seconds, clearly, when the repo cannot be fetched
    source, where = parse_model_name(spec)
    if source == "local-dir":
        read_json(Path(where) / "config.json", "model config (config.json)")  # a clear error, naming the file
        if pretrained and not (Path(where) / HUB_FILENAME).is_file():  # timm would read a pytorch_model.bin
            raise UserError(f"{shown(Path(where))} holds no {HUB_FILENAME}: lcnn-zoo loads only safetensors weights, "
                            f"never a pickled pytorch_model.bin (convert it with safetensors.torch.save_file)")
    try:
        model = timm.create_model(spec, pretrained=pretrained, **kwargs)
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise UserError(f"unknown model {shown(spec)}: see timm.list_models('lcnn_*') or timm.list_models()") from e
        raise

    if convert and not is_lcnn(model):
        lcnnify(model, input_size=size)
    if size is not None:
        if is_lcnn(model) and input_size_of(model) != size:
            set_input_size(model, size)
        cfg = getattr(model, "pretrained_cfg", None)
        if isinstance(cfg, dict) and cfg.get("input_size") and tuple(cfg["input_size"]) != size:
            # (timm's pretrained_cfg is a dict attribute; nn.Module's stubs type attributes as Tensor | Module)
            model.pretrained_cfg = {**cfg, "input_size": size}  # type: ignore[assignment]
    return model


def load_initial(model: nn.Module, path: str | Path, keep: Sequence[str] = (), allow_partial: bool = False) -> None:
    """Load the tensors of a checkpoint (``.safetensors``, a run folder or a ``.pth``) into ``model``.

    The classifier and the stem (timm's ``pretrained_cfg`` ``classifier``/``first_conv``) may have
    another shape (a new class count, another channel count): they are left as built, and said so.
    Any other tensor the checkpoint lacks, or has in another shape, is refused naming the keys,
    unless ``allow_partial`` (timm's ``strict=False``). ``keep``: keys left as built regardless."""
    p = Path(path)
    if p.is_dir():
        p = RunFolder(p).weights()
    state = load_state_dict(p)
    own = model.state_dict()
    unknown = sorted(set(state) - set(own))
    if unknown:
        raise UserError(f"{shown(Path(p))} does not fit {type(model).__name__}: unexpected keys {shown(unknown, 160)}")
    check_weights(state, p, model)  # before load_state_dict, which would cast an integer tensor silently
    cfg = getattr(model, "pretrained_cfg", None) or {}
    adaptable = tuple(f"{m}." for m in (cfg.get("classifier"), cfg.get("first_conv")) if isinstance(m, str) and m)
    skipped = sorted(k for k, v in state.items() if own[k].shape != v.shape)
    missing = sorted(set(own) - set(state) - set(keep)) + [k for k in skipped if not k.startswith(adaptable)]
    if missing and not allow_partial:
        raise UserError(f"{shown(Path(p))} covers only part of {type(model).__name__}: {len(missing)} tensors are "
                        f"missing or of another shape ({shown(missing, 160)}); pass --allow-partial to leave them as "
                        f"initialised")
    model.load_state_dict({k: v for k, v in state.items() if k not in skipped and k not in keep}, strict=False)
    if skipped:
        print(f"initial checkpoint {p}: re-initialised {', '.join(skipped)} (shape differs)", file=sys.stderr)
    if missing:
        print(f"initial checkpoint {p}: {len(missing)} tensors left as initialised (--allow-partial)", file=sys.stderr)


def state_dict_shapes(arch: str, state: Dict[str, torch.Tensor]) -> Tuple[Optional[tuple], Optional[int]]:
    """(input size, classes) a state dict of ``arch`` was saved for: an LCNN's stem keeps its input
    shape in the singular vector ``<first_conv>.weight_v`` (1, C, H, W); the classifier's rows are
    the classes. Either is None when the state dict does not tell."""
    cfg = timm.models.get_pretrained_cfg(split_spec(arch)[0])
    first, head = (cfg.first_conv, cfg.classifier) if cfg is not None else ("conv1", "fc")
    v, w = state.get(f"{first}.weight_v"), state.get(f"{first}.weight")
    size = tuple(v.shape[1:]) if v is not None and v.dim() == 4 else None
    if size is None and w is not None and w.dim() == 4 and cfg is not None and cfg.input_size:
        size = (w.shape[1], *cfg.input_size[1:])
    classes = state[f"{head}.weight"].shape[0] if f"{head}.weight" in state else None
    return size, classes
