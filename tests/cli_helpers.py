"""Helpers for tests of the command line: a user error is one line on stderr and exit code 2."""
from pathlib import Path

from lcnn_zoo.cli import main


def fails_with(capsys, argv, *fragments):
    """The command exits with code 2 and one line on stderr holding every fragment (no traceback)."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1, err
    for f in fragments:
        assert f in err, err
    return err


def files_under(path: Path):
    """Every file and folder below ``path`` (relative names), for asserting that nothing was written."""
    path = Path(path)
    return sorted(str(p.relative_to(path)) for p in path.rglob("*")) if path.exists() else []
