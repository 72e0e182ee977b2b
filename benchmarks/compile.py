"""torch.compile and the LCNN training step: graph breaks (torch._dynamo.explain) in the forward +
loss + LCNN penalty of an LCNN ResNet, and, with --time, compiled vs eager step time for the full
LCNN + finite-difference GradReg step (two forward/backward passes; no double backward, which
torch.compile refuses).

    python -m benchmarks.compile [--model lcnn_resnet20] [--time] [--threads 2]
    python -m benchmarks.compile --graph-size [--variants timm_relu softplus lcnn]

--graph-size: the size of what inductor compiles for a training step of each variant of
``benchmarks.train_step`` (CIFAR ResNet-18, ``torch.compile(model)`` as there): the ATen operations
in AOTAutograd's forward and backward graphs, counted by a backend that compiles nothing. Inductor's
compile time grows with these graphs, and the count is deterministic (no timing).
"""
from __future__ import annotations

import argparse
from typing import Dict

import timm
import torch
import torch.nn.functional as F

import lcnn_zoo

from benchmarks.timing import dump, interleaved, machine, report
from benchmarks.train_step import _model


def graph_sizes(variant: str, batch: int = 8) -> Dict[str, int]:
    """ATen operations in the forward and backward graphs ``torch.compile(model)`` hands inductor for
    one training step (forward + cross-entropy's input + backward) of a ``benchmarks.train_step`` variant."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd  # the helper torch's own AOT backends use

    sizes = {"graphs": 0, "forward": 0, "backward": 0}

    def counter(phase):
        def compile_graph(gm, example_inputs):
            ops = sum(1 for n in gm.graph.nodes if n.op == "call_function")
            sizes[phase] += ops
            if phase == "forward" and ops:  # (an empty graph, which dynamo may hand over at a break, is none)
                sizes["graphs"] += 1
            return make_boxed_func(gm.forward)
        return compile_graph

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = _model(variant, 100).train()
    backend = aot_autograd(fw_compiler=counter("forward"), bw_compiler=counter("backward"))
    compiled = torch.compile(model, backend=backend)
    x, y = torch.rand(batch, 3, 32, 32), torch.randint(0, 100, (batch,))
    F.cross_entropy(compiled(x), y).backward()
    return sizes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--graph-size", action="store_true", help="count the ATen ops of the compiled graphs per variant")
    ap.add_argument("--variants", nargs="+", default=["timm_relu", "relu", "softplus", "lcnn"])
    ap.add_argument("--model", default="lcnn_resnet20")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--time", action="store_true", help="also time compiled vs eager (compiles: minutes on CPU)")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.graph_size:
        sizes = {v: graph_sizes(v) for v in args.variants}
        base = sizes[args.variants[0]]
        total = lambda r: r["forward"] + r["backward"]  # noqa: E731
        print("ATen ops in the graphs torch.compile(model) hands inductor, one training step "
              f"(torch {torch.__version__})")
        print(f"| variant | graphs | forward | backward | total | × {args.variants[0]} |\n|---|---|---|---|---|---|")
        for v, r in sizes.items():
            print(f"| {v} | {r['graphs']} | {r['forward']} | {r['backward']} | {total(r)} "
                  f"| {total(r) / total(base):.2f} |")
        if args.json:
            dump(args.json, {"machine": machine(), "graph_sizes": sizes})
        return
    torch.manual_seed(0)
    model = timm.create_model(args.model, num_classes=10).train()
    pen = lcnn_zoo.LCNNPenalty()
    x, y = torch.rand(args.batch, 3, 32, 32), torch.randint(0, 10, (args.batch,))

    def loss_fn(inp, tgt):
        return F.cross_entropy(model(inp), tgt) + pen(model)

    explanation = torch._dynamo.explain(loss_fn)(x, y)
    print(f"torch._dynamo.explain({args.model} forward + loss + LCNN penalty): "
          f"{explanation.graph_count} graph(s), {explanation.graph_break_count} graph break(s)")
    for reason in explanation.break_reasons:
        print("  break:", reason.reason)
    out = {"machine": machine(), "graph_breaks": explanation.graph_break_count,
           "reasons": [str(r.reason) for r in explanation.break_reasons]}
    if args.time:
        compiled = torch.compile(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)

        def step(m):
            def f():
                opt.zero_grad(set_to_none=True)
                lcnn_zoo.gradreg_fd_backward(m, x, y, 6e-3, extra_loss=lambda: pen(model))
                opt.step()
            return f
        res = interleaved({"eager": step(model), "compiled": step(compiled)}, warmup=3, rounds=args.rounds)
        print(report(f"LCNN + FD-GradReg step, {args.model}, batch {args.batch}", res, "eager"))
        out["time"] = res
    if args.json:
        dump(args.json, out)


if __name__ == "__main__":
    main()
