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
import logging
import os
import shutil
import threading
import zlib
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Sized, Tuple, cast

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from timm.data import ImageDataset
from torch.utils.data import Dataset, Subset
from torchvision import transforms
from torchvision.datasets import CIFAR10, CIFAR100, FashionMNIST, ImageFolder
from torchvision.datasets.utils import check_integrity

from ..errors import UserError, shown
from .writing import atomic_write

__all__ = ["TensorImageDataset", "subset", "BatchAugment", "build_dataset", "describe_dataset", "DataInfo",
           "DataNotFoundError", "DataSource", "SOURCES", "DATASETS", "TORCH_DATASETS", "dataset_source",
           "FMNIST_SYSTEM_DIR", "read_image", "folder_classes"]

FMNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist
_FMNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte")


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
        """The number of classes (of names in ``classes``)."""
        return len(self.classes)

    def to_size(self, channels: Optional[int], size: Optional[Tuple[int, int]]) -> "TensorImageDataset":
        """The images converted to ``channels`` (grey → RGB by replication, RGB → grey by ITU-R 601
        luma, as PIL's ``convert("L")``) and resized to ``size`` = (H, W) (bilinear, antialiased),
        so a model built for ``--input-size`` is trained and measured at that size."""
        x = self.images
        if channels is not None and channels != x.shape[1]:
            if x.shape[1] == 1:
                x = x.expand(-1, channels, -1, -1).contiguous()
            elif x.shape[1] == 3 and channels == 1:
                w = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
                y = (x.float() * w).sum(1, keepdim=True)
                x = y.round_().clamp_(0, 255).to(torch.uint8) if x.dtype == torch.uint8 else y
            else:
                raise UserError(f"cannot convert {x.shape[1]}-channel images to {channels} channels (--input-size)")
        if size is not None and tuple(size) != tuple(x.shape[2:]):
            x = transforms.functional.resize(x, list(size), antialias=True)
        return self if x is self.images else TensorImageDataset(x, self.labels, self.classes)


class BatchAugment:
    """Training augmentation of a batch (B, C, H, W) of [0, 1] images: random crop after zero-padding by
    ``pad`` pixels and random horizontal / vertical flips (probabilities ``hflip``, ``vflip``) on the
    whole batch at once, deterministic given ``generator``; then, optionally, a timm AutoAugment /
    RandAugment / AugMix policy per image (``aa``, timm's config string, on PIL images as timm applies
    it) and timm's RandomErasing (``reprob``, ``remode``, ``recount``). The last two draw from
    Python's ``random``, as in timm."""

    def __init__(self, pad: int = 4, flip: bool = True, *, hflip: float = 0.5, vflip: float = 0.0,
                 aa: Optional[str] = None, reprob: float = 0.0, remode: str = "pixel", recount: int = 1,
                 image_size: Optional[Tuple[int, int]] = None) -> None:
        self.pad = pad
        self.hflip = hflip if flip else 0.0
        self.vflip = vflip
        self.policy = auto_augment(aa, image_size or (32, 32)) if aa else None
        self.reprob, self.remode, self.recount = reprob, remode, recount

    def __call__(self, x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """The augmented batch (``x`` itself is not modified)."""
        b, _, h, w = x.shape
        if self.pad:
            p = self.pad
            xp = F.pad(x, (p, p, p, p))
            dy = torch.randint(0, 2 * p + 1, (b,), generator=generator)
            dx = torch.randint(0, 2 * p + 1, (b,), generator=generator)
            rows = (dy[:, None] + torch.arange(h)[None]).to(x.device)  # (B, H)
            cols = (dx[:, None] + torch.arange(w)[None]).to(x.device)  # (B, W)
            x = xp[torch.arange(b, device=x.device)[:, None, None, None],
                   torch.arange(x.shape[1], device=x.device)[None, :, None, None],
                   rows[:, None, :, None], cols[:, None, None, :]]
        for prob, dim in ((self.hflip, -1), (self.vflip, -2)):
            if prob > 0:
                flip = (torch.rand(b, generator=generator) < prob).to(x.device)
                x = torch.where(flip[:, None, None, None], x.flip(dim), x)
        if self.policy is not None:
            x = torch.stack([_pil_augment(self.policy, img) for img in x.cpu()]).to(x.device)
        if self.reprob > 0:
            from timm.data.random_erasing import RandomErasing

            x = RandomErasing(self.reprob, mode=self.remode, max_count=self.recount, device=x.device)(x.clone())
        return x


def auto_augment(config: str, image_size: Tuple[int, int]) -> Callable:
    """timm's augmentation policy for a config string, as timm's transform factory builds it
    (``rand-…`` RandAugment, ``augmix-…`` AugMix, else AutoAugment: ``original``, ``v0``, …;
    fill 0 for the zoo's unnormalised inputs). Raises ValueError for a string timm does not parse."""
    from timm.data.auto_augment import augment_and_mix_transform, auto_augment_transform, rand_augment_transform
    hparams = dict(translate_const=int(min(image_size) * 0.45), img_mean=(0, 0, 0))
    try:
        if config.startswith("rand"):
            return rand_augment_transform(config, hparams)
        if config.startswith("augmix"):
            hparams["translate_pct"] = 0.3
            return augment_and_mix_transform(config, hparams)
        return auto_augment_transform(config, hparams)
    except (AssertionError, KeyError, ValueError, IndexError, ImportError) as e:
        raise ValueError(f"timm cannot parse the augmentation policy {config[:80]!r} ({type(e).__name__})") from e


def _pil_augment(policy: Callable, img: torch.Tensor) -> torch.Tensor:
    """One (C, H, W) [0, 1] image through a PIL policy (grey images as RGB, averaged back to one channel)."""
    from torchvision.transforms.functional import pil_to_tensor, to_pil_image
    grey = img.shape[0] == 1
    pil = to_pil_image(img.expand(3, -1, -1) if grey else img)
    out = pil_to_tensor(policy(pil)).float().div_(255.0)
    return out.mean(0, keepdim=True) if grey else out


def _cache_dir() -> Path:
    from ..environment import env

    return Path(env("LCNN_ZOO_CACHE"))


def _source_key(files: Sequence[Path]) -> str:
    """A cache key for a set of source files: their resolved paths, sizes and modification times."""
    h = hashlib.sha1()
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def fmnist_files(root: Optional[str]) -> Optional[List[Path]]:
    """The four Fashion-MNIST idx files (raw or .gz) in ``root``, else in Debian's folder when no
    ``root`` is given; None when they are not there. An explicit ``root`` is never replaced by
    another copy: a mistyped ``--data-dir`` is an error, not a silent fallback."""
    for src in ([Path(root)] if root else [FMNIST_SYSTEM_DIR]):
        gz = [src / f"{n}.gz" for n in _FMNIST_FILES]
        raw = [src / n for n in _FMNIST_FILES]
        found = raw if all(p.is_file() for p in raw) else gz if all(p.is_file() for p in gz) else None
        if found is not None:
            return found
    return None


def _idx_count(path: Path) -> int:
    """The image count in an idx images file's header (its first 8 bytes: magic 2051, count), raw or
    gzip-compressed; a header that cannot be read is the error loading it would raise."""
    try:
        with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as f:
            head = f.read(8)
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise UserError(f"{shown(Path(path))} is truncated or corrupted ({e}): restore it (Debian: apt-get "
                        f"install --reinstall dataset-fashion-mnist)") from e
    if len(head) < 8 or int.from_bytes(head[:4], "big") != 2051:
        raise UserError(f"the Fashion-MNIST files in {shown(Path(path.parent))} are damaged ({path.name} does not "
                        f"start as an idx images file): restore them")
    return int.from_bytes(head[4:], "big")


def _fmnist(root: Optional[str], train: bool, download: bool) -> TensorImageDataset:
    """Fashion-MNIST through torchvision's reader, from Debian's idx files when present.

    torchvision reads uncompressed idx files from ``<root>/FashionMNIST/raw``; the files found are
    decompressed once into a cache folder keyed by their paths, sizes and times (another
    ``--data-dir`` gets its own), each written atomically (:func:`~lcnn_zoo.commands.writing.atomic_write`),
    so concurrent processes (DDP ranks on a cold cache) never write the same file.
    """
    found = fmnist_files(root)
    if found is not None:
        cache = _cache_dir()
        dest = cache / "fashion-mnist" / _source_key(found)
        raw_dir = dest / "FashionMNIST" / "raw"
        for name, path in zip(_FMNIST_FILES, found):
            target = raw_dir / name
            if target.is_file():
                continue
            try:
                if path.suffix == ".gz":
                    with gzip.open(path, "rb") as f_in:
                        atomic_write(target, lambda f_out: shutil.copyfileobj(f_in, f_out))
                else:
                    atomic_write(target, lambda f_out: f_out.write(path.read_bytes()))
            except (EOFError, zlib.error, gzip.BadGzipFile) as e:
                raise UserError(f"{shown(Path(path))} is truncated or corrupted ({e}): restore it (Debian: apt-get "
                                f"install --reinstall dataset-fashion-mnist)") from e
            except UserError as e:
                raise UserError(f"cannot write the Fashion-MNIST cache under {shown(Path(cache))} ($LCNN_ZOO_CACHE): "
                                f"{e}") from e
        try:
            ds = FashionMNIST(str(dest), train=train, download=False)
        except (RuntimeError, ValueError, AssertionError) as e:
            raise UserError(f"the Fashion-MNIST files in {shown(Path(found[0].parent))} are damaged ({e}): restore "
                            f"them") from e
        return TensorImageDataset(ds.data.unsqueeze(1).contiguous(), ds.targets, list(ds.classes))
    if download:
        dest = Path(root) if root else _cache_dir() / "fashion-mnist"
        ds = FashionMNIST(str(dest), train=train, download=True)
        return TensorImageDataset(ds.data.unsqueeze(1).contiguous(), ds.targets, list(ds.classes))
    where = shown(Path(root)) if root else str(FMNIST_SYSTEM_DIR)
    raise DataNotFoundError(
        f"Fashion-MNIST not found in {where} (looked for {_FMNIST_FILES[0]}[.gz] and the other three idx files). "
        + (f"Check --data-dir, or leave it out to use Debian's copy ({FMNIST_SYSTEM_DIR}, apt-get install "
           f"dataset-fashion-mnist), " if root else
           "Install Debian's package (apt-get install dataset-fashion-mnist), pass --data-dir with the idx files, ")
        + "or add --download to fetch it with torchvision.")


#: CIFAR's binary version (the official ``*-binary.tar.gz``): fixed-size records, read without unpickling
_CIFAR_BINARY: Dict[str, Dict[str, Any]] = {
    "cifar10": dict(folder="cifar-10-batches-bin", train=[f"data_batch_{i}.bin" for i in range(1, 6)],
                    test=["test_batch.bin"], names="batches.meta.txt", label_bytes=1, classes=10),
    "cifar100": dict(folder="cifar-100-binary", train=["train.bin"], test=["test.bin"],
                     names="fine_label_names.txt", label_bytes=2, classes=100),
}


def _cifar_names(name: str, folder: Path) -> List[str]:
    """The class names of CIFAR's binary version (its names file), as many as the dataset has classes."""
    spec = _CIFAR_BINARY[name]
    names_file = folder / spec["names"]
    if not names_file.is_file():
        raise DataNotFoundError(f"{shown(Path(folder))} lacks {spec['names']} (the class names)")
    classes = [ln.strip() for ln in names_file.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    if len(classes) != spec["classes"]:
        raise UserError(f"{shown(Path(names_file))} lists {len(classes)} class names, {name.upper()} has "
                        f"{spec['classes']}")
    return classes


def _binary_batches(name: str, folder: Path, train: bool) -> List[Tuple[Path, int]]:
    """The binary batches of a split with their record counts, from the files' sizes alone: each
    must exist and hold whole records (the label byte(s) then 3,072 pixel bytes)."""
    spec = _CIFAR_BINARY[name]
    record = spec["label_bytes"] + 3072
    batches = []
    for fname in spec["train" if train else "test"]:
        path = folder / fname
        if not path.is_file():
            raise DataNotFoundError(f"{shown(Path(path))} not found ({name.upper()} binary version)")
        size = path.stat().st_size
        if size == 0 or size % record:
            raise UserError(f"{shown(Path(path))} is not a {name.upper()} binary batch (size {size} is not a "
                            f"multiple of {record} bytes): truncated or another file")
        batches.append((path, size // record))
    return batches


def _cifar_binary(name: str, folder: Path, train: bool) -> TensorImageDataset:
    """CIFAR's binary version: each record is the label byte(s) then 3,072 pixel bytes (CIFAR-100:
    coarse then fine label). Only ``numpy.frombuffer`` touches the bytes; sizes and labels are checked."""
    spec = _CIFAR_BINARY[name]
    record = spec["label_bytes"] + 3072
    classes = _cifar_names(name, folder)
    chunks = [np.fromfile(path, dtype=np.uint8, count=n * record).reshape(n, record)
              for path, n in _binary_batches(name, folder, train)]
    data = np.concatenate(chunks)
    labels = torch.from_numpy(data[:, spec["label_bytes"] - 1].astype(np.int64))
    if int(labels.max()) >= spec["classes"]:
        raise UserError(f"{shown(Path(folder))} holds labels up to {int(labels.max())}, {name.upper()} has "
                        f"{spec['classes']} classes: not a {name.upper()} binary batch")
    images = torch.from_numpy(data[:, spec["label_bytes"]:].copy()).view(-1, 3, 32, 32)
    return TensorImageDataset(images, labels, classes)


def _cifar(name: str, root: Optional[str], train: bool, download: bool) -> TensorImageDataset:
    """CIFAR-10/100: the binary version when present (read without unpickling), else torchvision's
    own loader of the python version, which unpickles its files only after they match the official
    download's checksums. A python-version folder whose files differ is refused, never unpickled
    (a pickle can run code): convert a re-packed copy to the binary layout."""
    base = CIFAR10 if name == "cifar10" else CIFAR100
    dest = Path(root) if root else _cache_dir() / name
    binary = dest / _CIFAR_BINARY[name]["folder"]
    if binary.is_dir():
        return _cifar_binary(name, binary, train)
    folder = dest / base.base_folder
    if folder.is_dir():
        files = base.train_list + base.test_list + [(base.meta["filename"], base.meta["md5"])]
        differ = [f for f, md5 in files if (folder / f).is_file() and not check_integrity(str(folder / f), md5)]
        if differ:
            raise UserError(f"{shown(Path(folder))}: {', '.join(differ[:3])} differ from the official {name.upper()} "
                            f"download; this format is a pickle, which lcnn-zoo unpickles only when torchvision's "
                            f"checksums match. Use the official files, or the binary layout "
                            f"({_CIFAR_BINARY[name]['folder']}/, read without unpickling)")
    try:
        ds = base(str(dest), train=train, download=download)
    except RuntimeError as e:
        raise DataNotFoundError(
            f"{name.upper()} not found in {shown(Path(dest))} ({e}). Add --download to fetch it with torchvision, or "
            f"pass --data-dir pointing at the folder that contains '{base.base_folder}' or "
            f"'{_CIFAR_BINARY[name]['folder']}'.") from e
    images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
    return TensorImageDataset(images, torch.tensor(ds.targets), list(ds.classes))


def read_image(path: str, channels: int) -> torch.Tensor:
    """An image file as a float tensor (C, H, W) in [0, 1], scaled by its bit depth: a 16-bit PNG
    (PIL mode ``I;16``/``I``) is divided by 65535, not clipped at 255 as ``convert("RGB")`` would;
    every other mode is converted to grey (``L``) or ``RGB`` and divided by 255."""
    from PIL import Image

    with Image.open(path) as im:
        if im.mode.startswith("I"):  # 16-bit grey (I;16, I;16B, …) or 32-bit integer read from one
            grey = torch.from_numpy(np.asarray(im, dtype=np.int32).clip(0, 65535).astype(np.float32) / 65535.0)[None]
            return grey if channels == 1 else grey.expand(3, -1, -1).contiguous()
        if im.mode == "F":
            raise UserError(f"image {shown(path)} holds floating-point pixels (PIL mode F): save it as an 8- or 16-bit "
                            f"PNG")
        arr = np.asarray(im.convert("L" if channels == 1 else "RGB"), dtype=np.uint8)
    x = torch.from_numpy(arr.copy()).view(arr.shape[0], arr.shape[1], -1).permute(2, 0, 1)
    return x.float().div_(255.0).contiguous()


def _split_dir(root: Path, split: str) -> Path:
    """``root/<split>`` for a split named by the user (timm's --train-split/--val-split), which must exist."""
    if Path(split).name != split or split in (".", ".."):
        raise UserError(f"split {shown(split)} must be a sub-folder name of {shown(Path(root))}")
    if not (root / split).is_dir():
        raise DataNotFoundError(f"image folder {shown(Path(root))} has no {shown(split)} split (sub-folder)")
    return root / split


def folder_classes(path: str, train_split: Optional[str] = None) -> List[str]:
    """The class names of an image folder (its ``train/`` split's sub-folders, or ``train_split``'s),
    at least two."""
    root = Path(path)
    if not root.is_dir():
        raise DataNotFoundError(f"image folder {shown(Path(root))} does not exist (expected <root>/train/<class>/*.png "
                                f"and <root>/val/<class>/*.png)")
    if train_split is not None:
        train_dir = _split_dir(root, train_split)
    else:
        train_dir = root / "train" if (root / "train").is_dir() else root
    classes = sorted(e.name for e in os.scandir(train_dir) if e.is_dir())
    if len(classes) < 2:
        raise UserError(f"image folder {shown(Path(train_dir))} has {len(classes)} class folder(s): a classifier needs "
                        f"at least 2 (one sub-folder of images per class)")
    return classes


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _check_links(split: Path, classes: List[str]) -> None:
    """torchvision's ImageFolder follows symbolic links: a link back to a folder above it would list
    images again (under the wrong class, ~40 times over), and one into another class's folder would
    label that class's images as this one's. Both are refused, naming the link."""
    reals = {c: os.path.realpath(split / c) for c in classes if (split / c).is_dir()}
    for c, real_c in reals.items():
        for dirpath, dirnames, _ in os.walk(split / c, followlinks=True):
            here = os.path.realpath(dirpath)
            for d in dirnames:
                full = os.path.join(dirpath, d)
                if not os.path.islink(full):
                    continue
                target = os.path.realpath(full)
                if _inside(here, target):
                    raise UserError(f"{shown(Path(full))} links back to a folder above it: its images would be read "
                                    f"again and again; remove the link")
                other = next((o for o, r in reals.items()
                              if o != c and (_inside(target, r) or _inside(r, target))), None)
                if other is not None:
                    raise UserError(f"{shown(Path(full))} (class {shown(c)}) links into the folder of class "
                                    f"{shown(other)}: its images would get both labels; remove the link")


class _Folder(Dataset):
    """torchvision's ImageFolder with the class list given (the training split's, so a val/ that
    lacks a class keeps the same label numbers), images that fail to load named, and images of
    different sizes (without a resize) reported with the option that fixes it."""

    def __init__(self, root: Path, classes: List[str], transform, resized: bool, loader) -> None:
        class _Fixed(ImageFolder):
            def find_classes(self, directory):
                found = sorted(e.name for e in os.scandir(directory) if e.is_dir())
                extra = sorted(set(found) - set(classes))
                if extra:
                    raise UserError(f"{directory} has classes the training split does not: {extra}")
                return classes, {c: i for i, c in enumerate(classes)}

        _check_links(root, classes)
        self.inner = _Fixed(str(root), transform=transform, allow_empty=True, loader=loader)
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
            classes: Optional[List[str]], eval_on_train: bool, split_name: Optional[str] = None) -> Dataset:
    root = Path(path)
    found = folder_classes(path, split_name if train else None)
    train_dir = root / "train" if (root / "train").is_dir() else root
    split: Optional[Path]
    if split_name is not None:
        split = _split_dir(root, split_name)
    elif train:
        split = train_dir
    else:
        split = next((root / n for n in ("val", "test") if (root / n).is_dir()), None)
        if split is None:
            if not eval_on_train:
                raise UserError(f"image folder {shown(Path(root))} has no val/ (or test/) split to evaluate on: add "
                                f"one, or pass --eval-on-train to evaluate on the training images")
            split = train_dir
    tf = transforms.Resize(tuple(image_size), antialias=True) if image_size is not None else None
    return _Folder(split, classes or found, tf, resized=image_size is not None,
                   loader=partial(read_image, channels=channels or 3))


def _require_datasets(name: str) -> None:
    """``hf:`` datasets need the optional ``datasets`` package: without it, one line saying how to get it."""
    try:
        import datasets  # noqa: F401
    except ImportError as e:
        raise DataNotFoundError(f"hf:{name} needs the 'datasets' package: pip install datasets") from e


#: the columns an ``hf:`` dataset's images and labels are read from: the first of each that it has
_HF_IMAGE_COLUMNS = ("image", "img")
_HF_LABEL_COLUMNS = ("label", "labels", "fine_label")


def _hf(name: str, train: bool, image_size: Optional[Tuple[int, int]], channels: int) -> Dataset:
    """A Hugging Face dataset's ``train`` or ``test`` split, read by timm (``create_dataset("hfds/<name>")``,
    no remote code): images converted to grey (``L``) for one channel, else RGB, resized to ``image_size``
    and made [0, 1] tensors; ``classes`` are its label feature's names (when it has them). The columns
    are the first of :data:`_HF_IMAGE_COLUMNS` and of :data:`_HF_LABEL_COLUMNS` it has: timm reads the
    columns it is given, so the split is opened once first to see them (timm's open reuses its cache)."""
    _require_datasets(name)
    import datasets as hfds

    split = "train" if train else "test"
    try:
        columns = hfds.load_dataset(name, split=split).column_names
    except Exception as e:  # noqa: BLE001 - datasets raises many types
        raise DataNotFoundError(f"could not load Hugging Face dataset '{name}' split '{split}': {e}") from e
    image_key = next((k for k in _HF_IMAGE_COLUMNS if k in columns), None)
    label_key = next((k for k in _HF_LABEL_COLUMNS if k in columns), None)
    if image_key is None or label_key is None:
        raise UserError(f"hf:{name}: no image/label columns in {columns}")
    resize = [transforms.Resize(tuple(image_size))] if image_size is not None else []
    try:  # (what timm's create_dataset("hfds/<name>") builds, with the class that does not skip images)
        ds = _UnskippingImageDataset(None, reader=f"hfds/{name}", split=split, trust_remote_code=False,
                                     input_img_mode="L" if channels == 1 else "RGB",
                                     transform=transforms.Compose(resize + [transforms.ToTensor()]),
                                     input_key=image_key, target_key=label_key)
        ds.source = f"hf:{shown(name)} ({split} split)"
    except Exception as e:  # noqa: BLE001 - as above
        raise DataNotFoundError(f"could not load Hugging Face dataset '{name}' split '{split}': {e}") from e
    index = ds.reader.class_to_idx  # {name: label} of a ClassLabel column, {} for plain integers
    if index:
        ds.classes = sorted(index, key=index.__getitem__)
    return ds


class _UnskippingImageDataset(ImageDataset):
    """timm's ``ImageDataset``, refusing an image it cannot read. timm's skips it (one log line) and
    returns the next image with the next image's label, so an evaluation would measure another set
    than the one named and a training run would see a duplicate: here it is one line naming the image."""

    source = "an image dataset"
    classes: Optional[List[str]] = None  # (names of the label feature's classes, set by _hf)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._max_retries = 1  # timm's count of images to try (it has no public setting): the asked one only

    def __getitem__(self, index: int) -> Any:
        _READING.active = True  # (timm's "Skipped sample" log line would say the opposite of what happens)
        try:
            return super().__getitem__(index)
        except (RuntimeError, Image.DecompressionBombError) as e:
            # timm's "Failed to load 1 consecutive samples" (an OSError it caught), or PIL's refusal of an
            # image claiming more pixels than it decodes (not an OSError: timm passes it on)
            if isinstance(e, RuntimeError) and not str(e).startswith("Failed to load"):
                raise
            raise DataNotFoundError(f"{self.source}: image {index} cannot be read (not an image, damaged, or more "
                                    f"pixels than PIL decodes): repair or remove it") from e
        finally:
            _READING.active = False


class _QuietWhileReading(logging.Filter):
    """Drops timm's dataset log records while an :class:`_UnskippingImageDataset` reads (only then)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(_READING, "active", False)


_READING = threading.local()
logging.getLogger(ImageDataset.__module__).addFilter(_QuietWhileReading())


@dataclass
class DataInfo:
    """What a dataset is, read from its metadata alone (no images loaded): ``classes`` (names, or
    None where only the count is known), ``num_classes``, ``channels`` and ``size`` = (H, W) as
    stored (None: per image, converted on loading), ``images`` = (training, test) image counts
    (None where only loading counts them) and whether it is held ``in_memory`` (resized whole when
    loaded). ``name`` is the dataset as given and ``source`` its entry of :data:`SOURCES`, which
    :meth:`build` loads it with."""

    num_classes: Optional[int]
    classes: Optional[List[str]] = None
    channels: Optional[int] = None
    size: Optional[Tuple[int, int]] = None
    images: Optional[Tuple[int, int]] = None
    in_memory: bool = False
    name: str = ""
    source: Optional["DataSource"] = field(default=None, repr=False, compare=False)

    def build(self, *, train: bool, **options: Any) -> Dataset:
        """The ``train`` or test split of the dataset described: :meth:`DataSource.build` of its entry,
        with :func:`build_dataset`'s options."""
        if self.source is None:
            raise ValueError("this DataInfo was not made by describe_dataset: it names no source to build from")
        return self.source.build(self.source.argument(self.name), train=train, **options)


class DataSource:
    """One entry of the dataset table (:data:`SOURCES`): what a dataset is, from its metadata alone
    (:meth:`describe`), and how it is loaded (:meth:`build`), side by side so the two halves agree.

    ``name`` is the dataset as typed (``cifar10``) or, for a family of datasets named by a prefix, its
    pattern (``folder:<path>``); ``aliases`` are other spellings; ``timm_name`` is its name in timm
    train.py's ``--dataset`` (``torch/cifar10``); ``title``, ``hub_id``: how a model card names it and
    the Hub's copy of it; ``folder_splits``: it has sub-folder splits (``--train-split``/``--val-split``).
    """

    name: str = ""
    aliases: Tuple[str, ...] = ()
    timm_name: Optional[str] = None
    title: Optional[str] = None
    hub_id: Optional[str] = None
    folder_splits = False

    @property
    def prefix(self) -> Optional[str]:
        """The prefix that names this family of datasets (``folder:``), None for a single dataset."""
        return self.name.split("<", 1)[0] if "<" in self.name else None

    def argument(self, name: str) -> str:
        """What :meth:`describe` and :meth:`build` are given of dataset ``name``: the text after the
        prefix as typed (a folder's path, a Hugging Face name), or the plain name in lower case."""
        return name[len(self.prefix):] if self.prefix is not None else name.lower()

    def describe(self, arg: str, *, data_dir: Optional[str] = None, download: bool = False,
                 splits: Tuple[Optional[str], Optional[str]] = (None, None)) -> DataInfo:
        """What :meth:`build` would load (see :func:`describe_dataset`); ``arg`` is the text after the prefix."""
        raise NotImplementedError

    def build(self, arg: str, *, train: bool, data_dir: Optional[str] = None, download: bool = False,
              image_size: Optional[Tuple[int, int]] = None, channels: Optional[int] = None,
              classes: Optional[List[str]] = None, eval_on_train: bool = False, split: Optional[str] = None) -> Dataset:
        """The ``train`` or test split (see :func:`build_dataset`); ``arg`` is the text after the prefix."""
        raise NotImplementedError


class _InMemory(DataSource):
    """A dataset held in memory as uint8 (N, C, H, W) and resized whole when loaded: ``stored`` is
    its (C, H, W) on disk, ``official`` the official files' (training, test) image counts."""

    num_classes: int
    stored: Tuple[int, int, int]
    official: Tuple[int, int]

    def _info(self, classes: Optional[List[str]], images: Tuple[int, int]) -> DataInfo:
        c, h, w = self.stored
        return DataInfo(self.num_classes, classes, c, (h, w), images, in_memory=True)

    @staticmethod
    def _check_data_dir(data_dir: Optional[str]) -> None:
        """An explicit ``--data-dir`` must be a folder (never replaced by another copy of the data)."""
        if data_dir is not None and not Path(data_dir).is_dir():
            raise DataNotFoundError(f"--data-dir {shown(Path(data_dir))} does not exist or is not a folder")

    def _load(self, data_dir: Optional[str], train: bool, download: bool) -> TensorImageDataset:
        raise NotImplementedError

    def build(self, arg: str, *, train: bool, data_dir: Optional[str] = None, download: bool = False,
              image_size: Optional[Tuple[int, int]] = None, channels: Optional[int] = None,
              **_: Any) -> Dataset:
        """The split, converted to ``channels`` and resized to ``image_size`` (:meth:`TensorImageDataset.to_size`)."""
        self._check_data_dir(data_dir)
        return self._load(data_dir, train, download).to_size(channels, image_size)


class _Cifar(_InMemory):
    """CIFAR-10 / CIFAR-100 (see :func:`_cifar`): the binary version's class names and image counts are
    read from its names file and its batches' sizes; the python version is torchvision's official
    download, checked against its checksums when loaded (only the counts are known before)."""

    stored = (3, 32, 32)
    official = (50000, 10000)

    def __init__(self, name: str, title: str) -> None:
        self.name, self.title, self.num_classes = name, title, _CIFAR_BINARY[name]["classes"]
        self.timm_name, self.hub_id = f"torch/{name}", f"uoft-cs/{name}"

    def describe(self, arg: str, *, data_dir: Optional[str] = None, download: bool = False,
                 **_: Any) -> DataInfo:
        """The binary version's names and counts, or the official ones; the not-found error otherwise."""
        self._check_data_dir(data_dir)
        dest = Path(data_dir) if data_dir else _cache_dir() / self.name
        base = CIFAR10 if self.name == "cifar10" else CIFAR100
        binary = dest / _CIFAR_BINARY[self.name]["folder"]
        if binary.is_dir():
            counts = [sum(n for _, n in _binary_batches(self.name, binary, train)) for train in (True, False)]
            return self._info(_cifar_names(self.name, binary), (counts[0], counts[1]))
        if not download and not (dest / base.base_folder).is_dir():
            raise DataNotFoundError(f"{self.name.upper()} not found in {shown(Path(dest))}: add --download to fetch it "
                                    f"with torchvision, or pass --data-dir pointing at the folder that contains "
                                    f"'{base.base_folder}' or '{_CIFAR_BINARY[self.name]['folder']}'")
        return self._info(None, self.official)

    def _load(self, data_dir: Optional[str], train: bool, download: bool) -> TensorImageDataset:
        return _cifar(self.name, data_dir, train, download)


class _FashionMNIST(_InMemory):
    """Fashion-MNIST (see :func:`_fmnist`): its image counts are read from the idx files' headers."""

    name = "fmnist"
    aliases = ("fashion-mnist", "fashion_mnist")
    timm_name = "torch/fashion_mnist"
    title = "Fashion-MNIST"
    hub_id = "zalando-datasets/fashion_mnist"
    num_classes = len(FashionMNIST.classes)
    stored = (1, 28, 28)
    official = (60000, 10000)

    def describe(self, arg: str, *, data_dir: Optional[str] = None, download: bool = False,
                 **_: Any) -> DataInfo:
        """The idx files' counts (the official ones for a download); the not-found error, or the cache
        that cannot be written, otherwise."""
        self._check_data_dir(data_dir)
        found = fmnist_files(data_dir)
        classes = list(FashionMNIST.classes)
        if found is None:
            if not download:
                _fmnist(data_dir, True, False)  # raises the not-found error
            return self._info(classes, self.official)
        if not (_cache_dir() / "fashion-mnist" / _source_key(found)).is_dir():
            from .writing import check_writable_parent

            check_writable_parent(_cache_dir(), "the data cache ($LCNN_ZOO_CACHE)")
        return self._info(classes, (_idx_count(found[0]), _idx_count(found[2])))

    def _load(self, data_dir: Optional[str], train: bool, download: bool) -> TensorImageDataset:
        return _fmnist(data_dir, train, download)


class _ImageFolder(DataSource):
    """``folder:<path>``: an image folder (see :func:`_folder`); images are read one by one, converted
    and resized as they load, so only the class names are known before."""

    name = "folder:<path>"
    folder_splits = True

    def describe(self, arg: str, *, splits: Tuple[Optional[str], Optional[str]] = (None, None),
                 **_: Any) -> DataInfo:
        """The training split's class names; the splits asked for must exist."""
        classes = folder_classes(arg, splits[0])
        if splits[1] is not None:
            _split_dir(Path(arg), splits[1])
        return DataInfo(len(classes), classes)

    def build(self, arg: str, *, train: bool, image_size: Optional[Tuple[int, int]] = None,
              channels: Optional[int] = None, classes: Optional[List[str]] = None, eval_on_train: bool = False,
              split: Optional[str] = None, **_: Any) -> Dataset:
        """The split's images, numbered by ``classes`` (the training split's by default)."""
        return _folder(arg, train, image_size, channels, classes, eval_on_train, split)


class _HuggingFace(DataSource):
    """``hf:<name>``: a Hugging Face dataset (see :func:`_hf`); nothing is known of it before it is loaded."""

    name = "hf:<name>"

    def describe(self, arg: str, **_: Any) -> DataInfo:
        """Nothing but the optional package it needs (reading the Hub is loading it)."""
        _require_datasets(arg)
        return DataInfo(None)

    def build(self, arg: str, *, train: bool, image_size: Optional[Tuple[int, int]] = None,
              channels: Optional[int] = None, **_: Any) -> Dataset:
        """The ``train`` or ``test`` split, converted to ``channels`` (default 3) and resized to ``image_size``."""
        return _hf(arg, train, image_size, channels or 3)


#: The datasets lcnn-zoo reads, by name (or pattern): each entry describes and builds its dataset.
SOURCES: Dict[str, DataSource] = {s.name: s for s in (
    _Cifar("cifar10", "CIFAR-10"),
    _Cifar("cifar100", "CIFAR-100"),
    _FashionMNIST(),
    _ImageFolder(),
    _HuggingFace(),
)}
DATASETS = tuple(SOURCES)
#: timm train.py's ``--dataset torch/<name>`` → lcnn-zoo's dataset name
TORCH_DATASETS: Dict[str, str] = {s.timm_name: s.name for s in SOURCES.values() if s.timm_name}


def dataset_source(name: str) -> DataSource:
    """The :data:`SOURCES` entry of dataset ``name``: a name or alias, or ``<prefix><argument>`` (in any case)."""
    key = name.lower()
    for source in SOURCES.values():
        if key == source.name or key in source.aliases or (source.prefix and key.startswith(source.prefix)):
            return source
    raise UserError(f"unknown dataset {shown(name)}; choose one of {', '.join(DATASETS)}")


def describe_dataset(name: str, *, data_dir: Optional[str] = None, download: bool = False,
                     splits: Tuple[Optional[str], Optional[str]] = (None, None)) -> DataInfo:
    """The :class:`DataInfo` of what :func:`build_dataset` would load, raising the same errors it
    would (missing data, a mistyped ``--data-dir``, a folder of fewer than 2 classes, an unwritable
    cache) before anything is read or written; its :meth:`DataInfo.build` loads it from the same entry."""
    source = dataset_source(name)
    if splits != (None, None) and not source.folder_splits:
        raise UserError("--train-split/--val-split name the sub-folders of an image folder (folder:<path>); "
                        f"{shown(name)} has its own splits")
    info = source.describe(source.argument(name), data_dir=data_dir, download=download, splits=splits)
    info.name, info.source = name, source
    return info


def build_dataset(name: str, *, train: bool, data_dir: Optional[str] = None, download: bool = False,
                  image_size: Optional[Tuple[int, int]] = None, channels: Optional[int] = None,
                  classes: Optional[List[str]] = None, eval_on_train: bool = False,
                  split: Optional[str] = None) -> Dataset:
    """Return the ``train`` or test split of ``name`` (:meth:`DataSource.build` of its :data:`SOURCES` entry).

    Args:
        name: "cifar10", "cifar100", "fmnist", "folder:<path>" (ImageFolder layout) or "hf:<dataset name>".
        data_dir: where the data lives (CIFAR: torchvision's layout; Fashion-MNIST: the idx files;
            default: Debian's /usr/share/datasets/fashion-mnist, or ~/.cache/lcnn_zoo).
        download: let torchvision download CIFAR / Fashion-MNIST when missing.
        image_size, channels: resize to (H, W) and convert to this many channels (folder/HF datasets:
            default 3 channels; in-memory datasets: default as stored).
        classes: a folder's class list (the training split's), so every split numbers classes alike.
        eval_on_train: a folder without val/ or test/ evaluates on its training images (else: an error).
        split: a folder's sub-folder for this split (timm's --train-split/--val-split; default: train/,
            and val/ or test/).

    Returns:
        A dataset of ``(image, label)``, ``image`` a float (C, H, W) tensor in [0, 1].
    """
    source = dataset_source(name)
    return source.build(source.argument(name), train=train, data_dir=data_dir, download=download, image_size=image_size,
                        channels=channels, classes=classes, eval_on_train=eval_on_train, split=split)


class _Subset(Subset):
    """A fixed random subset of a dataset that is read image by image (a folder, a Hugging Face
    dataset), keeping its class names."""

    def __init__(self, ds: Dataset, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        super().__init__(ds, torch.randperm(len(cast(Sized, ds)), generator=g)[:n].tolist())
        if hasattr(ds, "classes"):
            self.classes = ds.classes


def subset(ds: Dataset, n: int, seed: int = 0) -> Dataset:
    """A fixed random subset of ``n`` samples of any dataset :func:`build_dataset` builds (the same
    samples for a given seed; an in-memory dataset stays in memory)."""
    if isinstance(ds, TensorImageDataset):
        return ds.subset(n, seed=seed)
    return _Subset(ds, n, seed)


def num_classes_of(ds: Dataset) -> int:
    """Number of classes of a dataset built by :func:`build_dataset`."""
    classes = getattr(ds, "classes", None)
    if classes is not None:
        return len(classes)
    raise UserError("cannot infer the number of classes; pass --num-classes")


