"""lcnn_zoo.layers._kernels.triton: the centered softplus's Triton kernels against the unfused float64 formulas,
run on CPU tensors under TRITON_INTERPRET=1 (as in CI), over β from 1e-4 to 1e4 and float64, float32 and
bfloat16; the device guard around every launch; the launch counts of the CUDA path, pinned against the
launches counted under the interpreter; the ahead-of-time compilation for sm_80/sm_90 (benchmarks/triton_aot.py)."""
import contextlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TRITON_SCRIPT = r"""
import json, sys, torch
from lcnn_zoo.layers import activation
from lcnn_zoo.layers._kernels import fused, triton as tk
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
from lcnn_zoo.layers._kernels import fused, triton as tk
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


def test_device_guard_is_built_from_the_tensors_device():
    """Triton launches on the current CUDA device; the guard makes it the tensors' (cuda:1 here), and
    is nothing for CPU tensors (the interpreter). Built, not entered: entering needs a GPU."""
    pytest.importorskip("triton")
    from lcnn_zoo.layers._kernels import triton as tk

    guard = tk.device_guard(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert isinstance(tk.device_guard(torch.device("cpu")), contextlib.nullcontext)


def test_every_launch_runs_inside_a_guard_of_the_tensors_own_device(monkeypatch):
    """forward and backward on (fake) cuda:1 tensors: each kernel launch happens inside the guard of
    cuda:1, entered before and left after it. FakeTensorMode makes CUDA tensors without a GPU; the
    kernels and the guard are replaced by recorders (nothing is launched)."""
    pytest.importorskip("triton")
    from torch._subclasses.fake_tensor import FakeTensorMode

    from lcnn_zoo.layers._kernels import fused
    from lcnn_zoo.layers._kernels import triton as tk

    events = []

    class Kernel:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *args, **kwargs: events.append(("launch", self.name, args[0].device))

    @contextlib.contextmanager
    def guard(device):
        events.append(("enter", device))
        yield
        events.append(("exit", device))

    monkeypatch.setattr(tk, "device_guard", guard)
    monkeypatch.setattr(tk, "_fwd_kernel", Kernel("fwd"))
    monkeypatch.setattr(tk, "_bwd_kernel", Kernel("bwd"))
    dev = torch.device("cuda", 1)
    with FakeTensorMode():
        x = torch.empty(5000, device=dev)
        beta = torch.empty((), device=dev)
        y = tk.forward(x, beta)
        for need_beta in (True, False):
            tk.backward(torch.empty_like(y), y, beta, need_beta, fused.SERIES_BELOW)
    assert events == [("enter", dev), ("launch", "fwd", dev), ("exit", dev)] + \
        [("enter", dev), ("launch", "bwd", dev), ("exit", dev)] * 2, events


COUNT_SCRIPT = r"""
import json, sys, torch
from torch.utils._python_dispatch import TorchDispatchMode
from lcnn_zoo.layers._kernels import fused, triton as tk

# Ops that allocate or re-view memory: no kernel on CUDA. Every other op is one launch.
FREE = {"aten.empty.memory_format", "aten.empty_like.default", "aten.view.default", "aten.slice.Tensor",
        "aten.permute.default", "aten._unsafe_view.default", "aten.alias.default", "aten.detach.default",
        "aten.expand.default", "aten.as_strided.default", "aten.new_empty.default"}


class Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.kernels, self.ops, self.paused = 0, [], False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.paused and str(func) not in FREE:
            self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


mode = None
launch = tk._launch


def counting_launch(plan, device):  # every kernel launch goes through tk._launch
    mode.kernels += 1
    mode.paused = True  # the interpreter's own tensor traffic is not the launch's
    try:
        launch(plan, device)
    finally:
        mode.paused = False


tk._launch = counting_launch


def counted(fn, *args):
    global mode
    mode = Count()
    with mode:
        out = fn(*args)
    return out, mode.kernels + len(mode.ops)


def make(shape, dtype, layout, gen):
    x = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    return x.transpose(1, 2) if layout == "strided" else x


rows = []
gen = torch.Generator().manual_seed(0)
for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
    for beta_dtype in sorted({torch.float32, dtype}, key=str):
        for layout in ("contiguous", "channels_last", "strided"):
            for shape in ((2, 3, 5, 7), (1, 1, 1, 1), (0, 3, 5, 7)):
                x = make(shape, dtype, layout, gen)
                b = torch.tensor(0.7, dtype=beta_dtype)
                y, n_fwd = counted(fused._fwd_impl, x, b)  # the custom op's body
                for need_beta in (False, True):
                    for grad_layout in dict.fromkeys((layout, "contiguous")):  # as y, and contiguous
                        g = make(shape if grad_layout == layout else tuple(y.shape), dtype, grad_layout, gen)
                        (_, gb), n_bwd = counted(fused._bwd_impl, g, y, b, need_beta)
                        rows.append(dict(case=f"{dtype} beta {beta_dtype} {layout} grad {grad_layout} {list(shape)} "
                                              f"need_beta={need_beta}", fwd=n_fwd, bwd=n_bwd,
                                         gb=float(gb), gb_dtype=str(gb.dtype),
                                         fwd_want=fused.cuda_launches("fwd", x, b),
                                         bwd_want=fused.cuda_launches("bwd", g, y, b, need_beta)))
path = fused.kernel_path("cpu")
# Over _CHUNK elements: one launch per chunk, the same values as one launch.
x, g, b = torch.randn(5000, generator=gen), torch.randn(5000, generator=gen), torch.tensor(1.3)
y1 = tk.forward(x, b)
gx1, gb1 = tk.backward(g, y1, b, True, fused.SERIES_BELOW)
tk._CHUNK = 2048
y3, n3 = counted(tk.forward, x, b)
(gx3, gb3), nb3 = counted(tk.backward, g, y3, b, True, fused.SERIES_BELOW)
chunks = dict(fwd=n3, bwd=nb3, fwd_want=tk.forward_launches(5000),
              bwd_want=tk.backward_launches(5000, x.dtype, b.dtype, True),
              same=bool(torch.equal(y3, y1) and torch.equal(gx3, gx1)), gb_rel=float((gb3 - gb1).abs() / gb1.abs()))
json.dump(dict(rows=rows, path=path, chunks=chunks), sys.stdout)
"""


def test_launch_counts_of_the_cuda_path_are_what_cuda_launches_reports():
    """The CUDA launches of each custom op's Triton path, counted under the interpreter (kernel launches
    plus the torch ops that are not allocations or views), equal fused.cuda_launches (what
    benchmarks/op_count.py adds up) for every dtype, β dtype, layout, size 0/1/n and need_beta; and the
    numbers themselves: forward 1, backward 1 without the β-gradient and 2 with it (kernel + sum of the
    per-block partials; before: zeros fill, kernel, b*b, divide), +1 where β's dtype is not the
    accumulation dtype. Chunked launches (over _CHUNK elements) give the same values."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", LCNN_ZOO_TRITON_ON_CPU="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", COUNT_SCRIPT], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    assert out["path"] == "triton"
    rows = {r["case"]: r for r in out["rows"]}
    assert len(rows) == 7 * 5 * 3 * 2  # (dtype, β dtype) × (layout, grad's) × size × need_beta
    for r in rows.values():
        assert (r["fwd"], r["bwd"]) == (r["fwd_want"], r["bwd_want"]), r
        assert r["gb_dtype"] == r["case"].split(" ")[2], r  # the β-gradient in β's dtype
        if r["case"].endswith("need_beta=False") or "[0, 3, 5, 7]" in r["case"]:
            assert r["gb"] == 0.0, r  # written by the kernel's block 0 (or the empty tensor's sum)
        else:
            assert math.isfinite(r["gb"]) and r["gb"] != 0.0, r
    # A float32 (or bf16/fp16 under a float32 β) activation laid out as its gradient: 1, 1 and 2 launches.
    for dtype in ("torch.float32", "torch.bfloat16", "torch.float16"):
        for layout in ("contiguous", "channels_last"):
            key = f"{dtype} beta torch.float32 {layout} grad {layout} [2, 3, 5, 7]"
            assert (rows[key + " need_beta=False"]["fwd"], rows[key + " need_beta=False"]["bwd"],
                    rows[key + " need_beta=True"]["bwd"]) == (1, 1, 2), key
    key = "torch.bfloat16 beta torch.bfloat16 contiguous grad contiguous [2, 3, 5, 7] need_beta=True"
    assert rows[key]["bwd"] == 3  # + the cast of the float32 sum to β's bfloat16
    c = out["chunks"]
    assert (c["fwd"], c["bwd"]) == (c["fwd_want"], c["bwd_want"]) == (3, 4), c
    assert c["same"] and c["gb_rel"] <= 1e-6, c


def test_ahead_of_time_variants_cover_every_specialisation_and_compile(monkeypatch, tmp_path):
    """benchmarks/triton_aot.py's variants (CI compiles all of them for sm_80 and sm_90): every
    dtype × β dtype × n (1, divisible by 16, not) × alignment of x (forward) and of grad and y × need_beta
    (backward) is a distinct specialisation of Triton's JIT, 96 + 384; one of each kernel compiles here
    for sm_80 through the wheel's ptxas without spills."""
    pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    from benchmarks import triton_aot

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    variants = triton_aot._variants(make_backend(GPUTarget("cuda", 80, 32)))
    kernels = [launch.kernel.__name__ for _, launch, _ in variants]
    assert (kernels.count("_fwd_kernel"), kernels.count("_bwd_kernel")) == (96, 384)
    for prefix in ("fwd torch.float32 beta torch.float32 n=4096 x aligned=True",
                   "bwd torch.bfloat16 beta torch.float32 need_beta=True n=4097 grad aligned=True y aligned=True"):
        index = next(i for i, (name, _, _) in enumerate(variants) if name.startswith(prefix))
        row = triton_aot._compile_one(80, index)
        assert row["ok"] and row["spill_stores"] == row["spill_loads"] == 0 and row["registers"] > 0, row
