"""CenteredSoftplus against independent float64 formulas, finite differences and gradcheck."""
import math

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

from lcnn_zoo import CenteredSoftplus, FrozenCenteredSoftplus, centered_softplus


def reference(x: torch.Tensor, beta: float) -> torch.Tensor:
    """Naive float64 formula (1/β)·log((1+e^{βx})/2), valid where e^{βx} neither over- nor under-flows."""
    x = x.double()
    return torch.log((1 + torch.exp(beta * x)) / 2) / beta


@pytest.mark.parametrize("beta", [0.1, 1.0, 5.0, 30.0])
def test_matches_naive_formula(beta):
    x = torch.linspace(-20 / beta, 20 / beta, 1001)
    act = CenteredSoftplus(beta_init=beta)
    y = act(x)
    torch.testing.assert_close(y.double(), reference(x, beta), rtol=1e-5, atol=1e-6 / beta)


def test_zero_limits_and_property():
    act = CenteredSoftplus(beta_init=5.0)
    assert act(torch.zeros(3)).abs().max() == 0
    assert torch.allclose(act.beta, torch.tensor(5.0))
    x = torch.linspace(-3, 3, 101)
    # β → 0: s0(x) = x/2 + βx²/8 + O(β²)
    small = CenteredSoftplus(beta_init=1e-4)(x)
    torch.testing.assert_close(small, x / 2 + 1e-4 * x * x / 8, rtol=1e-5, atol=1e-7)
    # β → ∞: ReLU up to log(2)/β
    large = CenteredSoftplus(beta_init=1e4)(x)
    assert (large - torch.relu(x)).abs().max() <= math.log(2) / 1e4 * 1.001


@pytest.mark.parametrize("beta", [1e-4, 1e-2, 1.0, 1e2, 1e4])
def test_stable_extreme_range(beta):
    """|βx| up to 1e4 and β from 1e-4 to 1e4: finite outputs and gradients (float32)."""
    t = torch.cat([-torch.logspace(-8, 4, 200), torch.zeros(1), torch.logspace(-8, 4, 200)])
    x = (t / beta).float().requires_grad_(True)
    act = CenteredSoftplus(beta_init=beta)
    y = act(x)
    assert torch.isfinite(y).all()
    y.sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(act.log_beta.grad)
    # asymptotes: s0 ≈ x - log2/β for βx ≫ 1, ≈ -log2/β for βx ≪ -1
    hi, lo = t > 50, t < -50
    torch.testing.assert_close(y[hi].double(), x[hi].double() - math.log(2) / beta, rtol=1e-6, atol=1e-3 / beta)
    torch.testing.assert_close(y[lo].double(), torch.full_like(y[lo].double(), -math.log(2) / beta),
                               rtol=1e-6, atol=1e-3 / beta)


def test_derivative_at_zero_is_half():
    x = torch.zeros(4, requires_grad=True)
    CenteredSoftplus(beta_init=3.0)(x).sum().backward()
    assert torch.equal(x.grad, torch.full((4,), 0.5))


@pytest.mark.parametrize("beta", [1e-3, 0.7, 5.0])
def test_gradcheck_first_second_and_forward_mode(beta):
    x = (torch.randn(12, dtype=torch.float64) * 2 / beta).requires_grad_(True)
    x.data[0] = 0.0
    b = torch.tensor(beta, dtype=torch.float64, requires_grad=True)
    assert gradcheck(centered_softplus, (x, b), check_forward_ad=True)
    assert gradgradcheck(centered_softplus, (x, b))


def test_beta_gradient_small_beta_against_series():
    """∂s0/∂β → x²/8 as β → 0 (the cancellation-prone regime)."""
    x = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    b = torch.tensor(1e-5, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(centered_softplus(x, b).sum(), b)
    torch.testing.assert_close(g, (x * x / 8).sum(), rtol=1e-4, atol=0)


def test_second_derivative_is_curvature_formula():
    """s0''(x) = β σ(βx)(1-σ(βx)) — what the curvature bound uses (eq. 3)."""
    x = torch.randn(20, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(2.5, dtype=torch.float64)
    (g,) = torch.autograd.grad(centered_softplus(x, b).sum(), x, create_graph=True)
    (h,) = torch.autograd.grad(g.sum(), x)
    s = torch.sigmoid(b * x.detach())
    torch.testing.assert_close(h, b * s * (1 - s))


def test_inplace_accepted_and_bad_beta():
    act = CenteredSoftplus(beta_init=2.0, inplace=True)
    x = torch.randn(5)
    x0 = x.clone()
    act(x)
    assert torch.equal(x, x0)  # never in place
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="beta_init"):
            CenteredSoftplus(beta_init=bad)


def test_frozen_matches_training_module():
    act = CenteredSoftplus(beta_init=0.37)
    x = torch.randn(100) * 10
    torch.testing.assert_close(FrozenCenteredSoftplus(float(act.beta.detach()))(x), act(x))
    fixed = CenteredSoftplus(beta_init=1e3, learnable=False)
    assert "log_beta" not in dict(fixed.named_parameters()) and "log_beta" in fixed.state_dict()


@pytest.mark.parametrize("beta", [1e-4, 1e-2, 1.0, 5.0, 1e2, 1e4])
def test_float32_derivatives_from_the_output(beta):
    """The backward rebuilds σ(βx) and ∂s0/∂β from the output alone: within float32 rounding of the
    float64 values over |βx| ≤ 1e4, and double backward stays finite for saturated units."""
    t = torch.cat([-torch.logspace(-8, 4, 300), torch.zeros(1), torch.logspace(-8, 4, 300)]).double()
    x = (t / beta).float().requires_grad_(True)
    b = torch.tensor(beta, requires_grad=True)
    w = torch.rand(x.shape, generator=torch.Generator().manual_seed(0))
    y = centered_softplus(x, b)
    gx, gb = torch.autograd.grad((y * w).sum(), [x, b], create_graph=True)
    tt = x.detach().double() * beta
    sig = torch.sigmoid(tt)
    g = torch.nn.functional.softplus(tt) - math.log(2.0)
    ref_gb = (w.double() * (tt * sig - g) / beta ** 2).sum()
    assert (gx.double() / w.double() - sig).abs().max() < 3e-7
    assert abs(gb.double() - ref_gb) <= 1e-4 * abs(ref_gb)
    hx, hb = torch.autograd.grad((gx * torch.randn_like(gx)).sum() + gb, [x, b])
    assert torch.isfinite(hx).all() and torch.isfinite(hb)


def test_backward_keeps_only_the_output():
    """Like ReLU, the activation saves its output (which the next layer keeps anyway), not its input."""
    act = CenteredSoftplus(beta_init=2.0)
    x = torch.randn(4, 8, 5, 5, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = act(x * 1.0)
    big = [s for s in saved if s.numel() == x.numel()]
    assert len(big) == 1 and big[0].data_ptr() == y.data_ptr()


@pytest.mark.parametrize("beta", [1e-4, 0.3, 5.0, 1e3])
@pytest.mark.parametrize("learnable", [True, False])
def test_fast_backward_matches_differentiable_backward(beta, learnable):
    """Plain backward takes an in-place path; with create_graph the differentiable one: same gradients."""
    x = (torch.randn(3, 4, 5, 5) * 3 / beta).requires_grad_(True)
    act = CenteredSoftplus(beta_init=beta, learnable=learnable)
    g = torch.randn(3, 4, 5, 5)
    params = [x] + ([act.log_beta] if learnable else [])
    fast = torch.autograd.grad(act(x), params, g)
    slow = torch.autograd.grad(act(x), params, g, create_graph=True)
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b.detach(), rtol=2e-5, atol=1e-7)


def test_frozen_softplus_matches_the_training_activation():
    for beta in (1e-3, 0.37, 5.0, 1e3):
        x = torch.linspace(-50, 50, 20001) / beta ** 0.5
        torch.testing.assert_close(FrozenCenteredSoftplus(beta)(x), CenteredSoftplus(beta)(x),
                                   rtol=1e-6, atol=3e-7 * 0.7 / beta)


# ---- x = ±∞ and NaN (the limits; what FrozenCenteredSoftplus, fold's activation, gives) --------------------
def _limits_ok(v, beta, y, gx, gb, dtype):
    """s, ∂s/∂x, ∂s/∂β at x = v: s(−∞) = −log(2)/β, s(+∞) = +∞, s(NaN) = NaN; ∂s/∂x = 0, 1, NaN; ∂s/∂β =
    log(2)/β² at both infinities (s = x − log(2)/β + o(1) and s → −log(2)/β), NaN at NaN. The backward sees
    only the rounded output −log(2)/β, whose σ(βx) (≤ eps) adds σ·log 2σ ~ eps·|log eps| to ∂s/∂β and σ to
    ∂s/∂x at −∞: the tolerances."""
    eps = torch.finfo(dtype).eps
    y, gx, gb = float(y), float(gx), float(gb)
    if math.isnan(v):
        assert math.isnan(y) and math.isnan(gx) and math.isnan(gb), (y, gx, gb)
        return
    assert abs(gb - math.log(2) / beta ** 2) <= 2 * eps * (1 - math.log(eps)) * math.log(2) / beta ** 2, (v, gb)
    if v > 0:
        assert y == math.inf and gx == 1.0, (y, gx)
    else:
        assert abs(y + math.log(2) / beta) <= eps * math.log(2) / beta and abs(gx) <= eps, (y, gx)


def _at(v, beta, dtype, mode):
    """s(v), ∂s/∂x and ∂s/∂β of centered_softplus at x = v through one back-end. The input holds v twice
    (the fused CPU kernel serves tensors of two elements and more) and nothing else: with a NaN anywhere
    the β-gradient, a sum, is NaN."""
    x = torch.full((2,), v, dtype=dtype, requires_grad=True)
    b = torch.tensor(beta, dtype=dtype, requires_grad=True)
    if mode == "jvp":
        import torch.autograd.forward_ad as fwad

        with fwad.dual_level():
            y, gx = fwad.unpack_dual(centered_softplus(fwad.make_dual(x.detach(), torch.ones_like(x)), b.detach()))
        with fwad.dual_level():
            gb = fwad.unpack_dual(centered_softplus(x.detach(), fwad.make_dual(b.detach(), torch.ones_like(b))))[1]
        return y[0], gx[0], gb[0]
    y = centered_softplus(x, b)
    gx, gb = torch.autograd.grad(y.sum(), [x, b], create_graph=mode == "create_graph")
    return y[0], gx[0], gb / 2


@pytest.mark.parametrize("mode", ["backward", "create_graph", "jvp"])
@pytest.mark.parametrize("fused_kernels", ["1", "0"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("v", [-math.inf, math.inf, math.nan])
def test_infinite_and_nan_inputs_give_the_limits(v, dtype, fused_kernels, mode, monkeypatch):
    """The fused kernels (default) and the plain formulas (LCNN_ZOO_FUSED=0): forward, ordinary backward,
    the differentiable backward (create_graph) and forward mode. x = −∞ gave NaN, ∂s/∂β at ±∞ NaN."""
    monkeypatch.setenv("LCNN_ZOO_FUSED", fused_kernels)
    beta = 0.37
    _limits_ok(v, float(torch.tensor(beta, dtype=dtype)), *_at(v, beta, dtype, mode), dtype)


def test_the_training_activation_matches_the_folded_one_at_infinities_and_nan():
    x = torch.tensor([-math.inf, math.inf, math.nan, -1e30, 1e30])
    for beta in (1e-3, 0.37, 5.0, 1e3):
        torch.testing.assert_close(CenteredSoftplus(beta)(x), FrozenCenteredSoftplus(beta)(x), equal_nan=True,
                                   rtol=1e-6, atol=0)


def test_double_backward_at_infinities_is_that_of_a_saturated_unit():
    """The differentiable backward at x = ±∞ (exact GradReg, Hessian-vector products): the second
    derivatives are the limits — those at a saturated finite input, ∂²s/∂β² = −2·log(2)/β³ — not NaN."""
    beta = 0.7

    def second(v):
        x = torch.full((2,), v, dtype=torch.float64, requires_grad=True)
        b = torch.tensor(beta, dtype=torch.float64, requires_grad=True)
        gx, gb = torch.autograd.grad(centered_softplus(x, b).sum(), [x, b], create_graph=True)
        h_xx, h_xb = torch.autograd.grad(gx.sum(), [x, b], retain_graph=True)
        h_bx, h_bb = torch.autograd.grad(gb, [x, b])
        return torch.stack([gx[0], gb / 2, h_xx[0], h_xb / 2, h_bx[0], h_bb / 2]).detach()  # per element

    for v in (-math.inf, math.inf):
        h, h_finite = second(v), second(math.copysign(80.0 / beta, v))
        torch.testing.assert_close(h, h_finite, rtol=1e-12, atol=1e-15)
        assert abs(h[-1].item() + 2 * math.log(2) / beta ** 3) <= 1e-12
    assert second(math.nan).isnan().all()


def test_plain_formula_at_infinities_and_nan():
    """The function TorchScript compiles (autograd differentiates it there): s(−∞) = −log(2)/β, not
    ∞ − ∞; ∂s/∂x = 0, 1, NaN at −∞, +∞, NaN; finite values are those of the fused op."""
    from lcnn_zoo.layers import activation

    x = torch.tensor([-math.inf, math.inf, math.nan, -3.0, 0.0, 2.0], dtype=torch.float64, requires_grad=True)
    b = torch.tensor(0.37, dtype=torch.float64)
    y = activation._centered_softplus_plain(x, b)
    (gx,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(y[:3], torch.tensor([-math.log(2) / 0.37, math.inf, math.nan], dtype=torch.float64),
                               equal_nan=True, rtol=1e-15, atol=0)
    assert gx[0] == 0 and gx[1] == 1 and gx[2].isnan()
    torch.testing.assert_close(gx[3:], torch.sigmoid(b * x[3:].detach()), rtol=1e-14, atol=0)
    torch.testing.assert_close(y[3:], centered_softplus(x[3:].detach(), b), rtol=1e-15, atol=0)
