"""The ``lcnn-zoo`` command: process-level tuning (only there), and every way a user stops or
feeds it badly ends in one bounded line — Ctrl-C, a DataLoader worker's error, hostile YAML."""
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lcnn_zoo.commands.cli import keep_freed_memory
from lcnn_zoo.errors import MAX_MESSAGE, one_line

from cli_helpers import fails_with, needs_fmnist

REPO = Path(__file__).resolve().parents[2]


def test_keep_freed_memory_applies_only_where_asked(monkeypatch):
    monkeypatch.setenv("LCNN_ZOO_MALLOC", "system")
    assert keep_freed_memory() is False
    monkeypatch.delenv("LCNN_ZOO_MALLOC")
    assert keep_freed_memory() is (sys.platform == "linux")


@needs_fmnist
@pytest.mark.parametrize("signum", [signal.SIGINT, pytest.param(signal.SIGTERM, marks=pytest.mark.slow)])
def test_ctrl_c_is_one_line_saying_how_to_resume_and_the_resume_works(tmp_path, signum):
    argv = [sys.executable, "-m", "lcnn_zoo.commands.cli", "train", "--dataset", "fmnist", "--train-subset", "3000",
            "--test-subset", "64", "--batch-size", "64", "--epochs", "3", "--no-progress", "--output", str(tmp_path),
            "--experiment", "r"]
    proc = subprocess.Popen(argv, cwd=REPO, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not (tmp_path / "r" / "last.pth").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signum)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 130, err
    last = err.strip().splitlines()[-1]
    assert "Traceback" not in err and last.startswith("lcnn-zoo: interrupted: every file in"), err
    assert f"--output {tmp_path} --experiment r --resume auto" in last
    done = subprocess.run(argv + ["--resume", "auto"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "resumed" in done.stderr, done.stderr


def test_a_dataloader_workers_error_is_one_line(tmp_path, capsys):
    for split in ("train", "val"):
        for c in ("a", "b"):
            (tmp_path / "f" / split / c).mkdir(parents=True)
            for i in range(4):
                Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "f" / split / c / f"{i}.png")
    bad = tmp_path / "f" / "train" / "a" / "0.png"
    bad.write_bytes(bad.read_bytes()[:30])
    fails_with(capsys, ["train", "--dataset", f"folder:{tmp_path / 'f'}", "--input-size", "1", "8", "8",
                        "--batch-size", "2", "--epochs", "1", "--workers", "1", "--no-progress", "--output",
                        str(tmp_path / "runs")], "cannot read image", "0.png")


def test_a_billion_laughs_config_is_refused_at_once(tmp_path, capsys):
    levels = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i, name in enumerate("bcdefghij"):
        prev = "abcdefghij"[i]
        levels.append(f"{name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]")
    (tmp_path / "c.yaml").write_text("\n".join(levels) + "\nlr: *j\n")
    t0 = time.time()
    fails_with(capsys, ["train", "--config", str(tmp_path / "c.yaml")], "more than 20 aliases")
    # within the cap, a value of the wrong type is named in a bounded line (repr is never walked whole)
    (tmp_path / "e.yaml").write_text("decay_milestones: &x [" + ",".join(map(str, range(1, 5001))) + "]\n"
                                     "lr: [*x, *x, *x, *x, *x, *x]\n")
    err = fails_with(capsys, ["train", "--config", str(tmp_path / "e.yaml")], "lr must be a number")
    assert len(err) < 300 and time.time() - t0 < 30


def test_messages_are_bounded(capsys):
    err = fails_with(capsys, ["train", "--sched", "x" * 1_000_000])
    assert len(err) <= len("lcnn-zoo: error: ") + MAX_MESSAGE + 1
    wrapped = ("Caught UserError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
               '  File "x.py", line 1, in f\nlcnn_zoo.errors.UserError: cannot read image /d/0.png: broken\n')
    assert one_line(wrapped) == "cannot read image /d/0.png: broken"


def test_user_errors_are_one_line_in_a_real_process(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "lcnn_zoo", "train", "--dataset", f"folder:{tmp_path / 'none'}",
                           "--output", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith("lcnn-zoo: error: image folder") and proc.stderr.count("\n") == 1
