"""Write small random stand-ins for CIFAR-10 and CIFAR-100 in torchvision's download layout
(``cifar-10-batches-py``, ``cifar-100-python``), for exercising the CIFAR code paths offline —
``examples/cifar_zoo.sh --dry-run`` uses them. Their checksums are not the official ones, so
loading them warns.

    python examples/cifar_standin.py OUT [--train 64 --test 32]
"""
from __future__ import annotations

import argparse
import pickle
from pathlib import Path

import numpy as np


def write(out: Path, n_train: int, n_test: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)

    def batch(n: int, classes: int, key: str) -> dict:
        return {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), key: rng.integers(0, classes, n).tolist()}

    c10 = out / "cifar-10-batches-py"
    c10.mkdir(parents=True, exist_ok=True)
    for i in range(1, 6):
        with open(c10 / f"data_batch_{i}", "wb") as f:
            pickle.dump(batch(n_train // 5 + (i <= n_train % 5), 10, "labels"), f)
    with open(c10 / "test_batch", "wb") as f:
        pickle.dump(batch(n_test, 10, "labels"), f)
    with open(c10 / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, f)
    c100 = out / "cifar-100-python"
    c100.mkdir(parents=True, exist_ok=True)
    for name, n in (("train", n_train), ("test", n_test)):
        with open(c100 / name, "wb") as f:
            pickle.dump(batch(n, 100, "fine_labels"), f)
    with open(c100 / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"class{i}" for i in range(100)]}, f)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--train", type=int, default=64)
    ap.add_argument("--test", type=int, default=32)
    args = ap.parse_args()
    write(args.out, args.train, args.test)
    print(f"wrote CIFAR-10/100 stand-ins ({args.train} train, {args.test} test images) to {args.out}")


if __name__ == "__main__":
    main()
