"""lcnn_zoo.linalg: the batched Krylov solvers against ``torch.linalg.eigh`` of explicit symmetric
matrices (float64), one operator per row."""
import pytest
import torch

from lcnn_zoo.linalg import lanczos, power_method


def _operators(b, d, rank=None, seed=0):
    """``b`` random symmetric (d, d) matrices (rank ``rank`` if given) and their batched matvec."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(b, d, d, generator=g, dtype=torch.float64))
    evals = torch.randn(b, d, generator=g, dtype=torch.float64) * 3
    if rank is not None:
        evals[:, rank:] = 0
    a = q @ torch.diag_embed(evals) @ q.transpose(1, 2)
    return a, lambda v: torch.einsum("bij,bj->bi", a, v)


def test_lanczos_finds_the_largest_magnitude_eigenvalue_and_its_vector_per_row():
    a, matvec = _operators(5, 12)
    evals, evecs = torch.linalg.eigh(a)
    idx = evals.abs().argmax(dim=1)
    want = evals.abs().amax(dim=1)
    q0 = torch.randn(5, 12, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    values, vectors = lanczos(matvec, q0, n_iter=12, return_vectors=True)
    torch.testing.assert_close(values, want, rtol=1e-10, atol=0)
    top = evecs[torch.arange(5), :, idx]  # (B, d): the matching eigenvectors
    torch.testing.assert_close((vectors * top).sum(1).abs(), torch.ones(5, dtype=torch.float64), rtol=1e-8, atol=0)
    alone, none = lanczos(matvec, q0, n_iter=12)
    assert none is None
    torch.testing.assert_close(alone, values, rtol=1e-12, atol=0)


def test_lanczos_survives_a_low_rank_breakdown():
    """Rank 2 in 10 dimensions: the Krylov space is exhausted after two steps; the restart keeps the
    tridiagonal matrix decoupled, so the answer stays the true top eigenvalue."""
    a, matvec = _operators(3, 10, rank=2)
    q0 = torch.randn(3, 10, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    values, _ = lanczos(matvec, q0, n_iter=8, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(values, torch.linalg.eigvalsh(a).abs().amax(dim=1), rtol=1e-10, atol=0)


def test_a_nan_row_gives_nan_and_leaves_the_other_rows_alone():
    a, _ = _operators(3, 6)
    a[1, 0, 0] = float("nan")
    values, _ = lanczos(lambda v: torch.einsum("bij,bj->bi", a, v), torch.ones(3, 6, dtype=torch.float64), n_iter=6)
    assert torch.isnan(values[1]) and torch.isfinite(values[[0, 2]]).all()
    clean = torch.linalg.eigvalsh(a[[0, 2]]).abs().amax(dim=1)
    torch.testing.assert_close(values[[0, 2]], clean, rtol=1e-10, atol=0)


@pytest.mark.parametrize("n_iter,rtol", [(400, 1e-6), (1, 1.0)])
def test_power_method_converges_to_the_largest_magnitude_eigenvalue(n_iter, rtol):
    a, matvec = _operators(4, 8, seed=4)
    want = torch.linalg.eigvalsh(a).abs().amax(dim=1)
    est = power_method(matvec, torch.ones(4, 8, dtype=torch.float64), n_iter=n_iter)
    torch.testing.assert_close(est, want, rtol=rtol, atol=0)
    assert (est <= want * (1 + 1e-12)).all()  # ‖Av‖ for a unit v never exceeds the top |eigenvalue|
