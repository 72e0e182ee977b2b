"""The one exception type for mistakes a user can fix (a bad option, a missing file, a checkpoint
that does not fit): the command line prints its message on one line and exits with code 2, before
any work starts where it can be checked first.

Messages never echo unbounded user input: values are shown through :func:`shown` (a bounded
``repr``: a billion-laughs YAML value costs microseconds, not minutes), and the command line
prints at most :data:`MAX_MESSAGE` characters of one line (:func:`one_line`).
"""
from __future__ import annotations

import os
import reprlib
from typing import Any

__all__ = ["UserError", "Interrupted", "shown", "one_line", "MAX_MESSAGE"]

MAX_MESSAGE = 600  # characters of an error line the command line prints

_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxtuple, _REPR.maxdict, _REPR.maxset = 2, 4, 4, 4, 4
_REPR.maxstring, _REPR.maxother, _REPR.maxlong = 60, 60, 40


class UserError(Exception):
    """Something the user asked for cannot be done as asked; the message says what and how to fix it.

    The base of the library's refusals that a user can fix (weights that do not fit, a pretrained
    tag that cannot load, a bad environment variable) and of every command-line check: ``lcnn-zoo``
    prints the message on one line and exits with code 2.

    Args:
        message: what cannot be done and how to fix it, one sentence; values in it are shown
            through :func:`shown` (bounded).
    """


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGINT) during a command, with what to run to continue (``hint``)."""

    def __init__(self, hint: str = "") -> None:
        super().__init__(hint)
        self.hint = hint


def shown(value: Any, limit: int = 80) -> str:
    """``repr(value)`` bounded in size and time (nested containers are cut, not walked): for messages.
    A path (``os.PathLike``) is shown as it is written, unquoted, keeping its end when cut."""
    if isinstance(value, os.PathLike):
        text = repr(os.fspath(value))[1:-1]
        limit = max(limit, 160)
        return text if len(text) <= limit else "…" + text[-(limit - 1):]
    plain = value if isinstance(value, str) and len(value) <= limit and value.isprintable() else None
    text = repr(plain) if plain is not None else _REPR.repr(value)
    text = text.replace("\n", "\\n")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def one_line(message: str, limit: int = MAX_MESSAGE) -> str:
    """``message`` as one bounded line. An error re-raised by a DataLoader worker carries the worker's
    whole traceback; only its last line (the original message) is kept."""
    if "Original Traceback" in message:
        last = [ln for ln in message.splitlines() if ln.strip()][-1]
        message = last.split(": ", 1)[1] if ": " in last and last.split(": ", 1)[0].endswith("Error") else last
    message = " ".join(message.split())
    return message if len(message) <= limit else message[: limit - 1] + "…"
