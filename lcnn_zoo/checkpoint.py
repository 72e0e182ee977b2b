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
safetensors only: nothing is unpickled.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import random
import socket
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple, cast

import numpy as np
import torch
from safetensors.torch import load_file, save

from .errors import UserError, shown
from .writing import atomic_write, file_lock, is_temporary, write_json, write_text

__all__ = ["atomic_write", "write_text", "write_json", "read_json", "load_state_dict", "rng_state", "set_rng_state",
           "RunFolder", "CheckpointError"]

class CheckpointError(UserError):
    """A checkpoint or run file cannot be read (missing, truncated, not ours); the message names it."""


def read_json(path: str | os.PathLike, what: str = "file") -> Any:
    """JSON from ``path``; a missing or unreadable file raises :class:`CheckpointError` naming it."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise CheckpointError(f"{what} not found: {path}") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON (truncated or corrupted?): {e}; delete or restore it") from e


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
    ckpt = _torch_load(path)
    if isinstance(ckpt, dict) and ("state_dict" in ckpt or "state_dict_ema" in ckpt):
        key = "state_dict_ema" if use_ema else "state_dict"
        if ckpt.get(key) is None:
            raise CheckpointError(f"{path} has no '{key}' entry (keys: {sorted(ckpt)})")
        ckpt = ckpt[key]
    if not isinstance(ckpt, dict) or not all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        raise CheckpointError(f"{path} does not contain a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in ckpt.items()}


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for bad files
        raise CheckpointError(f"cannot read checkpoint {path} with weights_only=True (truncated, corrupted, or "
                              f"not an lcnn-zoo checkpoint): {str(e).splitlines()[0]}") from e


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
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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
        return self.path / name

    @classmethod
    def is_run(cls, path: str | os.PathLike) -> bool:
        return (Path(path) / cls.ARGS).is_file()

    # ---- reading ---------------------------------------------------------------------------
    def args(self) -> Dict[str, Any]:
        return read_json(self.file(self.ARGS), "run configuration (args.json)")

    def summary(self) -> Dict[str, Any]:
        return read_json(self.file(self.SUMMARY), "run summary") if self.file(self.SUMMARY).is_file() else {}

    def weights(self) -> Path:
        """The run's final weights, else its last checkpoint."""
        for name in (self.WEIGHTS, self.LAST):
            if self.file(name).is_file():
                return self.file(name)
        raise CheckpointError(f"{self.path} holds neither {self.WEIGHTS} nor {self.LAST}: the run has not finished "
                              f"an epoch yet")

    def load_checkpoint(self, path: Optional[str | os.PathLike] = None) -> Dict[str, Any]:
        """A training checkpoint (``last.pth`` by default), validated."""
        path = Path(path) if path is not None else self.file(self.LAST)
        if not path.is_file():
            raise CheckpointError(f"checkpoint not found: {path}")
        ckpt = _torch_load(path)
        for key in ("state_dict", "optimizer", "epoch"):
            if not isinstance(ckpt, dict) or key not in ckpt:
                raise CheckpointError(f"{path} is not an lcnn-zoo training checkpoint (missing '{key}')")
        return ckpt

    def unfinished_start(self) -> bool:
        """Whether the folder holds only this run's own files and no checkpoint: a run stopped
        before its first epoch ended, which ``--resume auto`` starts again in place."""
        names = [p.name for p in self.path.iterdir()]
        own = set(self._OURS) | {self.LOCK}
        return self.LAST not in names and all(n in own or is_temporary(n, self._OURS) for n in names)

    # ---- writing ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self) -> Iterator["RunFolder"]:
        """Hold the folder for one run: a second run in it fails at once, naming the holder. The
        lock file is never followed if it is a symbolic link (see :func:`~lcnn_zoo.writing.file_lock`)."""
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
        write_json(self.file(self.ARGS), args)

    def save_checkpoint(self, payload: Dict[str, Any]) -> None:
        _save_torch(self.file(self.LAST), payload)

    def save_weights(self, state_dict: Dict[str, torch.Tensor], name: str = WEIGHTS) -> Path:
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
