"""Write Fashion-MNIST as image folders (``<out>/train/<class>/*.png``, ``<out>/test/<class>/*.png``),
the layout timm's scripts read (validate.py, train.py, inference.py): docs/timm_scripts.md's "With timm's
scripts" uses it.

    python examples/fmnist_folders.py fmnist --train 2000 --test 1000

Reads Debian's dataset-fashion-mnist (or ``--data-dir``) through lcnn_zoo's checked reader; writes a
new folder only (refused if ``<out>`` exists), built under a temporary name and renamed when whole.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from lcnn_zoo.commands.data import build_dataset


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", help="folder to create")
    ap.add_argument("--train", type=int, default=2000, help="first N training images (0: all 60000)")
    ap.add_argument("--test", type=int, default=1000, help="first N test images (0: all 10000)")
    ap.add_argument("--data-dir", default=None, help="the idx files (default: Debian's)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if out.exists() or out.is_symlink():
        print(f"error: {str(out)[:200]!r} exists: give a new folder", file=sys.stderr)
        return 2
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    try:
        for split, n, train in (("train", args.train, True), ("test", args.test, False)):
            ds = build_dataset("fmnist", train=train, data_dir=args.data_dir)
            for i in range(n or len(ds)):
                x, y = ds[i]
                # "<label>_<name>": sorted as the labels are, as timm's ImageFolder numbers classes
                folder = tmp / split / f"{y}_{ds.classes[y].replace('/', '-').replace(' ', '-')}"
                folder.mkdir(parents=True, exist_ok=True)
                img = (x[0].numpy() * 255).round().astype(np.uint8)
                Image.fromarray(img, "L").save(folder / f"{i:05d}.png")
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    print(f"wrote {out}/train and {out}/test")
    return 0


if __name__ == "__main__":
    sys.exit(main())
