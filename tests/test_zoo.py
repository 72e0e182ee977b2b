"""The zoo: timm registry, pretrained loading through timm's real path (offline HF cache, local-dir,
hf-hub:), fine-tuning adaptation, clear errors, publishing folders, torch.hub."""
import time

import pytest
import timm
import torch
from torch import nn

import lcnn_zoo
from lcnn_zoo.errors import UserError
from lcnn_zoo.factory import create_model
from lcnn_zoo.hub import PretrainedLoadError, hub_id
from lcnn_zoo.publishing import save_pretrained

from hf_cache import populate, publish, remove, unpublish

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
        assert betas and all(b == pytest.approx(1e3) for b in betas) and not list(model.parameters())[0] is None
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


def trained(name="lcnn_resnet20.cifar10", steps=2, **kw):
    torch.manual_seed(0)
    model = timm.create_model(name, **kw)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    c, h, w = model.pretrained_cfg["input_size"]
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(torch.rand(8, c, h, w)), torch.randint(0, 10, (8,))).backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """A trained lcnn_resnet20 written as a Hub folder and put in the offline HF cache."""
    model = trained()
    folder = save_pretrained(model, tmp_path_factory.mktemp("pub") / "lcnn_resnet20.cifar10", model_card="# test\n")
    repo = hub_id("lcnn_resnet20", "cifar10")
    populate(repo, folder)
    publish("lcnn_resnet20.cifar10", repo)  # what `lcnn-zoo push --upload` records
    yield model, folder, repo
    unpublish("lcnn_resnet20.cifar10")
    remove(repo)


def same_outputs(a, b, shape=(3, 32, 32)):
    x = torch.rand(4, *shape)
    a.eval(), b.eval()
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)


def test_folder_layout(published):
    _, folder, _ = published
    assert {p.name for p in folder.iterdir()} == {"model.safetensors", "config.json", "README.md"}


def test_pretrained_from_offline_cache_and_hf_hub_name(published):
    model, _, repo = published
    loaded = timm.create_model("lcnn_resnet20.cifar10", pretrained=True)
    same_outputs(model, loaded)
    via_hub = timm.create_model(f"hf-hub:{repo}", pretrained=True)
    same_outputs(model, via_hub)


def test_local_dir(published):
    model, folder, _ = published
    same_outputs(model, timm.create_model(f"local-dir:{folder}", pretrained=True))


def test_finetune_adaptation(published):
    model, _, _ = published
    ft = timm.create_model("lcnn_resnet20.cifar10", pretrained=True, num_classes=3, in_chans=1)
    src, dst = model.state_dict(), ft.state_dict()
    assert ft.eval()(torch.rand(2, 1, 32, 32)).shape == (2, 3)
    for key in ("stages.1.0.conv1.weight", "stages.2.2.bn2.running_var", "stages.0.0.act1.log_beta"):
        torch.testing.assert_close(dst[key], src[key])
    assert dst["conv1.weight"].shape[1] == 1 and dst["fc.weight"].shape[0] == 3


def test_published_but_not_cached_offline_is_prompt_and_clear():
    publish("lcnn_resnet18.cifar100", hub_id("lcnn_resnet18", "cifar100"))
    try:
        t = time.perf_counter()
        with pytest.raises(PretrainedLoadError) as err:
            timm.create_model("lcnn_resnet18.cifar100", pretrained=True)
        assert time.perf_counter() - t < 10
        msg = str(err.value)
        assert hub_id("lcnn_resnet18", "cifar100") in msg and "HF_HUB_OFFLINE" in msg and "local-dir" in msg
    finally:
        unpublish("lcnn_resnet18.cifar100")


def test_unreachable_hub_fails_fast(monkeypatch):
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # discard port: refused at once
    publish("lcnn_resnet18.cifar10", hub_id("lcnn_resnet18", "cifar10"))
    try:
        t = time.perf_counter()
        with pytest.raises(PretrainedLoadError, match="unreachable"):
            timm.create_model("lcnn_resnet18.cifar10", pretrained=True)
        with pytest.raises(PretrainedLoadError, match="unreachable"):  # hf-hub: names use the same probe
            create_model("hf-hub:someone/lcnn_resnet18.cifar10", pretrained=True)
        assert time.perf_counter() - t < 15
    finally:
        unpublish("lcnn_resnet18.cifar10")


def test_unpublished_architecture():
    with pytest.raises(PretrainedLoadError, match="no pretrained weights have been published for lcnn_resnet50"):
        timm.create_model("lcnn_resnet50", pretrained=True)


def test_corrupt_file(published, tmp_path):
    _, folder, _ = published
    repo = hub_id("lcnn_resnet20", "cifar100")
    bad = tmp_path / "bad"
    bad.mkdir()
    data = (folder / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    (bad / "config.json").write_bytes((folder / "config.json").read_bytes())
    populate(repo, bad)
    publish("lcnn_resnet20.cifar100", repo)
    try:
        with pytest.raises(PretrainedLoadError, match="not a valid safetensors"):
            timm.create_model("lcnn_resnet20.cifar100", pretrained=True, num_classes=10)
    finally:
        unpublish("lcnn_resnet20.cifar100")
        remove(repo)


def test_wrong_architecture(published):
    _, folder, _ = published
    repo = hub_id("lcnn_resnet56", "cifar10")
    populate(repo, folder)
    publish("lcnn_resnet56.cifar10", repo)
    try:
        with pytest.raises(PretrainedLoadError, match="does not match"):
            timm.create_model("lcnn_resnet56.cifar10", pretrained=True)
    finally:
        unpublish("lcnn_resnet56.cifar10")
        remove(repo)


def test_save_is_atomic(tmp_path, monkeypatch):
    model = timm.create_model("lcnn_resnet20.cifar10")
    out = save_pretrained(model, tmp_path / "repo", model_card="v1")
    import lcnn_zoo.publishing as pub

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(pub, "save_for_hf", boom)
    with pytest.raises(OSError):
        save_pretrained(model, out, model_card="v2")
    assert (out / "README.md").read_text() == "v1"  # the old folder is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repo"]  # no temp leftovers
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]


def test_torch_hub_local():
    import pathlib
    repo_dir = str(pathlib.Path(__file__).resolve().parents[1])
    import importlib.util
    spec = importlib.util.spec_from_file_location("hubconf", f"{repo_dir}/hubconf.py")
    hubconf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hubconf)
    assert all(callable(getattr(hubconf, n, None)) for n in timm.list_models("lcnn_*"))
    model = torch.hub.load(repo_dir, "lcnn_resnet20", source="local", num_classes=4, pretrained_cfg="cifar10")
    assert model(torch.rand(1, 3, 32, 32)).shape == (1, 4)


def test_cli_push_writes_loadable_folder(tmp_path, capsys):
    import json

    from safetensors.torch import save_file

    from lcnn_zoo.cli import main

    model = trained(num_classes=100)
    ckpt = tmp_path / "ckpt.safetensors"
    save_file(model.state_dict(), str(ckpt))
    # A whole eval.json of several models, as `lcnn-zoo eval` writes it: the card takes this model's entry.
    metrics = tmp_path / "eval.json"
    mine = {"accuracy": 91.25, "test_samples": 1000, "curvature_mean": 3.5, "curvature_std": 0.5,
            "pgd_l2": {"0.1": 80.0}, "pgd_steps": 10, "pgd_samples": 200}
    other = {"accuracy": 12.5, "curvature_mean": 99.0}
    metrics.write_text(json.dumps({"command": "lcnn-zoo eval ...",
                                   "results": {"other": other, "lcnn_resnet20.cifar100": mine}}))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("model: lcnn_resnet20\nepochs: 3\n")
    out = tmp_path / "lcnn_resnet20.cifar100"
    assert main(["push", str(ckpt), "--model", "lcnn_resnet20.cifar100", "--output-dir", str(out),
                 "--metrics", str(metrics), "--eval-command", "lcnn-zoo eval ...", "--recipe", str(recipe)]) == 0
    card = (out / "README.md").read_text()
    assert "# lcnn_resnet20.cifar100" in card and "| clean accuracy (%), 1000 test images | 91.25 |" in card
    assert "| E normalised curvature C(x) | 3.5 ± 0.5 |" in card and "12.5" not in card and "99" not in card
    assert "| accuracy (%) under ℓ2-PGD, ε=0.1 (10 steps, 200 test images) | 80 |" in card
    assert "```yaml\nmodel: lcnn_resnet20\nepochs: 3\n```" in card
    assert "${" not in card and "CIFAR-100" in card
    # Several models and none of them this one: refused, naming what is there.
    metrics.write_text(json.dumps({"results": {"a": other, "b": other}}))
    assert main(["push", str(ckpt), "--model", "lcnn_resnet20.cifar100", "--output-dir", str(tmp_path / "x"),
                 "--metrics", str(metrics)]) == 2
    assert "several models" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    same_outputs(model, timm.create_model(f"local-dir:{out}", pretrained=True))
    repo = hub_id("lcnn_resnet20", "cifar100")
    populate(repo, out)
    publish("lcnn_resnet20.cifar100", repo)
    try:
        same_outputs(model, timm.create_model("lcnn_resnet20.cifar100", pretrained=True))
    finally:
        unpublish("lcnn_resnet20.cifar100")
        remove(repo)


def test_cli_push_errors(tmp_path, capsys):
    from lcnn_zoo.checkpoint import load_state_dict as load_checkpoint_state_dict
    from lcnn_zoo.cli import main

    with pytest.raises(UserError, match="not found"):
        load_checkpoint_state_dict(tmp_path / "nope.pth")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 10)
    with pytest.raises(UserError, match="safetensors"):
        load_checkpoint_state_dict(bad)
    pickled = tmp_path / "evil.pth"
    import argparse
    torch.save({"state_dict": {"w": torch.zeros(1)}, "args": argparse.Namespace(lr=0.1)}, pickled)
    with pytest.raises(UserError, match="weights_only"):
        load_checkpoint_state_dict(pickled)
    assert main(["push", str(bad), "--model", "lcnn_resnet20"]) == 2
    assert "architecture" in capsys.readouterr().err


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


def test_an_lcnn_keeps_its_class_and_pickles_through_state_dict_or_folded():
    """lcnnify gives the model no generated class: ``type(model)`` is the class built, so pickle finds it.
    Its parametrized layers pickle only through state_dict (torch's own rule, and its one-line message);
    the folded model pickles whole, and unpickles to the same function."""
    import io
    import pickle

    from lcnn_zoo.models.lcnn_resnet import CifarResNet
    model = timm.create_model("lcnn_resnet20", img_size=(12, 12)).eval()
    assert type(model) is CifarResNet
    with pytest.raises(RuntimeError, match="^Serialization of parametrized modules is only supported through state_dict"):
        pickle.dumps(model)
    folded = lcnn_zoo.fold(model)
    buf = io.BytesIO()
    torch.save(folded, buf)
    again = torch.load(io.BytesIO(buf.getvalue()), weights_only=False)  # our own bytes, just written
    x = torch.rand(2, 1, 12, 12)
    assert torch.equal(again(x), folded(x))


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
