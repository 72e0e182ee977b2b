"""Training entry point: configs, real short runs (Fashion-MNIST subset, CIFAR stand-in), exact resume
after a kill, DDP with gloo on 2 processes, AMP, evaluation outputs."""
import json
import os
import signal
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
from lcnn_zoo.commands import training
from lcnn_zoo.commands.checkpoint import RunFolder
from lcnn_zoo.commands.cli import main
from lcnn_zoo.commands.data import (
    BatchAugment,
    DataNotFoundError,
    build_dataset,
)
from lcnn_zoo.commands.options import train_config
from lcnn_zoo.commands.options import train_config as parse_args
from lcnn_zoo.commands.training import train
from lcnn_zoo.errors import UserError

from cli_helpers import needs_fmnist

REPO = Path(__file__).resolve().parents[2]


def load_checkpoint(path):
    return RunFolder(Path(path).parent).load_checkpoint(path)


FAST = ["--dataset", "fmnist", "--train-subset", "256", "--test-subset", "256", "--batch-size", "64",
        "--lr", "0.05", "--sched", "cosine", "--aug-pad", "2", "--no-progress", "--seed", "3"]


def test_model_kwargs_reach_the_model_and_the_evaluation(tmp_path):
    from lcnn_zoo.commands.evaluation import load_model

    args = parse_args(FAST + ["--model", "lcnn_resnet20", "--reg", "lcnn", "--epochs", "1", "--output", str(tmp_path),
                              "--experiment", "scaled", "--model-kwargs", "logit_scale=3"])
    assert args.model_kwargs == {"logit_scale": 3}
    run = Path(train(args)["run_dir"])
    assert json.loads((run / "args.json").read_text())["model_kwargs"] == {"logit_scale": 3}
    _, model = load_model(str(run))
    assert model.logit_scale.item() == 3.0
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model_kwargs: {logit_scale: 2.0}\n")
    assert parse_args(["--config", str(cfg)]).model_kwargs == {"logit_scale": 2.0}
    for bad in (["--model-kwargs", "num_classes=3"],
                ["--config", str(_write(tmp_path / "b.yaml", "model_kwargs: 4\n"))]):
        with pytest.raises(UserError):
            parse_args(bad)


def _write(path, text):
    path.write_text(text)
    return path


def test_batch_augment_is_a_random_shift_and_flip():
    x = torch.arange(2 * 1 * 5 * 5, dtype=torch.float32).reshape(2, 1, 5, 5)
    out = BatchAugment(pad=2)(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    for i in range(2):  # every output row is a (possibly flipped) shifted window of the zero-padded input
        xp = torch.nn.functional.pad(x[i], (2, 2, 2, 2))
        windows = [xp[:, a:a + 5, b:b + 5] for a in range(5) for b in range(5)]
        assert any(torch.equal(out[i], w) or torch.equal(out[i], w.flip(-1)) for w in windows)


@needs_fmnist
def test_fmnist_from_debian_package():
    ds = build_dataset("fmnist", train=False)
    assert len(ds) == 10000 and ds.images.shape[1:] == (1, 28, 28) and ds.num_classes == 10
    x, y = ds[0]
    assert x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1 and 0 <= y < 10


def test_missing_data_messages(tmp_path, monkeypatch):
    monkeypatch.setattr("lcnn_zoo.commands.data.FMNIST_SYSTEM_DIR", tmp_path / "nope")
    with pytest.raises(DataNotFoundError, match="dataset-fashion-mnist"):
        build_dataset("fmnist", train=True, data_dir=str(tmp_path))
    with pytest.raises(DataNotFoundError, match="--download"):
        build_dataset("cifar10", train=True, data_dir=str(tmp_path))
    with pytest.raises(DataNotFoundError, match="does not exist"):
        build_dataset(f"folder:{tmp_path / 'x'}", train=True)
    with pytest.raises(UserError, match="unknown dataset"):
        build_dataset("imagenet", train=True)


def make_fake_cifar(root: Path, n_train=128, n_test=64):
    """A small stand-in in CIFAR's binary layout (what examples/cifar_standin.py writes)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from examples.cifar_standin import write

    write(root, n_train, n_test)


def test_cifar_code_path_on_stand_in(tmp_path, monkeypatch):
    make_fake_cifar(tmp_path / "data")
    args = parse_args(["--model", "lcnn_resnet20", "--dataset", "cifar10", "--data-dir", str(tmp_path / "data"),
                       "--epochs", "1", "--batch-size", "32", "--reg", "lcnn", "--no-progress",
                       "--output", str(tmp_path / "runs"), "--experiment", "c10"])
    summary = train(args)
    assert summary["input_size"] == [3, 32, 32] and summary["num_classes"] == 10
    assert np.isfinite(summary["history"][-1]["train_loss"])


@needs_fmnist
@pytest.mark.parametrize("reg,extra", [("none", ["--model", "lcnn_resnet20_softplus"]),
                                       ("lcnn", []),
                                       ("gradreg", ["--model", "lcnn_resnet20_softplus", "--gradreg", "exact"]),
                                       ("lcnn_gradreg", ["--gradreg", "fd", "--model-ema"])])
def test_short_runs_all_regs(tmp_path, reg, extra):
    args = parse_args(FAST + ["--model", "lcnn_resnet20", "--reg", reg, "--epochs", "1", "--output", str(tmp_path),
                              "--experiment", reg] + extra)
    summary = train(args)
    run = Path(summary["run_dir"])
    assert ({"last.pth", "model.safetensors", "summary.csv", "summary.json", "args.json"}
            <= {p.name for p in run.iterdir()})
    h = summary["history"][-1]
    assert np.isfinite(h["train_loss"]) and 0 <= summary["final"]["top1"] <= 100
    if "gradreg" in reg:
        assert h["train_grad_sq"] > 0
    if reg.startswith("lcnn"):
        assert h["train_sum_beta"] > 0 and h["train_sum_log_gamma"] > 0
    ckpt = load_checkpoint(run / "last.pth")
    assert ckpt["epoch"] == 1 and ckpt["arch"] == args.model
    if "--model-ema" in extra:
        assert ckpt["state_dict_ema"] is not None and "eval_ema_top1" in h


@needs_fmnist
def test_eval_every_zero_never_evaluates(tmp_path):
    """--eval-every 0 (what the quickstart uses, whose evaluation measures the test set once): no test
    pass, no model_best; the weights are still written for `lcnn-zoo eval`."""
    args = parse_args(FAST + ["--model", "lcnn_resnet20", "--reg", "none", "--epochs", "2", "--eval-every", "0",
                              "--output", str(tmp_path), "--experiment", "e0"])
    summary = train(args)
    run = Path(summary["run_dir"])
    assert summary["final"] == {} and not any("eval_top1" in row for row in summary["history"])
    assert (run / "model.safetensors").is_file() and not (run / "model_best.safetensors").exists()
    with pytest.raises(UserError):
        parse_args(["--eval-every", "-1"])


@needs_fmnist
def test_batchnorm_recalibrated_only_when_it_saw_few_batches(tmp_path, capsys, monkeypatch):
    """A short run from scratch gets its BatchNorm statistics recomputed at the end; a run starting
    from weights whose statistics saw many batches (fine-tuning a shipped tag) keeps them: in an LCNN
    they set the γ-clip the weights were trained with (recomputing them took a fine-tuned model from
    95 % to 48 %)."""
    calls = []
    real = training.recalibrate_batchnorm
    monkeypatch.setattr(training, "recalibrate_batchnorm", lambda m, b: calls.append(1) or real(m, b))
    train(parse_args(FAST + ["--model", "lcnn_resnet20", "--reg", "lcnn", "--epochs", "1",
                             "--output", str(tmp_path), "--experiment", "scratch"]))
    assert calls == [1] and "recalibrated BatchNorm statistics" in capsys.readouterr().err
    base = timm.create_model("lcnn_resnet20.fmnist", pretrained=True)
    assert training.batches_seen_by_batchnorm(base) >= training.RECALIBRATE_BELOW_STEPS
    save_file(base.state_dict(), str(tmp_path / "pre.safetensors"))
    train(parse_args(FAST + ["--model", "lcnn_resnet20", "--reg", "lcnn", "--epochs", "1", "--initial-checkpoint",
                             str(tmp_path / "pre.safetensors"), "--output", str(tmp_path), "--experiment", "ft"]))
    assert calls == [1] and "recalibrated BatchNorm statistics" not in capsys.readouterr().err
    # statistics recorded before lcnnify belong to another function: counted as unseen
    converted = lcnn_zoo.lcnnify(timm.create_model("lcnn_resnet20_softplus.fmnist", pretrained=True),
                                 input_size=(1, 28, 28))
    assert training.batches_seen_by_batchnorm(converted) == 0


def test_lcnn_reg_needs_lcnn_model(tmp_path):
    with pytest.raises(UserError, match="needs an LCNN"):
        train(parse_args(FAST + ["--model", "lcnn_resnet20_relu", "--reg", "lcnn", "--epochs", "1",
                                 "--output", str(tmp_path)]))


def _run_cli(args, env=None, **kw):
    return subprocess.Popen([sys.executable, "-m", "lcnn_zoo", "train"] + args, cwd=REPO,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


@needs_fmnist
def test_killed_run_resumes_to_identical_weights(tmp_path):
    common = FAST + ["--model", "lcnn_resnet20", "--reg", "lcnn_gradreg", "--epochs", "3", "--eval-every", "10",
                     "--output", str(tmp_path), "--threads", "1", "--train-subset", "512", "--drop-rate", "0.1"]
    ref = _run_cli(common + ["--experiment", "ref"])
    assert ref.wait(timeout=600) == 0, ref.stdout.read()
    # the same run, killed (SIGKILL) once its first epoch checkpoint exists, then resumed
    victim = _run_cli(common + ["--experiment", "victim"])
    ckpt = tmp_path / "victim" / "last.pth"
    deadline = time.time() + 600
    while not ckpt.exists() and victim.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert load_checkpoint(ckpt)["epoch"] < 3, "the run finished before it could be killed"
    resumed = _run_cli(common + ["--experiment", "victim", "--resume", "auto"])
    out = resumed.communicate(timeout=600)[0]
    assert resumed.returncode == 0, out
    assert "resumed" in out
    a = load_checkpoint(tmp_path / "ref" / "last.pth")["state_dict"]
    b = load_checkpoint(ckpt)["state_dict"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # The summary of the resumed run covers every epoch, like the uninterrupted one.
    summary = json.loads((tmp_path / "victim" / "summary.json").read_text())
    ref_summary = json.loads((tmp_path / "ref" / "summary.json").read_text())
    assert [h["epoch"] for h in summary["history"]] == [1, 2, 3]
    assert summary["history"][-1]["train_loss"] == ref_summary["history"][-1]["train_loss"]
    # Resuming a finished run changes nothing (a training pipeline can safely be re-run).
    before = {f: (tmp_path / "victim" / f).read_bytes() for f in ("summary.json", "model.safetensors", "last.pth")}
    again = _run_cli(common + ["--experiment", "victim", "--resume", "auto"])
    out = again.communicate(timeout=600)[0]
    assert again.returncode == 0 and "nothing to do" in out, out
    assert before == {f: (tmp_path / "victim" / f).read_bytes() for f in before}


@needs_fmnist
def test_ddp_gloo_two_processes(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533",
           "-m", "lcnn_zoo", "train"] + FAST + ["--model", "lcnn_resnet20", "--reg", "lcnn_gradreg", "--gradreg", "fd",
                                             "--epochs", "1", "--threads", "1", "--output", str(tmp_path),
                                             "--experiment", "ddp"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert np.isfinite(summary["history"][0]["train_loss"]) and summary["final"]["count"] == 256
    exact = subprocess.run(cmd[:-2] + ["--gradreg", "exact", "--experiment", "ddp2"], cwd=REPO, capture_output=True,
                           text=True, timeout=600)
    assert exact.returncode != 0 and "--gradreg fd" in exact.stdout + exact.stderr


@needs_fmnist
def test_amp_bf16_and_fp16_gradscaler(tmp_path):
    args = parse_args(FAST + ["--model", "lcnn_resnet20", "--reg", "lcnn_gradreg", "--gradreg", "fd", "--epochs", "1",
                              "--amp", "--amp-dtype", "bfloat16", "--output", str(tmp_path), "--experiment", "bf16"])
    assert np.isfinite(train(args)["history"][0]["train_loss"])
    # float16 autocast is emulated on CPU (23x slower, half the accuracy): refused before any work
    fp16 = parse_args(FAST + ["--model", "lcnn_resnet20", "--reg", "lcnn_gradreg", "--epochs", "1", "--amp",
                              "--amp-dtype", "float16", "--output", str(tmp_path), "--experiment", "fp16"])
    with pytest.raises(UserError, match="float16 needs a GPU"):
        train(fp16)
    assert not (tmp_path / "fp16" / "args.json").exists()


@needs_fmnist
def test_eval_outputs(tmp_path):

    train(parse_args(FAST + ["--model", "lcnn_resnet20", "--reg", "lcnn", "--epochs", "1", "--output", str(tmp_path),
                             "--experiment", "m"]))
    out = tmp_path / "eval"
    assert main(["eval", str(tmp_path / "m"), "--limit", "200", "--geom-samples", "8", "--pgd-samples", "16",
                 "--noise-samples", "4", "--hvp-iters", "3", "--pgd-steps", "2", "--output", str(out),
                 "--no-progress"]) == 0
    res = json.loads((out / "eval.json").read_text())["results"]["m"]
    assert set(res["pgd_l2"]) == {"0.05", "0.1", "0.15", "0.2"} and res["test_samples"] == 200
    assert res["curvature_mean"] > 0 and len(res["gradient_robustness"]["relative_change_mean"]) == 5
    assert (out / "gradient_robustness.png").stat().st_size > 1000
    assert "Table 2" in (out / "eval.md").read_text()
    # The recorded command is the whole command line (options included), so the tables can be regenerated.
    recorded = json.loads((out / "eval.json").read_text())["command"]
    assert recorded.startswith("lcnn-zoo eval ") and "--hvp-iters 3" in recorded and f"--output {out}" in recorded
    assert f"Command: `{recorded}`" in (out / "eval.md").read_text()


def test_cli_dispatches_train_options(capsys):

    with pytest.raises(SystemExit) as e:
        main(["train", "--help"])
    assert e.value.code == 0 and "--lambda-grad" in capsys.readouterr().out


@needs_fmnist
def test_finetune_on_image_folder(tmp_path):
    """Fine-tune a trained 10-class run on a new 3-class image folder (ImageFolder layout)."""

    base = train(parse_args(FAST + ["--model", "lcnn_resnet20", "--reg", "lcnn", "--epochs", "1",
                                    "--output", str(tmp_path), "--experiment", "base"]))
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in range(3):
            d = tmp_path / "folder" / split / f"class{c}"
            d.mkdir(parents=True)
            for i in range(24 if split == "train" else 6):
                img = (rng.random((20, 20)) * 80 + c * 80).astype(np.uint8)  # class = brightness
                Image.fromarray(img, mode="L").save(d / f"{i}.png")
    summary = train(parse_args(["--model", "lcnn_resnet20", "--reg", "lcnn",
                                "--dataset", f"folder:{tmp_path / 'folder'}",
                                "--input-size", "1", "28", "28", "--initial-checkpoint", base["run_dir"],
                                "--epochs", "2", "--batch-size", "16", "--lr", "0.01", "--no-progress",
                                "--output", str(tmp_path), "--experiment", "ft"]))
    assert summary["num_classes"] == 3 and summary["input_size"] == [1, 28, 28]
    ft = load_checkpoint(Path(summary["run_dir"]) / "last.pth")["state_dict"]
    src = load_checkpoint(Path(base["run_dir"]) / "last.pth")["state_dict"]
    assert ft["fc.weight"].shape[0] == 3
    assert not torch.equal(ft["stages.1.0.conv1.weight"], src["stages.1.0.conv1.weight"])  # trained further


@needs_fmnist
def test_a_run_ends_with_its_norms_converged(tmp_path):
    """One power iteration a step leaves σ approximate after high-lr steps (issue 20, case 8): the
    saved weights have every layer's singular vectors converged to the stated 1e-3."""
    from lcnn_zoo.commands.evaluation import load_model
    from lcnn_zoo.folding import stale_spectral_norms

    summary = train(parse_args(FAST + ["--model", "lcnn_resnet20", "--reg", "lcnn", "--epochs", "1", "--lr", "0.5",
                                       "--output", str(tmp_path), "--experiment", "hot"]))
    _, model = load_model(summary["run_dir"])
    assert stale_spectral_norms(model) == []


@needs_fmnist
def test_extending_a_finished_run_rebuilds_the_schedule_and_other_changes_are_refused(tmp_path, capsys):
    common = FAST + ["--train-subset", "128", "--test-subset", "128", "--model", "lcnn_resnet20", "--reg", "lcnn",
                     "--output", str(tmp_path), "--experiment", "ext"]
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


class _HostReads(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the reads of a tensor's value on the host (``Tensor.item``, ``float(t)``, ``int(t)``, and
    ``.tolist()``, which reads without dispatching: each a device sync on a GPU), outside the DataLoader
    (whose reads touch CPU tensors only)."""

    def __init__(self, monkeypatch):
        super().__init__()
        self.count = 0
        tolist = torch.Tensor.tolist

        def counted(t):
            self._read()
            return tolist(t)

        monkeypatch.setattr(torch.Tensor, "tolist", counted)

    def _read(self):
        import traceback
        if not any("torch/utils/data" in f.filename for f in traceback.extract_stack()):
            self.count += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default):
            self._read()
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("reg", [["--reg", "lcnn"], ["--reg", "lcnn_gradreg", "--gradreg", "fd"],
                                 ["--reg", "lcnn_gradreg", "--gradreg", "fd", "--gradreg-fraction", "0.5",
                                  "--model-ema"]])
def test_a_training_step_reads_nothing_on_the_host(reg, tmp_path, monkeypatch):
    """The sync-free step (issue 30): after warm-up, an epoch reads values on the host only at its end (the
    metrics, one read) and at each log interval — never per step — for every --reg the paper trains with."""
    g = torch.Generator().manual_seed(0)
    data = training.TrainData(
        lcnn_zoo.commands.data.TensorImageDataset(
            torch.randint(0, 256, (64, 1, 12, 12), dtype=torch.uint8, generator=g), torch.arange(64) % 4),
        lcnn_zoo.commands.data.TensorImageDataset(torch.zeros(8, 1, 12, 12, dtype=torch.uint8), torch.arange(8) % 4),
        (1, 12, 12), 4, ["a", "b", "c", "d"])
    counts = {}
    for interval in (1000, 3):
        cfg = parse_args(["--model", "lcnn_resnet20", "--batch-size", "8", "--epochs", "3", "--output", str(tmp_path),
                          "--log-interval", str(interval), "--threads", "2", *reg])
        run = training.build_run(cfg, data, torch.device("cpu"))
        training.train_one_epoch(run, 0)  # warm-up: the first step reads each BatchNorm's count once
        for steps in (4, 8):
            run.train_loader = training._loader(torch.utils.data.Subset(data.train, range(8 * steps)), 8, True, 0, 0,
                                                1, 0, drop_last=True)
            with monkeypatch.context() as patch, _HostReads(patch) as reads:
                training.train_one_epoch(run, 1)
            counts[interval, steps] = reads.count
    # One read at the end of an epoch; with a log interval of 3, one more per interval when lines are logged
    # (stderr is not a terminal under pytest), except at the last step.
    assert counts[1000, 4] == counts[1000, 8] == 1, counts
    assert (counts[3, 4], counts[3, 8]) == (2, 3), counts


def test_an_uncovered_lcnnify_model_needs_allow_uncovered_to_train():
    """--lcnnify of a model whose bound does not apply (ConvNeXt: LayerNorm, layer scale) is refused in one
    line before any file is written, unless --allow-uncovered (issue 32); a covered one trains as before."""
    common = ["--lcnnify", "--input-size", "3", "32", "32", "--reg", "lcnn"]
    with pytest.raises(UserError, match="--allow-uncovered") as err:
        training._build_model(parse_args(["--model", "convnext_atto", *common]), 10, (3, 32, 32))
    assert "\n" not in str(err.value)
    model = training._build_model(parse_args(["--model", "convnext_atto", "--allow-uncovered", *common]), 10,
                                  (3, 32, 32))
    assert not model.lcnn_report.ok
    assert training._build_model(parse_args(["--model", "resnet18", *common]), 10, (3, 32, 32)).lcnn_report.ok


def test_a_run_starts_by_saying_where_and_what_it_runs(tmp_path):
    """The first lines of `lcnn-zoo train` (issue 32): the run folder's whole path, the data, the model and
    whether its bound holds, optimizer and schedule, regulariser, device, batch and steps, AMP and compile."""
    data = training.TrainData(
        lcnn_zoo.commands.data.TensorImageDataset(torch.zeros(40, 1, 12, 12, dtype=torch.uint8), torch.arange(40) % 4),
        lcnn_zoo.commands.data.TensorImageDataset(torch.zeros(8, 1, 12, 12, dtype=torch.uint8), torch.arange(8) % 4),
        (1, 12, 12), 4, ["a", "b", "c", "d"])
    cfg = parse_args(["--model", "lcnn_resnet20", "--batch-size", "8", "--epochs", "3", "--reg", "lcnn_gradreg",
                      "--sched", "cosine", "--output", str(tmp_path)])
    run = training.build_run(cfg, data, torch.device("cpu"))
    text = training.startup_summary(run, RunFolder(tmp_path / "r"), 0)
    lines = text.splitlines()
    assert lines[0] == f"lcnn-zoo train: run folder {(tmp_path / 'r').resolve()}"
    assert "40 training / 8 test images, 4 classes, input 1×12×12" in lines[1]
    assert "lcnn_resnet20" in lines[2] and "the curvature bound holds" in lines[2]
    assert "sgd" in lines[3] and "cosine over 3 epochs" in lines[3]
    assert "GradReg fd" in lines[4] and "cpu, batch 8, 5 steps per epoch; AMP off; compile off" in lines[5]
    assert "resuming at epoch 2" in training.startup_summary(run, RunFolder(tmp_path / "r"), 2)


@needs_fmnist
def test_the_resume_hint_after_an_interrupt_can_be_pasted_whatever_the_path_holds(tmp_path, capsys, monkeypatch):
    """Issue 31, case 15: after SIGTERM or Ctrl-C the hint printed an --output holding spaces unquoted."""
    import shlex
    from types import SimpleNamespace

    from lcnn_zoo.commands.data import TensorImageDataset

    images = TensorImageDataset(torch.zeros(64, 1, 28, 28), torch.arange(64) % 10)
    monkeypatch.setattr(training, "_datasets",
                        lambda cfg, info=None: training.TrainData(images, images, (1, 28, 28), 10, []))
    monkeypatch.setattr(training, "build_run", lambda *a, **k: SimpleNamespace(is_main=True))

    def interrupted(run, plan, folder):
        raise KeyboardInterrupt  # SIGTERM is turned into this by the command line

    monkeypatch.setattr(training, "_train_in", interrupted)
    output = tmp_path / "my runs" / "Ben's"
    assert main(["train"] + FAST + ["--epochs", "1", "--output", str(output), "--experiment", "exp"]) == 130
    hint = capsys.readouterr().err.strip().splitlines()[-1]
    pasted = shlex.split(hint.split("continue with the same command and ", 1)[1])
    assert pasted == ["--output", str(output), "--experiment", "exp", "--resume", "auto"], hint


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_a_compiled_training_epoch_is_the_eager_epoch(tmp_path, mode):
    """`--compile` (timm's --torchcompile) and `--torchcompile-mode reduce-overhead` (inductor's CUDA
    graphs on a GPU; on the CPU the same compiled code): an epoch of LCNN + FD GradReg steps gives the
    weights the eager epoch gives. The step reads nothing on the host, which CUDA-graph capture needs
    (test_a_training_step_reads_nothing_on_the_host)."""
    torch.manual_seed(0)
    data = training.TrainData(
        lcnn_zoo.commands.data.TensorImageDataset(torch.randint(0, 255, (16, 1, 12, 12), dtype=torch.uint8),
                                                  torch.arange(16) % 4),
        lcnn_zoo.commands.data.TensorImageDataset(torch.zeros(4, 1, 12, 12, dtype=torch.uint8), torch.arange(4) % 4),
        (1, 12, 12), 4, ["a", "b", "c", "d"])
    states = []
    for compiled in (False, True):
        argv = ["--model", "lcnn_resnet20", "--batch-size", "8", "--epochs", "1", "--reg", "lcnn_gradreg",
                "--gradreg", "fd", "--seed", "1", "--no-progress", "--output", str(tmp_path / str(compiled))]
        cfg = parse_args(argv + (["--compile", "--torchcompile-mode", mode] if compiled else []))
        torch.manual_seed(1)  # the same initial weights (train() seeds before it builds the run)
        run = training.build_run(cfg, data, torch.device("cpu"))
        training.train_one_epoch(run, 0)
        states.append(run.core.state_dict())
    for (k, a), b in zip(states[0].items(), states[1].values()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=5e-5, msg=lambda m, k=k: f"{k}: {m}")
