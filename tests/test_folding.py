"""lcnn_zoo.folding: ``fold`` leaves plain modules computing the LCNN's function (they reload,
script and export), and a freshly converted model (tiny logits) does not trip its self-check
(issue 20, case 10: the check's floor was an absolute 1e-12 × 1e-5)."""
import copy
import inspect
import warnings

import pytest
import timm
import torch
import torchvision

import lcnn_zoo
from lcnn_zoo import FrozenCenteredSoftplus, LCNNConversionWarning, fold, lcnnify


def quiet_lcnnify(model, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LCNNConversionWarning)
        return lcnnify(model, **kw)


@pytest.mark.parametrize("name", ["mnasnet0_5", "squeezenet1_1", "tinynet_e"])
def test_fold_of_a_freshly_converted_model(name):
    torch.manual_seed(0)
    if name == "tinynet_e":
        model = timm.create_model(name, num_classes=4)
    else:
        model = getattr(torchvision.models, name)(num_classes=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LCNNConversionWarning)
        lcnnify(model, input_size=(3, 32, 32))
    model.eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        folded = fold(model, example_input=x)
        out = folded(x)
    assert torch.isfinite(out).all()
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max() + 1e-6


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


class _WithUnusedAux(torch.nn.Module):
    """A net whose forward never calls one of its convs (an unused auxiliary head, as in Inception)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.act = torch.nn.ReLU()
        self.aux = torch.nn.Conv2d(4, 5, 3, stride=2, padding=1, groups=1)
        self.aux_reflect = torch.nn.Conv2d(4, 2, 3, padding=1, padding_mode="reflect")
        self.fc = torch.nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.act(self.stem(x)).mean((2, 3)))


def test_folds_warnings_point_at_the_callers_line_and_fold_builds_no_graph():
    """fold's two warnings (an unreached conv, stale singular vectors) name the line that called fold
    (they named a frame of torch.no_grad's wrapper, or the one above the caller), and every forward fold
    runs (its reference, its self-check) runs without autograd (the decorator once sat on a helper)."""
    torch.manual_seed(0)
    model = quiet_lcnnify(_WithUnusedAux(), input_size=(3, 8, 8)).eval()
    with torch.no_grad():
        model(torch.rand(2, 3, 8, 8))
        model.stem.parametrizations.weight.original.mul_(torch.linspace(0.2, 3.0, 108).view(4, 3, 3, 3))
    grad_modes = []
    model.register_forward_hook(lambda *_: grad_modes.append(torch.is_grad_enabled()))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        line = inspect.currentframe().f_lineno + 1
        folded = fold(model)
    ours = [w for w in caught if "fold:" in str(w.message)]
    texts = [str(w.message) for w in ours]
    assert len(ours) == 2 and "not converged" in texts[0] and "no forward has reached" in texts[1], texts
    assert [(w.filename, w.lineno) for w in ours] == [(__file__, line)] * len(ours)
    assert grad_modes and not any(grad_modes)  # (the deep copy fold folds keeps the hook)
    assert torch.is_grad_enabled()  # fold leaves the caller's grad mode as it found it
    assert all(not p.requires_grad for p in folded.parameters())


def test_fold_of_a_model_with_a_conv_no_forward_reaches():
    """fold used to raise 'the conv input size is unknown' for a conv its forward never calls,
    although input_size was given. It folds now: the outputs are the LCNN's, and the unreached
    conv, whose σ is undefined (no input size), is baked with a bound at every input size, so it is
    1-Lipschitz at any size it may later be run at (checked by dense SVD at several sizes)."""
    from lcnn_zoo.layers import spectral_norm_of

    from model_helpers import dense_norm

    torch.manual_seed(0)
    model = quiet_lcnnify(_WithUnusedAux(), input_size=(3, 8, 8)).eval()
    assert spectral_norm_of(model.aux).input_shape is None  # never reached: lazily shaped
    x = torch.rand(4, 3, 8, 8)
    with torch.no_grad():
        ref = model(x)
    with pytest.warns(UserWarning, match=r"no forward has reached \(aux, aux_reflect\)"):
        folded = fold(model)
    assert spectral_norm_of(folded.aux) is None and type(folded.aux) is torch.nn.Conv2d
    with torch.no_grad():
        torch.testing.assert_close(folded(x), ref, rtol=0, atol=1e-6)
    for conv in (folded.aux, folded.aux_reflect):
        conv = copy.deepcopy(conv).double()
        for hw in ((2, 2), (5, 7), (12, 12)):  # the Jacobian of the affine conv is its linear operator
            assert 0.01 < dense_norm(conv, torch.zeros(1, 4, *hw, dtype=torch.float64)) <= 1.0 + 1e-9
    # the LCNN itself is unchanged and, once a forward reaches the convs, folds them with their exact σ
    with torch.no_grad():
        model.aux(torch.rand(1, 4, 8, 8))
        model.aux_reflect(torch.rand(1, 4, 8, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        folded = fold(model)
    aux = copy.deepcopy(folded.aux).double()
    assert dense_norm(aux, torch.zeros(1, 4, 8, 8, dtype=torch.float64)) == pytest.approx(1.0, abs=2e-3)


def test_a_model_on_the_meta_device_is_refused_in_one_sentence():
    """Issue 31, case 17: torch's "Tensor.item() cannot be called on meta tensors" before."""
    model = quiet_lcnnify(torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2), torch.nn.ReLU()),
                          input_size=(1, 6, 6)).to("meta")
    with pytest.raises(ValueError, match="fold: the model is on the meta device .*load its weights first"):
        fold(model)


def test_fold_of_something_that_is_not_a_module_is_a_type_error():
    """Hostile pass, A1: AttributeError: 'str' object has no attribute 'modules' before."""
    with pytest.raises(TypeError, match="fold expects an nn.Module, got str"):
        fold("x")


def test_fold_names_zeroed_singular_vectors_instead_of_blaming_the_package():
    """Hostile pass, W2: zeroed u/v made the self-check fail with "please report this model"."""
    model = quiet_lcnnify(torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2), torch.nn.ReLU()),
                          input_size=(1, 6, 6)).eval()
    name = "0.parametrizations.weight.0._u"
    with torch.no_grad():
        dict(model.named_buffers())[name].zero_()
        dict(model.named_buffers())[name[:-1] + "v"].zero_()
    with pytest.raises(ValueError, match=f"fold: tensor '{name}'.*all zeros"):
        fold(model)


def test_a_folded_zoo_model_round_trips_through_timms_save_format(tmp_path):
    """Issue 32, item 7: save_for_hf(fold(model)) wrote ``architecture: lcnn_resnet20`` with weights no
    model accepted (and β, a constant of the folded activation, was not in them). fold records
    folded=True in the model's args, so config.json rebuilds the folded architecture, the weights
    load into it, and it computes what the folded model computes."""
    from timm.models import save_for_hf

    from lcnn_zoo.hub import PretrainedLoadError

    model = timm.create_model("lcnn_resnet20.fmnist", pretrained=True).eval()
    folded = fold(model)
    save_for_hf(folded, tmp_path / "hf")
    loaded = timm.create_model(f"local-dir:{tmp_path / 'hf'}", pretrained=True).eval()
    assert not any(m for m in loaded.modules() if isinstance(m, lcnn_zoo.CenteredSoftplus))
    betas = [m.beta for m in folded.modules() if isinstance(m, FrozenCenteredSoftplus)]
    assert [m.beta for m in loaded.modules() if isinstance(m, FrozenCenteredSoftplus)] == pytest.approx(betas, rel=1e-6)
    assert len(set(betas)) > 1  # the trained β differ per layer: a default β would not pass
    x = torch.rand(8, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), folded(x), rtol=1e-5, atol=1e-5)
    # the same folded form by name, from the LCNN's own weights (as timm's exportable=True builds it;
    # its norms converged further than the stored vectors' tolerance: logits of ~3 move by ~4e-5)
    by_name = timm.create_model("lcnn_resnet20.fmnist", pretrained=True, folded=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(by_name(x), folded(x), rtol=1e-4, atol=1e-4)
    with pytest.raises(PretrainedLoadError, match=r"are folded \(saved from lcnn_zoo.fold\).*folded=True"):
        timm.create_model(f"local-dir:{tmp_path / 'hf'}", pretrained=True, folded=False)
