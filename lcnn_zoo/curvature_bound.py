"""Theorem 1 as a number: :func:`hessian_bound` bounds ‖∇²ₓ f_k(x)‖₂ for every logit k and every
input x of a model as it is now (eval mode, the input size its norms were computed for).

The paper's Σᵢ nᵢβᵢΠⱼLⱼ assumes 1-Lipschitz layers; an LCNN's BatchNorms are γ-Lipschitz, and the
curvature a layer adds grows with the *square* of the Lipschitz constant of the map into it. For
y = s(z(x)) with an elementwise s, |s'| ≤ a and |s''| ≤ c, and any unit direction u,

    ‖D²y[u, u]‖ ≤ c‖Dz u‖² + a‖D²z[u, u]‖   (the second derivative of an elementwise map acts per
                                            coordinate, and ‖v ⊙ v‖₂ ≤ ‖v‖₂²),

so each tensor of the traced graph carries (B, C): a bound on its Lipschitz constant in x and on
sup_u ‖D²(·)[u, u]‖. An affine map of norm g (a spectrally normalised conv, a BatchNorm in eval
mode — min(γ, ‖BN‖), the actual value —, pooling, a fixed scale) gives (gB, gC); a sum adds both;
a concatenation takes the root of the sum of squares; the centered softplus (a = 1, c = β/4),
sigmoid (1/4, 1/(6√3)) and tanh (1, 4/(3√3)) give (aB, cB² + aC). Unrolled on a chain,
‖∇²f‖ ≤ Σᵢ (βᵢ/4)·Pᵢ²·Qᵢ with Pᵢ the Lipschitz product up to activation i and Qᵢ the one after
it: the paper's form with the upstream product squared. On conv → BN → softplus → conv with one
pixel at the defaults (γ = 10, β = 5) it is γ²β/4 = 125, attained at x = 0.

Operations the bound does not cover (the coverage report's findings: products of activations,
other normalisations, unknown ops) make it infinite, named in ``uncovered``. With ~20 BatchNorms at
γ ≈ 10 the bound is astronomically large (Π γ² ~ 1e40): vacuous. The LCNN penalty (eq. 5) drives
γ and β down, and the number tells how far.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.fx
from torch import nn

from .coverage import (
    CAT_OPS,
    DROPOUT_OPS,
    MEASURED_OPS,
    SCALE_OPS,
    SHAPE_OPS,
    SUM_OPS,
    LeafTracer,
    active_dropout,
    graph_order,
    leaf_problem,
    leaves,
    measure_norm,
    mutated_argument,
    op_name,
    same_function,
)
from .errors import shown
from .folding import stale_spectral_norms
from .layers import CenteredSoftplus, FrozenCenteredSoftplus, LipschitzBatchNorm2d, Scale, eval_mode, spectral_norm_of
from .weight_checks import meta_tensor, weight_problem

__all__ = ["HessianBound", "hessian_bound", "BoundCheck", "verify_bounds"]

_SIGMOID_C, _TANH_C = 1.0 / (6.0 * math.sqrt(3.0)), 4.0 / (3.0 * math.sqrt(3.0))  # max |σ''|, max |tanh''|
_SAFETY = 1.0 + 1e-6  # measured operator norms are converged to 1e-8 (relative); a margin over that


@dataclass
class HessianBound:
    """Theorem 1's bound for one model, as :func:`hessian_bound` returns it.

    The numbers use each layer's true operator norm, whether or not its stored singular vectors are
    converged; an eval forward re-converges stale vectors, a write through ``.data`` needs
    :func:`~lcnn_zoo.converge_spectral_norms`.

    Attributes:
        value: bound on ‖∇²ₓ f_k(x)‖₂ for every logit k and input x (``inf`` when an operation is not covered).
        lipschitz: bound on the Lipschitz constant of f (in the input's units).
        uncovered: (module, op) of each operation that made the bound infinite.
        stale: (layer, relative residual) of the spectral norms whose stored singular vectors were not
            converged for their weights when the bound was asked for (the residual check of
            :func:`lcnn_zoo.folding.stale_spectral_norms`).
    """

    value: float
    lipschitz: float
    uncovered: List[Tuple[str, str]] = field(default_factory=list)
    stale: List[Tuple[str, float]] = field(default_factory=list)


def _activation(m: nn.Module) -> Optional[Tuple[float, float]]:
    """(max |s'|, max |s''|) of an elementwise activation module, or None."""
    if isinstance(m, (CenteredSoftplus, FrozenCenteredSoftplus)):
        return 1.0, float(m.beta) / 4.0
    if isinstance(m, nn.Sigmoid):
        return 0.25, _SIGMOID_C
    if isinstance(m, nn.Tanh):
        return 1.0, _TANH_C
    if isinstance(m, (nn.Identity, nn.Dropout)):
        return 1.0, 0.0
    return None


def _conv_norm(m: nn.Module) -> float:
    """‖W/σ‖ of a spectrally normalised layer: its true operator norm over the σ it divides by."""
    sn = spectral_norm_of(m)
    assert sn is not None
    params: Any = m.parametrizations
    w = params.weight.original.detach()
    exact = copy.deepcopy(sn)
    exact.converge(w, 500, 1e-8)
    return float(exact.sigma(w)) / float(sn.sigma(w))


class _Interpreter(torch.fx.Interpreter):
    def __init__(self, gm: torch.fx.GraphModule) -> None:
        super().__init__(gm)
        self.bc: Dict[torch.fx.Node, Tuple[float, float]] = {}
        self.uncovered: List[Tuple[str, str]] = []
        self._pending_alias: Optional[torch.fx.Node] = None
        #: activation module path → the Lipschitz bounds of its input map, one per call
        self.activation_inputs: Dict[str, List[float]] = {}

    def run_node(self, node: torch.fx.Node) -> Any:
        out = super().run_node(node)
        ins = [a for a in leaves((node.args, node.kwargs)) if isinstance(a, torch.fx.Node) and a in self.bc]
        mutated = mutated_argument(node, self.module)
        if mutated is not None and ins:
            self._after_write(node, mutated)
        if node.op == "placeholder":
            self.bc[node] = (1.0, 0.0)
        elif node.op == "output" or not ins:
            return out
        elif op_name(node) == "getitem" and isinstance(self.env[ins[0]], (tuple, list)):
            self.bc[node] = self.bc[ins[0]]  # a piece of a split: within the whole's bounds
        elif not isinstance(out, torch.Tensor):
            if isinstance(out, (tuple, list)) and op_name(node) in SHAPE_OPS:  # chunk, split, unbind
                self.bc[node] = self.bc[ins[0]]
        elif node.op == "call_module":
            self.bc[node] = self._module(node, ins)
        else:
            self.bc[node] = self._function(node, ins)
        alias, self._pending_alias = self._pending_alias, None
        if alias is not None and node in self.bc:
            self.bc[alias] = self.bc[node]
        return out

    def _after_write(self, node: torch.fx.Node, mutated: torch.fx.Node) -> None:
        """An in-place write: a later reader of the written tensor, or of any view of its storage,
        reads the new values. The bounds follow only the written tensor itself (when the write is a
        tensor op whose bounds are computed below); any other live alias is not covered."""
        written = self.env.get(mutated)
        if not isinstance(written, torch.Tensor):
            return
        order = graph_order(self.module)
        storage = written.untyped_storage().data_ptr()
        for n, t in list(self.env.items()):
            if (n is node or not isinstance(t, torch.Tensor) or t.untyped_storage().data_ptr() != storage
                    or not any(order[u] > order[node] for u in n.users)):
                continue
            if n is mutated and op_name(node) not in ("setitem",) and isinstance(self.env.get(node), torch.Tensor):
                self._pending_alias = n  # the written tensor itself: it takes the write's bounds (below)
            else:
                self.bc[n] = self._none(node, f"in-place {op_name(node)} seen through an alias")

    def _none(self, node: torch.fx.Node, what: str) -> Tuple[float, float]:
        self.uncovered.append((str(node.target) if node.op == "call_module" else node.name, what))
        return math.inf, math.inf

    def _module(self, node: torch.fx.Node, ins: List[torch.fx.Node]) -> Tuple[float, float]:
        m = self.module.get_submodule(str(node.target))
        if leaf_problem(m) is not None or any(leaf_problem(c) is not None for c in m.children()
                                              if isinstance(m, LipschitzBatchNorm2d)):
            return self._none(node, type(m).__name__)
        b, c = self.bc[ins[0]]
        x = self.env[ins[0]]
        if spectral_norm_of(m) is not None:
            g = _conv_norm(m)
        elif isinstance(m, LipschitzBatchNorm2d):  # min(γ, ‖BN‖) in eval mode, then its activation
            g = float(m.bn_lipschitz(m.running_var) * m.lipschitz_scale(m.running_var))
            acts = [_activation(a) for a in (getattr(m, "drop", nn.Identity()), getattr(m, "act", nn.Identity()))]
            if any(a is None for a in acts):
                return self._none(node, type(m).__name__)
            b, c = g * b, g * c
            if isinstance(getattr(m, "act", None), (CenteredSoftplus, FrozenCenteredSoftplus, nn.Sigmoid, nn.Tanh)):
                self.activation_inputs.setdefault(f"{node.target}.act", []).append(b * _SAFETY)
            for act in acts:
                assert act is not None
                slope, curv = act
                b, c = slope * b, curv * b * b + slope * c
            return b * _SAFETY, c * _SAFETY
        elif isinstance(m, Scale):
            g = abs(m.scale)
        elif (act := _activation(m)) is not None:
            slope, curv = act
            if not isinstance(m, (nn.Identity, nn.Dropout)):
                self.activation_inputs.setdefault(str(node.target), []).append(b)
            return slope * b, curv * b * b + slope * c
        else:
            try:
                g = measure_norm(lambda t: m(t) - m(torch.zeros_like(t)), x)
            except Exception:  # noqa: BLE001 - a module that is not affine: not covered
                return self._none(node, type(m).__name__)
            if not _is_affine(m, x):
                return self._none(node, type(m).__name__)
        return g * b * _SAFETY, g * c * _SAFETY

    def _function(self, node: torch.fx.Node, ins: List[torch.fx.Node]) -> Tuple[float, float]:
        name = op_name(node)
        bcs = [self.bc[a] for a in ins]
        if name in SUM_OPS:
            alpha = abs(float(node.kwargs.get("alpha", 1.0)))  # type: ignore[arg-type]  # a number in torch.add
            w = [1.0] + [alpha] * (len(bcs) - 1)
            return sum(k * b for k, (b, _) in zip(w, bcs)), sum(k * c for k, (_, c) in zip(w, bcs))
        if name in CAT_OPS:
            return math.sqrt(sum(b * b for b, _ in bcs)), math.sqrt(sum(c * c for _, c in bcs))
        if len(ins) != 1 or (name in DROPOUT_OPS and active_dropout(node)):
            return self._none(node, name)
        if name in SHAPE_OPS | SCALE_OPS | MEASURED_OPS or name == "getitem":
            first = ins[0]

            def fn(t: torch.Tensor) -> Any:
                args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs),
                                                     lambda a: t if a is first else self.env[a])
                if node.op == "call_method":
                    return getattr(args[0], str(node.target))(*args[1:], **kwargs)
                assert callable(node.target)
                return node.target(*args, **kwargs)

            x = self.env[first]
            if not _is_affine(fn, x):
                return self._none(node, name)
            g = measure_norm(lambda t: fn(t) - fn(torch.zeros_like(t)), x)
            b, c = bcs[0]
            return g * b * _SAFETY, g * c * _SAFETY
        return self._none(node, name)


@torch.no_grad()
def _is_affine(fn, x: torch.Tensor) -> bool:
    """f(a) + f(b) = f(a + b) + f(0) at random points: a check that ``fn`` is affine (pooling,
    padding, indexing are; a max-pool or an activation is not)."""
    g = torch.Generator().manual_seed(1)
    a = torch.randn(x.shape, generator=g, dtype=torch.float64).to(x)
    b = torch.randn(x.shape, generator=g, dtype=torch.float64).to(x)
    lhs, rhs = fn(a) + fn(b), fn(a + b) + fn(torch.zeros_like(x))
    return bool(torch.allclose(lhs, rhs, rtol=1e-4, atol=1e-5 * float(lhs.abs().max().clamp_min(1.0))))


def _analysable(model: nn.Module, input_size: Optional[Sequence[int]], what: str) -> Sequence[int]:
    """The input size to analyse ``model`` at; refuses, in one sentence each, a model the analysis
    cannot give a number for: no input size, weights on the meta device, weights that are not finite
    (a NaN β makes every bound NaN) or a negative BatchNorm variance."""
    report = getattr(model, "lcnn_report", None)
    size = input_size or getattr(report, "input_size", None)
    if size is None and report is None:  # "pass input_size" would be the wrong fix: the bound needs an LCNN
        raise ValueError(f"{what}: {type(model).__name__} is not an LCNN (no lcnn_report): convert it with "
                         f"lcnn_zoo.lcnnify(model, input_size=(C, H, W)), or pass input_size=(C, H, W) to bound it as "
                         f"it is (operations the analysis does not cover, e.g. ReLU, make the bound infinite)")
    if size is None:
        raise ValueError(f"{what}: the model's input size is unknown: pass input_size=(C, H, W)")
    if input_size is not None:
        size = _input_size(input_size, what)
    meta = meta_tensor(model)
    if meta is not None:
        raise ValueError(f"{what}: the model is on the meta device ({meta} has a shape but no values): load its "
                         f"weights first (model.to_empty(device='cpu'), then load_state_dict)")
    low = next(((n, t.dtype) for n, t in [*model.named_parameters(), *model.named_buffers()]
                if t.dtype in (torch.float16, torch.bfloat16)), None)
    if low is not None:  # eigh, the power iterations and the 1e-8 convergence need float32 at least
        raise ValueError(f"{what}: the model is in half precision ({shown(low[0])} is "
                         f"{str(low[1]).removeprefix('torch.')}): the bound is computed in float32 or float64: "
                         f"call model.float() first")
    problem = weight_problem([*model.named_parameters(), *model.named_buffers()])
    if problem is not None:
        raise ValueError(f"{what}: {problem}: the bound is undefined for these weights")
    return size


def _input_size(size: Any, what: str) -> Tuple[int, ...]:
    """``size`` as a tuple of positive ints, or a ValueError naming input_size."""
    ok = (isinstance(size, (tuple, list, torch.Size)) and len(size) > 0
          and all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size))
    if not ok:
        raise ValueError(f"{what}: input_size must be (C, H, W), a sequence of positive ints; got {shown(size)}")
    return tuple(int(s) for s in size)


def hessian_bound(model: nn.Module, input_size: Optional[Sequence[int]] = None) -> HessianBound:
    """Bound ‖∇²ₓ f_k(x)‖₂ for every logit k and every input x of ``model`` in eval mode (Theorem 1).

    See the module docstring. The number holds for the current weights, BatchNorm statistics and β,
    at the input size the model's convolution norms were computed for.

    Args:
        model: the model (an LCNN, or any model when ``input_size`` is given); it is traced with
            torch.fx and run once in eval mode (its mode is restored).
        input_size: (C, H, W) (default: ``model.lcnn_report.input_size``).

    Returns:
        :class:`HessianBound`: the bound, the Lipschitz bound, what is not covered, stale spectral norms.

    Raises:
        ValueError: the bound has no value for this model: it is not an LCNN and no ``input_size`` is
            given; it is on the meta device or in half precision; a parameter or buffer is not finite (a
            NaN ``log_beta`` or ``gamma_raw``…) or a BatchNorm's ``running_var`` is negative. The message
            names the tensor. (A finite model always gets a number: ``inf`` when an operation is not covered.)
    """
    size = _analysable(model, input_size, "hessian_bound")
    stale = stale_spectral_norms(model)  # before the traced run below, whose eval forward re-converges them
    with eval_mode(model):
        gm = torch.fx.GraphModule(model, LeafTracer().trace(model))
        p = next((t for t in model.parameters() if t.is_floating_point()), None)
        x = torch.rand(1, *size, generator=torch.Generator().manual_seed(0))
        x = x.to(device=p.device, dtype=p.dtype) if p is not None else x
        interp = _Interpreter(gm)
        with torch.no_grad():
            if not same_function(interp.run(x), model(x)):
                interp.uncovered.append(("", "the traced graph computes another function than the model's forward"))
    out = next(n for n in gm.graph.nodes if n.op == "output")
    finals = [interp.bc[a] for a in leaves(out.args) if isinstance(a, torch.fx.Node) and a in interp.bc]
    b = max((v[0] for v in finals), default=math.inf)
    c = max((v[1] for v in finals), default=math.inf)
    if interp.uncovered:  # a node the bounds do not follow may reach the output by a path they miss
        b = c = math.inf
    if math.isnan(b) or math.isnan(c):  # finite weights that still give no number: never a silent nan
        raise ValueError(f"hessian_bound: the bound is not a number (value={c}, lipschitz={b}) for these weights: "
                         f"check their spectral-norm singular vectors and BatchNorm statistics")
    return HessianBound(c, b, interp.uncovered, stale)


@dataclass(frozen=True)
class BoundCheck:
    """One map of the model checked against its own numerical lower bound.

    Attributes:
        name: the map: ``"output"`` (input → logits) or ``"<activation path> input"`` (input → what
            that activation receives, over all its calls).
        claimed: the analysis's bound on its Lipschitz constant in eval mode (what :func:`hessian_bound`
            propagates: each layer's true operator norm, each BatchNorm's min(γ, ‖BN‖)).
        measured: a lower bound on it: the largest ‖J v‖ / ‖v‖ that power iteration on JᵀJ reached at
            random inputs (J the map's Jacobian there).
    """

    name: str
    claimed: float
    measured: float

    @property
    def ok(self) -> bool:
        """The claim is not beaten by its lower bound (1e-3 relative slack for float32 rounding)."""
        return self.measured <= self.claimed * (1.0 + 1e-3) + 1e-6


def verify_bounds(model: nn.Module, input_size: Optional[Sequence[int]] = None, *, points: int = 2,
                  iterations: int = 20, seed: int = 0, max_maps: Optional[int] = None) -> List[BoundCheck]:
    """Check the Lipschitz bounds the analysis claims against numerical lower bounds.

    For the map from the input to every activation's input and to the output: power iteration on JᵀJ
    (J v by double backward, Jᵀ u by backward) at ``points`` random inputs in [0, 1). A check whose
    ``measured`` exceeds its ``claimed`` is a bug in the analysis (``ok`` is False); the test suite
    runs this on every model family it claims.

    All maps are iterated at once: sample m of a batch carries map m's vector (eval mode keeps the
    samples independent). Cost: about ``4 × points × iterations`` forward passes of a batch of
    (number of activations + 1).

    Args:
        model: the model (eval mode is used; its mode is restored).
        input_size: (C, H, W) (default: ``model.lcnn_report.input_size``).
        points: random inputs to iterate from (≥ 1).
        iterations: power iterations at each (≥ 1).
        seed: seeds the traced run's input, the random inputs and the start vectors.
        max_maps: check the output and at most this many activations, evenly spaced in the order
            the analysis met them (default: all; the batch holds one sample per map).

    Returns:
        One :class:`BoundCheck` per map, the output first.

    Raises:
        ValueError: ``points`` or ``iterations`` is not an int ≥ 1, or as :func:`hessian_bound`.
    """
    for arg, value in (("points", points), ("iterations", iterations)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:  # 0 measures nothing: a false pass
            raise ValueError(f"verify_bounds: {arg} must be an int >= 1, got {shown(value)}")
    size = _analysable(model, input_size, "verify_bounds")
    with eval_mode(model):
        gm = torch.fx.GraphModule(model, LeafTracer().trace(model))
        p = next((t for t in model.parameters() if t.is_floating_point()), None)
        dtype, device = (p.dtype, p.device) if p is not None else (torch.float32, None)
        interp = _Interpreter(gm)
        with torch.no_grad():
            interp.run(torch.rand(1, *size, generator=torch.Generator().manual_seed(seed)).to(device, dtype))
        out = next(n for n in gm.graph.nodes if n.op == "output")
        finals = [interp.bc[a][0] for a in leaves(out.args) if isinstance(a, torch.fx.Node) and a in interp.bc]
        claims = {"output": max(finals, default=math.inf)}
        acts = list(interp.activation_inputs.items())
        if max_maps is not None and len(acts) > max_maps:
            acts = [acts[round(i * (len(acts) - 1) / max(max_maps - 1, 1))] for i in range(max_maps)]
        for path, bs in acts:
            claims[f"{path} input"] = math.sqrt(sum(b * b for b in bs))
        names = list(claims)
        gen = torch.Generator().manual_seed(seed + 1)
        measured = [0.0] * len(names)
        for _ in range(points):
            x = torch.rand(1, *size, generator=gen).to(device, dtype).expand(len(names), *size).contiguous()
            for i, v in enumerate(_power_iteration(model, names, x, iterations, gen)):
                measured[i] = max(measured[i], v)
    return [BoundCheck(n, claims[n], m) for n, m in zip(names, measured)]


def _maps(model: nn.Module, names: List[str], x: torch.Tensor) -> List[torch.Tensor]:
    """Sample m's value of map m (the output, or what an activation receives, over all its calls)."""
    seen: Dict[str, List[torch.Tensor]] = {n: [] for n in names}
    handles = [model.get_submodule(n[: -len(" input")]).register_forward_pre_hook(
        lambda mod, a, _n=n: seen[_n].append(a[0])) for n in names if n != "output"]
    try:
        y = model(x)
    finally:
        for h in handles:
            h.remove()
    seen["output"] = [y]
    return [torch.cat([t[m].reshape(-1) for t in seen[n]]) for m, n in enumerate(names)]


def _inner(xs: List[torch.Tensor], ys: List[torch.Tensor]) -> torch.Tensor:
    """Σ_m ⟨x_m, y_m⟩."""
    return torch.stack([(x * y).sum() for x, y in zip(xs, ys)]).sum()


def _power_iteration(model: nn.Module, names: List[str], x: torch.Tensor, iterations: int,
                     gen: torch.Generator) -> List[float]:
    v = torch.randn(x.shape, generator=gen).to(x)
    v = v / v.flatten(1).norm(dim=1).view(-1, *[1] * (x.dim() - 1))
    sigma = torch.zeros(x.shape[0], dtype=torch.float64)
    for _ in range(iterations):
        xr = x.detach().requires_grad_(True)
        hs = _maps(model, names, xr)
        us = [torch.zeros_like(h, requires_grad=True) for h in hs]
        (jt,) = torch.autograd.grad(_inner(hs, us), xr, create_graph=True)
        grads = torch.autograd.grad((jt * v).sum(), us, allow_unused=True)  # J_m v_m, per map
        jv = [torch.zeros_like(h) if g is None else g.detach() for h, g in zip(hs, grads)]
        sigma = torch.maximum(sigma, torch.stack([g.double().norm() for g in jv]))
        (w,) = torch.autograd.grad(_inner(hs, jv), xr)  # J_mᵀ J_m v_m
        norms = w.flatten(1).norm(dim=1)
        if not bool((norms > 0).all()):
            break
        v = (w / norms.view(-1, *[1] * (x.dim() - 1))).detach()
    return [float(s) for s in sigma]
