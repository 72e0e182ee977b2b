"""lcnn_zoo.layers.scale: the constant factor that averages residual branches — its Lipschitz
constant is |scale| (dense Jacobian), and (branch + shortcut) · ½ of two 1-Lipschitz maps is
1-Lipschitz."""
import pytest
import torch
from torch import nn

from lcnn_zoo.layers import Scale

from model_helpers import dense_norm


def test_the_lipschitz_constant_is_the_factor():
    x = torch.randn(2, 3, dtype=torch.float64)
    for s in (0.5, -2.0):
        assert dense_norm(Scale(s), x) == pytest.approx(abs(s), rel=1e-12)
    assert repr(Scale(0.5)) == "Scale(0.5)"


def test_an_averaged_residual_of_two_one_lipschitz_maps_is_one_lipschitz():
    torch.manual_seed(0)
    lin = nn.Linear(6, 6, bias=False).double()
    with torch.no_grad():
        lin.weight.div_(torch.linalg.matrix_norm(lin.weight, 2))  # ‖W‖₂ = 1
    half = Scale(0.5)
    x = torch.randn(1, 6, dtype=torch.float64)
    assert dense_norm(lambda t: half(lin(t) + t), x) <= 1 + 1e-12
    assert dense_norm(lambda t: lin(t) + t, x) > 1 + 1e-3  # without the average, the sum can exceed 1
