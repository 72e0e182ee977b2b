"""Krylov eigen-solvers for the symmetric operators the paper needs: the input Hessian of the loss
(§3.1, normalised curvature) and AᵀA of a layer's linear operator (§3.4.1, spectral norms).

Both are batched over rows: ``matvec`` maps (B, d) vectors to (B, d), one operator per row.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch

__all__ = ["lanczos", "power_method"]

MatVec = Callable[[torch.Tensor], torch.Tensor]
_BREAKDOWN = 1e-6  # a Lanczos β below this fraction of the largest coefficient seen is a breakdown


def _project_out(w: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Classical Gram-Schmidt twice against ``basis`` (j, B, d)."""
    for _ in range(2):
        w = w - torch.einsum("jb,jbd->bd", torch.einsum("jbd,bd->jb", basis, w), basis)
    return w


def lanczos(matvec: MatVec, q0: torch.Tensor, n_iter: int, generator: Optional[torch.Generator] = None,
            return_vectors: bool = False) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Batched Lanczos with full re-orthogonalisation, from the start vectors ``q0`` (B, d).

    Returns (the Ritz value of largest magnitude per row, (B,); with ``return_vectors`` its unit
    Ritz vector, (B, d), else None). The extreme Ritz values converge much faster than the power
    method's estimate. Rows whose coefficients are not finite (e.g. a NaN input) give NaN and do not
    affect the others.
    """
    b, d = q0.shape
    k = max(1, min(n_iter, d))
    dtype, device = q0.dtype, q0.device
    tiny = torch.finfo(dtype).tiny
    q = q0 / q0.norm(dim=1, keepdim=True)
    basis = torch.zeros(k, b, d, dtype=dtype, device=device)
    alphas = torch.zeros(b, k, dtype=dtype, device=device)
    betas = torch.zeros(b, k, dtype=dtype, device=device)
    scale = torch.zeros(b, dtype=dtype, device=device)
    for j in range(k):
        basis[j] = q
        w = matvec(q)
        alpha = (w * q).sum(-1)
        alphas[:, j] = alpha
        w = _project_out(w, basis[: j + 1])
        beta = w.norm(dim=1)
        scale = torch.maximum(scale, alpha.abs().maximum(beta))
        if j + 1 == k:
            break
        # Breakdown (an invariant subspace was found, e.g. a low-rank Hessian): restart with a
        # random vector orthogonal to the basis and decouple it in T (β = 0).
        broke = beta <= _BREAKDOWN * scale.clamp_min(tiny)
        r = _project_out(torch.randn(b, d, generator=generator, dtype=dtype).to(device), basis[: j + 1])
        w = torch.where(broke[:, None], r, w)
        betas[:, j] = torch.where(broke, torch.zeros_like(beta), beta)
        q = w / w.norm(dim=1, keepdim=True).clamp_min(tiny)
    t = torch.diag_embed(alphas) + torch.diag_embed(betas[:, : k - 1], 1) + torch.diag_embed(betas[:, : k - 1], -1)
    bad = ~torch.isfinite(t).flatten(1).all(dim=1)
    t = torch.where(bad[:, None, None], torch.zeros_like(t), t)
    if not return_vectors:
        values = torch.linalg.eigvalsh(t).abs().amax(dim=-1)
        return values.masked_fill(bad, float("nan")), None
    evals, evecs = torch.linalg.eigh(t)
    idx = evals.abs().argmax(dim=-1)
    values = evals.gather(1, idx[:, None])[:, 0].abs()
    s = evecs.gather(2, idx[:, None, None].expand(b, k, 1))[:, :, 0]  # (B, k)
    vectors = torch.einsum("bj,jbd->bd", s, basis)
    vectors = vectors / vectors.norm(dim=1, keepdim=True).clamp_min(tiny)
    return values.masked_fill(bad, float("nan")), vectors


def power_method(matvec: MatVec, v0: torch.Tensor, n_iter: int) -> torch.Tensor:
    """The power method's estimate of the largest |eigenvalue| per row after ``n_iter`` products."""
    v = v0 / v0.norm(dim=1, keepdim=True)
    est = torch.zeros(v.shape[0], dtype=v.dtype, device=v.device)
    tiny = torch.finfo(v.dtype).tiny
    for _ in range(max(1, n_iter)):
        w = matvec(v)
        est = w.norm(dim=1)
        v = w / est.clamp_min(tiny)[:, None]
    return est
