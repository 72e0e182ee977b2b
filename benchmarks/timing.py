"""Side-by-side timing for the benchmarks: variants run interleaved (A B C A B C …) so machine drift
hits all of them equally; the median of the measured rounds is reported, as a ratio to a baseline."""
from __future__ import annotations

import json
import platform
import statistics
import time
from typing import Callable, Dict

import torch


def interleaved(variants: Dict[str, Callable[[], object]], *, warmup: int = 2, rounds: int = 10) -> Dict[str, dict]:
    """Time each variant ``rounds`` times (after ``warmup`` calls each), interleaved. Seconds."""
    for _ in range(warmup):
        for fn in variants.values():
            fn()
    samples = {k: [] for k in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            t = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - t)
    return {k: {"median_s": statistics.median(v), "min_s": min(v), "max_s": max(v), "n": len(v)}
            for k, v in samples.items()}


def cpu_model() -> str:
    """The CPU's model name as lscpu shows it (/proc/cpuinfo), e.g. 'AMD EPYC' or an Intel Xeon's."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": cpu_model(),
            "python": platform.python_version(),
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def report(title: str, results: Dict[str, dict], baseline: str, extra_cols: Dict[str, Dict[str, str]] = None) -> str:
    base = results[baseline]["median_s"]
    lines = [title, "", f"| variant | median ms | × {baseline} |" + "".join(f" {c} |" for c in (extra_cols or {})),
             "|---|---|---|" + "---|" * len(extra_cols or {})]
    for name, r in results.items():
        row = f"| {name} | {1000 * r['median_s']:.1f} | {r['median_s'] / base:.2f} |"
        for col in (extra_cols or {}).values():
            row += f" {col.get(name, '')} |"
        lines.append(row)
    return "\n".join(lines)


def dump(path: str, payload: dict) -> None:
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
