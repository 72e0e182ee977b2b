"""lcnn_zoo.commands.evaluation and ``lcnn-zoo eval``: what is measured is what was named (no silent random
init, one entry per model), and the output folder is checked first and never overwritten."""
import json
import shutil
import time

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

from lcnn_zoo import hub
from lcnn_zoo.commands.cli import main
from lcnn_zoo.commands.options import train_config
from lcnn_zoo.commands.training import train

from cli_helpers import fails_with, files_under, needs_fmnist
from model_helpers import checkpoint, damaged

SMALL = ["--limit", "64", "--geom-samples", "4", "--pgd-samples", "8", "--noise-samples", "4", "--hvp-iters", "2",
         "--pgd-steps", "1", "--no-progress"]


@pytest.fixture
def no_measuring(monkeypatch):
    def measure(*a, **k):
        raise AssertionError("measured before the check failed")

    monkeypatch.setattr("lcnn_zoo.commands.evaluation.evaluate_model", measure)


@needs_fmnist
def test_an_architecture_without_a_tag_is_not_measured_as_if_trained(tmp_path, capsys, no_measuring):
    fails_with(capsys, ["eval", "lcnn_resnet20", "--output", str(tmp_path / "ev")] + SMALL,
               "names an architecture, not trained weights", "--random-init")
    assert files_under(tmp_path / "ev") == []


@needs_fmnist
def test_random_init_is_said_in_the_results(tmp_path):
    assert main(["eval", "lcnn_resnet20", "--random-init", "--output", str(tmp_path / "ev")] + SMALL) == 0
    assert list(json.loads((tmp_path / "ev" / "eval.json").read_text())["results"]) == ["lcnn_resnet20 (random init)"]


@needs_fmnist
def test_models_with_the_same_name_are_all_reported_and_a_second_eval_never_overwrites(tmp_path):
    common = ["--dataset", "fmnist", "--train-subset", "64", "--test-subset", "64", "--batch-size", "32", "--epochs",
              "1", "--no-progress", "--experiment", "exp"]
    a = train(train_config(common + ["--output", str(tmp_path / "a"), "--seed", "1"]))["run_dir"]
    b = train(train_config(common + ["--output", str(tmp_path / "b"), "--seed", "2"]))["run_dir"]
    out = tmp_path / "ev"
    assert main(["eval", a, b, a, "--output", str(out)] + SMALL) == 0
    results = json.loads((out / "eval.json").read_text())["results"]
    assert list(results) == [a, b, f"{a} (2)"]
    assert results[a]["accuracy"] == results[f"{a} (2)"]["accuracy"]
    first = (out / "eval.json").read_bytes()
    assert main(["eval", a, "--output", str(out)] + SMALL) == 0
    assert (out / "eval.json").read_bytes() == first and (tmp_path / "ev-1" / "eval.json").is_file()


def test_eval_output_is_checked_before_measuring(tmp_path, capsys, no_measuring, readonly_dir):
    (tmp_path / "afile").write_text("mine")
    fails_with(capsys, ["eval", "lcnn_resnet20.fmnist", "--output", str(tmp_path / "afile" / "x")] + SMALL,
               "is a file, not a folder")
    fails_with(capsys, ["eval", "lcnn_resnet20.fmnist", "--output", str(readonly_dir / "ev")] + SMALL,
               "is not writable")
    assert (tmp_path / "afile").read_text() == "mine"


def test_a_local_dir_without_safetensors_is_refused(tmp_path, capsys):
    model = timm.create_model("lcnn_resnet20_softplus.fmnist")
    timm.models.save_for_hf(model, str(tmp_path / "repo"), safe_serialization=False)
    assert (tmp_path / "repo" / "pytorch_model.bin").is_file()
    assert not (tmp_path / "repo" / "model.safetensors").exists()
    fails_with(capsys, ["eval", f"local-dir:{tmp_path / 'repo'}", "--output", str(tmp_path / "ev")] + SMALL,
               "holds no model.safetensors", "never a pickled pytorch_model.bin")
    timm.models.save_for_hf(model, str(tmp_path / "repo"), safe_serialization=True)  # with it, it loads
    from lcnn_zoo.commands.factory import create_model

    loaded = create_model(f"local-dir:{tmp_path / 'repo'}", pretrained=True)
    x = torch.rand(2, 1, 28, 28)
    assert torch.equal(loaded.eval()(x), model.eval()(x))


def test_a_file_that_is_not_a_checkpoint_is_named(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("hello")
    fails_with(capsys, ["eval", str(tmp_path / "notes.txt"), "--output", str(tmp_path / "ev")] + SMALL,
               "is a file but not a checkpoint")
    fails_with(capsys, ["eval", "some/where", "--output", str(tmp_path / "ev")] + SMALL,
               "is neither a model name nor a checkpoint")


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


@needs_fmnist
def test_eval_of_a_run_that_has_not_finished_is_refused_unless_asked(tmp_path, capsys, monkeypatch):
    """Issue 31, case 2: `eval` of a run folder still training measured its mid-run last.pth under the
    run's name. Now refused; with --allow-unfinished the name and the results say which epoch."""
    from lcnn_zoo.commands.checkpoint import RunFolder
    from lcnn_zoo.commands.evaluation import run_eval

    from model_helpers import run_folder

    done = run_folder(tmp_path / "done", epoch=2, epochs=2)
    stopped = run_folder(tmp_path / "stopped", epoch=2, epochs=5, finished=False)
    monkeypatch.setattr("lcnn_zoo.commands.evaluation.evaluate_model", lambda *a, **k: {"accuracy": 0.0})
    with RunFolder(done).lock():
        fails_with(capsys, ["eval", str(done), "--output", str(tmp_path / "ev")] + SMALL, "is still training",
                   "pass --allow-unfinished")
    fails_with(capsys, ["eval", str(stopped), "--output", str(tmp_path / "ev")] + SMALL,
               "is unfinished at epoch 2 of 5", "pass --allow-unfinished")
    fails_with(capsys, ["eval", str(stopped / "last.pth"), "--output", str(tmp_path / "ev")] + SMALL, "is unfinished")
    assert not (tmp_path / "ev").exists()
    results = run_eval([str(stopped)], "fmnist", allow_unfinished=True)
    assert results["stopped (unfinished: epoch 2 of 5)"]["unfinished_run"] == {"epoch": 2, "epochs": 5,
                                                                              "status": "unfinished"}


# The softplus baseline: built in a moment (an LCNN's conversion takes seconds) and holding the same
# kinds of tensors (BatchNorm statistics, log_beta, the logit scale); the check does not depend on the flavour.
ARCH = "lcnn_resnet20_softplus"
SHIPPED = hub.WEIGHTS_DIR / f"{ARCH}.fmnist.safetensors"


def _as(form: str, state, folder):
    """``state`` written as ``eval`` reads it: a .safetensors file, a training checkpoint, a run folder."""
    folder.mkdir()
    if form == "safetensors":
        save_file(state, str(folder / "w.safetensors"))
        return folder / "w.safetensors", "w.safetensors"
    if form == "pth":
        torch.save({"state_dict": state, "optimizer": {}, "epoch": 1, "arch": ARCH,
                    "input_size": [1, 28, 28], "num_classes": 10}, folder / "last.pth")
        return folder / "last.pth", "last.pth"
    (folder / "args.json").write_text(json.dumps({"model": ARCH, "input_size": [1, 28, 28],
                                                  "num_classes": 10}))
    save_file(state, str(folder / "model.safetensors"))
    return folder, "model.safetensors"


# Every case of DAMAGES is checked in test_weight_checks.py; here each way eval reads weights meets one.
@pytest.mark.parametrize("form,case", [("safetensors", "nan"), ("safetensors", "i32"), ("pth", "running_var"),
                                       ("run", "log_beta")])
def test_weights_wrong_in_content_are_refused_before_measuring(tmp_path, capsys, no_measuring, form, case):
    """Issue 31, cases 3 and 10: valid files holding NaN/inf weights, a float tensor relabelled I32 (a
    load would cast its bit patterns to float), a NaN γ or β, a negative running variance were measured
    (accuracy 6.25 next to nan geometry) and the plot then failed, leaving the folder without its figure.
    Now one line names the file and the tensor, before any measurement, and nothing is written."""
    state, name = damaged(load_file(SHIPPED), case)
    spec, file_name = _as(form, state, tmp_path / "in")
    out = tmp_path / "ev"
    fails_with(capsys, ["eval", str(spec), "--arch", ARCH, "--output", str(out)] + SMALL,
               file_name, f"tensor '{name}'", "cannot be used")
    assert files_under(out) == []


@pytest.mark.parametrize("edit,fragments", [
    (lambda st: st.pop("fc.bias"), ["missing keys 'fc.bias'"]),
    (lambda st: st.update(evil=torch.zeros(1)), ["unexpected keys 'evil'"]),
])
def test_weights_of_another_architecture_name_their_keys(tmp_path, capsys, no_measuring, edit, fragments):
    """Hostile pass, W6: the message stopped at torch's first line, "Error(s) in loading state_dict for
    CifarResNet:", without a key; now it names the first missing and unexpected keys."""
    state = load_file(SHIPPED)
    edit(state)
    save_file(state, str(tmp_path / "w.safetensors"))
    out = tmp_path / "ev"
    fails_with(capsys, ["eval", str(tmp_path / "w.safetensors"), "--arch", ARCH, "--output", str(out)] + SMALL,
               "w.safetensors", "weights are for another architecture", *fragments)
    assert files_under(out) == []


@pytest.mark.parametrize("size,batch,fragment", [
    (["1", "30000", "30000"], "128", "one batch of 128 images (--batch-size) needs at least"),
    (["1", "3000", "3000"], "1", "fmnist is resized in memory, a whole split at once"),
])
def test_an_input_size_that_cannot_fit_is_refused_before_any_model_or_data(tmp_path, capsys, monkeypatch, size, batch,
                                                                           fragment):
    """Hostile pass, E5: eval --input-size 1 30000 30000 had no memory preflight: a traceback from
    lcnnify's forward pass (57.6 GB); at 1×3000×3000 the whole test and training splits were resized."""
    def nothing(*a, **k):
        raise AssertionError("a model or the data was loaded before the memory check")

    monkeypatch.setattr("lcnn_zoo.commands.evaluation.load_model", nothing)
    monkeypatch.setattr("lcnn_zoo.commands.evaluation.build_dataset", nothing)
    monkeypatch.setattr("lcnn_zoo.commands.preflight._memory_of", lambda device: (16 << 30, "this machine"))
    out = tmp_path / "ev"
    fails_with(capsys, ["eval", "lcnn_resnet20.fmnist", "--input-size", *size, "--batch-size", batch,
                        "--output", str(out)] + SMALL, f"--input-size {' '.join(size)}: {fragment}")
    assert files_under(out) == []


@needs_fmnist
def test_a_model_whose_outputs_are_not_finite_is_not_measured(tmp_path, capsys, no_measuring):
    """Issue 31, case 3: finite weights can still overflow (here the logit scale): the first test batch
    is run before any measurement and its non-finite logits refuse the model in one line."""
    state = load_file(SHIPPED)
    state["logit_scale"] = torch.tensor(torch.finfo(torch.float32).max)
    save_file(state, str(tmp_path / "big.safetensors"))
    out = tmp_path / "ev"
    fails_with(capsys, ["eval", str(tmp_path / "big.safetensors"), "--arch", ARCH, "--output", str(out)]
               + SMALL, "big.safetensors", "outputs that are not finite")
    assert files_under(out) == []


@needs_fmnist
def test_a_model_whose_loss_gradients_are_not_finite_is_not_measured(tmp_path, capsys, no_measuring):
    """Hostile pass, W1: logit_scale = 1e30 keeps the logits finite (~1e31) but ‖∇ₓℓ‖ overflows: eval
    exited 0 with "inf ± nan", an empty plot and an eval.json of bare NaN/Infinity. Now the first test
    batch's loss and input gradient are checked before any measurement."""
    state = load_file(SHIPPED)
    state["logit_scale"] = torch.tensor(1e30)
    save_file(state, str(tmp_path / "huge.safetensors"))
    out = tmp_path / "ev"
    fails_with(capsys, ["eval", str(tmp_path / "huge.safetensors"), "--arch", ARCH, "--output", str(out)]
               + SMALL, "huge.safetensors", "its input-gradient norm is not finite")
    assert files_under(out) == []


def test_results_that_are_not_finite_are_not_written_as_invalid_json(tmp_path):
    """Hostile pass, W1: eval.json held the bare tokens NaN and Infinity (not JSON); a non-finite result
    is now a one-line error naming it, and nothing is written."""
    from lcnn_zoo.commands.config import EvalConfig
    from lcnn_zoo.commands.evaluation import write_report
    from lcnn_zoo.errors import UserError

    results = {"m": {"accuracy": 10.0, "grad_norm_mean": float("inf"), "pgd_l2": {"0.1": float("nan")}}}
    with pytest.raises(UserError, match="the measurement 'm.grad_norm_mean' is inf"):
        write_report(results, tmp_path, cfg=EvalConfig())
    assert files_under(tmp_path) == []
    from lcnn_zoo.commands.writing import write_json

    with pytest.raises(ValueError):
        write_json(tmp_path / "x.json", results, allow_nan=False)


def test_evaluate_model_refuses_logits_that_are_not_finite():
    """Issue 31, case 3, through the API: the accuracy (the first measurement) refuses NaN logits
    instead of reporting the argmax of NaN as an accuracy."""
    from torch import nn
    from torch.utils.data import TensorDataset

    from lcnn_zoo.commands.config import EvalConfig
    from lcnn_zoo.commands.evaluation import evaluate_model
    from lcnn_zoo.weight_checks import WeightsError

    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    with torch.no_grad():
        model[1].weight[0, 0] = float("nan")
    ds = TensorDataset(torch.rand(8, 1, 4, 4), torch.randint(0, 3, (8,)))
    cfg = EvalConfig(limit=8, geom_samples=2, pgd_samples=2, noise_samples=2, hvp_iters=1, pgd_steps=1, progress=False)
    with pytest.raises(WeightsError, match="the model computes logits that are not finite on 8 of 8 test images"):
        evaluate_model(model, ds, ds, cfg)


def test_eval_of_any_file_of_a_run_that_has_not_finished_is_refused_unless_asked(tmp_path, capsys, monkeypatch):
    """Hostile pass of issue 31, I02d: `eval <run>/model_best.safetensors --arch …` of a run still
    training measured it as "model_best", eval.json silent; only the folder and its last.pth were refused."""
    from lcnn_zoo.commands.checkpoint import RunFolder
    from lcnn_zoo.commands.evaluation import run_eval

    from model_helpers import run_folder

    done = run_folder(tmp_path / "done", epoch=2, epochs=2)
    stopped = run_folder(tmp_path / "stopped", epoch=2, epochs=5, finished=False)
    monkeypatch.setattr("lcnn_zoo.commands.evaluation.evaluate_model", lambda *a, **k: {"accuracy": 0.0})
    arch = ["--arch", "lcnn_resnet20"]
    with RunFolder(done).lock():
        fails_with(capsys, ["eval", str(done / "model_best.safetensors"), "--output", str(tmp_path / "ev")] + arch
                   + SMALL, "is still training", "pass --allow-unfinished")
    fails_with(capsys, ["eval", str(stopped / "model_best.safetensors"), "--output", str(tmp_path / "ev")] + arch
               + SMALL, "is unfinished at epoch 2 of 5", "pass --allow-unfinished")
    assert not (tmp_path / "ev").exists()
    results = run_eval([str(stopped / "model_best.safetensors")], "fmnist", arch="lcnn_resnet20", allow_unfinished=True)
    assert results["model_best (unfinished: epoch 2 of 5)"]["unfinished_run"]["status"] == "unfinished"
