"""The LCNN guarantee across modules, in the modes users reach: channels_last against contiguous,
train vs eval, weights changed in place, finite-difference GradReg in training mode with the γ-clip
active, and Theorem 1's bound on the Hessian (the per-module properties are in the module's own
test file: test_coverage.py, test_conversion.py, test_folding.py, …)."""
import copy

import pytest
import timm
import torch
from torch import nn

from lcnn_zoo import (
    CenteredSoftplus,
    LipschitzBatchNorm2d,
    LipschitzBatchNormAct2d,
    curvature_stats,
    gradreg_exact,
    gradreg_fd_backward,
    lcnnify,
    spectral_norm,
)


def _grads(module, x, train):
    module = copy.deepcopy(module).train(train)
    x = x.detach().clone().requires_grad_(True)
    out = module(x)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    params = [p for p in module.parameters() if p.requires_grad]
    grads = torch.autograd.grad(out, [x] + params, g.to(memory_format=torch.contiguous_format))
    return out, grads


def _assert_same(a, b):
    for u, v in zip(a, b):
        assert (u - v).norm().item() <= 1e-5 * v.norm().item() + 1e-12  # 1e-5 relative (float64)


LAYERS = {
    "softplus": lambda: CenteredSoftplus(2.0),
    "lbn": lambda: LipschitzBatchNorm2d(6, gamma_init=1.5),
    "lbn_affine": lambda: LipschitzBatchNorm2d(6, affine=True, gamma_init=1.5),
    "lbn_act": lambda: LipschitzBatchNormAct2d(6, act=CenteredSoftplus(3.0), gamma_init=1.5),
    "sn_conv": lambda: spectral_norm(nn.Conv2d(6, 6, 3, padding=1, stride=2).double(), (6, 8, 8)),
}


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("name", sorted(LAYERS))
def test_channels_last_gradients_equal_contiguous(name, train):
    layer = LAYERS[name]().double()
    for m in layer.modules():
        if isinstance(m, LipschitzBatchNorm2d):
            with torch.no_grad():
                m.running_var.uniform_(0.001, 0.01)  # ‖BN‖ > γ: the clip is active
    x = torch.randn(4, 6, 8, 8, dtype=torch.float64) * 2
    out_c, g_c = _grads(layer, x, train)
    out_l, g_l = _grads(layer, x.to(memory_format=torch.channels_last), train)
    torch.testing.assert_close(out_l, out_c)
    _assert_same(g_l, g_c)


@pytest.mark.parametrize("train", [True, False])
def test_channels_last_whole_zoo_model(train):
    torch.manual_seed(0)
    model = timm.create_model("lcnn_resnet20.cifar10", num_classes=5).double()
    x = torch.rand(4, 3, 32, 32, dtype=torch.float64)
    _, g_c = _grads(model, x, train)
    cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    _, g_l = _grads(cl, x.to(memory_format=torch.channels_last), train)
    _assert_same(g_l, g_c)
    y = torch.randint(0, 5, (4,))
    a = curvature_stats(model, x, y, n_iter=5, generator=torch.Generator().manual_seed(0))
    b = curvature_stats(cl, x.to(memory_format=torch.channels_last), y, n_iter=5,
                        generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(b.curvature, a.curvature, rtol=1e-6, atol=0)


def test_fd_gradreg_matches_exact_in_train_mode_with_active_clip():
    """Both FD passes use the γ-clip of the running variance before the step's update, so the FD
    error shrinks with the step (it grew like 1/step when the second pass saw the updated variance)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Conv2d(4, 4, 3, stride=2, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Flatten(), nn.Linear(36, 3)).double()
    lcnnify(model, input_size=(2, 6, 6), beta_init=2.0, gamma_init=1.5)
    for m in model.modules():
        if isinstance(m, LipschitzBatchNorm2d):
            with torch.no_grad():
                m.running_var.fill_(1e-3)  # ‖BN‖ ≈ 32 > γ: clip active, and the batch moves the variance a lot
    model.train()
    x, y = torch.randn(6, 2, 6, 6, dtype=torch.float64) * 3, torch.randint(0, 3, (6,))
    params = list(model.parameters())
    state = copy.deepcopy(model.state_dict())
    out = gradreg_exact(model, x, y)
    exact = torch.autograd.grad(out.loss + 0.3 * out.penalty, params, allow_unused=True)
    errors = []
    for step in (1e-2, 1e-3, 1e-4):
        model.load_state_dict(state)
        for p in params:
            p.grad = None
        gradreg_fd_backward(model, x, y, 0.3, step=step)
        num = sum((p.grad - e).pow(2).sum() for p, e in zip(params, exact) if e is not None)
        den = sum(e.pow(2).sum() for e in exact if e is not None)
        errors.append((num / den).sqrt().item())
    assert errors[-1] < 1e-3 and errors[2] < errors[0], errors


def test_zoo_model_eval_sees_in_place_weight_updates():
    model = timm.create_model("lcnn_resnet20.cifar10", num_classes=3).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
        for p in model.parameters():  # what EMA/SWA tools do
            p.data.mul_(0.5).add_(torch.randn_like(p) * 0.1)
        after = model(x)
        reference = copy.deepcopy(model)(x)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, reference)


def test_theorem_1_bounds_the_hessian_not_normalised_curvature_where_gradients_vanish():
    """A 1→2→1 LCNN with β = 2 (unit-norm layers): Theorem 1's bound is n·β = 4, yet at x = 0.01 the
    normalised curvature |f''|/|f'| is ≈ 1/x = 100, since f is even and f'(0) = 0; |f''| stays ≤ 4."""
    f = nn.Sequential(nn.Linear(1, 2, bias=False), CenteredSoftplus(2.0, learnable=False),
                      nn.Linear(2, 1, bias=False)).double()
    with torch.no_grad():
        f[0].weight.copy_(torch.tensor([[1.0], [-1.0]]) / 2 ** 0.5)
        f[2].weight.copy_(torch.tensor([[1.0, 1.0]]) / 2 ** 0.5)
    for layer in (f[0], f[2]):
        assert torch.linalg.matrix_norm(layer.weight.detach(), 2).item() == pytest.approx(1.0)
    x = torch.tensor([[0.01]], dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(f(x).sum(), x, create_graph=True)
    (h,) = torch.autograd.grad(g.sum(), x)
    assert abs(h.item()) <= 2 * 2.0  # the bound Σ nᵢ·βᵢ·Π Lⱼ = 2·2·1
    assert abs(h.item() / g.item()) == pytest.approx(100.0, rel=1e-3)
