"""The zoo: timm registry, pretrained loading through timm's real path (offline HF cache, local-dir,
hf-hub:), fine-tuning adaptation, clear errors, publishing folders, torch.hub."""
import time
import warnings

import pytest
import timm
import torch

import lcnn_zoo
from lcnn_zoo.hub import PretrainedLoadError

from model_helpers import same_outputs

FAMILIES = ["resnet18", "resnet34", "resnet20", "resnet56", "wide_resnet16_8", "wide_resnet28_10"]


def test_registry_lists_models_and_only_tags_that_load():
    names = set(timm.list_models("lcnn_*"))
    for f in FAMILIES:
        assert {f"lcnn_{f}", f"lcnn_{f}_softplus", f"lcnn_{f}_relu"} <= names
    assert {"lcnn_resnet50", "lcnn_wide_resnet50_2"} <= names
    # Only tags with weights are advertised: the shipped ones (no upload is recorded on this machine).
    listed = set(timm.list_pretrained("lcnn*"))
    assert listed == set(lcnn_zoo.hub.bundled_manifest())
    for tag in listed:
        timm.create_model(tag, pretrained=True)  # every listed tag loads, offline
    # Recipe-only tags stay creatable as architectures.
    assert timm.create_model("lcnn_resnet18.cifar100").num_classes == 100


def test_recipe_only_tag_says_how_to_train_it():
    t = time.perf_counter()
    with pytest.raises(PretrainedLoadError) as err:
        timm.create_model("lcnn_resnet18.cifar100", pretrained=True)
    assert time.perf_counter() - t < 10
    msg = str(err.value)
    assert msg.startswith("no pretrained weights have been published for lcnn_resnet18.cifar100; train them with")
    assert "lcnn-zoo train --config configs/cifar100_resnet18_lcnn.yaml" in msg
    assert "network" not in msg and "unreachable" not in msg and "HF_HUB_OFFLINE" not in msg


def test_default_tag_has_weights_where_any_does():
    assert timm.create_model("lcnn_resnet20").pretrained_cfg["tag"] == "fmnist"
    assert timm.create_model("lcnn_resnet20_softplus").pretrained_cfg["tag"] == "fmnist"
    assert timm.create_model("lcnn_resnet20_relu").pretrained_cfg["tag"] == "cifar10"  # none has weights
    model = timm.create_model("lcnn_resnet20", pretrained=True)  # the shipped .fmnist, not a missing .cifar10
    assert model.conv1.in_channels == 1


@pytest.mark.parametrize("name", ["lcnn_resnet18", "lcnn_resnet20.cifar10", "lcnn_resnet20_softplus.cifar10",
                                  "lcnn_resnet20_relu", "lcnn_wide_resnet16_8"])
def test_models_build_and_cfg(name):
    model = timm.create_model(name)
    cfg = model.pretrained_cfg
    assert cfg["input_size"] == (3, 32, 32) and cfg["mean"] == (0.0, 0.0, 0.0) and cfg["std"] == (1.0, 1.0, 1.0)
    assert cfg["first_conv"] == "conv1" and cfg["classifier"] == "fc" and cfg["num_classes"] == 10
    assert cfg["license"] and cfg["paper_ids"]
    assert not cfg.get("hf_hub_id") and "recipe only" in cfg["notes"]  # no weights: no download location
    out = model(torch.rand(2, 3, 32, 32))
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    state = model.state_dict()
    assert "conv1.weight" in state and "fc.weight" in state  # timm's adaptation keys exist
    kinds = {type(m).__name__ for m in model.modules()}
    arch = name.split(".")[0]
    if arch.endswith("_relu"):
        assert "ReLU" in kinds and "CenteredSoftplus" not in kinds
    elif arch.endswith("_softplus"):
        betas = [m.beta.item() for m in model.modules() if isinstance(m, lcnn_zoo.CenteredSoftplus)]
        assert betas and all(b == pytest.approx(1e3) for b in betas) and list(model.parameters())[0] is not None
        assert "BatchNorm2d" in kinds
    else:
        assert "LipschitzBatchNorm2d" in kinds and "BatchNorm2d" not in kinds and model.lcnn_report.ok


def test_timm_kwargs():
    m = timm.create_model("lcnn_resnet20.cifar10", num_classes=7, in_chans=1, drop_rate=0.2,
                          pretrained_cfg_overlay=dict(input_size=(1, 24, 24)))
    assert m(torch.rand(2, 1, 24, 24)).shape == (2, 7)
    assert m.conv1.parametrizations.weight[0].input_shape == (1, 24, 24)
    feats = timm.create_model("lcnn_resnet18", features_only=True, out_indices=(2, 4))(torch.rand(2, 3, 32, 32))
    assert [f.shape[1:] for f in feats] == [(128, 16, 16), (512, 4, 4)]
    fmnist = timm.create_model("lcnn_resnet20.fmnist")
    assert fmnist.pretrained_cfg["input_size"] == (1, 28, 28) and fmnist.conv1.in_channels == 1


@pytest.mark.parametrize("name", ["lcnn_resnet18", "lcnn_resnet20.cifar10", "lcnn_wide_resnet16_8_softplus"])
def test_logit_scale_multiplies_logits_and_travels_with_the_weights(name, tmp_path):
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    scaled = timm.create_model(name, logit_scale=2.5).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        logits = scaled(x)
        unscaled = scaled.get_classifier()(scaled.forward_head(scaled.forward_features(x), pre_logits=True))
    torch.testing.assert_close(logits, 2.5 * unscaled)
    # A model built with the default scale takes the scale from the saved weights (a persistent buffer)...
    save_file(scaled.state_dict(), tmp_path / "w.safetensors")
    plain = timm.create_model(name).eval()
    plain.load_state_dict(load_file(tmp_path / "w.safetensors"))
    assert plain.logit_scale.item() == 2.5
    same_outputs(plain, scaled)
    # ...and weights saved before the buffer existed (trained at scale 1) still load strictly.
    old = {k: v for k, v in plain.state_dict().items() if k != "logit_scale"}
    fresh = timm.create_model(name)
    fresh.load_state_dict(old)
    assert fresh.logit_scale.item() == 1.0
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="logit_scale"):
            timm.create_model(name, logit_scale=bad)


@pytest.mark.parametrize("name", ["lcnn_resnet20", "lcnn_resnet20_softplus", "lcnn_resnet20_relu",
                                  "lcnn_wide_resnet16_8", "lcnn_resnet18"])
def test_gradient_checkpointing_is_the_same_step(name):
    """set_grad_checkpointing(True) in training mode: the same loss gradients and the same state after
    the step (BatchNorm statistics, singular vectors) as without; the recompute records nothing twice."""
    torch.manual_seed(0)
    plain = timm.create_model(name, img_size=(12, 12), in_chans=1).train()
    ckpt = timm.create_model(name, img_size=(12, 12), in_chans=1)
    ckpt.load_state_dict(plain.state_dict())
    ckpt.train().set_grad_checkpointing(True)
    x = torch.rand(3, 1, 12, 12)
    for model in (plain, ckpt):
        model(x).square().sum().backward()
    for (k, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        assert torch.equal(p.grad, q.grad), k
    for (k, a), b in zip(plain.state_dict().items(), ckpt.state_dict().values()):
        assert torch.equal(a, b), k


def test_gradient_checkpointing_recomputes_a_part_twice_for_exact_gradreg_and_retain_graph():
    """Exact GradReg (a double backward) and a second backward with retain_graph recompute a checkpointed
    stage more than once: the checkpoint's contexts used to be single-use (AttributeError 'args')."""
    from lcnn_zoo import gradreg_exact

    torch.manual_seed(0)
    plain = timm.create_model("lcnn_resnet20", img_size=(12, 12), in_chans=1, num_classes=4).train()
    ckpt = timm.create_model("lcnn_resnet20", img_size=(12, 12), in_chans=1, num_classes=4)
    ckpt.load_state_dict(plain.state_dict())
    ckpt.train().set_grad_checkpointing(True)
    x, y = torch.rand(3, 1, 12, 12), torch.randint(0, 4, (3,))
    for model in (plain, ckpt):
        out = gradreg_exact(model, x, y)
        (out.loss + 0.1 * out.penalty).backward()
    for (k, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-7, msg=k)
    for model in (plain, ckpt):
        model.zero_grad()
        loss = model(x).square().sum()
        loss.backward(retain_graph=True)
        loss.backward()
    for (k, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-7, msg=k)


@pytest.mark.parametrize("tag", ["lcnn_resnet20.fmnist", "lcnn_resnet20_softplus.fmnist"])
def test_a_grey_tag_with_timms_in_chans_3_keeps_its_function_and_says_its_input(tag):
    """timm's scripts pass in_chans=3: the adapted model computes on grey images copied to 3 channels
    what the tag computes on them, and its cfg says 3×28×28 (so timm's data config feeds it that)."""
    grey = timm.create_model(tag, pretrained=True).eval()
    rgb = timm.create_model(tag, pretrained=True, in_chans=3).eval()
    cfg = timm.data.resolve_model_data_config(rgb)
    assert cfg["input_size"] == (3, 28, 28) and cfg["mean"] == (0.0,) * 3 and cfg["std"] == (1.0,) * 3
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(rgb(x.expand(-1, 3, -1, -1)), grey(x), rtol=1e-4, atol=1e-4)
    if tag.startswith("lcnn_resnet20."):  # the adapted stem's vectors are singular vectors of its weight
        assert rgb.conv1.parametrizations.weight[0].residual(rgb.conv1.parametrizations.weight.original) < 1e-3


@pytest.mark.parametrize("img_size,error", [("64", TypeError), (64.0, TypeError), ((32, 32, 3), TypeError),
                                            (True, TypeError), (0, ValueError), ((32, -1), ValueError)])
def test_an_img_size_that_is_not_an_int_or_a_pair_of_ints_is_one_sentence(img_size, error):
    """Hostile pass, I17c: img_size='64' gave "'<=' not supported between instances of 'str' and 'int'"."""
    with pytest.raises(error, match="img_size must be") as e:
        timm.create_model("lcnn_resnet20_softplus", img_size=img_size)
    assert "\n" not in str(e.value)


def test_img_size_may_be_one_number_as_in_timm():
    """Issue 31, case 17: img_size=64 gave "TypeError: Value after * must be an iterable"; it means 64 x 64."""
    x = torch.rand(2, 1, 16, 16)
    outs = []
    for size in (16, (16, 16)):
        torch.manual_seed(0)
        model = timm.create_model("lcnn_resnet20.fmnist", pretrained=True, img_size=size).eval()
        assert model.lcnn_report.input_size == (1, 16, 16)
        with torch.no_grad():
            outs.append(model(x))
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)


def test_weights_that_do_not_fit_say_why_in_one_sentence():
    """Issue 32, item 8: a 3-channel checkpoint (timm's train.py builds with 3) loaded by the bare
    name lcnn_resnet20 (1 channel, its tag's) gave torch's size mismatch for the stem; another
    architecture's weights gave the spectral norm hook's "The size of tensor a (64) must match ..."."""
    small = dict(img_size=(8, 8))
    rgb = timm.create_model("lcnn_resnet20", in_chans=3, **small).state_dict()
    with pytest.raises(RuntimeError, match="these weights take 3-channel input and this lcnn_resnet20 was built "
                                           "for 1: build it with in_chans=3"):
        timm.create_model("lcnn_resnet20", **small).load_state_dict(rgb)
    timm.create_model("lcnn_resnet20", in_chans=3, **small).load_state_dict(rgb)  # as the message says
    with pytest.raises(RuntimeError, match=r"these weights are for another architecture than lcnn_resnet18 \(\d+ "
                                           r"tensors for its \d+\): missing keys 'layer1.*; unexpected keys 'stages"):
        timm.create_model("lcnn_resnet18", in_chans=3, **small).load_state_dict(rgb)
    with pytest.raises(RuntimeError, match=r"for lcnn_resnet20 at other sizes: 'fc.bias' is \[10\] in them and \[4\] "
                                           r"here \(2 tensors differ: another num_classes or width\?\)"):
        timm.create_model("lcnn_resnet20", in_chans=3, num_classes=4, **small).load_state_dict(rgb)


def test_weights_of_another_input_size_load_with_one_warning_and_of_other_sizes_too_are_refused_first():
    """Hostile pass R8: weights from a run at another input size and num_classes gave one warning per
    layer (each recomputing its singular vectors) and then a refusal naming a singular vector
    ('conv1.weight_u' is [1, 16, 32, 32] ...), which loading adapts, not the classifier that does not fit."""
    at_32 = timm.create_model("lcnn_resnet20", img_size=(32, 32), num_classes=100).state_dict()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        with pytest.raises(RuntimeError, match=r"at other sizes: 'fc.bias' is \[100\] in them and \[10\] here \(2 "):
            timm.create_model("lcnn_resnet20", img_size=(28, 28)).load_state_dict(at_32)
        assert not [str(w.message) for w in caught]  # refused before any layer worked on its vectors
        at_32 = timm.create_model("lcnn_resnet20", img_size=(32, 32)).state_dict()
        model = timm.create_model("lcnn_resnet20", img_size=(28, 28))
        model.load_state_dict(at_32)
    assert [str(w.message) for w in caught] == [
        "lcnn_zoo: the checkpoint's singular vectors were saved at another input size or channel count than this "
        "model's: each layer's are recomputed from its loaded weight"]  # one line for 21 layers
    layer, sn = next(lcnn_zoo.layers.spectral_norm_modules(model))
    assert sn.residual(layer.parametrizations.weight.original) < 1e-3  # and they are singular vectors of it
    # torch loads a 1-element tensor into a 0-dim one (an old checkpoint's scalars): not a size mismatch
    scalars_as_vectors = {k: v.reshape(1) if v.dim() == 0 else v for k, v in model.state_dict().items()}
    timm.create_model("lcnn_resnet20", img_size=(28, 28)).load_state_dict(scalars_as_vectors)
    # a partial dict (strict=False): its tensors are compared by size, whatever the model's other names
    head = {k: v for k, v in timm.create_model("lcnn_resnet20", num_classes=100).state_dict().items()
            if k.startswith(("fc.", "conv1."))}
    with pytest.raises(RuntimeError, match=r"at other sizes: 'fc.bias' is \[100\] in them and \[10\] here"):
        timm.create_model("lcnn_resnet20").load_state_dict(head, strict=False)  # (was: "another architecture")
    fitting = {k: v for k, v in timm.create_model("lcnn_resnet20").state_dict().items() if k.startswith("fc.")}
    assert not timm.create_model("lcnn_resnet20").load_state_dict(fitting, strict=False).unexpected_keys
