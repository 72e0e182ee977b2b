"""Run folders and checkpoints: the layout ``lcnn-zoo train`` writes, and everything that reads it.

A run folder (:class:`RunFolder`) holds::

    args.json            the configuration that actually ran (TrainConfig), rewritten on resume
    summary.json/.csv    per-epoch history (regenerated from the checkpoint's history: never duplicated)
    last.pth             the training checkpoint (model, optimizer, scheduler, EMA, scaler, RNG, history)
    model_best.safetensors   the weights of the epoch with the best test accuracy
    model.safetensors    the final weights
    .lock                held while a run trains in the folder

Every file is written to a temporary file in the same folder and renamed into place
(:func:`atomic_write`), so a kill never leaves a half-written file under its real name; a full
disk is reported as such. Checkpoints are read with ``torch.load(weights_only=True)`` and
safetensors only: nothing is unpickled. Every run file is read through its schema
(:mod:`lcnn_zoo.commands.run_files`): a damaged or edited one is one line naming the file and the field.
"""
from __future__ import annotations

import contextlib
import csv
import io
import os
import random
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple, cast

import numpy as np
import torch
from safetensors.torch import load_file, save

from ..errors import UserError, shown
from .run_files import (
    CheckpointError,
    load_torch_file,
    read_args,
    read_checkpoint,
    read_json,
    read_summary,
    require_regular,
)
from .writing import atomic_write, file_lock, is_temporary, lock_holder, write_json, write_text

__all__ = ["atomic_write", "write_text", "write_json", "read_json", "load_state_dict", "rng_state", "set_rng_state",
           "RunFolder", "RunState", "CheckpointError"]


def _save_torch(path: Path, payload: Dict[str, Any]) -> None:
    # Serialised in memory first: torch.save reports a full disk as "enforce fail at
    # inline_container.cc"; Python's own write reports ENOSPC, which atomic_write turns into a clear error.
    buf = io.BytesIO()
    torch.save(payload, buf)
    atomic_write(path, lambda f: f.write(buf.getbuffer()))


def load_state_dict(path: str | os.PathLike, *, use_ema: bool = False) -> Dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a training checkpoint (``torch.load(weights_only=True)``;
    nothing is unpickled). Training checkpoints hold it under ``state_dict`` (``state_dict_ema``)."""
    path = Path(path)
    require_regular(path, "checkpoint")
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        if use_ema:
            raise CheckpointError(f"{shown(path)} holds one set of weights: EMA weights are in a training checkpoint "
                                  f"(last.pth of a run trained with --model-ema)")
        try:
            return load_file(str(path))
        except Exception as e:  # noqa: BLE001 - safetensors raises several types
            raise CheckpointError(f"{path} is not a valid safetensors file (truncated or corrupted?): {e}") from e
    ckpt = load_torch_file(path)
    if isinstance(ckpt, dict) and ("state_dict" in ckpt or "state_dict_ema" in ckpt):
        key = "state_dict_ema" if use_ema else "state_dict"
        if use_ema and ckpt.get(key) is None and "state_dict" in ckpt:  # (saved as None without --model-ema)
            raise CheckpointError(f"{shown(path)} holds no EMA weights: the run was trained without --model-ema; "
                                  f"leave out --ema")
        if ckpt.get(key) is None:
            raise CheckpointError(f"{shown(path)} has no '{key}' entry (keys: {shown(sorted(map(str, ckpt)), 200)})")
        ckpt = ckpt[key]
    if not isinstance(ckpt, dict) or not all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        raise CheckpointError(f"{path} does not contain a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in ckpt.items()}


def rng_state() -> Dict[str, Any]:
    """Python, NumPy, torch (and CUDA) RNG states, as tensors and plain types (weights_only-loadable)."""
    # the legacy (MT19937) tuple, get_state()'s default; numpy's stubs type the no-argument call as a dict
    np_state = cast(Tuple[str, np.ndarray, int, int, float], np.random.get_state())
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                       int(np_state[3]), float(np_state[4])]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    """Restore the RNG states :func:`rng_state` saved (CUDA's only when saved and CUDA is available)."""
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass(frozen=True)
class RunState:
    """Whether a run has finished (:meth:`RunFolder.state`): ``epoch`` is the last epoch its files
    record and ``epochs`` the number asked for (None where they do not say); ``status`` is
    ``"finished"``, ``"still training"`` or ``"unfinished"`` and ``evidence`` what shows it."""

    finished: bool
    epoch: Optional[int]
    epochs: Optional[int]
    status: str
    evidence: str = ""

    def describe(self) -> str:
        """e.g. ``unfinished at epoch 2 of 10 (its summary.json says finished: false)``."""
        at = "" if self.epoch is None else f" at epoch {self.epoch}" + (f" of {self.epochs}" if self.epochs else "")
        return self.status + at + (f" ({self.evidence})" if self.evidence else "")


class RunFolder:
    """The files of one training run (see the module docstring)."""

    ARGS, SUMMARY, CSV, LAST, BEST, WEIGHTS, LOCK = ("args.json", "summary.json", "summary.csv", "last.pth",
                                                     "model_best.safetensors", "model.safetensors", ".lock")
    _OURS = (ARGS, SUMMARY, CSV, LAST, BEST, WEIGHTS)

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    def file(self, name: str) -> Path:
        """The path of the run's file ``name`` (e.g. ``RunFolder.LAST``), whether or not it exists."""
        return self.path / name

    @classmethod
    def is_run(cls, path: str | os.PathLike) -> bool:
        """Whether ``path`` is a run folder (it holds an ``args.json`` file)."""
        return (Path(path) / cls.ARGS).is_file()

    @classmethod
    def holding(cls, file: str | os.PathLike) -> Optional["RunFolder"]:
        """The run folder ``file`` lies in (its folder, or the folder of the file a link points to),
        or None: any file of a run (``last.pth``, ``model_best.safetensors``, ``model.safetensors``,
        a copy put there) carries the run's state, which push, eval and ``--initial-checkpoint`` check."""
        path = Path(file)
        for parent in (path.parent, path.resolve().parent):
            if cls.is_run(parent):
                return cls(parent)
        return None

    # ---- reading (every file through its schema: lcnn_zoo.commands.run_files) ---------------------------
    def args(self) -> Dict[str, Any]:
        """``args.json``, checked against the options of ``lcnn-zoo train``."""
        return read_args(self.file(self.ARGS))

    def summary(self) -> Dict[str, Any]:
        """``summary.json``, checked (``{}`` when the run has not written one yet)."""
        return read_summary(self.file(self.SUMMARY)) if self.file(self.SUMMARY).is_file() else {}

    def weights(self) -> Path:
        """The run's final weights, else its last checkpoint."""
        for name in (self.WEIGHTS, self.LAST):
            if self.file(name).is_file():
                return self.file(name)
        raise CheckpointError(f"{self.path} holds neither {self.WEIGHTS} nor {self.LAST}: the run has not finished "
                              f"an epoch yet")

    def load_checkpoint(self, path: Optional[str | os.PathLike] = None) -> Dict[str, Any]:
        """A training checkpoint (``last.pth`` by default), checked against its schema."""
        return read_checkpoint(Path(path) if path is not None else self.file(self.LAST))

    def unfinished_start(self) -> bool:
        """Whether the folder holds only the files a run writes before its first checkpoint
        (``args.json``, its lock, temporaries): a run stopped before its first epoch ended, which
        ``--resume auto`` starts again in place. Anything a run writes after its first epoch — best
        or final weights, a summary, a CSV — means the run got further (or finished; a finished run
        may have been reduced to its ``model_best.safetensors``, which says nothing of its epoch): its
        files are never trained over."""
        names = [p.name for p in self.path.iterdir()]
        early = {self.ARGS, self.LOCK}
        return all(n in early or is_temporary(n, self._OURS) for n in names)

    def state(self) -> "RunState":
        """Whether the run has finished, from its own files: its lock held by a training process, a
        summary that says ``finished: false``, or a ``last.pth`` without ``model.safetensors`` mean
        it has not. The lock is only looked at (a shared ``flock`` tried and released at once)."""
        summary = self.summary()
        history = summary.get("history") or []
        epoch = int(history[-1]["epoch"]) if history else None
        epochs = summary.get("epochs")
        holder = lock_holder(self.file(self.LOCK))
        if holder is not None:
            return RunState(False, epoch, epochs, "still training", f"its lock is held: {shown(holder, 120)}")
        if summary and not summary.get("finished", True):
            return RunState(False, epoch, epochs, "unfinished", f"its {self.SUMMARY} says finished: false")
        if not summary and self.file(self.LAST).is_file() and not self.file(self.WEIGHTS).is_file():
            ckpt = self.load_checkpoint()
            recorded = ckpt.get("config") or ckpt.get("args") or {}
            return RunState(False, int(ckpt["epoch"]), recorded.get("epochs"), "unfinished",
                            f"it holds {self.LAST} but no {self.WEIGHTS}")
        return RunState(True, epoch, epochs, "finished")

    def require_finished(self, command: str, allow_unfinished: bool = False) -> "RunState":
        """The run's :meth:`state`; a run that has not finished is refused for ``command`` (``push``,
        ``eval``: it would use mid-training weights under the run's name) unless ``allow_unfinished``."""
        state = self.state()
        if not state.finished and not allow_unfinished:
            raise UserError(f"{shown(self.path)} is {state.describe()}: `{command}` would use mid-training weights; "
                            f"wait until it finishes, or pass --allow-unfinished to use them (the epoch is recorded "
                            f"in what {command.split()[min(1, len(command.split()) - 1)]} writes)")
        return state

    # ---- writing ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self) -> Iterator["RunFolder"]:
        """Hold the folder for one run: a second run in it fails at once, naming the holder. The
        lock file is never followed if it is a symbolic link (see :func:`~lcnn_zoo.commands.writing.file_lock`)."""
        holder = f"pid {os.getpid()} on {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}"
        with file_lock(self.file(self.LOCK), f"{self.path} (another training run holds it)", describe=holder):
            yield self

    def clean_stale_temporaries(self) -> List[Path]:
        """Remove temporary files an interrupted write of *this folder's files* left behind (only
        ``.<run file>.tmp-lcnn-<pid>``: nothing else is touched). Returns what was removed."""
        removed = []
        if self.path.is_dir():
            for p in self.path.iterdir():
                if is_temporary(p.name, self._OURS) and not p.is_dir():
                    p.unlink()
                    removed.append(p)
        return removed

    def write_args(self, args: Dict[str, Any]) -> None:
        """Write ``args.json`` (the run's options), atomically."""
        write_json(self.file(self.ARGS), args)

    def save_checkpoint(self, payload: Dict[str, Any]) -> None:
        """Write ``last.pth`` (the resumable checkpoint: ``torch.save`` of ``payload``), atomically."""
        _save_torch(self.file(self.LAST), payload)

    def save_weights(self, state_dict: Dict[str, torch.Tensor], name: str = WEIGHTS) -> Path:
        """Write ``state_dict`` (copied to the CPU) as the safetensors file ``name``, atomically; return its path."""
        data = save({k: v.detach().contiguous().cpu() for k, v in state_dict.items()})
        return atomic_write(self.file(name), lambda f: f.write(data))

    def write_summary(self, summary: Dict[str, Any]) -> None:
        """summary.json, and summary.csv regenerated from its history (one row per epoch)."""
        write_json(self.file(self.SUMMARY), summary)
        history = summary.get("history") or []
        columns: List[str] = []
        for row in history:
            columns += [k for k in row if k not in columns]

        def write(f) -> None:
            w = csv.DictWriter(f, fieldnames=columns)
            w.writeheader()
            for row in history:
                w.writerow(row)

        atomic_write(self.file(self.CSV), write, binary=False)
