"""What a training or evaluation run is asked to do: :class:`TrainConfig` and :class:`EvalConfig`,
typed and validated once, before any work starts.

The command line and YAML files share the keys (``lcnn-zoo train --lr 0.1`` and ``lr: 0.1``); the
options, their defaults and their help are the fields below, so ``lcnn-zoo train --help`` lists
exactly what a config may hold. This module imports no torch, so ``--help`` answers at once.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

from ..errors import UserError, shown
from .writing import not_regular

__all__ = ["TrainConfig", "EvalConfig", "REGS", "SCHEDULERS", "RESUME_MAY_CHANGE", "load_yaml", "safe_yaml",
           "check_value", "resume_conflicts", "PAPER_EPS", "NOISE_NORMS", "SEED_MAX", "THREADS_MAX"]

REGS = ("none", "lcnn", "gradreg", "lcnn_gradreg")
SCHEDULERS = ("multistep", "cosine", "step", "poly", "tanh", "none")
#: options a resumed run may change; every other one must match the checkpoint's recipe
RESUME_MAY_CHANGE = frozenset({"epochs", "eval_every", "no_progress", "log_interval", "threads", "workers", "resume",
                               "device", "output", "experiment", "data_dir", "download", "dist_timeout", "compile",
                               "config", "if_exists", "pin_mem", "validation_batch_size", "torchcompile_mode",
                               "grad_checkpointing"})
#: the largest --seed: training seeds NumPy too, whose np.random.seed takes 32 bits (torch takes 64)
SEED_MAX = 2**32 - 1
# torch.set_num_threads(100000) does not fail: the first parallel op starts the threads, their stacks
# exhaust memory (a MemoryError while reading the data, then a segmentation fault). More threads than
# 4 × the cores only oversubscribe them; 1024 still leaves room on a small machine.
THREADS_MAX = max(1024, 4 * (os.cpu_count() or 1))
PAPER_EPS = (0.05, 0.1, 0.15, 0.2)
NOISE_NORMS = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)


def _opt(default: Any, help: str, group: str, kind: str, **extra: Any) -> Any:
    """A config field: ``kind`` is how the value is checked and parsed (str, int, float, bool,
    ints, size3, kwargs, choice); ``extra``: ``choices``, ``minimum``, ``maximum``, ``optional``."""
    meta = {"help": help, "group": group, "kind": kind, **extra}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


# Keywords of timm.create_model that are not the model's own: what they do, train does through its
# options, which check the weights and record them in args.json (checkpoint_path would load a file
# unchecked and unrecorded, and into the meta-device model preflight.check_model_options builds).
NOT_MODEL_KWARGS = {
    "checkpoint_path": "is not a model keyword (it loads weights inside timm, unchecked and unrecorded): use "
                       "--initial-checkpoint",
    "pretrained": "is not a model keyword: use --pretrained",
    "pretrained_cfg": "is not a model keyword (it chooses other weights and preprocessing): name the tag "
                      "(--model <architecture>.<tag>) or use --initial-checkpoint",
    "pretrained_cfg_overlay": "is not a model keyword (it chooses other weights and preprocessing): name the tag "
                              "(--model <architecture>.<tag>) or use --initial-checkpoint",
    "features_only": "is not a model keyword for training: it builds a feature extractor without a classifier, "
                     "which train cannot fit to labels",
}


@dataclass
class TrainConfig:
    """Every option of ``lcnn-zoo train`` (see docs/training.md)."""

    config: str = _opt("", "YAML file with the same keys as these options (the command line overrides it)",
                       "config", "str")
    # ---- model
    model: str = _opt("lcnn_resnet20", "timm model name[.tag] (lcnn_* or any timm CNN)", "model", "str")
    pretrained: bool = _opt(False, "start from the tag's pretrained weights (fine-tuning)", "model", "bool")
    initial_checkpoint: str = _opt("", "start from these weights (.safetensors / run folder / .pth); a head or "
                                       "stem of another shape is re-initialised", "model", "str")
    allow_partial: bool = _opt(False, "let --initial-checkpoint cover only part of the model (the rest stays as "
                                      "initialised; timm's strict=False)", "model", "bool")
    allow_unfinished: bool = _opt(False, "let --initial-checkpoint be (a file of) a run that is still training or "
                                         "stopped (its epoch is recorded in args.json)", "model", "bool")
    lcnnify: bool = _opt(False, "convert a non-lcnn timm model with lcnnify first", "model", "bool")
    allow_uncovered: bool = _opt(False, "with --lcnnify: train a model whose curvature bound does not apply (the "
                                        "lcnnify report names what is not covered)", "model", "bool")
    num_classes: Optional[int] = _opt(None, "classes (default: the dataset's)", "model", "int", minimum=1,
                                      optional=True)
    input_size: Optional[List[int]] = _opt(None, "C H W the model is built for (default: the dataset's image "
                                                 "size); images are resized to it", "model", "size3", optional=True)
    in_chans: Optional[int] = _opt(None, "input channels (timm's --in-chans; sets C of --input-size)", "model", "int",
                                   minimum=1, optional=True)
    img_size: Optional[int] = _opt(None, "input height = width (timm's --img-size; sets H, W of --input-size)", "model",
                                   "int", minimum=1, optional=True)
    drop_rate: float = _opt(0.0, "dropout before the classifier (timm's --drop)", "model", "float", minimum=0.0,
                            maximum=0.99)
    drop_path: Optional[float] = _opt(None, "stochastic depth rate (timm's drop_path_rate)", "model", "float",
                                      minimum=0.0, maximum=0.99, optional=True)
    gp: Optional[str] = _opt(None, "global pool type (default: the model's)", "model", "choice",
                             choices=("avg", "max", "avgmax", "catavgmax"), optional=True)
    bn_momentum: Optional[float] = _opt(None, "BatchNorm momentum for every BatchNorm (default: the model's)",
                                        "model", "float", minimum=0.0, maximum=1.0, optional=True)
    bn_eps: Optional[float] = _opt(None, "BatchNorm epsilon for every BatchNorm (default: the model's)", "model",
                                   "float", minimum=0.0, optional=True)
    grad_checkpointing: bool = _opt(False, "gradient checkpointing (the recompute records no statistics twice)",
                                    "model", "bool")
    model_kwargs: Dict[str, Any] = _opt({}, "extra keyword arguments for timm.create_model, e.g. logit_scale=4",
                                        "model", "kwargs")
    # ---- data
    dataset: str = _opt("fmnist", "cifar10 | cifar100 | fmnist | folder:<path> | hf:<name>", "data", "str")
    data_dir: Optional[str] = _opt(None, "where the dataset lives (alone, as in timm: an image folder with a train/ "
                                         "split)", "data", "str", optional=True)
    train_split: Optional[str] = _opt(None, "image folder: the training split's sub-folder (default: train)",
                                      "data", "str", optional=True)
    val_split: Optional[str] = _opt(None, "image folder: the evaluation split's sub-folder (default: val or test)",
                                    "data", "str", optional=True)
    download: bool = _opt(False, "let torchvision download CIFAR / Fashion-MNIST", "data", "bool")
    train_subset: int = _opt(0, "train on a fixed random subset of this size (0: all)", "data", "int", minimum=0)
    test_subset: int = _opt(0, "evaluate on a fixed random subset of this size (0: all)", "data", "int", minimum=0)
    eval_on_train: bool = _opt(False, "for an image folder without a val/ (or test/) split: evaluate on the "
                                      "training images (the report says so)", "data", "bool")
    aug_pad: int = _opt(4, "pad-and-random-crop padding in pixels (0: none)", "data", "int", minimum=0)
    no_flip: bool = _opt(False, "disable random horizontal flips (as --hflip 0)", "data", "bool")
    hflip: float = _opt(0.5, "horizontal flip probability", "data", "float", minimum=0.0, maximum=1.0)
    vflip: float = _opt(0.0, "vertical flip probability", "data", "float", minimum=0.0, maximum=1.0)
    no_aug: bool = _opt(False, "no training augmentation at all (crops, flips, --aa, --reprob)", "data", "bool")
    aa: Optional[str] = _opt(None, "timm AutoAugment / RandAugment / AugMix policy, e.g. rand-m9-mstd0.5, v0, "
                                   "augmix-m5-w4-d2 (per image, after crop and flip)", "data", "str", optional=True)
    reprob: float = _opt(0.0, "timm RandomErasing probability", "data", "float", minimum=0.0, maximum=1.0)
    remode: str = _opt("pixel", "RandomErasing fill: const, rand or pixel", "data", "choice",
                       choices=("const", "rand", "pixel"))
    recount: int = _opt(1, "RandomErasing count", "data", "int", minimum=1)
    mixup: float = _opt(0.0, "timm Mixup alpha (0: off)", "data", "float", minimum=0.0)
    cutmix: float = _opt(0.0, "timm CutMix alpha (0: off)", "data", "float", minimum=0.0)
    cutmix_minmax: Optional[List[float]] = _opt(None, "CutMix min/max area ratio (overrides --cutmix alpha)", "data",
                                                "floats", minimum=0.0, maximum=1.0, optional=True)
    mixup_prob: float = _opt(1.0, "probability of Mixup or CutMix per batch", "data", "float", minimum=0.0,
                             maximum=1.0)
    mixup_switch_prob: float = _opt(0.5, "probability of CutMix instead of Mixup when both are on", "data", "float",
                                    minimum=0.0, maximum=1.0)
    mixup_mode: str = _opt("batch", "how Mixup/CutMix parameters are drawn: batch, pair or elem", "data", "choice",
                           choices=("batch", "pair", "elem"))
    mixup_off_epoch: int = _opt(0, "turn Mixup/CutMix off from this epoch (0: never)", "data", "int", minimum=0)
    smoothing: float = _opt(0.0, "label smoothing", "data", "float", minimum=0.0, maximum=0.99)
    bce_loss: bool = _opt(False, "binary cross-entropy (timm's BinaryCrossEntropy) instead of cross-entropy", "data",
                          "bool")
    bce_sum: bool = _opt(False, "BCE summed over classes", "data", "bool")
    bce_target_thresh: Optional[float] = _opt(None, "BCE: binarise targets at this threshold", "data", "float",
                                              minimum=0.0, maximum=1.0, optional=True)
    bce_pos_weight: Optional[float] = _opt(None, "BCE positive-class weight", "data", "float", minimum=0.0,
                                           optional=True)
    workers: int = _opt(0, "DataLoader workers", "data", "int", minimum=0)
    pin_mem: bool = _opt(False, "pinned DataLoader memory", "data", "bool")
    validation_batch_size: Optional[int] = _opt(None, "evaluation batch size (default: max(--batch-size, 256))",
                                                "data", "int", minimum=1, optional=True)
    # ---- optimisation
    epochs: int = _opt(200, "epochs (a resumed run may raise it: the schedule is rebuilt)", "optimisation", "int",
                       minimum=1)
    batch_size: int = _opt(128, "per process", "optimisation", "int", minimum=1)
    opt: str = _opt("sgd", "timm optimizer name", "optimisation", "str")
    lr: float = _opt(0.1, "learning rate", "optimisation", "float", minimum=0.0)
    opt_eps: Optional[float] = _opt(None, "optimizer epsilon (default: the optimizer's)", "optimisation", "float",
                                    minimum=0.0, optional=True)
    opt_betas: Optional[List[float]] = _opt(None, "optimizer betas (default: the optimizer's)", "optimisation",
                                            "floats", minimum=0.0, maximum=1.0, optional=True)
    opt_kwargs: Dict[str, Any] = _opt({}, "further optimizer keyword arguments", "optimisation", "kwargs")
    momentum: float = _opt(0.9, "momentum", "optimisation", "float", minimum=0.0, maximum=0.999999)
    clip_grad: Optional[float] = _opt(None, "clip gradients at this value (after unscaling; off by default)",
                                      "optimisation", "float", minimum=0.0, optional=True)
    clip_mode: str = _opt("norm", "gradient clipping: norm, value or agc", "optimisation", "choice",
                          choices=("norm", "value", "agc"))
    grad_accum_steps: int = _opt(1, "batches whose gradients are averaged into one optimizer step", "optimisation",
                                 "int", minimum=1)
    weight_decay: float = _opt(5e-4, "weight decay (never on β, γ)", "optimisation", "float", minimum=0.0)
    sched: str = _opt("multistep", "timm scheduler", "optimisation", "choice", choices=SCHEDULERS)
    decay_milestones: List[int] = _opt([150, 175], "multistep: epochs at which the lr decays", "optimisation",
                                       "ints", minimum=1)
    decay_epochs: Optional[float] = _opt(None, "step: epochs between lr decays (default: timm's, 90)",
                                         "optimisation", "float", minimum=0.0, optional=True)
    decay_rate: float = _opt(0.1, "lr decay factor", "optimisation", "float", minimum=0.0)
    min_lr: float = _opt(0.0, "lower lr bound of cyclic schedules (cosine, poly, tanh)", "optimisation", "float",
                         minimum=0.0)
    warmup_epochs: int = _opt(0, "linear warm-up epochs", "optimisation", "int", minimum=0)
    warmup_lr: Optional[float] = _opt(None, "lr at the start of warm-up (default: --lr / 10)", "optimisation",
                                      "float", minimum=0.0, optional=True)
    warmup_prefix: bool = _opt(False, "warm-up epochs come before the schedule instead of inside it",
                               "optimisation", "bool")
    cooldown_epochs: int = _opt(0, "epochs at --min-lr after a cyclic schedule ends", "optimisation", "int",
                                minimum=0)
    sched_on_updates: bool = _opt(False, "step the schedule at every optimizer update, not every epoch",
                                  "optimisation", "bool")
    lr_cycle_mul: float = _opt(1.0, "cyclic schedules: cycle length multiplier", "optimisation", "float",
                               minimum=0.0)
    lr_cycle_decay: float = _opt(0.5, "cyclic schedules: lr multiplier per cycle", "optimisation", "float",
                                 minimum=0.0)
    lr_cycle_limit: int = _opt(1, "cyclic schedules: number of cycles", "optimisation", "int", minimum=1)
    lr_k_decay: float = _opt(1.0, "cosine/poly: k-decay", "optimisation", "float", minimum=0.0)
    lr_noise: Optional[List[float]] = _opt(None, "epoch fraction(s) where lr noise starts (and stops)",
                                           "optimisation", "floats", minimum=0.0, optional=True)
    lr_noise_pct: float = _opt(0.67, "lr noise limit", "optimisation", "float", minimum=0.0)
    lr_noise_std: float = _opt(1.0, "lr noise standard deviation", "optimisation", "float", minimum=0.0)
    model_ema: bool = _opt(False, "keep a ModelEmaV3 copy (evaluated too)", "optimisation", "bool")
    model_ema_decay: float = _opt(0.999, "EMA decay", "optimisation", "float", minimum=0.0, maximum=0.999999)
    model_ema_warmup: bool = _opt(False, "EMA decay warm-up (timm's ModelEmaV3 use_warmup)", "optimisation", "bool")
    model_ema_force_cpu: bool = _opt(False, "keep the EMA copy on the CPU", "optimisation", "bool")
    # ---- regularisation
    reg: str = _opt("lcnn", "none | lcnn | gradreg | lcnn_gradreg", "regularisation (paper eq. 5 and §5)",
                    "choice", choices=REGS)
    lambda_beta: float = _opt(1e-3, "weight on Σβ (eq. 5; the reference code's value)",
                              "regularisation (paper eq. 5 and §5)", "float", minimum=0.0)
    lambda_gamma: float = _opt(1e-3, "weight on Σ log γ (eq. 5; the reference code's value)",
                               "regularisation (paper eq. 5 and §5)", "float", minimum=0.0)
    lambda_grad: float = _opt(6e-3, "GradReg weight on mean ‖∇ₓℓᵢ‖² (reference λ=1e-3 at B=128 ↔ 6.1e-3)",
                              "regularisation (paper eq. 5 and §5)", "float", minimum=0.0)
    gradreg: str = _opt("fd", "exact (double backprop) or fd (finite difference)",
                        "regularisation (paper eq. 5 and §5)", "choice", choices=("exact", "fd"))
    fd_step: float = _opt(1e-2, "FD GradReg RMS per-sample step (input units)",
                          "regularisation (paper eq. 5 and §5)", "float", minimum=1e-12)
    gradreg_fraction: float = _opt(1.0, "FD GradReg on a random fraction of each batch (an unbiased estimate "
                                        "of the per-sample mean; 1: all)", "regularisation (paper eq. 5 and §5)",
                                   "float", minimum=1e-6, maximum=1.0)
    # ---- runtime
    amp: bool = _opt(False, "autocast mixed precision", "runtime", "bool")
    amp_dtype: str = _opt("bfloat16", "autocast dtype (float16 needs a GPU)", "runtime", "choice",
                          choices=("bfloat16", "float16"))
    channels_last: bool = _opt(False, "channels_last memory format", "runtime", "bool")
    compile: bool = _opt(False, "torch.compile the model (timm's --torchcompile)", "runtime", "bool")
    torchcompile_mode: Optional[str] = _opt(None, "torch.compile mode", "runtime", "choice", optional=True,
                                            choices=("default", "reduce-overhead", "max-autotune",
                                                     "max-autotune-no-cudagraphs"))
    device: Optional[str] = _opt(None, "cpu | cuda (default: cuda if available)", "runtime", "str", optional=True)
    threads: int = _opt(0, "torch.set_num_threads (0: leave)", "runtime", "int", minimum=0, maximum=THREADS_MAX)
    seed: int = _opt(42, "random seed", "runtime", "int", minimum=0, maximum=SEED_MAX)
    output: str = _opt("runs", "parent folder of run folders", "runtime", "str")
    experiment: str = _opt("", "run folder name, not a path (default: <model>-<dataset>-<reg>)", "runtime", "str")
    if_exists: str = _opt("suffix", "when the run folder holds another run (without --resume): suffix — train in "
                                    "a new <name>-N folder, as timm's train.py does; refuse — stop with an error",
                          "runtime", "choice", choices=("suffix", "refuse"))
    resume: str = _opt("", "checkpoint to resume, or 'auto' for <run>/last.pth", "runtime", "str")
    no_progress: bool = _opt(False, "no progress bar or log lines within an epoch", "runtime", "bool")
    log_interval: int = _opt(50, "steps between the running loss and top-1 (a progress bar's figures on a "
                                 "terminal, a line otherwise); read from the device only then", "runtime", "int",
                             minimum=1)
    eval_every: int = _opt(1, "evaluate every N epochs (and the last); 0: never (no test accuracy, no "
                               "model_best; for runs measured afterwards by `lcnn-zoo eval`)", "runtime", "int",
                           minimum=0)
    dist_timeout: float = _opt(600.0, "DDP: seconds a collective waits for the other processes before the run "
                                      "fails", "runtime", "float", minimum=1.0)

    # -----------------------------------------------------------------------------------------
    @classmethod
    def options(cls) -> List[dataclasses.Field]:
        """Every option (the dataclass fields, with their kind, range, group and help in ``metadata``)."""
        return list(dataclasses.fields(cls))

    def validate(self, source: str = "") -> "TrainConfig":
        """Check every value's type and range; raise :class:`UserError` naming the option."""
        for f in self.options():
            setattr(self, f.name, check_value(f, getattr(self, f.name), source))
        self.dataset = _timm_dataset(self.dataset, self.data_dir)
        for key in self.model_kwargs:
            if key in NOT_MODEL_KWARGS:
                raise UserError(f"--model-kwargs {key} {NOT_MODEL_KWARGS[key]}")
        reserved = sorted(set(self.model_kwargs) & {"num_classes", "in_chans", "drop_path_rate", "global_pool",
                                                    "img_size"})
        if reserved:
            raise UserError(f"--model-kwargs: set {reserved} with their own options (--num-classes, "
                            f"--input-size, --pretrained, --drop-path, --gp)")
        reserved = sorted(set(self.opt_kwargs) & {"lr", "weight_decay", "momentum", "eps", "betas"})
        if reserved:
            raise UserError(f"--opt-kwargs: set {reserved} with their own options (--lr, --weight-decay, "
                            f"--momentum, --opt-eps, --opt-betas)")
        if self.input_size is not None:
            for name, value, given in (("--in-chans", self.in_chans, self.input_size[0]),
                                       ("--img-size", self.img_size, self.input_size[1])):
                if value is not None and (value != given or (name == "--img-size" and value != self.input_size[2])):
                    raise UserError(f"{name} {value} contradicts --input-size {' '.join(map(str, self.input_size))}")
        if self.decay_milestones != sorted(set(self.decay_milestones)):
            raise UserError(f"--decay-milestones must be increasing epochs, got {shown(self.decay_milestones)}")
        if self.resume not in ("", "auto") and not Path(self.resume).is_file():
            kind = not_regular(self.resume)
            if kind is not None:
                raise UserError(f"--resume {shown(Path(self.resume))} is not a regular file ({kind}): pass a run's "
                                f"last.pth")
            raise UserError(f"--resume {shown(self.resume)}: no such checkpoint (use 'auto' for <run>/last.pth)")
        if self.initial_checkpoint and not Path(self.initial_checkpoint).exists():
            raise UserError(f"--initial-checkpoint {shown(self.initial_checkpoint)}: no such file or folder")
        return self

    @property
    def run_name(self) -> str:
        """The run folder's name: ``--experiment``, else ``<model>-<dataset>-<reg>`` with ``:`` and ``/`` as ``_``."""
        if self.experiment:
            return self.experiment
        plain = [part.replace(":", "_").replace("/", "_") for part in (self.model, self.dataset)]
        return f"{plain[0]}-{plain[1][-120:]}-{self.reg}"

    def to_dict(self) -> Dict[str, Any]:
        """Every option by name (what ``args.json`` records)."""
        return {f.name: getattr(self, f.name) for f in self.options()}

    @classmethod
    def from_dict(cls, values: Dict[str, Any], source: str = "") -> "TrainConfig":
        """A validated config from ``values`` (unknown keys refused, naming ``source``)."""
        known = {f.name for f in cls.options()}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UserError(f"{source or 'config'}: unknown keys {shown(unknown)}")
        return cls(**values).validate(source)


def _timm_dataset(name: str, data_dir: Optional[str]) -> str:
    """timm train.py's --dataset spellings as lcnn-zoo's: ``torch/cifar10`` (torchvision's), ``hfds/<name>``
    (a Hugging Face dataset) and ``""`` with --data-dir (an image folder)."""
    if name.startswith("torch/"):
        from .data import TORCH_DATASETS  # (torch and torchvision: imported only for these names)

        return TORCH_DATASETS.get(name, name)
    if name.startswith("hfds/"):
        return "hf:" + name[len("hfds/"):]
    if name == "":
        if not data_dir:
            raise UserError("--dataset '' (timm's image folder) needs --data-dir")
        return f"folder:{data_dir}"
    return name


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_value(f: dataclasses.Field, value: Any, source: str = "") -> Any:
    """``value`` checked against field ``f``'s kind and range (YAML gives bools and strings as
    they are written, so ``no_flip: "false"`` is an error, not a true value)."""
    meta = f.metadata
    kind = meta["kind"]
    where = f"{source}: " if source else ""
    name = f.name if source else _flag(f.name)  # a YAML key as written there, an option as typed

    def bad(expected: str) -> UserError:
        return UserError(f"{where}{name} must be {expected}, got {shown(value)}")

    if value is None:
        if meta.get("optional"):
            return None
        raise bad("given")
    if kind in ("str", "choice"):
        if not isinstance(value, str):
            raise bad("a string")
        if kind == "choice" and value not in meta["choices"]:
            raise bad(f"one of {', '.join(meta['choices'])}")
        return value
    if kind == "bool":
        if not isinstance(value, bool):
            raise bad("true or false (a YAML boolean, not a string)")
        return value
    if kind in ("int", "float"):
        number = _number(value, kind, bad)
        _check_range(number, meta, bad)
        return number
    if kind in ("ints", "floats"):
        if not isinstance(value, (list, tuple)) or not value:
            raise bad("a list of integers" if kind == "ints" else "a list of numbers")
        out = [_number(v, kind[:-1], bad) for v in value]
        for v in out:
            _check_range(v, meta, bad)
        return out
    if kind == "size3":
        if not isinstance(value, (list, tuple)) or len(value) != 3:
            raise bad("three integers C H W")
        out = [_number(v, "int", bad) for v in value]
        if min(out) <= 0:
            raise bad("three positive integers C H W")
        return out
    if kind == "kwargs":
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise bad("a mapping of name: value")
        return dict(value)
    raise AssertionError(kind)


def _number(value: Any, kind: str, bad) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise bad("a number" if kind == "float" else "an integer")
    if kind == "int":
        if isinstance(value, float) and not value.is_integer():
            raise bad("an integer")
        return int(value)
    if not math.isfinite(value):
        raise bad("a finite number")
    return float(value)


def _check_range(v: float, meta: Mapping[str, Any], bad) -> None:
    lo, hi = meta.get("minimum"), meta.get("maximum")
    if lo is not None and v < lo:
        raise bad(f">= {lo}")
    if hi is not None and v > hi:
        raise bad(f"<= {hi}")


MAX_YAML_ALIASES = 20  # a config needs none; a billion-laughs file needs dozens (9 a level)


def safe_yaml(text: str) -> Any:
    """Parse YAML like ``yaml.safe_load``, with a cap on aliases (``*ref``).

    A config has no use for thousands of aliases, and a billion-laughs file needs them.

    Args:
        text: the YAML document.

    Returns:
        The document's data (``None`` for an empty document).

    Raises:
        yaml.YAMLError: the text is not valid YAML, or holds more than ``MAX_YAML_ALIASES`` aliases.
    """
    import yaml

    class Loader(yaml.SafeLoader):
        aliases = 0

        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                self.aliases += 1
                if self.aliases > MAX_YAML_ALIASES:
                    raise yaml.YAMLError(f"more than {MAX_YAML_ALIASES} aliases (*references)")
            return super().compose_node(parent, index)

    loader = Loader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def load_yaml(path: str | Path) -> Dict[str, Any]:
    """A YAML config as a mapping with ``_`` keys (``lambda-grad`` and ``lambda_grad`` both work)."""
    import yaml

    path = Path(path)
    kind = not_regular(path)
    if kind is not None:  # a FIFO is never opened (it would wait for a writer), a device never read
        raise UserError(f"config file {shown(Path(path))} is not a regular file ({kind}): pass a YAML file")
    if not path.is_file():
        raise UserError(f"config file not found: {shown(Path(path))}")
    try:
        text = path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError) as e:
        raise UserError(f"{shown(Path(path))}: not a readable text file ({e.__class__.__name__})") from e
    try:
        data = safe_yaml(text) or {}
    except yaml.YAMLError as e:
        raise UserError(f"{shown(Path(path))}: not valid YAML ({shown(str(e).splitlines()[0], 120)})") from e
    if not isinstance(data, dict):
        raise UserError(f"{shown(Path(path))}: expected a mapping of option: value")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def resume_conflicts(current: Dict[str, Any], recorded: Dict[str, Any]) -> List[Tuple[str, Any, Any]]:
    """Options a resumed run changes but may not: (name, now, in the checkpoint)."""
    out = []
    for key, now in current.items():
        if key in RESUME_MAY_CHANGE or key not in recorded:
            continue
        then = recorded[key]
        if isinstance(then, (list, tuple)) and isinstance(now, (list, tuple)):
            same = list(then) == list(now)
        else:
            same = then == now
        if not same:
            out.append((key, now, then))
    return out


@dataclass
class EvalConfig:
    """What ``lcnn-zoo eval`` measures and on how many samples (fixed subsets: the first N of each split)."""

    limit: int = _opt(0, "test images for accuracy (0: all)", "measurements", "int", minimum=0)
    geom_samples: int = _opt(256, "images for Tables 1 and 3 (per split)", "measurements", "int", minimum=1)
    pgd_samples: int = _opt(1000, "test images for Table 2", "measurements", "int", minimum=1)
    pgd_steps: int = _opt(10, "PGD steps", "measurements", "int", minimum=1)
    eps: List[float] = _opt(list(PAPER_EPS), "ℓ2 radii (input units)", "measurements", "floats", minimum=0.0)
    noise_samples: int = _opt(64, "images for Figure 2", "measurements", "int", minimum=1)
    noise_norms: List[float] = _opt(list(NOISE_NORMS), "noise norms for Figure 2", "measurements", "floats",
                                    minimum=0.0)
    hvp_iters: int = _opt(10, "Lanczos steps per image", "measurements", "int", minimum=1)
    batch_size: int = _opt(128, "batch size", "measurements", "int", minimum=1)
    seed: int = _opt(0, "seed for the random vectors", "measurements", "int", minimum=0, maximum=SEED_MAX)
    progress: bool = _opt(True, "progress bars", "measurements", "bool")

    def validate(self) -> "EvalConfig":
        """Check every value's type and range; raise :class:`UserError` naming the option."""
        for f in dataclasses.fields(self):
            setattr(self, f.name, check_value(f, getattr(self, f.name)))
        return self
