"""The ``lcnn-zoo`` command line: ``quickstart``, ``train``, ``eval``, ``push``.

This module only dispatches: the options of ``train`` and ``eval`` are the fields of
:class:`~lcnn_zoo.commands.config.TrainConfig` and :class:`~lcnn_zoo.commands.config.EvalConfig`, made into
arguments by :mod:`lcnn_zoo.commands.options`, and each command hands a validated config to the module that
does the work. It imports no torch at module level
(the command modules are imported when a command runs), so ``--help`` answers at once. A mistake the
user can fix (:class:`~lcnn_zoo.errors.UserError`) prints one line and exits with code 2.
"""
from __future__ import annotations

import argparse
import ctypes
import dataclasses
import importlib
import shlex
import signal
import sys
import threading
from pathlib import Path
from typing import Any, List, Optional

from .. import register_models
from ..errors import UserError, one_line
from .config import THREADS_MAX, EvalConfig
from .options import HelpFormatter, Parser, add_field, train_config

__all__ = ["main", "train_config", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    """The ``lcnn-zoo`` argument parser, with every command but ``train`` (which has a parser of its own)."""
    """The parser of every command but ``train`` (whose options are :func:`train_config`'s own parser)."""
    ap = Parser(prog="lcnn-zoo", description="Low-curvature neural networks for timm users",
                                 formatter_class=HelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("quickstart", help="train a standard and an LCNN+GradReg model on Fashion-MNIST and compare",
                       formatter_class=HelpFormatter)
    p.add_argument("--output", default="runs/quickstart", help="folder for the two runs and the comparison")
    p.add_argument("--threads", type=_threads, default=0, help="torch threads (0: leave)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    sub.add_parser("train", help="train a model (all options: lcnn-zoo train --help)", add_help=False)
    p = sub.add_parser("eval", help="the paper's measurements for one or more models, side by side",
                       formatter_class=HelpFormatter)
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
    p.add_argument("--allow-unfinished", action="store_true", help="measure a run that is still training or "
                                                                   "stopped (its last.pth; the epoch is recorded)")
    p.add_argument("--threads", type=_threads, default=0, help="torch threads (0: leave)")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda if available)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    for f in dataclasses.fields(EvalConfig):
        if f.name not in ("progress", "noise_norms"):
            add_field(p, f)
    p = sub.add_parser("push", help="write (and optionally upload or ship) a Hub repo folder for trained weights",
                       formatter_class=HelpFormatter)
    p.add_argument("checkpoint", help=".safetensors state dict, a training checkpoint (.pth) or a run folder")
    p.add_argument("--model", required=True,
                   help="'<architecture>.<tag>', a new tag name allowed (e.g. lcnn_resnet20.fm3)")
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
    p.add_argument("--allow-unfinished", action="store_true", help="push a run that is still training or stopped "
                                                                   "(its last.pth; the card says which epoch)")
    return ap


def _eval_config(args: argparse.Namespace) -> EvalConfig:
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(EvalConfig) if hasattr(args, f.name)}
    return EvalConfig(**values, progress=not args.no_progress).validate()


def _run(command: str, args: argparse.Namespace) -> int:
    # The command modules import torch and timm: imported here, when a command runs (see module docstring).
    register_models()
    if command == "quickstart":
        return importlib.import_module("lcnn_zoo.commands.quickstart").run_quickstart(
            output=Path(args.output), threads=args.threads, progress=not args.no_progress)
    if command == "eval":
        cfg = _eval_config(args)
        preflight = importlib.import_module("lcnn_zoo.commands.preflight")
        preflight.output_folder(args.output)  # a new folder that can be written: checked before any measuring
        device = preflight.check_device(args.device)
        preflight.check_eval_memory(args.dataset, args.input_size, cfg.batch_size, device, data_dir=args.data_dir,
                                    download=args.download)  # before any model or data
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        evaluation = importlib.import_module("lcnn_zoo.commands.evaluation")
        command = "lcnn-zoo " + shlex.join(args.argv)
        results = evaluation.run_eval(args.models, args.dataset, data_dir=args.data_dir, download=args.download,
                                      arch=args.arch, input_size=args.input_size, cfg=cfg, device=device,
                                      command=command, random_init=args.random_init,
                                      allow_unfinished=args.allow_unfinished)
        out = evaluation.write_report(results, preflight.new_output_folder(args.output), cfg=cfg, command=command)
        print(evaluation.markdown_report(results))
        print(f"wrote {out / 'eval.json'}, eval.md and gradient_robustness.png")
        return 0
    if command == "push":
        importlib.import_module("lcnn_zoo.commands.publishing").publish(
            args.checkpoint, args.model, output_dir=args.output_dir, overwrite=args.overwrite,
            metrics_path=args.metrics, metrics_key=args.metrics_key, recipe_path=args.recipe,
            eval_command=args.eval_command or "", dataset=args.dataset,
            classes=[c.strip() for c in args.classes.split(",") if c.strip()], template=args.template,
            repo_id=args.repo_id, ema=args.ema, upload=args.upload, ship=args.bundle,
            replace_shipped=args.replace_shipped, private=args.private, allow_unfinished=args.allow_unfinished)
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
    from ..environment import env

    if sys.platform != "linux" or env("LCNN_ZOO_MALLOC") == "system":
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


def _threads(text: str) -> int:
    value = _non_negative(text)
    if value > THREADS_MAX:  # (see THREADS_MAX: thread stacks exhaust memory, then a segmentation fault)
        raise argparse.ArgumentTypeError(f"must be <= {THREADS_MAX} (more threads than cores only oversubscribe "
                                         f"them), got {value}")
    return value
    """Run the ``lcnn-zoo`` command line on ``argv`` (default: ``sys.argv[1:]``).

    Returns:
        The exit code: the command's (0 on success), 2 for a :class:`~lcnn_zoo.errors.UserError` (a bad
        option included; its message printed on one line to stderr), 130 when interrupted.
    """


def main(argv: Optional[List[str]] = None) -> int:
    """Run ``lcnn-zoo`` with ``argv`` (default: the command line); returns the exit code (2: a user error)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    keep_freed_memory()
    previous = _stop_on_sigterm()
    try:
        if argv and argv[0] == "train":  # all of `lcnn-zoo train`'s options belong to its own parser
            cfg = train_config(argv[1:])
            register_models()
            importlib.import_module("lcnn_zoo.commands.training").train(cfg)
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
