"""lcnn_zoo.curvature_bound: Theorem 1 with γ-Lipschitz BatchNorms, as a number, checked against
dense float64 Hessians (issue 20, case 11)."""
import warnings

import pytest
import timm
import torch
from torch import nn
from torch.autograd.functional import hessian

from lcnn_zoo import converge_spectral_norms, curvature_bound, hessian_bound, lcnnify, verify_bounds
from lcnn_zoo.conversion import LCNNConversionWarning, LCNNInputSizeWarning
from lcnn_zoo.layers import LipschitzBatchNorm2d


def _convert(model, size, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LCNNConversionWarning)
        lcnnify(model.double(), input_size=size, **kw)
    converge_spectral_norms(model, 400, tol=1e-8)
    return model.eval()


def _max_hessian(model, size, points=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    worst = 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LCNNInputSizeWarning)
        for _ in range(points):
            x = torch.randn(1, *size, generator=g, dtype=torch.float64)
            n_out = model(x).numel()
            for k in range(n_out):
                h = hessian(lambda t: model(t).reshape(-1)[k], x).reshape(x.numel(), x.numel())
                worst = max(worst, float(torch.linalg.matrix_norm(h, 2)))
    return worst


def test_the_one_pixel_example_is_gamma_squared_beta_over_four_and_tight():
    """conv → BN → softplus → conv on one pixel at the defaults (γ = 10, β = 5): the paper's nβγ
    would be 50, the curvature is γ²β/4 = 125 (at the softplus input 0), and the bound says 125."""
    torch.manual_seed(0)
    model = _convert(nn.Sequential(nn.Conv2d(1, 1, 1), nn.BatchNorm2d(1), nn.ReLU(), nn.Conv2d(1, 1, 1)), (1, 1, 1))
    bn = next(m for m in model.modules() if isinstance(m, LipschitzBatchNorm2d))
    bn.running_var.fill_(1e-4)  # ‖BN‖ = 100 > γ: clipped to γ = 10
    bound = hessian_bound(model)
    xs = torch.linspace(-3, 3, 6001, dtype=torch.float64).view(-1, 1, 1, 1).requires_grad_(True)
    (d1,) = torch.autograd.grad(model(xs).sum(), xs, create_graph=True)
    (d2,) = torch.autograd.grad(d1.sum(), xs)
    assert float(d2.abs().max()) == pytest.approx(125.0, rel=1e-3)
    assert bound.value == pytest.approx(125.0, rel=1e-4) and bound.lipschitz == pytest.approx(10.0, rel=1e-4)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        y = self.stem(x)
        y = (y + self.block(y)) * 0.5
        return self.head(y.mean((2, 3)))


@pytest.mark.parametrize("seed", range(6))
def test_random_small_lcnns_stay_below_the_bound(seed):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    beta, gamma = float(1 + 9 * torch.rand(1, generator=g)), float(1 + 2 * torch.rand(1, generator=g))
    model = _convert(_Net(), (2, 4, 4), beta_init=beta, gamma_init=gamma)
    for bn in model.modules():
        if isinstance(bn, LipschitzBatchNorm2d):
            bn.running_var.copy_(0.05 + torch.rand(bn.num_features, generator=g, dtype=torch.float64))
            bn.running_mean.copy_(0.1 * torch.randn(bn.num_features, generator=g, dtype=torch.float64))
    bound = hessian_bound(model)
    assert bound.uncovered == [] and 0 < bound.value < float("inf")
    assert _max_hessian(model, (2, 4, 4), seed=seed) <= bound.value


def test_a_zoo_model_at_a_tiny_size():
    torch.manual_seed(0)
    model = timm.create_model("lcnn_resnet20", num_classes=3, in_chans=1, img_size=(4, 4)).double().eval()
    converge_spectral_norms(model, 400, tol=1e-8)
    bound = hessian_bound(model)
    assert bound.uncovered == [] and bound.value < float("inf")
    assert _max_hessian(model, (1, 4, 4), points=2) <= bound.value


def test_an_uncovered_operation_makes_the_bound_infinite():
    class Gate(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 1, 1)

        def forward(self, x):
            y = self.conv(x)
            return (y * y).flatten(1)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = _convert(Gate(), (1, 2, 2))
    bound = hessian_bound(model)
    assert bound.value == float("inf") and bound.uncovered


def test_the_bound_reports_stale_singular_vectors_and_still_uses_true_norms():
    """A write through .data leaves a layer's vectors stale: the result names it (residual check), and
    its value accounts for that layer's true norm, above 1 (σ is underestimated), so it drops once the
    vectors are converged and the layer is back at norm 1."""
    import lcnn_zoo
    from lcnn_zoo.layers import spectral_norm_modules

    torch.manual_seed(0)
    model = lcnn_zoo.lcnnify(torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3, padding=1), torch.nn.ReLU(),
                                                 torch.nn.Conv2d(3, 2, 3, padding=1)), input_size=(1, 4, 4))
    fresh = lcnn_zoo.hessian_bound(model)
    assert fresh.stale == []
    conv, _ = next(iter(spectral_norm_modules(model)))
    conv.parametrizations.weight.original.data.mul_(torch.tensor([0.1, 1.0, 4.0]).view(-1, 1, 1, 1))
    stale = lcnn_zoo.hessian_bound(model)
    assert [name for name, _ in stale.stale] == ["0"] and stale.stale[0][1] > 2e-3
    lcnn_zoo.converge_spectral_norms(model, 500, tol=1e-9)
    again = lcnn_zoo.hessian_bound(model)
    assert again.stale == [] and again.value < stale.value


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1, bias=False)
        self.act = nn.SiLU()
        self.fc = nn.Linear(3 * 16, 4, bias=False)

    def forward(self, x):
        return self.fc(self.act(self.conv(x)).flatten(1))


def test_verify_bounds_reaches_the_true_norms_and_catches_a_wrong_claim(monkeypatch):
    """The self-check's lower bounds come close to the dense Jacobians' norms, stay below the claims,
    and a claim made wrong (each layer said to be half its norm) is caught."""
    torch.manual_seed(0)
    model = _convert(_Tiny(), (2, 4, 4))
    checks = verify_bounds(model, iterations=40)
    assert [c.name for c in checks] == ["output", "act input"] and all(c.ok for c in checks)
    x = torch.rand(1, 2, 4, 4, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda t: model.conv(t), x).reshape(-1, x.numel())
    assert checks[1].measured == pytest.approx(torch.linalg.matrix_norm(jac, 2).item(), rel=1e-3)  # linear map: exact
    monkeypatch.setattr(curvature_bound, "_conv_norm", lambda m: 0.5)
    wrong = verify_bounds(model, iterations=40)
    assert not wrong[1].ok and wrong[1].claimed == pytest.approx(0.5 * (1 + 1e-6), rel=1e-6)


@pytest.mark.parametrize("name,value", [("stem.2.log_beta", float("nan")), ("block.1.gamma_raw", float("nan")),
                                        ("stem.1.running_var", -1.0), ("head.bias", float("inf")),
                                        ("stem.2.log_beta", 800.0), ("block.2.log_beta", -800.0)])
def test_weights_the_bound_is_undefined_for_are_named(name, value):
    """Issue 31, case 8: a NaN log_beta gave value=nan (or an error from deep in the comparison of the
    traced graph) without a word; now a ValueError names the tensor, for both analyses."""
    model = _convert(_Net(), (2, 4, 4))
    with torch.no_grad():
        tensor = dict([*model.named_parameters(), *model.named_buffers()])[name]
        tensor.view(-1)[0] = value
    for analysis in (hessian_bound, verify_bounds):
        with pytest.raises(ValueError, match=f"{analysis.__name__}: tensor '{name}'.*the bound is undefined"):
            analysis(model)


def test_a_model_on_the_meta_device_is_refused_in_one_sentence():
    """Issue 31, case 17: torch's "Tensor.item() cannot be called on meta tensors" before."""
    model = _convert(_Net(), (2, 4, 4)).to("meta")
    for analysis in (hessian_bound, verify_bounds):
        with pytest.raises(ValueError, match=f"{analysis.__name__}: the model is on the meta device"):
            analysis(model)


def test_a_model_that_is_not_an_lcnn_is_told_so_not_to_pass_input_size():
    """Issue 31, case 17: "pass input_size" was the wrong fix for a plain model; with input_size it
    gets a bound (infinite where an operation is not covered), as before."""
    plain = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Softplus())
    with pytest.raises(ValueError, match="hessian_bound: Sequential is not an LCNN.*lcnnify") as err:
        hessian_bound(plain)
    assert "\n" not in str(err.value)
    bound = hessian_bound(plain, input_size=(1, 5, 5))
    assert bound.value == float("inf") and bound.uncovered


def test_a_log_beta_whose_beta_overflows_is_named():
    """Hostile pass, I08b: a finite log_beta of 800 (or -800) in float64 makes β inf (or 0): torch's
    "atol must be greater than or equal to zero, but got -nan" before; now a ValueError naming it."""
    model = _convert(_Net(), (2, 4, 4))
    with torch.no_grad():
        model.stem[2].log_beta.fill_(800.0)
    with pytest.raises(ValueError, match=r"tensor 'stem.2.log_beta'.*β = exp\(log_beta\) is not a finite positive"):
        hessian_bound(model)


def test_zeroed_singular_vectors_are_refused_and_a_nan_bound_is_never_returned(monkeypatch):
    """Hostile pass, W2: zeroed u/v read as converged (residual 0) and the bound was value=nan without
    a word; now the vector is named, and a bound that still comes out NaN is an error."""
    model = _convert(_Net(), (2, 4, 4))
    name = "stem.0.parametrizations.weight.0._v"
    with torch.no_grad():
        dict(model.named_buffers())[name].zero_()
    for analysis in (hessian_bound, verify_bounds):
        with pytest.raises(ValueError, match=f"{analysis.__name__}: tensor '{name}'.*all zeros"):
            analysis(model)
    model = _convert(_Net(), (2, 4, 4))
    monkeypatch.setattr(curvature_bound, "_conv_norm", lambda m: float("nan"))
    with pytest.raises(ValueError, match="hessian_bound: the bound is not a number"):
        hessian_bound(model)


@pytest.mark.parametrize("kw", [dict(points=0), dict(points=-1), dict(iterations=0)])
def test_verify_bounds_refuses_to_measure_nothing(kw):
    """Hostile pass, A3: points=0 (or iterations=0) measured nothing and every check read as a pass."""
    model = _convert(_Tiny(), (2, 4, 4))
    with pytest.raises(ValueError, match=f"verify_bounds: {next(iter(kw))} must be an int >= 1"):
        verify_bounds(model, **kw)


@pytest.mark.parametrize("size", [(1, -1, 28), "abc", (2, 4.0, 4), ()])
def test_a_bad_input_size_is_named(size):
    """Hostile pass, A2: torch's "negative dimension" / "rand(): argument 'size' failed to unpack" before."""
    model = _convert(_Tiny(), (2, 4, 4))
    for analysis in (hessian_bound, verify_bounds):
        with pytest.raises(ValueError, match=f"{analysis.__name__}: input_size must be"):
            analysis(model, input_size=size)


def test_a_half_precision_model_is_told_to_call_float():
    """Hostile pass, A4: "linalg_eigh_cpu not implemented for 'Half'" before."""
    model = _convert(_Tiny(), (2, 4, 4)).half()
    with pytest.raises(ValueError, match=r"hessian_bound: the model is in half precision.*model.float\(\)"):
        hessian_bound(model)
