"""lcnn_zoo.hub: loading weights — the shipped tags (checked by their checksums), a local Hugging Face cache,
local folders, and their errors; the static registry and the user's uploads resolved at build time."""
import json
import time

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

from lcnn_zoo import hub
from lcnn_zoo.commands.factory import create_model
from lcnn_zoo.hub import PretrainedLoadError, hub_id
from lcnn_zoo.weight_checks import WeightsError

from hf_cache import populate, publish, remove, unpublish
from model_helpers import damaged, same_outputs


def test_shipped_weights_without_checksum_are_refused(weights):
    manifest = json.loads((weights / "manifest.json").read_text())
    del manifest["lcnn_resnet20.fmnist"]["sha256"]
    (weights / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(hub.PretrainedLoadError, match="no checksum"):
        timm.create_model("lcnn_resnet20.fmnist", pretrained=True)
    (weights / "manifest.json").write_text('{"lcnn_resnet20.fmnist": {"sha2')  # truncated
    with pytest.raises(hub.PretrainedLoadError, match="manifest.json is not valid JSON.*; reinstall lcnn-zoo"):
        timm.create_model("lcnn_resnet20.fmnist", pretrained=True)


@pytest.mark.parametrize("text", ['{"lcnn_resnet20.x": {"repo', "[1, 2]"])
def test_a_damaged_user_manifest_says_it_is_the_users_and_what_to_do(tmp_path, monkeypatch, text):
    """Hostile pass of issue 31, M1: the message said "reinstall lcnn-zoo", which does not touch the
    user's own record of uploads ($LCNN_ZOO_PUBLISHED); fixing it or moving it away is what helps."""
    path = tmp_path / "published.json"
    path.write_text(text)
    monkeypatch.setenv("LCNN_ZOO_PUBLISHED", str(path))
    with pytest.raises(hub.PretrainedLoadError, match=r"published.json is not .*; it is your record of your own "
                                                      r"uploads \(\$LCNN_ZOO_PUBLISHED\): fix it, or move it away"):
        hub.published_manifest()


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


@pytest.mark.parametrize("arch", ["lcnn_resnet50", "lcnn_wide_resnet50_2"])
def test_an_architecture_without_weights_says_what_to_do_in_one_sentence(arch):
    """Issue 31, case 17: the sentence read "train them with pass a checkpoint with …"."""
    with pytest.raises(PretrainedLoadError) as err:
        timm.create_model(arch, pretrained=True)
    msg = str(err.value)
    assert "with pass" not in msg and "\n" not in msg
    assert f"train them with `lcnn-zoo train --model {arch} --dataset <your data>`" in msg
    assert "pretrained_cfg_overlay=dict(file=" in msg


@pytest.mark.parametrize("source,case", [("local-dir", "i32"), ("file", "log_beta")])
def test_weights_wrong_in_content_are_refused_when_timm_loads_them(tmp_path, source, case):
    """Issue 31, case 10, on timm's own loading path (tags, hf-hub:, local-dir:, a file overlay): the
    state dict is checked before timm's load_state_dict, which would cast an I32 tensor silently.
    (The non-LCNN flavours build in a moment; every LCNN tensor is checked in test_weight_checks.py.)"""
    folder = tmp_path / "repo"
    if source == "local-dir":
        model = timm.create_model("lcnn_resnet20_relu", num_classes=10)
        timm.models.save_for_hf(model, str(folder), safe_serialization=True)
        state, name = damaged(model.state_dict(), case)
        save_file(state, str(folder / "model.safetensors"))
        spec, kwargs = f"local-dir:{folder}", {}
    else:
        state, name = damaged(load_file(str(hub.WEIGHTS_DIR / "lcnn_resnet20_softplus.fmnist.safetensors")), case)
        folder.mkdir()
        save_file(state, str(folder / "model.safetensors"))
        spec = "lcnn_resnet20_softplus.fmnist"
        kwargs = {"pretrained_cfg_overlay": {"file": str(folder / "model.safetensors")}}
    with pytest.raises(WeightsError, match=f"tensor '{name}'"):
        timm.create_model(spec, pretrained=True, **kwargs)


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


# ---- issue 31, case 9: a damaged entry of the user's manifest, or a bad variable, never stops the import
# ---- issue 33, item 3: the registry is static: the import does not read the user's manifest at all
def test_a_damaged_published_entry_is_skipped_with_a_warning_and_import_never_fails(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    manifest = tmp_path / "published.json"
    manifest.write_text('{"lcnn_resnet20.bad1": {"repo_id": "me/a", "num_classes": 3, "input_size": ["a", "b", "c"]},'
                        ' "lcnn_resnet20.bad2": {"repo_id": "me/b", "num_classes": 3, "input_size": [3, 1e400, 28]},'
                        ' "lcnn_resnet20.good": {"repo_id": "me/c", "num_classes": 3, "input_size": [1, 28, 28]}}')
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "LCNN_ZOO_PUBLISHED": str(manifest),
           "LCNN_ZOO_FUSED": "maybe", "LCNN_ZOO_TRITON_ON_CPU": "yes please",
           "LCNN_ZOO_MALLOC": "sytem", "LCNN_ZOO_HUB_NAMESPACE": "not a namespace"}
    code = ("import timm, torch, lcnn_zoo\n"
            "print(sorted(t for t in timm.list_pretrained('lcnn_resnet20.*') if 'fmnist' not in t))\n"
            "m = timm.create_model('lcnn_resnet20.fmnist', pretrained=True).eval()\n"  # a shipped tag still loads
            "print(m(torch.rand(1, 1, 28, 28)).shape)\n"
            "print('--- uploads', flush=True)\n"
            "from lcnn_zoo import hub\n"
            "print(sorted(hub.user_uploads()))\n")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    # the registry lists what the package holds; the user's uploads are listed by hub.user_uploads()
    assert done.stdout.splitlines() == ["[]", "torch.Size([1, 10])", "--- uploads", "['lcnn_resnet20.good']"]
    assert "Traceback" not in done.stderr
    for tag, value in (("bad1", "['a', 'b', 'c']"), ("bad2", "[3, inf, 28]")):
        assert f"{manifest}: the entry for 'lcnn_resnet20.{tag}' has input_size = {value}, not [channels" in done.stderr
    assert "$LCNN_ZOO_FUSED='maybe' is not 1 or 0" in done.stderr  # read at the first forward: default used


def test_import_reads_nothing_under_the_users_home(tmp_path):
    """Issue 33: ``import lcnn_zoo`` (and timm's registry it fills) opens no file under the home folder,
    where the user's manifest lives (here unreadable JSON, which an import that read it would warn about)."""
    import json as json_
    import os
    import subprocess
    import sys
    from pathlib import Path

    home = tmp_path / "home"
    (home / ".cache" / "lcnn_zoo").mkdir(parents=True)
    (home / ".cache" / "lcnn_zoo" / "published.json").write_text("{not json")
    env = {k: v for k, v in os.environ.items() if not k.startswith("LCNN_ZOO_")}
    env.update(HOME=str(home), PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    code = ("import sys\n"
            "seen = []\n"
            "sys.addaudithook(lambda event, args: seen.append(str(args[0])) if event in ('open', 'os.listdir',"
            " 'os.scandir') and args and isinstance(args[0], (str, bytes)) else None)\n"
            "import timm, lcnn_zoo\n"
            "timm.list_pretrained('lcnn*')\n"
            f"print(__import__('json').dumps([p for p in seen if p.startswith({str(home)!r})]))\n")
    done = subprocess.run([sys.executable, "-W", "error::UserWarning", "-c", code], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json_.loads(done.stdout.splitlines()[-1]) == []


def test_a_users_upload_of_a_new_tag_is_resolved_when_it_is_built(published, monkeypatch):
    """Issue 33: a tag the registry does not know, which the user uploaded (push --upload records its
    classes and input size), loads by name: resolved at build time, not listed by the static registry."""
    model, folder, _ = published
    repo = hub_id("lcnn_resnet20", "mine")
    populate(repo, folder)
    path = hub.published_manifest_path()
    before = path.read_text() if path.is_file() else None
    data = json.loads(before) if before else {}
    data["lcnn_resnet20.mine"] = {"repo_id": repo, "num_classes": 10, "input_size": [3, 32, 32]}
    path.write_text(json.dumps(data))
    try:
        assert "lcnn_resnet20.mine" not in timm.list_pretrained("lcnn*")
        assert "lcnn_resnet20.mine" in hub.user_uploads()
        loaded = timm.create_model("lcnn_resnet20.mine", pretrained=True)
        assert loaded.pretrained_cfg["tag"] == "mine" and loaded.pretrained_cfg["hf_hub_id"] == repo
        same_outputs(model, loaded)
        with pytest.raises(RuntimeError, match="Invalid pretrained tag"):  # a tag nobody uploaded: timm's own error
            timm.create_model("lcnn_resnet20.nobodys", pretrained=True)
    finally:
        path.write_text(before) if before is not None else path.unlink()
        remove(repo)


def test_loading_or_rewriting_a_damaged_entry_names_the_file_and_the_field(tmp_path, monkeypatch):
    manifest = tmp_path / "published.json"
    manifest.write_text(json.dumps({"lcnn_resnet18.cifar10": {"repo_id": "me/x", "num_classes": True},
                                    "lcnn_resnet18.cifar100": {"repo_id": "me/y"}}))
    monkeypatch.setenv("LCNN_ZOO_PUBLISHED", str(manifest))
    with pytest.warns(UserWarning, match="'lcnn_resnet18.cifar10' has num_classes = True, not an integer"):
        assert hub.published_manifest() == {"lcnn_resnet18.cifar100": {"repo_id": "me/y"}}
    with pytest.raises(PretrainedLoadError, match=f"{manifest}: the entry for 'lcnn_resnet18.cifar10' has num_classes"):
        timm.create_model("lcnn_resnet18.cifar10", pretrained=True)  # that tag itself: named, not "never published"
    with pytest.raises(PretrainedLoadError, match="fix or remove that entry"):
        hub.read_manifest(manifest, strict=True)  # what push --upload and --bundle rewrite: never dropped silently
    assert len(hub.bundled_manifest(strict=True)) == 4  # the package's own manifest fits the schema it checks
