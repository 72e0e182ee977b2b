"""Compile every variant of the centered softplus's Triton kernels ahead of time for sm_80 and sm_90, without a GPU.

    python -m benchmarks.triton_aot [--arch 80 90] [--jobs 1] [--json FILE]

CI runs it (``.ci/run``): a kernel that stops compiling for an A100 (sm_80) or an H100/H200 (sm_90), or
that starts spilling registers, fails CI on a machine with no GPU, instead of falling back to the
formulas at its first launch on a user's device (see ``lcnn_zoo.layers._kernels.kernel_path``).

Which variants: the kernels are specialised by Triton's JIT on every launch (constexprs, dtypes,
16-byte alignment of pointers, integers equal to 1 or divisible by 16). This script builds the launches
of ``lcnn_zoo.layers._kernels.triton`` (its ``_fwd_plan``/``_bwd_plan``, the same code that launches them)
for every input the custom ops can pass on: x, y and grad float16/bfloat16/float32/float64, β of any of
those dtypes, with and without the β-gradient, n = 1, a multiple of 16 and not, each data pointer that
can be misaligned (x; grad and y) aligned and not. It computes the JIT's own specialisation of each
(``triton.runtime.jit``'s binder with a CUDA backend for the target) and compiles each distinct one with
``triton.compile(ASTSource, target=GPUTarget("cuda", arch, 32))`` through the ptxas shipped in the
Triton wheel, with ptxas's ``-v`` report parsed for spills (the compiled metadata has no ``n_spills``
without a GPU: Triton reads it when it loads the binary onto a device). n is never 64-bit: the
launcher splits tensors into chunks of 2^30 elements.

Exit status 1 if any variant fails to compile or spills.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import io
import json
import os
import re
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import torch

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
SIZES = (1, 4096, 4097)  # n == 1 (a constexpr for the JIT), divisible by 16, not


def _tensor(n: int, dtype: torch.dtype, aligned: bool) -> torch.Tensor:
    """n elements whose data pointer is 16-byte aligned or not (one element into a buffer)."""
    buf = torch.zeros(n + 1, dtype=dtype)
    return buf[:n] if aligned else buf[1:]


def launches() -> Iterator[tuple[str, Any]]:
    """(description, ``lcnn_zoo.layers._kernels.triton.Launch``) for every input kind the ops can launch with
    (duplicates included)."""
    from lcnn_zoo.layers import _kernels
    from lcnn_zoo.layers._kernels import triton as tk

    for dtype in DTYPES:
        for beta_dtype in DTYPES:
            beta = torch.ones((), dtype=beta_dtype)
            for n in SIZES:
                for x_aligned in (True, False):
                    x = _tensor(n, dtype, x_aligned)
                    for launch in tk._fwd_plan(x, torch.empty_like(x), beta):
                        yield f"fwd {dtype} beta {beta_dtype} n={n} x aligned={x_aligned}", launch
                for need_beta in (False, True):
                    for g_aligned in (True, False):
                        for y_aligned in (True, False):
                            g, y = _tensor(n, dtype, g_aligned), _tensor(n, dtype, y_aligned)
                            out = (torch.empty(-(-n // tk._BLOCK), dtype=tk.acc_dtype(dtype)) if need_beta
                                   else torch.empty((), dtype=beta_dtype))
                            for launch in tk._bwd_plan(g, y, beta, torch.empty_like(y), out, need_beta,
                                                       _kernels.SERIES_BELOW):
                                yield (f"bwd {dtype} beta {beta_dtype} need_beta={need_beta} n={n} "
                                       f"grad aligned={g_aligned} y aligned={y_aligned}"), launch


def specialisation(launch: Any, backend: Any) -> tuple[dict[str, str], dict[Any, Any], dict[Any, Any], Any]:
    """(signature, constexprs, attrs, options) the JIT derives for this launch: its own binder and
    ``_pack_args`` (Triton internals: CI pins torch, and with it Triton)."""
    from triton import knobs
    from triton.runtime.jit import create_function_from_signature

    kernel = launch.kernel
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    kwargs = dict(launch.kwargs, debug=kernel.debug or knobs.runtime.debug,
                  instrumentation_mode=knobs.compilation.instrumentation_mode)
    bound, spec, opts = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, spec, opts)
    return signature, constexprs, attrs, options


_PTXAS = {"spill_stores": r"(\d+) bytes spill stores", "spill_loads": r"(\d+) bytes spill loads",
          "stack_bytes": r"(\d+) bytes stack frame", "registers": r"Used (\d+) registers"}


def _compile_one(arch: int, index: int) -> dict[str, Any]:
    """Compile the index-th distinct variant for sm_<arch>; its ptxas report (in a worker process too)."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    name, launch, (signature, constexprs, attrs, options) = _variants(backend)[index]
    log = io.StringIO()
    t = time.perf_counter()
    try:
        # ptxas's -v report goes to stdout with dump_ptxas_log; always_compile: ptxas runs even if cached.
        with knobs.nvidia.scope(), knobs.compilation.scope(), contextlib.redirect_stdout(log):
            knobs.nvidia.dump_ptxas_log = True
            knobs.compilation.always_compile = True
            compiled = triton.compile(ASTSource(launch.kernel, signature, constexprs, attrs), target=target,
                                      options=options.__dict__)
    except Exception as exc:  # noqa: BLE001 - reported per variant, the script fails at the end
        return {"arch": arch, "variant": name, "ok": False, "error": f"{type(exc).__name__}: {exc}"[-2000:]}
    report = log.getvalue()
    row: dict[str, Any] = {"arch": arch, "variant": name, "kernel": launch.kernel.__name__,
                           "signature": signature, "seconds": round(time.perf_counter() - t, 3),
                           "cubin_bytes": len(compiled.asm["cubin"])}
    for key, pattern in _PTXAS.items():
        found = [int(v) for v in re.findall(pattern, report)]
        row[key] = max(found) if found else None
    row["ok"] = row["spill_stores"] == 0 and row["spill_loads"] == 0
    if row["spill_stores"] is None:  # no report parsed: treat as a failure rather than as "no spills"
        row.update(ok=False, error="no ptxas -v report found:\n" + report[-1000:])
    return row


_cache: dict[int, list[tuple[str, Any, tuple[Any, ...]]]] = {}


def _variants(backend: Any) -> list[tuple[str, Any, tuple[Any, ...]]]:
    """The distinct specialisations (first description of each) for a backend's target."""
    arch = backend.target.arch
    if arch not in _cache:
        seen: dict[str, tuple[str, Any, tuple[Any, ...]]] = {}
        for name, launch in launches():
            spec = specialisation(launch, backend)
            key = repr((launch.kernel.__name__, sorted(spec[0].items()), sorted(spec[1].items(), key=repr),
                        sorted(spec[2].items(), key=repr)))
            seen.setdefault(key, (name, launch, spec))
        _cache[arch] = list(seen.values())
    return _cache[arch]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="compute capabilities (80: A100, 90: H100)")
    ap.add_argument("--jobs", type=int, default=1, help="worker processes")
    ap.add_argument("--json", default="", help="write every variant's row here")
    args = ap.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("benchmarks.triton_aot: unset TRITON_INTERPRET (the interpreter's kernels cannot be compiled)")
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="lcnn_triton_aot_"))  # leave ~/.triton alone
    ptxas = knobs.nvidia.ptxas
    print(f"triton {triton.__version__}, torch {torch.__version__}, ptxas {ptxas.path} ({ptxas.version})", flush=True)
    t0 = time.perf_counter()
    rows: list[dict[str, Any]] = []
    for arch in args.arch:
        n = len(_variants(make_backend(GPUTarget("cuda", arch, 32))))
        if args.jobs > 1:
            with concurrent.futures.ProcessPoolExecutor(args.jobs) as pool:
                rows += list(pool.map(_compile_one, [arch] * n, range(n)))
        else:
            rows += [_compile_one(arch, i) for i in range(n)]
        print(f"sm_{arch}: {n} variants compiled in {time.perf_counter() - t0:.1f} s so far", flush=True)
    bad = [r for r in rows if not r["ok"]]
    for r in bad:
        print(f"FAIL sm_{r['arch']} {r['variant']}: {r.get('error') or 'spills'} {r}", flush=True)
    by_kernel: dict[tuple[int, str], list[dict[str, Any]]] = {}
    for r in rows:
        if "kernel" in r:
            by_kernel.setdefault((r["arch"], r["kernel"]), []).append(r)
    for (arch, kernel), rs in sorted(by_kernel.items()):
        print(f"sm_{arch} {kernel}: {len(rs)} variants, registers {min(r['registers'] for r in rs)}–"
              f"{max(r['registers'] for r in rs)}, spill stores/loads max {max(r['spill_stores'] for r in rs)}/"
              f"{max(r['spill_loads'] for r in rs)} bytes, stack max {max(r['stack_bytes'] for r in rs)} bytes")
    print(f"{len(rows)} compilations, {len(bad)} failed or spilled, {time.perf_counter() - t0:.1f} s wall", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1, default=str)
    return 1 if bad or not rows else 0


if __name__ == "__main__":
    sys.exit(main())
