"""Where an eager LCNN training step spends its time on a GPU (a companion of benchmarks/gpu.py):
the profiler's top operators, the step with power iteration frozen, torch.compile's graph breaks,
and CUDA-graph compilation (mode="reduce-overhead") for the ReLU net and the LCNN.

    python -m benchmarks.gpu_profile [--dry-run]
"""
from __future__ import annotations

import argparse
import statistics
import time

import timm
import torch
import torch.nn.functional as F

import lcnn_zoo  # noqa: F401
from lcnn_zoo.layers import SpectralNorm
from lcnn_zoo.penalty import LCNNPenalty, param_groups

from benchmarks.gpu import timm_cifar_resnet18


def stepper(model, x, y, pen):
    opt = torch.optim.SGD(param_groups(model, 5e-4), lr=0.01, momentum=0.9)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        (loss + pen(model) if pen else loss).backward()
        opt.step()
    return step


def timed(fn, device, n):
    for _ in range(3):
        fn()
    times = []
    for _ in range(n):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dry-run", action="store_true")
    args = ap.parse_args()
    device = torch.device("cpu" if args.dry_run or not torch.cuda.is_available() else "cuda")
    b, n = (8, 2) if device.type == "cpu" else (128, 20)
    x, y = torch.rand(b, 3, 32, 32, device=device), torch.randint(0, 100, (b,), device=device)
    relu = timm_cifar_resnet18(100).to(device)
    lcnn = timm.create_model("lcnn_resnet18", num_classes=100).to(device)
    pen = LCNNPenalty()
    step = stepper(lcnn, x, y, pen)
    print(f"eager ms: relu {timed(stepper(relu, x, y, None), device, n):.2f}, lcnn {timed(step, device, n):.2f}")
    for m in lcnn.modules():
        if isinstance(m, SpectralNorm):
            m.frozen = True
    print(f"eager ms, lcnn with power iteration frozen: {timed(step, device, n):.2f}")
    for m in lcnn.modules():
        if isinstance(m, SpectralNorm):
            m.frozen = False
    acts = [torch.profiler.ProfilerActivity.CPU]
    acts += [torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else []
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(3):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=40))
    if device.type == "cuda":
        print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=12, max_name_column_width=40))
    exp = torch._dynamo.explain(lcnn)(x)
    print(f"dynamo on the LCNN forward: {exp.graph_count} graphs, {exp.graph_break_count} breaks")
    for r in exp.break_reasons[:5]:
        print("  break:", str(r.reason)[:160])
    if device.type == "cuda":
        for name, model, p in (("relu", relu, None), ("lcnn", lcnn, pen)):
            t = time.perf_counter()
            fn = stepper(torch.compile(model, mode="reduce-overhead"), x, y, p)
            fn()
            torch.cuda.synchronize()
            print(f"reduce-overhead {name}: compile {time.perf_counter() - t:.1f} s, "
                  f"step {timed(fn, device, n):.2f} ms")


if __name__ == "__main__":
    main()
