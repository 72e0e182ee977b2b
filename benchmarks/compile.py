"""torch.compile and the LCNN training step: graph breaks (torch._dynamo.explain) in the forward +
loss + LCNN penalty of an LCNN ResNet, and, with --time, compiled vs eager step time for the full
LCNN + finite-difference GradReg step (two forward/backward passes; no double backward, which
torch.compile refuses).

    python -m benchmarks.compile [--model lcnn_resnet20] [--time] [--threads 2]
"""
from __future__ import annotations

import argparse

import timm
import torch
import torch.nn.functional as F

import lcnn_zoo
from benchmarks.timing import dump, interleaved, machine, report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="lcnn_resnet20")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--time", action="store_true", help="also time compiled vs eager (compiles: minutes on CPU)")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
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
