"""The README's code runs as written: the "Three ways in" block and the 10-line example."""
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _block(heading: str) -> str:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split(heading, 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_three_ways_in_runs_as_written():
    code = _block("## Three ways in")
    assert "lcnn_resnet20.fmnist" in code and "torch.hub.load" in code and "lcnnify" in code
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "every operation is covered" in proc.stdout


def test_ten_line_example_runs():
    proc = subprocess.run([sys.executable, "examples/lcnnify_resnet.py"], cwd=REPO, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "every operation is covered" in proc.stdout
