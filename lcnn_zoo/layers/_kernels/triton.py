"""Triton kernels for the centered softplus (CUDA; with ``TRITON_INTERPRET=1`` also on CPU tensors).

The same functions as :func:`.fused.forward_formula` and :func:`.fused.backward_formula`, on 1-D
dense views, computed in float32 (float64 for float64 tensors). ``log1p``/``expm1`` are written with
Kahan's and Goldberg's identities from ``exp``/``log`` (accurate to a few ulp), so the kernels need
no libdevice and run unchanged under Triton's interpreter.

Launching (what makes them safe on a machine with several GPUs and countable):

* every launch goes through :func:`_launch`, inside :func:`device_guard` of the tensors' device, so a
  model on ``cuda:1`` launches on GPU 1 (Triton launches on the *current* device and its current
  stream);
* the forward is one launch; the backward is one launch without the β-gradient (the kernel writes the
  zero β-gradient itself) and two with it: each block writes its share of Σ grad·∂s0/∂β, already
  divided by β², to a partial-sums buffer, and one ``sum`` adds the partials (in a fixed order, so the
  β-gradient is deterministic, unlike an atomic add). A third launch converts the sum to β's dtype
  where that is not the accumulation dtype (float32; float64 for float64 tensors).
  :func:`forward_launches`/:func:`backward_launches` give these counts, tests/test_triton.py
  pins them against the launches counted under the interpreter;
* a tensor of more than :data:`_CHUNK` elements is processed in chunks of that size, one launch each,
  so the kernels' 32-bit offsets never overflow and ``n`` is always a 32-bit integer (which bounds
  the variants :mod:`benchmarks.triton_aot` compiles ahead of time).
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, NamedTuple

import torch
import triton
import triton.language as tl

__all__ = ["acc_dtype", "backward", "backward_launches", "device_guard", "forward", "forward_launches"]

_BLOCK = 1024
# Elements per launch: a multiple of _BLOCK, and pid·BLOCK + BLOCK stays below 2^31 (int32 offsets).
_CHUNK = 2 ** 30


@triton.jit
def _expm1(w):
    """expm1(w) for w ≤ 0: Kahan's (e − 1)·w / log e where e − 1 cancels, e − 1 elsewhere."""
    e = tl.exp(w)
    kahan = tl.where(e == 1.0, w, (e - 1.0) * w / tl.log(e))
    return tl.where(w > -0.5, kahan, e - 1.0)


@triton.jit
def _log1p(q):
    """log1p(q) for q in [−1/2, 0]: Goldberg's log(1 + q)·q / ((1 + q) − 1)."""
    s = 1.0 + q
    return tl.where(s == 1.0, q, tl.log(s) * q / (s - 1.0))  # Goldberg


# beta_ptr is read once per block: its alignment changes no code, so it is not a specialisation.
@triton.jit(do_not_specialize_on_alignment=["beta_ptr"])
def _fwd_kernel(x_ptr, y_ptr, beta_ptr, n, BLOCK: tl.constexpr, ACC: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    b = tl.load(beta_ptr).to(ACC)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
    t = x * b
    u = 0.5 * t
    a = tl.abs(u)
    # u + |u| as max(t, 0), as in fused.forward_formula: s0(−∞) = −log(2)/β, not ∞ − ∞ = NaN. The max
    # propagates NaN: Triton's default (the GPU's max) returns the other operand for a NaN.
    y = (tl.maximum(t, 0.0, propagate_nan=tl.PropagateNan.ALL) + _log1p(0.5 * _expm1(-2.0 * a))) / b
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


# out_ptr: one scalar store per block (a partial sum, or the zero β-gradient): no alignment specialisation.
@triton.jit(do_not_specialize_on_alignment=["beta_ptr", "out_ptr"])
def _bwd_kernel(g_ptr, y_ptr, beta_ptr, gx_ptr, out_ptr, n, log_tiny, BLOCK: tl.constexpr, ACC: tl.constexpr,
                NEED_BETA: tl.constexpr, SMALL: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    b = tl.load(beta_ptr).to(ACC)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(ACC)
    y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(ACC)
    u = y * b
    # −u capped as in fused.backward_formula. NaN propagated through both max: with Triton's default a NaN
    # output (x = NaN) gave σ = 1, where the other back-ends give NaN.
    neg_u = tl.maximum(-u, log_tiny, propagate_nan=tl.PropagateNan.ALL)
    e = tl.exp(neg_u)
    sig = tl.maximum(1.0 - 0.5 * e, 0.0, propagate_nan=tl.PropagateNan.ALL)  # below −log(2)/β: saturated
    tl.store(gx_ptr + offs, (g * sig).to(gx_ptr.dtype.element_ty), mask=mask)
    if NEED_BETA:
        # (−u)·(1 − σ) with the capped u: 0 where σ = 1, also at y = +∞ (not ∞·0 = NaN)
        direct = sig * tl.log(tl.maximum(2.0 * sig, 1e-30)) + neg_u * (1.0 - sig)
        small = tl.abs(u) < SMALL
        us = tl.where(small, u, 0.0)
        t = us * (2.0 - us * (1.0 - us))
        t2 = t * t
        f = tl.where(small, 0.125 * t2 * (1.0 - 0.125 * t2), direct)
        part = tl.sum(tl.where(mask, g * f, 0.0), axis=0)
        # Divided by β² here, per block: the host side is then one sum of the partials (no b*b, no divide).
        tl.store(out_ptr + pid, part / (b * b))
    else:
        # The (unused) β-gradient the op returns is 0: written by block 0 instead of a separate fill launch.
        tl.store(out_ptr, 0.0, mask=pid == 0)


class Launch(NamedTuple):
    """One kernel launch as the JIT sees it: the kernel, its grid and its arguments (constexprs included)."""

    kernel: Any
    grid: tuple[int]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the kernels compute and accumulate in for tensors of ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def device_guard(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """The context a launch on ``device`` runs in: ``torch.cuda.device(device)`` for a CUDA device.

    Triton launches on the current CUDA device (and its current stream), not on the device of the
    pointers it is given; without this guard a model on ``cuda:1`` would launch on GPU 0. Other devices
    (CPU tensors under ``TRITON_INTERPRET=1``) need none.

    Args:
        device: the device of the tensors the kernel reads and writes.
    """
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def _launch(launch: Launch, device: torch.device) -> None:
    """Run one launch on ``device`` (the single place kernels are launched: see :func:`device_guard`)."""
    with device_guard(device):
        launch.kernel[launch.grid](*launch.args, **launch.kwargs)


def _chunks(n: int) -> list[tuple[int, int]]:
    """(start, size) of the launches over n elements (one unless n > _CHUNK)."""
    return [(s, min(_CHUNK, n - s)) for s in range(0, n, _CHUNK)]


def _part(t: torch.Tensor, start: int, size: int) -> torch.Tensor:
    """t[start:start + size], without a slice op (a dispatch) when that is all of t."""
    return t if start == 0 and size == t.numel() else t[start:start + size]


def _fwd_plan(x: torch.Tensor, y: torch.Tensor, beta: torch.Tensor) -> list[Launch]:
    """The launches of :func:`forward` (arguments only: nothing runs). Also what the AOT step compiles."""
    acc = _acc(x.dtype)
    return [Launch(_fwd_kernel, (triton.cdiv(m, _BLOCK),), (_part(x, s, m), _part(y, s, m), beta, m),
                   {"BLOCK": _BLOCK, "ACC": acc}) for s, m in _chunks(x.numel())]


def _bwd_plan(grad: torch.Tensor, y: torch.Tensor, beta: torch.Tensor, gx: torch.Tensor, out: torch.Tensor,
              need_beta: bool, series_below: float) -> list[Launch]:
    """The launches of :func:`backward`; ``out`` is the partial-sums buffer (need_beta) or the 0-dim result."""
    log_tiny = math.log(torch.finfo(y.dtype).tiny) + 2.0
    plan: list[Launch] = []
    first_block = 0
    for s, m in _chunks(y.numel()):
        blocks = triton.cdiv(m, _BLOCK)
        # need_beta: this chunk's blocks write their partials after the previous chunks'; else every
        # launch writes the same zero.
        dst = _part(out, first_block, blocks) if need_beta else out
        plan.append(Launch(_bwd_kernel, (blocks,),
                           (_part(grad, s, m), _part(y, s, m), beta, _part(gx, s, m), dst, m, log_tiny),
                           {"BLOCK": _BLOCK, "ACC": _acc(y.dtype), "NEED_BETA": bool(need_beta),
                            "SMALL": series_below}))
        first_block += blocks
    return plan


def forward(x: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """s0(x; β), launched on x's device.

    Args:
        x: 1-D contiguous, float16/bfloat16/float32/float64.
        beta: 0-dim, positive, on x's device (any float dtype).

    Returns:
        s0(x; β), x's dtype.
    """
    y = torch.empty_like(x)
    for launch in _fwd_plan(x, y, beta):
        _launch(launch, x.device)
    return y


def backward(grad: torch.Tensor, y: torch.Tensor, beta: torch.Tensor, need_beta: bool, series_below: float
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad·∂s0/∂x, Σ grad·∂s0/∂β), launched on y's device.

    Args:
        grad: 1-D contiguous, y's size and dtype.
        y: the forward's output, 1-D contiguous.
        beta: 0-dim, positive, on y's device.
        need_beta: whether to compute the β-gradient (else it is returned as 0).
        series_below: |βy| under which ∂s0/∂β uses its series.

    Returns:
        grad·∂s0/∂x as y's dtype, and the β-gradient (0-dim) as beta's dtype.
    """
    gx = torch.empty_like(y)
    n = y.numel()
    if need_beta:
        acc = acc_dtype(y.dtype)
        partials = torch.empty(sum(triton.cdiv(m, _BLOCK) for _, m in _chunks(n)), dtype=acc, device=y.device)
        for launch in _bwd_plan(grad, y, beta, gx, partials, True, series_below):
            _launch(launch, y.device)
        total = partials.sum()  # a fixed summation order; 0 for an empty tensor
        return gx, (total if acc == beta.dtype else total.to(beta.dtype))
    if n == 0:
        return gx, torch.zeros((), dtype=beta.dtype, device=beta.device)
    zero = torch.empty((), dtype=beta.dtype, device=beta.device)  # written by the kernel
    for launch in _bwd_plan(grad, y, beta, gx, zero, False, series_below):
        _launch(launch, y.device)
    return gx, zero


def forward_launches(numel: int) -> int:
    """CUDA launches of one :func:`forward` over ``numel`` elements: one kernel per chunk (one below 2^30).

    Args:
        numel: the number of elements.
    """
    return len(_chunks(numel))


def backward_launches(numel: int, y_dtype: torch.dtype, beta_dtype: torch.dtype, need_beta: bool) -> int:
    """CUDA launches of one :func:`backward`: the kernel (once per chunk), with the β-gradient the sum of
    the partials, and the cast of that sum where β's dtype is not the accumulation dtype.

    Args:
        numel: the number of elements.
        y_dtype: the output's (and grad's) dtype.
        beta_dtype: β's dtype.
        need_beta: whether the β-gradient is computed.
    """
    kernels = len(_chunks(numel))
    if not need_beta:
        return kernels if numel else 1  # an empty tensor: no kernel, one zero fill
    return kernels + 1 + (acc_dtype(y_dtype) != beta_dtype)
