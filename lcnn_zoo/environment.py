"""The environment variables the package reads: one schema (:data:`VARIABLES`), one typed reader (:func:`env`).

Every ``LCNN_ZOO_*`` variable is declared here once, with its type, default and meaning, and read
only through :func:`env`, so that no module parses ``os.environ`` by hand. An unset or empty
variable is its default. A value that does not parse never makes ``import lcnn_zoo`` fail:

* most variables tune how the package works; a bad value is a warning
  (:class:`EnvironmentVariableWarning`, once per variable and value) that names the variable, the
  value and the default used instead, and everything runs with the default;
* a variable that says *where something goes* (``LCNN_ZOO_HUB_NAMESPACE``: the Hub namespace that
  ``push`` uploads to) is refused instead, as a one-line :class:`~lcnn_zoo.errors.UserError` from the
  command that uses it: falling back to the default would upload elsewhere than asked.

========================== ========== ========================================================
variable                   default    meaning
========================== ========== ========================================================
LCNN_ZOO_CACHE             ~/.cache/  the data cache and the default place of the published manifest
                           lcnn_zoo
LCNN_ZOO_PUBLISHED         $CACHE/    the user's published manifest (``push --upload`` records uploads)
                           published.json
LCNN_ZOO_HUB_NAMESPACE     lcnn-zoo   the Hub namespace of ``<namespace>/<model>.<tag>`` repos
LCNN_ZOO_FUSED             1          0: the activations' plain formulas instead of the fused kernels
LCNN_ZOO_TRITON_ON_CPU     0          1: route CPU tensors to the Triton kernels (tests, with TRITON_INTERPRET=1)
LCNN_ZOO_MALLOC            tuned      ``system``: the ``lcnn-zoo`` command leaves glibc's malloc settings alone
========================== ========== ========================================================

How long a Hub request may wait is huggingface_hub's own setting (``HF_HUB_ETAG_TIMEOUT``, seconds),
as is its offline mode (``HF_HUB_OFFLINE``): the package asks the Hub only through huggingface_hub.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Set, Tuple

from .errors import UserError, shown

__all__ = ["Variable", "VARIABLES", "EnvironmentVariableWarning", "env"]


class EnvironmentVariableWarning(UserWarning):
    """An ``LCNN_ZOO_*`` variable holds a value that does not parse; its default is used instead."""


@dataclass(frozen=True)
class Variable:
    """One environment variable the package reads.

    Args:
        name: the variable, e.g. ``LCNN_ZOO_FUSED``.
        default: a function returning the default (computed when read: ``LCNN_ZOO_PUBLISHED``'s
            default follows ``LCNN_ZOO_CACHE``, and ``Path.home()`` is not looked up at import).
        parse: text → value; raises ``ValueError`` whose message says what the value should be.
        meaning: what it sets, for messages.
        refuse: a bad value is a :class:`UserError` where it is used instead of a warning and the
            default (for a variable that says where something goes).
    """

    name: str
    default: Callable[[], Any]
    parse: Callable[[str], Any]
    meaning: str
    refuse: bool = False


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _flag(text: str) -> bool:
    if text.strip().lower() in _TRUE:
        return True
    if text.strip().lower() in _FALSE:
        return False
    raise ValueError("1 or 0 (or true/false, yes/no, on/off)")


def _choice(*choices: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text.strip().lower() not in choices:
            raise ValueError(" or ".join(choices))
        return text.strip().lower()
    return parse


def _path(text: str) -> Path:
    return Path(text)


def _namespace(text: str) -> str:
    # huggingface_hub's own rule for repo ids, applied to "<namespace>/<a model name>": what the
    # Hub would refuse at upload (after the folder is written) is refused before anything is done.
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    namespace = text.strip().strip("/")  # "me/" is "me", as before
    try:
        if not namespace or "/" in namespace:
            raise HFValidationError("one name")
        validate_repo_id(f"{namespace}/lcnn_resnet20.fmnist")
    except HFValidationError:
        raise ValueError("a Hugging Face user or organisation name (letters, digits, '-', '_', '.')") from None
    return namespace


def _cache_default() -> Path:
    return Path.home() / ".cache" / "lcnn_zoo"


VARIABLES: Dict[str, Variable] = {v.name: v for v in (
    Variable("LCNN_ZOO_CACHE", _cache_default, _path, "the data cache and the published manifest's folder"),
    Variable("LCNN_ZOO_PUBLISHED", lambda: env("LCNN_ZOO_CACHE") / "published.json", _path,
             "the user's published manifest"),
    Variable("LCNN_ZOO_HUB_NAMESPACE", lambda: "lcnn-zoo", _namespace, "the Hub namespace of pushed repos",
             refuse=True),
    Variable("LCNN_ZOO_FUSED", lambda: True, _flag, "the fused activation kernels"),
    Variable("LCNN_ZOO_TRITON_ON_CPU", lambda: False, _flag, "Triton kernels for CPU tensors (tests)"),
    Variable("LCNN_ZOO_MALLOC", lambda: "tuned", _choice("tuned", "system"), "the lcnn-zoo command's malloc settings"),
)}

_warned: Set[Tuple[str, str]] = set()


def env(name: str) -> Any:
    """The typed value of the ``LCNN_ZOO_*`` variable ``name`` (see the module docstring).

    Args:
        name: a key of :data:`VARIABLES`.

    Returns:
        the parsed value, or the default when the variable is unset or empty — or when its value
        does not parse, with an :class:`EnvironmentVariableWarning` naming it (once per value).

    Raises:
        UserError: a variable declared ``refuse`` holds a value that does not parse.
    """
    var = VARIABLES[name]
    raw = os.environ.get(name, "")
    if raw == "":
        return var.default()
    try:
        return var.parse(raw)
    except ValueError as e:
        if var.refuse:
            raise UserError(f"${name}={shown(raw, 60)} is not {e}: fix or unset it ({var.meaning})") from None
        default = var.default()
        if (name, raw) not in _warned:  # read per call in places (LCNN_ZOO_FUSED): say it once
            _warned.add((name, raw))
            warnings.warn(f"${name}={shown(raw, 60)} is not {e}; using the default "
                          f"{shown(default) if not isinstance(default, Path) else str(default)} ({var.meaning})",
                          EnvironmentVariableWarning, stacklevel=2)
        return default
