"""Triton kernels for the centered softplus (CUDA; with ``TRITON_INTERPRET=1`` also on CPU tensors).

The same functions as :func:`.fused.forward_formula` and :func:`.fused.backward_formula`, on 1-D
dense views, computed in float32 (float64 for float64 tensors). ``log1p``/``expm1`` are written with
Kahan's and Goldberg's identities from ``exp``/``log`` (accurate to a few ulp), so the kernels need
no libdevice and run unchanged under Triton's interpreter. The backward adds each block's share of
the β-gradient into one accumulator with an atomic add (its summation order is not fixed).
"""
from __future__ import annotations

import math
from typing import Tuple

import torch
import triton
import triton.language as tl

__all__ = ["forward", "backward"]

_BLOCK = 1024


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


@triton.jit
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


@triton.jit
def _bwd_kernel(g_ptr, y_ptr, beta_ptr, gx_ptr, acc_ptr, n, log_tiny, BLOCK: tl.constexpr, ACC: tl.constexpr,
                NEED_BETA: tl.constexpr, SMALL: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
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
        tl.atomic_add(acc_ptr, part)


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def forward(x: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """x: 1-D contiguous; beta: 0-dim. Returns s0(x; β), x's dtype."""
    y = torch.empty_like(x)
    n = x.numel()
    if n:
        _fwd_kernel[(triton.cdiv(n, _BLOCK),)](x, y, beta, n, BLOCK=_BLOCK, ACC=_acc(x.dtype))
    return y


def backward(grad: torch.Tensor, y: torch.Tensor, beta: torch.Tensor, need_beta: bool, series_below: float
             ) -> Tuple[torch.Tensor, torch.Tensor]:
    """grad, y: 1-D contiguous, same size; series_below: |βy| under which ∂s0/∂β uses its series.
    Returns (grad·∂s0/∂x, Σ grad·∂s0/∂β as beta's dtype)."""
    gx = torch.empty_like(y)
    acc_dtype = torch.float64 if y.dtype == torch.float64 else torch.float32
    acc = torch.zeros((), dtype=acc_dtype, device=y.device)
    n = y.numel()
    if n:
        log_tiny = math.log(torch.finfo(y.dtype).tiny) + 2.0
        _bwd_kernel[(triton.cdiv(n, _BLOCK),)](grad, y, beta, gx, acc, n, log_tiny, BLOCK=_BLOCK, ACC=_acc(y.dtype),
                                               NEED_BETA=bool(need_beta), SMALL=series_below)
    if not need_beta:
        return gx, torch.zeros((), dtype=beta.dtype, device=beta.device)
    b = beta.to(acc_dtype)
    return gx, (acc / (b * b)).to(beta.dtype)
