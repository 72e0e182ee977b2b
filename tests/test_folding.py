"""lcnn_zoo.folding: ``fold`` of a freshly converted model (tiny logits) does not trip its own
self-check (issue 20, case 10: the check's floor was an absolute 1e-12 × 1e-5)."""
import warnings

import pytest
import timm
import torch
import torchvision

from lcnn_zoo import fold, lcnnify
from lcnn_zoo.conversion import LCNNConversionWarning


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
