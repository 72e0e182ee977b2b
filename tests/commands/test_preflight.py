"""lcnn_zoo.commands.preflight: everything ``lcnn-zoo train`` will use is checked before it reads data or
writes a file (issue 18). Each bad value fails in one line with exit code 2, and the output folder
is not created; a monkeypatched data loader proves that no data was read."""
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from lcnn_zoo.commands import training
from lcnn_zoo.commands.options import train_config
from lcnn_zoo.commands.preflight import train_plan
from lcnn_zoo.commands.training import train
from lcnn_zoo.errors import UserError

from cli_helpers import fails_with, files_under, needs_fmnist

FAST = ["--dataset", "fmnist", "--train-subset", "128", "--test-subset", "64", "--batch-size", "64", "--epochs", "1",
        "--lr", "0.05", "--sched", "cosine", "--aug-pad", "2", "--no-progress", "--seed", "3"]


@pytest.fixture
def no_data_read(monkeypatch):
    def read(*a, **k):
        raise AssertionError("the data was read before the preflight failed")

    monkeypatch.setattr(training, "_datasets", read)


@needs_fmnist
@pytest.mark.parametrize("argv,fragment", [
    (["--opt", "foo"], "--opt 'foo' is not one of timm's optimizers"),
    (["--model-kwargs", "foo=1"], "unexpected keyword argument 'foo'"),
    (["--model-kwargs", "logit_scale=0"], "logit_scale must be a finite positive number"),
    # hostile pass, T1: timm.create_model's own keywords (checkpoint_path crashed on meta tensors)
    (["--model-kwargs", "checkpoint_path=/tmp/w.safetensors"], "checkpoint_path is not a model keyword"),
    (["--model-kwargs", "pretrained=True"], "pretrained is not a model keyword: use --pretrained"),
    (["--model-kwargs", "pretrained_cfg=x"], "pretrained_cfg is not a model keyword"),
    (["--model-kwargs", "pretrained_cfg_overlay={}"], "pretrained_cfg_overlay is not a model keyword"),
    (["--model-kwargs", "features_only=True"], "features_only is not a model keyword for training"),
    (["--model", "lcnn_resnet2O"], "unknown model 'lcnn_resnet2O'"),
    (["--mixup", "0.2", "--batch-size", "63"], "need an even --batch-size"),
    (["--device", "tpu"], "--device must be cpu, cuda or cuda:N"),
    (["--num-classes", "5"], "fewer than the 10 classes"),
    (["--input-size", "2", "28", "28"], "only 1 ↔ 3 conversions"),
    (["--experiment", "/abs/path"], "--experiment must be a name, not a path"),
    (["--experiment", "../x"], "--experiment must be a name, not a path"),
    (["--experiment", "a/b"], "--experiment must be a name, not a path"),
    (["--data-dir", "/nonexistent/fashoin"], "--data-dir /nonexistent/fashoin does not exist"),
    (["--data-dir", "/tmp"], "Fashion-MNIST not found in /tmp"),  # a folder without the files: no fallback
    (["--threads", "-1"], "--threads must be >= 0"),
    (["--if-exists", "overwrite"], "invalid choice: 'overwrite'"),
])
def test_a_bad_option_fails_in_one_line_before_any_data_or_file(tmp_path, capsys, no_data_read, argv, fragment):
    fails_with(capsys, ["train"] + FAST + ["--output", str(tmp_path / "runs")] + argv, fragment)
    assert files_under(tmp_path / "runs") == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_cuda_without_a_gpu(tmp_path, capsys, no_data_read):
    fails_with(capsys, ["train"] + FAST + ["--output", str(tmp_path), "--device", "cuda"], "no CUDA GPU is available")


def test_output_that_is_a_file_or_read_only(tmp_path, capsys, no_data_read, readonly_dir):
    (tmp_path / "afile").write_text("mine")
    fails_with(capsys, ["train"] + FAST + ["--output", str(tmp_path / "afile")], "is a file, not a folder")
    fails_with(capsys, ["train"] + FAST + ["--output", str(tmp_path / "afile" / "sub")], "is a file, not a folder")
    assert (tmp_path / "afile").read_text() == "mine"
    fails_with(capsys, ["train"] + FAST + ["--output", str(readonly_dir / "runs")], "is not writable")


def test_one_class_image_folder_is_refused(tmp_path, capsys, no_data_read):
    (tmp_path / "f" / "train" / "only").mkdir(parents=True)
    fails_with(capsys, ["train", "--dataset", f"folder:{tmp_path / 'f'}", "--output", str(tmp_path / "runs")],
               "has 1 class folder(s): a classifier needs at least 2")
    assert files_under(tmp_path / "runs") == []


@needs_fmnist
def test_the_same_command_twice_never_overwrites_the_first_run(tmp_path, capsys):
    argv = FAST + ["--output", str(tmp_path)]
    first = Path(train(train_config(argv))["run_dir"])
    before = {p.name: p.read_bytes() for p in first.iterdir() if p.is_file() and p.name != ".lock"}
    second = Path(train(train_config(argv))["run_dir"])
    assert second == first.with_name(first.name + "-1")
    assert {p.name: p.read_bytes() for p in first.iterdir() if p.is_file() and p.name != ".lock"} == before
    assert "holds another run" in capsys.readouterr().err
    with pytest.raises(UserError, match="exists and holds files"):
        train_plan(train_config(argv + ["--if-exists", "refuse"]))


@needs_fmnist
def test_input_size_is_what_runs_and_what_the_summary_records(tmp_path):
    from lcnn_zoo.commands.evaluation import load_model

    summary = train(train_config(FAST + ["--output", str(tmp_path), "--input-size", "1", "32", "32"]))
    assert summary["input_size"] == [1, 32, 32]
    _, model = load_model(summary["run_dir"])
    assert model(torch.zeros(2, 1, 32, 32)).shape == (2, 10)
    rgb = train(train_config(FAST + ["--output", str(tmp_path), "--experiment", "rgb",
                                     "--input-size", "3", "28", "28"]))
    assert rgb["input_size"] == [3, 28, 28]


@needs_fmnist
def test_a_partial_initial_checkpoint_is_refused_unless_asked(tmp_path, capsys):
    state = timm.create_model("lcnn_resnet20", num_classes=10, in_chans=1, img_size=(28, 28)).state_dict()
    part = {k: v for k, v in state.items() if not k.startswith("stages.2.")}
    save_file(part, str(tmp_path / "part.safetensors"))
    argv = ["train"] + FAST + ["--output", str(tmp_path / "runs"), "--initial-checkpoint",
                               str(tmp_path / "part.safetensors")]
    fails_with(capsys, argv, "covers only part of", "stages.2.", "--allow-partial")
    assert files_under(tmp_path / "runs") == []
    assert train(train_config(argv[1:] + ["--allow-partial"]))["history"]
    assert "left as initialised (--allow-partial)" in capsys.readouterr().err


@needs_fmnist
def test_resume_after_a_class_was_added_is_refused(tmp_path, capsys):
    import numpy as np
    from PIL import Image

    root = tmp_path / "imgs"
    for split in ("train", "val"):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            for i in range(4):
                Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(root / split / c / f"{i}.png")
    argv = ["--dataset", f"folder:{root}", "--input-size", "1", "8", "8", "--batch-size", "4", "--epochs", "1",
            "--model", "lcnn_resnet20", "--no-progress", "--output", str(tmp_path / "runs"), "--experiment", "e"]
    train(train_config(argv))
    (root / "train" / "c").mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "train" / "c" / "0.png")
    capsys.readouterr()
    fails_with(capsys, ["train"] + argv + ["--epochs", "2", "--resume", "auto"], "the dataset's classes changed",
               "new: ['c']")


_BAD_STRINGS = {"config": "/nonexistent/c.yaml", "model": "no_such_model", "initial_checkpoint": "/nonexistent.pth",
                "dataset": "imagenet", "data_dir": "/nonexistent/data", "opt": "foo", "device": "tpu",
                "output": "{file}", "experiment": "../escape", "resume": "/nonexistent/last.pth", "aa": "bogus-policy",
                "train_split": "../up", "val_split": "../up"}


def _bad_values(f):
    """A value of option ``f`` that must be refused (derived from its kind and range)."""
    meta, flag = f.metadata, "--" + f.name.replace("_", "-")
    kind = meta["kind"]
    if kind == "bool":
        name = ("--no-" + f.name.replace("_", "-")) if f.default else flag
        return [f"{name}=1"]  # a flag takes no value
    if kind == "str":
        return [flag, _BAD_STRINGS[f.name]]  # every string option needs an entry here
    if kind == "choice":
        return [flag, "bogus"]
    if kind == "int":
        return [flag, str(meta["minimum"] - 1) if meta.get("minimum") is not None else "1.5"]
    if kind == "float":
        return [flag, "nan"]
    if kind == "ints":
        return [flag, "0" if meta.get("minimum") else "x"]
    if kind == "floats":
        return [flag, "nan"]
    if kind == "size3":
        return [flag, "0", "28", "28"]
    if kind == "kwargs":
        return [flag, "no_equals_sign"]
    raise AssertionError(f"no bad value for {flag} (kind {kind}): add one")


def _all_options():
    import dataclasses

    from lcnn_zoo.commands.config import TrainConfig

    return [pytest.param(f, id=f.name) for f in dataclasses.fields(TrainConfig)]


@pytest.mark.parametrize("field", _all_options())
def test_every_option_refuses_a_bad_value_in_one_line_and_writes_nothing(tmp_path, capsys, no_data_read, field):
    (tmp_path / "afile").write_text("mine")
    argv = [a.format(file=tmp_path / "afile") for a in _bad_values(field)]
    base = ["--output", str(tmp_path / "runs")] if field.name != "output" else []
    fails_with(capsys, ["train", "--dataset", "fmnist", "--no-progress"] + base + argv)
    assert files_under(tmp_path / "runs") == [] and (tmp_path / "afile").read_text() == "mine"


@needs_fmnist
@pytest.mark.parametrize("argv,fragments", [
    pytest.param(["--input-size", "1", "100000", "100000"],
                 ["--input-size 1 100000 100000: one batch of 64 images (--batch-size) needs at least", "TiB",
                  "choose a smaller --input-size or --batch-size"], id="input-size"),
    pytest.param(["--input-size", "3", "4000", "4000", "--batch-size", "2"],
                 ["one batch of 256 images (--validation-batch-size)"], id="evaluation-batch"),
    pytest.param(["--seed", "99999999999999999999"], ["--seed must be <= 4294967295"], id="seed"),
    pytest.param(["--seed", "4294967296"], ["--seed must be <= 4294967295"], id="seed-33-bits"),
])
def test_sizes_and_seeds_that_cannot_run_are_refused_before_the_data_is_read(tmp_path, capsys, no_data_read,
                                                                             monkeypatch, argv, fragments):
    """Issue 31, case 12: 1×100000×100000 passed the preflight, the data was read and resized, and the
    run failed allocating 2.4 PB; a seed beyond NumPy's 32 bits overflowed after the data was read."""
    if "--validation-batch-size" in fragments[0]:  # a machine of 16 GiB, whatever this one has
        monkeypatch.setattr("lcnn_zoo.commands.preflight._memory_of", lambda device: (16 << 30, "this machine"))
    fails_with(capsys, ["train"] + FAST + ["--output", str(tmp_path / "runs")] + argv, *fragments)
    assert files_under(tmp_path / "runs") == []


@needs_fmnist
def test_an_input_size_whose_resized_dataset_cannot_fit_is_refused_before_the_data_is_read(tmp_path, capsys,
                                                                                         no_data_read, monkeypatch):
    """Hostile pass, I12d: 1×3000×3000 passed the one-batch check (64 images: 2.3 GB), then resizing
    the whole training split (60,000 images, in float32: 2 TB) failed after the data was read;
    --train-subset did not help, being taken after the resize."""
    monkeypatch.setattr("lcnn_zoo.commands.preflight._memory_of", lambda device: (16 << 30, "this machine"))
    fails_with(capsys, ["train"] + FAST + ["--output", str(tmp_path / "runs"), "--input-size", "1", "3000", "3000"],
               "--input-size 1 3000 3000: fmnist is resized in memory", "60000 training images need at least 2.0 TiB",
               "this machine has 16.0 GiB")
    assert files_under(tmp_path / "runs") == []


def test_the_memory_check_is_a_lower_bound_that_passes_what_runs(monkeypatch):
    from lcnn_zoo.commands.preflight import check_memory

    # an image folder (resized image by image: Fashion-MNIST at 3×224×224 is 36 GB once resized, see below)
    cfg = train_config(FAST + ["--input-size", "3", "224", "224", "--batch-size", "256", "--dataset", "folder:/shoes"])
    check_memory(cfg, (3, 224, 224), torch.device("cpu"))  # ImageNet's usual batch: 154 MB of inputs
    monkeypatch.setattr("os.sysconf", lambda name: {"SC_PHYS_PAGES": 1000, "SC_PAGE_SIZE": 4096}[name])
    with pytest.raises(UserError, match="this machine has 3.9 MiB"):
        check_memory(cfg, (3, 224, 224), torch.device("cpu"))


@needs_fmnist
@pytest.mark.parametrize("env,fragments", [
    pytest.param({"WORLD_SIZE": "abc"}, ["WORLD_SIZE must be an integer (torchrun sets it), got 'abc'"],
                 id="WORLD_SIZE-junk"),
    pytest.param({"WORLD_SIZE": "0"}, ["WORLD_SIZE must be >= 1"], id="WORLD_SIZE-0"),
    pytest.param({"WORLD_SIZE": "2"}, ["WORLD_SIZE=2 asks for a distributed run, but MASTER_ADDR, MASTER_PORT, RANK "
                                       "are not set", "torchrun --nproc_per_node=2"], id="WORLD_SIZE-outside-torchrun"),
    pytest.param({"WORLD_SIZE": "2", "MASTER_ADDR": "localhost", "MASTER_PORT": "29500", "RANK": "x"},
                 ["RANK must be an integer"], id="RANK-junk"),
    pytest.param({"WORLD_SIZE": "2", "MASTER_ADDR": "localhost", "MASTER_PORT": "29500", "RANK": "2"},
                 ["RANK must be below WORLD_SIZE=2, got 2"], id="RANK-too-large"),
    pytest.param({"WORLD_SIZE": "2", "MASTER_ADDR": "localhost", "MASTER_PORT": "http", "RANK": "0"},
                 ["MASTER_PORT must be an integer"], id="MASTER_PORT-junk"),
])
def test_torchruns_environment_is_checked_before_the_data_is_read(tmp_path, capsys, no_data_read, monkeypatch, env,
                                                                  fragments):
    """Issue 31, case 13: WORLD_SIZE=abc was a ValueError; WORLD_SIZE=2 outside torchrun failed in the
    rendezvous after the data was loaded."""
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    fails_with(capsys, ["train"] + FAST + ["--output", str(tmp_path / "runs")], *fragments)
    assert files_under(tmp_path / "runs") == []


@needs_fmnist
@pytest.mark.parametrize("reg", ["lcnn", "lcnn_gradreg"])
def test_the_lcnn_penalty_is_never_applied_twice(tmp_path, capsys, no_data_read, reg):
    """issue 31, case 4: --reg lcnn puts the penalty in the loss and --model-kwargs lcnn_penalty attaches
    an optimizer hook that adds it again; the pair is refused, each alone counts it once."""
    argv = ["train"] + FAST + ["--output", str(tmp_path / "runs"), "--reg", reg]
    fails_with(capsys, argv + ["--model-kwargs", "lcnn_penalty=1e-3"], f"--reg {reg} already adds the LCNN penalty",
               "lcnn_penalty=0.001 would add it again")
    assert files_under(tmp_path / "runs") == []
    without_loss_penalty = "none" if reg == "lcnn" else "gradreg"
    for once in ([], ["--reg", without_loss_penalty, "--model-kwargs", "lcnn_penalty=1e-3"],
                 ["--model-kwargs", "lcnn_penalty=False"]):
        train_plan(train_config(argv[1:] + once))  # the preflight passes


def test_the_preflight_describes_the_dataset_once_and_training_builds_from_its_entry(tmp_path, monkeypatch):
    """Issue 33, item 4: train_plan describes the dataset once (what it learnt goes on in the plan), and
    training loads both splits through that DataInfo's table entry, not by looking the name up again."""
    import sys

    from lcnn_zoo.commands import data, preflight

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from examples.cifar_standin import write

    write(tmp_path / "data", 37, 11)
    described, built, seen = [], [], []
    describe, build = preflight.describe_dataset, data._Cifar.build

    def again(*a, **k):
        raise AssertionError("the dataset was looked up by name again")

    class Stop(Exception):
        pass

    def stop(cfg, loaded, *a, **k):
        seen.append(loaded)
        raise Stop

    monkeypatch.setattr(preflight, "describe_dataset", lambda *a, **k: described.append(a[0]) or describe(*a, **k))
    monkeypatch.setattr(training, "describe_dataset", again)
    monkeypatch.setattr(data, "build_dataset", again)
    monkeypatch.setattr(data._Cifar, "build", lambda self, arg, **k: built.append(k["train"]) or build(self, arg, **k))
    monkeypatch.setattr(training, "build_run", stop)
    with pytest.raises(Stop):
        train(train_config(["--dataset", "cifar10", "--data-dir", str(tmp_path / "data"), "--model", "lcnn_resnet20",
                            "--epochs", "1", "--batch-size", "8", "--no-progress", "--output", str(tmp_path / "runs")]))
    assert described == ["cifar10"] and built == [True, False]
    assert (len(seen[0].train), len(seen[0].test), seen[0].classes) == (37, 11, [f"class{i}" for i in range(10)])
