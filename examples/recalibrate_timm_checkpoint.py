"""Top-1 of a checkpoint timm's train.py wrote for an lcnn_* model, with its running BatchNorm
statistics and with them recomputed for its final weights (``lcnn_zoo.recalibrate_batchnorm``), on
an image folder (examples/fmnist_folders.py). Reads the checkpoint with ``weights_only=True``; writes
nothing. docs/timm_scripts.md ("With timm's scripts") quotes its output.

    python examples/recalibrate_timm_checkpoint.py runs/timm/<run>/checkpoint-0.pth.tar \\
        --model lcnn_resnet20 --data .data/fmnist
"""
from __future__ import annotations

import argparse
import sys

import timm
import torch
from timm.data import create_dataset, create_loader, resolve_data_config

import lcnn_zoo


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--model", required=True)
    ap.add_argument("--in-chans", type=int, default=3, help="as train.py built it (its default: 3)")
    ap.add_argument("--data", required=True, help="image folder with train/ and test/")
    args = ap.parse_args(argv)
    # timm's checkpoints hold an argparse.Namespace beside the tensors: allowed by name, nothing else
    with torch.serialization.safe_globals([argparse.Namespace]):
        state = torch.load(args.checkpoint, weights_only=True, map_location="cpu")["state_dict"]
    model = timm.create_model(args.model, in_chans=args.in_chans)
    model.load_state_dict(state)
    cfg = resolve_data_config({}, model=model)

    def loader(split):
        ds = create_dataset("", root=f"{args.data}/{split}", input_img_mode="L" if args.in_chans == 1 else "RGB")
        return create_loader(ds, input_size=cfg["input_size"],
                             batch_size=64, use_prefetcher=False, mean=cfg["mean"], std=cfg["std"], crop_pct=1.0,
                             interpolation=cfg["interpolation"], num_workers=0, device=torch.device("cpu"))

    @torch.no_grad()
    def top1():
        model.eval()
        hits = n = 0
        for x, y in loader("test"):
            hits, n = hits + int((model(x).argmax(1) == y).sum()), n + len(y)
        return 100.0 * hits / n

    before = top1()
    bns = [m for m in model.modules() if isinstance(m, (lcnn_zoo.LipschitzBatchNorm2d, torch.nn.BatchNorm2d))]
    running = [m.running_var.clone() for m in bns]
    batches = lcnn_zoo.recalibrate_batchnorm(model, (x for x, _ in loader("train")))
    print(f"top-1 {before:.1f} % with its running statistics, {top1():.1f} % recomputed on {batches} training batches")
    ratio = torch.cat([r / m.running_var for r, m in zip(running, bns)])
    print(f"running / recomputed variance, over the {ratio.numel()} channels of {len(bns)} BatchNorms: "
          f"min {ratio.min():.2f}, median {ratio.median():.2f}, max {ratio.max():.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
