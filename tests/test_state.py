"""lcnn_zoo.layers.state: the contexts and maintenance functions that touch every LCNN layer at once
— eval_mode, frozen_state, converge_spectral_norms, recalibrate_batchnorm — each checked against
what it promises (modes restored on error, nothing recorded, σ from a dense SVD, plain averages)."""
import pytest
import torch
from torch import nn

from lcnn_zoo.layers import (
    LipschitzBatchNorm2d,
    converge_spectral_norms,
    eval_mode,
    frozen_state,
    recalibrate_batchnorm,
    spectral_norm,
    spectral_norm_modules,
)

from model_helpers import dense_norm


def _net():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), LipschitzBatchNorm2d(3, affine=True), nn.ReLU(),
                        nn.Conv2d(3, 2, 3, padding=1), nn.BatchNorm2d(2)).double()
    for i in (0, 3):
        spectral_norm(net[i], (2 if i == 0 else 3, 5, 5))
    return net


def _state(net):
    return {k: v.clone() for k, v in net.state_dict().items()}


def test_eval_mode_restores_the_mode_even_on_an_exception():
    net = _net().train()
    with pytest.raises(RuntimeError, match="boom"):
        with eval_mode(net):
            assert not any(m.training for m in net.modules())
            raise RuntimeError("boom")
    assert all(m.training for m in net.modules())
    net.eval()
    with eval_mode(net):
        pass
    assert not net.training


def test_frozen_state_records_nothing_and_computes_the_recording_function():
    net = _net().train()
    x = torch.randn(4, 2, 5, 5, dtype=torch.float64)
    before = _state(net)
    with frozen_state(net):
        frozen = net(x)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    recording = net(x)  # outside: statistics and power iterations advance
    assert any(not torch.equal(v, before[k]) for k, v in net.state_dict().items())
    torch.testing.assert_close(frozen, recording, rtol=1e-6, atol=1e-6)  # σ moved by one power step only


def test_converge_spectral_norms_reaches_sigma_of_the_dense_operator():
    net = _net()
    with torch.no_grad():  # a weight changed in place: the stored singular vectors are stale
        for m, _ in spectral_norm_modules(net):
            m.parametrizations.weight.original.mul_(torch.linspace(0.2, 3.0, m.out_channels,
                                                                   dtype=torch.float64)[:, None, None, None])
    assert converge_spectral_norms(net, n_iter=500, tol=1e-9) == 2
    for (m, sn), c in zip(spectral_norm_modules(net), (2, 3)):
        x = torch.zeros(1, c, 5, 5, dtype=torch.float64)
        with torch.no_grad():  # the normalised layer's operator norm, from the SVD of its dense Jacobian
            assert dense_norm(lambda t: m._conv_forward(t, m.weight, None), x) == pytest.approx(1.0, abs=1e-6)
        assert sn.last_residual <= 1e-9


def test_recalibrate_batchnorm_sets_the_plain_average_of_the_batches_statistics():
    net = _net()
    batches = [torch.randn(6, 2, 5, 5, dtype=torch.float64) * (i + 1) + i for i in range(3)]
    sn_state = {k: v.clone() for k, v in net.state_dict().items() if k.endswith(("_u", "_v"))}
    net.eval()
    assert recalibrate_batchnorm(net, iter(batches)) == 3
    assert not net.training and net[1].momentum == 0.1 and net[4].momentum == 0.1  # put back
    assert all(torch.equal(net.state_dict()[k], v) for k, v in sn_state.items())  # spectral norms frozen
    with torch.no_grad():
        first = [net[0](b) for b in batches]  # the inputs the first BN saw
    mean = torch.stack([f.mean(dim=(0, 2, 3)) for f in first]).mean(0)
    var = torch.stack([f.var(dim=(0, 2, 3), unbiased=True) for f in first]).mean(0)
    torch.testing.assert_close(net[1].running_mean, mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(net[1].running_var, var, rtol=1e-12, atol=1e-12)
    assert int(net[1].num_batches_tracked) == 3 and int(net[4].num_batches_tracked) == 3
