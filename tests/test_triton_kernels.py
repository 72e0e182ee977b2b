"""lcnn_zoo.layers.triton_kernels: the centered softplus's Triton kernels against the unfused float64 formulas, run on CPU tensors under TRITON_INTERPRET=1 (as in CI), over β from 1e-4 to 1e4 and float64, float32 and bfloat16."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TRITON_SCRIPT = r"""
import json, sys, torch
from lcnn_zoo.layers import activation, fused, triton_kernels as tk
out = []
for dtype in (torch.float32, torch.bfloat16, torch.float64):
    for beta in (1e-4, 1e-2, 1.0, 1e2, 1e4):
        gen = torch.Generator().manual_seed(1)
        scale = torch.logspace(-6, 4, 2000, dtype=torch.float64) / beta
        x = (torch.randn(2000, generator=gen, dtype=torch.float64) * scale).to(dtype)
        g = torch.randn(2000, generator=gen, dtype=torch.float64).to(dtype)
        b = torch.tensor(beta, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
        bd = torch.tensor(beta, dtype=torch.float64)
        y = tk.forward(x, b)
        y_ref = activation._centered_softplus_t(x.double() * bd) / bd
        gx, gb = tk.backward(g, y, b, True, fused.SERIES_BELOW)
        dx, db = activation._derivatives_from_output(y.double(), bd)
        gd = g.double()
        out.append(dict(dtype=str(dtype), beta=beta,
                        value=float((y.double() - y_ref).abs().max() / y_ref.abs().max()),
                        grad_x=float((gx.double() - gd * dx).abs().max() / (gd * dx).abs().max()),
                        grad_beta=abs(float(gb) - float((gd * db).sum())) / float((gd * db).abs().sum())))
json.dump(out, sys.stdout)
"""


def test_triton_kernels_under_the_interpreter():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", TRITON_SCRIPT], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(proc.stdout)
    assert len(rows) == 15
    for r in rows:
        tol = {"torch.float64": 1e-12, "torch.float32": 2e-6, "torch.bfloat16": 1.6e-2}[r["dtype"]]
        gb_tol = 1e-12 if r["dtype"] == "torch.float64" else 2e-3  # see test_cpu_kernels_match_unfused_formulas
        assert r["value"] <= 4 * tol and r["grad_x"] <= 4 * tol and r["grad_beta"] <= gb_tol, r
