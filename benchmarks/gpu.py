"""The GPU measurements of docs/performance.md, in one run that fits one device call (``benchmarks/gpu.sh``).

1. Training-step ratios on the paper's CIFAR ResNet-18 (batch 128, 100 classes, SGD step included):
   timm's own ``resnet18`` with the CIFAR stem (3×3 stride-1 conv, no max-pool, in-place ReLU) as the
   baseline, the zoo's ReLU net, the softplus net, the LCNN (penalty included), LCNN + GradReg by
   finite differences and exactly; eager float32, bf16 autocast, channels_last, and torch.compile
   (with its compile time and recompiles). Times by ``torch.cuda.synchronize`` around each step,
   interleaved, median; peak memory by ``torch.cuda.max_memory_allocated`` per variant.
2. Throughput (images/s) of ``lcnn-zoo train`` against a plain timm training loop on the same net.
3. A short real training run: a CIFAR-style LCNN ResNet-18 with GradReg on the real Fashion-MNIST
   (carried with the call), checking that the loss falls and the penalties are logged.

    python -m benchmarks.gpu [--dry-run] [--out DIR] [--data-dir DIR]

``--dry-run`` runs every section on the CPU with tiny sizes (CI and sessions without a GPU).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, Dict

import timm
import torch
import torch.nn.functional as F

import lcnn_zoo  # noqa: F401  (registers lcnn_*)
from lcnn_zoo.penalty import LCNNPenalty, gradreg_exact, gradreg_fd_backward, param_groups

from benchmarks.timing import machine


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timm_cifar_resnet18(num_classes: int) -> torch.nn.Module:
    """timm's resnet18 with the CIFAR stem: the fastest plain net a user would otherwise train."""
    model = timm.create_model("resnet18", num_classes=num_classes)
    model.conv1 = torch.nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
    model.maxpool = torch.nn.Identity()
    return model


def _step_fn(model, case: str, x, y, amp: bool, channels_last: bool) -> Callable[[], None]:
    opt = torch.optim.SGD(param_groups(model, 5e-4), lr=0.01, momentum=0.9)
    pen = LCNNPenalty() if case.startswith("lcnn") else None
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)

    def autocast():
        return torch.autocast(x.device.type, dtype=torch.bfloat16) if amp else torch.enable_grad()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with autocast():
            if case.endswith("gradreg_fd"):
                gradreg_fd_backward(model, x, y, 0.01, extra_loss=(lambda: pen(model)) if pen else None)
            elif case.endswith("gradreg_exact"):
                out = gradreg_exact(model, x, y)
                (out.loss + 0.01 * out.penalty + (pen(model) if pen else 0.0)).backward()
            else:
                loss = F.cross_entropy(model(x), y)
                (loss + pen(model) if pen else loss).backward()
        opt.step()

    return step


def _build(case: str, device: torch.device, num_classes: int) -> torch.nn.Module:
    if case == "timm_relu":
        model = timm_cifar_resnet18(num_classes)
    else:
        arch = {"zoo_relu": "lcnn_resnet18_relu", "softplus": "lcnn_resnet18_softplus"}.get(case, "lcnn_resnet18")
        model = timm.create_model(arch, num_classes=num_classes)
    return model.to(device).train()


def train_steps(device: torch.device, batch: int, rounds: int, compile_too: bool) -> Dict[str, dict]:
    """Section 1: the step table."""
    torch.manual_seed(0)
    x = torch.rand(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 100, (batch,), device=device)
    configs = {f"{k}": (k, False, False) for k in ("timm_relu", "zoo_relu", "softplus", "lcnn", "lcnn_gradreg_fd",
                                                  "lcnn_gradreg_exact")}
    configs.update({f"{k}+bf16": (k, True, False) for k in ("timm_relu", "lcnn", "lcnn_gradreg_fd")})
    configs.update({f"{k}+channels_last": (k, False, True) for k in ("timm_relu", "lcnn")})
    steps = {name: _step_fn(_build(k, device, 100), k, x, y, amp, cl) for name, (k, amp, cl) in configs.items()}
    results = {}
    for name, fn in steps.items():  # warm-up and peak memory, one variant at a time
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        for _ in range(3):
            fn()
        _sync(device)
        peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 20 if device.type == "cuda" else float("nan")
        results[name] = {"peak_mib": peak, "times": []}
    for _ in range(rounds):  # interleaved timing
        for name, fn in steps.items():
            _sync(device)
            t = time.perf_counter()
            fn()
            _sync(device)
            results[name]["times"].append(time.perf_counter() - t)
    if compile_too:
        for k in ("timm_relu", "lcnn", "lcnn_gradreg_fd"):
            model = _build(k, device, 100)
            compiled = torch.compile(model)
            fn = _step_fn(compiled, k, x, y, False, False)
            torch._dynamo.utils.counters.clear()
            _sync(device)
            t = time.perf_counter()
            fn()
            _sync(device)
            compile_s = time.perf_counter() - t
            for _ in range(2):
                fn()
            times = []
            for _ in range(rounds):
                _sync(device)
                t = time.perf_counter()
                fn()
                _sync(device)
                times.append(time.perf_counter() - t)
            counters = torch._dynamo.utils.counters
            graphs, breaks = counters["stats"]["unique_graphs"], counters["graph_break"].total()
            compiled_frames = counters["frames"]["ok"]
            counters.clear()  # frames compiled from here on are recompilations
            for _ in range(2):
                fn()
            results[f"{k}+compile"] = {"times": times, "compile_s": compile_s, "graphs": graphs, "graph_breaks": breaks,
                                       "frames_compiled": compiled_frames,
                                       "recompiles_after_warmup": counters["frames"]["ok"], "peak_mib": float("nan")}
    for r in results.values():
        r["median_ms"] = 1000 * statistics.median(r.pop("times"))
    return results


def step_table(results: Dict[str, dict]) -> str:
    base = results["timm_relu"]["median_ms"]
    zoo = results["zoo_relu"]["median_ms"]
    mem = results["timm_relu"]["peak_mib"]
    lines = ["| variant | median ms | × timm resnet18 | × zoo relu | peak MiB | × timm mem | compile s |",
             "|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        mode = name.split("+", 1)[1] if "+" in name else ""
        ref = results.get(f"timm_relu+{mode}" if mode else "timm_relu", results["timm_relu"])
        ratio_same_mode = r["median_ms"] / ref["median_ms"]
        lines.append(f"| {name} | {r['median_ms']:.2f} | {r['median_ms'] / base:.2f} "
                     f"(same mode: {ratio_same_mode:.2f}) | {r['median_ms'] / zoo:.2f} | {r['peak_mib']:.0f} | "
                     f"{r['peak_mib'] / mem:.2f} | "
                     f"{r.get('compile_s', float('nan')):.1f} |")
    return "\n".join(lines)


def throughput(device: torch.device, data_dir: str, epochs: int, subset: int, batch: int, out: Path
               ) -> Dict[str, float]:
    """Section 2: images/s of `lcnn-zoo train` and of a plain timm loop on the same net and batch."""
    from lcnn_zoo.commands.cli import train_config
    from lcnn_zoo.commands.training import train

    res = {}
    for model in ("lcnn_resnet18_relu", "lcnn_resnet18"):
        cfg = train_config(["--model", model, "--dataset", "cifar10", "--data-dir", data_dir, "--epochs", str(epochs),
                            "--train-subset", str(subset), "--test-subset", str(min(subset, 512)), "--batch-size",
                            str(batch), "--reg", "none" if model.endswith("relu") else "lcnn", "--lr", "0.05",
                            "--no-progress", "--output", str(out / "runs"), "--experiment", f"tp-{model}",
                            "--device", device.type])
        hist = train(cfg)["history"]
        res[f"lcnn-zoo train {model}"] = subset // batch * batch / hist[-1]["train_epoch_time_s"]
    model = timm_cifar_resnet18(10).to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x = torch.rand(subset, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (subset,), device=device)
    for epoch in range(epochs):
        _sync(device)
        t = time.perf_counter()
        for i in range(0, subset - batch + 1, batch):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x[i:i + batch]), y[i:i + batch]).backward()
            opt.step()
        _sync(device)
        seconds = time.perf_counter() - t
        res["plain timm loop timm resnet18 (data already on the device)"] = subset // batch * batch / seconds
    return res


def real_run(device: torch.device, fmnist_dir: str, epochs: int, subset: int, out: Path) -> Dict[str, object]:
    """Section 3: a short real training run of a CIFAR-style LCNN ResNet-18 + GradReg on Fashion-MNIST."""
    from lcnn_zoo.commands.cli import train_config
    from lcnn_zoo.commands.training import train

    cfg = train_config(["--model", "lcnn_resnet18", "--dataset", "fmnist", "--data-dir", fmnist_dir, "--input-size",
                        "1", "28", "28", "--epochs", str(epochs), "--train-subset", str(subset), "--batch-size", "128",
                        "--lr", "0.05", "--sched", "cosine", "--reg", "lcnn_gradreg", "--gradreg", "fd",
                        "--lambda-grad", "0.01", "--model-kwargs", "logit_scale=4", "--aug-pad", "2", "--no-progress",
                        "--output", str(out / "runs"), "--experiment", "fmnist-lcnn-gradreg", "--device", device.type])
    s = train(cfg)
    losses = [h["train_loss"] for h in s["history"]]
    return {"train_loss": losses, "loss_falls": losses[-1] < losses[0],
            "penalties_logged": all("train_sum_beta" in h and "train_grad_sq" in h for h in s["history"]),
            "test_top1": s["final"].get("top1"), "epoch_time_s": [h["train_epoch_time_s"] for h in s["history"]]}


def fused_check(device: torch.device) -> Dict[str, object]:
    """The fused centered-softplus kernels on this device (Triton on CUDA) against the unfused formulas
    in float64: max relative errors of value, ∂/∂x and the β-gradient, float32 and bf16, both layouts.

    ``passed`` is False (and main exits 1) unless every call ran the device's kernels ("triton" on
    CUDA, "cpu-inductor" on the CPU): a kernel that fails falls back to the formulas, which would
    otherwise be measured here as if they were the kernels. ``kernel_path`` is what
    ``lcnn_zoo.layers._kernels.fused_status()`` recorded for the device during this check."""
    from lcnn_zoo.layers import _kernels, activation

    _kernels.reset_fused_status()
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for beta in (1e-4, 1.0, 5.0, 1e4):
            for cl in (False, True):
                g = torch.Generator().manual_seed(0)
                scale = torch.logspace(-6, 4, 8 * 16 * 8 * 8, dtype=torch.float64).reshape(8, 16, 8, 8) / beta
                x = (torch.randn(8, 16, 8, 8, generator=g, dtype=torch.float64) * scale).to(device, dtype)
                gr = torch.randn(8, 16, 8, 8, generator=g, dtype=torch.float64).to(device, dtype)
                if cl:
                    x, gr = x.to(memory_format=torch.channels_last), gr.to(memory_format=torch.channels_last)
                b = torch.tensor(beta, device=device)
                y = torch.ops.lcnn_zoo.centered_softplus_fwd(x, b)
                gx, gb = torch.ops.lcnn_zoo.centered_softplus_bwd(gr, y, b, True)
                bd = b.double()
                y_ref = activation._centered_softplus_t(x.double() * bd) / bd
                dx, db = activation._derivatives_from_output(y.double(), bd)
                gd = gr.double()
                rows.append({"dtype": str(dtype), "beta": beta, "channels_last": cl,
                             "value": float((y.double() - y_ref).abs().max() / y_ref.abs().max()),
                             "grad_x": float((gx.double() - gd * dx).abs().max() / (gd * dx).abs().max()),
                             "grad_beta": float((gb.double() - (gd * db).sum()).abs() / (gd * db).abs().sum())})
    where = str(y.device)
    status = _kernels.fused_status()
    path = status.get(where, {})
    expected = "triton" if device.type == "cuda" else "cpu-inductor"
    calls = path.get("calls", {})
    passed = bool(calls) and set(calls) == {expected}
    return {"rows": rows, "worst": {k: max(r[k] for r in rows) for k in ("value", "grad_x", "grad_beta")},
            "device": where, "expected_path": expected, "kernel_path": path, "disabled": status["disabled"],
            "passed": passed,
            "failure": "" if passed else f"{where}: expected only {expected!r} to run, recorded {calls} "
                                         f"(formulas because: {path.get('reasons') or status['disabled']})"}


def launches(device: torch.device, batch: int) -> Dict[str, object]:
    """Kernel launches per training step from torch.profiler (CUDA kernels), for timm's ReLU net, the
    softplus net and the LCNN. The dispatched-op counts are the CPU's (``python -m benchmarks.op_count``,
    pinned in CI): they do not depend on the device, so the device's time is not spent on them."""
    from torch.profiler import ProfilerActivity, profile

    res = {}
    for case in ("timm_relu", "softplus", "lcnn"):
        model = (timm_cifar_resnet18(100) if case == "timm_relu" else
                 timm.create_model("lcnn_resnet18_softplus" if case == "softplus" else "lcnn_resnet18",
                                   num_classes=100)).to(device).train()
        x = torch.rand(batch, 3, 32, 32, device=device)
        y = torch.randint(0, 100, (batch,), device=device)
        step = _step_fn(model, case, x, y, amp=False, channels_last=False)
        step()
        step()
        _sync(device)
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=acts) as prof:
            step()
            _sync(device)
        events = prof.events()
        n_kernels = sum(1 for e in events if getattr(e, "device_type", None) is not None
                        and str(e.device_type).endswith("CUDA"))
        res[case] = {"cuda_kernels": n_kernels if device.type == "cuda" else None}
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU")
    ap.add_argument("--out", default="runs/gpu_bench")
    ap.add_argument("--data-dir", default=".data/fashion-mnist", help="Fashion-MNIST idx .gz files")
    ap.add_argument("--budget-s", type=float, default=420.0,
                    help="no section starts after this many seconds (gpu.sh also kills the run at 470 s)")
    args = ap.parse_args()
    problems = preflight(args.data_dir, args.dry_run)
    if problems:
        print("gpu.py: " + "; ".join(problems), file=sys.stderr)
        return 2
    start = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cpu" if args.dry_run or not torch.cuda.is_available() else "cuda")
    dry = device.type == "cpu"
    if dry and not Path(args.data_dir).is_dir() and Path("/usr/share/datasets/fashion-mnist").is_dir():
        args.data_dir = "/usr/share/datasets/fashion-mnist"  # the dry run on a development machine
    report: Dict[str, object] = {"machine": machine(), "timm": timm.__version__, "dry_run": dry}
    print(json.dumps(report["machine"]), flush=True)
    sections = [
        ("fused_check", lambda: fused_check(device)),
        ("launches", lambda: launches(device, 8 if dry else 128)),
        ("train_step", lambda: train_steps(device, 8 if dry else 128, 2 if dry else 30, compile_too=not dry)),
        ("throughput", lambda: throughput(device, str(_standin(out)), 1 if dry else 2, 64 if dry else 10000,
                                          32 if dry else 128, out)),
        ("real_run", lambda: real_run(device, args.data_dir, 1 if dry else 3, 128 if dry else 20000, out)),
    ]
    from lcnn_zoo.layers import _kernels

    for name, fn in sections:
        t = time.time()
        if t - start > args.budget_s:  # the time guard: what ran is in gpu.json already
            report[name] = {"skipped": f"time guard: {t - start:.0f} s spent of {args.budget_s:.0f}"}
            print(f"== {name} skipped (time guard)", flush=True)
            continue
        try:
            report[name] = fn()
        except Exception:  # noqa: BLE001 - report and go on: the call's time is precious
            report[name] = {"error": traceback.format_exc()}
        print(f"== {name} ({time.time() - t:.0f} s)", flush=True)
        if name == "train_step" and "error" not in report[name]:
            print(step_table(report[name]), flush=True)
        else:
            print(json.dumps(report[name], indent=1, default=str)[:3000], flush=True)
        # Which activation code ran on each device in the sections after fused_check (which resets it).
        report["kernel_paths"] = _kernels.fused_status()
        (out / "gpu.json").write_text(json.dumps(report, indent=1, default=str))
    check = report["fused_check"]
    if not isinstance(check, dict) or not check.get("passed"):
        print(f"FAIL fused_check: {check.get('failure') or check.get('error', check)}", flush=True)
        return 1
    return 0


#: what ``lcnn_zoo`` declares it needs (pyproject.toml); the device machine's own torch may differ from CI's
MINIMUM_VERSIONS = {"torch": "2.4", "timm": "1.0.20", "torchvision": "0.19"}
FMNIST_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
                "t10k-labels-idx1-ubyte.gz")


def preflight(data_dir: str, dry: bool) -> list:
    """What would make the device call fail late, checked before any work: the versions, a GPU (unless
    ``--dry-run``), and the carried Fashion-MNIST files (prepared by ``benchmarks/gpu.sh --prepare``)."""
    from importlib.metadata import version

    from packaging.version import Version

    problems = []
    for name, minimum in MINIMUM_VERSIONS.items():
        have = version(name)
        if Version(have.split("+")[0]) < Version(minimum):
            problems.append(f"{name} {have} is older than the {minimum} lcnn_zoo needs")
    if not dry:
        if not torch.cuda.is_available():
            problems.append("no CUDA device (use --dry-run on a CPU)")
        missing = [f for f in FMNIST_FILES if not (Path(data_dir) / f).is_file()]
        if missing:
            problems.append(f"{data_dir} lacks {', '.join(missing)}: run `bash benchmarks/gpu.sh --prepare` here and "
                            f"carry {data_dir} with the device call")
    return problems


def _standin(out: Path) -> Path:
    from examples.cifar_standin import write

    folder = out / "cifar_standin"
    if not (folder / "cifar-10-batches-py").is_dir():
        write(folder, 10000, 512)
    return folder


if __name__ == "__main__":
    sys.exit(main())
