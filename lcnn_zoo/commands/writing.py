"""The one write policy: every file lcnn-zoo writes goes through this module.

* :func:`atomic_write` — a file is written under a temporary name (created exclusively, never
  through a symbolic link) and renamed into place, so a kill leaves it either as it was or complete;
  a full disk and a read-only folder are :class:`~lcnn_zoo.errors.UserError`\\ s that say so.
* :func:`new_folder` — a command's output folder is always its own: a folder that holds anything
  (another run, a user's files) is never written into; the command gets the next free name
  (``name-1``, ``name-2``, … as timm's ``train.py`` does) or, when asked, is refused.
* :func:`check_name` — a run or experiment name is one path component, never a path.
* :func:`file_lock` — filelock's exclusive lock (``flock``) on a lock file opened without following links,
  with a note of its holder for the message a second holder gets.
* :class:`Transaction` — several files that must change together (weights + manifest; a Hub repo
  folder): all are written under temporary names first, then renamed in the given order (the
  manifest last); a failure before the end restores every file that was replaced.

A stale lock or temporary file after SIGKILL never blocks anything: locks are ``flock``\\ s (released
by the kernel with the process) and temporary files carry a mark that only their owner's
clean-up (:func:`is_temporary`) removes.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import math
import os
import re
import secrets
import stat
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from filelock import FileLock, Timeout

from ..errors import UserError, shown

__all__ = ["atomic_write", "write_text", "write_json", "new_folder", "check_name", "check_writable_parent",
           "file_lock", "lock_holder", "Transaction", "TMP_MARK", "is_temporary", "EXISTING_POLICIES", "not_regular"]

TMP_MARK = ".tmp-lcnn-"  # temporary files are named .<name>.tmp-lcnn-<pid>-<random>: ours to clean up
EXISTING_POLICIES = ("suffix", "refuse")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+=@,-]{0,199}$")


def _umask_mode(base: int) -> int:
    mask = os.umask(0)
    os.umask(mask)
    return base & ~mask


def _os_error(e: OSError, path: Path, doing: str) -> UserError:
    """Any OSError of a write as one line naming ``path`` (full disk, read-only, permissions, a file
    in the way, a folder that cannot be created there, a name too long, …): the reason in words for
    the usual ones, the system's own (``strerror``) for the rest — never a traceback."""
    reasons: Dict[Optional[int], str] = {
        errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
        errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
        errno.EPERM: "operation not permitted", errno.ENOTDIR: "a path component is a file, not a folder",
        errno.EISDIR: "it is a folder", errno.ELOOP: "it is a symbolic link (not followed)",
        errno.EEXIST: "it exists already",
        errno.ENOENT: "no such file or folder (nothing can be created there)",
        errno.ENAMETOOLONG: "the name is too long for the file system"}
    reason = reasons.get(e.errno) or (e.strerror or type(e).__name__).lower()
    return UserError(f"{reason} while {doing} {shown(path)}: the previous version of every file is intact")


def _mkdirs(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError as e:
        raise UserError(f"cannot write into {shown(path)}: it is a file, not a folder") from e
    except OSError as e:
        raise _os_error(e, path, "creating the folder") from e


def is_temporary(name: str, owners: Sequence[str] = ()) -> bool:
    """Whether ``name`` is a temporary file of :func:`atomic_write` (for one of ``owners`` if given)."""
    if TMP_MARK not in name or not name.startswith("."):
        return False
    return not owners or any(name.startswith(f".{o}{TMP_MARK}") for o in owners)


def _temporary(path: Path) -> Tuple[Path, int]:
    """A new temporary file next to ``path``: created exclusively (O_EXCL), never through a link."""
    tmp = path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}-{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o600)
    return tmp, fd


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None], *, binary: bool = True) -> Path:
    """Call ``write(file)`` on a temporary file next to ``path``, then rename it onto ``path``.

    The file gets the usual mode (0666 minus the umask). On any failure the temporary file is
    removed and ``path`` is left as it was. A ``path`` that is a symbolic link is replaced by the
    file (the link's target is never written).
    """
    path = Path(path)
    _mkdirs(path.parent)
    tmp: Optional[Path] = None
    try:
        tmp, fd = _temporary(path)
        with (os.fdopen(fd, "wb") if binary else os.fdopen(fd, "w", encoding="utf-8")) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _umask_mode(0o666))
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        raise _os_error(e, path, "writing") from e
    finally:
        if tmp is not None and os.path.lexists(tmp):
            os.unlink(tmp)
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    """``text`` as UTF-8, through :func:`atomic_write`."""
    return atomic_write(path, lambda f: f.write(text), binary=False)


def write_json(path: str | os.PathLike, data: Any, *, allow_nan: bool = True) -> Path:
    """``data`` as indented JSON. ``allow_nan=False``: a NaN or infinite number is a ValueError, not
    the bare ``NaN``/``Infinity`` tokens that are not JSON (check first with :func:`non_finite`)."""
    return write_text(path, json.dumps(data, indent=2, default=str, allow_nan=allow_nan) + "\n")


def non_finite(value: Any, key: str = "") -> Optional[Tuple[str, float]]:
    """(the dotted key, the value) of the first number in ``value`` (nested mappings and lists) that
    is NaN or infinite, or None."""
    if isinstance(value, float) and not math.isfinite(value):
        return key, value
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, (list, tuple)) else ()
    for k, v in items:
        found = non_finite(v, f"{key}.{k}" if key else str(k))
        if found is not None:
            return found
    return None


def check_name(name: str, option: str) -> str:
    """``name`` as a folder name: one path component of letters, digits and ``._+=@,-`` (no ``/``,
    no ``..``, not hidden), or :class:`UserError` naming ``option``."""
    if not isinstance(name, str) or not _NAME.match(name) or name in (".", ".."):
        raise UserError(f"{option} must be a name, not a path (letters, digits and ._+=@,- ; at most 200 "
                        f"characters, not starting with '.'), got {shown(name)}")
    return name


def check_writable_parent(parent: str | os.PathLike, option: str) -> Path:
    """``parent`` exists or can be created, is a folder, and is writable — checked without creating
    it: in its nearest existing folder a probe folder is really created and removed at once (``os.access``
    alone passes where ``mkdir`` fails: /proc for root, a full inode table, …), and the names still to
    be created are checked against the file system's name length."""
    p = Path(parent)
    probe = p
    missing: List[str] = []
    while not os.path.exists(probe):  # (os.path's: False, not an OSError, for a name too long)
        if os.path.islink(probe):  # a dangling link
            raise UserError(f"{option} {shown(p)}: {shown(probe)} is a broken symbolic link")
        missing.append(probe.name)
        probe = probe.parent
    if not os.path.isdir(probe):
        raise UserError(f"{option} {shown(p)}: {shown(probe)} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"{option} {shown(p)}: {shown(probe)} is not writable (read-only file system or no "
                        f"permission)")
    try:
        longest = os.pathconf(probe, "PC_NAME_MAX")
    except (OSError, ValueError):
        longest = 255
    for name in missing:
        if len(os.fsencode(name)) > longest:
            raise UserError(f"{option} {shown(p)}: the name {shown(name, 40)} is longer than the file system's "
                            f"{longest} bytes")
    _probe_folder(probe, p, option)
    return p


def _probe_folder(where: Path, asked: Path, option: str) -> None:
    """Create and remove a folder in ``where``: a folder that cannot be created there (ENOENT under
    /proc, EROFS, ENOSPC, EMLINK, …) is found before any work, in one line."""
    tmp = where / f".lcnn-zoo-probe{TMP_MARK}{os.getpid()}-{secrets.token_hex(4)}"
    try:
        os.mkdir(tmp)
    except OSError as e:
        raise UserError(f"{option} {shown(asked)}: a folder cannot be created in {shown(where)} "
                        f"({(e.strerror or type(e).__name__).lower()})") from e
    try:
        os.rmdir(tmp)
    except OSError:
        pass  # (an empty probe folder, named as a temporary: harmless)


_KINDS = ((stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder"))


def not_regular(path: str | os.PathLike) -> Optional[str]:
    """What ``path`` is when it exists but is not a regular file (``"a named pipe (FIFO)"``, ``"a
    character device"``, ``"a folder"``, ``"a broken symbolic link"``, …), else None (a regular file,
    or nothing there). Only looked at (``stat``): a FIFO is never opened, which would wait for a writer."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "a broken symbolic link" if os.path.islink(path) else None
    except OSError as e:
        return f"unreadable ({e.strerror or type(e).__name__})"
    if stat.S_ISREG(mode):
        return None
    return next((kind for test, kind in _KINDS if test(mode)), "not a file")


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink() and not any(path.iterdir())


def new_folder(parent: str | os.PathLike, name: str, *, existing: str = "suffix", option: str = "--output",
               create: bool = True) -> Path:
    """The folder ``parent/name`` for a new command's output, never one that holds anything.

    An absent or empty folder is used as it is. Otherwise ``existing="suffix"`` takes the first free
    ``name-1``, ``name-2``, … (timm's ``train.py`` convention) and ``existing="refuse"`` raises
    :class:`UserError`. The folder is claimed with ``mkdir`` (atomic: two commands never get the
    same one) when ``create``; without it, only the name is chosen (a preflight).
    """
    if existing not in EXISTING_POLICIES:
        raise UserError(f"--if-exists must be one of {', '.join(EXISTING_POLICIES)}, got {shown(existing)}")
    root = check_writable_parent(parent, option)
    for i in range(10_000):
        candidate = root / (name if i == 0 else f"{name}-{i}")
        if os.path.lexists(candidate) and not _is_empty_dir(candidate):
            if existing == "refuse":
                raise UserError(f"{shown(candidate)} exists and holds files (another run's?): choose another name, "
                                f"pass --if-exists suffix for a new {name}-N folder, or --resume to continue that run")
            continue
        if not create:
            return candidate
        _mkdirs(root)
        try:
            os.mkdir(candidate)
        except FileExistsError:
            if not _is_empty_dir(candidate):
                continue  # taken by a concurrent command just now
        except OSError as e:
            raise _os_error(e, candidate, "creating the folder") from e
        return candidate
    raise UserError(f"{shown(root)} holds {name}-1 … {name}-9999 already: choose another name")


@contextlib.contextmanager
def file_lock(path: str | os.PathLike, what: str, *, describe: Optional[str] = None) -> Iterator[None]:
    """Hold the lock on ``path`` for the block: filelock's native lock (``flock`` on Unix, so the kernel
    releases it with the process, a SIGKILL included), its file opened with ``O_NOFOLLOW`` (a symbolic
    link in its place is refused, never followed or truncated) and left in place after release.

    A second holder fails at once with a :class:`UserError` naming the first: ``describe`` (who holds
    it) is written into the file while held, where that message and :func:`lock_holder` read it.

    Args:
        path: the lock file, created if absent (with its folder).
        what: what is locked, as the message names it ("<folder> (another training run holds it)").
        describe: the holder, for the others' messages; None leaves the file empty (they say "another process").
    """
    path = Path(path)
    _mkdirs(path.parent)
    # Never a soft lock (a marker file): on a file system without flock it would outlive a killed holder.
    lock = FileLock(path, mode=0o644, blocking=False, fallback_to_soft=False)
    try:
        lock.acquire()
    except Timeout:
        holder = _note(path) or "another process"
        raise UserError(f"{what} is in use ({shown(holder)}): wait for it to finish") from None
    except OSError as e:
        raise _os_error(e, path, "opening the lock file") from e
    try:
        _write_note(path, describe or "")
        yield
    finally:
        lock.release()


def _write_note(path: Path, note: str) -> None:
    """Replace the note in the lock file ``path``, which this process holds, by ``note``. (Not filelock's
    ``on_acquired``: on Python 3.10 that needs the ``exceptiongroup`` backport.)"""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
        try:
            os.ftruncate(fd, 0)
            os.write(fd, note.encode("utf-8"))
        finally:
            os.close(fd)
    except OSError as e:
        raise _os_error(e, path, "writing the lock file") from e


def _note_of(fd: int) -> str:
    """The holder's note :func:`file_lock` wrote into the lock file open as ``fd`` (its first 200 bytes)."""
    return os.pread(fd, 200, 0).decode("utf-8", errors="replace").strip()


def _note(path: Path) -> str:
    """The holder's note in the lock file ``path`` ("" when none, or when it cannot be read)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return ""
    try:
        return _note_of(fd)
    finally:
        os.close(fd)


def lock_holder(path: str | os.PathLike) -> Optional[str]:
    """Who holds the :func:`file_lock` on ``path`` (what it wrote there, or "another process"), or None
    when nobody does (or there is no lock file). Only looks, which filelock cannot do (acquiring would
    create the file and exclude the others): the file is opened read-only without following a link,
    and a shared ``flock`` is tried and released at once (a holder's exclusive lock refuses it; two
    lookers do not refuse each other)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
    except OSError:  # absent, or a link (which no run locks: file_lock refuses it)
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _note_of(fd) or "another process"
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


class Transaction:
    """Files that change together: :meth:`add` stages each (bytes), :meth:`commit` writes them all
    under temporary names, then renames them in the order added (put the manifest last). If any
    step fails, files already renamed are restored to their previous content (or removed if new)
    and the temporaries are deleted. A SIGKILL during the renames can leave the earlier files
    new and the later ones old, never a half-written file: order the files so that the last one
    (the manifest) is what vouches for the others."""

    def __init__(self) -> None:
        self._files: List[Tuple[Path, bytes]] = []

    def add(self, path: str | os.PathLike, data: bytes | str) -> "Transaction":
        """Stage ``data`` (a str as UTF-8) for ``path``; nothing is written before :meth:`commit`."""
        self._files.append((Path(path), data.encode("utf-8") if isinstance(data, str) else bytes(data)))
        return self

    def commit(self) -> List[Path]:
        """Write every staged file, then rename them in the order added; the paths written."""
        staged: List[Tuple[Path, Path]] = []
        done: List[Tuple[Path, Optional[bytes]]] = []
        try:
            for path, data in self._files:
                _mkdirs(path.parent)
                tmp, fd = _temporary(path)
                staged.append((tmp, path))
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.chmod(tmp, _umask_mode(0o666))
            for tmp, path in staged:
                before = path.read_bytes() if path.is_file() and not path.is_symlink() else None
                os.replace(tmp, path)
                done.append((path, before))
        except BaseException as e:
            for path, before in reversed(done):
                if before is None:
                    path.unlink(missing_ok=True)
                else:
                    atomic_write(path, lambda f: f.write(before))  # (called at once: no late binding)
            for tmp, _ in staged:
                if os.path.lexists(tmp):
                    os.unlink(tmp)
            if isinstance(e, OSError):
                raise _os_error(e, staged[-1][1] if staged else Path("."), "writing") from e
            raise
        return [p for p, _ in self._files]
