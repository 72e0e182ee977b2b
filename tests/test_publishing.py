"""lcnn_zoo.publishing: a bundle is a transaction (content-addressed weights, manifest last, under a
lock), measured on the run's own data, and what it writes loads afterwards; push checks every
input before it writes its first file (issue 18, cases 5, 6, 8, 9 and push's tracebacks)."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
from PIL import Image
from safetensors.torch import save_file

from cli_helpers import fails_with, files_under
from lcnn_zoo import hub
from lcnn_zoo.cli import main
from lcnn_zoo.data import FMNIST_SYSTEM_DIR

REPO = Path(__file__).resolve().parents[1]
needs_fmnist = pytest.mark.skipif(not FMNIST_SYSTEM_DIR.is_dir(), reason="apt-get install dataset-fashion-mnist")


def _ckpt(path: Path, name="lcnn_resnet20.fmnist", **kw) -> Path:
    save_file(timm.create_model(name, **kw).state_dict(), str(path))
    return path


@pytest.fixture
def package(tmp_path):
    """A copy of the whole package, so a subprocess bundles into *its* weights folder (never the real one)."""
    root = tmp_path / "pkg"
    shutil.copytree(REPO / "lcnn_zoo", root / "lcnn_zoo", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "MODEL_CARD.md", root / "MODEL_CARD.md")
    real = {p.name: p.read_bytes() for p in hub.WEIGHTS_DIR.iterdir()}
    yield root
    assert {p.name: p.read_bytes() for p in hub.WEIGHTS_DIR.iterdir()} == real, "the real package was written"


def _run(package: Path, *code_or_cli: str, cli: bool = True, env_extra=None):
    env = {**os.environ, "PYTHONPATH": str(package), **(env_extra or {})}
    argv = [sys.executable, "-m", "lcnn_zoo.cli", *code_or_cli] if cli else [sys.executable, "-c", code_or_cli[0]]
    # cwd is the copy: from the repository, its own lcnn_zoo would come first on sys.path
    return subprocess.run(argv, cwd=package, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow  # fresh processes: several imports of torch and timm
@needs_fmnist
def test_a_bundled_new_tag_loads_and_evaluates_in_a_new_process(tmp_path, package):
    ckpt = _ckpt(tmp_path / "w.safetensors")
    r = _run(package, "push", str(ckpt), "--model", "lcnn_resnet20.fmnist_new", "--output-dir", str(tmp_path / "o"),
             "--bundle")
    assert r.returncode == 0, r.stderr
    entry = json.loads((package / "lcnn_zoo" / "weights" / "manifest.json").read_text())["lcnn_resnet20.fmnist_new"]
    assert entry["num_classes"] == 10 and entry["input_size"] == [1, 28, 28] and entry["dataset"] == "fmnist"
    assert (package / "lcnn_zoo" / "weights" / entry["file"]).is_file()
    code = ("import timm, lcnn_zoo, torch; assert 'lcnn_resnet20.fmnist_new' in timm.list_pretrained('lcnn*'); "
            "m = timm.create_model('lcnn_resnet20.fmnist_new', pretrained=True).eval(); print(m(torch.zeros(1, 1, 28, 28)).shape)")
    r = _run(package, code, cli=False)
    assert r.returncode == 0 and "torch.Size([1, 10])" in r.stdout, r.stderr
    r = _run(package, "eval", "lcnn_resnet20.fmnist_new", "--limit", "64", "--geom-samples", "4", "--pgd-samples", "8",
             "--noise-samples", "4", "--hvp-iters", "2", "--no-progress", "--output", str(tmp_path / "ev"))
    assert r.returncode == 0 and (tmp_path / "ev" / "eval.json").is_file(), r.stderr


_KILL_AT_MANIFEST = """
import os, sys
real = os.replace
def replace(src, dst, *a, **k):
    if str(dst).endswith("manifest.json"):
        os._exit(9)  # killed between the weights and the manifest
    return real(src, dst, *a, **k)
os.replace = replace
from lcnn_zoo.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow  # fresh processes: several imports of torch and timm
@needs_fmnist
def test_a_bundle_killed_before_its_manifest_leaves_the_shipped_tag_loading(tmp_path, package):
    ckpt = _ckpt(tmp_path / "w.safetensors")
    weights = package / "lcnn_zoo" / "weights"
    manifest = (weights / "manifest.json").read_bytes()
    env = {**os.environ, "PYTHONPATH": str(package)}
    r = subprocess.run([sys.executable, "-c", _KILL_AT_MANIFEST, "push", str(ckpt), "--model", "lcnn_resnet20.fmnist",
                        "--output-dir", str(tmp_path / "o"), "--bundle", "--replace-shipped"],
                       cwd=package, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 9, r.stderr
    assert (weights / "manifest.json").read_bytes() == manifest
    r = _run(package, "import timm, lcnn_zoo; timm.create_model('lcnn_resnet20.fmnist', pretrained=True); print('ok')",
             cli=False)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr
    # the next bundle of that tag commits and removes what the killed one left behind
    r = _run(package, "push", str(ckpt), "--model", "lcnn_resnet20.fmnist", "--output-dir", str(tmp_path / "o2"),
             "--bundle", "--replace-shipped")
    assert r.returncode == 0, r.stderr
    entry = json.loads((weights / "manifest.json").read_text())["lcnn_resnet20.fmnist"]
    assert sorted(p.name for p in weights.glob("lcnn_resnet20.fmnist.*safetensors")) == [entry["file"]]
    assert not (weights / "lcnn_resnet20.fmnist.safetensors").exists()


@pytest.mark.slow  # fresh processes: several imports of torch and timm
@needs_fmnist
def test_two_bundles_at_once_both_land(tmp_path, package):
    procs = []
    for tag in ("fmnist_a", "fmnist_b"):
        ckpt = _ckpt(tmp_path / f"{tag}.safetensors")
        env = {**os.environ, "PYTHONPATH": str(package)}
        procs.append(subprocess.Popen([sys.executable, "-m", "lcnn_zoo.cli", "push", str(ckpt), "--model",
                                       f"lcnn_resnet20.{tag}", "--output-dir", str(tmp_path / tag), "--bundle"],
                                      cwd=package, env=env, stderr=subprocess.PIPE, text=True))
    for p in procs:
        assert p.wait(timeout=600) == 0, p.stderr.read()
    manifest = json.loads((package / "lcnn_zoo" / "weights" / "manifest.json").read_text())
    for tag in ("fmnist_a", "fmnist_b"):
        assert (package / "lcnn_zoo" / "weights" / manifest[f"lcnn_resnet20.{tag}"]["file"]).is_file()


def test_a_failing_bundle_rolls_back(tmp_path, weights, monkeypatch, capsys):
    """A failure at the manifest's rename (the commit) restores everything the bundle had renamed."""
    import lcnn_zoo.publishing as pub
    import lcnn_zoo.writing as writing

    before = {p.name: p.read_bytes() for p in weights.iterdir() if p.name != ".manifest.lock"}
    model = timm.create_model("lcnn_resnet20.fmnist")
    folder = tmp_path / "o"
    pub.save_pretrained(model, folder, model_card="card")
    real = os.replace

    def replace(src, dst, *a, **k):
        if str(dst).endswith("manifest.json"):
            raise OSError(28, "No space left on device")
        return real(src, dst, *a, **k)

    monkeypatch.setattr(writing.os, "replace", replace)
    monkeypatch.setattr(pub, "_first_images_accuracy", lambda m, ds: 10.0)
    monkeypatch.setattr(pub, "bundle_dataset", lambda tag, m, run: ("fmnist", None))
    with pytest.raises(pub.UserError, match="no space left on device"):
        pub.bundle(folder, "lcnn_resnet20.fmnist", model, metrics=None, eval_command="", replace=True)
    assert {p.name: p.read_bytes() for p in weights.iterdir() if p.name != ".manifest.lock"} == before


@needs_fmnist
def test_a_run_is_bundled_against_its_own_classes(tmp_path, weights, capsys):
    rng = np.random.default_rng(0)
    root = tmp_path / "shoes"
    for split in ("train", "val"):
        for c in ("sandal", "sneaker", "boot"):
            (root / split / c).mkdir(parents=True)
            for i in range(6):
                Image.fromarray((rng.random((28, 28)) * 255).astype(np.uint8)).save(root / split / c / f"{i}.png")
    assert main(["train", "--dataset", f"folder:{root}", "--input-size", "1", "28", "28", "--batch-size", "6",
                 "--epochs", "1", "--no-progress", "--output", str(tmp_path / "runs"), "--experiment", "shoes"]) == 0
    run = tmp_path / "runs" / "shoes"
    shutil.copy(run / "model.safetensors", tmp_path / "bare.safetensors")  # outside its run: the tag's data
    capsys.readouterr()
    fails_with(capsys, ["push", str(tmp_path / "bare.safetensors"), "--model", "lcnn_resnet20.fmnist_shoes",
                        "--output-dir", str(tmp_path / "x"), "--bundle"], "has 3 classes", "has 10")
    assert files_under(tmp_path / "x") == []
    assert main(["push", str(run), "--model", "lcnn_resnet20.fmnist_shoes", "--output-dir", str(tmp_path / "o"),
                 "--bundle"]) == 0
    entry = json.loads((weights / "manifest.json").read_text())["lcnn_resnet20.fmnist_shoes"]
    assert entry["dataset"] == f"folder:{root}" and entry["num_classes"] == 3
    from lcnn_zoo.evaluation import load_model
    from lcnn_zoo.data import build_dataset
    import torch

    _, model = load_model(str(run))
    ds = build_dataset(f"folder:{root}", train=False, channels=1, image_size=(28, 28))
    x, y = torch.stack([ds[i][0] for i in range(len(ds))]), torch.tensor([ds[i][1] for i in range(len(ds))])
    with torch.no_grad():
        assert entry["accuracy_first1000"] == round(100.0 * float((model(x).argmax(1) == y).float().mean()), 2)


@pytest.mark.parametrize("setup,extra,fragment", [
    (lambda t: (t / "card.md").write_text("<!-- BEGIN HUB TEMPLATE -->\ncosts $5\n<!-- END HUB TEMPLATE -->"),
     ["--template", "{t}/card.md"], "template has a field it cannot fill"),
    (lambda t: None, ["--recipe", "{t}/missing.yaml"], "--recipe"),
    (lambda t: (t / "bin.yaml").write_bytes(b"\xff\xfe\x00binary"), ["--recipe", "{t}/bin.yaml"], "not a UTF-8 text"),
    (lambda t: (t / "m.json").write_text("[1, 2]"), ["--metrics", "{t}/m.json"], "holds a list"),
    (lambda t: None, ["--upload"], "--upload"),
])
def test_push_inputs_are_checked_before_anything_is_written(tmp_path, capsys, monkeypatch, setup, extra, fragment):
    monkeypatch.setenv("HF_TOKEN", "hf_test_not_a_token")
    setup(tmp_path)
    ckpt = _ckpt(tmp_path / "w.safetensors", "lcnn_resnet20.cifar10")
    fails_with(capsys, ["push", str(ckpt), "--model", "lcnn_resnet20.cifar10", "--output-dir", str(tmp_path / "o")]
               + [e.format(t=tmp_path) for e in extra], fragment)
    assert files_under(tmp_path / "o") == []


def test_a_published_manifest_entry_of_the_wrong_type_is_named(tmp_path, monkeypatch):
    path = tmp_path / "published.json"
    path.write_text(json.dumps({"lcnn_resnet18.cifar10": "lcnn-zoo/lcnn_resnet18.cifar10"}))
    monkeypatch.setenv("LCNN_ZOO_PUBLISHED", str(path))
    with pytest.raises(hub.PretrainedLoadError, match="is str, not a mapping"):
        timm.create_model("lcnn_resnet18.cifar10", pretrained=True)


def test_upload_without_a_reachable_hub_fails_in_seconds_before_writing(tmp_path, capsys, monkeypatch):
    from huggingface_hub import constants as hf_constants

    monkeypatch.setenv("HF_TOKEN", "hf_test_not_a_token")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hf_constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    ckpt = _ckpt(tmp_path / "w.safetensors", "lcnn_resnet20.cifar10")
    fails_with(capsys, ["push", str(ckpt), "--model", "lcnn_resnet20.cifar10", "--output-dir", str(tmp_path / "o"),
                        "--upload"], "the Hugging Face Hub cannot be reached", "127.0.0.1:9")
    assert files_under(tmp_path / "o") == []


def test_a_model_name_is_never_a_path(tmp_path, capsys, weights, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ckpt = _ckpt(tmp_path / "w.safetensors", "lcnn_resnet20.cifar10")
    shipped = sorted(p.name for p in weights.iterdir())
    for name in ("lcnn_resnet20.fmnist/../../escaped", "lcnn_resnet20./abs"):
        fails_with(capsys, ["push", str(ckpt), "--model", name, "--bundle"], "--model must be a name, not a path")
    assert not (tmp_path / "hub").exists() and not (tmp_path / "escaped").exists()
    assert sorted(p.name for p in weights.iterdir()) == shipped


def test_ema_weights_come_only_from_a_checkpoint_that_has_them(tmp_path, capsys):
    ckpt = _ckpt(tmp_path / "w.safetensors", "lcnn_resnet20.cifar10")
    fails_with(capsys, ["push", str(ckpt), "--model", "lcnn_resnet20.cifar10", "--output-dir", str(tmp_path / "o"),
                        "--ema"], "EMA weights are in a training checkpoint")
    assert files_under(tmp_path / "o") == []
