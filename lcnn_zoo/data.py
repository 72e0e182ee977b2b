"""Datasets for training and evaluation: CIFAR-10/100, Fashion-MNIST, image folders, HF datasets.

Every dataset yields ``(image, label)`` with ``image`` a float tensor (C, H, W) in [0, 1] — no
normalisation (the zoo's convention, see :mod:`lcnn_zoo.models`). CIFAR and Fashion-MNIST are held
in memory as uint8 tensors; augmentation (pad-and-random-crop + horizontal flip, the paper's CIFAR
recipe) runs on whole batches (:class:`BatchAugment`): timm's ``create_loader`` replaces the
dataset's transform and has no pad-4 random crop, and per-image PIL transforms would dominate a
2-core CPU's training time.
"""
from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import shutil
import warnings
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from torchvision import transforms
from torchvision.datasets import CIFAR10, CIFAR100, FashionMNIST, ImageFolder

from .errors import UserError

__all__ = ["TensorImageDataset", "BatchAugment", "build_dataset", "DataNotFoundError", "DATASETS",
           "FMNIST_SYSTEM_DIR"]

FMNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist
_FMNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte")
DATASETS = ("cifar10", "cifar100", "fmnist", "folder:<path>", "hf:<name>")


class DataNotFoundError(UserError, FileNotFoundError):
    """The data is not where we looked; the message says where and how to get it."""


class TensorImageDataset(Dataset):
    """In-memory images. ``images``: uint8 (N, C, H, W) or float in [0, 1]; ``labels``: int64 (N,)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, classes: Optional[list] = None) -> None:
        if images.dim() != 4 or images.shape[0] != labels.shape[0]:
            raise ValueError(f"images must be (N, C, H, W) with N labels, got {tuple(images.shape)} and "
                             f"{tuple(labels.shape)}")
        self.images, self.labels = images, labels.long()
        self.classes = classes or [str(i) for i in range(int(labels.max()) + 1)]

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, int]:
        x = self.images[i]
        x = x.float().div_(255.0) if x.dtype == torch.uint8 else x
        return x, int(self.labels[i])

    def subset(self, n: int, seed: int = 0) -> "TensorImageDataset":
        """A fixed random subset of ``n`` samples (the same for a given seed)."""
        g = torch.Generator().manual_seed(seed)
        idx = torch.randperm(len(self), generator=g)[:n]
        return TensorImageDataset(self.images[idx], self.labels[idx], self.classes)

    @property
    def num_classes(self) -> int:
        return len(self.classes)


class BatchAugment:
    """Random crop after zero-padding by ``pad`` pixels, and random horizontal flips, on a batch
    (B, C, H, W) at once. Deterministic given ``generator``."""

    def __init__(self, pad: int = 4, flip: bool = True) -> None:
        self.pad, self.flip = pad, flip

    def __call__(self, x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        b, _, h, w = x.shape
        if self.pad:
            p = self.pad
            xp = F.pad(x, (p, p, p, p))
            dy = torch.randint(0, 2 * p + 1, (b,), generator=generator)
            dx = torch.randint(0, 2 * p + 1, (b,), generator=generator)
            rows = (dy[:, None] + torch.arange(h)[None]).to(x.device)  # (B, H)
            cols = (dx[:, None] + torch.arange(w)[None]).to(x.device)  # (B, W)
            x = xp[torch.arange(b, device=x.device)[:, None, None, None], torch.arange(x.shape[1], device=x.device)[None, :, None, None],
                   rows[:, None, :, None], cols[:, None, None, :]]
        if self.flip:
            flip = (torch.rand(b, generator=generator) < 0.5).to(x.device)
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        return x


def _cache_dir() -> Path:
    return Path(os.environ.get("LCNN_ZOO_CACHE", Path.home() / ".cache" / "lcnn_zoo"))


def _source_key(files: Sequence[Path]) -> str:
    """A cache key for a set of source files: their resolved paths, sizes and modification times."""
    h = hashlib.sha1()
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _fmnist(root: Optional[str], train: bool, download: bool) -> TensorImageDataset:
    """Fashion-MNIST through torchvision's reader, from Debian's idx files when present.

    torchvision reads uncompressed idx files from ``<root>/FashionMNIST/raw``; the files found are
    decompressed once into a cache folder keyed by their paths, sizes and times (another
    ``--data-dir`` gets its own), each written under a per-process temporary name and renamed, so
    concurrent processes (DDP ranks on a cold cache) never write the same file.
    """
    searched = []
    sources = ([Path(root)] if root else []) + [FMNIST_SYSTEM_DIR]
    for src in sources:
        searched.append(str(src))
        gz = [src / f"{n}.gz" for n in _FMNIST_FILES]
        raw = [src / n for n in _FMNIST_FILES]
        found = raw if all(p.is_file() for p in raw) else gz if all(p.is_file() for p in gz) else None
        if found is None:
            continue
        dest = _cache_dir() / "fashion-mnist" / _source_key(found)
        raw_dir = dest / "FashionMNIST" / "raw"
        raw_dir.mkdir(parents=True, exist_ok=True)
        for name, path in zip(_FMNIST_FILES, found):
            target = raw_dir / name
            if target.is_file():
                continue
            tmp = target.with_name(f".{name}.tmp{os.getpid()}")
            try:
                if path.suffix == ".gz":
                    with gzip.open(path, "rb") as f_in, open(tmp, "wb") as f_out:
                        shutil.copyfileobj(f_in, f_out)
                else:
                    shutil.copyfile(path, tmp)
                os.replace(tmp, target)
            finally:
                if tmp.exists():
                    tmp.unlink()
        ds = FashionMNIST(str(dest), train=train, download=False)
        return TensorImageDataset(ds.data.unsqueeze(1).contiguous(), ds.targets, list(ds.classes))
    if download:
        dest = Path(root) if root else _cache_dir() / "fashion-mnist"
        ds = FashionMNIST(str(dest), train=train, download=True)
        return TensorImageDataset(ds.data.unsqueeze(1).contiguous(), ds.targets, list(ds.classes))
    raise DataNotFoundError(
        f"Fashion-MNIST not found (looked in {', '.join(searched)} for {_FMNIST_FILES[0]}[.gz] etc.). "
        f"Install Debian's package (apt-get install dataset-fashion-mnist), pass --data-dir with the idx files, "
        f"or add --download to fetch it with torchvision.")


def _cifar(name: str, root: Optional[str], train: bool, download: bool) -> TensorImageDataset:
    """CIFAR-10/100 through torchvision. Files whose checksums differ from the official download (a
    re-packed copy, or the stand-ins ``examples/cifar_standin.py`` writes) load with a warning."""
    base = CIFAR10 if name == "cifar10" else CIFAR100

    class _Checked(base):
        def _check_integrity(self) -> bool:
            if super()._check_integrity():
                return True
            folder = Path(self.root) / self.base_folder
            present = all((folder / f).is_file() for f, _ in self.train_list + self.test_list)
            if present:
                warnings.warn(f"{folder}: the files' checksums differ from the official {name.upper()} download",
                              stacklevel=2)
            return present

        def _load_meta(self) -> None:  # torchvision's, without its checksum test (done above, with a warning)
            path = Path(self.root) / self.base_folder / self.meta["filename"]
            if not path.is_file():
                raise RuntimeError(f"{path} not found")
            with open(path, "rb") as f:
                self.classes = pickle.load(f, encoding="latin1")[self.meta["key"]]
            self.class_to_idx = {c: i for i, c in enumerate(self.classes)}

    dest = Path(root) if root else _cache_dir() / name
    try:
        ds = _Checked(str(dest), train=train, download=download)
    except RuntimeError as e:
        raise DataNotFoundError(
            f"{name.upper()} not found in {dest} ({e}). Add --download to fetch it with torchvision, or pass "
            f"--data-dir pointing at the folder that contains '{base.base_folder}'.") from e
    images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
    return TensorImageDataset(images, torch.tensor(ds.targets), list(ds.classes))


class _Folder(Dataset):
    """torchvision's ImageFolder with the class list given (the training split's, so a val/ that
    lacks a class keeps the same label numbers), images that fail to load named, and images of
    different sizes (without a resize) reported with the option that fixes it."""

    def __init__(self, root: Path, classes: List[str], transform, resized: bool) -> None:
        class _Fixed(ImageFolder):
            def find_classes(self, directory):
                found = sorted(e.name for e in os.scandir(directory) if e.is_dir())
                extra = sorted(set(found) - set(classes))
                if extra:
                    raise UserError(f"{directory} has classes the training split does not: {extra}")
                return classes, {c: i for i, c in enumerate(classes)}

        self.inner = _Fixed(str(root), transform=transform, allow_empty=True)
        if not len(self.inner):
            raise DataNotFoundError(f"image folder {root} holds no images")
        self.classes = list(classes)
        self.resized = resized
        self._shape: Optional[Tuple[int, ...]] = None

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, i: int):
        path = self.inner.samples[i][0]
        try:
            x, y = self.inner[i]
        except Exception as e:  # noqa: BLE001 - PIL raises many types for bad files
            raise UserError(f"cannot read image {path}: {e}") from e
        if self._shape is None:
            self._shape = tuple(x.shape)
        elif tuple(x.shape) != self._shape and not self.resized:
            raise UserError(f"image {path} is {tuple(x.shape[1:])} (H, W), other images are {self._shape[1:]}: pass "
                            f"--input-size C H W to resize every image to one size")
        return x, y


def _folder(path: str, train: bool, image_size: Optional[Tuple[int, int]], channels: Optional[int],
            classes: Optional[List[str]], eval_on_train: bool) -> Dataset:
    root = Path(path)
    if not root.is_dir():
        raise DataNotFoundError(f"image folder {root} does not exist (expected <root>/train/<class>/*.png and "
                                f"<root>/val/<class>/*.png)")
    train_dir = root / "train" if (root / "train").is_dir() else root
    if train:
        split = train_dir
    else:
        split = next((root / n for n in ("val", "test") if (root / n).is_dir()), None)
        if split is None:
            if not eval_on_train:
                raise UserError(f"image folder {root} has no val/ (or test/) split to evaluate on: add one, or pass "
                                f"--eval-on-train to evaluate on the training images")
            split = train_dir
    if classes is None:
        classes = sorted(e.name for e in os.scandir(train_dir) if e.is_dir())
    channels = channels or 3
    tf = [transforms.Grayscale(1)] if channels == 1 else [transforms.Lambda(lambda im: im.convert("RGB"))]
    if image_size is not None:
        tf.append(transforms.Resize(tuple(image_size)))
    tf.append(transforms.ToTensor())
    return _Folder(split, classes, transforms.Compose(tf), resized=image_size is not None)


def _hf(name: str, train: bool, image_size: Optional[Tuple[int, int]], channels: int) -> Dataset:
    try:
        import datasets as hfds
    except ImportError as e:
        raise DataNotFoundError(f"hf:{name} needs the 'datasets' package: pip install datasets") from e
    split = "train" if train else "test"
    try:
        ds = hfds.load_dataset(name, split=split)
    except Exception as e:  # noqa: BLE001 - datasets raises many types
        raise DataNotFoundError(f"could not load Hugging Face dataset '{name}' split '{split}': {e}") from e
    image_key = next((k for k in ("image", "img") if k in ds.column_names), None)
    label_key = next((k for k in ("label", "labels", "fine_label") if k in ds.column_names), None)
    if image_key is None or label_key is None:
        raise UserError(f"hf:{name}: no image/label columns in {ds.column_names}")
    tf = [transforms.Grayscale(1)] if channels == 1 else [transforms.Lambda(lambda im: im.convert("RGB"))]
    if image_size is not None:
        tf.append(transforms.Resize(tuple(image_size)))
    tf = transforms.Compose(tf + [transforms.ToTensor()])

    class _Wrapped(Dataset):
        def __len__(self) -> int:
            return len(ds)

        def __getitem__(self, i: int):
            row = ds[int(i)]
            return tf(row[image_key]), int(row[label_key])

    return _Wrapped()


def build_dataset(name: str, *, train: bool, data_dir: Optional[str] = None, download: bool = False,
                  image_size: Optional[Tuple[int, int]] = None, channels: Optional[int] = None,
                  classes: Optional[List[str]] = None, eval_on_train: bool = False) -> Dataset:
    """Return the ``train`` or test split of ``name``.

    Args:
        name: "cifar10", "cifar100", "fmnist", "folder:<path>" (ImageFolder layout) or "hf:<dataset name>".
        data_dir: where the data lives (CIFAR: torchvision's layout; Fashion-MNIST: the idx files;
            default: Debian's /usr/share/datasets/fashion-mnist, or ~/.cache/lcnn_zoo).
        download: let torchvision download CIFAR / Fashion-MNIST when missing.
        image_size, channels: for folder/HF datasets (resize and convert; default 3 channels).
        classes: a folder's class list (the training split's), so every split numbers classes alike.
        eval_on_train: a folder without val/ or test/ evaluates on its training images (else: an error).
    """
    key = name.lower()
    if key in ("cifar10", "cifar100"):
        return _cifar(key, data_dir, train, download)
    if key in ("fmnist", "fashion-mnist", "fashion_mnist"):
        return _fmnist(data_dir, train, download)
    if key.startswith("folder:"):
        return _folder(name.split(":", 1)[1], train, image_size, channels, classes, eval_on_train)
    if key.startswith("hf:"):
        return _hf(name.split(":", 1)[1], train, image_size, channels or 3)
    raise UserError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")


def num_classes_of(ds: Dataset) -> int:
    """Number of classes of a dataset built by :func:`build_dataset`."""
    classes = getattr(ds, "classes", None)
    if classes is not None:
        return len(classes)
    raise UserError("cannot infer the number of classes; pass --num-classes")


