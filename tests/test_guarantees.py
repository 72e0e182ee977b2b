"""The LCNN guarantee in the modes users reach: channels_last, train vs eval, weights changed in
place, finite-difference GradReg in training mode, norms straight after conversion, other input
sizes, a new classifier head, folding — and the coverage report checked against dense Jacobians
on 16 timm / torchvision families."""
import copy
import warnings

import pytest
import timm
import torch
import torchvision
from torch import nn
from torch.autograd.functional import jacobian

import lcnn_zoo
from lcnn_zoo import (CenteredSoftplus, FrozenCenteredSoftplus, LCNNConversionWarning, LCNNInputSizeWarning,
                      LipschitzBatchNorm2d, LipschitzBatchNormAct2d, converge_spectral_norms, curvature_stats, fold,
                      gradreg_exact, gradreg_fd_backward, lcnnify, set_input_size, spectral_norm)
from lcnn_zoo.layers import spectral_norm_modules, spectral_norm_of


def dense_norm(fn, x):
    """Largest singular value of the Jacobian of ``fn`` at ``x`` (float64, dense)."""
    j = jacobian(fn, x, vectorize=True).reshape(-1, x.numel())
    return torch.linalg.matrix_norm(j, 2).item()


def quiet_lcnnify(model, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LCNNConversionWarning)
        return lcnnify(model, **kw)


# ---- 1. channels_last -------------------------------------------------------------------------
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


# ---- 2. finite-difference GradReg in training mode -----------------------------------------------
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


# ---- 3. weights changed in place, at the model level ----------------------------------------------
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


# ---- 4. the coverage report ----------------------------------------------------------------------
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


def _bound(module):
    """Π γ over the module's BNs (γ = 1.0001), with each spectral norm's 5e-7 convergence slack."""
    n_bn = sum(isinstance(b, LipschitzBatchNorm2d) for b in module.modules())
    n_sn = sum(1 for _ in spectral_norm_modules(module))
    return 1.0001 ** n_bn * (1 + 5e-7) ** n_sn * (1 + 1e-9)


def _covered_modules(model, report):
    flagged = [n for n, _, _ in report.unconverted] + [n for n, _ in report.gains]
    for name, m in model.named_modules():
        if not name or not list(m.children()) or isinstance(m, LipschitzBatchNormAct2d):
            continue
        if any(f == name or f.startswith(name + ".") for f in flagged):
            continue
        yield name, m


DEFAULT_FAMILIES = {"resnet18", "repvgg_a0", "densenet121", "convnext_atto", "vit_tiny_patch16_224"}  # the rest: slow


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
        bound = _bound(m)
        for point in (a, a + 0.1 * torch.randn_like(a)):
            assert dense_norm(m, point) <= bound, mod_name
        checked += 1
    if report.ok:
        with torch.no_grad():
            small = model(x).numel() * x.numel() <= MAX_JACOBIAN
        if small:
            assert dense_norm(model, x) <= _bound(model)
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
    assert dense_norm(block, seen["x"]) > 1.05 * _bound(block)


def test_report_of_logit_scale_is_a_declared_gain():
    model = timm.create_model("lcnn_resnet20.cifar10", logit_scale=4)
    assert model.lcnn_report.ok and model.lcnn_report.gains == [("logit_scale", 4.0)]
    assert "fixed gain ×4" in str(model.lcnn_report)


def test_lcnnify_refuses_a_model_with_lcnn_layers():
    lcnn = timm.create_model("lcnn_resnet20.cifar10")
    with pytest.raises(ValueError, match="already contains LCNN layers"):
        lcnnify(nn.Sequential(lcnn, nn.Identity()), input_size=(3, 32, 32))
    with pytest.raises(ValueError, match="already contains LCNN layers"):
        lcnnify(lcnn)
    # a fixed-β softplus net (the paper's "standard" model) converts: its β becomes learnable
    std = lcnnify(timm.create_model("lcnn_resnet20_softplus.cifar10"))
    assert all(isinstance(m.log_beta, nn.Parameter) for m in std.modules() if isinstance(m, CenteredSoftplus))


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


# ---- 5. norms straight after conversion --------------------------------------------------------
def test_norms_are_converged_at_conversion():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=2), nn.ReLU(), nn.Conv2d(8, 8, 1), nn.ReLU(),
        nn.Conv2d(8, 6, (1, 3), padding=(0, 1), padding_mode="reflect"), nn.Flatten(), nn.Linear(6 * 5 * 5, 4),
    ).double()
    lcnnify(model, input_size=(3, 9, 9))
    shapes = {}
    hooks = [m.register_forward_pre_hook(lambda mod, a, _m=m: shapes.setdefault(_m, a[0]))
             for m, _ in spectral_norm_modules(model)]
    model.eval()
    model(torch.rand(1, 3, 9, 9, dtype=torch.float64))
    for h in hooks:
        h.remove()
    for m, _ in spectral_norm_modules(model):
        a = shapes[m]
        linear = (lambda t, _m=m: nn.functional.linear(t, _m.weight)) if isinstance(m, nn.Linear) else \
            (lambda t, _m=m: _m._conv_forward(t, _m.weight, None))
        norm = dense_norm(linear, torch.zeros_like(a))
        assert 1 - 1e-9 <= norm <= 1 + 1e-3, (m, norm)


# ---- 6. input size ------------------------------------------------------------------------------
def test_other_input_size_warns_once_and_set_input_size_recomputes():
    model = timm.create_model("lcnn_resnet20.cifar10", num_classes=3).double().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error", LCNNInputSizeWarning)
        model(torch.rand(1, 3, 32, 32, dtype=torch.float64))  # the size it was built for: silent
    with pytest.warns(LCNNInputSizeWarning, match="set_input_size"):
        model(torch.rand(1, 3, 40, 40, dtype=torch.float64))
    with warnings.catch_warnings():
        warnings.simplefilter("error", LCNNInputSizeWarning)
        model(torch.rand(1, 3, 40, 40, dtype=torch.float64))  # once per model
    set_input_size(model, (3, 12, 12))
    conv = model.stages[1][0].conv1
    x = torch.zeros(1, 16, 12, 12, dtype=torch.float64)
    assert dense_norm(lambda t: conv._conv_forward(t, conv.weight, None), x) == pytest.approx(1.0, abs=1e-3)
    assert model.lcnn_report.input_size == (3, 12, 12) and model.lcnn_report.ok
    with warnings.catch_warnings():
        warnings.simplefilter("error", LCNNInputSizeWarning)
        model(torch.rand(1, 3, 12, 12, dtype=torch.float64))


@pytest.mark.parametrize("entry", ["forward_features", "forward_intermediates"])
def test_every_entry_point_warns_at_another_input_size(entry):
    """forward_features (and other entry points than forward) reach the stem, not the root's hook
    (issue 20, case 7: a true norm of 1.394 there without a word)."""
    model = timm.create_model("lcnn_resnet20.cifar10", num_classes=3).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error", LCNNInputSizeWarning)
        getattr(model, entry)(torch.rand(1, 3, 32, 32))
    with pytest.warns(LCNNInputSizeWarning, match="set_input_size"):
        getattr(model, entry)(torch.rand(1, 3, 20, 20))
    with warnings.catch_warnings():  # once per model, whichever entry point
        warnings.simplefilter("error", LCNNInputSizeWarning)
        model(torch.rand(1, 3, 20, 20))
    folded = fold(model)
    assert not any(h.__name__ == "_stem_size_hook" for m in folded.modules() for h in m._forward_pre_hooks.values())


def test_state_dict_of_another_input_size_loads_with_converged_vectors():
    src = timm.create_model("lcnn_resnet20.cifar10", pretrained_cfg_overlay=dict(input_size=(3, 24, 24)))
    dst = timm.create_model("lcnn_resnet20.cifar10")
    with pytest.warns(UserWarning, match="recomputed from the loaded weight"):
        dst.load_state_dict(src.state_dict())
    for m, sn in spectral_norm_modules(dst):
        assert sn.last_residual <= 1e-3
    conv = dst.stages[2][0].conv2
    x = torch.zeros(1, 64, 8, 8)
    assert dense_norm(lambda t: conv._conv_forward(t, conv.weight, None), x) == pytest.approx(1.0, abs=2e-3)


# ---- 7. reset_classifier -----------------------------------------------------------------------
@pytest.mark.parametrize("name", ["lcnn_resnet20.cifar10", "lcnn_resnet18", "lcnn_wide_resnet16_8", "timm_resnet18"])
def test_reset_classifier_keeps_the_head_spectrally_normalised(name):
    if name == "timm_resnet18":
        model = quiet_lcnnify(timm.create_model("resnet18", num_classes=4), input_size=(3, 32, 32))
    else:
        model = timm.create_model(name)
    model.reset_classifier(7)
    head = model.get_classifier()
    assert spectral_norm_of(head) is not None and head.out_features == 7
    assert torch.linalg.matrix_norm(head.weight.detach(), 2).item() == pytest.approx(1.0, abs=1e-3)
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 7)
    assert not any(c.__module__.startswith("lcnn_zoo.conversion") for c in type(model).__mro__)  # no generated class


# ---- 8. fold ------------------------------------------------------------------------------------
def test_fold_leaves_plain_modules_that_reload_script_and_export(tmp_path):
    model = quiet_lcnnify(timm.create_model("resnet18", num_classes=4), input_size=(3, 32, 32)).eval()
    folded = fold(model)
    kinds = {type(m) for m in folded.modules()}
    assert {k for k in kinds if k.__module__.startswith("lcnn_zoo")} == {FrozenCenteredSoftplus, lcnn_zoo.Scale}
    assert type(folded) is timm.models.resnet.ResNet and not hasattr(folded, "lcnn_report")
    for m in folded.modules():
        for hooks in (m._forward_pre_hooks, m._state_dict_hooks, m._load_state_dict_pre_hooks):
            assert not any(getattr(getattr(h, "hook", h), "__module__", "").startswith("lcnn_zoo")
                           for h in hooks.values())
    folded.load_state_dict(folded.state_dict())
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        ref = folded(x)
        torch.testing.assert_close(torch.jit.script(folded)(x), ref)
    torch.save(folded, tmp_path / "folded.pt")
    torch.testing.assert_close(torch.load(tmp_path / "folded.pt", weights_only=False)(x), ref)
    with pytest.raises(ValueError, match="no LCNN layers"):
        fold(folded)
    onnx = pytest.importorskip("onnx")
    torch.onnx.export(folded, (x,), str(tmp_path / "legacy.onnx"), dynamo=False)
    onnx.checker.check_model(str(tmp_path / "legacy.onnx"))


def test_frozen_softplus_matches_the_training_activation():
    for beta in (1e-3, 0.37, 5.0, 1e3):
        x = torch.linspace(-50, 50, 20001) / beta ** 0.5
        torch.testing.assert_close(FrozenCenteredSoftplus(beta)(x), CenteredSoftplus(beta)(x),
                                   rtol=1e-6, atol=3e-7 * 0.7 / beta)


def test_lcnn_refuses_torchscript_with_one_clear_sentence():
    with pytest.raises(RuntimeError, match="cannot be compiled with TorchScript.*fold"):
        torch.jit.script(timm.create_model("lcnn_resnet20.cifar10"))
    scripted = torch.jit.script(timm.create_model("lcnn_resnet20_softplus.cifar10").eval())  # the baselines script
    assert scripted(torch.rand(1, 3, 32, 32)).shape == (1, 10)


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
