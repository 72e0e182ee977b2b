"""``lcnn-zoo train``'s and ``eval``'s options, from the fields of :class:`~lcnn_zoo.commands.config.TrainConfig`
and :class:`~lcnn_zoo.commands.config.EvalConfig`: one argparse argument per field (its kind, default and
help), timm train.py's names for them (:mod:`lcnn_zoo.commands.train_flags`), and :func:`train_config`, the
command line over a ``--config`` YAML file over the defaults. Standard library only (``--help``
answers at once); errors are :class:`~lcnn_zoo.errors.UserError` (one line, exit code 2).
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
from pathlib import Path
from typing import Any, Callable, Dict, List, cast

from ..errors import UserError, shown
from .config import TrainConfig, check_value, load_yaml

__all__ = ["Parser", "HelpFormatter", "add_field", "fields_parser", "train_config"]


class Parser(argparse.ArgumentParser):
    """argparse with its errors as :class:`UserError`: one line and exit code 2, like every other
    mistake (argparse's own prints the usage too)."""

    def error(self, message: str):
        """Raise argparse's error ``message`` as a :class:`UserError` naming the program (instead of exiting)."""
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


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's "(default: …)" after each help, except where the help states its default itself
    (a default that is None means "decided later", which the help says in words)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_ = action.help or ""
        if "(default" in help_ or action.default is None or action.default is argparse.SUPPRESS:
            return help_
        return super()._get_help_string(action) or help_


def add_field(group, f: dataclasses.Field, aliases: tuple = ()) -> None:
    """Add the option of config field ``f`` (``--name``, plus ``aliases``) to ``group``, as its metadata describes.

    The field's ``kind`` decides the argparse form: a flag (``--no-name`` for a default of True), ``KEY=VALUE``
    pairs, a list of numbers, (C, H, W), or one value (with the field's choices); its ``help`` is the option's help.
    """
    meta, flags = f.metadata, ("--" + f.name.replace("_", "-"), *aliases)
    # (a field has a default or a default_factory; mypy does not narrow one from the other)
    default = f.default if f.default is not dataclasses.MISSING else cast(Callable[[], Any], f.default_factory)()
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


_REFUSED_SEEN = "_timm_refused"  # the namespace attribute where the refused flags of one command line gather


class _TimmRefused(argparse.Action):
    """A timm train.py flag lcnn-zoo train does not take (its values are consumed). Every refused flag of
    the command line is gathered and reported in one message (:func:`_refuse`), so that a timm command
    line is fixed in one rerun, not one per flag."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        seen = getattr(namespace, _REFUSED_SEEN, [])
        if option_string not in seen:
            seen.append(option_string)
        setattr(namespace, _REFUSED_SEEN, seen)


def _refuse(namespace: argparse.Namespace) -> None:
    """Raise one :class:`UserError` naming every refused timm flag of the command line, each with why."""
    from .train_flags import REFUSED

    seen: List[str] = vars(namespace).pop(_REFUSED_SEEN, [])
    if len(seen) == 1:
        raise UserError(f"{seen[0]} (timm train.py's) is not taken by lcnn-zoo train: {REFUSED[seen[0]]}")
    if seen:
        raise UserError(f"{len(seen)} of timm train.py's flags are not taken by lcnn-zoo train: "
                        + "; ".join(f"{flag}: {REFUSED[flag]}" for flag in seen))


class _TimmNoOp(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None) -> None:
        pass


class _TorchCompile(argparse.Action):
    """timm's ``--torchcompile [BACKEND]``: --compile, with the inductor backend (torch.compile's default)."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        if values not in (None, "inductor"):
            raise UserError(f"{option_string} {shown(values)}: lcnn-zoo train compiles with inductor only")
        setattr(namespace, self.dest, True)


def fields_parser(cls, prog: str, description: str, timm_flags: bool = False) -> argparse.ArgumentParser:
    """The parser of a config class's fields; ``timm_flags``: also timm train.py's names for them, its
    no-op flags, and its refused ones (see :mod:`lcnn_zoo.commands.train_flags`)."""
    from .train_flags import ALIASES, NO_OPS, REFUSED
    p = Parser(prog=prog, description=description, formatter_class=HelpFormatter)
    groups: Dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        group = groups.setdefault(f.metadata["group"], p.add_argument_group(f.metadata["group"]))
        aliases = (tuple(a for a, name in ALIASES.items() if name == f.name and a != "--torchcompile")
                   if timm_flags else ())
        add_field(group, f, aliases)
    if timm_flags:
        timm = p.add_argument_group("timm train.py's flags (see lcnn_zoo/commands/train_flags.py)")
        timm.add_argument("--torchcompile", dest="compile", nargs="?", const="inductor", action=_TorchCompile,
                          metavar="BACKEND", help="--compile (inductor)")
        for flag, why in NO_OPS.items():
            timm.add_argument(flag, nargs="*", action=_TimmNoOp, dest=argparse.SUPPRESS, default=argparse.SUPPRESS,
                              metavar="VALUE", help=f"no effect: {why}")
        for flag in REFUSED:
            timm.add_argument(flag, nargs="*", action=_TimmRefused, dest=argparse.SUPPRESS,
                              default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return p


def train_config(argv: List[str]) -> TrainConfig:
    """A validated :class:`TrainConfig` from ``lcnn-zoo train`` arguments: the command line over the
    ``--config`` YAML file over the defaults (like timm's train.py)."""
    parser = fields_parser(TrainConfig, "lcnn-zoo train", "Train an lcnn-zoo / timm model (see docs/training.md); "
                            "timm train.py's flags are taken under their names", timm_flags=True)
    known, _ = parser.parse_known_args(argv)
    _refuse(known)
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
    parsed = parser.parse_args(argv)
    _refuse(parsed)
    args = vars(parsed)
    named = "dataset" in values or any(a == "--dataset" or a.startswith("--dataset=") for a in argv)
    if not named and args.get("data_dir") and (Path(args["data_dir"]) / "train").is_dir():
        args["dataset"] = ""  # timm's meaning: --data-dir alone is an image folder (folder:<data-dir>)
    return TrainConfig(**args).validate()
