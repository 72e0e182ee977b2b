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
import errno
import fcntl
import io
import json
import os
import random
import socket
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional

import numpy as np
import torch
from safetensors.torch import load_file, save

from .errors import UserError

__all__ = ["atomic_write", "write_text", "write_json", "read_json", "load_state_dict", "rng_state", "set_rng_state",
           "RunFolder", "CheckpointError"]

_TMP_MARK = ".tmp-lcnn-"  # temporary files are named .<name>.tmp-lcnn-<pid>: ours to clean up


class CheckpointError(UserError):
    """A checkpoint or run file cannot be read (missing, truncated, not ours); the message names it."""


def _umask_mode(base: int) -> int:
    mask = os.umask(0)
    os.umask(mask)
    return base & ~mask


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None], *, binary: bool = True) -> Path:
    """Call ``write(file)`` on a temporary file next to ``path``, then rename it onto ``path``.

    The file gets the usual mode (0666 minus the umask). On any failure the temporary file is
    removed and ``path`` is left as it was; a full disk raises :class:`UserError` saying so.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}{_TMP_MARK}{os.getpid()}")
    try:
        with open(tmp, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _umask_mode(0o666))
        os.replace(tmp, path)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise UserError(f"no space left on device while writing {path}: free some space and resume "
                            f"(the previous version of the file is intact)") from e
        raise
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text), binary=False)


def write_json(path: str | os.PathLike, data: Any) -> Path:
    return write_text(path, json.dumps(data, indent=2, default=str) + "\n")


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
    np_state = np.random.get_state()
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
        self._lock_file = None

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

    # ---- writing ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self) -> Iterator["RunFolder"]:
        """Hold the folder for one run: a second run in it fails at once, naming the holder."""
        self.path.mkdir(parents=True, exist_ok=True)
        f = open(self.file(self.LOCK), "a+", encoding="utf-8")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise UserError(f"{self.path} is in use by another training run ({holder}): wait for it to finish, "
                            f"or choose another --experiment") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}")
        f.flush()
        self._lock_file = f
        try:
            yield self
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
            f.close()
            self._lock_file = None

    def clean_stale_temporaries(self) -> List[Path]:
        """Remove temporary files an interrupted write of *this folder's files* left behind (only
        ``.<run file>.tmp-lcnn-<pid>``: nothing else is touched). Returns what was removed."""
        removed = []
        if self.path.is_dir():
            for p in self.path.iterdir():
                if any(p.name.startswith(f".{name}{_TMP_MARK}") for name in self._OURS):
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
