"""The rewrites lcnnify finds on the traced graph rather than in a list of block classes (paper §3.2,
the reference ResNet's ×½ generalised).

The coverage analysis (:mod:`lcnn_zoo.coverage`) names the operation that raises a map's Lipschitz
bound above 1 and the module whose ``forward`` runs it (its *owner*). Three kinds are rewritten:

* a **sum** of k input-dependent tensors (a residual sum, a fusion of branches) becomes their
  average: ``(a + b + …) / k`` is 1-Lipschitz when each summand is;
* a **concatenation** of k such tensors is scaled by 1/√k (‖(a, b, …)‖ ≤ √k · max‖·‖);
* a parameter-free linear module whose measured operator norm g is above 1 (nearest upsampling:
  g = √(s_h s_w)) is followed by ``Scale(1/g)``;

and, with ``gates="remove"``, a **gate module** (squeeze-excite, ECA: ``x * g(x)``, a product of two
activations with no global bound) is replaced by ``nn.Identity``.

A sum or a concatenation sits inside its owner's Python ``forward``, which lcnnify cannot edit. The
owner is traced on its own (torch.fx, the analysis's leaves) and its forward replaced, on the
instance, by that graph with the rescaling inserted: :class:`TracedForward`. The owner keeps its
class, attributes, submodules and state-dict keys; the graph reads its submodules by name at every
call, so later swaps (``fold``) apply. Tracing fixes Python control flow, so an owner is rewritten
only when its graph is the same in train and eval mode and its in-place sums write nothing another
reader sees; otherwise the report keeps the finding, with the reason.
"""
from __future__ import annotations

import inspect
import math
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

import torch
import torch.fx
from timm.layers import DropBlock2d, DropPath
from torch import nn

from .coverage import CAT_OPS, SHAPE_OPS, Coverage, LeafTracer, leaves, op_name
from .layers import Scale, eval_mode

__all__ = ["TracedForward", "apply_graph_rules", "is_gate_finding"]

_SUMS = {"add", "iadd", "add_"}  # a − b is not averaged: its bound is the same, but no block uses it as a merge
_INPLACE_SUMS = {"iadd", "add_"}


class _OwnerTracer(LeafTracer):
    """The analysis's leaves, plus stochastic-depth modules (whose forward branches on ``self.training``)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (DropPath, DropBlock2d)) or super().is_leaf_module(m, qualname)


def _trace(owner: nn.Module) -> torch.fx.Graph:
    return _OwnerTracer().trace(owner)


class TracedForward:
    """``owner.forward`` replaced by its traced graph with each named node's output multiplied by
    a factor (``scales``: node name → factor) and in-place sums made out-of-place. Set on the
    instance; the graph is rebuilt from the owner's class forward on first use after a pickle."""

    def __init__(self, owner: nn.Module, scales: Dict[str, float]) -> None:
        self.owner = owner
        self.scales = dict(scales)
        self._fn: Optional[Callable[..., Any]] = None

    def _build(self) -> Callable[..., Any]:
        graph = _trace(self.owner)
        _rescale(graph, self.scales)
        gm = torch.fx.GraphModule(self.owner, graph)
        return type(gm).forward  # generated code reading ``self.<submodule>``: run with the owner as self

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run the rescaled graph on the owner, as ``owner.forward(*args, **kwargs)`` would be called."""
        if self._fn is None:
            self._fn = self._build()
        return self._fn(self.owner, *args, **kwargs)

    def __getstate__(self) -> Dict[str, Any]:
        return {"owner": self.owner, "scales": self.scales, "_fn": None}  # generated code does not pickle

    def __repr__(self) -> str:
        return f"TracedForward({type(self.owner).__name__}, scales={self.scales})"


def _rescale(graph: torch.fx.Graph, scales: Dict[str, float]) -> None:
    nodes = {n.name: n for n in graph.nodes}
    for name, factor in scales.items():
        node = nodes[name]
        if op_name(node) in _INPLACE_SUMS:  # x += y → x + y: checked to be seen by no other reader
            with graph.inserting_after(node):
                plain = graph.call_function(torch.add, tuple(node.args[:2]))
            node.replace_all_uses_with(plain)
            graph.erase_node(node)
            node = plain
        with graph.inserting_after(node):
            scaled = graph.call_function(torch.mul, (node, factor))
        node.replace_all_uses_with(scaled, delete_user_cb=lambda u: u is not scaled)
    graph.lint()


def _input_dependent(graph: torch.fx.Graph) -> Set[torch.fx.Node]:
    dep: Set[torch.fx.Node] = set()
    for n in graph.nodes:
        if n.op == "placeholder" or any(isinstance(a, torch.fx.Node) and a in dep for a in leaves((n.args, n.kwargs))):
            dep.add(n)
    return dep


def _merge_factor(node: torch.fx.Node, dep: Set[torch.fx.Node]) -> Optional[float]:
    """The factor that brings a sum or concatenation of input-dependent tensors back to 1, or None."""
    name = op_name(node)
    if name in _SUMS and not node.kwargs.get("alpha") and len(node.args) == 2:
        k = sum(1 for a in node.args if isinstance(a, torch.fx.Node) and a in dep)
        return 1.0 / k if k >= 2 else None
    if name in CAT_OPS:
        k = sum(1 for a in leaves(node.args[0] if node.args else ()) if isinstance(a, torch.fx.Node) and a in dep)
        return 1.0 / math.sqrt(k) if k >= 2 else None
    return None


def _inplace_problem(graph: torch.fx.Graph, node: torch.fx.Node) -> Optional[str]:
    """Why ``x += y`` cannot become ``x + y``: another reader of x would have seen the write."""
    target = node.args[0]
    if not isinstance(target, torch.fx.Node):
        return None
    if target.op == "placeholder":
        return "an in-place sum into the block's input (its caller sees the write)"
    if target.op != "call_module" and op_name(target) in SHAPE_OPS | {"getitem"}:
        return "an in-place sum into a view (the viewed tensor sees the write)"
    order = {n: i for i, n in enumerate(graph.nodes)}
    if any(order[u] > order[node] for u in target.users if u is not node):
        return "an in-place sum whose target is read again afterwards"
    return None


def _signature_problem(owner: nn.Module) -> Optional[str]:
    """Traced on its own, a forward's optional arguments become inputs whatever the caller passes:
    ``if skip is None`` would be fixed to one branch. Only forwards of required tensors are traced."""
    try:
        params = list(inspect.signature(type(owner).forward).parameters.values())[1:]
    except (TypeError, ValueError):
        return "its forward has no signature to trace"
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.default is not p.empty for p in params):
        return "its forward takes optional or variadic arguments (tracing it alone would fix their branches)"
    return None


def plan_owner(owner: nn.Module) -> Tuple[Dict[str, float], str]:
    """(node name → factor) for every merge in ``owner``'s forward, or ({}, why not)."""
    problem = _signature_problem(owner)
    if problem is not None:
        return {}, problem
    try:
        with eval_mode(owner):
            graph = _trace(owner)
        was = owner.training
        owner.train()
        try:
            train_graph = _trace(owner)
        finally:
            owner.train(was)
    except Exception as e:  # noqa: BLE001 - any tracing failure: the finding stays, with the reason
        return {}, f"its forward could not be traced on its own ({type(e).__name__})"
    if graph.python_code("self").src != train_graph.python_code("self").src:
        return {}, "its forward takes other operations in train and eval mode"
    dep = _input_dependent(graph)
    scales: Dict[str, float] = {}
    for node in graph.nodes:
        factor = _merge_factor(node, dep)
        if factor is None:
            continue
        if op_name(node) in _INPLACE_SUMS:
            why = _inplace_problem(graph, node)
            if why is not None:
                return {}, why
        scales[node.name] = factor
    return scales, ""


def _is_gate(owner: nn.Module) -> bool:
    """Whether ``owner.forward`` returns ``x * g(x)`` for its only input x (a squeeze-excite-like gate)."""
    try:
        with eval_mode(owner):
            graph = _trace(owner)
    except Exception:  # noqa: BLE001
        return False
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    out = next(n for n in graph.nodes if n.op == "output")
    result = out.args[0]
    if len(placeholders) != 1 or not isinstance(result, torch.fx.Node) or op_name(result) not in ("mul", "imul"):
        return False
    x = placeholders[0]
    a, b = (result.args + (None, None))[:2]
    return (a is x or b is x) and all(isinstance(t, torch.fx.Node) for t in (a, b))


def _replace(model: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def apply_graph_rules(model: nn.Module, cov: Coverage, *, merges: bool, gates: str,
                      measure: Callable[[nn.Module], Optional[float]]) -> Tuple[Dict[str, int], List[Tuple[str, str]]]:
    """Rewrite what the analysis found (see the module docstring). ``measure(module)`` is the operator
    norm of a parameter-free module at its traced input. Returns (counts per category, [(owner, why
    not)] for owners that could not be rewritten)."""
    counts: Dict[str, int] = {}
    refused: List[Tuple[str, str]] = []
    done: Set[str] = set()
    for f in cov.findings:
        if f.name in done or (f.name and not _has(model, f.name)):
            continue
        owner = model.get_submodule(f.name) if f.name else model
        category = None
        if gates == "remove" and is_gate_finding(f.reason):
            gate = _gate_owner(model, f.name)
            if gate is not None:
                _replace(model, gate, nn.Identity())
                done.add(gate)
                category = "gate_removed"
        elif merges and (f.reason.startswith("residual sum") or f.reason.startswith("concatenation")):
            if f.name and isinstance(getattr(owner, "forward", None), TracedForward):
                continue
            scales, why = plan_owner(owner)
            if not scales:
                refused.append((f.name, why or "no merge of input-dependent tensors found in its forward"))
            elif not f.name:
                refused.append((f.name, "the merge is in the model's own forward"))
            else:
                owner.forward = TracedForward(owner, scales)
                category = "merge_rescaled"
        elif merges and f.reason.endswith("> 1") and not any(True for _ in owner.parameters()) \
                and not list(owner.children()) and f.name:
            g = measure(owner)
            if g is not None and g > 1.0:
                _replace(model, f.name, nn.Sequential(owner, Scale(1.0 / g)))
                category = "linear_rescaled"
        if category:
            done.add(f.name)
            counts[category] = counts.get(category, 0) + 1
    return counts, refused


def is_gate_finding(reason: str) -> bool:
    """Whether a coverage finding is a gate (a product of two activations, a piecewise-linear gate)."""
    return "(a gate)" in reason or reason.startswith("piecewise-linear gate")


def _has(model: nn.Module, path: str) -> bool:
    try:
        model.get_submodule(path)
        return True
    except AttributeError:
        return False


def _gate_owner(model: nn.Module, path: str) -> Optional[str]:
    """The innermost module at or above ``path`` whose forward is a gate ``x * g(x)``."""
    parts = path.split(".") if path else []
    for i in range(len(parts), 0, -1):
        p = ".".join(parts[:i])
        if _is_gate(model.get_submodule(p)):
            return p
    return None
