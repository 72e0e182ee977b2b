"""γ-Lipschitz BatchNorm: Lipschitz constant from the dense Jacobian, BatchNorm semantics."""
import pytest
import torch
from torch import nn
from torch.autograd.functional import jacobian

from lcnn_zoo import LipschitzBatchNorm2d, frozen_state


def dense_lipschitz(module, shape):
    x = torch.randn(1, *shape, dtype=torch.float64)
    j = jacobian(module, x).reshape(x.numel(), x.numel())
    return torch.linalg.matrix_norm(j, 2).item()


def make(affine, gamma, var_scale):
    bn = LipschitzBatchNorm2d(4, affine=affine, gamma_init=gamma).double()
    with torch.no_grad():
        bn.running_var.copy_(torch.tensor([0.5, 2.0, 0.01, 1.0]) * var_scale)
        bn.running_mean.copy_(torch.tensor([0.1, -0.2, 0.3, 0.0]))
        if affine:
            bn.weight.copy_(torch.tensor([1.5, -0.3, 0.2, 2.0]))
            bn.bias.copy_(torch.tensor([0.1, 0.2, 0.3, 0.4]))
    return bn.eval()


@pytest.mark.parametrize("affine", [False, True])
@pytest.mark.parametrize("gamma,var_scale", [(2.0, 1.0), (50.0, 1.0), (1.5, 100.0)])
def test_eval_lipschitz_is_min_gamma_bn_norm(affine, gamma, var_scale):
    bn = make(affine, gamma, var_scale)
    w = bn.weight.detach().abs() if affine else torch.ones(4, dtype=torch.float64)
    bn_norm = (w / torch.sqrt(bn.running_var + bn.eps)).max().item()
    lip = dense_lipschitz(bn, (4, 3, 3))
    assert lip <= bn.gamma.item() * (1 + 1e-9)
    assert lip == pytest.approx(min(bn.gamma.item(), bn_norm), rel=1e-9)
    assert bn.bn_lipschitz().item() == pytest.approx(bn_norm, rel=1e-12)


def test_gamma_at_least_one_and_learnable():
    bn = LipschitzBatchNorm2d(3, gamma_init=1.0001)
    assert bn.gamma.item() == pytest.approx(1.0001, rel=1e-5)
    with torch.no_grad():
        bn.gamma_raw.fill_(-1e4)
    assert bn.gamma.item() >= 1.0
    for bad in (1.0, 0.5, float("nan")):
        with pytest.raises(ValueError, match="gamma_init"):
            LipschitzBatchNorm2d(3, gamma_init=bad)
    bn = LipschitzBatchNorm2d(3, gamma_init=2.0)
    bn.eval()
    with torch.no_grad():
        bn.running_var.fill_(1e-4)  # ‖BN‖ = 100 > γ: the loss gradient reaches γ
    bn(torch.randn(2, 3, 4, 4)).pow(2).sum().backward()
    assert bn.gamma_raw.grad is not None and bn.gamma_raw.grad.abs() > 0


@pytest.mark.parametrize("momentum", [0.1, None])
def test_training_matches_batchnorm2d_times_scale(momentum):
    # Over its first 1/momentum batches the layer averages them (see the next test): BatchNorm2d's
    # cumulative average (momentum None) is the reference there.
    ref = nn.BatchNorm2d(5, momentum=None, affine=True)
    lbn = LipschitzBatchNorm2d(5, momentum=momentum, affine=True, gamma_init=3.0)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 2)
        ref.bias.normal_()
        lbn.weight.copy_(ref.weight)
        lbn.bias.copy_(ref.bias)
    for _ in range(3):
        x = torch.randn(8, 5, 4, 4) * 3 + 1
        # The scale uses the running variance before this batch updates it (folded into BN's weight).
        norm = (ref.weight.abs() / torch.sqrt(ref.running_var + ref.eps)).max()
        out, expected = lbn(x), ref(x)
        torch.testing.assert_close(lbn.running_mean, ref.running_mean)
        torch.testing.assert_close(lbn.running_var, ref.running_var)
        assert lbn.num_batches_tracked == ref.num_batches_tracked
        torch.testing.assert_close(out, expected * torch.clamp(lbn.gamma / norm, max=1.0))
    lbn.eval(), ref.eval()
    x = torch.randn(2, 5, 4, 4)
    norm = (ref.weight.abs() / torch.sqrt(ref.running_var + ref.eps)).max()
    torch.testing.assert_close(lbn(x), ref(x) * torch.clamp(lbn.gamma / norm, max=1.0))


@pytest.mark.parametrize("momentum", [0.1, 0.3])
def test_running_statistics_average_the_first_batches_then_follow_the_momentum(momentum):
    """The n-th batch moves the running statistics by max(momentum, 1/n) of the way to its own (mean,
    unbiased variance), computed here independently: no trace of the initial (0, 1) after one batch."""
    torch.manual_seed(0)
    lbn = LipschitzBatchNorm2d(3, momentum=momentum).train()
    mean, var = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    for n in range(1, 26):
        x = torch.randn(8, 3, 4, 4) * 0.003 * n + 0.5  # tiny variances, as an LCNN's first activations
        lbn(x)
        w = max(momentum, 1.0 / n)
        xd = x.double()
        mean = (1 - w) * mean + w * xd.mean((0, 2, 3))
        var = (1 - w) * var + w * xd.var((0, 2, 3), unbiased=True)
        torch.testing.assert_close(lbn.running_mean.double(), mean, rtol=1e-5, atol=0)
        torch.testing.assert_close(lbn.running_var.double(), var, rtol=1e-5, atol=0)
    with frozen_state(lbn):  # a frozen forward records nothing
        lbn(torch.randn(8, 3, 4, 4))
    torch.testing.assert_close(lbn.running_var.double(), var, rtol=1e-5, atol=0)
    assert int(lbn.num_batches_tracked) == 25


def test_state_dict_keys_and_frozen_state():
    lbn = LipschitzBatchNorm2d(3, affine=True)
    assert set(lbn.state_dict()) == {"weight", "bias", "running_mean", "running_var", "num_batches_tracked",
                                     "gamma_raw"}
    assert set(LipschitzBatchNorm2d(3).state_dict()) == {"running_mean", "running_var", "num_batches_tracked",
                                                         "gamma_raw"}
    lbn.train()
    before = {k: v.clone() for k, v in lbn.state_dict().items()}
    with frozen_state(lbn):
        x = torch.randn(4, 3, 2, 2) * 5
        y = lbn(x)
    for k, v in lbn.state_dict().items():
        assert torch.equal(v, before[k]), k
    # batch statistics were still used
    torch.testing.assert_close(y.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)
    assert lbn.update_stats


def test_not_a_batchnorm_subclass_survives_syncbn_conversion():
    model = nn.Sequential(nn.Conv2d(3, 3, 1), LipschitzBatchNorm2d(3))
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert isinstance(converted[1], LipschitzBatchNorm2d)


def test_rejects_non_4d():
    with pytest.raises(ValueError, match="4D"):
        LipschitzBatchNorm2d(3)(torch.randn(4, 3))


@pytest.mark.parametrize("affine", [False, True])
def test_saves_no_extra_activation_for_backward(affine):
    """The Lipschitz scale is folded into BatchNorm's weight: autograd keeps no tensor of the
    output's size beyond what F.batch_norm keeps (its input), and the gradients match the unfused form."""
    lbn = LipschitzBatchNorm2d(4, affine=affine, gamma_init=1.5).train()
    with torch.no_grad():
        lbn.running_var.fill_(1e-2)  # ‖BN‖ = 10 > γ: the scale is active
    x = torch.randn(8, 4, 6, 6, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = lbn(x)
    big = [t for t in saved if t.numel() == x.numel()]
    assert len(big) == 1 and big[0] is x
    # gradients against the unfused definition BN(x) · min(γ, ‖BN‖)/‖BN‖
    ref = LipschitzBatchNorm2d(4, affine=affine, gamma_init=1.5).train()
    ref.load_state_dict({k: v for k, v in lbn.state_dict().items()})
    with torch.no_grad():
        ref.running_var.fill_(1e-2)
        ref.num_batches_tracked.zero_()
    x2 = x.detach().clone().requires_grad_(True)
    scale = ref.lipschitz_scale()
    y2 = torch.nn.functional.batch_norm(x2, None, None, ref.weight, ref.bias, True) * scale
    g = torch.randn_like(y)
    params = [p for p in lbn.parameters()]
    grads = torch.autograd.grad(y, [x] + params, g)
    grads2 = torch.autograd.grad(y2, [x2] + [p for p in ref.parameters()], g)
    torch.testing.assert_close(y, y2)
    for a, b in zip(grads, grads2):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("gamma,var_scale", [(2.0, 1.0), (50.0, 1.0), (1.5, 100.0)])
def test_channel_scale_matches_the_lipschitz_scale_and_its_gradient(gamma, var_scale):
    """The training forward's one-Function γ-clip (no affine weight) against
    γ / max(‖BN‖₂, γ) by autograd, in both regimes (γ below and above ‖BN‖₂), float64."""
    from lcnn_zoo.layers.batchnorm import _ChannelScale

    bn = make(False, gamma, var_scale)
    raw = bn.gamma_raw
    got = _ChannelScale.apply(raw, bn.running_var, bn.eps, 4)
    assert got.shape == (4,) and got.is_contiguous()
    (g_got,) = torch.autograd.grad(got.sum() * 3.0, raw)
    want = bn.lipschitz_scale().repeat(4)
    (g_want,) = torch.autograd.grad(want.sum() * 3.0, raw)
    torch.testing.assert_close(got, want, rtol=1e-14, atol=0)
    torch.testing.assert_close(g_got, g_want, rtol=1e-12, atol=1e-15)


def test_compiled_and_loaded_layers_move_their_statistics_alike():
    """The compiled forward (n a tensor) updates the statistics as the eager one (n counted in Python);
    a loaded layer that has seen many batches follows its momentum from the first step."""
    torch.manual_seed(0)
    eager = LipschitzBatchNorm2d(3).train()
    compiled_layer = LipschitzBatchNorm2d(3).train()
    compiled = torch.compile(compiled_layer, backend="aot_eager")
    for _ in range(4):
        x = torch.randn(8, 3, 4, 4) * 0.01 + 0.3
        eager(x)
        compiled(x)
    torch.testing.assert_close(compiled_layer.running_var, eager.running_var)
    torch.testing.assert_close(compiled_layer.running_mean, eager.running_mean)
    seasoned = LipschitzBatchNorm2d(3)
    seasoned.load_state_dict({**eager.state_dict(), "num_batches_tracked": torch.tensor(500)})
    before, x = seasoned.running_var.clone(), torch.randn(8, 3, 4, 4)
    seasoned.train()(x)
    torch.testing.assert_close(seasoned.running_var, 0.9 * before + 0.1 * x.var((0, 2, 3), unbiased=True))
