"""lcnn_zoo.weight_checks: weights are checked before they are loaded, measured or published (issue 31,
cases 3, 8 and 10): finite, of the kind of dtype the model has (no silent integer → float cast),
BatchNorm variances >= 0, β and γ finite; a model whose outputs are not finite is refused."""
import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from lcnn_zoo import hub
from lcnn_zoo.errors import UserError
from lcnn_zoo.weight_checks import WeightsError, check_outputs, check_weights, meta_tensor, weight_problem

from model_helpers import DAMAGES, damaged

SHIPPED = hub.WEIGHTS_DIR / "lcnn_resnet20.fmnist.safetensors"


@pytest.fixture(scope="module")
def model():
    """lcnn_resnet20 built small (its tensors' names and dtypes are those of every input size)."""
    return timm.create_model("lcnn_resnet20", in_chans=1, img_size=(8, 8)).eval()


def test_the_shipped_weights_pass(model):
    for path in sorted(hub.WEIGHTS_DIR.glob("*.safetensors")):
        assert weight_problem(load_file(str(path)).items()) is None, path
    check_weights(load_file(str(SHIPPED)), SHIPPED, model)


@pytest.mark.parametrize("case", sorted(DAMAGES))
def test_weights_wrong_in_content_are_named_with_their_file(tmp_path, model, case):
    state, name = damaged(load_file(str(SHIPPED)), case)
    path = tmp_path / "w.safetensors"
    save_file(state, str(path))
    with pytest.raises(WeightsError, match=f"w.safetensors: tensor '{name}'") as e:
        check_weights(load_file(str(path)), path, model)
    assert isinstance(e.value, UserError) and "\n" not in str(e.value)


def test_a_float_relabelled_as_integers_is_refused_not_cast(tmp_path, model):
    state, name = damaged(load_file(str(SHIPPED)), "i32")
    save_file(state, str(tmp_path / "w.safetensors"))
    with safe_open(str(tmp_path / "w.safetensors"), "pt") as f:  # the header says I32: the bytes are floats
        assert f.get_slice(name).get_dtype() == "I32"
    assert "stored as int32 where the model has float32" in weight_problem(state.items(), model.state_dict())
    # without the model nothing says which dtype is expected: integers are not checked for finiteness
    assert weight_problem(state.items()) is None


def test_another_float_precision_is_not_a_problem(model):
    half = {k: v.half() if v.is_floating_point() else v for k, v in load_file(str(SHIPPED)).items()}
    assert weight_problem(half.items(), model.state_dict()) is None


def test_outputs_that_are_not_finite_are_refused():
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    with torch.no_grad():
        net[1].bias.fill_(torch.finfo(torch.float32).max)
        net[1].weight.fill_(torch.finfo(torch.float32).max)  # finite weights, overflowing outputs
    with pytest.raises(WeightsError, match="'mine' computes outputs that are not finite"):
        check_outputs(net, torch.ones(3, 1, 2, 2), "mine")
    check_outputs(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)), torch.ones(3, 1, 2, 2), "fine")


def test_meta_tensors_are_named():
    assert meta_tensor(nn.Linear(2, 2)) is None
    assert meta_tensor(nn.Linear(2, 2, device="meta")) == "weight"
