"""Curvature measurements against dense input Hessians (float64), gradient robustness, discrepancy."""
import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.functional import hessian

import lcnn_zoo
from lcnn_zoo import (
    CurvatureStats,
    curvature_stats,
    gradient_robustness,
    lcnnify,
    relative_discrepancy,
)


def mlp():
    return nn.Sequential(nn.Linear(12, 16), nn.Softplus(beta=2.0), nn.Linear(16, 16), nn.Tanh(),
                         nn.Linear(16, 5)).double()


def convnet():
    m = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                      nn.Conv2d(4, 4, 3, stride=2, padding=1),
                      nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 3 * 3, 4)).double()
    lcnnify(m, input_size=(2, 6, 6), beta_init=3.0)
    m.train()
    m(torch.randn(16, 2, 6, 6, dtype=torch.float64))  # non-trivial BN statistics
    return m.eval()


def dense(model, x, y):
    grads, norms = [], []
    for i in range(x.shape[0]):
        def f(z):
            return F.cross_entropy(model(z.unsqueeze(0)), y[i:i + 1], reduction="sum")
        xi = x[i].clone().requires_grad_(True)
        (g,) = torch.autograd.grad(f(xi), xi)
        h = hessian(f, x[i]).reshape(x[i].numel(), x[i].numel())
        grads.append(g.norm())
        norms.append(torch.linalg.eigvalsh(h).abs().max())
    return torch.stack(grads), torch.stack(norms)


@pytest.mark.parametrize("make,shape", [(mlp, (12,)), (convnet, (2, 6, 6))])
@pytest.mark.parametrize("method,n_iter", [("lanczos", 20), ("power", 300)])
def test_against_dense_hessian(make, shape, method, n_iter):
    torch.manual_seed(0)
    model = make()
    x = torch.randn(6, *shape, dtype=torch.float64)
    y = torch.randint(0, 4, (6,))
    g, h = dense(model, x, y)
    stats = curvature_stats(model, x, y, n_iter=n_iter, method=method, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(stats.grad_norm, g, rtol=1e-10, atol=0)
    torch.testing.assert_close(stats.hessian_norm, h, rtol=1e-2, atol=0)
    torch.testing.assert_close(stats.curvature, h / (g + 1e-6), rtol=1e-2, atol=0)


def test_lanczos_low_rank_hessian_breakdown():
    """A linear classifier's input Hessian has rank ≤ K-1: Lanczos must survive the breakdown."""
    torch.manual_seed(0)
    model = nn.Linear(30, 3).double()
    x, y = torch.randn(4, 30, dtype=torch.float64), torch.randint(0, 3, (4,))
    _, h = dense(model, x, y)
    stats = curvature_stats(model, x, y, n_iter=10)
    assert torch.isfinite(stats.hessian_norm).all()
    torch.testing.assert_close(stats.hessian_norm, h, rtol=1e-6, atol=0)


def test_restores_training_mode_and_validates():
    model = convnet().train()
    x, y = torch.randn(3, 2, 6, 6, dtype=torch.float64), torch.randint(0, 4, (3,))
    stats = curvature_stats(model, x, y, n_iter=3)
    assert model.training and stats.curvature.shape == (3,)
    with pytest.raises(ValueError, match="method"):
        curvature_stats(model, x, y, method="arnoldi")
    with pytest.raises(ValueError, match="targets"):
        curvature_stats(model, x, y[:2])


def test_gradient_robustness_linear_model_and_quadratic_prediction():
    torch.manual_seed(0)
    model = mlp()
    x, y = torch.randn(8, 12, dtype=torch.float64), torch.randint(0, 5, (8,))
    norms = (1e-4, 1e-3, 1e-2)
    rel = gradient_robustness(model, x, y, norms, generator=torch.Generator().manual_seed(1))
    assert rel.shape == (3, 8) and (rel > 0).all()
    # Prop. 1 (quadratic regime): relative change ≤ ‖ε‖·C(x) for small ε
    stats = curvature_stats(model, x, y, n_iter=12)
    for i, r in enumerate(norms[:2]):
        assert (rel[i] <= r * stats.curvature * 1.05).all()
    assert not (gradient_robustness(model, x, y, (0.0,)) != 0).any()


def test_relative_discrepancy():
    ones = torch.ones(4)
    train = CurvatureStats(ones, 2 * ones, 3 * ones)
    test = CurvatureStats(2 * ones, 2 * ones, 4 * ones)
    assert relative_discrepancy(train, test) == {"grad_norm": 0.5, "hessian_norm": 0.0, "curvature": 0.25}
    summary = test.summary()
    assert summary["grad_norm_mean"] == 2.0 and summary["curvature_std"] == 0.0


def test_curvature_of_a_nan_sample_is_nan_alone():
    model = timm.create_model("lcnn_resnet20.cifar10", num_classes=3)
    x = torch.rand(3, 3, 32, 32)
    x[1, 0, 0, 0] = float("nan")
    stats = lcnn_zoo.curvature_stats(model, x, torch.tensor([0, 1, 2]), n_iter=4)
    assert torch.isnan(stats.curvature[1]) and torch.isfinite(stats.curvature[[0, 2]]).all()
