"""The fused centered-softplus kernels (lcnn_zoo/layers/_kernels/fused.py, triton.py) against the
unfused formulas of activation.py evaluated in float64: values, ∂/∂x, the β-gradient reduction,
over β ∈ [1e-4, 1e4], contiguous and channels_last, float32, bfloat16 and float64. The Triton kernels
run on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1), in a subprocess."""
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch.autograd import gradgradcheck
from torch.utils._python_dispatch import TorchDispatchMode

from lcnn_zoo import CenteredSoftplus
from lcnn_zoo.layers import activation
from lcnn_zoo.layers._kernels import fused

ROOT = Path(__file__).resolve().parents[1]
BETAS = [1e-4, 1e-2, 1.0, 1e2, 1e4]
# Output rounding of each dtype, relative; the β-gradient is a sum over all elements (float32 accumulation).
TOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 1.6e-2}


def _reference(x: torch.Tensor, beta: float) -> torch.Tensor:
    """The unfused forward formula (activation.py), in float64, from the float64 input."""
    xd, b = x.double(), torch.tensor(beta, dtype=torch.float64)
    return activation._centered_softplus_t(xd * b) / b


def _inputs(dtype, beta, channels_last, seed=0):
    gen = torch.Generator().manual_seed(seed)
    # |βx| from 1e-6 to 1e4: the series region, the closed form and saturation all occur.
    scale = torch.logspace(-6, 4, 2 * 3 * 5 * 7, dtype=torch.float64).reshape(2, 3, 5, 7) / beta
    x = (torch.randn(2, 3, 5, 7, generator=gen, dtype=torch.float64) * scale).to(dtype)
    g = torch.randn(2, 3, 5, 7, generator=gen, dtype=torch.float64).to(dtype)
    if channels_last:
        x, g = x.to(memory_format=torch.channels_last), g.to(memory_format=torch.channels_last)
    return x, g


def _close(got, want, dtype, what):
    err = (got.double() - want).abs().max().item()
    bound = TOL[dtype] * (want.abs().max().item() + 1e-300) * 4
    assert err <= bound, f"{what}: {err:.3g} > {bound:.3g}"


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("beta", BETAS)
def test_cpu_kernels_match_unfused_formulas(beta, dtype, channels_last):
    x, g = _inputs(dtype, beta, channels_last)
    b = torch.tensor(beta, dtype=dtype if dtype != torch.bfloat16 else torch.float32)
    y = torch.ops.lcnn_zoo.centered_softplus_fwd(x, b)
    assert y.dtype == x.dtype and y.shape == x.shape
    assert y.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    _close(y, _reference(x, beta), dtype, "value")
    # The backward is taken at the kernel's own output (as autograd does).
    d_x, d_beta = activation._derivatives_from_output(y.double(), torch.tensor(beta, dtype=torch.float64))
    gd = g.double()
    gx, gb = torch.ops.lcnn_zoo.centered_softplus_bwd(g, y, b, True)
    assert gx.dtype == g.dtype and gb.shape == b.shape
    _close(gx, gd * d_x, dtype, "grad_x")
    err = abs(gb.double().item() - (gd * d_beta).sum().item())
    scale = (gd * d_beta).abs().sum().item()
    # In float32 the closed form t·σ(t) − u cancels just above the series threshold (|u| = 5e-3: ~1e-4
    # relative per term); the unfused float32 path has the same error.
    assert err <= (1e-12 if dtype == torch.float64 else 2e-3) * scale, (err, scale)
    gx0, gb0 = torch.ops.lcnn_zoo.centered_softplus_bwd(g, y, b, False)
    assert torch.equal(gx0, gx) and gb0.item() == 0.0


def test_module_uses_the_fused_ops_and_matches_the_formulas():
    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(str(func))
            return func(*args, **(kwargs or {}))

    act = CenteredSoftplus(beta_init=3.0).double()
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    with Ops() as ops:
        y = act(x)
        y.square().sum().backward()
    assert "lcnn_zoo.centered_softplus_fwd.default" in ops.names
    assert "lcnn_zoo.centered_softplus_bwd.default" in ops.names
    gx, gb = x.grad.clone(), act.log_beta.grad.clone()
    # The same through the unfused path.
    x.grad, act.log_beta.grad = None, None
    os.environ["LCNN_ZOO_FUSED"] = "0"
    try:
        with Ops() as ops:
            y2 = act(x)
            y2.square().sum().backward()
        assert not any(n.startswith("lcnn_zoo.") for n in ops.names)
    finally:
        del os.environ["LCNN_ZOO_FUSED"]
    torch.testing.assert_close(y, y2, rtol=1e-14, atol=1e-15)
    torch.testing.assert_close(x.grad, gx, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(act.log_beta.grad, gb, rtol=1e-12, atol=1e-15)


def test_double_backward_uses_the_differentiable_formulas():
    """create_graph backward (exact GradReg, Hessian-vector products) never calls the fused backward."""
    act = CenteredSoftplus(beta_init=2.0).double()
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    assert gradgradcheck(lambda t: act(t), (x,))
    y = act(x)
    (gx,) = torch.autograd.grad(y.sum(), x, create_graph=True)
    assert gx.grad_fn is not None  # a graph was recorded: the differentiable formulas ran
    (h,) = torch.autograd.grad(gx.sum(), x)
    beta = act.beta.detach()
    # s0''(x) = β σ(βx)(1 − σ(βx))
    s = torch.sigmoid(beta * x.detach())
    torch.testing.assert_close(h, beta * s * (1 - s))


def test_a_compile_failure_falls_back_with_one_warning(monkeypatch):
    def broken(name, *args):
        raise RuntimeError("no compiler")

    monkeypatch.setattr(fused, "_cpu_kernel", broken)
    monkeypatch.setattr(fused, "_disabled", {})
    x = torch.randn(4, 3, dtype=torch.float64)
    b = torch.tensor(1.5, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = torch.ops.lcnn_zoo.centered_softplus_fwd(x, b)
        y2 = CenteredSoftplus(1.5).double()(x)
    msgs = [str(w.message) for w in caught if "fused centered-softplus" in str(w.message)]
    assert len(msgs) == 1 and "unfused formulas" in msgs[0]
    torch.testing.assert_close(y, fused.forward_formula(x, b))
    torch.testing.assert_close(y2, y)
    assert not fused.fused_enabled(x)


def test_triton_path_is_routed_on_cpu_under_the_interpreter():
    """The custom ops take the Triton kernels when asked to (as on CUDA), end to end through a module."""
    pytest.importorskip("triton")
    script = ("import torch, lcnn_zoo; from lcnn_zoo.layers._kernels import fused; torch.manual_seed(0);"
              "a = lcnn_zoo.CenteredSoftplus(2.0).double();"
              "x = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True);"
              "called = []; orig = fused._triton_module;"
              "fused._triton_module = lambda: (called.append(1), orig())[1];"
              "a(x).pow(2).sum().backward(); g = x.grad.clone(); bg = a.log_beta.grad.clone();"
              "x.grad = None; a.log_beta.grad = None; import os; os.environ['LCNN_ZOO_FUSED'] = '0';"
              "a(x).pow(2).sum().backward();"
              "assert called and fused.kernel_path('cpu') == 'formulas';"  # the last call: LCNN_ZOO_FUSED=0
              "assert fused.fused_status()['cpu']['calls']['triton'] == 2;"
              "print(float((g - x.grad).abs().max()), float((bg - a.log_beta.grad).abs()))")
    env = dict(os.environ, TRITON_INTERPRET="1", LCNN_ZOO_TRITON_ON_CPU="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    dx, db = (float(v) for v in proc.stdout.split())
    assert dx <= 1e-13 and db <= 1e-12 * 10, (dx, db)
    assert math.isfinite(dx)


def test_every_dtype_and_inference_mode_gets_a_kernel_without_hitting_the_recompile_limit():
    """More input kinds than torch.compile's per-function recompile limit (8): each (dtype, inference)
    combination has a kernel of its own, and none falls back to the formulas."""
    before = dict(fused._disabled)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        for dtype in (torch.float32, torch.bfloat16, torch.float64, torch.float16):
            for beta_dtype in (torch.float32, torch.float64):
                for inference in (False, True):
                    with torch.inference_mode(inference):
                        x = torch.linspace(-3, 3, 50).to(dtype)
                        b = torch.tensor(2.0, dtype=beta_dtype)
                        y = torch.ops.lcnn_zoo.centered_softplus_fwd(x, b)
                        g = torch.ones_like(y)
                        torch.ops.lcnn_zoo.centered_softplus_bwd(g, y, b, True)
                    want = fused.forward_formula(x.double(), b.double())
                    assert (y.double() - want).abs().max() <= 2e-2
    assert fused._disabled == before


def test_a_failing_triton_kernel_falls_back_with_one_warning(monkeypatch):
    """A Triton compile or launch error (simulated: the module's kernels raise) gives one warning and
    the formulas' values, and turns the kernels off on that device for the rest of the process."""
    class Broken:
        @staticmethod
        def forward(*args):
            raise RuntimeError("ptxas failed")

        backward = forward

    monkeypatch.setattr(fused, "_triton_module", lambda: Broken())
    monkeypatch.setattr(fused, "_FORCE_TRITON_ON_CPU", True)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(fused, "_disabled", {})
    monkeypatch.setattr(fused, "_status", {})
    x = torch.randn(3, 4, dtype=torch.float64)
    b = torch.tensor(0.7, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = torch.ops.lcnn_zoo.centered_softplus_fwd(x, b)
        gx, gb = torch.ops.lcnn_zoo.centered_softplus_bwd(torch.ones_like(y), y, b, True)
    assert sum("Triton kernel failed" in str(w.message) for w in caught) == 1
    torch.testing.assert_close(y, fused.forward_formula(x, b))
    want_gx, want_gb = fused.backward_formula(torch.ones_like(y), y, b, True)
    torch.testing.assert_close(gx, want_gx)
    torch.testing.assert_close(gb, want_gb)
    # The fallback is recorded for the device, with the failure, for both calls.
    assert fused.kernel_path(x.device) == "formulas"
    status = fused.fused_status()
    assert status["cpu"]["calls"] == {"formulas": 2}, status
    assert status["cpu"]["reason"] == "the Triton kernel failed: RuntimeError: ptxas failed", status
    assert status["disabled"] == {"cpu": status["cpu"]["reason"]}
    assert not fused.fused_enabled(x)


def test_the_path_that_ran_is_recorded_per_device(monkeypatch):
    """kernel_path/fused_status: the CPU kernels as "cpu-inductor", the formulas with their reason
    (the opt-out, a size without a compiled variant), nothing for a device that ran nothing."""
    monkeypatch.setattr(fused, "_status", {})
    x = torch.randn(4, 5)
    b = torch.tensor(1.5)
    assert fused.kernel_path("cpu") is None
    y = torch.ops.lcnn_zoo.centered_softplus_fwd(x, b)
    torch.ops.lcnn_zoo.centered_softplus_bwd(torch.ones_like(y), y, b, True)
    assert fused.kernel_path(torch.device("cpu")) == "cpu-inductor"
    assert fused.fused_status()["cpu"] == {"path": "cpu-inductor", "reason": "", "calls": {"cpu-inductor": 2},
                                           "reasons": {}}
    torch.ops.lcnn_zoo.centered_softplus_fwd(x[:1, :1], b)
    assert fused.kernel_path("cpu") == "formulas"
    assert "fewer than 2 elements" in fused.fused_status()["cpu"]["reason"]
    monkeypatch.setenv("LCNN_ZOO_FUSED", "0")
    assert not fused.fused_enabled(x)  # the activation then runs the formulas: recorded here
    status = fused.fused_status()["cpu"]
    assert status["reason"] == "LCNN_ZOO_FUSED=0" and status["calls"] == {"cpu-inductor": 2, "formulas": 2}
    assert fused.kernel_path("cuda:1") is None
    fused.reset_fused_status()
    assert fused.kernel_path("cpu") is None and set(fused.fused_status()) == {"disabled"}


def test_gpu_benchmarks_fused_check_fails_when_the_formulas_ran(monkeypatch):
    """benchmarks/gpu.py's fused_check passes on the device's kernels and fails (so does the script)
    when a kernel failed and the formulas were measured in its place; the paths go into gpu.json."""
    pytest.importorskip("timm")
    from benchmarks import gpu

    monkeypatch.setattr(fused, "_status", {})
    ok = gpu.fused_check(torch.device("cpu"))
    assert ok["passed"] and ok["kernel_path"]["calls"] == {"cpu-inductor": 32}, ok["kernel_path"]

    def broken(name, *args):
        raise RuntimeError("no compiler")

    monkeypatch.setattr(fused, "_cpu_kernel", broken)
    monkeypatch.setattr(fused, "_disabled", {})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        bad = gpu.fused_check(torch.device("cpu"))
    assert not bad["passed"] and bad["kernel_path"]["path"] == "formulas", bad["kernel_path"]
    assert "inductor could not compile them: RuntimeError: no compiler" in bad["failure"], bad["failure"]


def test_the_first_cpu_kernel_adds_no_line_to_stderr():
    """Inductor's first C++ build imports torch.utils.cpp_extension, which on a CPU-only machine with
    a CUDA build of torch logs "No CUDA runtime is found" (a user of `lcnn-zoo` would see it under
    every command's one-line output); the fused op filters that record during that import only."""
    code = ("import logging, torch, lcnn_zoo\n"
            "x = torch.randn(64, requires_grad=True)\n"
            "lcnn_zoo.CenteredSoftplus()(x).sum().backward()\n"
            "assert not logging.getLogger('torch.utils.cpp_extension').filters\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "No CUDA runtime" not in r.stderr, r.stderr[-2000:]


def _limits(v, beta, dtype):
    """(s, ∂s/∂x, ∂s/∂β, tolerance of s and ∂s/∂x, relative tolerance of ∂s/∂β) at x = v: the limits at
    ±∞ (s(−∞) = −log(2)/β, ∂s/∂β → log(2)/β² at both ends), NaN at NaN. From the rounded output −log(2)/β
    the backward rebuilds σ(βx) ≤ eps, which adds ≤ eps to ∂s/∂x and σ·log 2σ ~ eps·|log eps| to ∂s/∂β."""
    eps = torch.finfo(dtype).eps
    s = {-math.inf: -math.log(2) / beta, math.inf: math.inf}.get(v, math.nan)
    dx = {-math.inf: 0.0, math.inf: 1.0}.get(v, math.nan)
    db = math.log(2) / beta ** 2 if math.isinf(v) else math.nan
    return s, dx, db, eps, 2 * eps * (1 - math.log(eps))


def _check_limits(v, beta, dtype, y, gx, gb, what):
    s, dx, db, eps, db_tol = _limits(v, beta, dtype)
    y, gx, gb = float(y), float(gx), float(gb)
    if math.isnan(v):
        assert math.isnan(y) and math.isnan(gx) and math.isnan(gb), (what, y, gx, gb)
        return
    assert y == s if math.isinf(s) else abs(y - s) <= eps * abs(s), (what, "value", y, s)
    assert abs(gx - dx) <= eps, (what, "grad_x", gx, dx)
    assert abs(gb - db) <= db_tol * db, (what, "grad_beta", gb, db)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("beta", [1e-3, 0.37, 1e3])
def test_cpu_kernels_and_formulas_at_infinities_and_nan(beta, dtype):
    """The compiled CPU kernels and the formulas they compile (the fallback, vmap's rule): the forward gave
    NaN at x = −∞ and the backward NaN for ∂s/∂β at y = +∞. Each value alone in its tensor (two elements,
    so that the compiled kernel serves it): a NaN anywhere makes the β-gradient sum NaN."""
    b = torch.tensor(beta, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    for v in (-math.inf, math.inf, math.nan):
        x = torch.full((2,), v, dtype=dtype)
        for what, fwd, bwd in (("kernel", torch.ops.lcnn_zoo.centered_softplus_fwd,
                                torch.ops.lcnn_zoo.centered_softplus_bwd),
                               ("formula", fused.forward_formula, fused.backward_formula)):
            y = fwd(x, b)
            gx, gb = bwd(torch.ones_like(y), y, b, True)
            _check_limits(v, float(b), dtype, y[0], gx[0], gb / 2, what)
            assert torch.equal(y[0], y[1]) or y.isnan().all()
            gx0, _ = bwd(torch.ones_like(y), y, b, False)  # the kernel without the β part
            assert torch.equal(gx0, gx) or (gx0.isnan().all() and gx.isnan().all()), (what, gx0, gx)


def test_the_module_at_infinities_and_nan_through_the_cpu_kernels():
    """End to end through CenteredSoftplus on its default path (the fused ops): values and both gradients."""
    for v in (-math.inf, math.inf, math.nan):
        act = CenteredSoftplus(beta_init=0.37)
        x = torch.full((2, 3), v, requires_grad=True)
        y = act(x)
        y.sum().backward()
        beta = act.beta.item()
        # log_beta's gradient is β·∂s/∂β summed over the 6 elements
        _check_limits(v, beta, torch.float32, y[0, 0], x.grad[0, 0], act.log_beta.grad / (6 * beta), "module")


def test_gpu_benchmarks_preflight_names_what_the_device_call_lacks(tmp_path, monkeypatch):
    """benchmarks/gpu.py checks the versions, the GPU and the carried Fashion-MNIST before any work: a
    device call without them would fail minutes in, after its time was spent."""
    from benchmarks import gpu

    assert gpu.preflight(str(tmp_path), dry=True) == []  # a dry run needs neither
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    problems = gpu.preflight(str(tmp_path), dry=False)
    assert len(problems) == 1 and "gpu.sh --prepare" in problems[0] and "t10k-labels-idx1-ubyte.gz" in problems[0]
    for name in gpu.FMNIST_FILES:
        (tmp_path / name).write_bytes(b"")
    assert gpu.preflight(str(tmp_path), dry=False) == []
    monkeypatch.setitem(gpu.MINIMUM_VERSIONS, "timm", "99.0")
    assert ["timm" in p and "older" in p for p in gpu.preflight(str(tmp_path), dry=False)] == [True]
