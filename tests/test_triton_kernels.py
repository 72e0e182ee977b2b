"""lcnn_zoo.layers.triton_kernels: the centered softplus's Triton kernels against the unfused float64 formulas, run on CPU tensors under TRITON_INTERPRET=1 (as in CI), over β from 1e-4 to 1e4 and float64, float32 and bfloat16."""
import json
import math
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


LIMITS_SCRIPT = r"""
import json, math, sys, torch
from lcnn_zoo import CenteredSoftplus
from lcnn_zoo.layers import fused, triton_kernels as tk
out = []
for dtype in (torch.float32, torch.bfloat16, torch.float64):
    for beta in (1e-3, 0.37, 1e3):
        b = torch.tensor(beta, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
        for v in (-math.inf, math.inf, math.nan):
            x = torch.full((2,), v, dtype=dtype)
            y = tk.forward(x, b)
            gx, gb = tk.backward(torch.ones_like(y), y, b, True, fused.SERIES_BELOW)
            gx0, _ = tk.backward(torch.ones_like(y), y, b, False, fused.SERIES_BELOW)
            out.append(dict(what="kernel", dtype=str(dtype), beta=float(b), v=v, y=float(y[0]), gx=float(gx[0]),
                            gx0=float(gx0[0]), gb=float(gb) / 2))
# End to end through the module, its ops routed to the Triton kernels (LCNN_ZOO_TRITON_ON_CPU=1).
for v in (-math.inf, math.inf, math.nan):
    act = CenteredSoftplus(beta_init=0.37)
    x = torch.full((2, 3), v, requires_grad=True)
    y = act(x)
    y.sum().backward()
    beta = act.beta.item()
    out.append(dict(what="module", dtype=str(torch.float32), beta=beta, v=v, y=float(y[0, 0]),
                    gx=float(x.grad[0, 0]), gx0=float(x.grad[0, 0]), gb=float(act.log_beta.grad) / (6 * beta)))
json.dump(out, sys.stdout)
"""


def test_triton_kernels_at_infinities_and_nan():
    """Under the interpreter, whose min/max follow the GPU's (a NaN operand yields the other one): the
    forward gave NaN at x = −∞, the backward ∂s/∂x = 1 at y = NaN (so for x = NaN and −∞) and NaN for
    ∂s/∂β at y = +∞. Now the limits, as the CPU kernels: s(−∞) = −log(2)/β, ∂s/∂x = 0, 1, NaN at −∞, +∞,
    NaN, ∂s/∂β = log(2)/β² at ±∞ (tolerances: see test_fused._limits)."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", LCNN_ZOO_TRITON_ON_CPU="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", LIMITS_SCRIPT], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(proc.stdout)
    assert len(rows) == 3 * 3 * 3 + 3
    eps_of = {"torch.float32": 2.0 ** -23, "torch.bfloat16": 2.0 ** -7, "torch.float64": 2.0 ** -52}
    for r in rows:
        v, beta, eps = r["v"], r["beta"], eps_of[r["dtype"]]
        if math.isnan(v):
            assert all(math.isnan(r[k]) for k in ("y", "gx", "gx0", "gb")), r
            continue
        db = math.log(2) / beta ** 2
        assert abs(r["gb"] - db) <= 2 * eps * (1 - math.log(eps)) * db, r
        if v > 0:
            assert r["y"] == math.inf and r["gx"] == r["gx0"] == 1.0, r
        else:
            assert abs(r["y"] + math.log(2) / beta) <= eps * math.log(2) / beta, r
            assert abs(r["gx"]) <= eps and r["gx0"] == r["gx"], r
