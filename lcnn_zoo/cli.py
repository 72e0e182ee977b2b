"""The ``lcnn-zoo`` command line: ``quickstart``, ``train``, ``eval``, ``push``.

This module only parses: the options of ``train`` and ``eval`` are the fields of
:class:`~lcnn_zoo.config.TrainConfig` and :class:`~lcnn_zoo.config.EvalConfig`, and each command
hands a validated config to the module that does the work. It imports no torch at module level
(the command modules are imported when a command runs), so ``--help`` answers at once. A mistake the
user can fix (:class:`~lcnn_zoo.errors.UserError`) prints one line and exits with code 2.
"""
from __future__ import annotations

import argparse
import ast
import ctypes
import dataclasses
import importlib
import os
import shlex
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Dict, List, Optional

from . import register_models
from .config import EvalConfig, TrainConfig, check_value, load_yaml
from .errors import UserError, one_line, shown

__all__ = ["main", "train_config", "build_parser"]


class _Parser(argparse.ArgumentParser):
    """argparse with its errors as :class:`UserError`: one line and exit code 2, like every other
    mistake (argparse's own prints the usage too)."""

    def error(self, message: str):  # type: ignore[override]
        raise UserError(f"{self.prog}: {message} (see {self.prog} --help)")


class _KeyValues(argparse.Action):
    """``KEY=VALUE …`` into a dict, values read as Python literals when they are ones — what timm's
    ``ParseKwargs`` does; written here because importing timm would cost ``--help`` seconds."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        out: Dict[str, Any] = {}
        for item in values:
            if "=" not in item:
                parser.error(f"{option_string}: expected KEY=VALUE, got {shown(item)}")
            key, value = item.split("=", 1)
            try:
                out[key] = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                out[key] = value
        setattr(namespace, self.dest, out)


def _add_field(group, f: dataclasses.Field, aliases: tuple = ()) -> None:
    meta, flags = f.metadata, ("--" + f.name.replace("_", "-"), *aliases)
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    kind, help_ = meta["kind"], meta["help"]
    if kind == "bool":
        if default:
            group.add_argument("--no-" + f.name.replace("_", "-"), dest=f.name, action="store_false", help=help_)
        else:
            group.add_argument(*flags, action="store_true", help=help_)
    elif kind == "kwargs":
        group.add_argument(*flags, nargs="*", default=default, action=_KeyValues, metavar="KEY=VALUE", help=help_)
    elif kind in ("ints", "floats"):
        group.add_argument(*flags, nargs="+", type=int if kind == "ints" else float, default=default, help=help_)
    elif kind == "size3":
        group.add_argument(*flags, nargs=3, type=int, default=default, metavar=("C", "H", "W"), help=help_)
    else:
        conv = {"int": int, "float": float}.get(kind, str)
        group.add_argument(*flags, type=conv, default=default, choices=meta.get("choices"), help=help_)


class _TimmRefused(argparse.Action):
    """A timm train.py flag lcnn-zoo train does not take: one line saying why (its values are consumed)."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        from .train_flags import REFUSED
        raise UserError(f"{option_string} (timm train.py's) is not taken by lcnn-zoo train: {REFUSED[option_string]}")


class _TimmNoOp(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None) -> None:
        pass


class _TorchCompile(argparse.Action):
    """timm's ``--torchcompile [BACKEND]``: --compile, with the inductor backend (torch.compile's default)."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        if values not in (None, "inductor"):
            raise UserError(f"{option_string} {shown(values)}: lcnn-zoo train compiles with inductor only")
        setattr(namespace, self.dest, True)


def _fields_parser(cls, prog: str, description: str, timm_flags: bool = False) -> argparse.ArgumentParser:
    """The parser of a config class's fields; ``timm_flags``: also timm train.py's names for them, its
    no-op flags, and its refused ones (see :mod:`lcnn_zoo.train_flags`)."""
    from .train_flags import ALIASES, NO_OPS, REFUSED
    p = _Parser(prog=prog, description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    groups: Dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        group = groups.setdefault(f.metadata["group"], p.add_argument_group(f.metadata["group"]))
        aliases = tuple(a for a, name in ALIASES.items() if name == f.name and a != "--torchcompile") if timm_flags else ()
        _add_field(group, f, aliases)
    if timm_flags:
        timm = p.add_argument_group("timm train.py's flags (see lcnn_zoo/train_flags.py)")
        timm.add_argument("--torchcompile", dest="compile", nargs="?", const="inductor", action=_TorchCompile,
                          metavar="BACKEND", help="--compile (inductor)")
        for flag, why in NO_OPS.items():
            timm.add_argument(flag, nargs="*", action=_TimmNoOp, dest=argparse.SUPPRESS, default=argparse.SUPPRESS,
                              help=f"no effect: {why}")
        for flag in REFUSED:
            timm.add_argument(flag, nargs="*", action=_TimmRefused, dest=argparse.SUPPRESS,
                              default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return p


def train_config(argv: List[str]) -> TrainConfig:
    """A validated :class:`TrainConfig` from ``lcnn-zoo train`` arguments: the command line over the
    ``--config`` YAML file over the defaults (like timm's train.py)."""
    parser = _fields_parser(TrainConfig, "lcnn-zoo train", "Train an lcnn-zoo / timm model (see README, Training); "
                            "timm train.py's flags are taken under their names", timm_flags=True)
    known, _ = parser.parse_known_args(argv)
    values: Dict[str, Any] = {}
    if known.config:
        values = load_yaml(known.config)
        fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise UserError(f"{shown(known.config)}: unknown keys {shown(unknown)}")
        for key, value in values.items():  # a bad value is named where it was written
            check_value(fields[key], value, known.config)
        parser.set_defaults(**values)
    args = vars(parser.parse_args(argv))
    named = "dataset" in values or any(a == "--dataset" or a.startswith("--dataset=") for a in argv)
    if not named and args.get("data_dir") and (Path(args["data_dir"]) / "train").is_dir():
        args["dataset"] = ""  # timm's meaning: --data-dir alone is an image folder (folder:<data-dir>)
    return TrainConfig(**args).validate()


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="lcnn-zoo", description="Low-curvature neural networks for timm users",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("quickstart", help="train a standard and an LCNN+GradReg model on Fashion-MNIST and compare",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--output", default="runs/quickstart", help="folder for the two runs and the comparison")
    p.add_argument("--threads", type=_non_negative, default=0, help="torch threads (0: leave)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    sub.add_parser("train", help="train a model (all options: lcnn-zoo train --help)", add_help=False)
    p = sub.add_parser("eval", help="the paper's measurements for one or more models, side by side",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("models", nargs="+", help="registry name[.tag], local-dir:/hf-hub: name, run folder or checkpoint")
    p.add_argument("--dataset", default="fmnist", help="cifar10 | cifar100 | fmnist | folder:<path> | hf:<name>")
    p.add_argument("--data-dir", default=None, help="where the dataset lives")
    p.add_argument("--download", action="store_true", help="let torchvision download CIFAR / Fashion-MNIST")
    p.add_argument("--arch", default=None, help="architecture for checkpoints that do not record it")
    p.add_argument("--input-size", type=int, nargs=3, default=None, metavar=("C", "H", "W"),
                   help="input size for checkpoints that do not record it (default: read from the weights)")
    p.add_argument("--output", default="runs/eval", help="new folder for eval.json, eval.md and plots (one that "
                                                         "holds anything gets a -N suffix: nothing is overwritten)")
    p.add_argument("--random-init", action="store_true", help="allow an architecture name without a tag: "
                                                              "measure the model as initialised")
    p.add_argument("--threads", type=_non_negative, default=0, help="torch threads (0: leave)")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda if available)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    for f in dataclasses.fields(EvalConfig):
        if f.name not in ("progress", "noise_norms"):
            _add_field(p, f)
    p = sub.add_parser("push", help="write (and optionally upload or ship) a Hub repo folder for trained weights",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("checkpoint", help=".safetensors state dict, a training checkpoint (.pth) or a run folder")
    p.add_argument("--model", required=True, help="'<architecture>.<tag>', a new tag name allowed (e.g. lcnn_resnet20.fm3)")
    p.add_argument("--output-dir", help="folder to write (default: hub/<model>.<tag>); must be new, empty or a "
                                        "previous push of the same model")
    p.add_argument("--overwrite", action="store_true", help="replace the three repo files in a non-empty "
                                                            "--output-dir (nothing else in it is touched)")
    p.add_argument("--metrics", help="eval.json written by `lcnn-zoo eval`, for the model card")
    p.add_argument("--metrics-key", help="which model of a multi-model eval.json (default: the --model name, "
                                          "then the checkpoint's run-folder name)")
    p.add_argument("--recipe", help="the training config (.yaml) or a text file describing the recipe, for the card")
    p.add_argument("--eval-command", help="the command that produced --metrics, quoted in the card")
    p.add_argument("--dataset", default="", help="dataset name for the card (default: the tag's, e.g. fmnist)")
    p.add_argument("--classes", default="", help="comma-separated class names for the card (default: the run "
                                                 "folder's)")
    p.add_argument("--template", help="MODEL_CARD.md to take the template from")
    p.add_argument("--repo-id", help="Hub repo id (default: $LCNN_ZOO_HUB_NAMESPACE/<model>.<tag>)")
    p.add_argument("--ema", action="store_true", help="publish the EMA weights of a training checkpoint")
    p.add_argument("--upload", action="store_true", help="upload with huggingface_hub (needs a token) and record "
                                                         "the tag in your published manifest")
    p.add_argument("--bundle", action="store_true",
                   help="also ship the weights inside the package (lcnn_zoo/weights) for offline pretrained=True")
    p.add_argument("--replace-shipped", action="store_true", help="with --bundle: replace a tag that ships already")
    p.add_argument("--private", action="store_true", help="create the Hub repo as private")
    return ap


def _eval_config(args: argparse.Namespace) -> EvalConfig:
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(EvalConfig) if hasattr(args, f.name)}
    return EvalConfig(**values, progress=not args.no_progress).validate()


def _run(command: str, args: argparse.Namespace) -> int:
    # The command modules import torch and timm: imported here, when a command runs (see module docstring).
    register_models()
    if command == "quickstart":
        return importlib.import_module("lcnn_zoo.quickstart").run_quickstart(
            output=Path(args.output), threads=args.threads, progress=not args.no_progress)
    if command == "eval":
        cfg = _eval_config(args)
        preflight = importlib.import_module("lcnn_zoo.preflight")
        preflight.output_folder(args.output)  # a new folder that can be written: checked before any measuring
        device = preflight.check_device(args.device)
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        evaluation = importlib.import_module("lcnn_zoo.evaluation")
        command = "lcnn-zoo " + shlex.join(args.argv)
        results = evaluation.run_eval(args.models, args.dataset, data_dir=args.data_dir, download=args.download,
                                      arch=args.arch, input_size=args.input_size, cfg=cfg, device=device,
                                      command=command, random_init=args.random_init)
        out = evaluation.write_report(results, preflight.new_output_folder(args.output), cfg=cfg, command=command)
        print(evaluation.markdown_report(results))
        print(f"wrote {out / 'eval.json'}, eval.md and gradient_robustness.png")
        return 0
    if command == "push":
        importlib.import_module("lcnn_zoo.publishing").publish(
            args.checkpoint, args.model, output_dir=args.output_dir, overwrite=args.overwrite,
            metrics_path=args.metrics, metrics_key=args.metrics_key, recipe_path=args.recipe,
            eval_command=args.eval_command or "", dataset=args.dataset,
            classes=[c.strip() for c in args.classes.split(",") if c.strip()], template=args.template,
            repo_id=args.repo_id, ema=args.ema, upload=args.upload, ship=args.bundle,
            replace_shipped=args.replace_shipped, private=args.private)
        return 0
    raise AssertionError(command)


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed blocks up to 32 MiB in the heap instead of returning them to
    the system (M_MMAP_THRESHOLD, M_TRIM_THRESHOLD). A CPU training step allocates and frees
    activation-sized tensors by the hundred; returned to the system, each is page-faulted in again on
    its next allocation. Measured with the quickstart's LCNN + GradReg recipe on 3,000 images, runs
    alternated twice (2-core AMD EPYC): an epoch 22 → 20 s; peak resident memory 1.20 → 1.33 GB
    (docs/performance.md has the commands). PyTorch's CPU tuning guide gets this
    from jemalloc/tcmalloc, without a preload. Only for the ``lcnn-zoo`` process (the library never
    does it); ``LCNN_ZOO_MALLOC=system`` leaves malloc alone. Returns whether it was applied."""
    if sys.platform != "linux" or os.environ.get("LCNN_ZOO_MALLOC") == "system":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
        return bool(libc.mallopt(m_mmap_threshold, 32 << 20)) and bool(libc.mallopt(m_trim_threshold, 1 << 30))
    except (OSError, AttributeError):  # not glibc
        return False


def _stop_on_sigterm() -> Any:
    """SIGTERM (``kill``, a scheduler's pre-emption, torchrun stopping its workers) stops a command
    the way Ctrl-C does: the run's ``finally`` clauses run, and one line says how to continue.
    Returns the previous handler (restored when the command ends), or None off the main thread."""
    def stop(signum, frame):
        raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, stop)


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    keep_freed_memory()
    previous = _stop_on_sigterm()
    try:
        if argv and argv[0] == "train":  # all of `lcnn-zoo train`'s options belong to its own parser
            cfg = train_config(argv[1:])
            register_models()
            importlib.import_module("lcnn_zoo.training").train(cfg)
            return 0
        args = build_parser().parse_args(argv)
        args.argv = argv
        return int(_run(args.command, args) or 0)
    except UserError as e:
        print(f"lcnn-zoo: error: {one_line(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        hint = getattr(e, "hint", "") or "nothing was left half-written (every file is written whole or not at all)"
        print(f"lcnn-zoo: interrupted: {one_line(hint)}", file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
