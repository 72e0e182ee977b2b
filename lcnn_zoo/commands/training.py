"""Training: timm's training-loop pieces with the LCNN penalty (eq. 5) and GradReg (§5) in the loss.

The structure follows timm's ``train.py`` (``create_optimizer_v2``, ``create_scheduler_v2``,
``ModelEmaV3``, ``Mixup``):

* :func:`train` runs a :class:`~lcnn_zoo.commands.config.TrainConfig` in a locked
  :class:`~lcnn_zoo.commands.checkpoint.RunFolder`: :func:`resume`, then :func:`train_one_epoch` and
  :func:`evaluate` per epoch, a checkpoint after each (written atomically);
* one :class:`TrainingRun` holds a run's state (model, optimizer, schedule, EMA, loss, Mixup,
  loaders, sizes), built once by :func:`build_run`;
* a :class:`~lcnn_zoo.commands.steps.Regulariser` per ``--reg`` choice does one step's loss and backward: the
  LCNN penalty (``lcnn``), GradReg by double backprop or finite differences (``gradreg``), or both;
* β and γ are never weight-decayed; DDP via ``torchrun`` (gloo on CPU, nccl on GPU) with
  synchronised BatchNorm statistics and a collective timeout.

``lcnn-zoo train --help`` (or ``python -m lcnn_zoo train``) lists the options.
"""
from __future__ import annotations

import datetime
import math
import os
import random
import shlex
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Sized, Tuple, cast

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.data import Mixup
from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3, dispatch_clip_grad
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler, Sampler, SequentialSampler
from tqdm import tqdm

from ..errors import Interrupted, UserError, shown
from ..layers import (
    CONVERGENCE_TOL,
    LipschitzBatchNorm2d,
    converge_spectral_norms,
    exact_vectors,
    recalibrate_batchnorm,
    sync_batchnorm,
)
from ..penalty import param_groups
from ..weight_checks import check_weights
from .checkpoint import CheckpointError, RunFolder, rng_state, set_rng_state
from .config import TrainConfig
from .data import BatchAugment, DataInfo, describe_dataset, num_classes_of, subset
from .factory import create_model, is_lcnn, load_initial
from .preflight import DistEnv, TrainPlan, train_plan
from .steps import Regulariser, make_regulariser

__all__ = ["train", "TrainingRun", "TrainData", "build_run", "train_one_epoch", "evaluate", "resume",
           "RECALIBRATE_BELOW_STEPS", "batches_seen_by_batchnorm"]

RECALIBRATE_BELOW_STEPS = 100  # BatchNorms that recorded fewer batches get their statistics recomputed at the end
RECALIBRATE_BATCHES = 50


# --------------------------------------------------------------------------------------------
# A run's state
# --------------------------------------------------------------------------------------------
class TrainData(NamedTuple):
    """What a run reads: the two datasets, the input size (C, H, W), the number of classes and the
    class names (the training split's, empty when the dataset has none)."""

    train: Dataset
    test: Dataset
    input_size: Tuple[int, ...]
    num_classes: int
    classes: List[str]


@dataclass
class TrainingRun:
    """One training run's state, built once by :func:`build_run` and passed whole to
    :func:`train_one_epoch`, :func:`resume` and the checkpoint and summary writers.

    ``model`` is what a step calls (the DDP or compiled wrapper); ``core`` is the model itself (state
    dicts, penalty, EMA). ``criterion`` is the task loss (soft targets when ``mixup`` is on);
    ``updates`` counts optimizer steps (EMA warm-up, ``--sched-on-updates``); ``history`` holds one row
    per epoch and ``best`` the best evaluated epoch."""

    cfg: TrainConfig
    device: torch.device
    rank: int
    world: int
    data: TrainData
    model: nn.Module
    core: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    ema: Optional[ModelEmaV3]
    scaler: Optional[torch.amp.GradScaler]
    criterion: Callable
    mixup: Optional[Mixup]
    reg: Regulariser
    augment: BatchAugment
    train_loader: DataLoader
    test_loader: DataLoader
    updates_per_epoch: int = 1
    updates: int = 0
    history: List[Dict[str, Any]] = field(default_factory=list)
    best: Dict[str, Any] = field(default_factory=dict)

    @property
    def is_main(self) -> bool:
        """Whether this process is rank 0 (the one that writes the run's files)."""
        return self.rank == 0

    def amp(self):
        """The autocast context of ``--amp`` (a null context without it)."""
        if not self.cfg.amp:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=torch.float16 if self.cfg.amp_dtype == "float16" else
                              torch.bfloat16)


def _optimizer_step(run: TrainingRun, micro_steps: int) -> None:
    """One optimizer step on the gradients of ``micro_steps`` batches (their mean: the loss of each was
    backpropagated whole), unscaled and clipped first when asked; then the EMA and, with
    --sched-on-updates, the schedule."""
    cfg = run.cfg
    params = [p for p in run.core.parameters() if p.grad is not None]
    if micro_steps > 1 and params:
        torch._foreach_div_([p.grad for p in params if p.grad is not None], float(micro_steps))
    if cfg.clip_grad is not None:
        if run.scaler is not None:
            run.scaler.unscale_(run.optimizer)
        dispatch_clip_grad(params, cfg.clip_grad, mode=cfg.clip_mode)
    if run.scaler is not None:
        run.scaler.step(run.optimizer)
        run.scaler.update()
    else:
        run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.updates += 1
    if run.ema is not None:
        run.ema.update(run.core, step=run.updates)
    if cfg.sched_on_updates and run.scheduler is not None:
        run.scheduler.step_update(num_updates=run.updates)


class DeviceMeters:
    """Running means of per-step values, summed on the values' device: :meth:`add` reads nothing on the
    host (a GPU would wait for every read, and no CUDA graph may hold one); :meth:`read` reads all the
    means at once, one device sync, at a log interval or an epoch's end. timm's ``AverageMeter`` takes
    Python floats, so it would read every step."""

    def __init__(self) -> None:
        self.sums: Dict[str, torch.Tensor] = {}
        self.count = 0

    def add(self, values: Dict[str, torch.Tensor], n: int) -> None:
        """Add one step's ``values`` (0-dim tensors, means over its ``n`` samples)."""
        for k, v in values.items():
            v = v.detach().float() * n
            if k in self.sums:
                self.sums[k].add_(v)
            else:
                self.sums[k] = v
        self.count += n

    def read(self) -> Dict[str, float]:
        """The means so far, {name: float} (empty before the first :meth:`add`)."""
        if not self.sums:
            return {}
        values = torch.stack(list(self.sums.values())).tolist()
        return {k: v / self.count for k, v in zip(self.sums, values)}


def _progress(cfg: TrainConfig, run: TrainingRun, epoch: int, loader) -> Tuple[Any, bool]:
    """(the loader, wrapped in a progress bar on a terminal; whether to print a line per log interval
    instead: stderr is not a terminal, as in a log file, where a bar's redraws would pile up)."""
    show = run.is_main and not cfg.no_progress
    on_terminal = show and sys.stderr.isatty()
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False, disable=not on_terminal, file=sys.stderr)
    return bar, show and not on_terminal


def train_one_epoch(run: TrainingRun, epoch: int) -> Dict[str, float]:
    """One pass over ``run.train_loader`` (0-based ``epoch``); returns the epoch's mean loss, top-1 (%),
    penalty terms, lr and time (s), averaged over the processes.

    No step reads a value on the host: the metrics stay on the device (:class:`DeviceMeters`) and are
    read every ``--log-interval`` steps (a progress bar's figures on a terminal, else one line, as
    timm's train.py logs) and at the end."""
    cfg, loader = run.cfg, run.train_loader
    run.model.train()
    aug_gen = torch.Generator().manual_seed(cfg.seed * 7919 + epoch * 104729 + run.rank)
    meters = DeviceMeters()
    lr = float(np.mean([g["lr"] for g in run.optimizer.param_groups]))  # the lr this epoch trains at
    bar, log_lines = _progress(cfg, run, epoch, loader)
    t0 = time.time()
    accum, pending = cfg.grad_accum_steps, 0
    last = len(loader) - 1
    run.optimizer.zero_grad(set_to_none=True)
    for i, (x, y) in enumerate(bar):
        x, y = x.to(run.device, non_blocking=True), y.to(run.device, non_blocking=True)
        x = run.augment(x, aug_gen)
        y_loss = y
        if run.mixup is not None:
            x, y_loss = run.mixup(x, y)
        if cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        out = run.reg.step(run.model, x, y_loss, run.amp, run.scaler)
        pending += 1
        if pending == accum or i == last:
            _optimizer_step(run, pending)
            pending = 0
        top1 = (out.logits.argmax(1) == y).float().mean() * 100.0
        meters.add({"loss": out.loss, "top1": top1, **out.stats}, x.shape[0])
        if (i + 1) % cfg.log_interval == 0 and i != last and (log_lines or not bar.disable):
            _log_step(bar, log_lines, meters.read(), epoch, i + 1, len(loader), lr, time.time() - t0)
    bar.close()
    metrics: Dict[str, float] = meters.read()
    if not math.isfinite(metrics["loss"]):
        raise UserError(f"training diverged at epoch {epoch + 1} (mean loss {metrics['loss']}); lower --lr, or "
                        f"check the data and the penalty weights")
    metrics["epoch_time_s"] = time.time() - t0
    return {**_all_reduce_mean(metrics, run.world, run.device), "lr": lr}


def _log_step(bar, log_lines: bool, means: Dict[str, float], epoch: int, step: int, steps: int, lr: float,
              elapsed: float) -> None:
    """The running means at a log interval: the bar's figures, or one line (timm's train.py's format)."""
    if not log_lines:
        bar.set_postfix(loss=f"{means['loss']:.3f}", acc=f"{means['top1']:.1f}")
        return
    print(f"Train: {epoch + 1} [{step:>{len(str(steps))}d}/{steps} ({100.0 * step / steps:3.0f}%)]  "
          f"loss {means['loss']:.4f}  top-1 {means['top1']:.2f}%  lr {lr:.3e}  {step / max(elapsed, 1e-9):.2f} steps/s",
          file=sys.stderr, flush=True)


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, channels_last: bool = False,
             amp: Callable = nullcontext) -> Dict[str, float]:
    """Top-1 accuracy (%) and mean cross-entropy of ``model`` on ``loader`` (eval mode)."""
    was = model.training
    model.eval()
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # (correct, Σ loss), summed on the device
    total = 0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with amp():
            logits = model(x)
        sums += torch.stack([(logits.argmax(1) == y).sum().double(),
                             F.cross_entropy(logits.float(), y, reduction="sum").double()])
        total += y.numel()
    model.train(was)
    correct, loss_sum = sums.tolist()
    return {"top1": 100.0 * correct / max(total, 1), "loss": loss_sum / max(total, 1), "count": float(total)}


def resume(run: TrainingRun, ckpt: Dict[str, Any], path: str | os.PathLike) -> int:
    """Restore ``run`` from the training checkpoint ``ckpt`` (read from ``path`` and checked against
    the run's recipe by :func:`~lcnn_zoo.commands.preflight.train_plan`); returns the epoch to start at.

    A resumed run keeps its recipe: options other than :data:`~lcnn_zoo.commands.config.RESUME_MAY_CHANGE`
    must match the checkpoint's. ``--epochs`` may grow (or shrink to no less than what is done):
    the learning-rate schedule is then rebuilt over the new number of epochs and the log says so.
    """
    cfg = run.cfg
    recorded = ckpt.get("config") or ckpt.get("args") or {}
    done = int(ckpt["epoch"])  # (the types were checked with the checkpoint's schema: lcnn_zoo.commands.run_files)

    def restore(what: str, load: Callable[[], Any]) -> None:
        # What the schema cannot tell: whether the tensors and states fit this run's model and optimizer.
        try:
            load()
        except (RuntimeError, ValueError, TypeError, KeyError, IndexError) as e:
            raise CheckpointError(f"{shown(Path(path))}: '{what}' does not fit this run "
                                  f"({shown((str(e) or type(e).__name__).splitlines()[0], 160)}): restore the file, or "
                                  f"train again in a new folder (leave out --resume)") from e

    # A run stops when its loss stops being finite (train_one_epoch), so a checkpoint holding NaN is a
    # damaged file: refused here, before load_state_dict (which would also cast a relabelled dtype).
    check_weights(ckpt["state_dict"], Path(path), run.core)
    if run.ema is not None and ckpt.get("state_dict_ema") is not None:
        check_weights(ckpt["state_dict_ema"], Path(path), run.ema.module)
    with exact_vectors():  # the run's own tracking state, as the uninterrupted run would have it
        restore("state_dict", lambda: run.core.load_state_dict(ckpt["state_dict"]))
    restore("optimizer", lambda: run.optimizer.load_state_dict(ckpt["optimizer"]))
    then_epochs = int(recorded.get("epochs", cfg.epochs))
    if run.scheduler is not None:
        if then_epochs == cfg.epochs and ckpt.get("scheduler") is not None:
            restore("scheduler", lambda: run.scheduler.load_state_dict(ckpt["scheduler"]))
        run.scheduler.step(done)  # the lr of the next epoch, on the (possibly rebuilt) schedule
    if then_epochs != cfg.epochs and run.is_main:
        lr = run.optimizer.param_groups[0]["lr"]
        print(f"extending the run from {then_epochs} to {cfg.epochs} epochs: the {cfg.sched} schedule is rebuilt over "
              f"{cfg.epochs} epochs (lr for epoch {done + 1}: {lr:.4g})", file=sys.stderr)
    if run.ema is not None and ckpt.get("state_dict_ema") is not None:
        ema = run.ema.module
        with exact_vectors():
            restore("state_dict_ema", lambda: ema.load_state_dict(ckpt["state_dict_ema"]))
    if run.scaler is not None and ckpt.get("scaler") is not None:
        scaler = run.scaler
        restore("scaler", lambda: scaler.load_state_dict(ckpt["scaler"]))
    if ckpt.get("rng") and run.world == 1:
        restore("rng", lambda: set_rng_state(ckpt["rng"]))
    run.history = list(ckpt.get("history") or [])
    run.best = dict(ckpt.get("best") or {})
    run.updates = done * run.updates_per_epoch
    if cfg.sched_on_updates and run.scheduler is not None:
        run.scheduler.step_update(num_updates=run.updates)
    if run.is_main:
        print(f"resumed {path} at epoch {done}", file=sys.stderr)
    return done


# --------------------------------------------------------------------------------------------
# Setting a run up
# --------------------------------------------------------------------------------------------
def _init_distributed(device: torch.device, timeout_s: float, env: DistEnv) -> Tuple[int, int]:
    """(rank, world size): the process group joined when ``env`` (checked by the preflight) says
    this is one process of several."""
    if env.world <= 1:
        return 0, 1
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                            timeout=datetime.timedelta(seconds=timeout_s))
    if device.type == "cuda":
        torch.cuda.set_device(env.local_rank)
    return dist.get_rank(), dist.get_world_size()


def _all_reduce_mean(values: Dict[str, float], world: int, device: torch.device) -> Dict[str, float]:
    if world <= 1:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return {k: float(v) / world for k, v in zip(keys, t.tolist())}


def _all_reduce_eval(m: Dict[str, float], world: int, device: torch.device) -> Dict[str, float]:
    """Combine per-process evaluation results (top1 %, mean loss, count) into global ones."""
    if world <= 1:
        return m
    sums = _all_reduce_mean({"correct": m["top1"] * m["count"] / 100.0, "loss_sum": m["loss"] * m["count"],
                             "count": m["count"]}, world, device)
    n = sums["count"] * world
    return {"top1": 100.0 * sums["correct"] * world / max(n, 1), "loss": sums["loss_sum"] * world / max(n, 1),
            "count": n}


def _loader(ds, batch_size: int, shuffle: bool, seed: int, rank: int, world: int, workers: int,
            drop_last: bool, pin_memory: bool = False) -> torch.utils.data.DataLoader:
    sampler: Sampler
    if world > 1:
        sampler = DistributedSampler(ds, num_replicas=world, rank=rank, shuffle=shuffle, seed=seed,
                                     drop_last=drop_last)
    elif shuffle:
        sampler = RandomSampler(ds, generator=torch.Generator().manual_seed(seed))
    else:
        sampler = SequentialSampler(ds)
    return DataLoader(ds, batch_size=batch_size, sampler=sampler, num_workers=workers, drop_last=drop_last,
                      pin_memory=pin_memory)


def _datasets(cfg: TrainConfig, info: Optional[DataInfo] = None) -> TrainData:
    """Both splits, loaded from the dataset's table entry: ``info``, the preflight's
    :class:`~lcnn_zoo.commands.data.DataInfo` (described here when not given)."""
    if info is None:
        info = describe_dataset(cfg.dataset, data_dir=cfg.data_dir, download=cfg.download,
                                splits=(cfg.train_split, cfg.val_split))
    size = tuple(cfg.input_size) if cfg.input_size else None
    img = (cfg.img_size, cfg.img_size) if cfg.img_size is not None else None  # folders: parts of --input-size
    kw: Dict[str, Any] = dict(data_dir=cfg.data_dir, download=cfg.download, image_size=size[1:] if size else img,
                              channels=size[0] if size else cfg.in_chans)
    train_ds = info.build(train=True, split=cfg.train_split, **kw)
    test_ds = info.build(train=False, classes=getattr(train_ds, "classes", None), eval_on_train=cfg.eval_on_train,
                         split=cfg.val_split, **kw)
    for name, n, ds in (("--train-subset", cfg.train_subset, train_ds), ("--test-subset", cfg.test_subset, test_ds)):
        if n > len(cast(Sized, ds)):
            raise UserError(f"{name} {n} is larger than the dataset ({len(cast(Sized, ds))} images)")
    if cfg.train_subset:
        train_ds = subset(train_ds, cfg.train_subset, seed=cfg.seed)
    if cfg.test_subset:
        test_ds = subset(test_ds, cfg.test_subset, seed=cfg.seed)
    input_size = size or tuple(train_ds[0][0].shape)
    num_classes = cfg.num_classes or num_classes_of(train_ds)
    for ds in (train_ds, test_ds):
        labels = getattr(ds, "labels", None)
        if isinstance(labels, torch.Tensor) and labels.numel() and int(labels.max()) >= num_classes:
            raise UserError(f"{shown(cfg.dataset)} has labels up to {int(labels.max())}: --num-classes {num_classes} "
                            f"is too few")
    return TrainData(train_ds, test_ds, input_size, num_classes, [str(c) for c in getattr(train_ds, "classes", [])])


def _build_model(cfg: TrainConfig, num_classes: int, input_size: tuple) -> nn.Module:
    kwargs = dict(cfg.model_kwargs)
    if cfg.drop_path is not None:
        kwargs["drop_path_rate"] = cfg.drop_path
    if cfg.gp is not None:
        kwargs["global_pool"] = cfg.gp
    model = create_model(cfg.model, input_size=input_size, num_classes=num_classes, model_kwargs=kwargs,
                         pretrained=cfg.pretrained, drop_rate=cfg.drop_rate, convert=cfg.lcnnify)
    report = getattr(model, "lcnn_report", None)
    if (cfg.lcnnify and report is not None and report.analysis != "pending" and not report.ok
            and not cfg.allow_uncovered):
        raise UserError(f"--lcnnify {shown(cfg.model)}: {report.verdict}; print lcnn_zoo.lcnnify(model).lcnn_report "
                        f"for the list, or pass --allow-uncovered to train it anyway")
    for m in model.modules():  # timm's --bn-momentum / --bn-eps: every BatchNorm, γ-Lipschitz ones too
        if isinstance(m, (nn.modules.batchnorm._BatchNorm, LipschitzBatchNorm2d)):
            m.momentum = cfg.bn_momentum if cfg.bn_momentum is not None else m.momentum
            m.eps = cfg.bn_eps if cfg.bn_eps is not None else m.eps
    if cfg.grad_checkpointing:
        set_grad_checkpointing = getattr(model, "set_grad_checkpointing", None)
        if not callable(set_grad_checkpointing):
            raise UserError(f"--grad-checkpointing: {shown(cfg.model)} has no set_grad_checkpointing")
        set_grad_checkpointing(True)
    if cfg.initial_checkpoint:
        # A logit_scale asked for explicitly is the new run's recipe: the checkpoint's does not replace it.
        load_initial(model, cfg.initial_checkpoint, keep=("logit_scale",) if "logit_scale" in cfg.model_kwargs else (),
                     allow_partial=cfg.allow_partial)
    if cfg.reg in ("lcnn", "lcnn_gradreg") and not is_lcnn(model):
        raise UserError(f"--reg {cfg.reg} needs an LCNN: use an lcnn_* model (not _softplus/_relu) or --lcnnify")
    return model


def train_augment(cfg: TrainConfig, input_size: Sequence[int]) -> BatchAugment:
    """The training augmentation ``cfg`` asks for (--no-aug: none)."""
    if cfg.no_aug:
        return BatchAugment(pad=0, flip=False)
    return BatchAugment(pad=cfg.aug_pad, flip=not cfg.no_flip, hflip=cfg.hflip, vflip=cfg.vflip, aa=cfg.aa,
                        reprob=cfg.reprob, remode=cfg.remode, recount=cfg.recount,
                        image_size=cast(Tuple[int, int], tuple(input_size[1:])))


def _criterion(cfg: TrainConfig, num_classes: int) -> Tuple[Callable, Optional[Mixup]]:
    """The task loss and the Mixup/CutMix of ``cfg``, as timm's train.py chooses them."""
    mixup = None
    if cfg.mixup > 0 or cfg.cutmix > 0 or cfg.cutmix_minmax is not None:
        mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, cutmix_minmax=cfg.cutmix_minmax,
                      prob=cfg.mixup_prob, switch_prob=cfg.mixup_switch_prob, mode=cfg.mixup_mode,
                      label_smoothing=cfg.smoothing, num_classes=num_classes)
    if cfg.bce_loss:  # as timm's train.py: the smoothing is Mixup's when it is on
        return BinaryCrossEntropy(smoothing=0.0 if mixup is not None else cfg.smoothing,
                                  target_threshold=cfg.bce_target_thresh, sum_classes=cfg.bce_sum,
                                  pos_weight=cfg.bce_pos_weight), mixup
    if mixup is not None:
        return SoftTargetCrossEntropy(), mixup
    if cfg.smoothing > 0:
        return LabelSmoothingCrossEntropy(cfg.smoothing), None
    return nn.CrossEntropyLoss(), None


def _optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    opt_kw: Dict[str, Any] = dict(cfg.opt_kwargs)
    if cfg.opt_eps is not None:
        opt_kw["eps"] = cfg.opt_eps
    if cfg.opt_betas is not None:
        opt_kw["betas"] = tuple(cfg.opt_betas)
    return create_optimizer_v2(param_groups(model, cfg.weight_decay), opt=cfg.opt, lr=cfg.lr,
                               weight_decay=cfg.weight_decay, momentum=cfg.momentum, **opt_kw)


def _scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer, updates_per_epoch: int):
    if cfg.sched == "none":
        return None
    sched_kw: Dict[str, Any] = {} if cfg.decay_epochs is None else {"decay_epochs": cfg.decay_epochs}
    scheduler, _ = create_scheduler_v2(
        optimizer, sched=cfg.sched, num_epochs=cfg.epochs, decay_milestones=cfg.decay_milestones,
        decay_rate=cfg.decay_rate, min_lr=cfg.min_lr, warmup_epochs=cfg.warmup_epochs,
        warmup_lr=cfg.lr * 0.1 if cfg.warmup_lr is None else cfg.warmup_lr, warmup_prefix=cfg.warmup_prefix,
        # (timm annotates `noise` as float | List[float] with a default of None)
        cooldown_epochs=cfg.cooldown_epochs, noise=cfg.lr_noise, noise_pct=cfg.lr_noise_pct,  # type: ignore[arg-type]
        noise_std=cfg.lr_noise_std, noise_seed=cfg.seed, cycle_mul=cfg.lr_cycle_mul, cycle_decay=cfg.lr_cycle_decay,
        cycle_limit=cfg.lr_cycle_limit, k_decay=cfg.lr_k_decay, step_on_epochs=not cfg.sched_on_updates,
        updates_per_epoch=updates_per_epoch, **sched_kw)
    return scheduler


def build_run(cfg: TrainConfig, data: TrainData, device: torch.device, rank: int = 0, world: int = 1) -> TrainingRun:
    """The :class:`TrainingRun` of ``cfg`` on ``data``: model (on ``device``; wrapped in DDP when
    ``world`` > 1 and compiled with ``--compile``), optimizer, schedule, EMA, GradScaler (float16 AMP
    only), loss and Mixup, regulariser, augmentation and the two loaders (this ``rank``'s share)."""
    seed = cfg.seed
    n_train = len(cast(Sized, data.train))
    updates_per_epoch = -(-(n_train // world // cfg.batch_size) // cfg.grad_accum_steps)  # drop_last batches
    model = _build_model(cfg, data.num_classes, data.input_size).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    ema = None
    if cfg.model_ema:
        ema = ModelEmaV3(model, decay=cfg.model_ema_decay, exclude_buffers=False, use_warmup=cfg.model_ema_warmup,
                         device=torch.device("cpu") if cfg.model_ema_force_cpu else None)
    optimizer = _optimizer(cfg, model)
    fp16 = cfg.amp and cfg.amp_dtype == "float16"
    criterion, mixup = _criterion(cfg, data.num_classes)
    wrapped = model
    if world > 1:
        wrapped = nn.parallel.DistributedDataParallel(sync_batchnorm(model),
                                                      device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        wrapped = cast(nn.Module, torch.compile(wrapped, mode=cfg.torchcompile_mode))  # an OptimizedModule
    return TrainingRun(
        cfg=cfg, device=device, rank=rank, world=world, data=data, model=wrapped, core=model, optimizer=optimizer,
        scheduler=_scheduler(cfg, optimizer, updates_per_epoch), ema=ema,
        scaler=torch.amp.GradScaler(device.type) if fp16 else None, criterion=criterion, mixup=mixup,
        reg=make_regulariser(cfg, criterion, model, seed + rank), augment=train_augment(cfg, data.input_size),
        train_loader=_loader(data.train, cfg.batch_size, True, seed, rank, world, cfg.workers, drop_last=True,
                             pin_memory=cfg.pin_mem),
        test_loader=_loader(data.test, cfg.validation_batch_size or max(cfg.batch_size, 256), False, seed, rank,
                            world, cfg.workers, drop_last=False, pin_memory=cfg.pin_mem),
        updates_per_epoch=updates_per_epoch)


def _check_runtime(cfg: TrainConfig, device: torch.device, world: int) -> None:
    if cfg.amp and cfg.amp_dtype == "float16" and device.type == "cpu":
        raise UserError("--amp-dtype float16 needs a GPU: float16 autocast on CPU is emulated (many times slower) "
                        "and loses accuracy; use --amp-dtype bfloat16 (the default)")
    if world > 1 and cfg.reg in ("gradreg", "lcnn_gradreg") and cfg.gradreg == "exact":
        raise UserError("exact GradReg (double backward) is not supported with DDP: use --gradreg fd")
    if cfg.compile and cfg.reg in ("gradreg", "lcnn_gradreg") and cfg.gradreg == "exact":
        raise UserError("--compile with exact GradReg: torch.compile cannot compile double backward; use --gradreg fd "
                        "(two ordinary passes, compiled)")


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------
def _checkpoint(run: TrainingRun, epoch: int) -> Dict[str, Any]:
    return {
        "epoch": epoch, "arch": run.cfg.model, "num_classes": run.data.num_classes,
        "input_size": list(run.data.input_size), "classes": run.data.classes,
        "state_dict": run.core.state_dict(), "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict() if run.scheduler is not None else None,
        "state_dict_ema": run.ema.module.state_dict() if run.ema is not None else None,
        "scaler": run.scaler.state_dict() if run.scaler is not None else None,
        "rng": rng_state(), "history": run.history, "best": run.best,
        "config": run.cfg.to_dict(),
    }


def _epoch_message(cfg: TrainConfig, epoch: int, train_m: Dict[str, float], eval_m: Dict[str, float]) -> str:
    return (f"epoch {epoch + 1}/{cfg.epochs}  loss {train_m['loss']:.4f}  train {train_m['top1']:.2f}%"
            + (f"  test {eval_m['top1']:.2f}%" if eval_m else "")
            + (f"  Σβ {train_m['sum_beta']:.3g}  Σlogγ {train_m['sum_log_gamma']:.3g}" if "sum_beta" in train_m else "")
            + (f"  ‖∇ₓℓ‖² {train_m['grad_sq']:.3g}" if "grad_sq" in train_m else "")
            + f"  {train_m['epoch_time_s']:.0f}s")


def batches_seen_by_batchnorm(model: nn.Module) -> Optional[int]:
    """The fewest batches any BatchNorm of ``model`` has recorded statistics from (its
    ``num_batches_tracked``, which a pretrained state dict carries), or None without BatchNorms."""
    counts = [int(n) for n in (getattr(m, "num_batches_tracked", None) for m in model.modules())
              if isinstance(n, torch.Tensor)]
    return min(counts) if counts else None


def _recalibrate_if_short(run: TrainingRun) -> None:
    """Recompute BatchNorm statistics when they have seen fewer than ~100 batches in all (a short run
    from scratch: its running variance still carries the initial 1). Not after fine-tuning a model
    whose statistics come from its pretraining: in an LCNN they also set the γ-clip its weights were
    trained with, and recomputing them from a few batches can undo a fine-tune (docs/reliability.md,
    case 10)."""
    seen, train_loader = batches_seen_by_batchnorm(run.core), run.train_loader
    if seen is None or seen >= RECALIBRATE_BELOW_STEPS:
        return
    generator = getattr(train_loader.sampler, "generator", None)
    if isinstance(generator, torch.Generator):
        generator.manual_seed(run.cfg.seed)  # the same batches in a resumed run
    batches = (x.to(run.device) for _, (x, _) in zip(range(RECALIBRATE_BATCHES), train_loader))
    n = recalibrate_batchnorm(run.core, batches)
    if run.is_main:
        print(f"recalibrated BatchNorm statistics on {n} training batches: they had seen {seen} batches, fewer than "
              f"the ~{RECALIBRATE_BELOW_STEPS} their running statistics need at momentum 0.1", file=sys.stderr)


def _epochs(run: TrainingRun, folder: RunFolder, start: int) -> Dict[str, float]:
    """Epochs ``start`` … ``cfg.epochs - 1``, a checkpoint and summary after each; returns the last
    evaluation (empty when none ran)."""
    cfg, train_loader, test_loader = run.cfg, run.train_loader, run.test_loader
    eval_m: Dict[str, float] = {}
    for epoch in range(start, cfg.epochs):
        if run.world > 1:
            cast(DistributedSampler, train_loader.sampler).set_epoch(epoch)
        else:
            cast(RandomSampler, train_loader.sampler).generator.manual_seed(cfg.seed * 1000 + epoch)
        if run.mixup is not None and cfg.mixup_off_epoch and epoch >= cfg.mixup_off_epoch:
            run.mixup.mixup_enabled = False  # timm's --mixup-off-epoch
        train_m = train_one_epoch(run, epoch)
        if run.scheduler is not None:
            run.scheduler.step(epoch + 1)
        last = epoch + 1 == cfg.epochs
        if last:
            # One power iteration a step tracks σ only approximately (after high-lr steps a layer can
            # exceed 1 by more than the stated tolerance): the final weights get their singular
            # vectors converged to the tolerance stated after conversion, before they are measured
            # and saved.
            converge_spectral_norms(run.core, n_iter=200, tol=CONVERGENCE_TOL)
            _recalibrate_if_short(run)
        evaluated = cfg.eval_every > 0 and (last or (epoch + 1) % cfg.eval_every == 0)
        if evaluated:
            eval_m = _all_reduce_eval(evaluate(run.core, test_loader, run.device, cfg.channels_last, run.amp),
                                      run.world, run.device)
            if run.ema is not None:
                converge_spectral_norms(run.ema.module, n_iter=10)  # averaged u, v are not singular vectors
                ema_m = evaluate(run.ema.module, test_loader, run.device, cfg.channels_last, run.amp)
                eval_m.update({f"ema_{k}": v for k, v in _all_reduce_eval(ema_m, run.world, run.device).items()})
        lr = train_m.pop("lr")
        row = {"epoch": epoch + 1, **{f"train_{k}": v for k, v in train_m.items()},
               **({f"eval_{k}": v for k, v in eval_m.items()} if evaluated else {}), "lr": lr}
        run.history.append(row)
        if run.is_main:
            if evaluated and eval_m["top1"] > run.best.get("eval_top1", -1.0):
                folder.save_weights(run.core.state_dict(), RunFolder.BEST)
                run.best = {"epoch": epoch + 1, "eval_top1": eval_m["top1"]}
            folder.save_checkpoint(_checkpoint(run, epoch + 1))
            folder.write_summary(_summary(run, folder, eval_m, final=False))
            print(_epoch_message(cfg, epoch, train_m, eval_m if evaluated else {}), file=sys.stderr)
    return eval_m


def _summary(run: TrainingRun, folder: RunFolder, eval_m: Dict[str, float], final: bool,
             wall: float = 0.0) -> Dict[str, Any]:
    cfg = run.cfg
    out = {"run_dir": str(folder.path), "model": cfg.model, "dataset": cfg.dataset, "reg": cfg.reg,
           "epochs": cfg.epochs, "num_classes": run.data.num_classes, "classes": run.data.classes,
           "input_size": list(run.data.input_size),
           "final": eval_m, "best": run.best, "finished": final, "history": run.history}
    if final:
        out["wall_time_s"] = wall
    if cfg.eval_on_train:
        out["note"] = "evaluated on the training images (--eval-on-train): the accuracy is not a test accuracy"
    return out


def train(cfg: TrainConfig) -> Dict[str, Any]:
    """Run a training job; returns the summary (also written to <run>/summary.json).

    Everything is checked first (:func:`~lcnn_zoo.commands.preflight.train_plan`); then the data is read and
    the model built; only then is the run folder created (a new one, never another run's: see
    :mod:`lcnn_zoo.commands.writing`) and locked."""
    plan = train_plan(cfg)
    _check_runtime(cfg, plan.device, plan.dist.world)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    data = _datasets(cfg, plan.data)  # user errors surface before any training
    n_train = len(cast(Sized, data.train))
    if n_train < cfg.batch_size * plan.dist.world:
        raise UserError(f"the training set ({n_train} images) is smaller than one batch of {cfg.batch_size} "
                        f"per process")
    rank, world = _init_distributed(plan.device, cfg.dist_timeout, plan.dist)
    try:
        torch.manual_seed(cfg.seed + rank)
        np.random.seed((cfg.seed + rank) % 2**32)  # NumPy's legacy seeding takes 32 bits (--seed < 2**32)
        random.seed(cfg.seed + rank)
        run = build_run(cfg, data, plan.device, rank, world)
        folder = plan.claim() if run.is_main else plan.folder
        with folder.lock() if run.is_main else nullcontext():
            if run.is_main and plan.new and folder.path.name != cfg.run_name:
                print(f"{Path(cfg.output) / cfg.run_name} holds another run: this run is {folder.path} "
                      f"(--if-exists refuse stops instead)", file=sys.stderr)
            try:
                return _train_in(run, plan, folder)
            except KeyboardInterrupt:
                # quoted as a shell reads them, so the line can be pasted whatever the path holds
                raise Interrupted(f"every file in {folder.path} is whole; continue with the same command and "
                                  f"--output {shlex.quote(str(folder.path.parent))} --experiment "
                                  f"{shlex.quote(folder.path.name)} --resume auto") from None
    finally:
        if world > 1:
            dist.barrier()
            dist.destroy_process_group()


def _train_in(run: TrainingRun, plan: TrainPlan, folder: RunFolder) -> Dict[str, Any]:
    cfg = run.cfg
    start = 0
    if plan.checkpoint is not None:
        assert plan.resume_from is not None  # (the file the checkpoint was read from)
        start = resume(run, plan.checkpoint, plan.resume_from)
    if start >= cfg.epochs and folder.file(RunFolder.SUMMARY).is_file() and folder.file(RunFolder.WEIGHTS).is_file():
        summary = folder.summary()
        if summary.get("finished", True):  # a finished run: its summary and weights stay as they are
            if run.is_main:
                print(f"{folder.path} is already trained for {start}/{cfg.epochs} epochs: nothing to do "
                      f"(raise --epochs to train on)", file=sys.stderr)
            return summary
    if run.is_main:
        folder.clean_stale_temporaries()
        args = cfg.to_dict()
        if start:
            args["resumed_at_epoch"] = start
        initial = plan.initial_state
        if initial is not None and not initial.finished:  # --allow-unfinished: which epoch it started from
            args["initial_checkpoint_run"] = {"epoch": initial.epoch, "epochs": initial.epochs,
                                              "status": initial.status}
            print(f"--initial-checkpoint {cfg.initial_checkpoint}: from a run {initial.describe()} "
                  f"(--allow-unfinished; recorded in args.json)", file=sys.stderr)
        folder.write_args(args)
        print(startup_summary(run, folder, start), file=sys.stderr, flush=True)
    t0 = time.time()
    eval_m = _epochs(run, folder, start)
    if not eval_m and run.history:
        eval_m = {k.removeprefix("eval_"): v for k, v in run.history[-1].items() if k.startswith("eval_")}
    summary = _summary(run, folder, eval_m, final=True, wall=time.time() - t0)
    if run.is_main:
        folder.save_weights(run.core.state_dict())
        folder.write_summary(summary)
    return summary


def startup_summary(run: TrainingRun, folder: RunFolder, start: int) -> str:
    """What a run is about to do, in a few lines (printed before its first step): the run folder's whole
    path, the data, the model and what makes it an LCNN, the optimizer and schedule, the regulariser,
    and where and how it computes."""
    cfg, data = run.cfg, run.data
    n_params = sum(p.numel() for p in run.core.parameters())
    report = getattr(run.core, "lcnn_report", None)
    kind = (f"LCNN ({report.verdict})" if report is not None else "not an LCNN (no curvature bound)")
    steps = len(run.train_loader)
    reg = cfg.reg + (f" (λβ {cfg.lambda_beta:g}, λγ {cfg.lambda_gamma:g})"
                     if cfg.reg in ("lcnn", "lcnn_gradreg") else "")
    if cfg.reg in ("gradreg", "lcnn_gradreg"):
        reg += f", GradReg {cfg.gradreg} λ {cfg.lambda_grad:g}"
    lines = [
        f"lcnn-zoo train: {'resuming at epoch ' + str(start) + ' in' if start else 'run folder'} "
        f"{Path(folder.path).resolve()}",
        f"  data: {cfg.dataset or 'image folder'}, {len(cast(Sized, data.train))} training / "
        f"{len(cast(Sized, data.test))} test images, {data.num_classes} classes, "
        f"input {'×'.join(map(str, data.input_size))}",
        f"  model: {cfg.model}, {n_params / 1e6:.2f} M parameters, {kind}",
        f"  optimizer: {cfg.opt}, lr {cfg.lr:g}, weight decay {cfg.weight_decay:g} (none on β, γ); "
        f"schedule: {cfg.sched}"
        f" over {cfg.epochs} epochs" + (f", {cfg.warmup_epochs} warm-up" if cfg.warmup_epochs else ""),
        f"  regulariser: {reg}",
        f"  {run.device.type}{'' if run.world == 1 else f' × {run.world} processes'}, batch {cfg.batch_size}, "
        f"{steps} steps per epoch; AMP {cfg.amp_dtype if cfg.amp else 'off'}; "
        f"compile {'on' if cfg.compile else 'off'}; "
        f"a line every {cfg.log_interval} steps off a terminal",
    ]
    return "\n".join(lines)
