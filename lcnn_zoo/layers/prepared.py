"""Values a model-level pre-forward (:mod:`.preforward`) computed for its layers, for the one forward
that follows.

A layer asks :func:`take` for its value before computing its own. It gets it only while the value is
still the function of what it was computed from: the same tensors (by identity) at the same in-place
version (``Tensor._version``, which an optimizer step, ``load_state_dict`` or a buffer write moves
on). Otherwise, and for a layer called on its own (no pre-forward ran), the layer computes its value
itself, as it did before the pre-forward existed. This module holds no layer code, so the layers can
import it and :mod:`.preforward` can import the layers.

A compiled forward reads its layers' values another way (:func:`put_for_graph`, :func:`for_graph`):
torch.compile traces a layer's attributes, not this module's weak dictionary. What it reads are
inputs of the graph that keep their autograd history, so the graph's backward hands their gradients on
to the Functions that computed them.
"""
from __future__ import annotations

import weakref
from typing import Optional, Sequence, Tuple

import torch
from torch import nn

__all__ = ["Prepared", "put", "take", "drop", "snapshot", "restore", "tracing", "put_for_graph", "for_graph",
           "drop_for_graph"]


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
    # (compiling first: dynamo must not trace the weak dictionary. A compiled graph reads for_graph's values.)
    if torch.compiler.is_compiling() or not _ENTRIES:
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


def tracing() -> bool:
    """Whether the code runs under torch.compile's tracing (dynamo) or an export.

    Not ``torch.compiler.is_compiling()``: that reads a process-wide flag which another thread's
    inductor compile raises (the fused activation's CPU kernels compile so), so an eager forward on
    this thread would see it."""
    return torch.compiler.is_dynamo_compiling() or torch.compiler.is_exporting()


# The attribute of a layer that holds its values for the next compiled forward: a plain attribute (a tuple,
# so nn.Module registers nothing), which dynamo reads as graph inputs and guards by shape and dtype (a new
# tensor each step compiles nothing again), and which is None between forwards.
_GRAPH_ATTR = "_lcnn_graph_values"


def put_for_graph(module: nn.Module, values: Tuple[torch.Tensor, ...]) -> None:
    """Leave ``values`` (the same tensors :func:`put` holds, autograd history included) for ``module``'s next
    compiled forward."""
    setattr(module, _GRAPH_ATTR, values)


def for_graph(module: nn.Module, record: bool) -> Optional[Tuple[torch.Tensor, ...]]:
    """The values left for ``module`` by :func:`put_for_graph` while torch.compile traces it, else None
    (an eager forward computes from :func:`take` or by itself).

    Args:
        module: the layer.
        record: whether this call would make the layer's state update. As with :func:`take`, the first
            such call uses the values (whose preparation made the update) and a second one in the same
            forward (a layer called twice) computes its own: the values are taken off the layer (dynamo
            replays that after the graph).
    """
    if not torch.compiler.is_dynamo_compiling():
        return None
    values = getattr(module, _GRAPH_ATTR, None)
    if values is not None and record:
        setattr(module, _GRAPH_ATTR, None)
    return values


def drop_for_graph(modules: Sequence[nn.Module]) -> None:
    """Forget the values left for ``modules`` by :func:`put_for_graph`."""
    for m in modules:
        if getattr(m, _GRAPH_ATTR, None) is not None:
            setattr(m, _GRAPH_ATTR, None)
