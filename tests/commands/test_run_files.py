"""lcnn_zoo.commands.run_files: every run file the package reads goes through one schema (issue 31, cases 11
and 16). A file that is valid JSON or a valid checkpoint but of the wrong shape, and a damaged
checkpoint, are one line naming the file and the field, and what to do (exit 2), before any data is
read or any model measured — never a traceback."""
import json

import pytest
import torch

from lcnn_zoo.commands import training

from cli_helpers import FAST_LCNN_RUN, fails_with, needs_fmnist
from model_helpers import run_folder


@pytest.fixture
def no_data_read(monkeypatch):
    def read(*a, **k):
        raise AssertionError("the data was read before the run file was checked")

    monkeypatch.setattr(training, "_datasets", read)
    monkeypatch.setattr("lcnn_zoo.commands.evaluation.build_dataset", read)


def _edit_json(name, edit):
    def apply(run):
        path = run / name
        data = json.loads(path.read_text())
        path.write_text(json.dumps(edit(data)))
    return apply


def _edit_checkpoint(**values):
    def apply(run):
        ckpt = torch.load(run / "last.pth", weights_only=True)
        ckpt.update(values)
        torch.save(ckpt, run / "last.pth")
    return apply


def _resume(run):
    return ["train"] + FAST_LCNN_RUN + ["--epochs", "2", "--output", str(run.parent), "--experiment", run.name,
                                        "--resume", "auto"]


def _eval(run):
    return ["eval", str(run), "--output", str(run.parent / "ev"), "--no-progress"]


def _eval_checkpoint(run):
    return ["eval", str(run / "last.pth"), "--output", str(run.parent / "ev"), "--no-progress"]


@needs_fmnist
@pytest.mark.parametrize("damage,command,fragment", [
    pytest.param(lambda run: (run / "args.json").write_text("[]"), _eval, "args.json holds a list, not a mapping",
                 id="args.json-list"),
    pytest.param(_edit_json("args.json", lambda d: {**d, "model_kwargs": [1]}), _eval,
                 "args.json: model_kwargs must be a mapping", id="args.json-model_kwargs"),
    pytest.param(_edit_json("args.json", lambda d: {k: v for k, v in d.items() if k != "model"}), _eval,
                 "args.json: 'model' is missing", id="args.json-no-model"),
    pytest.param(lambda run: (run / "summary.json").write_text("[]"), _resume,
                 "summary.json holds a list, not a mapping", id="summary.json-list-on-resume"),
    pytest.param(_edit_json("summary.json", lambda d: {**d, "num_classes": "ten"}), _eval,
                 "summary.json: num_classes must be an integer, got 'ten'", id="summary.json-num_classes"),
    pytest.param(_edit_json("summary.json", lambda d: {**d, "input_size": [1, "a", 28]}), _eval,
                 "summary.json: input_size must be an integer", id="summary.json-input_size"),
    pytest.param(_edit_json("summary.json", lambda d: {**d, "finished": "yes"}), _eval,
                 "summary.json: finished must be true or false", id="summary.json-finished"),
    pytest.param(_edit_json("summary.json", lambda d: {**d, "history": [{"epoch": "x"}]}), _eval,
                 "summary.json: history[0].epoch must be an integer", id="summary.json-history"),
    pytest.param(_edit_checkpoint(epoch="x"), _resume, "last.pth: epoch must be an integer, got 'x'",
                 id="last.pth-epoch"),
    pytest.param(_edit_checkpoint(config=[1, 2]), _resume, "last.pth: config must be a mapping",
                 id="last.pth-config"),
    pytest.param(_edit_checkpoint(config={"epochs": "ten"}), _resume, "last.pth (config): epochs must be an integer",
                 id="last.pth-config.epochs"),
    pytest.param(_edit_checkpoint(num_classes="ten"), _eval_checkpoint, "last.pth: num_classes must be an integer",
                 id="last.pth-num_classes"),
    pytest.param(_edit_checkpoint(best={"eval_top1": "high"}), _resume, "last.pth: best.eval_top1 must be a number",
                 id="last.pth-best"),
    pytest.param(_edit_checkpoint(rng={"torch": 1, "python": [], "numpy": []}), _resume,
                 "last.pth: rng.torch must be a tensor", id="last.pth-rng"),
    pytest.param(_edit_checkpoint(state_dict={"conv1.weight": "x"}), _resume,
                 "last.pth: state_dict must be a state dict", id="last.pth-state_dict"),
])
def test_a_run_file_of_the_wrong_shape_is_one_line_naming_the_file_and_the_field(tmp_path, capsys, no_data_read,
                                                                                damage, command, fragment):
    run = run_folder(tmp_path / "exp", argv=FAST_LCNN_RUN)
    damage(run)
    fails_with(capsys, command(run), fragment)
    assert not (tmp_path / "ev").exists()


@needs_fmnist
def test_a_checkpoint_whose_tensors_do_not_fit_the_model_is_one_line(tmp_path, capsys):
    run = run_folder(tmp_path / "exp", argv=FAST_LCNN_RUN)
    ckpt = torch.load(run / "last.pth", weights_only=True)
    ckpt["state_dict"]["conv1.weight"] = torch.zeros(2, 2)  # the right type, the wrong shape
    torch.save(ckpt, run / "last.pth")
    fails_with(capsys, _resume(run), "last.pth: 'state_dict' does not fit this run", "restore the file")


@needs_fmnist
@pytest.mark.parametrize("damage,fragments", [
    pytest.param(lambda data: data[: len(data) // 2], ["last.pth is truncated", "restore it from a copy"], id="half"),
    pytest.param(lambda data: data[:-100], ["last.pth is truncated"], id="tail"),
    pytest.param(lambda data: b"", ["last.pth is empty"], id="empty"),
    pytest.param(lambda data: b"hello world" * 10, ["is not a checkpoint torch can read"], id="not-a-checkpoint"),
])
def test_a_damaged_last_pth_says_what_happened_and_what_to_do(tmp_path, capsys, no_data_read, damage, fragments):
    run = run_folder(tmp_path / "exp", argv=FAST_LCNN_RUN)
    (run / "last.pth").write_bytes(damage((run / "last.pth").read_bytes()))
    for command in (_resume, _eval_checkpoint):
        err = fails_with(capsys, command(run), *fragments)
        assert "miniz" not in err and "PytorchStreamReader" not in err and "KeyError" not in err, err


@needs_fmnist
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_checkpoint_holding_weights_that_are_not_finite_is_not_resumed(tmp_path, capsys, value):
    """A run stops when its loss stops being finite, so NaN or inf in last.pth is damage: resuming
    would train on from it. Refused in one line naming the file and the tensor."""
    run = run_folder(tmp_path / "exp", argv=FAST_LCNN_RUN)
    ckpt = torch.load(run / "last.pth", weights_only=True)
    name = next(k for k, t in ckpt["state_dict"].items() if t.is_floating_point() and t.dim() == 4)
    ckpt["state_dict"][name].view(-1)[0] = value
    torch.save(ckpt, run / "last.pth")
    fails_with(capsys, _resume(run), "last.pth", f"tensor '{name}'", "these weights cannot be used")


@pytest.mark.parametrize("name", ["summary.json", "args.json"])
def test_json_nested_too_deeply_for_the_parser_is_one_line(tmp_path, capsys, no_data_read, name):
    """Hostile pass of issue 31, R10: a summary.json (or args.json) nested 50,000 levels deep was a
    `RecursionError` traceback from every reader of run files (eval, resume, push)."""
    run = tmp_path / "exp"
    run.mkdir()
    (run / "args.json").write_text(json.dumps({"model": "lcnn_resnet20"}))
    (run / name).write_text('{"a":' * 50_000 + "1" + "}" * 50_000)
    err = fails_with(capsys, _eval(run), f"{name} is not valid JSON", "nested too deeply")
    assert "RecursionError" not in err
    assert not (tmp_path / "ev").exists()


def test_a_run_file_that_is_a_fifo_or_a_device_is_named_and_never_opened(tmp_path):
    """Hostile pass of issue 31, I16b: a run file that exists but is not a regular file is said to be
    one (a FIFO is only looked at: opening it would wait for a writer forever)."""
    import os

    from lcnn_zoo.commands.run_files import CheckpointError, read_checkpoint, read_json

    fifo = tmp_path / "summary.json"
    os.mkfifo(fifo)
    with pytest.raises(CheckpointError, match=r"summary.json is not a regular file \(a named pipe \(FIFO\)\)"):
        read_json(fifo, "run summary")
    device = tmp_path / "last.pth"
    device.symlink_to("/dev/zero")
    with pytest.raises(CheckpointError, match=r"last.pth is not a regular file \(a character device\)"):
        read_checkpoint(device)
