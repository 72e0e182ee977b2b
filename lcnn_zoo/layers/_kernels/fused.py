"""Fused kernels for the centered softplus (paper §3.3): one pass forward, one pass backward.

The formulas in :mod:`..activation` are the reference; the kernels here compute the same functions
in a single pass over the activation tensor instead of ~20 separate elementwise passes each way:

* ``lcnn_zoo::centered_softplus_fwd(x, beta) -> y``: s0(x; β);
* ``lcnn_zoo::centered_softplus_bwd(grad, y, beta, need_beta) -> (grad_x, grad_beta)``: ∂/∂x and the
  per-layer ∂/∂β reduction together, from the output y (like ReLU's backward, no input is kept).

Both are ``torch.library`` custom ops, so autograd (through :class:`..activation._CenteredSoftplusFn`),
FakeTensor/meta tracing and ``vmap`` see one operation. Their kernels:

* **CPU**: the reference formulas compiled once, for that function alone, by torch's own inductor
  (``torch.compile(dynamic=True)`` on 1-D views of the dense storage, so one compiled kernel serves
  every shape and both memory formats). Inductor ships with torch and emits one vectorised C++ loop;
  the first call in a fresh cache compiles it (seconds), later processes reuse inductor's disk cache.
* **CUDA**: Triton kernels (:mod:`.triton`; Triton ships with torch's CUDA wheels). With
  ``TRITON_INTERPRET=1`` they run on CPU tensors, which is how the tests check them without a GPU.

Where neither works (no C++ compiler, no Triton, an unsupported dtype) the reference formulas run,
after one warning. ``LCNN_ZOO_FUSED=0`` turns the kernels off. Which of the three ran on each device
("triton", "cpu-inductor", "formulas" with the reason) is recorded: :func:`kernel_path`,
:func:`fused_status`. :func:`cuda_launches` gives the CUDA launches one call of an op makes. A ``torch.compile`` graph
calls the ops too, as opaque nodes (inductor compiles the net around them, not the formulas: a graph
about the plain net's size). Double backward never uses these kernels (see :mod:`..activation`).
"""
from __future__ import annotations

import logging
import math
import os
import sys
import types
import warnings
from typing import Any, Callable, Dict, Tuple, cast

import torch

from ...environment import env

__all__ = ["fused_enabled", "fused_requested", "centered_softplus_fwd", "centered_softplus_bwd", "SERIES_BELOW",
           "kernel_path", "fused_status", "reset_fused_status", "cuda_launches"]

SERIES_BELOW = 5e-3  # |u| = |βy| under which ∂s0/∂β uses its series (the closed form cancels there)
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# device type -> why the kernels are off there: process-wide, because what failed (no C++ compiler, no Triton, a
# kernel that does not compile for this GPU) would fail at every call again; warned once, then the formulas run.
_disabled: Dict[str, str] = {}
# str(device) -> {"path": the latest call's path, "reason": why the formulas ran ("" for a kernel),
# "calls": {path: count}, "reasons": {why the formulas ran: count}}. See kernel_path / fused_status.
# Process-wide because it answers "what ran in this process" (benchmarks/gpu.py writes it into gpu.json).
_status: dict[str, dict[str, Any]] = {}


def _record(device: torch.device, path: str, reason: str = "") -> None:
    """Note that ``path`` computed the activation on ``device`` (reason: why the formulas ran)."""
    entry = _status.get(str(device))
    if entry is None:
        entry = _status[str(device)] = {"path": path, "reason": reason, "calls": {}, "reasons": {}}
    entry["path"], entry["reason"] = path, reason
    entry["calls"][path] = entry["calls"].get(path, 0) + 1
    if reason:
        entry["reasons"][reason] = entry["reasons"].get(reason, 0) + 1


def kernel_path(device: torch.device | str) -> str | None:
    """Which code computed the centered softplus most recently on ``device``.

    "triton" (the CUDA kernels), "cpu-inductor" (the compiled CPU kernels) or "formulas" (the unfused
    reference formulas: the kernels are off, failed or have no variant for the input; the reason is in
    :func:`fused_status`); None if nothing ran there since the start or :func:`reset_fused_status`.
    Recorded by the custom ops (eager or in a compiled graph) and, for the formulas, by
    :func:`fused_enabled`; not in the replay of a captured CUDA graph (it replays the kernels without
    calling the ops).

    Args:
        device: e.g. ``torch.device("cuda", 1)``, ``"cuda:1"`` or ``"cpu"``.
    """
    entry = _status.get(str(torch.device(device)))
    return entry["path"] if entry else None


def fused_status() -> dict[str, dict[str, Any]]:
    """Per device (``"cuda:0"``, ``"cpu"``): the latest path and its reason, calls per path, and the
    reasons the formulas ran with their counts; plus ``"disabled"``: device type → why the kernels
    are off there for the rest of the process. A JSON-able copy (``benchmarks/gpu.py`` writes it
    into gpu.json)."""
    out: dict[str, dict[str, Any]] = {dev: {"path": e["path"], "reason": e["reason"], "calls": dict(e["calls"]),
                                            "reasons": dict(e["reasons"])} for dev, e in _status.items()}
    out["disabled"] = dict(_disabled)
    return out


def reset_fused_status() -> None:
    """Forget the recorded paths (not the kernels turned off: see :func:`fused_status`'s "disabled")."""
    _status.clear()


def _why_not(x: torch.Tensor) -> str:
    """Why the fused kernels do not serve this tensor ("" when they do)."""
    if not env("LCNN_ZOO_FUSED"):
        return "LCNN_ZOO_FUSED=0"
    if x.dtype not in _DTYPES:
        return f"no kernel for {x.dtype}"
    device = x.device.type
    if device not in ("cpu", "cuda"):
        return f"no kernel for device type {device}"
    if device in _disabled:
        return _disabled[device]
    if _use_triton(x) and _triton_module() is None:
        return _disabled.get("cuda", "Triton is not usable")
    return ""


def fused_enabled(x: torch.Tensor) -> bool:
    """Whether the fused kernels serve this tensor (its device type, its dtype, the opt-out).

    Where they do not, the caller runs the formulas: that is recorded as x's device's path (see
    :func:`kernel_path`), with the reason.

    Args:
        x: the activation's input (or, in the backward, its output).
    """
    why = _why_not(x)
    if why:
        _record(x.device, "formulas", why)
    return not why


def fused_requested(x: torch.Tensor) -> bool:
    """Whether the kernels are asked for this tensor: the opt-out unset, and a dtype and device type they
    have. Records nothing and imports nothing, so torch.compile's tracing can call it; whether a kernel
    works is the ops' business when they run (they fall back to the formulas, and record it).

    Args:
        x: the activation's input (or, in the backward, its output).
    """
    return bool(env("LCNN_ZOO_FUSED")) and x.dtype in _DTYPES and x.device.type in ("cpu", "cuda")


def _disable(device: str, why: str) -> None:
    """Turn the kernels off on a device type for the rest of the process, with one RuntimeWarning."""
    if device not in _disabled:
        _disabled[device] = why
        warnings.warn(f"lcnn_zoo: the fused centered-softplus kernels are off on {device} ({why}); the unfused "
                      f"formulas run instead (same values, more passes over memory).", RuntimeWarning, stacklevel=3)


# ---- the functions, written once with torch ops (what inductor compiles on CPU) -------------------
def _expm1_nonpositive(w: torch.Tensor) -> torch.Tensor:
    """expm1(w) for w ≤ 0 from exp and log: Kahan's (e − 1)·w / log e where e − 1 cancels, e − 1 elsewhere.

    Within a few ulp of expm1. Written so because the vectorised CPU expm1 and log1p that inductor
    emits are many times slower than its exp and log (docs/performance.md); the Triton kernels use
    the same identities."""
    e = torch.exp(w)
    kahan = torch.where(e == 1.0, w, (e - 1.0) * w / torch.log(e))
    return torch.where(w > -0.5, kahan, e - 1.0)


def _log1p_small(q: torch.Tensor) -> torch.Tensor:
    """log1p(q) for q in [−1/2, 0] from log: Goldberg's log(1 + q)·q / ((1 + q) − 1)."""
    s = 1.0 + q
    return torch.where(s == 1.0, q, torch.log(s) * q / (s - 1.0))


# log cosh(u) = u²/2 − u⁴/12 + u⁶/45 − 17u⁸/2520 + 31u¹⁰/14175 − …: below |u| = 1/4 the next term is
# under 1e-10 of the value, so the series is exact in float32; above it log((1 + e^{−2|u|})/2) has no
# cancellation. One exp and one log per element, no division: the forward is compute-bound on CPU.
_SERIES_U = 0.25
_LOGCOSH = (1.0 / 2.0, -1.0 / 12.0, 1.0 / 45.0, -17.0 / 2520.0, 31.0 / 14175.0)


def forward_formula(x: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """s0(x; β) = g(βx)/β, g(t) = u + log cosh u with u = t/2, without overflow.

    float64: activation.py's expm1/log1p form, with expm1 and log1p written from exp and log; other
    dtypes (computed in float32): a series for |u| < 1/4 and log((1 + e^{−2|u|})/2) above."""
    t = x * beta
    u = 0.5 * t
    a = u.abs()
    # u + |u| is written max(0, t): the same number for finite t (2·(t/2) = t, up to a subnormal t's last bit),
    # in as many ops, but 0 rather than ∞ − ∞ = NaN at t = −∞, so s0(−∞) = −log(2)/β. A NaN stays NaN (the
    # log term is NaN). (0 first: the tie at t = −0 gives +0, as u + |u| did.)
    pos = torch.maximum(t.new_zeros(()), t)
    if x.dtype == torch.float64:
        # (the cap keeps e^{−2|u|} normal, as below; expm1 is −1 there to the last bit either way)
        return (pos + _log1p_small(0.5 * _expm1_nonpositive(-2.0 * torch.clamp(a, max=300.0)))) / beta
    # |u| is capped where e^{−2|u|} would be subnormal (0.5 + e^{−2|u|}/2 rounds to 0.5 either way): an
    # exp that underflows takes the CPU's slow path.
    big = pos + torch.log(0.5 + 0.5 * torch.exp(-2.0 * torch.clamp(a, max=40.0)))
    u2 = u * u
    poly = _LOGCOSH[4]
    for c in reversed(_LOGCOSH[:4]):
        poly = c + u2 * poly
    small = u + u2 * poly
    return torch.where(a < _SERIES_U, small, big) * (1.0 / beta)


def backward_formula(grad: torch.Tensor, y: torch.Tensor, beta: torch.Tensor, need_beta: bool
                     ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(grad·∂s0/∂x, Σ grad·∂s0/∂β) from the output y (the formulas of activation._fast_backward).

    Computed in at least float32 (a bf16 activation's β-gradient is a sum over millions of terms)."""
    acc = torch.promote_types(y.dtype, torch.float32)
    g, yy, b = grad.to(acc), y.to(acc), beta.to(acc)
    u = yy * b
    neg_u = torch.clamp(-u, min=math.log(torch.finfo(y.dtype).tiny) + 2.0)  # −u, capped: see _fast_backward
    e = torch.exp(neg_u)
    # σ(βx) ≥ 0: a rounded output just below the infimum −log(2)/β (e > 2) is a saturated unit.
    sig = torch.clamp(1.0 - 0.5 * e, min=0.0)
    grad_x = (g * sig).to(grad.dtype)
    if not need_beta:
        return grad_x, torch.zeros((), dtype=beta.dtype, device=beta.device)
    # t·σ(t) − u, with the capped u in u·(σ − 1) = (−u)·(1 − σ): 0 where σ = 1, also at y = +∞ (not ∞·0 = NaN)
    direct = sig * torch.log(torch.clamp(2.0 * sig, min=1e-30)) + neg_u * (1.0 - sig)
    small = u.abs() < SERIES_BELOW
    us = torch.where(small, u, 0.0)
    t = us * (2.0 - us * (1.0 - us))  # t = log(2e^u − 1) = 2u − u² + u³ + O(u⁴)
    t2 = t * t
    series = 0.125 * t2 * (1.0 - 0.125 * t2)
    f = torch.where(small, series, direct)
    grad_beta = ((g * f).sum() / (b * b)).to(beta.dtype)
    return grad_x, grad_beta


# ---- CPU: inductor-compiled formulas ----------------------------------------------------------------
def _cpu_fwd(x: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    return forward_formula(x, beta)


def _cpu_bwd_x(grad: torch.Tensor, y: torch.Tensor, beta: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    return backward_formula(grad, y, beta, False)


def _cpu_bwd_x_beta(grad: torch.Tensor, y: torch.Tensor, beta: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    return backward_formula(grad, y, beta, True)


_CPU_FUNCTIONS: Dict[str, Callable[..., Any]] = {"fwd": _cpu_fwd, "bwd_x": _cpu_bwd_x, "bwd_x_beta": _cpu_bwd_x_beta}
# (op, (dtype, is_inference) per input) -> its compiled kernel: compiled once per process (seconds each), and
# torch.compile keeps a function's variants per code object, so each key needs its own object (see _cpu_kernel).
_compiled: Dict[tuple, Callable] = {}


class _NoCudaRuntimeNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("No CUDA runtime is found")


def _import_cpp_extension_quietly() -> None:
    """Import ``torch.utils.cpp_extension`` (inductor's C++ build imports it) with its one import-time
    notice filtered: on a CPU-only machine whose torch is a CUDA build it logs "No CUDA runtime is
    found, using CUDA_HOME=…", which says nothing about a CPU kernel and would be the only line on
    stderr of an ``lcnn-zoo`` command that otherwise prints one-line messages. Only that record, only
    during that import: the logger is left as it was."""
    if "torch.utils.cpp_extension" in sys.modules:
        return
    log, quiet = logging.getLogger("torch.utils.cpp_extension"), _NoCudaRuntimeNotice()
    log.addFilter(quiet)
    try:
        import torch.utils.cpp_extension  # noqa: F401
    finally:
        log.removeFilter(quiet)


def _cpu_kernel(name: str, *args: torch.Tensor) -> Callable:
    """The compiled kernel for these inputs' dtypes and whether they are inference tensors.

    torch.compile keeps its compiled variants per code object, up to a small recompile limit, and
    guards each on dtype and dispatch keys; so each such combination gets a copy of the function
    with a code object of its own (and one graph for every size, ``dynamic=True``)."""
    kinds = tuple((a.dtype, a.is_inference()) for a in args)
    key = (name,) + kinds
    fn = _compiled.get(key)
    if fn is None:
        _import_cpp_extension_quietly()
        base = cast(types.FunctionType, _CPU_FUNCTIONS[name])  # plain `def` functions (see _CPU_FUNCTIONS)
        tag = "_".join(str(d).replace("torch.", "") + ("_inf" if inf else "") for d, inf in kinds)
        code = base.__code__.replace(co_name=f"{base.__name__}_{tag}")
        copy = types.FunctionType(code, base.__globals__, code.co_name, base.__defaults__, base.__closure__)
        fn = _compiled[key] = torch.compile(copy, dynamic=True, fullgraph=True)
    return fn


def _flat(t: torch.Tensor) -> torch.Tensor:
    """A 1-D view of a dense tensor's memory (contiguous or channels_last), or a contiguous copy."""
    if t.is_contiguous():
        return t.view(-1)
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return t.permute(0, 2, 3, 1).reshape(-1)
    return t.contiguous().view(-1)


def _unflat(flat: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if like.is_contiguous():
        return flat.view(like.shape)
    if like.dim() == 4 and like.is_contiguous(memory_format=torch.channels_last):
        n, c, h, w = like.shape
        return flat.view(n, h, w, c).permute(0, 3, 1, 2)
    return flat.view(like.shape)


def _run_cpu(name: str, *args):
    device = args[0].device
    if args[0].numel() < 2:  # sizes 0 and 1 would each need a compiled variant of their own
        _record(device, "formulas", "fewer than 2 elements (no compiled variant, by design)")
        return _CPU_FUNCTIONS[name](*args)
    args = tuple(a.detach() for a in args)  # the op's own autograd is around it: plain tensors for the guards
    try:
        out = _cpu_kernel(name, *args)(*args)
    except Exception as exc:  # no C++ compiler, an inductor failure: the formulas, after one warning
        _disable("cpu", f"inductor could not compile them: {_describe(exc)}")
        _record(device, "formulas", _disabled["cpu"])
        return _CPU_FUNCTIONS[name](*args)
    _record(device, "cpu-inductor")
    return out


def _describe(exc: BaseException) -> str:
    """An exception as the one line a reason can hold."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__


# ---- the custom ops -------------------------------------------------------------------------------
_FORCE_TRITON_ON_CPU = bool(env("LCNN_ZOO_TRITON_ON_CPU"))  # tests: Triton under its interpreter


def _use_triton(x: torch.Tensor) -> bool:
    return x.device.type == "cuda" or (_FORCE_TRITON_ON_CPU and os.environ.get("TRITON_INTERPRET") == "1")


@torch.library.custom_op("lcnn_zoo::centered_softplus_fwd", mutates_args=())
def centered_softplus_fwd(x: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """s0(x; β) in one pass. x: any shape, float; beta: 0-dim, positive. Returns x's shape and layout."""
    return _fwd_impl(x, beta)


def _fwd_impl(x: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """The forward op's body (a plain function, so that a dispatch mode can count the ops inside it)."""
    xf = _flat(x)
    if _use_triton(x) and x.device.type not in _disabled:
        yf = _run_triton("forward", forward_formula, xf, beta)
    elif x.device.type == "cpu" and "cpu" not in _disabled:
        yf = _run_cpu("fwd", xf, beta)
    else:
        _record(x.device, "formulas", _disabled.get(x.device.type, f"no kernel for device type {x.device.type}"))
        yf = forward_formula(xf, beta)
    return _unflat(yf, x)


@centered_softplus_fwd.register_fake
def _(x, beta):
    return torch.empty_like(x)


@torch.library.custom_op("lcnn_zoo::centered_softplus_bwd", mutates_args=())
def centered_softplus_bwd(grad: torch.Tensor, y: torch.Tensor, beta: torch.Tensor, need_beta: bool
                          ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(grad·∂s0/∂x, Σ grad·∂s0/∂β) in one pass from the output y; grad_beta is 0 unless need_beta."""
    return _bwd_impl(grad, y, beta, need_beta)


def _bwd_impl(grad: torch.Tensor, y: torch.Tensor, beta: torch.Tensor, need_beta: bool
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """The backward op's body (a plain function, so that a dispatch mode can count the ops inside it)."""
    fmt = _format_of(y)
    if grad.shape != y.shape or not grad.is_contiguous(memory_format=fmt):  # grad laid out as y is
        grad = grad.expand_as(y).contiguous(memory_format=fmt)
    gf, yf = _flat(grad), _flat(y)
    if _use_triton(y) and y.device.type not in _disabled:
        if gf.dtype != yf.dtype:  # the kernels read grad as y's dtype (autograd's grad always is)
            gf = gf.to(yf.dtype)
        gx, gb = _run_triton("backward", lambda *a: backward_formula(*a[:4]), gf, yf, beta, need_beta, SERIES_BELOW)
    elif y.device.type == "cpu" and "cpu" not in _disabled:
        gx, gb = _run_cpu("bwd_x_beta" if need_beta else "bwd_x", gf, yf, beta)
    else:
        _record(y.device, "formulas", _disabled.get(y.device.type, f"no kernel for device type {y.device.type}"))
        gx, gb = backward_formula(gf, yf, beta, need_beta)
    return _unflat(gx, y), gb.reshape(beta.shape)


@centered_softplus_bwd.register_fake
def _(grad, y, beta, need_beta):
    return torch.empty_like(y), torch.empty_like(beta)


def _dense(t: torch.Tensor) -> bool:
    """Whether :func:`_flat` views t (contiguous or 4-D channels_last) rather than copying it."""
    return t.is_contiguous() or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last))


def cuda_launches(op: str, *args: Any) -> int:
    """CUDA kernel launches of one call of a custom op on its CUDA (Triton) path, for these arguments.

    A dispatch-level count sees each op as one operation; on CUDA it is: the forward one kernel (a
    copy first for an input that is neither contiguous nor channels_last); the backward one kernel
    without the β-gradient, two with it (kernel + sum of the per-block partials), one more to cast the
    β-gradient where β's dtype is not the accumulation dtype, and a copy for a grad not laid out as y
    (see :mod:`.triton`; tests/test_triton.py pins these numbers against the launches
    counted under Triton's interpreter). The arguments may be CPU tensors: the count depends on sizes,
    dtypes and layouts only. ``benchmarks/op_count.py`` adds these up.

    Args:
        op: "fwd" or "bwd", or the op's name (``lcnn_zoo.centered_softplus_fwd.default``, …).
        args: the op's arguments: (x, beta) or (grad, y, beta, need_beta).
    """
    from . import triton as tk  # the counts are defined next to the launches

    if op.endswith("fwd") or "centered_softplus_fwd" in op:
        x, _ = args[:2]
        return (not _dense(x)) + tk.forward_launches(x.numel())
    if op.endswith("bwd") or "centered_softplus_bwd" in op:
        grad, y, beta, need_beta = args[:4]
        fmt = _format_of(y)
        relayout = grad.shape != y.shape or not grad.is_contiguous(memory_format=fmt)
        copies = int(relayout) + (not _dense(y)) + (grad.dtype != y.dtype)
        return copies + tk.backward_launches(y.numel(), y.dtype, beta.dtype, bool(need_beta))
    raise ValueError(f"cuda_launches: not a centered-softplus op: {op!r}")


def _format_of(t: torch.Tensor) -> torch.memory_format:
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


# vmap (torch.func): the reference formulas, batched by broadcasting.
def _fwd_vmap(info, in_dims, x, beta):
    xd, bd = in_dims
    if bd is None:
        return centered_softplus_fwd(x, beta), xd
    x = x.movedim(xd, 0) if xd is not None else x.unsqueeze(0)
    b = beta.movedim(bd, 0).reshape((-1,) + (1,) * (x.dim() - 1))
    return forward_formula(x, b), 0


def _bwd_vmap(info, in_dims, grad, y, beta, need_beta):
    gd, yd, bd = in_dims
    size = info.batch_size
    g = grad.movedim(gd, 0) if gd is not None else grad.unsqueeze(0).expand(size, *grad.shape)
    yy = y.movedim(yd, 0) if yd is not None else y.unsqueeze(0).expand(size, *y.shape)
    b = beta.movedim(bd, 0) if bd is not None else beta.unsqueeze(0).expand(size, *beta.shape)
    outs = [backward_formula(g[i], yy[i], b[i], need_beta) for i in range(size)]
    return (torch.stack([o[0] for o in outs]), torch.stack([o[1] for o in outs])), (0, 0)


torch.library.register_vmap("lcnn_zoo::centered_softplus_fwd", _fwd_vmap)
torch.library.register_vmap("lcnn_zoo::centered_softplus_bwd", _bwd_vmap)


# ---- CUDA: Triton ---------------------------------------------------------------------------------
def _run_triton(name: str, formula: Callable, *args):
    """A Triton kernel, or (after one warning, for the rest of the process) the formula when Triton is
    missing or its kernel fails to compile or launch on this device; the path that ran is recorded
    (:func:`kernel_path`). A launch that faults asynchronously (an illegal address) is not caught here:
    it surfaces at the next synchronisation."""
    device = args[0].device
    module = _triton_module()
    if module is not None:
        try:
            out = getattr(module, name)(*args)
        except Exception as exc:  # a Triton compile or launch error: the formulas, after one warning
            _disable(device.type, f"the Triton kernel failed: {_describe(exc)}")
        else:
            _record(device, "triton")
            return out
    _record(device, "formulas", _disabled.get(device.type, "Triton is not usable"))
    return formula(*args)


def _triton_module() -> types.ModuleType | None:
    """The Triton kernels (imported on first use), or None after one warning when Triton is missing.

    No module-level memo: ``sys.modules`` keeps a successful import (this is then a dictionary look-up),
    and a failed one turns the kernels off on CUDA (``_disabled``), so the CUDA path does not ask again."""
    try:
        from . import triton as kernels
    except Exception as exc:  # Triton missing or broken: the formulas
        _disable("cuda", f"Triton is not usable: {_describe(exc)}")
        return None
    return kernels
