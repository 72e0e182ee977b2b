"""The one exception type for mistakes a user can fix (a bad option, a missing file, a checkpoint
that does not fit): the command line prints its message on one line and exits with code 2, before
any work starts where it can be checked first."""
from __future__ import annotations

__all__ = ["UserError"]


class UserError(Exception):
    """Something the user asked for cannot be done as asked; the message says what and how to fix it."""
