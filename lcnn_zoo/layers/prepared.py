"""Values a model-level pre-forward (:mod:`.preforward`) computed for its layers, for the one forward
that follows.

A layer asks :func:`take` for its value before computing its own. It gets it only while the value is
still the function of what it was computed from: the same tensors (by identity) at the same in-place
version (``Tensor._version``, which an optimizer step, ``load_state_dict`` or a buffer write moves
on). Otherwise, and for a layer called on its own (no pre-forward ran), the layer computes its value
itself, as it did before the pre-forward existed. This module holds no layer code, so the layers can
import it and :mod:`.preforward` can import the layers.
"""
from __future__ import annotations

import weakref
from typing import Optional, Sequence, Tuple

import torch
from torch import nn

__all__ = ["Prepared", "put", "take", "drop", "snapshot", "restore"]


class Prepared:
    """One layer's prepared value and what it was computed from.

    Args:
        value: the tensor the layer would compute (W/σ, a γ-clip weight, β).
        sources: the tensors it is a function of; the value is stale once one of them is replaced or
            written in place.
        recorded: whether preparing it already made the layer's once-per-forward state update (a power
            step, a BatchNorm's scale-variance copy and counter increment).
    """

    __slots__ = ("value", "sources", "versions", "recorded", "record_used")

    def __init__(self, value: torch.Tensor, sources: Sequence[torch.Tensor], recorded: bool) -> None:
        self.value = value
        self.sources = tuple(sources)
        self.versions = tuple(t._version for t in self.sources)
        self.recorded = recorded
        self.record_used = False


# Keyed by the layer module and held weakly, so a deep copy (timm's ModelEmaV3), a pickle or a state
# dict of the model never sees a prepared tensor (a non-leaf tensor cannot be deep-copied).
_ENTRIES: "weakref.WeakKeyDictionary[nn.Module, Prepared]" = weakref.WeakKeyDictionary()


def put(module: nn.Module, value: torch.Tensor, sources: Sequence[torch.Tensor], recorded: bool) -> None:
    """Prepare ``value`` for ``module``'s next call (see :class:`Prepared` for the arguments)."""
    _ENTRIES[module] = Prepared(value, sources, recorded)


def take(module: nn.Module, sources: Sequence[torch.Tensor], record: bool) -> Optional[torch.Tensor]:
    """The value prepared for ``module``, or None when the layer must compute its own.

    Args:
        module: the layer.
        sources: the tensors the layer would compute its value from now.
        record: whether this call would make the layer's state update. The first such call uses a
            value whose preparation made the update; a second one in the same forward (a layer called
            twice) computes its own, as the layer alone would, so the state advances once per call.
    """
    if not _ENTRIES or torch.compiler.is_compiling():  # compiled graphs run the layers' own code
        return None
    entry = _ENTRIES.get(module)
    if entry is None or len(sources) != len(entry.sources):
        return None
    for now, then, version in zip(sources, entry.sources, entry.versions):
        if now is not then or now._version != version:
            return None
    if record:
        if not entry.recorded or entry.record_used:
            return None
        entry.record_used = True
    return entry.value


def drop(modules: Sequence[nn.Module]) -> None:
    """Forget the values prepared for ``modules``."""
    for m in modules:
        _ENTRIES.pop(m, None)


def snapshot(modules: Sequence[nn.Module]) -> Tuple[Tuple[nn.Module, Prepared], ...]:
    """The entries of ``modules`` now (for a gradient-checkpoint recompute: see :func:`restore`)."""
    return tuple((m, e) for m in modules if (e := _ENTRIES.get(m)) is not None)


def restore(entries: Tuple[Tuple[nn.Module, Prepared], ...]) -> None:
    """Put back entries taken by :func:`snapshot`: a recompute then uses the tensors the original
    forward used, so it saves the same tensors for backward (which ``torch.utils.checkpoint`` checks)."""
    for m, e in entries:
        _ENTRIES[m] = e
