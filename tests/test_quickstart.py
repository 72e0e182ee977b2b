"""The README's main job, end to end on the real Fashion-MNIST data (slow: about 5 minutes on 2 cores)."""
import json
import subprocess
import sys

import pytest
from cli_helpers import needs_fmnist


@pytest.mark.slow
@needs_fmnist
def test_quickstart(tmp_path):
    out = tmp_path / "qs"
    proc = subprocess.run([sys.executable, "-m", "lcnn_zoo.cli", "quickstart", "--output", str(out), "--no-progress"],
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "eval.json").read_text())["results"]
    std, lcnn = results["standard"], results["lcnn_gradreg"]
    # The paper's three claims, on real data: similar accuracy, clearly lower curvature, higher PGD accuracy.
    assert lcnn["accuracy"] > std["accuracy"] - 2.0
    assert lcnn["curvature_mean"] * 5 < std["curvature_mean"]
    assert lcnn["hessian_norm_mean"] < std["hessian_norm_mean"]
    assert lcnn["pgd_l2"]["0.2"] > std["pgd_l2"]["0.2"] + 5.0
    assert (out / "gradient_robustness.png").is_file() and "Table 2" in (out / "eval.md").read_text()
    assert "curvature: LCNN+GradReg" in proc.stdout


def test_quickstart_recipe_parses():
    """The recipe the README documents (fast check; the run itself is the slow test above)."""
    from lcnn_zoo.options import train_config as parse_args
    from lcnn_zoo.quickstart import QUICKSTART_COMMON as _COMMON
    from lcnn_zoo.quickstart import QUICKSTART_RUNS

    lcnn = parse_args(_COMMON + QUICKSTART_RUNS["lcnn_gradreg"])
    assert lcnn.model == "lcnn_resnet20" and lcnn.model_kwargs == {"logit_scale": 4}
    assert (lcnn.lambda_beta, lcnn.lambda_gamma, lcnn.lambda_grad, lcnn.epochs) == (1e-3, 1e-3, 1e-2, 3)
    std = parse_args(_COMMON + QUICKSTART_RUNS["standard"])
    assert std.model == "lcnn_resnet20_softplus" and std.reg == "none" and std.model_kwargs == {}
