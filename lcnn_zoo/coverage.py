"""What the LCNN bound covers in a converted model (paper §3.2, Theorem 1): the analysis behind
``model.lcnn_report``.

Theorem 1 bounds a network's curvature by the curvatures of its nonlinear layers weighted by the
Lipschitz constant of the map from the input to each of them. An LCNN keeps every such map
within Π γ (the caps of the γ-Lipschitz BNs on the way) by making each layer 1-Lipschitz. This
module checks that claim on the model's traced graph (torch.fx) rather than on a list of block
classes. Each tensor in the graph carries B, a bound on the Lipschitz constant of the map from
the input to it, with every γ-Lipschitz BN counted as 1:

* a spectrally normalised Conv2d/Linear, a γ-BN, a centered softplus, dropout and reshapes: B stays;
* a fixed linear map without parameters (pooling, padding, upsampling, expand…): B × its operator
  norm, measured by power iteration at the conversion input size;
* a multiplication by a constant c: B × |c| — a constant above 1 is declared in the report as a
  fixed gain (e.g. a logit scale) and factored out;
* a sum: the sum of the summands' B; a concatenation: the root of the sum of their squares.

A B above 1 may be brought back by a later linear op (``(a + b) * 0.5``); where it reaches a
nonlinear op or the output it is reported at the op that raised it (a sum or concatenation
lcnnify could not rewrite, an upsampling). Operations with no established bound are reported where
they are: products of two activations (gates, attention), learned scales (parameters, and buffers a
train-mode forward changes), normalisations other than BN, activations called as functions,
max-pooling, unknown modules and functions.

What the graph does not show is checked too: a leaf is given its class's role only if its forward
is that class's and no forward hook of the user's is on it; a functional dropout active in eval is
reported; an in-place write (``y.add_``, ``x[i] = v``, ``inplace=True``) updates the bound of every
live alias of the written storage; and the traced graph's output must equal the model's own (FX
records ``y += …`` out of place, so a view of y taken before would differ). When the model cannot
be traced, a module-level check runs instead and the report says that sums, concatenations and
gates between modules were not checked.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple

import torch
import torch.fx
from timm.layers import Conv2dSame, get_notrace_functions, get_notrace_modules
from timm.layers import Linear as TimmLinear
from timm.layers.pool2d_same import AvgPool2dSame
from torch import nn

from .layers import (
    CenteredSoftplus,
    FrozenCenteredSoftplus,
    LipschitzBatchNorm2d,
    LipschitzBatchNormAct2d,
    Scale,
    SpectralNorm,
    eval_mode,
    spectral_norm_of,
)

__all__ = ["Finding", "Coverage", "analyse", "BOUND_TOL"]

BOUND_TOL = 1e-3  # a bound counts as above 1 beyond this (spectral norms are converged to 1e-3)
_MEASURE_ITERS = 50


@dataclass(frozen=True)
class Finding:
    """One operation the bound does not cover: where (module path), what (op or module type), why."""

    name: str
    op: str
    reason: str


@dataclass
class Coverage:
    """Result of :func:`analyse`: the uncovered operations, the fixed gains above 1 (declared, not
    violations), and how the model was analysed ("graph" or "modules")."""

    findings: List[Finding] = field(default_factory=list)
    gains: List[Tuple[str, float]] = field(default_factory=list)
    method: str = "graph"


# ---- what each operation does to B ---------------------------------------------------
SHAPE_OPS = {"flatten", "reshape", "view", "permute", "transpose", "t", "contiguous", "squeeze", "unsqueeze",
              "clone", "to", "float", "double", "half", "bfloat16", "type", "type_as", "roll", "flip", "neg",
              "getitem", "chunk", "split", "unbind", "narrow", "select", "channel_shuffle", "pixel_shuffle",
              "pixel_unshuffle", "movedim", "swapaxes", "unflatten", "identity", "dropout", "dropout2d",
              "alpha_dropout", "feature_alpha_dropout", "detach", "mean", "squeeze_", "unsqueeze_"}
MEASURED_OPS = {"avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d", "adaptive_avg_pool2d",
                 "adaptive_avg_pool3d", "interpolate", "upsample", "upsample_nearest", "upsample_bilinear", "pad",
                 "expand", "expand_as", "repeat", "repeat_interleave", "sum", "tile", "cumsum"}
SUM_OPS = {"add", "sub", "iadd", "isub", "add_", "sub_", "rsub"}
SCALE_OPS = {"mul", "truediv", "div", "imul", "itruediv", "mul_", "div_"}
CAT_OPS = {"cat", "concat", "concatenate", "stack", "hstack", "vstack"}
_SMOOTH_BOUNDED = {"sigmoid": 0.25, "tanh": 1.0, "sigmoid_": 0.25, "tanh_": 1.0}
_PRODUCT_OPS = {"matmul", "bmm", "mm", "einsum", "baddbmm", "linear", "conv1d", "conv2d", "conv3d",
                "conv_transpose2d", "scaled_dot_product_attention", "softmax", "log_softmax"}
_NONSMOOTH = {"relu", "relu_", "relu6", "leaky_relu", "hardtanh", "hardswish", "hardsigmoid", "max_pool2d",
              "max_pool1d", "adaptive_max_pool2d", "max", "min", "amax", "amin", "abs", "clamp", "clip",
              "clamp_min", "clamp_max", "maximum", "minimum", "threshold", "elu", "selu", "celu", "gelu", "silu",
              "mish", "softplus", "hardshrink", "softshrink", "prelu", "rrelu"}
_NORMS = {"layer_norm", "group_norm", "batch_norm", "instance_norm", "local_response_norm", "normalize", "rms_norm"}


def graph_order(gm: nn.Module) -> Dict[torch.fx.Node, int]:
    """Each node of a GraphModule's graph → its position."""
    graph = gm.graph
    assert isinstance(graph, torch.fx.Graph)
    return {n: i for i, n in enumerate(graph.nodes)}


def op_name(node: torch.fx.Node) -> str:
    if node.op == "call_method":
        return str(node.target)
    return getattr(node.target, "__name__", str(node.target)).lstrip("_")


def _owner(node: torch.fx.Node) -> str:
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack") or {}
    return next(reversed(stack.values()))[0] if stack else ""


def leaves(x: Any) -> List[Any]:
    if isinstance(x, (list, tuple)):
        return [y for v in x for y in leaves(v)]
    if isinstance(x, dict):
        return [y for v in x.values() for y in leaves(v)]
    return [x]


# ---- leaf modules --------------------------------------------------------------------------
_LINEAR_MEASURED_MODULES = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
                            nn.AdaptiveAvgPool3d, nn.Upsample, nn.ZeroPad2d, nn.ConstantPad2d, nn.ReflectionPad2d,
                            nn.ReplicationPad2d, nn.PixelShuffle, nn.PixelUnshuffle, nn.ChannelShuffle)
_SHAPE_MODULES = (nn.Identity, nn.Flatten, nn.Unflatten, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
                  nn.AlphaDropout)


def _forward_class(m: nn.Module) -> type:
    """The class whose ``forward`` a module runs (parametrize's injected subclass defines none)."""
    return next(c for c in type(m).__mro__ if "forward" in c.__dict__)


#: Classes whose ``forward`` the roles below describe: a leaf whose forward comes from elsewhere (a
#: subclass that scales, standardises or otherwise changes what its base computes) is not analysed.
_UNDERSTOOD_FORWARDS: Tuple[type, ...] = (
    nn.Conv2d, nn.Linear, TimmLinear, Conv2dSame, LipschitzBatchNorm2d, LipschitzBatchNormAct2d, CenteredSoftplus,
    FrozenCenteredSoftplus, Scale, nn.Sigmoid, nn.Tanh, AvgPool2dSame)


def _package_hook(hook: Any) -> bool:
    fn = getattr(hook, "hook", hook)  # torch wraps some hooks
    return str(getattr(fn, "__module__", "") or getattr(type(fn), "__module__", "")).startswith("lcnn_zoo.")


def leaf_problem(m: nn.Module) -> Optional[str]:
    """Why a leaf module cannot be given the role of its class, or None: a forward hook the package did
    not add (FX does not trace into a leaf, so what the hook does to the output is never seen), or a
    ``forward`` defined by a class the analysis does not know."""
    hooks = [h for d in (m._forward_hooks, m._forward_pre_hooks) for h in d.values() if not _package_hook(h)]
    if hooks:
        return (f"forward hook on {type(m).__name__} ({getattr(hooks[0], '__name__', type(hooks[0]).__name__)}): "
                "what it does to the layer's input or output is not analysed")
    owner = _forward_class(m)
    known = _UNDERSTOOD_FORWARDS + _SHAPE_MODULES + _LINEAR_MEASURED_MODULES
    if owner not in known and any(isinstance(m, k) for k in known):
        return (f"{owner.__name__} overrides the forward of its base class: what it computes is not the "
                "layer the bound knows")
    return None


def module_role(m: nn.Module, reason_for: Callable[[nn.Module], str]) -> Tuple[str, float, str]:
    """(role, gain, reason) of a leaf module: its role in the bound is "linear", "nonlinear", "measure" or "flag"."""
    problem = leaf_problem(m)
    if problem is not None:
        return "flag", 0.0, problem
    if spectral_norm_of(m) is not None:
        return "linear", 1.0, ""
    if isinstance(m, LipschitzBatchNormAct2d):
        roles = [module_role(c, reason_for) for c in (m.drop, m.act)]
        bad = [k for k in roles if k[0] == "flag"]
        if bad:
            return bad[0]
        nonlinear = any(k[0] == "nonlinear" for k in roles)
        return ("nonlinear" if nonlinear else "linear"), math.prod(k[1] for k in roles), ""
    if isinstance(m, LipschitzBatchNorm2d):
        return "linear", 1.0, ""
    if isinstance(m, (CenteredSoftplus, FrozenCenteredSoftplus)):
        return "nonlinear", 1.0, ""
    if isinstance(m, Scale):
        return "linear", abs(m.scale), ""
    if isinstance(m, _SHAPE_MODULES):
        return "linear", 1.0, ""
    if isinstance(m, nn.Sigmoid):
        return "nonlinear", 0.25, ""
    if isinstance(m, nn.Tanh):
        return "nonlinear", 1.0, ""
    if isinstance(m, _LINEAR_MEASURED_MODULES + (AvgPool2dSame,)):
        return "measure", 1.0, ""
    return "flag", 0.0, reason_for(m)


# ---- the interpreter ----------------------------------------------------------------------
class LeafTracer(torch.fx.Tracer):
    """Leaves: spectrally normalised layers, the LCNN layers, and modules timm knows not to trace."""

    def __init__(self) -> None:
        super().__init__(autowrap_functions=tuple(get_notrace_functions()))
        self._notrace = tuple(get_notrace_modules())

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if spectral_norm_of(m) is not None or isinstance(m, (LipschitzBatchNorm2d, CenteredSoftplus, Scale,
                                                                FrozenCenteredSoftplus)):
            return True
        if isinstance(m, self._notrace):
            return True
        return super().is_leaf_module(m, qualname)


class _BoundInterpreter(torch.fx.Interpreter):
    def __init__(self, gm: torch.fx.GraphModule, reason_for: Callable[[nn.Module], str]) -> None:
        super().__init__(gm)
        self.reason_for = reason_for
        self.bound: Dict[torch.fx.Node, float] = {}  # input-dependent tensors only
        self.origins: Dict[torch.fx.Node, Set[torch.fx.Node]] = {}
        self.learned: Set[torch.fx.Node] = set()
        self.findings: List[Finding] = []
        self.gains: List[Tuple[str, float]] = []
        self._reported: Set[Tuple[Tuple[str, str], str]] = set()
        self._why: Dict[torch.fx.Node, str] = {}
        self.trained_buffers: Set[str] = set()

    # -- bookkeeping
    def _flag(self, node: torch.fx.Node, reason: str, op: Optional[str] = None) -> None:
        if op is None:
            op = (type(self.module.get_submodule(str(node.target))).__name__ if node.op == "call_module"
                  else op_name(node))
        key = (_owner(node), op)
        if (key, reason) in self._reported:
            return
        self._reported.add((key, reason))
        self.findings.append(Finding(key[0], key[1], reason))

    def _inputs(self, node: torch.fx.Node) -> List[torch.fx.Node]:
        return [a for a in leaves((node.args, node.kwargs)) if isinstance(a, torch.fx.Node) and a in self.bound]

    def _settle(self, node: torch.fx.Node, ins: Sequence[torch.fx.Node]) -> float:
        """B entering a nonlinear op: a bound above 1 is reported at the ops that raised it."""
        b = max((self.bound[a] for a in ins), default=1.0)
        if b > 1.0 + BOUND_TOL:
            for origin in sorted({o for a in ins for o in self.origins.get(a, ())}, key=lambda n: n.name):
                self._flag(origin, self._why[origin])
            return 1.0
        return b

    def _set(self, node: torch.fx.Node, b: float, origins: Set[torch.fx.Node]) -> None:
        self.bound[node] = b
        self.origins[node] = origins if b > 1.0 + BOUND_TOL else set()

    def _raise(self, node: torch.fx.Node, b: float, ins: Sequence[torch.fx.Node], why: str) -> None:
        origins = {o for a in ins for o in self.origins.get(a, ())}
        if b > 1.0 + BOUND_TOL and b > max((self.bound[a] for a in ins), default=0.0) + BOUND_TOL:
            origins = origins | {node}
            self._why[node] = why.format(b=b)
        self._set(node, b, origins)

    # -- per node
    def run_node(self, node: torch.fx.Node) -> Any:
        mutated = mutated_argument(node, self.module)
        before = self._before_write(mutated)
        out = super().run_node(node)
        if node.op == "placeholder":
            self._set(node, 1.0, set())
        elif node.op == "get_attr":
            if isinstance(out, nn.Parameter) or node.target in self.trained_buffers:
                self.learned.add(node)
        elif node.op == "output":
            self._settle(node, self._inputs(node))
        elif self._inputs(node) and any(isinstance(t, torch.Tensor) for t in leaves(out)):
            if node.op == "call_module":
                self._module(node, out)
            else:
                self._function(node, out)
        elif self._inputs(node) and op_name(node) == "setitem":  # x[i] = v: returns None, writes into x
            first = node.args[0]
            value = self._inputs(node)
            whole = self.bound.get(first, 0.0) if isinstance(first, torch.fx.Node) else 0.0
            self._raise(node, sum(self.bound[a] for a in value if a is not first) + whole,
                        value, "write into a slice (x[i] = v): Lipschitz bound {b:.3g} > 1")
        if before is not None and mutated is not None:
            self._after_write(node, mutated, before)
        return out

    # -- writes in place: every tensor viewing the written storage now holds the new values
    def _before_write(self, mutated: Optional[torch.fx.Node]) -> Optional[Tuple[int, float]]:
        t = self.env.get(mutated) if mutated is not None else None
        if mutated is None or not isinstance(t, torch.Tensor) or t.is_meta:
            return None
        return t.untyped_storage().data_ptr(), self.bound.get(mutated, 0.0)

    def _after_write(self, node: torch.fx.Node, mutated: torch.fx.Node, before: Tuple[int, float]) -> None:
        """An in-place op on ``mutated`` changed every alias of its storage (views taken earlier, the
        tensor a view was taken from). A full alias now has the bound of the written value; a partial
        one gains the bound of the change (new value − old value)."""
        storage, old = before
        written = self.env[mutated]
        new = self.bound.get(node, self.bound.get(mutated, 0.0))
        if node not in self.bound and mutated not in self.bound:
            return  # a constant written with a constant
        if mutated not in self.bound:
            self._flag(node, "an input-dependent value written in place into a constant (a buffer or "
                             "parameter): later reads of it are not tracked")
            return
        why = (f"in-place {op_name(node)} seen through an alias of the tensor it writes: "
               + "Lipschitz bound {b:.3g} > 1")
        order = graph_order(self.module)
        for n, t in list(self.env.items()):
            if (n is node or not isinstance(t, torch.Tensor) or t.is_meta or t.untyped_storage().data_ptr() != storage
                    or not any(order[u] > order[node] for u in n.users)):  # a dead alias is never read again
                continue
            full = (t.data_ptr() == written.data_ptr() and t.numel() == written.numel() and t.is_contiguous()
                    and written.is_contiguous())  # the same elements in the same order
            b = new if full else self.bound.get(n, 0.0) + new + old
            if b > self.bound.get(n, 0.0) + BOUND_TOL or n is mutated:
                self._why.setdefault(node, why.format(b=b))
                self._set(n, b, self.origins.get(n, set()) | self.origins.get(node, set()) | {node})

    def _module(self, node: torch.fx.Node, out: Any) -> None:
        m = self.module.get_submodule(str(node.target))
        ins = self._inputs(node)
        role, gain, reason = module_role(m, self.reason_for)
        if role == "flag":
            self._flag(node, reason, type(m).__name__)
            self._set(node, self._settle(node, ins), set())
        elif role == "nonlinear":
            self._set(node, self._settle(node, ins) * gain, set())
        else:
            sn = spectral_norm_of(m)
            x = self.env[ins[0]]
            if sn is not None and sn.layer_type == "conv2d" and sn.input_shape and tuple(x.shape[1:]) != sn.input_shape:
                # A conv called at another size than its norm was computed for: its operator there differs.
                gain = measure_norm(lambda t: m(t) - m(torch.zeros_like(t)), x)
                self._linear(node, ins, gain, f"{type(m).__name__} called at input size {tuple(x.shape[1:])}, its "
                                              f"norm computed for {sn.input_shape}: operator norm {{b:.3g}} > 1")
                return
            if role == "measure":
                gain = measure_norm(lambda t: m(t), x)
            elif gain > 1.0 + BOUND_TOL:  # a fixed factor (Scale): declared, factored out of B
                self.gains.append((str(node.target), gain))
                gain = 1.0
            self._linear(node, ins, gain, f"{type(m).__name__}: operator norm {{b:.3g}} > 1")

    def _linear(self, node: torch.fx.Node, ins: Sequence[torch.fx.Node], gain: float, why: str) -> None:
        b = max(self.bound[a] for a in ins)
        self._raise(node, b * gain, ins, why.replace("{b:.3g}", f"{gain:.3g}"))

    def _function(self, node: torch.fx.Node, out: Any) -> None:
        name = op_name(node)
        ins = self._inputs(node)
        if name in DROPOUT_OPS and active_dropout(node):
            self._flag(node, "stochastic op active in eval (dropout called with training=True): each call draws "
                             "another mask, scaled by up to 1/(1-p)", name)
            self._set(node, self._settle(node, ins), set())
        elif name == "getitem" and _advanced_index(node, self.env):
            self._measured_op(node, "indexing", ins)  # repeated indices copy an entry: norm √(repeats)
        elif name in SHAPE_OPS:
            self._linear(node, ins, 1.0, "")
        elif name in SUM_OPS:
            alpha = abs(float(node.kwargs.get("alpha", 1.0)))  # type: ignore[arg-type]  # a number in torch.add
            b = sum(self.bound[a] * (alpha if i else 1.0) for i, a in enumerate(ins))
            self._raise(node, b, ins, "residual sum: Lipschitz bound {b:.3g} > 1 (the sum of its branches' bounds)")
        elif name in CAT_OPS:
            b = math.sqrt(sum(self.bound[a] ** 2 for a in ins))
            self._raise(node, b, ins, "concatenation: Lipschitz bound {b:.3g} > 1 (root of the sum of its "
                                      "inputs' squared bounds)")
        elif name in SCALE_OPS:
            self._scale(node, name, ins)
        elif name in MEASURED_OPS:
            self._measured_op(node, name, ins)
        elif name in _SMOOTH_BOUNDED:
            self._set(node, self._settle(node, ins) * _SMOOTH_BOUNDED[name], set())
        else:
            if name in _PRODUCT_OPS:
                reason = "attention / product of activations: no Lipschitz bound"
            elif name in _NONSMOOTH:
                reason = "activation or max called as a function: not converted, not smooth"
            elif name in _NORMS:
                reason = "normalisation other than γ-Lipschitz BatchNorm: not covered by the bound"
            else:
                reason = f"operation '{name}' is not covered by the bound"
            self._flag(node, reason, name)
            self._set(node, self._settle(node, ins), set())

    def _scale(self, node: torch.fx.Node, name: str, ins: Sequence[torch.fx.Node]) -> None:
        args = list(node.args[:2])
        if len(ins) > 1 or (name in ("truediv", "div", "itruediv", "div_") and args and args[-1] in ins):
            self._flag(node, "product or quotient of two activations (a gate): no Lipschitz bound", name)
            self._set(node, self._settle(node, ins), set())
            return
        other = args[1] if args and args[0] in ins else (args[0] if args else None)
        value = self.env[other] if isinstance(other, torch.fx.Node) else other
        if isinstance(other, torch.fx.Node) and (other in self.learned or _learned_source(other, self.learned)):
            self._flag(node, "learned scale: its gain changes in training and is not bounded", name)
            self._set(node, max(self.bound[a] for a in ins), set())
            return
        divides = name in ("truediv", "div", "itruediv", "div_")
        try:  # x * c has gain max|c|; x / c has gain 1 / min|c| (the smallest entry divides the most)
            magnitudes = torch.as_tensor(value).abs() if value is not None else torch.ones(())
            mag = float(magnitudes.min() if divides else magnitudes.max())
        except (TypeError, RuntimeError):
            self._flag(node, f"multiplication by {type(value).__name__}: not covered", name)
            self._set(node, max(self.bound[a] for a in ins), set())
            return
        gain = (1.0 / mag if mag > 0 else math.inf) if divides else mag
        if not math.isfinite(gain):
            self._flag(node, "division by zero", name)
            gain = 1.0
        if gain > 1.0 + BOUND_TOL:  # declared, factored out of B
            label = other.target if isinstance(other, torch.fx.Node) and other.op == "get_attr" else name
            self.gains.append((".".join(s for s in (_owner(node), str(label)) if s), gain))
            gain = 1.0
        self._linear(node, ins, gain, "")

    def _measured_op(self, node: torch.fx.Node, name: str, ins: Sequence[torch.fx.Node]) -> None:
        if name == "pad" and (node.kwargs.get("mode", node.args[2] if len(node.args) > 2 else "constant") == "constant"
                              and float(node.kwargs.get("value", node.args[3] if len(node.args) > 3 else 0.0)  # type: ignore[arg-type]
                                        or 0.0)
                              == 0.0):
            self._linear(node, ins, 1.0, "")
            return
        first = ins[0]

        def fn(t: torch.Tensor) -> Any:  # the op with its input replaced by t, everything else as it ran
            args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), lambda a: t if a is first else self.env[a])
            if node.op == "call_method":
                return getattr(args[0], str(node.target))(*args[1:], **kwargs)
            assert callable(node.target)
            return node.target(*args, **kwargs)

        gain = measure_norm(fn, self.env[first])
        self._linear(node, ins, gain, f"{name}: operator norm {{b:.3g}} > 1")


_INPLACE_OPS = {"iadd", "isub", "imul", "itruediv", "setitem"}
_METADATA_INPLACE = {"squeeze_", "unsqueeze_", "t_", "transpose_", "resize_", "requires_grad_", "as_strided_",
                     "share_memory_", "detach_", "retain_grad"}


def mutated_argument(node: torch.fx.Node, root: nn.Module) -> Optional[torch.fx.Node]:
    """The node whose tensor ``node`` writes in place, or None: ``x.add_(y)``, ``x += y``,
    ``x[i] = v``, ``F.relu(x, inplace=True)`` and modules that return their input's storage
    (``nn.ReLU(inplace=True)``) are writes."""
    first = node.args[0] if node.args else None
    if not isinstance(first, torch.fx.Node):
        return None
    name = op_name(node)
    if node.op in ("call_function", "call_method"):
        if name in _INPLACE_OPS or (name.endswith("_") and not name.endswith("__") and name not in _METADATA_INPLACE):
            return first
        if node.kwargs.get("inplace") is True:
            return first
    if node.op == "call_module" and getattr(root.get_submodule(str(node.target)), "inplace", False) is True:
        return first
    return None


DROPOUT_OPS = {"dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout"}


def active_dropout(node: torch.fx.Node) -> bool:
    """Whether a functional dropout runs with training=True (torch.nn.functional's default) in eval mode."""
    if node.op != "call_function":
        return False
    training = node.kwargs.get("training", node.kwargs.get("train", node.args[2] if len(node.args) > 2 else True))
    return not isinstance(training, torch.fx.Node) and bool(training)


def _learned_source(node: torch.fx.Node, learned: Set[torch.fx.Node]) -> bool:
    """Whether a constant depends on a parameter in any way (``gamma.view(1, -1, 1, 1)``,
    ``self.a * self.b``, ``exp(self.log_s)``): all of its ancestors are searched, since any value
    computed from a parameter changes in training."""
    stack, seen = [node], set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n in learned:
            return True
        stack.extend(a for a in leaves((n.args, n.kwargs)) if isinstance(a, torch.fx.Node))
    return False


def _advanced_index(node: torch.fx.Node, env: Dict[torch.fx.Node, Any]) -> bool:
    """Whether ``x[index]`` indexes with a tensor or a list (a gather, which may repeat entries)."""
    index = torch.fx.node.map_arg(node.args[1] if len(node.args) > 1 else (), lambda a: env[a])
    return any(isinstance(i, (torch.Tensor, list)) for i in (index if isinstance(index, tuple) else (index,)))


@torch.no_grad()
def measure_norm(fn: Callable[[torch.Tensor], Any], like: torch.Tensor) -> float:
    """Operator norm of a linear map ``fn`` at inputs shaped like ``like``, by power iteration on
    fnᵀfn (the adjoint through autograd)."""
    v = torch.randn(like.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    v = (v / v.norm()).to(like.dtype)
    sigma = 0.0
    for _ in range(_MEASURE_ITERS):
        with torch.enable_grad():
            x = v.detach().requires_grad_(True)
            y = fn(x)
            y = y[0] if isinstance(y, (tuple, list)) else y
            (w,) = torch.autograd.grad(y, x, y.detach(), allow_unused=True)
        if w is None:
            return 0.0
        new = float(w.norm()) ** 0.5
        v = w / w.norm().clamp_min(1e-30)
        if abs(new - sigma) <= 1e-6 * new:
            return new
        sigma = new
    return sigma


def analyse(model: nn.Module, input_size: Sequence[int], reason_for: Callable[[nn.Module], str],
            trained: Optional[Set[str]] = None) -> Coverage:
    """Trace ``model`` and check every operation against the bound (see the module docstring).

    ``input_size``: (C, H, W) the operator norms are measured at; ``reason_for(module)``: why a leaf
    module the analysis does not know is not covered (lcnnify's rules table answers it);
    ``trained``: the names :func:`trained_buffers` gives (computed here when None).
    """
    with eval_mode(model):  # the guarantee is about eval mode: trace the graph eval mode takes (its branches)
        return _analyse_eval(model, input_size, reason_for, trained)


def _example(model: nn.Module, input_size: Sequence[int]) -> torch.Tensor:
    """The analysis's input: one uniform sample in [0, 1) on the model's device and dtype."""
    p = next((t for t in model.parameters() if t.is_floating_point()), None)
    x = torch.rand(1, *input_size, generator=torch.Generator().manual_seed(0))
    return x.to(device=p.device, dtype=p.dtype) if p is not None else x


def _analyse_eval(model: nn.Module, input_size: Sequence[int], reason_for: Callable[[nn.Module], str],
                  trained: Optional[Set[str]]) -> Coverage:
    try:
        gm = torch.fx.GraphModule(model, LeafTracer().trace(model))
    except Exception as e:  # noqa: BLE001 - any tracing failure means: fall back, and say so
        return _module_level(model, reason_for, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    x = _example(model, input_size)
    interp = _BoundInterpreter(gm, reason_for)
    interp.trained_buffers = trained_buffers(model, input_size) if trained is None else trained
    try:
        with torch.no_grad():
            traced = interp.run(x)
            eager = model(x)
    except Exception as e:  # noqa: BLE001
        return _module_level(model, reason_for, f"{type(e).__name__} while running the traced graph: {e}")
    if not same_function(traced, eager):
        interp.findings.insert(0, Finding("", type(model).__name__, "the traced graph computes another function than "
                                          "the model's forward (an in-place write such as `y += …` on a tensor "
                                          "viewed elsewhere, which torch.fx records out of place?)"))
    return Coverage(interp.findings, interp.gains, "graph")


def same_function(a: Any, b: Any) -> bool:
    """Whether the traced graph's outputs ``a`` equal the model's own ``b`` (float tolerance)."""
    xs, ys = leaves(a), leaves(b)
    if len(xs) != len(ys):
        return False
    for x, y in zip(xs, ys):
        if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
            if x.shape != y.shape or not torch.allclose(x, y, rtol=1e-4, atol=1e-5 * float(y.abs().max().clamp_min(1))):
                return False
    return True


def trained_buffers(model: nn.Module, input_size: Sequence[int]) -> Set[str]:
    """Names of the buffers outside the LCNN layers that a train-mode forward changes (on a copy):
    a scale kept in such a buffer moves in training like a parameter. The LCNN layers' own buffers
    (running statistics, singular vectors) are what their bounds are made of."""
    copy_ = copy.deepcopy(model).train()
    own = {f"{name}.{b}" if name else b for name, m in copy_.named_modules()
           if isinstance(m, (LipschitzBatchNorm2d, SpectralNorm)) for b, _ in m.named_buffers(recurse=False)}
    before = {n: b.detach().clone() for n, b in copy_.named_buffers() if n not in own}
    x = _example(model, input_size)
    try:
        with torch.no_grad():
            copy_(torch.cat([x, torch.rand_like(x)]))  # two samples: batch statistics need more than one
    except Exception:  # noqa: BLE001 - a model that cannot run in train mode here: nothing learned from it
        return set()
    after = dict(copy_.named_buffers())
    return {n for n, b in before.items() if n in after and not torch.equal(after[n], b)}


def _module_level(model: nn.Module, reason_for: Callable[[nn.Module], str], why: str) -> Coverage:
    """Fallback: every module the bound does not cover, plus one finding saying what was not checked."""
    findings = [Finding("", type(model).__name__, f"torch.fx could not trace the model ({why}); residual sums, "
                                                  "concatenations and gates between modules were not checked")]
    for name, m in model.named_modules():
        if (list(m.children()) and not isinstance(m, LipschitzBatchNormAct2d)) or ".parametrizations." in f".{name}.":
            continue
        role, _, reason = module_role(m, reason_for)
        if role == "flag":
            findings.append(Finding(name, type(m).__name__, reason))
    return Coverage(findings, [], "modules")
