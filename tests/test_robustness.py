"""ℓ2-PGD against the analytic optimal attack on a linear classifier."""
import pytest
import torch
from torch import nn

from lcnn_zoo.robustness import pgd_accuracy, pgd_l2


def linear_binary(d=20):
    torch.manual_seed(0)
    model = nn.Linear(d, 2).double()
    return model


def margins(model, x, y):
    """ℓ2 distance of each x to the decision boundary of a 2-class linear model (> 0 if correct)."""
    w = model.weight[1] - model.weight[0]
    b = model.bias[1] - model.bias[0]
    s = (x @ w + b) / w.norm()
    return torch.where(y == 1, s, -s)


def test_matches_analytic_linear_attack():
    model = linear_binary()
    x = torch.randn(400, 20, dtype=torch.float64)
    y = torch.randint(0, 2, (400,))
    with torch.no_grad():
        m = margins(model, x, y)
    for eps in (0.05, 0.3, 1.0):
        adv = pgd_l2(model, x, y, eps, steps=20, clamp=None)
        assert ((adv - x).norm(dim=1) <= eps * (1 + 1e-9)).all()
        with torch.no_grad():
            robust = model(adv).argmax(1) == y
        # optimal attack: a correctly classified point survives iff its margin exceeds eps
        expected = m > eps
        assert torch.equal(robust, expected)


def test_box_constraint_and_zero_eps():
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    x = torch.rand(8, 1, 3, 4)
    y = torch.randint(0, 3, (8,))
    adv = pgd_l2(model, x, y, 0.5, steps=5, random_start=True, generator=torch.Generator().manual_seed(0))
    assert adv.min() >= 0 and adv.max() <= 1
    assert ((adv - x).flatten(1).norm(dim=1) <= 0.5 + 1e-6).all()
    assert torch.equal(pgd_l2(model, x, y, 0.0), x)
    with pytest.raises(ValueError):
        pgd_l2(model, x, y, -1.0)


def test_pgd_accuracy_monotone_and_restores_mode():
    model = linear_binary()
    model.train()
    x = torch.randn(200, 20, dtype=torch.float64)
    y = (x[:, 0] > 0).long()
    acc = pgd_accuracy(model, [(x[:100], y[:100]), (x[100:], y[100:])], [0.0, 0.1, 0.5, 2.0], clamp=None)
    vals = [acc[e] for e in (0.0, 0.1, 0.5, 2.0)]
    assert vals == sorted(vals, reverse=True) and model.training
    with torch.no_grad():
        clean = 100.0 * (model(x).argmax(1) == y).double().mean().item()
    assert acc[0.0] == pytest.approx(clean)


def test_pgd_accuracy_attacks_survivors_only_and_matches_analytic():
    """Radii in any order; each attacks only what survived the smaller ones, and the result is the
    optimal attack's robust accuracy (a linear model: robust iff margin > ε)."""
    model = linear_binary()
    x = torch.randn(300, 20, dtype=torch.float64)
    y = torch.randint(0, 2, (300,))
    calls = []
    model.register_forward_hook(lambda mod, inp, out: calls.append(inp[0].shape[0]))
    eps_list = [0.5, 0.0, 2.0, 0.1]
    acc = pgd_accuracy(model, [(x, y)], eps_list, steps=20, clamp=None)
    assert list(acc) == eps_list
    with torch.no_grad():
        m = margins(model, x, y)
    for e in eps_list:
        assert acc[e] == pytest.approx(100.0 * (m > e).double().mean().item())
    # 1 clean pass of 300, then 20 steps + 1 check per positive radius on the survivors only
    survivors = [int((m > e).sum()) for e in (0.0, 0.1, 0.5)]
    assert calls == [300] + [n for n in survivors for _ in range(21)]


def test_pgd_accuracy_restores_the_mode_even_when_it_fails():
    """The model's train/eval mode is restored on the way out, an exception included (one context
    manager, lcnn_zoo.layers.eval_mode, for every measurement)."""
    class Boom(nn.Module):
        def forward(self, x):
            assert not self.training
            raise RuntimeError("boom")

    model = Boom().train()
    with pytest.raises(RuntimeError, match="boom"):
        pgd_accuracy(model, [(torch.zeros(1, 2), torch.zeros(1, dtype=torch.long))], [0.0])
    assert model.training
