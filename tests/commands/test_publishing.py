"""lcnn_zoo.commands.publishing: a bundle is a transaction (content-addressed weights, manifest last, under a
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
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from lcnn_zoo import hub
from lcnn_zoo.commands.cli import main
from lcnn_zoo.commands.data import build_dataset
from lcnn_zoo.commands.publishing import save_pretrained
from lcnn_zoo.errors import UserError
from lcnn_zoo.hub import hub_id

from cli_helpers import fails_with, files_under, needs_fmnist
from hf_cache import populate, publish, remove, unpublish
from model_helpers import checkpoint, damaged, same_outputs, trained

REPO = Path(__file__).resolve().parents[2]


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
    argv = ([sys.executable, "-m", "lcnn_zoo.commands.cli", *code_or_cli] if cli
            else [sys.executable, "-c", code_or_cli[0]])
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
            "m = timm.create_model('lcnn_resnet20.fmnist_new', pretrained=True).eval(); "
            "print(m(torch.zeros(1, 1, 28, 28)).shape)")
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
from lcnn_zoo.commands.cli import main
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
        procs.append(subprocess.Popen([sys.executable, "-m", "lcnn_zoo.commands.cli", "push", str(ckpt), "--model",
                                       f"lcnn_resnet20.{tag}", "--output-dir", str(tmp_path / tag), "--bundle"],
                                      cwd=package, env=env, stderr=subprocess.PIPE, text=True))
    for p in procs:
        assert p.wait(timeout=600) == 0, p.stderr.read()
    manifest = json.loads((package / "lcnn_zoo" / "weights" / "manifest.json").read_text())
    for tag in ("fmnist_a", "fmnist_b"):
        assert (package / "lcnn_zoo" / "weights" / manifest[f"lcnn_resnet20.{tag}"]["file"]).is_file()


def test_a_failing_bundle_rolls_back(tmp_path, weights, monkeypatch, capsys):
    """A failure at the manifest's rename (the commit) restores everything the bundle had renamed."""
    import lcnn_zoo.commands.publishing as pub
    import lcnn_zoo.commands.writing as writing

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
    from lcnn_zoo.commands.evaluation import load_model

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
    # hostile pass, P5: a NaN accuracy (eval.json of weights whose gradients overflowed) reached the card as "nan"
    (lambda t: (t / "m.json").write_text('{"results": {"lcnn_resnet20.cifar10": {"accuracy": NaN}}}'),
     ["--metrics", "{t}/m.json"], "'accuracy' is nan, not a finite number"),
    (lambda t: (t / "m.json").write_text('{"results": {"lcnn_resnet20.cifar10": {"accuracy": 9.0, '
                                         '"pgd_l2": {"0.1": Infinity}}}}'),
     ["--metrics", "{t}/m.json"], "'pgd_l2.0.1' is inf"),
    (lambda t: None, ["--upload"], "--upload"),
])
def test_push_inputs_are_checked_before_anything_is_written(tmp_path, capsys, monkeypatch, setup, extra, fragment):
    monkeypatch.setenv("HF_TOKEN", "hf_test_not_a_token")
    setup(tmp_path)
    ckpt = _ckpt(tmp_path / "w.safetensors", "lcnn_resnet20.cifar10")
    fails_with(capsys, ["push", str(ckpt), "--model", "lcnn_resnet20.cifar10", "--output-dir", str(tmp_path / "o")]
               + [e.format(t=tmp_path) for e in extra], fragment)
    assert files_under(tmp_path / "o") == []


def test_push_of_weights_with_a_missing_key_names_it(tmp_path, capsys):
    """Hostile pass, W6: the message stopped at "Error(s) in loading state_dict for CifarResNet:"."""
    state = timm.create_model("lcnn_resnet20_softplus.fmnist", pretrained=True).state_dict()
    del state["fc.bias"]
    save_file(state, str(tmp_path / "w.safetensors"))
    fails_with(capsys, ["push", str(tmp_path / "w.safetensors"), "--model", "lcnn_resnet20_softplus.x",
                        "--output-dir", str(tmp_path / "o")], "missing keys 'fc.bias'", "for another architecture")
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


def test_push_refuses_foreign_folders_and_keeps_their_files(tmp_path, capsys, monkeypatch):
    ckpt = checkpoint(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    for name in ("last.pth", "args.json", "summary.csv"):
        (run / name).write_text("mine")
    fails_with(capsys, ["push", str(ckpt), "--model", "lcnn_resnet20.cifar10", "--output-dir", str(run)],
               "is not empty", "--overwrite")
    assert sorted(p.name for p in run.iterdir()) == ["args.json", "last.pth", "summary.csv"]
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    fails_with(capsys, ["push", str(ckpt), "--model", "lcnn_resnet20.cifar10", "--output-dir", str(a_file)],
               "is a file")
    assert a_file.read_text() == "mine"
    monkeypatch.chdir(run)
    fails_with(capsys, ["push", str(ckpt), "--model", "lcnn_resnet20.cifar10", "--output-dir", "."], "is not empty")
    shipped = {p.name: p.read_bytes() for p in hub.WEIGHTS_DIR.iterdir()}
    fails_with(capsys, ["push", str(ckpt), "--model", "lcnn_resnet20.cifar10", "--output-dir", str(hub.WEIGHTS_DIR)],
               "is not empty")
    assert {p.name: p.read_bytes() for p in hub.WEIGHTS_DIR.iterdir()} == shipped
    # --overwrite replaces only push's three files
    assert main(["push", str(ckpt), "--model", "lcnn_resnet20.cifar10", "--output-dir", str(run), "--overwrite"]) == 0
    assert sorted(p.name for p in run.iterdir()) == ["README.md", "args.json", "config.json", "last.pth",
                                                     "model.safetensors", "summary.csv"]
    assert (run / "last.pth").read_text() == "mine"


def test_push_again_into_its_own_folder_with_normal_modes(tmp_path):
    ckpt = checkpoint(tmp_path)
    out = tmp_path / "hub" / "lcnn_resnet20.cifar10"
    old = os.umask(0o022)
    try:
        for _ in range(2):  # a previous push of the same model is replaced in place
            assert main(["push", str(ckpt), "--model", "lcnn_resnet20.cifar10", "--output-dir", str(out)]) == 0
    finally:
        os.umask(old)
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert oct(out.stat().st_mode & 0o777) == "0o755"
    assert {oct(p.stat().st_mode & 0o777) for p in out.iterdir()} == {"0o644"}
    other = checkpoint(tmp_path, "lcnn_resnet56.cifar10")
    assert main(["push", str(other), "--model", "lcnn_resnet56.cifar10", "--output-dir", str(out)]) == 2


@needs_fmnist
def test_bundle_replaces_a_shipped_tag_only_when_asked(tmp_path, capsys, weights):
    ckpt = checkpoint(tmp_path, "lcnn_resnet20.fmnist")  # an untrained model: ~10 %
    before = {p.name: p.read_bytes() for p in weights.iterdir()}
    fails_with(capsys, ["push", str(ckpt), "--model", "lcnn_resnet20.fmnist", "--output-dir", str(tmp_path / "o"),
                        "--bundle"], "already shipped", "--replace-shipped")
    assert {p.name: p.read_bytes() for p in weights.iterdir()} == before
    assert main(["push", str(ckpt), "--model", "lcnn_resnet20.fmnist", "--output-dir", str(tmp_path / "o"),
                 "--bundle", "--replace-shipped"]) == 0
    out = capsys.readouterr().out
    assert "replacing the shipped lcnn_resnet20.fmnist: accuracy on the first 1000 test images 91.1% →" in out
    manifest = json.loads((weights / "manifest.json").read_text())
    assert manifest["lcnn_resnet20.fmnist"]["accuracy_first1000"] < 30


def test_bundle_failing_half_way_writes_nothing(tmp_path, capsys, weights, monkeypatch):
    import lcnn_zoo.commands.publishing as pub

    def broken(*a, **k):
        raise UserError("Fashion-MNIST not found")
    monkeypatch.setattr(pub, "build_dataset", broken)
    before = {p.name: p.read_bytes() for p in weights.iterdir()}
    ckpt = checkpoint(tmp_path, "lcnn_resnet20.fmnist")
    fails_with(capsys, ["push", str(ckpt), "--model", "lcnn_resnet20.fmnist_new", "--output-dir", str(tmp_path / "o"),
                        "--bundle"], "not found")
    assert {p.name: p.read_bytes() for p in weights.iterdir()} == before


def test_folder_layout(published):
    _, folder, _ = published
    assert {p.name for p in folder.iterdir()} == {"model.safetensors", "config.json", "README.md"}


def test_save_is_atomic(tmp_path, monkeypatch):
    model = timm.create_model("lcnn_resnet20.cifar10")
    out = save_pretrained(model, tmp_path / "repo", model_card="v1")
    import lcnn_zoo.commands.publishing as pub

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(pub, "save_for_hf", boom)
    with pytest.raises(OSError):
        save_pretrained(model, out, model_card="v2")
    assert (out / "README.md").read_text() == "v1"  # the old folder is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repo"]  # no temp leftovers
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]


def test_cli_push_writes_loadable_folder(tmp_path, capsys):
    import json

    from safetensors.torch import save_file

    from lcnn_zoo.commands.cli import main

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
    from lcnn_zoo.commands.checkpoint import load_state_dict as load_checkpoint_state_dict
    from lcnn_zoo.commands.cli import main

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


def test_push_of_a_run_that_has_not_finished_is_refused_unless_asked(tmp_path, capsys):
    """Issue 31, case 2: `push` of a run still training published its mid-training last.pth, and the
    card said nothing. Now refused (its lock held, or its summary saying finished: false), the folder
    not written; with --allow-unfinished its last.pth is pushed and the card says from which epoch."""
    from lcnn_zoo.commands.checkpoint import RunFolder

    from model_helpers import run_folder

    done = run_folder(tmp_path / "done", epoch=2, epochs=2)
    stopped = run_folder(tmp_path / "stopped", epoch=2, epochs=5, finished=False)
    out = ["--model", "lcnn_resnet20.mine", "--output-dir", str(tmp_path / "hub")]
    with RunFolder(done).lock():  # training again there (e.g. extended with --epochs 4 --resume auto)
        fails_with(capsys, ["push", str(done)] + out, "is still training at epoch 2 of 2", f"pid {os.getpid()}",
                   "pass --allow-unfinished")
    fails_with(capsys, ["push", str(stopped)] + out, "is unfinished at epoch 2 of 5", "pass --allow-unfinished")
    fails_with(capsys, ["push", str(stopped / "last.pth")] + out, "is unfinished at epoch 2 of 5")
    assert files_under(tmp_path / "hub") == []
    assert main(["push", str(stopped)] + out + ["--allow-unfinished"]) == 0
    card = (tmp_path / "hub" / "README.md").read_text()
    assert "These weights are from epoch 2 of 5 of a run that was unfinished" in card


# ---- issue 31, cases 5 and 6: the card is huggingface_hub's ModelCard, its text literal, and it loads by hf-hub:
HOSTILE_CLASSES = ["<img src=x onerror=alert(1)>", "new\nline: x", "back`tick`", "[link](http://e.x)"]


def test_a_card_shows_data_strings_as_text_names_no_local_path_and_loads_by_its_hub_name(tmp_path, capsys):
    """Class names, a local dataset and a command with backticks add no markup, no YAML key and no
    path to the card; its usage line is the hf-hub: name, which loads with the class names."""
    from huggingface_hub import ModelCard

    ckpt = _ckpt(tmp_path / "w.safetensors", "lcnn_resnet20.fmnist", num_classes=4)
    data = tmp_path / "secret_home" / "shoes"
    out = tmp_path / "hub" / "lcnn_resnet20.shoes"
    command = f"lcnn-zoo eval x --dataset folder:{data} --data-dir={data} --note `id` ```"
    assert main(["push", str(ckpt), "--model", "lcnn_resnet20.shoes", "--output-dir", str(out),
                 "--classes", ",".join(HOSTILE_CLASSES), "--dataset", f"folder:{data}",
                 "--eval-command", command]) == 0
    text = (out / "README.md").read_text()
    card = ModelCard.load(out / "README.md")
    assert card.data.to_dict() == {"library_name": "timm", "license": "apache-2.0",
                                   "pipeline_tag": "image-classification",
                                   "tags": ["image-classification", "timm", "lcnn-zoo", "low-curvature"]}
    assert "secret_home" not in text and str(tmp_path) not in text and "an image folder" in text
    assert "<img" not in text and "&lt;img src=x onerror=alert(1)&gt;" in text
    assert "new\\\\nline: x" in text and "\nline: x" not in text  # the newline is shown, never a new line
    assert "back\\`tick\\`" in text and "\\[link\\](http://e.x)" in text
    # the command is one code span it cannot close: a fence longer than its longest run of backticks
    assert ("Measured with ```` lcnn-zoo eval x --dataset folder:<local path> --data-dir=<local path> --note `id` ``` "
            "````." in text)
    assert 'timm.create_model("hf-hub:lcnn-zoo/lcnn_resnet20.shoes", pretrained=True)' in text
    assert 'create_model("lcnn_resnet20.shoes"' not in text
    config = json.loads((out / "config.json").read_text())
    assert config["label_names"] == HOSTILE_CLASSES and str(tmp_path) not in json.dumps(config)
    repo = "someone/lcnn_resnet20.shoes"
    populate(repo, out)
    try:  # what a reader runs: the hf-hub: name, with the class names in the model's cfg
        model = timm.create_model(f"hf-hub:{repo}", pretrained=True)
        assert model.num_classes == 4 and model.pretrained_cfg["label_names"] == HOSTILE_CLASSES
    finally:
        remove(repo)


@pytest.mark.parametrize("dataset,fragment", [
    ("fmnist\nlicense: other", "--dataset 'fmnist\\nlicense: other' has control characters"),
    ("hf:me/data\rlicense: other", "has control characters"),
    # hostile pass, I05c: an invalid Hub id became "an image folder" on the card
    ('hf:evil/x"]}license: other', "is not a Hub dataset id"),
    ("hf:my org/data", "'my org/data' is not a Hub dataset id"),
])
def test_a_dataset_name_cannot_add_yaml_keys(tmp_path, capsys, dataset, fragment):
    ckpt = tmp_path / "w.safetensors"
    ckpt.write_bytes(b"")  # refused before the weights are read
    fails_with(capsys, ["push", str(ckpt), "--model", "lcnn_resnet20.fmnist", "--output-dir", str(tmp_path / "o"),
                        "--dataset", dataset], fragment)
    assert files_under(tmp_path / "o") == []


def test_the_cards_yaml_is_serialised_by_huggingface_hub(tmp_path):
    """Every dataset spelling gives a header huggingface_hub reads back as written: Hub datasets
    by their id, local data never, and nothing of a name reaches another key."""
    from huggingface_hub import ModelCard

    from lcnn_zoo.commands.publishing import build_model_card, find_model_card_template

    template = find_model_card_template()
    cfg = {"num_classes": 10, "input_size": (1, 28, 28)}
    for dataset, datasets, words in [
        ("fmnist", ["zalando-datasets/fashion_mnist"], "Fashion-MNIST"),
        ("CIFAR10", ["uoft-cs/cifar10"], "CIFAR-10"),
        ("hf:me/shoes", ["me/shoes"], "me/shoes"),
        (f"hf:{tmp_path}", None, "an image folder"),
        (f"folder:{tmp_path}/x: y", None, "an image folder"),
        (str(tmp_path), None, "an image folder"),
        ("footwear license: other", None, "footwear license: other"),
    ]:
        card = build_model_card(template, model_name="lcnn_resnet20.x", repo_id="me/lcnn_resnet20.x", cfg=cfg,
                                flavour="lcnn", dataset=dataset)
        again = ModelCard(str(card))
        assert again.data.to_dict() == card.data.to_dict()
        assert again.data.license == "apache-2.0" and again.data.datasets == datasets, dataset
        assert f"trained on {words} with" in str(card) and str(tmp_path) not in str(card)
    (tmp_path / "t.md").write_text("<!-- BEGIN HUB TEMPLATE -->\n---\nlicense: mit\ndatasets:\n- ${dataset}\n---\n"
                                   "# ${model_id}\n<!-- END HUB TEMPLATE -->")
    with pytest.raises(UserError, match="header has a \\$ field"):
        build_model_card(find_model_card_template(tmp_path / "t.md"), model_name="lcnn_resnet20.x",
                         repo_id="me/lcnn_resnet20.x", cfg=cfg, flavour="lcnn")


def test_a_recipes_local_paths_and_a_metrics_files_strings_stay_out_of_the_card(tmp_path):
    from lcnn_zoo.commands.publishing import metrics_table, render_recipe

    recipe = render_recipe(f"model: lcnn_resnet20\ndataset: folder:{tmp_path}/shoes\ndata-dir: {tmp_path}\n"
                           f"output: {tmp_path}/runs\nepochs: 3  # ```\n", str(tmp_path / "shoes.yaml"))
    assert str(tmp_path) not in recipe
    assert recipe.startswith("Trained with `lcnn-zoo train --config shoes.yaml`:\n\n```yaml\n")
    assert "dataset: folder:<local path>\ndata-dir: <local path>\noutput: <local path>\nepochs: 3\n```" in recipe
    kept = render_recipe("model: lcnn_resnet20  # ```` ends a short fence\n", str(REPO / "configs" / "x.yaml"))
    assert kept == ("Trained with `lcnn-zoo train --config configs/x.yaml`:\n\n"
                    "`````yaml\nmodel: lcnn_resnet20  # ```` ends a short fence\n`````")
    table = metrics_table({"accuracy": "<b>9</b>", "a|b": 1.5, "test_samples": "1\n# x"})
    assert table.splitlines()[2:] == ["| clean accuracy (%), 1\\\\n# x test images | &lt;b&gt;9&lt;/b&gt; |",
                                      "| a\\|b | 1.5 |"]


def test_an_upload_is_not_recorded_over_a_damaged_manifest_entry(tmp_path, monkeypatch):
    """The published manifest is rewritten only when every entry fits its schema: a damaged one is
    named (import skips it with a warning), never dropped or kept as if it were sound."""
    from lcnn_zoo.commands.publishing import record_published

    path = tmp_path / "published.json"
    before = json.dumps({"lcnn_resnet20.a": {"repo_id": "me/a", "input_size": [3, 1e400, 28]}})
    before = before.replace("Infinity", "1e400")
    path.write_text(before)
    monkeypatch.setenv("LCNN_ZOO_PUBLISHED", str(path))
    folder = tmp_path / "repo"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"weights")
    (folder / "config.json").write_text('{"num_classes": 3, "pretrained_cfg": {"input_size": [1, 28, 28]}}')
    with pytest.raises(hub.PretrainedLoadError, match="'lcnn_resnet20.a' has input_size = \\[3, inf, 28\\]"):
        record_published("lcnn_resnet20.b", "me/b", folder)
    assert path.read_text() == before


@pytest.mark.parametrize("case", ["nan", "i32", "overflow"])
def test_weights_wrong_in_content_are_not_published(tmp_path, capsys, case):
    """Issue 31, case 10: push published what it was given; weights that are not finite, integers where
    the model has floats, or finite weights whose outputs overflow are refused before any file is written."""
    state = load_file(str(hub.WEIGHTS_DIR / "lcnn_resnet20_softplus.fmnist.safetensors"))
    if case == "overflow":
        state["logit_scale"], name = torch.tensor(torch.finfo(torch.float32).max), "outputs that are not finite"
    else:
        state, name = damaged(state, case)
        name = f"tensor '{name}'"
    save_file(state, str(tmp_path / "w.safetensors"))
    fails_with(capsys, ["push", str(tmp_path / "w.safetensors"), "--model", "lcnn_resnet20_softplus.fmnist",
                        "--output-dir", str(tmp_path / "o")], "w.safetensors", name)
    assert files_under(tmp_path / "o") == []


@pytest.mark.parametrize("kind,fragment", [("fifo", "a named pipe (FIFO)"), ("device", "a character device")])
def test_a_recipe_that_is_a_fifo_or_a_device_is_said_so_not_opened(tmp_path, capsys, kind, fragment):
    """Hostile pass of issue 31, P9: `push --recipe` a FIFO or /dev/zero said "no such file"."""
    recipe = tmp_path / "r.yaml"
    os.mkfifo(recipe) if kind == "fifo" else recipe.symlink_to("/dev/zero")
    ckpt = _ckpt(tmp_path / "w.safetensors", "lcnn_resnet20.cifar10")
    fails_with(capsys, ["push", str(ckpt), "--model", "lcnn_resnet20.cifar10", "--output-dir", str(tmp_path / "o"),
                        "--recipe", str(recipe)], "r.yaml is not a regular file", fragment)
    assert files_under(tmp_path / "o") == []


def test_push_of_any_file_of_a_run_that_has_not_finished_is_refused_unless_asked(tmp_path, capsys):
    """Hostile pass of issue 31, I02b: `push <run>/model_best.safetensors` (or model.safetensors, or a
    link to either) of a run still training or stopped published mid-training weights, the card silent:
    only `push <run>` and `push <run>/last.pth` were refused. Every file of a run now carries its state."""
    from lcnn_zoo.commands.checkpoint import RunFolder

    from model_helpers import run_folder

    done = run_folder(tmp_path / "done", epoch=2, epochs=2)
    stopped = run_folder(tmp_path / "stopped", epoch=2, epochs=5, finished=False)
    (tmp_path / "link.safetensors").symlink_to(stopped / "model_best.safetensors")
    out = ["--model", "lcnn_resnet20.mine", "--output-dir", str(tmp_path / "hub")]
    with RunFolder(done).lock():
        for name in ("model_best.safetensors", "model.safetensors"):
            fails_with(capsys, ["push", str(done / name)] + out, "is still training at epoch 2 of 2",
                       "pass --allow-unfinished")
    for path in (stopped / "model_best.safetensors", tmp_path / "link.safetensors"):
        fails_with(capsys, ["push", str(path)] + out, "is unfinished at epoch 2 of 5", "pass --allow-unfinished")
    assert files_under(tmp_path / "hub") == []
    assert main(["push", str(stopped / "model_best.safetensors")] + out + ["--allow-unfinished"]) == 0
    card = (tmp_path / "hub" / "README.md").read_text()
    assert "are from a run that was unfinished at epoch 2 of 5" in card


def test_an_output_dir_that_is_a_dangling_link_is_said_so(tmp_path, capsys):
    """Hostile pass of issue 31, P3: `push --output-dir <dangling symlink>` said "is a file, not a folder"."""
    link = tmp_path / "out"
    link.symlink_to(tmp_path / "gone")
    ckpt = _ckpt(tmp_path / "w.safetensors", "lcnn_resnet20.cifar10")
    fails_with(capsys, ["push", str(ckpt), "--model", "lcnn_resnet20.cifar10", "--output-dir", str(link)],
               "is a dangling symbolic link", "gone")
    assert link.is_symlink() and not (tmp_path / "gone").exists()


def test_a_bundle_over_a_manifest_with_a_damaged_entry_writes_nothing(tmp_path, capsys, weights):
    """Hostile pass of issue 31, M5: `push --bundle` while *another* tag's manifest entry was damaged
    wrote the repo folder, then failed (exit 2) at the manifest: the manifest is now checked first."""
    path = weights / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["lcnn_resnet20.hb"] = {**manifest["lcnn_resnet20.fmnist"], "num_classes": True}
    path.write_text(json.dumps(manifest))
    before = {p.name: p.read_bytes() for p in weights.iterdir()}
    ckpt = _ckpt(tmp_path / "w.safetensors")
    fails_with(capsys, ["push", str(ckpt), "--model", "lcnn_resnet20.fmnist_new", "--output-dir", str(tmp_path / "o"),
                        "--bundle"], "manifest.json", "'lcnn_resnet20.hb'", "num_classes")
    assert files_under(tmp_path / "o") == []
    assert {p.name: p.read_bytes() for p in weights.iterdir()} == before


def test_ema_of_a_run_trained_without_ema_says_so(tmp_path, capsys):
    """Hostile pass of issue 31, P6: `push <run> --ema` of a run trained without --model-ema said
    "has no 'state_dict_ema' entry (keys: [..., 'state_dict_ema'])", contradicting itself."""
    from model_helpers import run_folder

    run = run_folder(tmp_path / "run", epoch=1, epochs=1)
    err = fails_with(capsys, ["push", str(run), "--model", "lcnn_resnet20.mine", "--output-dir", str(tmp_path / "o"),
                              "--ema"], "the run was trained without --model-ema", "leave out --ema")
    assert "keys:" not in err
    assert files_under(tmp_path / "o") == []
