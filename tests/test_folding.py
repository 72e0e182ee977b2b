"""lcnn_zoo.folding: ``fold`` leaves plain modules computing the LCNN's function (they reload,
script and export), and a freshly converted model (tiny logits) does not trip its self-check
(issue 20, case 10: the check's floor was an absolute 1e-12 × 1e-5)."""
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
