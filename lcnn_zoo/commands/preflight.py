"""One preflight per command: everything a command will use is resolved and checked here, before
it reads any data or writes any file; a failure is one :class:`~lcnn_zoo.errors.UserError` line.

:func:`train_plan` checks, for ``lcnn-zoo train``, in this order: the options (the optimizer against
timm's factory, ``--model-kwargs`` by building the model on the meta device, mixup against the
batch size), the device, torchrun's environment (``WORLD_SIZE``, ``RANK``, the rendezvous), the
dataset's metadata (an explicit ``--data-dir`` must hold the data; the class count against
``--num-classes``; channels against ``--input-size``; at least two classes), that one batch of the
input size fits in memory, the output folder (``--experiment`` is a name; the parent is a writable
folder; a folder holding another run is never written into, see
:func:`~lcnn_zoo.commands.writing.new_folder`) and, with ``--resume``, the checkpoint (read through its
schema) and its recipe and classes against this run's; ``--resume auto`` never trains again over a
run that got past its first checkpoint. :func:`output_folder` is the same choice for ``eval`` and
``quickstart``.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from ..errors import UserError, shown
from .checkpoint import RunFolder, RunState
from .config import TrainConfig, resume_conflicts
from .data import DataInfo, describe_dataset
from .writing import check_name, new_folder, not_regular

__all__ = ["TrainPlan", "DistEnv", "train_plan", "output_folder", "new_output_folder", "check_device",
           "check_model_options", "check_memory", "check_dataset_memory", "check_eval_memory", "distributed_env"]


@dataclass(frozen=True)
class DistEnv:
    """This process's place in a distributed run, read from torchrun's environment (``RANK``,
    ``WORLD_SIZE``, ``LOCAL_RANK``) by :func:`distributed_env`; one process: rank 0 of 1."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0


@dataclass
class TrainPlan:
    """What a checked ``lcnn-zoo train`` will do: its device, data, run folder and resume point.

    ``folder`` is the run folder (not created yet for a new run: :meth:`claim` does that);
    ``resume_from`` the checkpoint to resume and ``checkpoint`` its contents (read once, here);
    ``dist`` this process's place in a distributed run."""

    cfg: TrainConfig
    device: torch.device
    data: DataInfo
    folder: RunFolder
    new: bool
    resume_from: Optional[Path] = None
    checkpoint: Optional[Dict[str, Any]] = None
    dist: DistEnv = DistEnv()
    initial_state: Optional[RunState] = None  # the state of the run --initial-checkpoint comes from, if any

    def claim(self) -> RunFolder:
        """Create a new run's folder (atomically: never one that another command took meanwhile —
        then, under ``--if-exists suffix``, the next free name)."""
        if self.new:
            exact = self.cfg.resume == "auto"  # a run --resume auto starts is found there next time
            path = new_folder(self.folder.path.parent, self.cfg.run_name if not exact else self.folder.path.name,
                              existing="refuse" if exact else self.cfg.if_exists, option="--output")
            self.folder = RunFolder(path)
        return self.folder


def _env_int(name: str, minimum: int, maximum: Optional[int] = None) -> Optional[int]:
    """The integer in environment variable ``name`` (None when unset), in [minimum, maximum]."""
    text = os.environ.get(name)
    if text is None:
        return None
    try:
        value = int(text)
    except ValueError:
        raise UserError(f"the environment variable {name} must be an integer (torchrun sets it), got "
                        f"{shown(text)}") from None
    if value < minimum or (maximum is not None and value > maximum):
        limits = f">= {minimum}" if maximum is None else f"in {minimum}…{maximum}"
        raise UserError(f"the environment variable {name} must be {limits}, got {value}")
    return value


def distributed_env(device: torch.device) -> DistEnv:
    """Where this process stands in a DDP run, from the variables torchrun sets, checked before any
    data is read: ``WORLD_SIZE`` > 1 without torchrun's rendezvous (``MASTER_ADDR``, ``MASTER_PORT``,
    ``RANK``) would otherwise fail in ``init_process_group`` after the data was loaded, or wait there."""
    world = _env_int("WORLD_SIZE", 1) or 1
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    if world == 1:
        return DistEnv()
    missing = [n for n in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(n)] + (["RANK"] if rank is None else [])
    if missing:
        raise UserError(f"WORLD_SIZE={world} asks for a distributed run, but {', '.join(missing)} "
                        f"{'is' if len(missing) == 1 else 'are'} not set: start it with torchrun "
                        f"(torchrun --nproc_per_node={world} -m lcnn_zoo train …), or unset WORLD_SIZE")
    _env_int("MASTER_PORT", 1, 65535)
    assert rank is not None  # (checked above)
    if rank >= world:
        raise UserError(f"the environment variable RANK must be below WORLD_SIZE={world}, got {rank}")
    local_rank = local_rank or 0
    if device.type == "cuda" and local_rank >= torch.cuda.device_count():
        raise UserError(f"LOCAL_RANK={local_rank}, but this machine has {torch.cuda.device_count()} GPU(s): start at "
                        f"most one process per GPU (torchrun --nproc_per_node)")
    return DistEnv(rank, world, local_rank)


def _memory_of(device: torch.device) -> Tuple[Optional[int], str]:
    """(bytes of memory ``device`` has, what to call it); None where it cannot be told."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device.index or 0).total_memory, f"the GPU ({device})"
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "this machine"
    except (ValueError, OSError, AttributeError):  # not a POSIX system that tells
        return None, "this machine"


def _gib(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:,.0f} bytes" if unit == "bytes" else f"{n:,.1f} {unit}"
        n /= 1024
    raise AssertionError


def check_memory(cfg: TrainConfig, size: Optional[Tuple[int, ...]], device: torch.device,
                 data: Optional[DataInfo] = None) -> None:
    """Refuse an input size that cannot fit: one batch of float32 images on ``device`` (training's
    ``--batch-size`` and the evaluation's batch) must fit in its memory, and, given the dataset's
    :class:`~lcnn_zoo.commands.data.DataInfo`, so must its resize (:func:`check_dataset_memory`). A lower
    bound, so nothing that could run is refused: the model's activations come on top. Without it a size
    like 1×100000×100000 passes every other check, the data is read and resized, and the run fails
    allocating petabytes."""
    if not size:
        return
    have, where = _memory_of(device)
    if have is None:
        return
    eval_batch = cfg.validation_batch_size or max(cfg.batch_size, 256)  # (as training._loader is given)
    for batch, option in ((cfg.batch_size, "--batch-size"), (eval_batch, "--validation-batch-size")):
        _check_batch(size, batch, option, have, where)
    if data is not None:
        check_dataset_memory(data, size)


def _check_batch(size: Sequence[int], batch: int, option: str, have: int, where: str) -> None:
    per_image = math.prod(size) * 4  # float32
    if batch * per_image > have:
        raise UserError(f"--input-size {' '.join(map(str, size))}: one batch of {batch} images ({option}) needs "
                        f"at least {_gib(batch * per_image)} ({_gib(per_image)} per float32 image) and {where} has "
                        f"{_gib(have)}: choose a smaller --input-size or {option}")


def check_dataset_memory(data: DataInfo, size: Optional[Sequence[int]]) -> None:
    """Refuse an input size at which an in-memory dataset (Fashion-MNIST, CIFAR: ``data.in_memory``)
    cannot be resized: :func:`~lcnn_zoo.commands.data.build_dataset` resizes each split whole, and
    torchvision's resize of uint8 images computes in float32, before ``--train-subset``/``--test-subset``
    pick from it (training and eval build both splits). Counted: the float32 resize of the larger split
    (``data.images``), a lower bound. Without it ``--input-size 1 3000 3000`` passed the one-batch check
    (2.3 GB) and failed allocating 2 TB after the data was read. Image folders and Hub datasets are
    resized image by image: not counted."""
    if not size or not data.in_memory or data.images is None:
        return
    if data.size is not None and tuple(size[1:]) == tuple(data.size):
        return  # not resized: kept as stored (uint8)
    have, where = _memory_of(torch.device("cpu"))
    if have is None:
        return
    n = max(data.images)
    need = n * math.prod(size) * 4
    if need > have:
        raise UserError(f"--input-size {' '.join(map(str, size))}: {data.name} is resized in memory, a whole split at "
                        f"once: its {n} training images need at least {_gib(need)} in float32 and {where} has "
                        f"{_gib(have)} (--train-subset is taken after the resize): choose a smaller --input-size")


def check_eval_memory(dataset: str, size: Optional[Sequence[int]], batch_size: int, device: torch.device, *,
                      data_dir: Optional[str] = None, download: bool = False) -> None:
    """:func:`check_memory` for ``lcnn-zoo eval``: one batch (``--batch-size``) on ``device`` and the
    resized in-memory dataset (:func:`check_dataset_memory`, from the dataset's metadata), before any
    model or data is loaded."""
    if not size:
        return
    have, where = _memory_of(device)
    if have is not None:
        _check_batch(size, batch_size, "--batch-size", have, where)
    check_dataset_memory(describe_dataset(dataset, data_dir=data_dir, download=download), size)


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

    from ..layers.spectral_norm import deferred_convergence
    from .factory import is_zoo_architecture, split_spec

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
    _check_penalty_once(cfg)


def _check_penalty_once(cfg: TrainConfig) -> None:
    """``--reg lcnn``/``lcnn_gradreg`` puts the LCNN penalty in the loss; the model keyword
    ``lcnn_penalty`` (for loops that compute only the task loss, such as timm's train.py) adds its
    gradient again at every optimizer step, with its own λ: together the penalty counts twice.
    Refused rather than reconciled: the hook cannot see what the loss holds, and which λ was meant
    is the user's choice. ``--reg none`` (or ``gradreg``) with ``lcnn_penalty`` counts it once."""
    attached = cfg.model_kwargs.get("lcnn_penalty")
    if cfg.reg in ("lcnn", "lcnn_gradreg") and attached is not None and attached is not False:
        raise UserError(f"--reg {cfg.reg} already adds the LCNN penalty to the loss, and --model-kwargs "
                        f"lcnn_penalty={shown(attached, 30)} would add it again at every optimizer step: drop "
                        f"lcnn_penalty (set the weights with --lambda-beta/--lambda-gamma), or use --reg "
                        f"{'none' if cfg.reg == 'lcnn' else 'gradreg'} with it")


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
        kind = not_regular(source)
        if kind is not None:  # never opened: a FIFO would wait for a writer
            raise UserError(f"--resume auto: {shown(source)} is not a regular file ({kind}): restore the run's "
                            f"{RunFolder.LAST}, or leave out --resume to train again in a new folder")
        if not source.is_file():
            # Nothing to resume: a new run there, if the folder is absent, empty, or a run stopped
            # before its first checkpoint (only the run's own files); never a folder of other files,
            # nor a run that got further and lost its last.pth (it would be trained again over its files).
            if folder.path.is_dir() and not folder.path.is_symlink():
                if folder.unfinished_start():
                    return folder, False, None, None
                _refuse_a_run_without_checkpoint(cfg, folder)
            return RunFolder(new_folder(cfg.output, cfg.run_name, existing="refuse", create=False)), True, None, None
    else:
        source = Path(cfg.resume)
        if source.resolve().parent != folder.path.resolve():
            # Another folder's checkpoint: the resumed run continues in a new folder of its own.
            folder, new = RunFolder(new_folder(cfg.output, cfg.run_name, existing=cfg.if_exists, create=False)), True
    ckpt = folder.load_checkpoint(source)
    folder.summary()  # read when the run is already done: checked here, before any data is read
    _check_resumable(cfg, info, source, ckpt)
    return folder, new, source, ckpt


def _refuse_a_run_without_checkpoint(cfg: TrainConfig, folder: RunFolder) -> None:
    """``--resume auto`` in a folder whose run got past its first checkpoint (a summary, a CSV or
    final weights) but has no ``last.pth`` (deleted to save space, say): nothing to continue from,
    and starting again there would replace the run's weights and summary. Refused, saying what to do."""
    names = {p.name for p in folder.path.iterdir()}
    if not names & {RunFolder.SUMMARY, RunFolder.CSV, RunFolder.WEIGHTS, RunFolder.BEST}:
        return  # other files: new_folder refuses the folder, naming them
    if RunFolder.WEIGHTS in names or (RunFolder.SUMMARY in names and folder.summary().get("finished", True)):
        what = "a finished run"
    elif RunFolder.SUMMARY in names or RunFolder.CSV in names:
        what = "a run stopped after its first epochs"
    else:  # only the best weights: a finished run reduced to them, or one stopped after an epoch (nothing says which)
        what = f"a run that got past its first epoch (its {RunFolder.BEST}; finished or not)"
    fresh = shown(Path(cfg.run_name + "-N"))
    raise UserError(f"--resume auto: {shown(folder.path)} holds {what} but no {RunFolder.LAST} to continue from; "
                    f"it is not trained again over its own files. Restore {RunFolder.LAST} to train it on, or leave "
                    f"out --resume to train again in a new folder ({fresh}), or choose another --experiment")


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
        raise UserError(f"cannot resume {shown(Path(source))}: it has {n_then} classes and {shown(cfg.dataset)} now "
                        f"has {info.num_classes}")


def initial_checkpoint_state(cfg: TrainConfig) -> Optional[RunState]:
    """The state of the run ``--initial-checkpoint`` comes from (the run folder itself, or any file
    in one, ``model_best.safetensors`` too), None when it is no run's. A run still training or
    stopped is refused unless ``--allow-unfinished``, as for push and eval: its weights are mid-training."""
    if not cfg.initial_checkpoint:
        return None
    path = Path(cfg.initial_checkpoint)
    folder = (RunFolder(path) if RunFolder.is_run(path) else None) if path.is_dir() else RunFolder.holding(path)
    if folder is None:
        return None
    return folder.require_finished("lcnn-zoo train --initial-checkpoint", cfg.allow_unfinished)


def train_plan(cfg: TrainConfig) -> TrainPlan:
    """Check everything ``cfg`` will use (see the module docstring); nothing is read or written but
    metadata (the dataset's file listing and headers, a checkpoint to resume)."""
    cfg.validate()
    _check_options(cfg)
    device = check_device(cfg.device)
    dist_env = distributed_env(device)
    info = describe_dataset(cfg.dataset, data_dir=cfg.data_dir, download=cfg.download,
                            splits=(cfg.train_split, cfg.val_split))
    _resolve_input_size(cfg, info)
    _check_data(cfg, info)
    size = tuple(cfg.input_size) if cfg.input_size else (
        (info.channels, *info.size) if info.channels and info.size else None)
    check_memory(cfg, size, device, info)
    check_model_options(cfg.model, cfg.num_classes or info.num_classes, size, cfg.model_kwargs)
    initial_state = initial_checkpoint_state(cfg)
    folder, new, source, ckpt = _resume_point(cfg, info)
    return TrainPlan(cfg, device, info, folder, new, source, ckpt, dist_env, initial_state)


def output_folder(output: str | os.PathLike, existing: str = "suffix") -> Path:
    """A command's own new output folder at ``output`` (or ``output-N`` when that holds anything):
    chosen and checked here, created by :func:`~lcnn_zoo.commands.writing.new_folder` when the work is done."""
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
