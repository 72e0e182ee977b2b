"""Helpers for tests of the command line: a user error is one line on stderr and exit code 2; the
Fashion-MNIST marker; the arguments of a short real LCNN training run."""
from pathlib import Path

import pytest

from lcnn_zoo.commands.cli import main
from lcnn_zoo.commands.data import FMNIST_SYSTEM_DIR

needs_fmnist = pytest.mark.skipif(not FMNIST_SYSTEM_DIR.is_dir(), reason="apt-get install dataset-fashion-mnist")

# `lcnn-zoo train` arguments of a short LCNN run on the real data (add --epochs, --output, --experiment).
FAST_LCNN_RUN = ["--dataset", "fmnist", "--train-subset", "128", "--test-subset", "128", "--batch-size", "64",
                 "--lr", "0.05", "--sched", "cosine", "--aug-pad", "2", "--no-progress", "--seed", "3",
                 "--model", "lcnn_resnet20", "--reg", "lcnn"]


def fails_with(capsys, argv, *fragments):
    """The command exits with code 2 and one line on stderr holding every fragment (no traceback)."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    if err.startswith("lcnn-zoo train: "):  # a run that started prints its summary (6 lines) before the error
        err = "".join(err.splitlines(keepends=True)[6:])
    assert "Traceback" not in err and err.count("\n") == 1, err
    for f in fragments:
        assert f in err, err
    return err


def files_under(path: Path):
    """Every file and folder below ``path`` (relative names), for asserting that nothing was written."""
    path = Path(path)
    return sorted(str(p.relative_to(path)) for p in path.rglob("*")) if path.exists() else []
