"""One model-level pre-forward for the LCNN's parameter work (paper §3: spectral norm, γ-BatchNorm,
centered softplus β, and the penalty's terms).

Called alone, each LCNN layer computes its parameter-dependent value at every training forward: a
spectral norm its power step and W/σ, a γ-Lipschitz BatchNorm its γ-clip, a centered softplus
β = exp(log β). Each is a chain of tiny ops (~17, ~16 and ~5 forward and backward), and a ResNet-18
has sixty such layers, so the parameter work dispatched several times the ops of the net itself.
Those values depend on the parameters and buffers only, not on the input, so they can be computed
for all layers together before the forward: :func:`prepare` does that with ``torch._foreach_*`` ops
over all layers and three autograd Functions whose forward and backward each make a constant number
of ops (the power step's convolutions, one per layer and direction, cannot be batched). The layers
take the prepared values (:mod:`.prepared`) and compute their own only when none is there (a layer
called alone, an eval forward, a compiled graph).

:func:`install` registers :func:`prepare` as a forward pre-hook on the model root (``lcnnify`` does,
so every zoo LCNN has it) and a forward hook (``always_call``) that drops the values after the
forward; the hooks are module-level functions, so deep copies (timm's ModelEmaV3) keep them. The
values are the same functions of the same parameters, computed with the same formulas: the forward,
the loss and the gradients agree with the per-layer path to float rounding, the singular vectors and
BatchNorm statistics advance once per recording forward as before, and the saved state is unchanged.
"""
from __future__ import annotations

import contextlib
import threading
import weakref
from typing import Any, ContextManager, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from . import prepared
from .activation import CenteredSoftplus
from .batchnorm import LipschitzBatchNorm2d
from .spectral_norm import SpectralNorm, divide_by_sigma_backward, drop_hooks, spectral_norm_modules
from .state import frozen_state

__all__ = ["install", "uninstall", "prepare", "release", "checkpoint_contexts", "prepared_penalty_terms"]

_EPS = 1e-12  # as spectral_norm's: the smallest σ

#: what the ``torch._foreach_*`` ops take and return
_Tensors = Union[Tuple[torch.Tensor, ...], List[torch.Tensor]]


# ---- the hooks ----------------------------------------------------------------------------------
def install(model: nn.Module) -> nn.Module:
    """Register the pre-forward on ``model`` (its root): :func:`prepare` before each forward, and the
    values dropped after it (also when it raises). Idempotent. Returns ``model``.

    Args:
        model: an LCNN (its layers may be anywhere below the root).
    """
    if _pre_forward_hook not in model._forward_pre_hooks.values():
        model.register_forward_pre_hook(_pre_forward_hook)
        model.register_forward_hook(_post_forward_hook, always_call=True)
    for layer, _ in spectral_norm_modules(model):
        if _layer_pre_hook not in layer._forward_pre_hooks.values():
            layer.register_forward_pre_hook(_layer_pre_hook)
            layer.register_forward_hook(_layer_post_hook, always_call=True)
    return model


def uninstall(model: nn.Module) -> None:
    """Remove the hooks :func:`install` registered (by identity: a deep copy has no handles)."""
    for module in model.modules():
        drop_hooks(module._forward_pre_hooks, _pre_forward_hook)
        drop_hooks(module._forward_pre_hooks, _layer_pre_hook)
        for key in [k for k, h in module._forward_hooks.items() if h in (_post_forward_hook, _layer_post_hook)]:
            del module._forward_hooks[key]
            module._forward_hooks_always_called.pop(key, None)


def _pre_forward_hook(model: nn.Module, args: Tuple[Any, ...]) -> None:
    if not model.training:  # (eval: each layer re-converges its own σ)
        return
    if _compiled_training(model):
        _prepare_for_graph(model)  # (a graph break: it runs eagerly, before the graph of the forward)
        return
    if _runs_layers_own_code(args):
        return
    prepare(model)


def _post_forward_hook(model: nn.Module, args: Tuple[Any, ...], output: Any) -> None:
    if _compiled_training(model):
        _release_for_graph(model)
    elif not torch.compiler.is_dynamo_compiling():  # (see _layer_pre_hook)
        release(model)


def _compiled_training(model: nn.Module) -> bool:
    """Whether torch.compile traces a training forward of ``model`` (not an export, which the layers refuse)."""
    return model.training and torch.compiler.is_dynamo_compiling() and not torch.compiler.is_exporting()


def _layer_pre_hook(layer: nn.Module, args: Tuple[Any, ...]) -> None:
    # Around a spectral-normalised layer's own forward only: saved-tensor hooks cost autograd work for
    # every tensor saved under them (a detach at unpack for a Python Function's), so they are not
    # left active over the whole forward.
    # (dynamo first: it must not trace the weak dictionaries, whose keys are modules. is_dynamo_compiling,
    # not is_compiling: is_compiling reads a process-wide flag that another thread's AOT tracing sets (an
    # inductor compile), so a forward hook seeing it there would leave this thread's hooks pushed.)
    if torch.compiler.is_dynamo_compiling() or not torch.is_grad_enabled():
        return
    # under allow_mutation_on_saved_tensors W may be changed in place before the backward: W/σ is kept
    if getattr(torch.autograd.graph, "_allow_mutation_on_saved_tensors_enabled", False):
        return
    entry = _NORMALIZED.get(layer)
    if entry is None:
        return
    hooks = _RecomputeNormalized(entry)
    try:
        hooks.__enter__()
    except RuntimeError:  # saved-tensor hooks disabled here (torch.autograd.graph.disable_saved_tensors_hooks)
        return
    _hooks_of_this_thread().setdefault(layer, []).append(hooks)


def _layer_post_hook(layer: nn.Module, args: Tuple[Any, ...], output: Any) -> None:
    if torch.compiler.is_dynamo_compiling():  # (see _layer_pre_hook)
        return
    stack = _hooks_of_this_thread().get(layer)
    if stack:
        stack.pop().close()
        if not stack:
            del _hooks_of_this_thread()[layer]


_THREAD = threading.local()


def _hooks_of_this_thread() -> "weakref.WeakKeyDictionary[nn.Module, List[_RecomputeNormalized]]":
    """The saved-tensor hooks each layer's pre-hook entered on this thread (the hooks' stack is per thread)."""
    table = getattr(_THREAD, "hooks", None)
    if table is None:
        table = _THREAD.hooks = weakref.WeakKeyDictionary()
    return table


def _runs_layers_own_code(args: Tuple[Any, ...]) -> bool:
    """Where the layers compute their own values: exports (the layers refuse them with a message),
    TorchScript tracing, torch.func transforms and FX tracing (a Proxy is no tensor). (A compiled root is
    prepared by :func:`_prepare_for_graph`, before this is asked.)"""
    if torch.compiler.is_compiling() or torch.compiler.is_exporting() or torch.jit.is_tracing():
        return True
    if torch.onnx.is_in_onnx_export():
        return True
    x = args[0] if args else None
    if not isinstance(x, torch.Tensor):
        return True
    return bool(torch._C._functorch.is_functorch_wrapped_tensor(x))


#: the layers each root prepared values for (and the spectral norms' layers), so that its forward hook
#: drops exactly those
_FRAMES: "weakref.WeakKeyDictionary[nn.Module, List[nn.Module]]" = weakref.WeakKeyDictionary()
#: each spectral-normalised layer's prepared (W/σ, W, σ), for :class:`_RecomputeNormalized`
_NORMALIZED: "weakref.WeakKeyDictionary[nn.Module, Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]" = (
    weakref.WeakKeyDictionary())


def prepare(model: nn.Module, for_graph: bool = False) -> int:
    """Compute, for all of ``model``'s LCNN layers in training mode at once, what each computes at a
    training forward, and leave it for the forward that follows. Returns the number of layers prepared.

    * spectral norms (one power step per recording forward, on zero-padded convolutions and linear
      layers; others compute their own): the step on the singular-vector buffers, σ = ‖A_W v‖ and W/σ,
      with the gradient of :class:`~.spectral_norm.SpectralNorm`'s own Function;
    * γ-Lipschitz BatchNorms without affine parameters: the scale-variance copy of a recording forward
      and the γ-clip weight;
    * centered softplus: β = exp(log β);
    * the penalty's Σβ and Σ log γ (:func:`prepared_penalty_terms`), from the same Function as β and γ.

    Layers in :func:`~.state.frozen_state` are prepared without their state update, as they compute.
    The values are dropped by :func:`release` (the root's forward hook).

    Args:
        model: the model root.
        for_graph: the forward that follows is compiled (see :func:`_prepare_for_graph`): each γ-BN's
            running-statistics step is computed too. (The values always go where a compiled graph reads
            them, :func:`~.prepared.put_for_graph`, so that a part of the model compiled alone inside an eager
            forward uses them too, rather than making a second power step.)
    """
    release(model)
    done: List[nn.Module] = []
    with _autocast_off(model):
        _prepare_spectral_norms(model, done, for_graph)
        _prepare_curvature(model, done, for_graph)
    if done:
        _FRAMES[model] = done
    return len(done)


def release(model: nn.Module) -> None:
    """Drop the values :func:`prepare` left for ``model``'s layers."""
    frame = _FRAMES.pop(model, ())
    prepared.drop(frame)
    prepared.drop_for_graph(frame)
    for m in frame:
        _NORMALIZED.pop(m, None)


_GRAPH_BREAK = ("lcnn_zoo: an LCNN's power steps and γ-clips run eagerly before a compiled training forward (a graph "
                "break at its root's pre-hook): compile its training forward without fullgraph=True")


@torch.compiler.disable(reason=_GRAPH_BREAK)
def _prepare_for_graph(model: nn.Module) -> None:
    """:func:`prepare` for a compiled training forward, run eagerly before its graph (``torch.compiler.disable``:
    a graph break at the root's pre-hook). The values also go on the layers (:func:`~.prepared.put_for_graph`),
    where the graph reads them as inputs: W/σ, the γ-clips and β arrive with their autograd history, so
    the graph's backward hands their gradients to the pre-forward's Functions (foreach ops, eagerly). The
    graph holds the net's own ops, not the power step's convolutions, norms and buffer writes nor the
    W/σ and clip formulas; and it compiles once (the values are new tensors of the same shapes at each
    step). The state advances as in eager mode: one power step and one scale-variance copy per
    recording forward, none in :func:`~.state.frozen_state`."""
    prepare(model, for_graph=True)


@torch.compiler.disable(reason=_GRAPH_BREAK)
def _release_for_graph(model: nn.Module) -> None:
    """:func:`release` after a compiled training forward (eagerly, after its graph)."""
    release(model)


@contextlib.contextmanager
def _autocast_off(model: nn.Module) -> Iterator[None]:
    # σ and the clips are computed in the parameters' precision, as the layers compute them (a bf16
    # operator product would make σ off by its rounding).
    with contextlib.ExitStack() as stack:
        for device in ("cpu", "cuda"):
            if torch.is_autocast_enabled(device):
                stack.enter_context(torch.autocast(device, enabled=False))
        yield


def checkpoint_contexts(module: nn.Module) -> Tuple[ContextManager[Any], ContextManager[Any]]:
    """``context_fn`` contexts for ``torch.utils.checkpoint`` of a part of an LCNN: the forward keeps
    the part's prepared values, and the recompute runs in :func:`~.state.frozen_state` with those values
    back, so it computes (and saves for backward) exactly what the forward did.

    Args:
        module: the checkpointed part.
    """
    kept: List[Tuple[Tuple[Tuple[nn.Module, prepared.Prepared], ...], Dict[nn.Module, Any]]] = []
    layers = [m for m in module.modules() if isinstance(m, (SpectralNorm, LipschitzBatchNorm2d, CenteredSoftplus))]
    # and the layers whose W/σ the backward recomputes: the recompute must save what the forward saved, in
    # the same order (the checkpoint matches them by position), so it hands the same W/σ to the same hooks
    owners = [m for m, _ in spectral_norm_modules(module)]

    @contextlib.contextmanager
    def forward() -> Iterator[None]:
        kept.append((prepared.snapshot(layers), {m: _NORMALIZED[m] for m in owners if m in _NORMALIZED}))
        yield

    @contextlib.contextmanager
    def recompute() -> Iterator[None]:
        entries, normalized = kept[-1] if kept else ((), {})
        prepared.restore(entries)
        _NORMALIZED.update(normalized)
        try:
            with frozen_state(module):
                yield
        finally:
            prepared.drop([m for m, _ in entries])
            for m in normalized:
                _NORMALIZED.pop(m, None)

    return _Reusable(forward), _Reusable(recompute)


class _Reusable:
    """A context manager that can be entered again (a new ``factory()`` each time): torch.utils.checkpoint
    enters the recompute context once per recompute, and a double backward or ``retain_graph`` recomputes
    a part more than once (a generator's context manager is single-use)."""

    def __init__(self, factory: Any) -> None:
        self.factory = factory
        self.active: List[Any] = []

    def __enter__(self) -> Any:
        cm = self.factory()
        self.active.append(cm)
        return cm.__enter__()

    def __exit__(self, *exc: Any) -> Any:
        return self.active.pop().__exit__(*exc)


# ---- spectral norms --------------------------------------------------------------------------------
def _batched(sn: SpectralNorm) -> bool:
    """Whether the pre-forward prepares this spectral norm: training mode, one power step, vectors and
    padding known, and a σ gradient in closed form (reflect/replicate/circular padding have none)."""
    return (sn.training and sn.n_power_iterations == 1 and sn._v is not None and sn._u is not None
            and sn.op.padding is not None and sn.op.sigma_gradient is not None)


def _normalize_(xs: _Tensors) -> _Tensors:
    """x / max(‖x‖, eps) for every x, in place (three ops for the whole list)."""
    norms = torch._foreach_norm(xs)
    torch._foreach_clamp_min_(norms, _EPS)
    torch._foreach_div_(xs, norms)
    return xs


def _spectral_norms(model: nn.Module) -> Tuple[List[nn.Module], List[SpectralNorm], List[torch.Tensor]]:
    """The spectral norms :func:`_batched` admits: (their layers, themselves, their weights W)."""
    layers: List[nn.Module] = []
    sns: List[SpectralNorm] = []
    weights: List[torch.Tensor] = []
    for layer, sn in spectral_norm_modules(model):
        parametrizations: Any = layer.parametrizations  # (torch's stubs type a submodule as Tensor | Module)
        chain = parametrizations.weight  # a ParametrizationList
        if len(chain) == 1 and _batched(sn) and not chain.original.is_meta:
            layers.append(layer)
            sns.append(sn)
            weights.append(chain.original)
    return layers, sns, weights


def _prepare_spectral_norms(model: nn.Module, done: List[nn.Module], for_graph: bool) -> None:
    """Prepare W/σ for every spectral norm :func:`_batched` admits (listed in ``done`` with its layer)."""
    layers, sns, weights = _spectral_norms(model)
    if not sns:
        return
    records = [not sn.frozen for sn in sns]
    sigmas, us, vs = _power_steps(sns, weights, records)
    gradients = [sn.op.sigma_gradient for sn in sns]
    normalized = _DivideAllBySigma.apply(len(sns), gradients, *sigmas, *us, *vs, *weights)
    for layer, sn, w, sigma, value, record in zip(layers, sns, weights, sigmas, normalized, records):
        prepared.put(sn, value, (w, sn._u, sn._v), record)
        prepared.put_for_graph(sn, (value,))
        _NORMALIZED[layer] = (value, w, sigma)
        done += (sn, layer)


def _power_steps(sns: Sequence[SpectralNorm], weights: Sequence[torch.Tensor], records: Sequence[bool]
                 ) -> Tuple[_Tensors, _Tensors, List[torch.Tensor]]:
    """One power step of each spectral norm (:meth:`SpectralNorm._training_normalized`, for all at once),
    the buffers written for the recording ones: (σ, u, v) per layer, in tensors that no later step writes
    (the backward reads them)."""
    with torch.no_grad():
        # The power step (SpectralNorm._training_normalized, for all layers): v ← Aᵀu/‖Aᵀu‖ on the
        # recording layers, then σ = ‖Av‖ and u = Av/σ; frozen layers use their v as it is.
        moving = [i for i, r in enumerate(records) if r]
        # vs: v as this forward uses it, in tensors no later power step writes (the backward reads them)
        vs: List[torch.Tensor] = [sn._v for sn in sns]
        if moving:
            steps = _normalize_([sns[i].adjoint(sns[i]._u, weights[i]) for i in moving])
            torch._foreach_copy_([sns[i]._v for i in moving], steps)
            for i, step in zip(moving, steps):
                vs[i] = step
        kept = [i for i, r in enumerate(records) if not r]
        if kept:  # (a copy of each in one op: foreach has no clone)
            for i, copied in zip(kept, torch._foreach_mul([vs[i] for i in kept], 1.0)):
                vs[i] = copied
        images = [sn.operator(v, w) for sn, v, w in zip(sns, vs, weights)]
        sigmas = torch._foreach_norm(images)
        torch._foreach_clamp_min_(sigmas, _EPS)
        us = torch._foreach_div(images, sigmas)
        if moving:
            torch._foreach_copy_([sns[i]._u for i in moving], [us[i] for i in moving])
    return sigmas, us, vs


class _DivideAllBySigma(torch.autograd.Function):
    """Wᵢ ↦ Wᵢ/σᵢ for all layers, σᵢ linear in Wᵢ with gradient Gᵢ (σ = uᵀA_W v, u and v constants):
    :class:`~.spectral_norm.SpectralNorm`'s Function for a list of layers, in foreach ops.

    Inputs: n, the layers' ``sigma_gradient`` functions, then σ₁…σₙ, u₁…uₙ, v₁…vₙ, W₁…Wₙ. Gᵢ is
    computed in the backward from uᵢ and vᵢ (the size of one input image each), not saved: it has Wᵢ's
    size, and keeping it for every layer was a weight-sized copy per layer.

    Backward: gᵢ ↦ (gᵢ − ⟨gᵢ, Wᵢ⟩/σᵢ · Gᵢ)/σᵢ. ⟨g, W⟩ = ‖g∘W‖₁ − 2‖min(g∘W, 0)‖₁ (foreach has norms but
    no sums), as exact as a sum. Under ``create_graph`` it is the per-layer formula in differentiable ops."""

    @staticmethod
    def forward(ctx, n: int, gradients: Sequence[Any], *tensors: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        sigmas, weights = tensors[:n], tensors[3 * n:]
        ctx.n, ctx.gradients = n, gradients
        ctx.save_for_backward(*tensors)
        return tuple(torch._foreach_div(weights, sigmas))

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        n = ctx.n
        saved = ctx.saved_tensors
        sigmas, us, vs, weights = saved[:n], saved[n:2 * n], saved[2 * n:3 * n], saved[3 * n:]
        with torch.no_grad():  # (G does not depend on W: σ is linear in W)
            grad_sigmas = [gradient(u, v, w) for gradient, u, v, w in zip(ctx.gradients, us, vs, weights)]
        if torch.is_grad_enabled():  # create_graph: differentiable, layer by layer
            out: _Tensors = [divide_by_sigma_backward(g, w, s, gs)
                   for g, w, s, gs in zip(grads, weights, sigmas, grad_sigmas)]
        else:
            # (1-norms accumulated in float64: foreach's float32 1-norm drifts by ~1e-4 over millions of
            # entries, and the difference below cancels)
            products = torch._foreach_mul(grads, weights)
            dots = torch._foreach_norm(products, 1, dtype=torch.float64)
            torch._foreach_clamp_max_(products, 0.0)
            dots = torch._foreach_add(dots, torch._foreach_norm(products, 1, dtype=torch.float64), alpha=-2.0)
            torch._foreach_div_(dots, sigmas)
            out = torch._foreach_addcmul(grads, grad_sigmas, dots, value=-1.0)
            torch._foreach_div_(out, sigmas)
        return (None, None) + (None,) * (3 * n) + tuple(out)


class _Recompute:
    """A saved W/σ (or a view of it: the linear map saves its transpose), kept as W and σ (W is a
    parameter, alive anyway) and recomputed when unpacked."""

    __slots__ = ("weight", "sigma", "version", "view")

    def __init__(self, weight: torch.Tensor, sigma: torch.Tensor, view: Optional[Tuple[Any, ...]]) -> None:
        self.weight, self.sigma, self.version, self.view = weight, sigma, weight._version, view

    def unpack(self) -> torch.Tensor:
        _check_version(self.weight, self.version)  # (autograd's own check, which a saved W/σ no longer has)
        with torch.no_grad():
            value = torch.div(self.weight, self.sigma)  # (bitwise foreach_div's value: both divide each entry)
            return value if self.view is None else value.as_strided(*self.view)


class _Outer:
    """A tensor packed by the saved-tensor hooks that were active before ours (a user's save_on_cpu)."""

    __slots__ = ("unpack_hook", "packed")

    def __init__(self, unpack_hook: Any, packed: Any) -> None:
        self.unpack_hook, self.packed = unpack_hook, packed

    def unpack(self) -> Any:
        return self.unpack_hook(self.packed)


class _RecomputeNormalized(torch.autograd.graph.saved_tensors_hooks):
    """Saved-tensor hooks, active during a spectral-normalised layer's training forward, under which an op
    that saves the layer's prepared W/σ for its backward (the convolution, the linear map) saves W and σ
    instead, and the backward recomputes W/σ (one division). Without them every spectral norm kept a
    weight-sized copy for the backward. Every other saved tensor goes to the hooks that were active before (else is kept
    as it is), so a user's ``save_on_cpu`` or memory probe still sees it. (``_top_saved_tensors_default_hooks``
    is private: torch has no public way to read the active hooks; ``torch.utils.checkpoint`` reads them so.)

    Args:
        normalized: the layer's (W/σ, W, σ).
    """

    def __init__(self, normalized: Tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> None:
        self.entry: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = normalized
        self.outer = torch._C._autograd._top_saved_tensors_default_hooks(False)
        super().__init__(self._pack, lambda packed: packed.unpack())

    def _pack(self, t: torch.Tensor) -> Any:
        """A :class:`_Recompute`, :class:`_Outer` or :class:`_Kept`: each unpacks itself."""
        entry = self.entry
        if entry is not None and (t is entry[0] or t._base is entry[0]):
            value, weight, sigma = entry
            if value.stride() == weight.stride():  # (so the recomputed W/σ has the saved one's layout)
                view = None if t is value else (t.size(), t.stride(), t.storage_offset())
                return _Recompute(weight, sigma, view)
        if self.outer is not None:
            return _Outer(self.outer[1], self.outer[0](t))
        return _Kept(t)  # (autograd checks no version of a tensor packed by hooks: _Kept does)

    def close(self) -> None:
        """Leave the hooks (the forward is over) and drop the W/σ they listed, which they must not keep alive."""
        self.__exit__()
        self.entry = None


class _Kept:
    """A tensor saved under the layer's hooks as it is, with autograd's in-place check kept."""

    __slots__ = ("tensor", "version")

    def __init__(self, t: torch.Tensor) -> None:
        self.tensor, self.version = t, t._version

    def unpack(self) -> torch.Tensor:
        _check_version(self.tensor, self.version)
        return self.tensor


def _check_version(t: torch.Tensor, version: int) -> None:
    """Raise autograd's in-place error when ``t`` was written since it was saved at ``version``."""
    if t._version != version:
        raise RuntimeError(f"one of the variables needed for gradient computation has been modified by an "
                           f"inplace operation: [{t.type()} {list(t.shape)}] is at version {t._version}; "
                           f"expected version {version} instead")


# ---- β, γ-clips and the penalty's terms -----------------------------------------------------------
# (device, dtype, inference mode, values) -> a tensor of them (an inference tensor only for inference mode): made
# once, not at every step (a tensor built from a list is a host-to-device copy on a GPU)
_CONSTANTS: Dict[Tuple[str, torch.dtype, bool, Tuple[Any, ...]], torch.Tensor] = {}


def _constant_tensor(values: Tuple[Any, ...], device: torch.device, dtype: torch.dtype = torch.long) -> torch.Tensor:
    key = (str(device), dtype, torch.is_inference_mode_enabled(), values)
    t = _CONSTANTS.get(key)
    if t is None:
        if len(_CONSTANTS) > 64:  # a process that builds many different models
            _CONSTANTS.clear()
        t = _CONSTANTS[key] = torch.tensor(values, dtype=dtype, device=device)
    return t


def _prepare_curvature(model: nn.Module, done: List[nn.Module], for_graph: bool) -> None:
    acts, bns, all_bns = _clipped_batchnorms(model)
    if not model.training or not (acts or bns):
        return
    tensors = [a.log_beta for a in acts] + [bn.gamma_raw for bn in bns] + [bn.scale_var for bn in bns]
    if len({t.device for t in tensors}) != 1 or len({t.dtype for t in tensors}) != 1:
        return  # (stacked below: one device and dtype)
    device = tensors[0].device
    records = [bn.update_stats for bn in bns]
    inv_norm = _inverse_norms(bns) if bns else torch.zeros(0, device=device, dtype=tensors[0].dtype)
    counts = tuple(bn.num_features for bn in bns)
    flag = [False]  # set by the Function's backward: its graph is spent
    outs = _Curvature.apply(len(acts), _constant_tensor(counts, device) if bns else None, sum(counts), inv_norm,
                            flag, *[a.log_beta for a in acts], *[bn.gamma_raw for bn in bns])
    betas, flat, sum_beta, sum_log_gamma = outs[:len(acts)], outs[len(acts)], outs[-2], outs[-1]
    for act, beta in zip(acts, betas):
        prepared.put(act, beta, (act.log_beta,), False)
        prepared.put_for_graph(act, (beta,))
        done.append(act)
    # (the statistics step only for a compiled root: a part compiled alone computes its own, in its graph)
    steps = _statistics_steps(bns) if for_graph and bns else ()
    for i, (bn, weight, record) in enumerate(zip(bns, flat.split(counts) if bns else (), records)):
        prepared.put(bn, weight, (bn.gamma_raw, bn.scale_var), record)
        prepared.put_for_graph(bn, (weight, steps[i]) if steps else (weight,))
        done.append(bn)
    if all_bns:
        first = acts[0] if acts else bns[0]
        params = [a.log_beta for a in acts] + [bn.gamma_raw for bn in bns]
        _PENALTY[first] = _PenaltyTerms(acts, bns, params, sum_beta, sum_log_gamma, flag)


def _clipped_batchnorms(model: nn.Module) -> Tuple[List[CenteredSoftplus], List[LipschitzBatchNorm2d], bool]:
    """(the centered softplus activations, the γ-BNs in training mode without affine parameters, whether
    those are all its γ-BNs). γ-BNs with affine parameters scale them by a clip of another form: they
    compute their own."""
    acts = [m for m in model.modules() if isinstance(m, CenteredSoftplus)]
    every_bn = [m for m in model.modules() if isinstance(m, LipschitzBatchNorm2d)]
    bns = [bn for bn in every_bn if bn.training and bn.weight is None]
    return acts, bns, len(bns) == len(every_bn)


def _inverse_norms(bns: Sequence[LipschitzBatchNorm2d]) -> torch.Tensor:
    """What a recording γ-BN does first (the scale-variance copy: LipschitzBatchNorm2d.forward), then
    1/‖BN‖₂ = sqrt(min var + eps) of each, stacked (L,). The variance is ≥ 0: its min is its smallest |entry|."""
    with torch.no_grad():
        recording = [bn for bn in bns if bn.update_stats]
        if recording:
            torch._foreach_copy_([bn.scale_var for bn in recording], [bn.running_var for bn in recording])
        inv_norms = torch._foreach_norm([bn.scale_var for bn in bns], float("-inf"))
        torch._foreach_add_(inv_norms, [bn.eps for bn in bns])
        torch._foreach_sqrt_(inv_norms)
        return torch.stack(inv_norms)


def _statistics_steps(bns: Sequence[LipschitzBatchNorm2d]) -> Tuple[torch.Tensor, ...]:
    """Each γ-BN's running-statistics step for the batch a compiled forward counts next, max(momentum, 1/n)
    (1/n for momentum None: :meth:`LipschitzBatchNorm2d._early_momentum`), 0-dim tensors (no host read)."""
    with torch.no_grad():
        dtype = bns[0].running_var.dtype
        momenta = _constant_tensor(tuple(bn.momentum or 0.0 for bn in bns), bns[0].running_var.device, dtype)
        counted = torch.stack([bn.num_batches_tracked for bn in bns]).add_(1).to(dtype)
        return torch.maximum(counted.reciprocal_(), momenta).unbind()


class _Curvature(torch.autograd.Function):
    """β, the γ-clips and the penalty's two sums for all layers, in a constant number of ops.

    Inputs: the log β of A activations, the γ_raw of L γ-BNs (γ = 1 + softplus(γ_raw)) and their
    1/‖BN‖₂ = sqrt(min var + eps) (L,). Outputs: β₁ … β_A; the clip weights of all BNs in one flat
    vector (ΣC,), entry s_l = min(1, γ_l/‖BN_l‖₂) repeated over BN l's channels (the value of
    ``LipschitzBatchNorm2d._ChannelScale``); Σβ; Σ log γ.

    Backward: ∂/∂log βᵢ = βᵢ·(gᵢ + g_Σβ); ∂/∂γ_raw_l = sigmoid(γ_raw_l)·(Σ_c g_flat,l,c · [s_l < 1]/‖BN_l‖₂
    + g_Σlogγ/γ_l), with differentiable ops (a create_graph backward records them)."""

    @staticmethod
    def forward(ctx, n_beta: int, counts: Optional[torch.Tensor], total: int,
                inv_norm: torch.Tensor, flag: List[bool], *params: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        log_betas, raws = params[:n_beta], params[n_beta:]
        betas: _Tensors = torch._foreach_exp(log_betas) if log_betas else ()
        sum_beta = torch.stack(betas).sum() if betas else inv_norm.new_zeros(())
        if raws:
            raw = torch.stack(raws)
            softplus = F.softplus(raw)
            unclipped = torch.addcmul(inv_norm, softplus, inv_norm)  # γ/‖BN‖₂
            assert counts is not None  # (given with the γ_raw)
            flat = unclipped.clamp_max(1.0).repeat_interleave(counts, output_size=total)
            sum_log_gamma = torch.log1p(softplus).sum()
        else:
            raw = softplus = unclipped = inv_norm
            flat, sum_log_gamma = inv_norm.new_zeros(0), inv_norm.new_zeros(())
        ctx.n_beta, ctx.n_raw, ctx.counts, ctx.flag = n_beta, len(raws), counts, flag
        # log β rather than β: a saved output is re-wrapped (one detach) at each save and unpack, while a
        # saved input is not; backward recomputes β in one foreach op
        ctx.save_for_backward(*log_betas, raw, softplus, inv_norm, unclipped)
        return (*betas, flat, sum_beta, sum_log_gamma)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        ctx.flag[0] = True
        n_beta, n_raw = ctx.n_beta, ctx.n_raw
        saved = ctx.saved_tensors
        log_betas, (raw, softplus, inv_norm, unclipped) = saved[:n_beta], saved[n_beta:]
        g_betas, g_flat, g_sum_beta, g_sum_log_gamma = grads[:n_beta], grads[n_beta], grads[-2], grads[-1]
        needs = ctx.needs_input_grad[5:]
        beta_grads: List[Optional[torch.Tensor]] = [None] * n_beta
        if n_beta and any(needs[:n_beta]):
            # (a list of the 0-dim g_Σβ: the overload for one tensor would read it on the host)
            g = torch._foreach_mul(torch._foreach_add(g_betas, [g_sum_beta] * n_beta), torch._foreach_exp(log_betas))
            beta_grads = [gi if need else None for gi, need in zip(g, needs[:n_beta])]
        raw_grads: List[Optional[torch.Tensor]] = [None] * n_raw
        if n_raw and any(needs[n_beta:]):
            sig = torch.sigmoid(raw)
            per_layer = torch.segment_reduce(g_flat, "sum", lengths=ctx.counts)
            clip = torch.where(unclipped < 1.0, per_layer * inv_norm, 0.0)
            g_raw = sig * torch.addcdiv(clip, g_sum_log_gamma, softplus + 1.0)
            raw_grads = [gi if need else None for gi, need in zip(g_raw.unbind(), needs[n_beta:])]
        return (None, None, None, None, None, *beta_grads, *raw_grads)


class _PenaltyTerms:
    """The penalty's Σβ and Σ log γ from the last pre-forward, with what they are valid for."""

    __slots__ = ("layer_ids", "params", "versions", "sum_beta", "sum_log_gamma", "spent", "grad_enabled")

    def __init__(self, acts: Sequence[nn.Module], bns: Sequence[nn.Module], params: Sequence[torch.Tensor],
                 sum_beta: torch.Tensor, sum_log_gamma: torch.Tensor, spent: List[bool]) -> None:
        # ids, not the modules: the entry is a weak dictionary's value and must not keep its key alive
        self.layer_ids = tuple(id(m) for m in (*acts, *bns))
        self.params = tuple(weakref.ref(p) for p in params)
        self.versions = tuple(p._version for p in params)
        self.sum_beta, self.sum_log_gamma, self.spent = sum_beta, sum_log_gamma, spent
        self.grad_enabled = torch.is_grad_enabled()


_PENALTY: "weakref.WeakKeyDictionary[nn.Module, _PenaltyTerms]" = weakref.WeakKeyDictionary()


def prepared_penalty_terms(acts: Sequence[CenteredSoftplus], bns: Sequence[LipschitzBatchNorm2d]
                           ) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """(Σβ, Σ log γ) over exactly these layers as the last pre-forward computed them, or None when they
    are not those of the current parameters or their graph was already backpropagated through (the
    penalty then computes its own). A penalty taken from them shares the pre-forward's Function, so
    its gradient costs no op per layer.

    Args:
        acts: every centered softplus of the model, in module order.
        bns: every γ-Lipschitz BatchNorm of the model, in module order.
    """
    if not _PENALTY or torch.compiler.is_compiling() or not (acts or bns):
        return None
    terms = _PENALTY.get(acts[0] if acts else bns[0])
    if terms is None or terms.spent[0] or terms.grad_enabled != torch.is_grad_enabled():
        return None
    if terms.layer_ids != tuple(id(m) for m in (*acts, *bns)):
        return None
    params = [a.log_beta for a in acts] + [bn.gamma_raw for bn in bns]
    for p, ref, version in zip(params, terms.params, terms.versions):
        if ref() is not p or p._version != version:
            return None
    return terms.sum_beta, terms.sum_log_gamma
