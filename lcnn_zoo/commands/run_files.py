"""One schema per run file the package reads, and the one reader of each.

``lcnn-zoo train`` writes a run folder (:class:`~lcnn_zoo.commands.checkpoint.RunFolder`); ``train --resume``,
``eval`` and ``push`` read it back. A file there may have been edited, damaged or replaced since, so
nothing reads one directly: every command goes through these readers, which check each field the
package uses before any work starts. A file of the wrong shape (valid JSON or a valid checkpoint
holding, say, ``"epoch": "x"``) is one :class:`CheckpointError` line naming the file and the field —
never a traceback from deep inside a command.

* ``args.json`` and a checkpoint's ``config``: the :class:`~lcnn_zoo.commands.config.TrainConfig` that ran,
  checked with the same field types and ranges as the command line (:func:`~lcnn_zoo.commands.config.check_value`);
* ``summary.json``: :class:`SummaryFile`;
* the training checkpoint ``last.pth``: :class:`CheckpointFile` (read with
  ``torch.load(weights_only=True)``: nothing is unpickled). A file that is truncated, empty or not a
  checkpoint at all is said so, with what to do.

The schemas are dataclasses whose field metadata uses the kinds of :mod:`lcnn_zoo.commands.config` (``str``,
``int``, ``size3``, …) plus ``strs`` (a list of strings), ``mapping``, ``tensors`` (a state dict) and
``records`` / ``record`` (a list of, or one, nested schema). Keys a schema does not name are kept as
they are: files written by another version of the package stay readable.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Type

import torch

from ..errors import UserError, shown
from .config import TrainConfig, check_value
from .writing import not_regular

__all__ = ["CheckpointError", "SummaryFile", "CheckpointFile", "read_json", "read_args", "read_summary",
           "read_checkpoint", "check_args", "check_summary", "check_checkpoint", "load_torch_file", "not_regular",
           "require_regular"]


class CheckpointError(UserError):
    """A checkpoint or run file cannot be read (missing, truncated, not ours, of the wrong shape); the
    message names the file (and the field)."""


def _f(kind: str, **extra: Any) -> Any:
    """A schema field of ``kind`` (see the module docstring); ``extra``: ``minimum``, ``optional``,
    ``schema`` (the nested dataclass of ``record``/``records``), ``required``."""
    return field(default=None, metadata={"help": "", "group": "", "kind": kind, **extra})


@dataclass
class HistoryRow:
    """One epoch's row of a run's history (``summary.json`` / the checkpoint): its number; the rest
    are that epoch's metrics, kept as written."""

    epoch: Any = _f("int", minimum=1, required=True)


@dataclass
class BestEpoch:
    """The epoch with the best test accuracy so far (``best``: empty before the first evaluation)."""

    epoch: Any = _f("int", minimum=1)
    eval_top1: Any = _f("float")


@dataclass
class SummaryFile:
    """``summary.json``: what ``lcnn-zoo train`` wrote after each epoch and at the end."""

    run_dir: Any = _f("str")
    model: Any = _f("str")
    dataset: Any = _f("str")
    reg: Any = _f("str")
    epochs: Any = _f("int", minimum=1)
    num_classes: Any = _f("int", minimum=1, optional=True)
    classes: Any = _f("strs")
    input_size: Any = _f("size3", optional=True)
    final: Any = _f("mapping")
    best: Any = _f("record", schema=BestEpoch)
    finished: Any = _f("bool")
    history: Any = _f("records", schema=HistoryRow)
    wall_time_s: Any = _f("float", minimum=0.0)
    note: Any = _f("str")


@dataclass
class RngStates:
    """The random generators' states a checkpoint restores (:func:`~lcnn_zoo.commands.checkpoint.rng_state`)."""

    torch: Any = _f("tensor", required=True)
    python: Any = _f("sequence", length=3, required=True)
    numpy: Any = _f("sequence", length=5, required=True)
    cuda: Any = _f("sequence")


@dataclass
class CheckpointFile:
    """A training checkpoint (``last.pth``): what :func:`~lcnn_zoo.commands.training.resume` restores and what
    ``eval`` and ``push`` read of it. ``config`` (``args`` in older checkpoints) is a TrainConfig."""

    epoch: Any = _f("int", minimum=0, required=True)
    state_dict: Any = _f("tensors", required=True)
    optimizer: Any = _f("mapping", required=True)
    arch: Any = _f("str")
    num_classes: Any = _f("int", minimum=1, optional=True)
    input_size: Any = _f("size3", optional=True)
    classes: Any = _f("strs", optional=True)
    scheduler: Any = _f("mapping", optional=True)
    state_dict_ema: Any = _f("tensors", optional=True)
    scaler: Any = _f("mapping", optional=True)
    rng: Any = _f("record", schema=RngStates, optional=True)
    history: Any = _f("records", schema=HistoryRow, optional=True)
    best: Any = _f("record", schema=BestEpoch, optional=True)
    config: Any = _f("config", optional=True)
    args: Any = _f("config", optional=True)


def _kind_name(value: Any) -> str:
    return "a list" if isinstance(value, (list, tuple)) else f"a {type(value).__name__}"


def _check_record(data: Any, schema: Type[Any], where: str, prefix: str = "") -> None:
    """Every field of ``schema`` that ``data`` (a mapping) holds, checked against its kind; raises
    :class:`CheckpointError` naming ``where`` and the field (``prefix`` + its name)."""
    for f in dataclasses.fields(schema):
        name = prefix + f.name
        if f.name not in data:
            if f.metadata.get("required"):
                raise CheckpointError(f"{where}: '{name}' is missing")
            continue
        _check_field(f, data[f.name], where, name)


def _check_field(f: dataclasses.Field, value: Any, where: str, name: str) -> None:
    meta = f.metadata
    kind = meta["kind"]

    def bad(expected: str) -> CheckpointError:
        return CheckpointError(f"{where}: {name} must be {expected}, got {shown(value)}")

    if value is None:
        if meta.get("optional"):
            return
        raise bad("given")
    if kind == "strs":
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise bad("a list of strings")
    elif kind == "mapping":
        if not isinstance(value, dict):
            raise bad("a mapping")
    elif kind == "tensors":
        if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                  for k, v in value.items()):
            raise bad("a state dict (names → tensors)")
    elif kind == "tensor":
        if not isinstance(value, torch.Tensor):
            raise bad("a tensor")
    elif kind == "sequence":
        if not isinstance(value, (list, tuple)) or ("length" in meta and len(value) != meta["length"]):
            raise bad(f"a list of {meta['length']}" if "length" in meta else "a list")
    elif kind == "record":
        if not isinstance(value, dict):
            raise bad("a mapping")
        _check_record(value, meta["schema"], where, name + ".")
    elif kind == "records":
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, dict) for v in value):
            raise bad("a list of mappings")
        for i, row in enumerate(value):
            _check_record(row, meta["schema"], where, f"{name}[{i}].")
    elif kind == "config":
        if not isinstance(value, dict):
            raise bad("a mapping (the TrainConfig that ran)")
        _check_config(value, f"{where} ({name})")
    else:  # the kinds of lcnn_zoo.commands.config: one checker for options, YAML files and run files
        try:
            check_value(_named(f, name), value, where)
        except UserError as e:
            raise CheckpointError(str(e)) from None


def _named(f: dataclasses.Field, name: str) -> dataclasses.Field:
    """``f`` under ``name`` (a nested field's path, e.g. ``best.epoch``), for check_value's message."""
    if f.name == name:
        return f
    g = copy.copy(f)
    g.name = name
    return g


def _check_config(data: Dict[str, Any], where: str) -> None:
    """The keys of ``data`` that are options of ``lcnn-zoo train``, checked as the command line checks
    them; other keys (another version's options, ``resumed_at_epoch``) are left as they are."""
    for f in TrainConfig.options():
        if f.name in data:
            try:
                check_value(f, data[f.name], where)
            except UserError as e:
                raise CheckpointError(str(e)) from None


def _mapping(data: Any, path: Path, what: str) -> Dict[str, Any]:
    if not isinstance(data, dict):
        raise CheckpointError(f"{shown(path)} holds {_kind_name(data)}, not a mapping ({what}): restore it "
                              f"from a copy, or train again")
    return data


def check_args(data: Any, path: Path) -> Dict[str, Any]:
    """``args.json`` (read from ``path``) checked: a mapping of ``lcnn-zoo train`` options with a
    ``model``; returned as it is."""
    data = _mapping(data, path, "the options `lcnn-zoo train` ran with")
    where = shown(path)
    _check_config(data, where)
    if "model" not in data:
        raise CheckpointError(f"{where}: 'model' is missing")
    resumed = data.get("resumed_at_epoch")
    if resumed is not None and (isinstance(resumed, bool) or not isinstance(resumed, int) or resumed < 0):
        raise CheckpointError(f"{where}: resumed_at_epoch must be an integer >= 0, got {shown(resumed)}")
    return data


def check_summary(data: Any, path: Path) -> Dict[str, Any]:
    """``summary.json`` (read from ``path``) checked against :class:`SummaryFile`; returned as it is."""
    data = _mapping(data, path, "the summary `lcnn-zoo train` writes")
    _check_record(data, SummaryFile, shown(path))
    return data


def check_checkpoint(data: Any, path: Path) -> Dict[str, Any]:
    """A training checkpoint (read from ``path``) checked against :class:`CheckpointFile`."""
    if not isinstance(data, dict):
        raise CheckpointError(f"{shown(path)} is not an lcnn-zoo training checkpoint (it holds "
                              f"{_kind_name(data)}, not a mapping)")
    for key in ("state_dict", "optimizer", "epoch"):  # what makes it a training checkpoint at all
        if key not in data:
            raise CheckpointError(f"{shown(path)} is not an lcnn-zoo training checkpoint (missing '{key}')")
    _check_record(data, CheckpointFile, shown(path))
    return data


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------
def require_regular(path: str | os.PathLike, what: str) -> None:
    """:class:`CheckpointError` when ``path`` exists but is not a regular file (see :func:`not_regular`):
    ``"<what> <path> is not a regular file (a named pipe (FIFO))"``, not "no such file"."""
    kind = not_regular(path)
    if kind is not None:
        raise CheckpointError(f"{what} {shown(Path(path))} is not a regular file ({kind}): pass a file")


def read_json(path: str | os.PathLike, what: str = "file") -> Any:
    """JSON from ``path``; a missing, unreadable or invalid file (truncated, not UTF-8, nested too
    deep for the parser) raises :class:`CheckpointError` naming it. A path that is not a regular
    file (a FIFO, a device) is refused without being opened."""
    path = Path(path)
    require_regular(path, what)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise CheckpointError(f"{what} not found: {path}") from e
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        reason = "nested too deeply" if isinstance(e, RecursionError) else shown(str(e), 120)
        raise CheckpointError(f"{shown(path)} is not valid JSON (truncated or corrupted?): {reason}; delete or "
                              f"restore it") from e


_DAMAGED_REMEDY = ("restore it from a copy, or train again (without --resume a run starts in a new folder; "
                   "nothing was changed)")


def load_torch_file(path: Path) -> Any:
    """``torch.load(path, weights_only=True)``: nothing is unpickled. A file torch cannot read is
    one line saying what is wrong with it — empty, truncated (``torch.save`` writes a zip archive,
    whose index is at its end), not a PyTorch file, holding Python objects that are not weights, or
    corrupted — and what to do; not torch's or miniz's internal text."""
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for bad files
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        try:
            size = path.stat().st_size
            with open(path, "rb") as f:
                head = f.read(4)
        except OSError as os_error:
            raise CheckpointError(f"cannot read {shown(path)}: {os_error.strerror or os_error}") from e
        where = shown(path)
        if size == 0:
            raise CheckpointError(f"{where} is empty (0 bytes): {_DAMAGED_REMEDY}") from e
        if head == b"PK\x03\x04" and not zipfile.is_zipfile(path):
            raise CheckpointError(f"{where} is truncated ({size:,} bytes, its end is missing: a copy or a download "
                                  f"cut short; lcnn-zoo itself writes checkpoints whole): {_DAMAGED_REMEDY}") from e
        if head != b"PK\x03\x04":
            raise CheckpointError(f"{where} is not a checkpoint torch can read (torch.save writes a zip archive; "
                                  f"this file is none): pass a run's last.pth, or a .safetensors file") from e
        if isinstance(e, pickle.UnpicklingError) and "weights only" in str(e).lower():
            raise CheckpointError(f"{where} holds Python objects other than tensors and plain values, which lcnn-zoo "
                                  f"never unpickles (torch.load(weights_only=True)): it is not an lcnn-zoo "
                                  f"checkpoint; save a state dict with safetensors instead") from e
        raise CheckpointError(f"{where} is corrupted (torch cannot read it: {shown(first, 120)}): "
                              f"{_DAMAGED_REMEDY}") from e


def read_args(path: Path) -> Dict[str, Any]:
    """``args.json``, checked (:func:`check_args`)."""
    return check_args(read_json(path, "run configuration (args.json)"), path)


def read_summary(path: Path) -> Dict[str, Any]:
    """``summary.json``, checked (:func:`check_summary`)."""
    return check_summary(read_json(path, "run summary"), path)


def read_checkpoint(path: Path) -> Dict[str, Any]:
    """A training checkpoint, checked (:func:`check_checkpoint`)."""
    require_regular(path, "checkpoint")
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {shown(path)}")
    return check_checkpoint(load_torch_file(path), path)
