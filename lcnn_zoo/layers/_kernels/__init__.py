"""The centered softplus's one-pass kernels (paper §3.3): an implementation detail of :mod:`..activation`.

Kept out of the paper's layers because they bring in ``torch.library``, inductor and Triton:

* :mod:`.fused` — the two ``torch.library`` custom ops, their CPU kernels (inductor-compiled
  formulas), the fallback to the formulas and the record of which path ran;
* :mod:`.triton` — the Triton kernels the ops launch on CUDA (imported on first use: Triton is
  optional and GPU only).

This package is the one door: the activation imports its kernels from here, never from the two
modules (importing it registers the custom ops); the other names are the diagnostics the benchmarks
read (the path that ran, CUDA launches per op). Tests and benchmarks that count launches or break a
kernel on purpose reach into the modules themselves.
"""
from .fused import (
    SERIES_BELOW,
    centered_softplus_bwd,
    centered_softplus_fwd,
    cuda_launches,
    fused_enabled,
    fused_requested,
    fused_status,
    kernel_path,
    reset_fused_status,
)

__all__ = ["fused_enabled", "fused_requested", "centered_softplus_fwd", "centered_softplus_bwd", "SERIES_BELOW",
           "kernel_path", "fused_status", "reset_fused_status", "cuda_launches"]
