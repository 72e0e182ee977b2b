"""lcnn_zoo.layers.operators on their own (no parametrization): each operator is the layer's bias-free
map, its adjoint is exact, its σ-gradient is autograd's, and conv_padding is what the layer pads."""
import pytest
import torch
import torch.nn.functional as F
from timm.layers import Conv2dSame
from torch import nn

from lcnn_zoo.layers.operators import Conv2dOperator, LinearOperator, conv_padding

CONVS = {
    "plain": lambda: nn.Conv2d(4, 6, 3, padding=1, bias=False),
    "strided_dilated": lambda: nn.Conv2d(4, 6, 3, stride=2, padding=2, dilation=2, bias=False),
    "grouped": lambda: nn.Conv2d(4, 6, 3, padding=1, groups=2, bias=False),
    "reflect": lambda: nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect", bias=False),
    "same_string": lambda: nn.Conv2d(4, 6, 4, padding="same", bias=False),
    "timm_same": lambda: Conv2dSame(4, 6, 3, stride=2, bias=False),
}


def _operator(conv: nn.Conv2d, hw):
    return Conv2dOperator(conv.stride, conv_padding(conv, hw), conv.dilation, conv.groups, conv.padding_mode)


@pytest.mark.parametrize("name", sorted(CONVS))
def test_the_conv_operator_is_the_layer_and_its_adjoint_is_exact(name):
    conv = CONVS[name]().double()
    hw = (7, 9)
    op = _operator(conv, hw)
    x = torch.randn(2, 4, *hw, dtype=torch.float64)
    torch.testing.assert_close(op.apply(x, conv.weight), conv(x))  # the layer's own forward, bias-free
    v_shape, u_shape = op.shapes(conv.weight, (4, *hw))
    v, u = torch.randn(v_shape, dtype=torch.float64), torch.randn(u_shape, dtype=torch.float64)
    lhs = (op.apply(v, conv.weight) * u).sum()
    rhs = (v * op.adjoint(u, conv.weight, v_shape)).sum()
    assert lhs.item() == pytest.approx(rhs.item(), rel=1e-10)


@pytest.mark.parametrize("name", sorted(CONVS))
def test_the_sigma_gradient_is_autograds(name):
    conv = CONVS[name]().double()
    op = _operator(conv, (7, 9))
    v_shape, u_shape = op.shapes(conv.weight, (4, 7, 9))
    v, u = torch.randn(v_shape, dtype=torch.float64), torch.randn(u_shape, dtype=torch.float64)
    w = conv.weight.detach().clone().requires_grad_(True)
    (expected,) = torch.autograd.grad((op.apply(v, w) * u).sum(), w)
    if op.sigma_gradient is None:  # reflect padding: autograd differentiates those
        assert name == "reflect"
        return
    torch.testing.assert_close(op.sigma_gradient(u, v, conv.weight), expected)


def test_the_linear_operator():
    w = torch.randn(3, 5, dtype=torch.float64)
    op = LinearOperator()
    assert op.shapes(w) == ((5,), (3,))
    v, u = torch.randn(5, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    torch.testing.assert_close(op.apply(v, w), w @ v)
    torch.testing.assert_close(op.adjoint(u, w, (5,)), w.t() @ u)
    torch.testing.assert_close(op.sigma_gradient(u, v, w), torch.outer(u, v))


def test_conv_padding_and_shape_errors():
    assert conv_padding(nn.Conv2d(1, 1, 4, padding="same"), None) == (1, 2, 1, 2)  # the odd extra right/bottom
    assert conv_padding(nn.Conv2d(1, 1, 3, padding="valid"), None) == (0, 0, 0, 0)
    assert conv_padding(nn.Conv2d(1, 1, 3, padding=(1, 2)), None) == (2, 2, 1, 1)
    with pytest.raises(ValueError, match="pads dynamically"):
        conv_padding(Conv2dSame(1, 1, 3, stride=2), None)
    op = Conv2dOperator()
    with pytest.raises(ValueError, match="input has 2 channels, the conv expects 1"):
        op.shapes(torch.zeros(1, 1, 3, 3), (2, 5, 5))
    with pytest.raises(ValueError, match="too small"):
        op.shapes(torch.zeros(1, 1, 3, 3), (1, 2, 2))
    x = torch.randn(1, 1, 5, 5)
    torch.testing.assert_close(op.apply(x, torch.ones(1, 1, 3, 3)), F.conv2d(x, torch.ones(1, 1, 3, 3)))
