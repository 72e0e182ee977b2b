"""One preflight per command: everything a command will use is resolved and checked here, before
it reads any data or writes any file; a failure is one :class:`~lcnn_zoo.errors.UserError` line.

:func:`train_plan` checks, for ``lcnn-zoo train``, in this order: the options (the optimizer against
timm's factory, ``--model-kwargs`` by building the model on the meta device, mixup against the
batch size), the device, the dataset's metadata (an explicit ``--data-dir`` must hold the data; the
class count against ``--num-classes``; channels against ``--input-size``; at least two classes),
the output folder (``--experiment`` is a name; the parent is a writable folder; a folder holding
another run is never written into, see :func:`~lcnn_zoo.writing.new_folder`) and, with
``--resume``, the checkpoint's recipe and classes against this run's. :func:`output_folder` is the
same choice for ``eval`` and ``quickstart``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

from .checkpoint import RunFolder
from .config import TrainConfig, resume_conflicts
from .data import DataInfo, describe_dataset
from .errors import UserError, shown
from .writing import check_name, new_folder

__all__ = ["TrainPlan", "train_plan", "output_folder", "new_output_folder", "check_device", "check_model_options"]


@dataclass
class TrainPlan:
    """What a checked ``lcnn-zoo train`` will do: its device, data, run folder and resume point.

    ``folder`` is the run folder (not created yet for a new run: :meth:`claim` does that);
    ``resume_from`` the checkpoint to resume and ``checkpoint`` its contents (read once, here)."""

    cfg: TrainConfig
    device: torch.device
    data: DataInfo
    folder: RunFolder
    new: bool
    resume_from: Optional[Path] = None
    checkpoint: Optional[Dict[str, Any]] = None

    def claim(self) -> RunFolder:
        """Create a new run's folder (atomically: never one that another command took meanwhile —
        then, under ``--if-exists suffix``, the next free name)."""
        if self.new:
            exact = self.cfg.resume == "auto"  # a run --resume auto starts is found there next time
            path = new_folder(self.folder.path.parent, self.cfg.run_name if not exact else self.folder.path.name,
                              existing="refuse" if exact else self.cfg.if_exists, option="--output")
            self.folder = RunFolder(path)
        return self.folder


def check_device(name: Optional[str]) -> torch.device:
    """``--device`` as a torch device that exists here (default: cuda when available, else cpu)."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as e:
        raise UserError(f"--device must be cpu, cuda or cuda:N, got {shown(name)}") from e
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {shown(name)}: no CUDA GPU is available here (use --device cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"--device {shown(name)}: this machine has {torch.cuda.device_count()} GPU(s)")
    elif device.type != "cpu":
        raise UserError(f"--device must be cpu, cuda or cuda:N, got {shown(name)}")
    return device


def check_model_options(model: str, num_classes: Optional[int], input_size: Optional[Tuple[int, ...]],
                        model_kwargs: Dict[str, Any]) -> None:
    """Build ``model`` with these options on the meta device (no memory, no weights): a misspelled
    model name or keyword, or a value the model refuses, fails here in one line."""
    import timm

    from .factory import is_zoo_architecture, split_spec
    from .layers.spectral_norm import deferred_convergence

    arch, _ = split_spec(model)
    if arch.startswith(("hf-hub:", "local-dir:")):
        return  # their config is read when they load; nothing to build from a name
    if arch not in timm.list_models():
        raise UserError(f"unknown model {shown(model)}: see timm.list_models('lcnn_*') or timm.list_models()")
    kwargs = dict(model_kwargs)
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if input_size is not None:
        kwargs["in_chans"] = input_size[0]
        if is_zoo_architecture(arch):
            kwargs["img_size"] = tuple(input_size[1:])
    try:
        with torch.device("meta"), deferred_convergence():
            timm.create_model(arch, pretrained=False, **kwargs)
    except (TypeError, ValueError) as e:
        raise UserError(f"--model-kwargs {shown(model_kwargs)} do not fit {arch}: {shown(str(e), 200)}") from e


def _check_options(cfg: TrainConfig) -> None:
    from timm.optim import list_optimizers

    if cfg.opt.lower() not in set(list_optimizers()):
        raise UserError(f"--opt {shown(cfg.opt)} is not one of timm's optimizers (timm.optim.list_optimizers(): "
                        f"sgd, momentum, adamw, lamb, …)")
    if (cfg.mixup > 0 or cfg.cutmix > 0) and cfg.batch_size % 2:
        raise UserError(f"--mixup/--cutmix need an even --batch-size (timm's Mixup pairs samples), got "
                        f"{cfg.batch_size}")
    if cfg.aa:
        from .data import auto_augment
        try:
            auto_augment(cfg.aa, (32, 32))
        except ValueError as e:
            raise UserError(f"--aa: {e}") from None
    check_name(cfg.run_name, "--experiment")


def _resolve_input_size(cfg: TrainConfig, info: DataInfo) -> None:
    """timm's --in-chans / --img-size are parts of --input-size: with the dataset's own size as the rest,
    they become ``cfg.input_size`` (the one size the run is built and recorded for)."""
    if cfg.input_size is not None or (cfg.in_chans is None and cfg.img_size is None):
        return
    if not (info.channels and info.size):  # images read at load: the dataset converts them (training._datasets)
        return
    hw = [cfg.img_size, cfg.img_size] if cfg.img_size is not None else list(info.size)
    cfg.input_size = [cfg.in_chans if cfg.in_chans is not None else info.channels, *hw]


def _check_data(cfg: TrainConfig, info: DataInfo) -> None:
    if info.num_classes is not None and info.num_classes < 2:
        raise UserError(f"{shown(cfg.dataset)} has {info.num_classes} class: a classifier needs at least 2")
    if cfg.num_classes is not None and info.num_classes is not None and cfg.num_classes < info.num_classes:
        raise UserError(f"--num-classes {cfg.num_classes} is fewer than the {info.num_classes} classes of "
                        f"{shown(cfg.dataset)}: its labels would fall outside the classifier")
    if cfg.input_size and info.channels is not None and cfg.input_size[0] != info.channels:
        if {cfg.input_size[0], info.channels} != {1, 3}:
            raise UserError(f"--input-size {' '.join(map(str, cfg.input_size))}: {shown(cfg.dataset)} images have "
                            f"{info.channels} channel(s); only 1 ↔ 3 conversions are made")


def _resume_point(cfg: TrainConfig, info: DataInfo) -> Tuple[RunFolder, bool, Optional[Path], Optional[Dict]]:
    """(run folder, whether it is a new folder, checkpoint to resume, its contents)."""
    if not cfg.resume:
        return RunFolder(new_folder(cfg.output, cfg.run_name, existing=cfg.if_exists, create=False)), True, None, None
    folder, new = RunFolder(Path(cfg.output) / cfg.run_name), False
    if cfg.resume == "auto":
        source = folder.file(RunFolder.LAST)
        if not source.is_file():
            # Nothing to resume: a new run there, if the folder is absent, empty, or a run stopped
            # before its first checkpoint (only the run's own files); never a folder of other files.
            if folder.path.is_dir() and not folder.path.is_symlink() and folder.unfinished_start():
                return folder, False, None, None
            return RunFolder(new_folder(cfg.output, cfg.run_name, existing="refuse", create=False)), True, None, None
    else:
        source = Path(cfg.resume)
        if source.resolve().parent != folder.path.resolve():
            # Another folder's checkpoint: the resumed run continues in a new folder of its own.
            folder, new = RunFolder(new_folder(cfg.output, cfg.run_name, existing=cfg.if_exists, create=False)), True
    ckpt = folder.load_checkpoint(source)
    _check_resumable(cfg, info, source, ckpt)
    return folder, new, source, ckpt


def _check_resumable(cfg: TrainConfig, info: DataInfo, source: Path, ckpt: Dict[str, Any]) -> None:
    recorded = ckpt.get("config") or ckpt.get("args") or {}
    conflicts = resume_conflicts(cfg.to_dict(), recorded)
    if conflicts:
        what = "; ".join(f"--{k.replace('_', '-')} {shown(now, 40)} (the run's: {shown(then, 40)})"
                         for k, now, then in conflicts)
        raise UserError(f"cannot resume {shown(Path(source))} with another recipe: {what}. A resumed run may change "
                        f"only --epochs, --eval-every and runtime options; start a new --experiment to change the rest")
    done = int(ckpt["epoch"])
    if cfg.epochs < done:
        raise UserError(f"{shown(Path(source))} is already trained for {done} epochs; --epochs {cfg.epochs} is fewer")
    classes: List[str] = [str(c) for c in ckpt.get("classes") or []]
    if info.classes and classes and classes != [str(c) for c in info.classes]:
        added = sorted(set(map(str, info.classes)) - set(classes))
        raise UserError(f"cannot resume {shown(Path(source))}: the dataset's classes changed since it was trained "
                        f"(now {len(info.classes)}, then {len(classes)}; new: {shown(added, 60)})")
    n_then = ckpt.get("num_classes")
    if info.num_classes is not None and n_then is not None and int(n_then) < info.num_classes:
        raise UserError(f"cannot resume {shown(Path(source))}: it has {n_then} classes and {shown(cfg.dataset)} now has "
                        f"{info.num_classes}")


def train_plan(cfg: TrainConfig) -> TrainPlan:
    """Check everything ``cfg`` will use (see the module docstring); nothing is read or written but
    metadata (the dataset's file listing and headers, a checkpoint to resume)."""
    cfg.validate()
    _check_options(cfg)
    device = check_device(cfg.device)
    info = describe_dataset(cfg.dataset, data_dir=cfg.data_dir, download=cfg.download,
                            splits=(cfg.train_split, cfg.val_split))
    _resolve_input_size(cfg, info)
    _check_data(cfg, info)
    size = tuple(cfg.input_size) if cfg.input_size else (
        (info.channels, *info.size) if info.channels and info.size else None)
    check_model_options(cfg.model, cfg.num_classes or info.num_classes, size, cfg.model_kwargs)
    folder, new, source, ckpt = _resume_point(cfg, info)
    return TrainPlan(cfg, device, info, folder, new, source, ckpt)


def output_folder(output: str | os.PathLike, existing: str = "suffix") -> Path:
    """A command's own new output folder at ``output`` (or ``output-N`` when that holds anything):
    chosen and checked here, created by :func:`~lcnn_zoo.writing.new_folder` when the work is done."""
    out = Path(output)
    name = out.name
    if not name or name in (".", ".."):
        raise UserError(f"--output {shown(Path(output))} must name a folder to create (e.g. runs/eval)")
    return new_folder(out.parent if str(out.parent) else ".", name, existing=existing, create=False)


def new_output_folder(output: str | os.PathLike) -> Path:
    """Create the folder :func:`output_folder` chose (or the next free ``-N`` one, if another command
    took it meanwhile) and say so when it is not ``output`` itself."""
    out = Path(output)
    path = new_folder(out.parent if str(out.parent) else ".", out.name, existing="suffix")
    if path.name != out.name:
        import sys

        print(f"{out} holds files already: writing to {path} (nothing is overwritten)", file=sys.stderr)
    return path
