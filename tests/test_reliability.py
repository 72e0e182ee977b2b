"""Data safety and training integrity (docs/reliability.md): nothing a user owns is deleted, a run
never silently trains on the wrong thing, and mistakes get one clear line and exit code 2."""
import gzip
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

import lcnn_zoo
from lcnn_zoo import hub
from lcnn_zoo.checkpoint import RunFolder
from lcnn_zoo.cli import main
from lcnn_zoo.options import train_config
from cli_helpers import fails_with
from lcnn_zoo.data import FMNIST_SYSTEM_DIR, build_dataset
from lcnn_zoo.errors import UserError
from lcnn_zoo.training import train

REPO = Path(__file__).resolve().parents[1]
needs_fmnist = pytest.mark.skipif(not FMNIST_SYSTEM_DIR.is_dir(), reason="apt-get install dataset-fashion-mnist")
FAST = ["--dataset", "fmnist", "--train-subset", "128", "--test-subset", "128", "--batch-size", "64", "--lr", "0.05",
        "--sched", "cosine", "--aug-pad", "2", "--no-progress", "--seed", "3", "--model", "lcnn_resnet20", "--reg", "lcnn"]


def checkpoint(tmp_path, name="lcnn_resnet20.cifar10", **kw):
    model = timm.create_model(name, **kw)
    path = tmp_path / "w.safetensors"
    save_file(model.state_dict(), str(path))
    return path


# ---- 1. push never removes what it did not write ----------------------------------------------
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
    fails_with(capsys, ["push", str(ckpt), "--model", "lcnn_resnet20.cifar10", "--output-dir", str(a_file)], "is a file")
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


# ---- 2. bundling: all or nothing, replacing only when asked ------------------------------------
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
    import lcnn_zoo.publishing as pub

    def broken(*a, **k):
        raise UserError("Fashion-MNIST not found")
    monkeypatch.setattr(pub, "build_dataset", broken)
    before = {p.name: p.read_bytes() for p in weights.iterdir()}
    ckpt = checkpoint(tmp_path, "lcnn_resnet20.fmnist")
    fails_with(capsys, ["push", str(ckpt), "--model", "lcnn_resnet20.fmnist_new", "--output-dir", str(tmp_path / "o"),
                        "--bundle"], "not found")
    assert {p.name: p.read_bytes() for p in weights.iterdir()} == before


def test_shipped_weights_without_checksum_are_refused(weights):
    manifest = json.loads((weights / "manifest.json").read_text())
    del manifest["lcnn_resnet20.fmnist"]["sha256"]
    (weights / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(hub.PretrainedLoadError, match="no checksum"):
        timm.create_model("lcnn_resnet20.fmnist", pretrained=True)
    (weights / "manifest.json").write_text('{"lcnn_resnet20.fmnist": {"sha2')  # truncated
    with pytest.raises(hub.PretrainedLoadError, match="manifest.json is not valid JSON"):
        timm.create_model("lcnn_resnet20.fmnist", pretrained=True)


# ---- 3. one run per folder ------------------------------------------------------------------------
@needs_fmnist
def test_a_second_run_in_a_locked_folder_fails_at_once_naming_the_holder(tmp_path):
    folder = RunFolder(tmp_path / "exp")
    with folder.lock():  # a run that has not written its first file yet: --resume auto would continue it
        proc = subprocess.run([sys.executable, "-m", "lcnn_zoo", "train"] + FAST +
                              ["--epochs", "1", "--output", str(tmp_path), "--experiment", "exp", "--resume", "auto"],
                              cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and f"pid {os.getpid()}" in proc.stderr and "in use" in proc.stderr, proc.stderr
    assert not (tmp_path / "exp" / "args.json").exists()


# ---- 4. resume semantics ----------------------------------------------------------------------
@needs_fmnist
def test_extending_a_finished_run_rebuilds_the_schedule_and_other_changes_are_refused(tmp_path, capsys):
    common = FAST + ["--output", str(tmp_path), "--experiment", "ext"]
    train(train_config(common + ["--epochs", "1"]))
    first = RunFolder(tmp_path / "ext").load_checkpoint()["state_dict"]
    train(train_config(common + ["--epochs", "3", "--resume", "auto"]))
    err = capsys.readouterr().err
    assert "extending the run from 1 to 3 epochs: the cosine schedule is rebuilt over 3 epochs" in err
    after = RunFolder(tmp_path / "ext").load_checkpoint()
    assert after["epoch"] == 3 and not torch.equal(after["state_dict"]["stages.1.0.conv1.weight"],
                                                   first["stages.1.0.conv1.weight"])
    lrs = [h["lr"] for h in after["history"]]
    assert lrs[0] == 0.05 and lrs[1] > 0 and lrs[2] > 0, lrs  # epochs 2 and 3 train at a positive lr
    args = json.loads((tmp_path / "ext" / "args.json").read_text())
    assert args["epochs"] == 3 and args["resumed_at_epoch"] == 1
    for option in (["--lr", "0.1"], ["--weight-decay", "0"], ["--reg", "none"], ["--seed", "4"],
                   ["--model-kwargs", "logit_scale=2"]):
        with pytest.raises(UserError, match=f"cannot resume .*{option[0]}"):
            train(train_config(common + ["--epochs", "4", "--resume", "auto"] + option))
    assert json.loads((tmp_path / "ext" / "args.json").read_text()) == args  # what ran, unchanged


# ---- 5. data ----------------------------------------------------------------------------------------
def _write_idx(folder: Path, n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, count in (("train", n), ("t10k", n // 2)):
        images = rng.integers(0, 256, (count, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, count, dtype=np.uint8)
        with gzip.open(folder / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
            f.write(struct.pack(">IIII", 2051, count, 28, 28) + images.tobytes())
        with gzip.open(folder / f"{prefix}-labels-idx1-ubyte.gz", "wb") as f:
            f.write(struct.pack(">II", 2049, count) + labels.tobytes())


def test_fmnist_cache_follows_the_data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("LCNN_ZOO_CACHE", str(tmp_path / "cache"))
    _write_idx(tmp_path / "a", 40, 0)
    _write_idx(tmp_path / "b", 60, 1)
    assert len(build_dataset("fmnist", train=True, data_dir=str(tmp_path / "a"))) == 40
    assert len(build_dataset("fmnist", train=True, data_dir=str(tmp_path / "b"))) == 60
    assert len(build_dataset("fmnist", train=True, data_dir=str(tmp_path / "a"))) == 40


def test_concurrent_cold_cache_builds_do_not_collide(tmp_path):
    _write_idx(tmp_path / "src", 2000, 0)
    code = ("import sys; from lcnn_zoo.data import build_dataset; "
            f"assert len(build_dataset('fmnist', train=True, data_dir={str(tmp_path / 'src')!r})) == 2000")
    env = {**os.environ, "LCNN_ZOO_CACHE": str(tmp_path / "cache")}
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stderr.read()


def _image_folder(root: Path, classes, splits=("train", "val"), size=(20, 20), per_class=4):
    rng = np.random.default_rng(0)
    for split in splits:
        for c in classes[split] if isinstance(classes, dict) else classes:
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                Image.fromarray((rng.random(size) * 255).astype(np.uint8), mode="L").save(d / f"{i}.png")


def test_image_folder_labels_come_from_the_training_split(tmp_path):
    _image_folder(tmp_path / "d", {"train": ["cat", "dog", "emu"], "val": ["dog", "emu"]})
    tr = build_dataset(f"folder:{tmp_path / 'd'}", train=True, channels=1)
    va = build_dataset(f"folder:{tmp_path / 'd'}", train=False, channels=1, classes=tr.classes)
    assert tr.classes == va.classes == ["cat", "dog", "emu"]
    assert sorted({y for _, y in va}) == [1, 2]  # dog and emu keep their training labels


def test_image_folder_errors_name_the_problem(tmp_path, capsys):
    _image_folder(tmp_path / "nosplit", ["a", "b"], splits=("train",))
    fails_with(capsys, ["train", "--dataset", f"folder:{tmp_path / 'nosplit'}", "--epochs", "1", "--output",
                        str(tmp_path / "runs")], "no val/", "--eval-on-train")
    _image_folder(tmp_path / "mixed", ["a", "b"], size=(20, 20))
    Image.fromarray(np.zeros((30, 24), np.uint8), mode="L").save(tmp_path / "mixed" / "train" / "a" / "big.png")
    ds = build_dataset(f"folder:{tmp_path / 'mixed'}", train=True, channels=1)
    with pytest.raises(UserError, match="--input-size"):
        [ds[i] for i in range(len(ds))]
    bad = tmp_path / "mixed" / "val" / "a" / "0.png"
    bad.write_bytes(bad.read_bytes()[:40])  # truncated
    ds = build_dataset(f"folder:{tmp_path / 'mixed'}", train=False, channels=1, image_size=(20, 20))
    with pytest.raises(UserError, match=str(bad)):
        [ds[i] for i in range(len(ds))]


@pytest.mark.parametrize("yaml_text,argv,fragment", [
    ("", ["--train-subset", "-5"], "--train-subset must be >= 0"),
    ('no_flip: "false"\n', [], "true or false"),
    ("lambda_beta: .nan\n", [], "finite"),
    ("decay_milestones: 5\n", [], "list of integers"),
    ("input_size: 28\n", [], "three integers"),
    ("epochs: 0\n", [], "c.yaml: epochs must be >= 1"),
    ("reg: lcnnn\n", [], "one of none, lcnn"),
])
def test_options_are_validated_before_any_work(tmp_path, capsys, yaml_text, argv, fragment):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml_text)
    fails_with(capsys, ["train", "--config", str(cfg), "--output", str(tmp_path / "runs")] + argv, fragment)
    assert not (tmp_path / "runs").exists()


# ---- 8. interrupted writes, full disks, damaged files -----------------------------------------------
@needs_fmnist
def test_resume_regenerates_the_csv_and_cleans_only_its_own_temporaries(tmp_path):
    common = FAST + ["--output", str(tmp_path), "--experiment", "r"]
    train(train_config(common + ["--epochs", "1"]))
    run = tmp_path / "r"
    with open(run / "summary.csv", "a") as f:  # a row written before a kill that lost its checkpoint
        f.write("2,9.9,9.9\n")
    (run / ".last.pth.tmp-lcnn-12345").write_bytes(b"half a checkpoint")
    (run / "my-notes.tmp").write_text("mine")
    train(train_config(common + ["--epochs", "2", "--resume", "auto"]))
    rows = (run / "summary.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["1", "2"]
    assert not (run / ".last.pth.tmp-lcnn-12345").exists() and (run / "my-notes.tmp").read_text() == "mine"
    assert (run / "model_best.safetensors").is_file()


def test_full_disk_says_so(tmp_path):
    mount = tmp_path / "tiny"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        folder = RunFolder(mount / "run")
        (mount / "run").mkdir()
        folder.write_args({"model": "x"})
        with pytest.raises(UserError, match="no space left on device while writing .*last.pth"):
            folder.save_checkpoint({"state_dict": {"w": torch.zeros(100_000)}, "optimizer": {}, "epoch": 1})
        assert not any(p.name.startswith(".last.pth") for p in (mount / "run").iterdir())
        assert json.loads((mount / "run" / "args.json").read_text()) == {"model": "x"}
    finally:
        subprocess.run(["umount", str(mount)])


def test_damaged_json_files_are_named(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "args.json").write_text('{"model": "lcnn_res')
    fails_with(capsys, ["eval", str(run), "--output", str(tmp_path / "e")], str(run / "args.json"), "not valid JSON")
    local = tmp_path / "local"
    local.mkdir()
    (local / "config.json").write_text("{")
    fails_with(capsys, ["eval", f"local-dir:{local}", "--output", str(tmp_path / "e")], "config.json", "not valid JSON")


# ---- 9. eval mistakes, before any measurement -------------------------------------------------------
def test_eval_mistakes_fail_before_measuring(tmp_path, capsys):
    plain = tmp_path / "plain"
    plain.mkdir()
    fails_with(capsys, ["eval", str(plain)], "not a run folder", "local-dir:")
    fails_with(capsys, ["eval", "lcnn_resnet20.fmnist", "--eps", "-0.1"], "--eps")
    fails_with(capsys, ["eval", "lcnn_resnet20.fmnist", "--pgd-samples", "0"], "--pgd-samples must be >= 1")


@needs_fmnist
def test_eval_checks_classes_and_reads_the_input_size_from_the_weights(tmp_path, capsys):
    three = checkpoint(tmp_path, "lcnn_resnet20.fmnist", num_classes=3)
    t = time.time()
    fails_with(capsys, ["eval", str(three), "--arch", "lcnn_resnet20", "--dataset", "fmnist"], "3 classes", "has 10")
    assert time.time() - t < 30
    ten = tmp_path / "ten.safetensors"
    shutil.copy(hub.WEIGHTS_DIR / "lcnn_resnet20.fmnist.safetensors", ten)
    assert main(["eval", str(ten), "--arch", "lcnn_resnet20", "--limit", "100", "--geom-samples", "4",
                 "--pgd-samples", "4", "--noise-samples", "2", "--hvp-iters", "2", "--pgd-steps", "1",
                 "--output", str(tmp_path / "e"), "--no-progress"]) == 0


def test_curvature_of_a_nan_sample_is_nan_alone():
    model = timm.create_model("lcnn_resnet20.cifar10", num_classes=3)
    x = torch.rand(3, 3, 32, 32)
    x[1, 0, 0, 0] = float("nan")
    stats = lcnn_zoo.curvature_stats(model, x, torch.tensor([0, 1, 2]), n_iter=4)
    assert torch.isnan(stats.curvature[1]) and torch.isfinite(stats.curvature[[0, 2]]).all()


def test_user_errors_are_one_line_in_a_real_process(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "lcnn_zoo", "train", "--dataset", f"folder:{tmp_path / 'none'}",
                           "--output", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith("lcnn-zoo: error: image folder") and proc.stderr.count("\n") == 1


# ---- 6. distributed -------------------------------------------------------------------------------
@pytest.mark.slow
@needs_fmnist
def test_a_stopped_rank_makes_the_other_fail_within_the_timeout(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29541", "-m",
           "lcnn_zoo", "train"] + FAST + ["--epochs", "50", "--threads", "1", "--output", str(tmp_path),
                                        "--experiment", "stop", "--dist-timeout", "20"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)
    deadline = time.time() + 240
    victim = None
    while victim is None and time.time() < deadline:  # the rank-1 worker, once training started
        time.sleep(1)
        out = subprocess.run(["pgrep", "-f", "-n", "lcnn_zoo train.*--experiment stop"], capture_output=True, text=True)
        ckpt_started = (tmp_path / "stop" / "args.json").exists()
        if out.stdout.strip() and ckpt_started:
            victim = int(out.stdout.split()[0])
    assert victim is not None
    os.kill(victim, signal.SIGSTOP)
    try:
        t = time.time()
        proc.wait(timeout=240)
        assert proc.returncode != 0 and time.time() - t < 200
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the stopped rank, if the launcher left it
        except ProcessLookupError:
            pass
