"""Write small random stand-ins for CIFAR-10 and CIFAR-100 in the datasets' official *binary*
layout (``cifar-10-batches-bin``, ``cifar-100-binary``: fixed-size records, read without
unpickling), for exercising the CIFAR code paths offline — ``examples/cifar_zoo.sh --dry-run``
uses them.

    python examples/cifar_standin.py OUT [--train 64 --test 32]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def _records(rng: np.random.Generator, n: int, classes: int, label_bytes: int) -> bytes:
    labels = rng.integers(0, classes, (n, label_bytes), dtype=np.uint8)
    pixels = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    return np.concatenate([labels, pixels], axis=1).tobytes()


def write(out: Path, n_train: int, n_test: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    c10 = out / "cifar-10-batches-bin"
    c10.mkdir(parents=True, exist_ok=True)
    for i in range(1, 6):
        (c10 / f"data_batch_{i}.bin").write_bytes(_records(rng, n_train // 5 + (i <= n_train % 5), 10, 1))
    (c10 / "test_batch.bin").write_bytes(_records(rng, n_test, 10, 1))
    (c10 / "batches.meta.txt").write_text("".join(f"class{i}\n" for i in range(10)))
    c100 = out / "cifar-100-binary"
    c100.mkdir(parents=True, exist_ok=True)
    (c100 / "train.bin").write_bytes(_records(rng, n_train, 100, 2))
    (c100 / "test.bin").write_bytes(_records(rng, n_test, 100, 2))
    (c100 / "fine_label_names.txt").write_text("".join(f"class{i}\n" for i in range(100)))
    (c100 / "coarse_label_names.txt").write_text("".join(f"super{i}\n" for i in range(20)))


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
