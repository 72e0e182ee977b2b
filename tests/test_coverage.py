"""lcnn_zoo.coverage: the report never calls a map covered that is above its bound (issue 20).

Each model below is built by hand to trip the analysis; after ``lcnnify`` (γ₀ = 1.0001, norms
converged to 1e-6) the check is the same for all, against a dense float64 Jacobian of the whole
eval-mode network (every model here ends in linear ops after the tricky one, so the output map
shows any violation): **if the report says every operation is covered, the true Lipschitz
constant at random points is at most Π γ × the declared fixed gains**; and where the true constant
is above that, the report must say so. The adversarial modules:

1. ``x / std`` with a per-channel buffer std = [1, 0.05, 1] (the gain is 1 / min|c|, not 1 / max|c|);
2. one conv called at two spatial sizes (its norm is computed for the first);
3. a branch taken only in eval mode (an un-averaged residual), converted from a train-mode model;
4. a scale made of two parameters, ``x * (a * b)``, trained to a = b = 3;
5. indexing with repeated indices, ``y[:, idx]`` (a gather: norm √repeats);
6. multiplication by a per-channel buffer (gain max|c|), declared;
7. division by a Python constant 0.5, declared as a fixed gain 2;
8. a scale ``exp(log_s)`` of one parameter (learned);
9. ``torch.flip`` and ``roll`` (norm 1: covered, nothing declared);
10. reflection padding (measured: norm above 1);
11. ``repeat`` along channels (measured: norm √2);
12. a functional ReLU on the eval path only;
13. ``torch.add(a, b, alpha=2)`` of two branches (bound 3);
14. ``index_select`` with repeated indices (an unknown function: flagged);
15. ``chunk`` then ``cat`` in swapped order (a permutation; the analysis bounds a concatenation by
    the root of its parts' squared bounds, √3 here, so it is flagged: conservative, never unsound);
16. a channel mean then ``expand_as`` (measured: norm √C).
"""
import warnings

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from model_helpers import dense_norm
from torch import nn

from lcnn_zoo import (
    LCNNConversionWarning,
    LCNNInputSizeWarning,
    LipschitzBatchNorm2d,
    LipschitzBatchNormAct2d,
    converge_spectral_norms,
    lcnnify,
)
from lcnn_zoo.layers import spectral_norm_modules


def quiet_lcnnify(model, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LCNNConversionWarning)
        return lcnnify(model, **kw)


FAMILIES = {  # name: (what the report must name, or None for "everything covered")
    "resnet18": None, "tv_resnet18": None, "resnet50": None,
    "repvgg_a0": "add", "regnetx_002": "add", "resnext26ts": "add", "cspresnet50": "cat", "densenet121": "cat",
    "dla34": "cat", "dpn48b": "add", "ghostnet_050": "mul", "hrnet_w18_small": "Upsample",
    "convnext_atto": "layer_norm", "vit_tiny_patch16_224": "scaled_dot_product_attention",
    "efficientnet_b0": "mul", "mobilenetv3_small_050": "Hardsigmoid",
}
SIZES = {"hrnet_w18_small": 32, "dla34": 32, "cspresnet50": 32, "dpn48b": 32, "convnext_atto": 32,
         "densenet121": 32}  # others: 16×16
MAX_JACOBIAN = 400_000  # dense Jacobians up to this many entries


def build_family(name):
    if name.startswith("tv_"):
        return getattr(torchvision.models, name[3:])(num_classes=4)
    return timm.create_model(name, num_classes=4, **({"img_size": 16} if name.startswith("vit") else {}))


def _covered_modules(model, report):
    flagged = [n for n, _, _ in report.unconverted] + [n for n, _ in report.gains]
    for name, m in model.named_modules():
        if not name or not list(m.children()) or isinstance(m, LipschitzBatchNormAct2d):
            continue
        if any(f == name or f.startswith(name + ".") for f in flagged):
            continue
        yield name, m


DEFAULT_FAMILIES = {"resnet18", "repvgg_a0", "densenet121", "convnext_atto", "vit_tiny_patch16_224"}  # the rest: slow
SIZE = (3, 6, 6)


class Base(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1, bias=False)

    def tail(self, y):
        return y.flatten(1)


class DivBuffer(Base):
    def __init__(self):
        super().__init__()
        self.register_buffer("std", torch.tensor([1.0, 0.05, 1.0]).view(1, 3, 1, 1))

    def forward(self, x):
        return self.tail(self.conv(x) / self.std)


class TwoSizes(Base):
    """The conv's first call (which sets the size its norm is computed for) is at 3×3; it is then
    used at 6×6, where a zero-padded convolution's norm is larger."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=2, dilation=2, bias=False)

    def forward(self, x):
        self.conv(x[:, :, ::2, ::2])
        return self.tail(self.conv(x))


class EvalOnlyResidual(Base):
    def forward(self, x):
        y = self.conv(x)
        if not self.training:
            y = y + self.conv(x)
        return self.tail(y)


class TwoParamScale(Base):
    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.ones(()))
        self.b = nn.Parameter(torch.ones(()))

    def forward(self, x):
        return self.tail(self.conv(x) * (self.a * self.b))


class RepeatedIndex(Base):
    def __init__(self):
        super().__init__()
        self.register_buffer("idx", torch.tensor([0, 0, 0, 0, 1, 2]))

    def forward(self, x):
        return self.tail(self.conv(x)[:, self.idx])


class MulBuffer(Base):
    def __init__(self):
        super().__init__()
        self.register_buffer("c", torch.tensor([1.0, 3.0, 0.5]).view(1, 3, 1, 1))

    def forward(self, x):
        return self.tail(self.conv(x) * self.c)


class DivConstant(Base):
    def forward(self, x):
        return self.tail(self.conv(x) / 0.5)


class ExpScale(Base):
    def __init__(self):
        super().__init__()
        self.log_s = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return self.tail(self.conv(x) * self.log_s.exp())


class FlipRoll(Base):
    def forward(self, x):
        return self.tail(torch.roll(torch.flip(self.conv(x), dims=[-1]), 2, dims=-2))


class ReflectPad(Base):
    def forward(self, x):
        return self.tail(F.pad(self.conv(x), (2, 2, 2, 2), mode="reflect"))


class RepeatChannels(Base):
    def forward(self, x):
        return self.tail(self.conv(x).repeat(1, 2, 1, 1))


class EvalRelu(Base):
    def forward(self, x):
        y = self.conv(x)
        return self.tail(F.relu(y) if not self.training else y)


class AddAlpha(Base):
    def __init__(self):
        super().__init__()
        self.conv2 = nn.Conv2d(3, 3, 1, bias=False)

    def forward(self, x):
        return self.tail(torch.add(self.conv(x), self.conv2(x), alpha=2))


class IndexSelect(Base):
    def __init__(self):
        super().__init__()
        self.register_buffer("idx", torch.tensor([0, 0, 0, 1]))

    def forward(self, x):
        return self.tail(torch.index_select(self.conv(x), 1, self.idx))


class SwapChunks(Base):
    def forward(self, x):
        a, b, c = self.conv(x).chunk(3, dim=1)
        return self.tail(torch.cat([c, a, b], 1))


class MeanExpand(Base):
    def forward(self, x):
        y = self.conv(x)
        return self.tail(y.mean(1, keepdim=True).expand_as(y))


def _convert(model):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LCNNConversionWarning)
        warnings.simplefilter("ignore", LCNNInputSizeWarning)
        lcnnify(model.double(), input_size=SIZE, gamma_init=1.0001)
    converge_spectral_norms(model, 400, tol=1e-6)
    return model.eval()


def _bound(model):
    n_bn = sum(isinstance(b, LipschitzBatchNorm2d) for b in model.modules())
    n_sn = sum(1 for _ in spectral_norm_modules(model))
    gains = 1.0
    for _, g in model.lcnn_report.gains:
        gains *= g
    return 1.0001 ** n_bn * (1 + 5e-7) ** n_sn * gains * (1 + 1e-6)


def _module_bound(module):
    """Π γ over the module's BNs (γ = 1.0001), with each spectral norm's 5e-7 convergence slack (no
    declared gains: for the maps the report calls covered)."""
    n_bn = sum(isinstance(b, LipschitzBatchNorm2d) for b in module.modules())
    n_sn = sum(1 for _ in spectral_norm_modules(module))
    return 1.0001 ** n_bn * (1 + 5e-7) ** n_sn * (1 + 1e-9)


def _true_norm(model):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LCNNInputSizeWarning)
        g = torch.Generator().manual_seed(0)
        return max(dense_norm(model, torch.rand(1, *SIZE, generator=g, dtype=torch.float64)) for _ in range(2))


# (model, what the report must say): "ok" covered with nothing declared; "gain" covered with a
# declared gain; "flag" an uncovered operation
CASES = {
    "div_buffer": (DivBuffer, "gain"), "two_sizes": (TwoSizes, "flag"), "eval_only_residual": (EvalOnlyResidual, "flag"),
    "two_param_scale": (TwoParamScale, "flag"), "repeated_index": (RepeatedIndex, "flag"),
    "mul_buffer": (MulBuffer, "gain"), "div_constant": (DivConstant, "gain"), "exp_scale": (ExpScale, "flag"),
    "flip_roll": (FlipRoll, "ok"), "reflect_pad": (ReflectPad, "flag"), "repeat_channels": (RepeatChannels, "flag"),
    "eval_relu": (EvalRelu, "flag"), "add_alpha": (AddAlpha, "flag"), "index_select": (IndexSelect, "flag"),
    "swap_chunks": (SwapChunks, "flag"), "mean_expand": (MeanExpand, "flag"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_what_the_report_calls_covered_is_within_its_bound(name):
    torch.manual_seed(0)
    cls, expected = CASES[name]
    model = _convert(cls())
    report = model.lcnn_report
    if name == "two_param_scale":  # trained: the scale moved away from what conversion saw
        with torch.no_grad():
            model.a.fill_(3.0)
            model.b.fill_(3.0)
    true, bound = _true_norm(model), _bound(model)
    said = "flag" if not report.ok else ("gain" if report.gains else "ok")
    assert said == expected, str(report)
    if report.ok:
        assert true <= bound, f"{name}: true norm {true:.4g} > bound {bound:.4g}\n{report}"
    else:
        assert report.unconverted


def test_the_cases_are_not_vacuous():
    """The adversarial maps really are above 1 (so a report calling them covered would be wrong)."""
    torch.manual_seed(0)
    for name in ("div_buffer", "two_sizes", "repeated_index", "add_alpha", "repeat_channels", "eval_only_residual"):
        model = _convert(CASES[name][0]())
        assert _true_norm(model) > 1.01, name
    model = _convert(DivBuffer())
    assert model.lcnn_report.gains and model.lcnn_report.gains[0][1] == pytest.approx(20.0)


@pytest.mark.parametrize("name", [n if n in DEFAULT_FAMILIES else pytest.param(n, marks=pytest.mark.slow)
                                  for n in sorted(FAMILIES)])
def test_report_names_what_the_bound_does_not_cover_and_dense_check_of_the_rest(name):
    """Whatever the report calls covered is within its bound: the dense Jacobian of every module
    without a finding inside it (γ = 1.0001, converged norms) is at most Π γ. Families with
    uncovered operations name them; strict=True raises for them."""
    torch.manual_seed(0)
    size = (3, SIZES.get(name, 16), SIZES.get(name, 16))
    model = build_family(name).double()
    quiet_lcnnify(model, input_size=size, gamma_init=1.0001)
    report = model.lcnn_report
    expected = FAMILIES[name]
    assert report.analysis == "graph"
    if expected is None:
        assert report.ok, str(report)
    else:
        assert not report.ok and any(op == expected for _, op, _ in report.unconverted), str(report)
        with pytest.raises(ValueError, match="not covered"):
            quiet_lcnnify(build_family(name), input_size=size, strict=True)
    converge_spectral_norms(model, 400, tol=1e-6)  # σ within 5e-7 of the true norm
    model.eval()
    inputs = {}
    hooks = [m.register_forward_pre_hook(lambda mod, a, _n=n: inputs.setdefault(_n, a))
             for n, m in _covered_modules(model, report)]
    x = torch.rand(1, *size, dtype=torch.float64)
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    checked = 0
    for mod_name, m in _covered_modules(model, report):
        args = inputs.get(mod_name)
        if not args or len(args) != 1 or not isinstance(args[0], torch.Tensor):
            continue
        a = args[0]
        with torch.no_grad():
            out_numel = m(a).numel()
        if a.numel() * out_numel > MAX_JACOBIAN:
            continue
        bound = _module_bound(m)
        for point in (a, a + 0.1 * torch.randn_like(a)):
            assert dense_norm(m, point) <= bound, mod_name
        checked += 1
    if report.ok:
        with torch.no_grad():
            small = model(x).numel() * x.numel() <= MAX_JACOBIAN
        if small:
            assert dense_norm(model, x) <= _module_bound(model)
    assert checked > 0


def test_dense_check_can_fail_where_the_report_flags():
    """The check above is not vacuous: the linear part of a RepVGG block the report flags (the sum of
    its 3×3 and 1×1 branches, activation removed) has a Jacobian norm well above its Π γ."""
    torch.manual_seed(0)
    model = build_family("repvgg_a0").double()
    quiet_lcnnify(model, input_size=(3, 16, 16), gamma_init=1.0001)
    converge_spectral_norms(model, 400, tol=1e-6)
    model.eval()
    block = model.stages[3][0]
    assert any(n == "stages.3.0" and op == "add" for n, op, _ in model.lcnn_report.unconverted)
    block.act = nn.Identity()
    for bn in block.modules():  # BNs at their Lipschitz cap, so the branches' bounds are reached
        if isinstance(bn, LipschitzBatchNorm2d):
            with torch.no_grad():
                bn.weight.fill_(1.0)
                bn.running_var.fill_(1.0 - bn.eps)
    seen = {}
    h = block.register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0]))
    with torch.no_grad():
        model(torch.rand(1, 3, 16, 16, dtype=torch.float64))
    h.remove()
    assert dense_norm(block, seen["x"]) > 1.05 * _module_bound(block)


def test_report_of_logit_scale_is_a_declared_gain():
    model = timm.create_model("lcnn_resnet20.cifar10", logit_scale=4)
    assert model.lcnn_report.ok and model.lcnn_report.gains == [("logit_scale", 4.0)]
    assert "fixed gain ×4" in str(model.lcnn_report)


def test_untraceable_model_falls_back_and_says_so():
    class Dynamic(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
                return self.conv(x)
            return self.conv(x) * 2

    with pytest.warns(LCNNConversionWarning, match="could not trace"):
        model = lcnnify(Dynamic(), input_size=(3, 8, 8))
    assert model.lcnn_report.analysis == "modules" and not model.lcnn_report.ok
