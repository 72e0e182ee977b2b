"""The centered softplus's one-pass kernels (paper §3.3): an implementation detail of :mod:`..activation`.

Kept out of the paper's layers because they bring in ``torch.library``, inductor and Triton:

* :mod:`.fused` — the two ``torch.library`` custom ops, their CPU kernels (inductor-compiled
  formulas), the fallback to the formulas and the record of which path ran;
* :mod:`.triton` — the Triton kernels the ops launch on CUDA (imported on first use: Triton is
  optional and GPU only).

This package is the one door: the activation imports these names and nothing else from here
(importing it registers the custom ops). Benchmarks and tests that count launches or break a kernel
on purpose reach into the two modules themselves.
"""
from .fused import (
    SERIES_BELOW,
    backward_formula,
    centered_softplus_bwd,
    centered_softplus_fwd,
    cuda_launches,
    forward_formula,
    fused_enabled,
    fused_status,
    kernel_path,
    reset_fused_status,
)

__all__ = ["fused_enabled", "centered_softplus_fwd", "centered_softplus_bwd", "forward_formula", "backward_formula",
           "SERIES_BELOW", "kernel_path", "fused_status", "reset_fused_status", "cuda_launches"]
