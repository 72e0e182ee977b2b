"""lcnnify on timm/torchvision models, residual averaging, the network Lipschitz bound, reports, fold."""
import copy
import warnings

import pytest
import timm
import torch
import torchvision
from timm.models.resnet import BasicBlock, Bottleneck
from torch import nn
from torch.autograd.functional import jacobian

import lcnn_zoo
from lcnn_zoo import (
    CenteredSoftplus,
    FrozenCenteredSoftplus,
    LCNNConversionWarning,
    LCNNInputSizeWarning,
    LCNNPenalty,
    LipschitzBatchNorm2d,
    LipschitzBatchNormAct2d,
    Scale,
    converge_spectral_norms,
    fold,
    lcnnify,
    set_input_size,
)
from lcnn_zoo.conversion import ACTIVATION_TYPES, average_residual
from lcnn_zoo.layers import spectral_norm_modules, spectral_norm_of

from model_helpers import dense_norm


def quiet_lcnnify(model, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LCNNConversionWarning)
        return lcnnify(model, **kw)


MODELS = ["resnet18", "resnet34", "resnet50", "resnet18d", "wide_resnet50_2", "vgg11", "efficientnet_b0",
          "mobilenetv3_small_100", "torchvision_resnet18"]


def build(name, num_classes=10):
    if name == "torchvision_resnet18":
        return torchvision.models.resnet18(num_classes=num_classes)
    if name == "vgg11":  # a 256-wide pre-logits MLP instead of 4096: the same layers, a fraction of the cost
        return timm.create_model(name, num_classes=num_classes, mlp_ratio=1 / 16)
    return timm.create_model(name, num_classes=num_classes)


def count_acts(model):
    acts = ACTIVATION_TYPES
    return sum(isinstance(m, acts) for m in model.modules())


@pytest.mark.parametrize("name", MODELS)
def test_lcnnify_models(name):
    model = build(name)
    n_acts = count_acts(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LCNNConversionWarning)
        lcnnify(model, input_size=(3, 32, 32))
    assert not any(type(m) in (nn.ReLU, nn.BatchNorm2d) or isinstance(m, (nn.ReLU, nn.BatchNorm2d, nn.MaxPool2d))
                   for m in model.modules())
    assert not any(isinstance(m, ACTIVATION_TYPES) for m in model.modules())
    assert sum(isinstance(m, CenteredSoftplus) for m in model.modules()) == n_acts
    model.train()
    x = torch.rand(2, 3, 32, 32)
    out = model(x)
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    pen = LCNNPenalty()(model)
    (out.logsumexp(1).mean() + pen).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    betas = [m.log_beta for m in model.modules() if isinstance(m, CenteredSoftplus)]
    assert all(b.grad is not None for b in betas)
    model.eval()
    assert torch.isfinite(model(x)).all()


def test_batchnormact_keeps_its_activation():
    model = timm.create_model("efficientnet_b0", num_classes=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LCNNConversionWarning)
        lcnnify(model, input_size=(3, 32, 32))
    bnacts = [m for m in model.modules() if isinstance(m, LipschitzBatchNormAct2d)]
    assert bnacts and any(isinstance(m.act, CenteredSoftplus) for m in bnacts)
    assert any(isinstance(m.act, nn.Identity) for m in bnacts)  # apply_act=False ones stay linear


@pytest.mark.parametrize("block_cls", [BasicBlock, Bottleneck, "tv_basic", "tv_bottleneck"])
@pytest.mark.parametrize("downsample", [False, True])
def test_residual_average(block_cls, downsample):
    """After the rewrite the block computes act((branch + shortcut) / 2): check with identity activations."""
    if block_cls in ("tv_basic", "tv_bottleneck"):
        cls = torchvision.models.resnet.BasicBlock if block_cls == "tv_basic" else torchvision.models.resnet.Bottleneck
        exp = cls.expansion
        ds = nn.Sequential(nn.Conv2d(8, 4 * exp, 1, stride=2), nn.BatchNorm2d(4 * exp)) if downsample else None
        block = cls(8 if downsample else 4 * exp, 4, stride=2 if downsample else 1, downsample=ds)
        block.relu = nn.Identity()
        c_in = 8 if downsample else 4 * exp
    else:
        exp = block_cls.expansion
        c_in = 8 if downsample else 4 * exp
        ds = nn.Sequential(nn.Conv2d(c_in, 4 * exp, 1, stride=2), nn.BatchNorm2d(4 * exp)) if downsample else None
        block = block_cls(c_in, 4, stride=2 if downsample else 1, downsample=ds, act_layer=nn.Identity)
    block.eval()
    ref = copy.deepcopy(block)
    x = torch.randn(2, c_in, 8, 8)
    average_residual(block)
    assert sum(isinstance(m, Scale) for m in block.modules()) == 2
    torch.testing.assert_close(block(x), ref(x) / 2)
    if downsample and not isinstance(block_cls, str):  # timm: existing keys are untouched
        assert set(ref.state_dict()) == set(block.state_dict())


def test_plain_sums_option():
    model = timm.create_model("resnet18", num_classes=3)
    lcnnify(model, input_size=(3, 32, 32), average_residuals=False)
    assert not any(isinstance(m, Scale) for m in model.modules())


def small_cnn():
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 4, 3, stride=2, padding=1), nn.BatchNorm2d(4), nn.GELU(),
        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4 * 2 * 2, 3),
    )


def test_network_lipschitz_bound_is_product_of_layer_bounds():
    """Dense Jacobian of the whole LCNN at random points: ‖J‖₂ ≤ Π γⱼ (convs/linears 1, activations 1)."""
    torch.manual_seed(0)
    model = small_cnn().double()
    lcnnify(model, input_size=(2, 8, 8), gamma_init=1.5)
    model.train()
    for _ in range(5):
        model(torch.randn(16, 2, 8, 8, dtype=torch.float64) * 3)
    converge_spectral_norms(model, 500, tol=1e-13)
    model.eval()
    bound = 1.0
    for m in model.modules():
        if isinstance(m, LipschitzBatchNorm2d):
            bound *= float(torch.minimum(m.gamma, m.bn_lipschitz()).detach())
    worst = 0.0
    for _ in range(5):
        x = torch.randn(1, 2, 8, 8, dtype=torch.float64)
        j = jacobian(model, x).reshape(3, -1)
        worst = max(worst, torch.linalg.matrix_norm(j, 2).item())
    assert 0 < worst <= bound * 1.01


def test_report_warns_and_strict_raises():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4), nn.ReLU(), nn.Flatten(), nn.LayerNorm(4 * 6 * 6))
    with pytest.warns(LCNNConversionWarning, match="GroupNorm"):
        lcnnify(model, input_size=(3, 8, 8))
    kinds = {t for _, t, _ in model.lcnn_report.unconverted}
    assert kinds == {"GroupNorm", "LayerNorm"} and not model.lcnn_report.ok
    with pytest.raises(ValueError, match="LayerNorm"):
        lcnnify(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LayerNorm(4 * 6 * 6)), input_size=(3, 8, 8),
                strict=True)
    with pytest.raises(ValueError, match="already"):
        lcnnify(model)


def test_maxpool_option_is_reported():
    model = small_cnn()
    with pytest.warns(LCNNConversionWarning, match="max-pooling"):
        lcnnify(model, input_size=(2, 8, 8), replace_maxpool=False)
    assert isinstance(model[6], nn.MaxPool2d)
    model = lcnnify(small_cnn(), input_size=(2, 8, 8))
    assert isinstance(model[6], nn.AvgPool2d) and model.lcnn_report.ok


def test_input_size_sources():
    timm_model = timm.create_model("resnet18", num_classes=2, pretrained_cfg_overlay={"input_size": (3, 40, 40)})
    lcnnify(timm_model)
    assert timm_model.lcnn_report.input_size == (3, 40, 40)
    assert timm_model.conv1.parametrizations.weight[0].input_shape == (3, 40, 40)
    tv = lcnnify(torchvision.models.resnet18(num_classes=2))  # no cfg: from the first forward
    assert tv.lcnn_report.input_size is None
    assert tv.conv1.parametrizations.weight[0].input_shape is None
    tv(torch.rand(2, 3, 24, 24))
    assert tv.conv1.parametrizations.weight[0].input_shape == (3, 24, 24)
    with pytest.raises(ValueError, match="input_size"):
        lcnnify(small_cnn(), input_size=(2, 8))


def test_state_dict_roundtrip_between_fresh_conversions():
    src = lcnnify(timm.create_model("resnet18", num_classes=4), input_size=(3, 32, 32))
    src.train()
    for _ in range(2):
        src(torch.rand(4, 3, 32, 32))
    src.eval()
    dst = lcnnify(timm.create_model("resnet18", num_classes=4), input_size=(3, 32, 32))
    dst.load_state_dict(src.state_dict())
    dst.eval()
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(dst(x), src(x))


def trained_lcnn(name="resnet18", size=32):
    model = build(name, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LCNNConversionWarning)
        lcnnify(model, input_size=(3, size, size))
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(3):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(torch.rand(8, 3, size, size)), torch.randint(0, 5, (8,)))
        (loss + LCNNPenalty()(model)).backward()
        opt.step()
    return model.eval()


@pytest.mark.parametrize("name", ["resnet18", "efficientnet_b0", "torchvision_resnet18"])
def test_fold_matches_lcnn(name):
    model = trained_lcnn(name)
    folded = fold(model, example_input=torch.rand(2, 3, 32, 32) if name == "torchvision_resnet18" else None)
    kinds = {type(m) for m in folded.modules()}
    assert not kinds & {LipschitzBatchNorm2d, LipschitzBatchNormAct2d, CenteredSoftplus}
    assert FrozenCenteredSoftplus in kinds
    if name != "efficientnet_b0":
        assert nn.BatchNorm2d not in kinds  # every BN fused into its conv
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        ref, out = model(x), folded(x)
    assert ((out - ref).abs().max() / ref.abs().max()).item() <= 1e-5
    assert model.training is False and hasattr(model, "lcnn_report")  # original untouched


def test_fold_exports():
    folded = fold(trained_lcnn("resnet18"))
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        ref = folded(x)
        traced = torch.jit.trace(folded, x)
        torch.testing.assert_close(traced(x), ref)
        exported = torch.export.export(folded, (x,))
        torch.testing.assert_close(exported.module()(x), ref)


def test_fold_onnx(tmp_path):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    from onnx.reference import ReferenceEvaluator

    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(4, 3))
    lcnnify(model, input_size=(3, 8, 8))
    folded = fold(model.eval())
    x = torch.rand(2, 3, 8, 8)
    path = tmp_path / "model.onnx"
    torch.onnx.export(folded, (x,), str(path), dynamo=True)
    onnx.checker.check_model(str(path))
    (out,) = ReferenceEvaluator(str(path)).run(None, {ReferenceEvaluator(str(path)).input_names[0]: x.numpy()})
    torch.testing.assert_close(torch.from_numpy(out), folded(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dynamo", [False, True])
def test_onnx_export_of_an_unfolded_lcnn_says_to_fold_it(tmp_path, dynamo):
    """timm's onnx_export.py path on an unfolded LCNN: one sentence pointing to fold, from either exporter
    (and from torch.export), instead of an error deep inside it."""
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    model = lcnnify(nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(32, 3)),
                    input_size=(1, 4, 4)).eval()
    with pytest.raises(Exception) as err:
        torch.onnx.export(model, (torch.rand(1, 1, 4, 4),), str(tmp_path / "m.onnx"), dynamo=dynamo)
    chain, e = [], err.value
    while e is not None:
        chain.append(str(e))
        e = e.__cause__ or e.__context__
    assert any("lcnn_zoo: export lcnn_zoo.fold(model), not the LCNN itself" in m for m in chain), chain[0][:300]
    if dynamo:
        with pytest.raises(Exception, match="export lcnn_zoo.fold"):
            torch.export.export(model, (torch.rand(1, 1, 4, 4),))


def test_lcnnify_refuses_a_model_with_lcnn_layers():
    lcnn = timm.create_model("lcnn_resnet20.cifar10")
    with pytest.raises(ValueError, match="already contains LCNN layers"):
        lcnnify(nn.Sequential(lcnn, nn.Identity()), input_size=(3, 32, 32))
    with pytest.raises(ValueError, match="already contains LCNN layers"):
        lcnnify(lcnn)
    # a fixed-β softplus net (the paper's "standard" model) converts: its β becomes learnable
    std = lcnnify(timm.create_model("lcnn_resnet20_softplus.cifar10"))
    assert all(isinstance(m.log_beta, nn.Parameter) for m in std.modules() if isinstance(m, CenteredSoftplus))


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


def test_lcnn_refuses_torchscript_with_one_clear_sentence():
    with pytest.raises(RuntimeError, match="cannot be compiled with TorchScript.*fold"):
        torch.jit.script(timm.create_model("lcnn_resnet20.cifar10"))
    scripted = torch.jit.script(timm.create_model("lcnn_resnet20_softplus.cifar10").eval())  # the baselines script
    assert scripted(torch.rand(1, 3, 32, 32)).shape == (1, 10)


def test_an_lcnn_keeps_its_class_and_pickles_through_state_dict_or_folded():
    """lcnnify gives the model no generated class: ``type(model)`` is the class built, so pickle finds it.
    Its parametrized layers pickle only through state_dict (torch's own rule, and its one-line message);
    the folded model pickles whole, and unpickles to the same function."""
    import io
    import pickle

    from lcnn_zoo.models import CifarResNet
    model = timm.create_model("lcnn_resnet20", img_size=(12, 12)).eval()
    assert type(model) is CifarResNet
    with pytest.raises(RuntimeError,
                       match="^Serialization of parametrized modules is only supported through state_dict"):
        pickle.dumps(model)
    folded = lcnn_zoo.fold(model)
    buf = io.BytesIO()
    torch.save(folded, buf)
    again = torch.load(io.BytesIO(buf.getvalue()), weights_only=False)  # our own bytes, just written
    x = torch.rand(2, 1, 12, 12)
    assert torch.equal(again(x), folded(x))


def test_a_torchscript_model_is_refused_in_one_sentence():
    """Issue 31, case 17: torch's "register_forward_pre_hook is not supported on ScriptModules" before."""
    scripted = torch.jit.script(nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU()))
    with pytest.raises(TypeError, match="lcnnify: the model is a TorchScript module.*convert the original"):
        lcnnify(scripted, input_size=(1, 8, 8))
    inside = nn.Sequential(torch.jit.script(nn.Conv2d(1, 4, 3)), nn.ReLU())
    with pytest.raises(TypeError, match="lcnnify: 0 is a TorchScript module"):
        lcnnify(inside, input_size=(1, 8, 8))


def test_the_report_opens_with_its_verdict_and_lists_each_kind_of_finding_once():
    """Issue 32, item 4: a transformer's report was 42-62 lines, one per uncovered operation with
    repeated names, and no sentence said that the bound does not apply. Now the verdict comes first
    and each kind of finding is one line naming a few of its places."""
    blocks = [nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.ReLU()) for _ in range(6)]
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), *blocks, nn.Flatten(), nn.Linear(4 * 8 * 8, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LCNNConversionWarning)
        lcnnify(model, input_size=(3, 8, 8))
    lines = str(model.lcnn_report).splitlines()
    assert lines[1].startswith("  verdict: the curvature bound does NOT apply to this model: "
                               "6 operation(s) in 6 place(s)")
    group_norm = [line for line in lines if "(GroupNorm)" in line]
    assert len(group_norm) == 1 and group_norm[0].startswith("  not covered: 1.1, 2.1, 3.1 and 3 more (GroupNorm)")
    assert len(lines) <= 4
