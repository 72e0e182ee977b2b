"""The README's main job, end to end on the real Fashion-MNIST data (slow: about 5 minutes on 2 cores)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from lcnn_zoo.data import FMNIST_SYSTEM_DIR


@pytest.mark.slow
@pytest.mark.skipif(not FMNIST_SYSTEM_DIR.is_dir(), reason="apt-get install dataset-fashion-mnist")
def test_quickstart(tmp_path):
    out = tmp_path / "qs"
    proc = subprocess.run([sys.executable, "-m", "lcnn_zoo.cli", "quickstart", "--output", str(out), "--no-progress"],
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "eval.json").read_text())["results"]
    std, lcnn = results["standard"], results["lcnn_gradreg"]
    assert lcnn["curvature_mean"] * 5 < std["curvature_mean"]  # clearly lower curvature
    assert lcnn["hessian_norm_mean"] < std["hessian_norm_mean"]
    assert (out / "gradient_robustness.png").is_file() and "Table 2" in (out / "eval.md").read_text()
    assert "curvature: LCNN+GradReg" in proc.stdout
