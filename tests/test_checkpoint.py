"""lcnn_zoo.checkpoint: the run folder — its lock, its files (written whole, temporaries cleaned), and files that are damaged."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_helpers import FAST_LCNN_RUN, fails_with, needs_fmnist

from lcnn_zoo.checkpoint import RunFolder
from lcnn_zoo.errors import UserError
from lcnn_zoo.options import train_config
from lcnn_zoo.training import train

REPO = Path(__file__).resolve().parents[1]


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
