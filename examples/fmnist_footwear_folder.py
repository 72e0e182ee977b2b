"""Write a small image-folder dataset for the fine-tuning walkthrough: the three footwear classes of
Fashion-MNIST (sandal, sneaker, ankle boot) as PNGs in torchvision's ImageFolder layout
(<out>/train/<class>/*.png, <out>/val/<class>/*.png) — "your own data" in docs/training.md.

    python examples/fmnist_footwear_folder.py runs/footwear [--per-class 300]
"""
from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image

from lcnn_zoo.commands.data import build_dataset

CLASSES = {5: "sandal", 7: "sneaker", 9: "ankle_boot"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--per-class", type=int, default=300, help="training images per class (validation: a third)")
    args = ap.parse_args()
    if args.out.exists():
        raise SystemExit(f"{args.out} exists: choose a new folder")
    for split, train, n in (("train", True, args.per_class), ("val", False, max(1, args.per_class // 3))):
        ds = build_dataset("fmnist", train=train)
        counts = dict.fromkeys(CLASSES, 0)
        for i in range(len(ds)):
            x, y = ds[i]
            if y in CLASSES and counts[y] < n:
                folder = args.out / split / CLASSES[y]
                folder.mkdir(parents=True, exist_ok=True)
                Image.fromarray((x[0] * 255).round().byte().numpy(), mode="L").save(folder / f"{i}.png")
                counts[y] += 1
            if all(c == n for c in counts.values()):
                break
    print(f"wrote {args.out}: {args.per_class} train and {max(1, args.per_class // 3)} val images per class, "
          f"classes {sorted(CLASSES.values())}")


if __name__ == "__main__":
    main()
