"""Training: timm's training-loop pieces with the LCNN penalty and GradReg in the loss.

The structure follows timm's ``train.py`` (argparse + YAML config, ``create_optimizer_v2``,
``create_scheduler_v2``, ``ModelEmaV3``, ``Mixup``, ``AverageMeter``, ``update_summary``), with:

* ``--reg none|lcnn|gradreg|lcnn_gradreg`` — the LCNN penalty (eq. 5) and/or gradient-norm
  regularisation (``--gradreg exact`` double backprop, or ``fd`` two passes, no double backward);
* β and γ never weight-decayed;
* checkpoints every epoch, written atomically, read back with ``torch.load(weights_only=True)``;
  ``--resume`` restores model, optimizer, scheduler, EMA, AMP scaler, RNG states and epoch, so a
  killed run resumed ends with the same weights as an uninterrupted one;
* DDP via ``torchrun`` (gloo on CPU, nccl on GPU), with synchronised BatchNorm statistics.

Run ``python -m lcnn_zoo.train --help`` (same as ``lcnn-zoo train``).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from timm.utils import ParseKwargs
from torch import nn

from .layers import converge_spectral_norms, sync_batchnorm
from .penalty import LCNNPenalty, gradreg_exact, gradreg_fd_backward, param_groups

__all__ = ["get_parser", "parse_args", "train", "save_checkpoint", "load_checkpoint", "main"]

REGS = ("none", "lcnn", "gradreg", "lcnn_gradreg")


# --------------------------------------------------------------------------------------------
# Arguments (CLI and YAML share the keys; the CLI overrides the config)
# --------------------------------------------------------------------------------------------
def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lcnn-zoo train", description="Train an lcnn-zoo / timm model",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", default="", help="YAML file with the same keys as these options")
    g = p.add_argument_group("model")
    g.add_argument("--model", default="lcnn_resnet20", help="timm model name (lcnn_* or any timm CNN)")
    g.add_argument("--pretrained", action="store_true", help="start from pretrained weights (fine-tuning)")
    g.add_argument("--initial-checkpoint", default="",
                   help="start from these weights (.safetensors / run folder / .pth); a head or stem of another "
                        "shape is re-initialised (fine-tuning on a new dataset)")
    g.add_argument("--lcnnify", action="store_true", help="convert a non-lcnn timm model with lcnnify first")
    g.add_argument("--num-classes", type=int, default=None, help="default: the dataset's")
    g.add_argument("--in-chans", type=int, default=None, help="default: the dataset's")
    g.add_argument("--input-size", type=int, nargs=3, default=None, metavar=("C", "H", "W"),
                   help="input size the model is built for (default: the dataset's image size)")
    g.add_argument("--drop-rate", type=float, default=0.0)
    g.add_argument("--model-kwargs", nargs="*", default={}, action=ParseKwargs, metavar="KEY=VALUE",
                   help="extra keyword arguments for timm.create_model, e.g. logit_scale=4 (as timm's train.py)")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="fmnist", help="cifar10 | cifar100 | fmnist | folder:<path> | hf:<name>")
    g.add_argument("--data-dir", default=None, help="where the dataset lives")
    g.add_argument("--download", action="store_true", help="let torchvision download CIFAR / Fashion-MNIST")
    g.add_argument("--train-subset", type=int, default=0, help="train on a fixed random subset of this size")
    g.add_argument("--test-subset", type=int, default=0, help="evaluate on a fixed random subset of this size")
    g.add_argument("--aug-pad", type=int, default=4, help="pad-and-random-crop padding in pixels (0: none)")
    g.add_argument("--no-flip", action="store_true", help="disable random horizontal flips")
    g.add_argument("--mixup", type=float, default=0.0, help="timm Mixup alpha (0: off)")
    g.add_argument("--cutmix", type=float, default=0.0, help="timm CutMix alpha (0: off)")
    g.add_argument("--smoothing", type=float, default=0.0, help="label smoothing")
    g.add_argument("--workers", type=int, default=0, help="DataLoader workers")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=200)
    g.add_argument("--batch-size", type=int, default=128, help="per process")
    g.add_argument("--opt", default="sgd", help="timm optimizer name")
    g.add_argument("--lr", type=float, default=0.1)
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--weight-decay", type=float, default=5e-4)
    g.add_argument("--sched", default="multistep", help="timm scheduler: multistep | cosine | step | none")
    g.add_argument("--decay-milestones", type=int, nargs="+", default=[150, 175])
    g.add_argument("--decay-rate", type=float, default=0.1)
    g.add_argument("--warmup-epochs", type=int, default=0)
    g.add_argument("--model-ema", action="store_true", help="keep a ModelEmaV3 copy (evaluated too)")
    g.add_argument("--model-ema-decay", type=float, default=0.999)
    g = p.add_argument_group("regularisation (paper eq. 5 and §5)")
    g.add_argument("--reg", default="lcnn", choices=REGS)
    g.add_argument("--lambda-beta", type=float, default=1e-3, help="weight on Σβ (eq. 5; the reference code's value)")
    g.add_argument("--lambda-gamma", type=float, default=1e-3, help="weight on Σ log γ (eq. 5; the reference code's value)")
    g.add_argument("--lambda-grad", type=float, default=6e-3,
                   help="GradReg weight on mean ‖∇ₓℓᵢ‖² (reference λ=1e-3 at B=128 ↔ 6.1e-3)")
    g.add_argument("--gradreg", default="fd", choices=("exact", "fd"), help="double backprop or finite difference")
    g.add_argument("--fd-step", type=float, default=1e-2, help="FD GradReg RMS per-sample step (input units)")
    g = p.add_argument_group("runtime")
    g.add_argument("--amp", action="store_true", help="autocast mixed precision")
    g.add_argument("--amp-dtype", default="bfloat16", choices=("bfloat16", "float16"))
    g.add_argument("--channels-last", action="store_true")
    g.add_argument("--device", default=None, help="cpu | cuda (default: cuda if available)")
    g.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave)")
    g.add_argument("--seed", type=int, default=42)
    g.add_argument("--output", default="runs", help="parent folder of run folders")
    g.add_argument("--experiment", default="", help="run folder name (default: <model>-<dataset>-<reg>)")
    g.add_argument("--resume", default="", help="checkpoint to resume, or 'auto' for <run>/last.pth")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g.add_argument("--eval-every", type=int, default=1, help="evaluate every N epochs (and the last)")
    return p


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """CLI over YAML config over defaults (like timm's train.py)."""
    parser = get_parser()
    known, _ = parser.parse_known_args(argv)
    if known.config:
        import yaml

        path = Path(known.config)
        if not path.is_file():
            parser.error(f"config file not found: {path}")
        cfg = yaml.safe_load(path.read_text()) or {}
        if not isinstance(cfg, dict):
            parser.error(f"{path}: expected a mapping of option: value")
        dests = {a.dest for a in parser._actions}
        normalised = {k.replace("-", "_"): v for k, v in cfg.items()}
        unknown = sorted(set(normalised) - dests)
        if unknown:
            parser.error(f"{path}: unknown keys {unknown}")
        parser.set_defaults(**normalised)
    args = parser.parse_args(argv)
    _validate(parser, args)
    return args


def _validate(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.epochs <= 0 or args.batch_size <= 0:
        parser.error("--epochs and --batch-size must be positive")
    if args.reg not in REGS:
        parser.error(f"--reg must be one of {REGS}")
    for name in ("lambda_beta", "lambda_gamma", "lambda_grad", "lr", "weight_decay"):
        if getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must be >= 0")
    if not isinstance(args.model_kwargs, dict):
        parser.error(f"model_kwargs must be a mapping of name: value, got {args.model_kwargs!r}")
    reserved = sorted(set(args.model_kwargs) & {"num_classes", "in_chans", "pretrained", "pretrained_cfg_overlay"})
    if reserved:
        parser.error(f"--model-kwargs: set {reserved} with their own options (--num-classes, --in-chans, "
                     f"--pretrained, --input-size)")


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------
def _rng_state() -> Dict[str, Any]:
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                       int(np_state[3]), float(np_state[4])]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, payload: Dict[str, Any]) -> None:
    """Write ``payload`` with torch.save to a temp file in the same folder, then rename (atomic)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def load_checkpoint(path: Path) -> Dict[str, Any]:
    """Read a training checkpoint without unpickling arbitrary objects (weights_only=True)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"cannot read checkpoint {path} (corrupted, or not an lcnn-zoo checkpoint): {e}") from e
    for key in ("state_dict", "optimizer", "epoch"):
        if key not in ckpt:
            raise ValueError(f"{path} is not an lcnn-zoo training checkpoint (missing '{key}')")
    return ckpt


# --------------------------------------------------------------------------------------------
# Distributed helpers
# --------------------------------------------------------------------------------------------
def _init_distributed(device: torch.device) -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch.distributed as dist

    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend)
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return dist.get_rank(), dist.get_world_size()


def _all_reduce_eval(m: Dict[str, float], world: int, device: torch.device) -> Dict[str, float]:
    """Combine per-process evaluation results (top1 %, mean loss, count) into global ones."""
    if world <= 1:
        return m
    sums = _all_reduce_mean({"correct": m["top1"] * m["count"] / 100.0, "loss_sum": m["loss"] * m["count"],
                             "count": m["count"]}, world, device)
    n = sums["count"] * world
    return {"top1": 100.0 * sums["correct"] * world / max(n, 1), "loss": sums["loss_sum"] * world / max(n, 1),
            "count": n}


def _all_reduce_mean(values: Dict[str, float], world: int, device: torch.device) -> Dict[str, float]:
    if world <= 1:
        return values
    import torch.distributed as dist

    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return {k: float(v) / world for k, v in zip(keys, t.tolist())}


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------
def _build_model(args: argparse.Namespace, num_classes: int, input_size: tuple) -> nn.Module:
    import timm

    from .conversion import lcnnify

    kwargs: Dict[str, Any] = dict(num_classes=num_classes, in_chans=input_size[0], drop_rate=args.drop_rate)
    kwargs.update(args.model_kwargs)
    name = args.model
    if name.split(".")[0].startswith("lcnn_"):
        kwargs["pretrained_cfg_overlay"] = dict(input_size=tuple(input_size))
    model = timm.create_model(name, pretrained=args.pretrained, **kwargs)
    if args.lcnnify and getattr(model, "lcnn_report", None) is None:
        lcnnify(model, input_size=tuple(input_size))
    if args.initial_checkpoint:
        # A logit_scale asked for explicitly is the new run's recipe: the checkpoint's does not replace it.
        _load_initial(model, args.initial_checkpoint, keep=("logit_scale",) if "logit_scale" in args.model_kwargs else ())
    if args.reg in ("lcnn", "lcnn_gradreg") and getattr(model, "lcnn_report", None) is None:
        raise SystemExit(f"--reg {args.reg} needs an LCNN: use an lcnn_* model (not _softplus/_relu) or --lcnnify")
    return model


def _load_initial(model: nn.Module, path: str, keep: Sequence[str] = ()) -> None:
    """Load matching tensors of a checkpoint; keys whose shape differs (new head, new stem) are skipped,
    and so are the ``keep`` keys (the model's own values stay)."""
    from .cli import load_checkpoint_state_dict

    p = Path(path)
    if p.is_dir():
        p = p / "model.safetensors"
    state = load_checkpoint_state_dict(p)
    own = model.state_dict()
    unknown = sorted(set(state) - set(own))
    if unknown:
        raise SystemExit(f"{p} does not fit {type(model).__name__}: unexpected keys {unknown[:5]}...")
    skipped = sorted(k for k, v in state.items() if own[k].shape != v.shape)
    model.load_state_dict({k: v for k, v in state.items() if k not in skipped and k not in keep}, strict=False)
    if skipped:
        print(f"initial checkpoint {p}: re-initialised {', '.join(skipped)} (shape differs)", file=sys.stderr)


def _loader(ds, batch_size: int, shuffle: bool, seed: int, rank: int, world: int, workers: int,
            drop_last: bool) -> torch.utils.data.DataLoader:
    from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, SequentialSampler

    if world > 1:
        sampler = DistributedSampler(ds, num_replicas=world, rank=rank, shuffle=shuffle, seed=seed,
                                     drop_last=drop_last)
    elif shuffle:
        sampler = RandomSampler(ds, generator=torch.Generator().manual_seed(seed))
    else:
        sampler = SequentialSampler(ds)
    return DataLoader(ds, batch_size=batch_size, sampler=sampler, num_workers=workers, drop_last=drop_last)


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, channels_last: bool = False,
             amp_ctx=nullcontext) -> Dict[str, float]:
    """Top-1 accuracy (%) and mean cross-entropy of ``model`` on ``loader`` (eval mode)."""
    was = model.training
    model.eval()
    correct, total, loss_sum = 0, 0, 0.0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with amp_ctx():
            logits = model(x)
        loss_sum += float(F.cross_entropy(logits.float(), y, reduction="sum"))
        correct += int((logits.argmax(1) == y).sum())
        total += y.numel()
    model.train(was)
    return {"top1": 100.0 * correct / max(total, 1), "loss": loss_sum / max(total, 1), "count": float(total)}


def train(args: argparse.Namespace) -> Dict[str, Any]:
    """Run a training job; returns the summary (also written to <run>/summary.json)."""
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2
    from timm.utils import AverageMeter, ModelEmaV3, update_summary
    from tqdm import tqdm

    from .data import BatchAugment, build_dataset, num_classes_of

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.threads:
        torch.set_num_threads(args.threads)
    rank, world = _init_distributed(device)
    is_main = rank == 0
    torch.manual_seed(args.seed + rank)
    random.seed(args.seed + rank)
    np.random.seed(args.seed + rank)

    # ---- data ----
    train_ds = build_dataset(args.dataset, train=True, data_dir=args.data_dir, download=args.download,
                             image_size=tuple(args.input_size[1:]) if args.input_size else None,
                             channels=args.input_size[0] if args.input_size else 3)
    test_ds = build_dataset(args.dataset, train=False, data_dir=args.data_dir, download=args.download,
                            image_size=tuple(args.input_size[1:]) if args.input_size else None,
                            channels=args.input_size[0] if args.input_size else 3)
    if args.train_subset:
        if not hasattr(train_ds, "subset"):
            raise SystemExit("--train-subset needs an in-memory dataset (cifar10/cifar100/fmnist)")
        train_ds = train_ds.subset(args.train_subset, seed=args.seed)
    if args.test_subset:
        if not hasattr(test_ds, "subset"):
            raise SystemExit("--test-subset needs an in-memory dataset (cifar10/cifar100/fmnist)")
        test_ds = test_ds.subset(args.test_subset, seed=args.seed)
    sample = train_ds[0][0]
    input_size = tuple(args.input_size) if args.input_size else tuple(sample.shape)
    num_classes = args.num_classes or num_classes_of(train_ds)

    # ---- model ----
    model = _build_model(args, num_classes, input_size).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    ema = ModelEmaV3(model, decay=args.model_ema_decay, exclude_buffers=False) if args.model_ema else None

    groups = param_groups(model, args.weight_decay)
    optimizer = create_optimizer_v2(groups, opt=args.opt, lr=args.lr, weight_decay=args.weight_decay,
                                    momentum=args.momentum)
    scheduler = None
    if args.sched != "none":
        scheduler, _ = create_scheduler_v2(optimizer, sched=args.sched, num_epochs=args.epochs,
                                           decay_milestones=args.decay_milestones, decay_rate=args.decay_rate,
                                           warmup_epochs=args.warmup_epochs, warmup_lr=args.lr * 0.1)
    use_amp = args.amp
    amp_dtype = torch.float16 if args.amp_dtype == "float16" else torch.bfloat16
    scaler = torch.amp.GradScaler(device.type) if use_amp and amp_dtype == torch.float16 else None

    def amp_ctx():
        return torch.autocast(device.type, dtype=amp_dtype) if use_amp else nullcontext()

    # ---- run folder / resume ----
    run_name = args.experiment or f"{args.model}-{args.dataset.replace(':', '_').replace('/', '_')}-{args.reg}"
    run_dir = Path(args.output) / run_name
    start_epoch = 0
    resumed_history: List[Dict[str, Any]] = []
    if args.resume:
        ckpt_path = run_dir / "last.pth" if args.resume == "auto" else Path(args.resume)
        if args.resume == "auto" and not ckpt_path.is_file():
            ckpt_path = None
        if ckpt_path is not None:
            ckpt = load_checkpoint(ckpt_path)
            if ckpt.get("arch") not in (None, args.model):
                raise SystemExit(f"{ckpt_path} is a checkpoint of {ckpt.get('arch')}, not {args.model}")
            model.load_state_dict(ckpt["state_dict"])
            optimizer.load_state_dict(ckpt["optimizer"])
            if scheduler is not None and ckpt.get("scheduler") is not None:
                scheduler.load_state_dict(ckpt["scheduler"])
            if ema is not None and ckpt.get("state_dict_ema") is not None:
                ema.module.load_state_dict(ckpt["state_dict_ema"])
            if scaler is not None and ckpt.get("scaler") is not None:
                scaler.load_state_dict(ckpt["scaler"])
            start_epoch = int(ckpt["epoch"])
            if ckpt.get("rng") and world == 1:
                _set_rng_state(ckpt["rng"])
            resumed_history = list(ckpt.get("history") or [])
            if is_main:
                print(f"resumed {ckpt_path} at epoch {start_epoch}", file=sys.stderr)
            done = run_dir / "summary.json"
            if start_epoch >= args.epochs and done.is_file() and (run_dir / "model.safetensors").is_file():
                # A finished run: keep its summary and weights as they are (re-running a pipeline is safe).
                if is_main:
                    print(f"{run_dir} is already trained for {start_epoch}/{args.epochs} epochs: nothing to do "
                          f"(raise --epochs to train on)", file=sys.stderr)
                if world > 1:
                    import torch.distributed as dist

                    dist.barrier()
                    dist.destroy_process_group()
                return json.loads(done.read_text())

    if world > 1:
        model = sync_batchnorm(model)
        if args.reg in ("gradreg", "lcnn_gradreg") and args.gradreg == "exact":
            raise SystemExit("exact GradReg (double backward) is not supported with DDP: use --gradreg fd")
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    core = model.module if world > 1 else model

    train_loader = _loader(train_ds, args.batch_size, True, args.seed, rank, world, args.workers, drop_last=True)
    # DistributedSampler pads the test set to a multiple of the world size (a few images count twice)
    test_loader = _loader(test_ds, max(args.batch_size, 256), False, args.seed, rank, world, args.workers,
                          drop_last=False)
    if len(train_loader) == 0:
        raise SystemExit(f"the training set ({len(train_ds)} samples) is smaller than one batch of {args.batch_size}")
    augment = BatchAugment(pad=args.aug_pad, flip=not args.no_flip)
    mixup = None
    if args.mixup > 0 or args.cutmix > 0:
        mixup = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, label_smoothing=args.smoothing,
                      num_classes=num_classes)
        criterion = SoftTargetCrossEntropy()
    elif args.smoothing > 0:
        criterion = LabelSmoothingCrossEntropy(args.smoothing)
    else:
        criterion = nn.CrossEntropyLoss()
    lcnn_pen = LCNNPenalty(args.lambda_beta, args.lambda_gamma) if args.reg in ("lcnn", "lcnn_gradreg") else None
    use_gradreg = args.reg in ("gradreg", "lcnn_gradreg")

    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "args.json").write_text(json.dumps(vars(args), indent=2, default=str))
    summary_csv = run_dir / "summary.csv"
    history: List[Dict[str, Any]] = resumed_history  # the epochs before a resume, then this process's
    eval_metrics: Dict[str, float] = {}
    t_start = time.time()

    for epoch in range(start_epoch, args.epochs):
        if world > 1:
            train_loader.sampler.set_epoch(epoch)
        else:
            train_loader.sampler.generator.manual_seed(args.seed * 1000 + epoch)
        aug_gen = torch.Generator().manual_seed(args.seed * 7919 + epoch * 104729 + rank)
        model.train()
        meters = {k: AverageMeter() for k in ("loss", "sum_beta", "sum_log_gamma", "grad_sq", "top1")}
        bar = tqdm(train_loader, desc=f"epoch {epoch + 1}/{args.epochs}", leave=False,
                   disable=args.no_progress or not is_main, file=sys.stderr)
        t_epoch = time.time()
        for x, y in bar:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            x = augment(x, aug_gen)
            if mixup is not None:
                x, y_loss = mixup(x, y)
            else:
                y_loss = y
            if args.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            optimizer.zero_grad(set_to_none=True)
            scale = scaler.get_scale() if scaler is not None else None
            scale_t = torch.tensor(scale, device=device) if scale is not None else None
            grad_sq = None
            with amp_ctx():
                if use_gradreg and args.gradreg == "fd":
                    out = gradreg_fd_backward(model, x, y_loss, args.lambda_grad, loss_fn=criterion, step=args.fd_step,
                                              extra_loss=(lambda: lcnn_pen(core)) if lcnn_pen else None,
                                              loss_scale=scale_t)
                    loss, logits, grad_sq = out.loss, out.logits, out.penalty
                else:
                    if use_gradreg:
                        out = gradreg_exact(model, x, y_loss, criterion, loss_scale=scale_t)
                        loss, logits, grad_sq = out.loss, out.logits, out.penalty
                        total = loss + args.lambda_grad * out.penalty
                    else:
                        logits = model(x)
                        loss = criterion(logits, y_loss)
                        total = loss
                    if lcnn_pen is not None:
                        total = total + lcnn_pen(core)
            if not (use_gradreg and args.gradreg == "fd"):
                (scaler.scale(total) if scaler is not None else total).backward()
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            if ema is not None:
                ema.update(core)
            n = x.shape[0]
            meters["loss"].update(float(loss.detach()), n)
            meters["top1"].update(100.0 * float((logits.argmax(1) == y).float().mean()), n)
            if grad_sq is not None:
                meters["grad_sq"].update(float(grad_sq.detach()), n)
            if lcnn_pen is not None:
                with torch.no_grad():
                    terms = LCNNPenalty.terms(core)
                meters["sum_beta"].update(float(terms["sum_beta"]), n)
                meters["sum_log_gamma"].update(float(terms["sum_log_gamma"]), n)
            bar.set_postfix(loss=f"{meters['loss'].avg:.3f}", acc=f"{meters['top1'].avg:.1f}")
        bar.close()
        if not math.isfinite(meters["loss"].avg):
            raise SystemExit(f"training diverged at epoch {epoch + 1} (loss {meters['loss'].avg}); lower --lr")
        if scheduler is not None:
            scheduler.step(epoch + 1)
        train_metrics = {"loss": meters["loss"].avg, "top1": meters["top1"].avg, "epoch_time_s": time.time() - t_epoch}
        for k in ("grad_sq", "sum_beta", "sum_log_gamma"):
            if meters[k].count:
                train_metrics[k] = meters[k].avg
        train_metrics = _all_reduce_mean(train_metrics, world, device)
        last = epoch + 1 == args.epochs
        if last or (epoch + 1) % max(args.eval_every, 1) == 0:
            eval_metrics = _all_reduce_eval(evaluate(core, test_loader, device, args.channels_last, amp_ctx),
                                            world, device)
            if ema is not None:
                converge_spectral_norms(ema.module, n_iter=10)  # averaged u, v are not singular vectors
                ema_metrics = evaluate(ema.module, test_loader, device, args.channels_last, amp_ctx)
                eval_metrics.update({f"ema_{k}": v for k, v in _all_reduce_eval(ema_metrics, world, device).items()})
        lr = optimizer.param_groups[0]["lr"]
        if is_main:
            update_summary(epoch + 1, train_metrics, eval_metrics if eval_metrics else None, str(summary_csv), lr=lr)
            history.append({"epoch": epoch + 1, "lr": lr, **{f"train_{k}": v for k, v in train_metrics.items()},
                            **{f"eval_{k}": v for k, v in eval_metrics.items()}})
            payload = {
                "epoch": epoch + 1, "arch": args.model, "num_classes": num_classes, "input_size": list(input_size),
                "state_dict": core.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
                "state_dict_ema": ema.module.state_dict() if ema is not None else None,
                "scaler": scaler.state_dict() if scaler is not None else None,
                "rng": _rng_state(), "history": history, "metrics": {**train_metrics, **{f"eval_{k}": v for k, v in eval_metrics.items()}},
                "args": {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, list, type(None)))},
            }
            save_checkpoint(run_dir / "last.pth", payload)
            msg = (f"epoch {epoch + 1}/{args.epochs}  loss {train_metrics['loss']:.4f}  train {train_metrics['top1']:.2f}%"
                   + (f"  test {eval_metrics['top1']:.2f}%" if eval_metrics else "")
                   + (f"  Σβ {train_metrics['sum_beta']:.3g}  Σlogγ {train_metrics['sum_log_gamma']:.3g}"
                      if "sum_beta" in train_metrics else "")
                   + (f"  ‖∇ₓℓ‖² {train_metrics['grad_sq']:.3g}" if "grad_sq" in train_metrics else "")
                   + f"  {train_metrics['epoch_time_s']:.0f}s")
            print(msg, file=sys.stderr)

    summary = {"run_dir": str(run_dir), "model": args.model, "dataset": args.dataset, "reg": args.reg,
               "epochs": args.epochs, "num_classes": num_classes, "input_size": list(input_size),
               "wall_time_s": time.time() - t_start, "final": eval_metrics, "history": history}
    if is_main:
        from safetensors.torch import save_file

        weights = {k: v.contiguous() for k, v in core.state_dict().items()}
        tmp = run_dir / ".model.safetensors.tmp"
        save_file(weights, str(tmp))
        os.replace(tmp, run_dir / "model.safetensors")
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    return summary


def main(argv: Optional[List[str]] = None) -> int:
    train(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
