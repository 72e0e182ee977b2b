"""lcnn_zoo.commands.checkpoint: the run folder — its lock, its files (written whole, temporaries cleaned), and
files that are damaged."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lcnn_zoo.commands import training
from lcnn_zoo.commands.checkpoint import RunFolder
from lcnn_zoo.commands.options import train_config
from lcnn_zoo.commands.training import train
from lcnn_zoo.errors import UserError

from cli_helpers import FAST_LCNN_RUN, fails_with, needs_fmnist
from model_helpers import run_folder

REPO = Path(__file__).resolve().parents[2]


@needs_fmnist
def test_a_second_run_in_a_locked_folder_fails_at_once_naming_the_holder(tmp_path):
    folder = RunFolder(tmp_path / "exp")
    with folder.lock():  # a run that has not written its first file yet: --resume auto would continue it
        proc = subprocess.run([sys.executable, "-m", "lcnn_zoo", "train"] + FAST_LCNN_RUN +
                              ["--epochs", "1", "--output", str(tmp_path), "--experiment", "exp", "--resume", "auto"],
                              cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and f"pid {os.getpid()}" in proc.stderr and "in use" in proc.stderr, proc.stderr
    assert not (tmp_path / "exp" / "args.json").exists()


@needs_fmnist
def test_resume_regenerates_the_csv_and_cleans_only_its_own_temporaries(tmp_path):
    common = FAST_LCNN_RUN + ["--output", str(tmp_path), "--experiment", "r"]
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


@needs_fmnist
@pytest.mark.parametrize("finished", [True, False], ids=["finished", "stopped-after-an-epoch"])
def test_a_run_whose_last_pth_is_gone_is_never_trained_again_over_its_files(tmp_path, capsys, monkeypatch, finished):
    """Issue 31, case 1: a finished run whose last.pth was deleted (to save space, say) was taken for
    a run stopped before its first checkpoint, and `--resume auto` trained it again from scratch in
    place, replacing model.safetensors, model_best.safetensors and summary.json."""
    run = run_folder(tmp_path / "exp", epoch=1, epochs=1 if finished else 3, finished=finished, argv=FAST_LCNN_RUN)
    (run / "last.pth").unlink()
    _resume_auto_is_refused_and_changes_nothing(
        run, capsys, monkeypatch, "holds a finished run" if finished else "holds a run stopped after its first epochs",
        "no last.pth to continue from", "Restore last.pth", "leave out --resume")


def _resume_auto_is_refused_and_changes_nothing(run, capsys, monkeypatch, *fragments):
    """`train --resume auto` into ``run`` fails with ``fragments`` before any data is read, and every
    file of the folder is as it was."""
    before = {p.name: p.read_bytes() for p in run.iterdir()}

    def read(*a, **k):
        raise AssertionError("the data was read: the run would be trained again")

    monkeypatch.setattr(training, "_datasets", read)
    fails_with(capsys, ["train"] + FAST_LCNN_RUN + ["--epochs", "2", "--output", str(run.parent), "--experiment",
                        run.name, "--resume", "auto"], *fragments)
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before


@needs_fmnist
def test_a_finished_run_kept_to_its_best_weights_is_never_trained_again_over_them(tmp_path, capsys, monkeypatch):
    """Hostile pass of issue 31, I01b: a finished run reduced to args.json and model_best.safetensors
    (its best weights kept, the rest deleted) was taken for a run stopped before its first checkpoint:
    `--resume auto` trained it again in place and replaced model_best.safetensors. Refused before any
    data is read; nothing in the folder changes."""
    run = run_folder(tmp_path / "exp", epoch=1, epochs=1, argv=FAST_LCNN_RUN)
    for name in ("last.pth", "model.safetensors", "summary.json", "summary.csv"):
        (run / name).unlink()
    _resume_auto_is_refused_and_changes_nothing(
        run, capsys, monkeypatch, "holds a run that got past its first epoch (its model_best.safetensors",
        "no last.pth to continue from", "Restore last.pth", "leave out --resume to train again in a new folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp"]


def test_only_a_run_stopped_before_its_first_checkpoint_is_started_again_in_place(tmp_path):
    run = RunFolder(tmp_path / "exp")
    run.path.mkdir()
    run.write_args({"model": "lcnn_resnet20"})
    (run.path / ".lock").write_text("")
    (run.path / ".last.pth.tmp-lcnn-12345-ab12").write_bytes(b"half a checkpoint")
    assert run.unfinished_start()
    # best weights are written after an epoch: a finished run reduced to them says nothing of its epoch
    for name in (RunFolder.BEST, RunFolder.SUMMARY, RunFolder.CSV, RunFolder.WEIGHTS, "notes.txt"):
        (run.path / name).write_text("{}")
        assert not run.unfinished_start(), name
        (run.path / name).unlink()


def test_a_runs_state_comes_from_its_own_files(tmp_path):
    """What push and eval ask before using a run's weights (issue 31, case 2)."""
    done = RunFolder(run_folder(tmp_path / "done", epoch=2, epochs=2))
    assert done.state().finished and done.state().epoch == 2
    with done.lock():  # training again (extending it): its files still say finished
        state = done.state()
        assert not state.finished and state.status == "still training" and f"pid {os.getpid()}" in state.evidence
    assert done.state().finished  # the lock was only looked at, never taken or left held
    stopped = RunFolder(run_folder(tmp_path / "stopped", epoch=2, epochs=5, finished=False))
    assert stopped.state().describe() == "unfinished at epoch 2 of 5 (its summary.json says finished: false)"
    (stopped.path / "summary.json").unlink()  # an older run: only last.pth without model.safetensors tells
    assert stopped.state().describe() == "unfinished at epoch 2 of 5 (it holds last.pth but no model.safetensors)"
    with pytest.raises(UserError, match="pass --allow-unfinished"):
        stopped.require_finished("lcnn-zoo push")
    assert stopped.require_finished("lcnn-zoo push", allow_unfinished=True).epoch == 2


@needs_fmnist
@pytest.mark.parametrize("kind,fragment", [("fifo", "a named pipe (FIFO)"), ("device", "a character device")])
def test_a_last_pth_that_is_not_a_regular_file_is_said_so_and_never_opened(tmp_path, capsys, monkeypatch, kind,
                                                                            fragment):
    """Hostile pass of issue 31, I16b: a last.pth that is a FIFO (or a link to /dev/zero) was "a finished
    run but no last.pth" under --resume auto and "no such checkpoint" under --resume PATH."""
    run = tmp_path / "exp"
    run.mkdir()
    (run / "args.json").write_text(json.dumps({"model": "lcnn_resnet20"}))
    last = run / "last.pth"
    os.mkfifo(last) if kind == "fifo" else last.symlink_to("/dev/zero")

    def read(*a, **k):
        raise AssertionError("the data was read")

    monkeypatch.setattr(training, "_datasets", read)
    common = ["train"] + FAST_LCNN_RUN + ["--epochs", "2", "--output", str(tmp_path), "--experiment"]
    fails_with(capsys, common + ["exp", "--resume", "auto"], "last.pth is not a regular file", fragment,
               "leave out --resume")
    fails_with(capsys, common + ["other", "--resume", str(last)], "last.pth is not a regular file", fragment)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp"]
    assert sorted(p.name for p in run.iterdir()) == ["args.json", "last.pth"]
