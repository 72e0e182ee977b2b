"""lcnn_zoo.commands.data: no dataset file is ever unpickled unless torchvision has checked it against the
official checksums; images keep their bit depth; damaged or missing data is one clear line."""
import gzip
import io
import os
import pickle
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lcnn_zoo.commands.data import FMNIST_SYSTEM_DIR, build_dataset, read_image
from lcnn_zoo.errors import UserError

from cli_helpers import fails_with, needs_fmnist


def _write_idx(folder: Path, n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, count in (("train", n), ("t10k", n // 2)):
        images = rng.integers(0, 256, (count, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, count, dtype=np.uint8)
        with gzip.open(folder / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
            f.write(struct.pack(">IIII", 2051, count, 28, 28) + images.tobytes())
        with gzip.open(folder / f"{prefix}-labels-idx1-ubyte.gz", "wb") as f:
            f.write(struct.pack(">II", 2049, count) + labels.tobytes())


def _image_folder(root: Path, classes, splits=("train", "val"), size=(20, 20), per_class=4):
    rng = np.random.default_rng(0)
    for split in splits:
        for c in classes[split] if isinstance(classes, dict) else classes:
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                Image.fromarray((rng.random(size) * 255).astype(np.uint8), mode="L").save(d / f"{i}.png")


REPO = Path(__file__).resolve().parents[2]


class _Payload:
    """Unpickling this runs ``Path.touch`` on the marker: a stand-in for arbitrary code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _python_layout(root: Path, meta_payload=None, seed=0, n=20):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    data = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "labels": rng.integers(0, 10, n).tolist()}
        data[name] = batch
        (folder / name).write_bytes(pickle.dumps(batch))
    meta = {"label_names": [f"c{i}" for i in range(10)]}
    if meta_payload is not None:
        meta["x"] = meta_payload
    (folder / "batches.meta").write_bytes(pickle.dumps(meta))
    return data


def test_a_crafted_cifar_meta_pickle_is_never_unpickled(tmp_path, capsys):
    marker = tmp_path / "pwned"
    _python_layout(tmp_path / "data", meta_payload=_Payload(marker))
    with pytest.raises(UserError, match="differ from the official CIFAR10 download"):
        build_dataset("cifar10", train=True, data_dir=str(tmp_path / "data"))
    fails_with(capsys, ["train", "--dataset", "cifar10", "--data-dir", str(tmp_path / "data"), "--epochs", "1",
                        "--output", str(tmp_path / "runs")], "differ from the official")
    fails_with(capsys, ["eval", "lcnn_resnet20", "--random-init", "--dataset", "cifar10", "--data-dir",
                        str(tmp_path / "data"), "--output", str(tmp_path / "ev")], "differ from the official")
    assert not marker.exists()


def test_the_binary_layout_reads_what_torchvision_reads_from_the_python_layout(tmp_path, monkeypatch):
    """The same records in both official layouts load to the same tensors (torchvision reads the
    python one here only because the test wrote it and disables its checksum)."""
    data = _python_layout(tmp_path / "py")
    binary = tmp_path / "bin" / "cifar-10-batches-bin"
    binary.mkdir(parents=True)
    for name, batch in data.items():
        records = np.concatenate([np.array(batch["labels"], np.uint8)[:, None], batch["data"]], axis=1)
        (binary / f"{name}.bin").write_bytes(records.tobytes())
    (binary / "batches.meta.txt").write_text("\n".join(f"c{i}" for i in range(10)) + "\n")
    ours = build_dataset("cifar10", train=True, data_dir=str(tmp_path / "bin"))
    from torchvision.datasets import CIFAR10

    monkeypatch.setattr(CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr("torchvision.datasets.cifar.check_integrity", lambda *a, **k: True)
    ref = CIFAR10(str(tmp_path / "py"), train=True, download=False)
    assert torch.equal(ours.images, torch.from_numpy(ref.data).permute(0, 3, 1, 2))
    assert ours.labels.tolist() == list(ref.targets) and ours.classes == list(ref.classes)


def test_a_truncated_binary_batch_is_named(tmp_path):
    import sys

    sys.path.insert(0, str(REPO))
    from examples.cifar_standin import write

    write(tmp_path, 10, 10)
    f = tmp_path / "cifar-100-binary" / "test.bin"
    f.write_bytes(f.read_bytes()[:-7])
    with pytest.raises(UserError, match="test.bin is not a CIFAR100 binary batch"):
        build_dataset("cifar100", train=False, data_dir=str(tmp_path))
    assert len(build_dataset("cifar100", train=True, data_dir=str(tmp_path))) == 10


def test_sixteen_bit_images_keep_their_depth(tmp_path):
    a = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)
    Image.fromarray(a).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I;16")
    x = read_image(str(tmp_path / "g16.png"), 1)
    assert torch.allclose(x[0], torch.from_numpy(a.astype(np.float32) / 65535), atol=1e-6)
    assert torch.allclose(read_image(str(tmp_path / "g16.png"), 3), x.expand(3, -1, -1))
    rgb = np.random.default_rng(0).integers(0, 256, (5, 6, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "c.bmp")
    assert torch.allclose(read_image(str(tmp_path / "c.bmp"), 3), torch.from_numpy(rgb).permute(2, 0, 1) / 255.0)
    for split in ("train", "val"):
        for c in ("a", "b"):
            (tmp_path / "f" / split / c).mkdir(parents=True)
            Image.fromarray(a).save(tmp_path / "f" / split / c / "0.png")
    x, _ = build_dataset(f"folder:{tmp_path / 'f'}", train=True, channels=1)[0]
    assert 0.0 < float(x.max()) < 1.0 and len(torch.unique(x)) == 64


@needs_fmnist
def test_damaged_or_unwritable_fashion_mnist(tmp_path, monkeypatch, capsys, readonly_dir):
    src = tmp_path / "fm"
    shutil.copytree(FMNIST_SYSTEM_DIR, src)
    gz = src / "train-images-idx3-ubyte.gz"
    gz.write_bytes(gz.read_bytes()[: gz.stat().st_size // 2])
    monkeypatch.setenv("LCNN_ZOO_CACHE", str(tmp_path / "cache"))
    with pytest.raises(UserError, match="train-images-idx3-ubyte.gz is truncated or corrupted"):
        build_dataset("fmnist", train=True, data_dir=str(src))
    monkeypatch.setenv("LCNN_ZOO_CACHE", str(readonly_dir / "cache"))
    fails_with(capsys, ["train", "--dataset", "fmnist", "--epochs", "1", "--output", str(tmp_path / "runs")],
               "the data cache ($LCNN_ZOO_CACHE)", "is not writable")
    with gzip.open(gz, "wb") as f:  # a whole gzip of a short file: torchvision's reader finds it too small
        f.write(b"\x00\x00\x08\x03" + b"\x00" * 12)
    monkeypatch.setenv("LCNN_ZOO_CACHE", str(tmp_path / "cache2"))
    with pytest.raises(UserError, match="are damaged"):
        build_dataset("fmnist", train=True, data_dir=str(src))


def test_folder_links_that_loop_or_cross_classes_are_refused(tmp_path):
    """ImageFolder follows links: a loop listed class b's images ~40 times under class a."""
    import os

    for c in ("a", "b"):
        (tmp_path / "f" / "train" / c).mkdir(parents=True)
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "f" / "train" / c / "0.png")
    link = tmp_path / "f" / "train" / "a" / "up"
    os.symlink("..", link)
    with pytest.raises(UserError, match="links back to a folder above it"):
        build_dataset(f"folder:{tmp_path / 'f'}", train=True, eval_on_train=True)
    link.unlink()
    os.symlink("../b", link)
    with pytest.raises(UserError, match="links into the folder of class 'b'"):
        build_dataset(f"folder:{tmp_path / 'f'}", train=True)
    link.unlink()
    (tmp_path / "elsewhere").mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "elsewhere" / "1.png")
    os.symlink(tmp_path / "elsewhere", link)  # a link to images outside the dataset is fine
    assert len(build_dataset(f"folder:{tmp_path / 'f'}", train=True)) == 3


def test_fmnist_cache_follows_the_data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("LCNN_ZOO_CACHE", str(tmp_path / "cache"))
    _write_idx(tmp_path / "a", 40, 0)
    _write_idx(tmp_path / "b", 60, 1)
    assert len(build_dataset("fmnist", train=True, data_dir=str(tmp_path / "a"))) == 40
    assert len(build_dataset("fmnist", train=True, data_dir=str(tmp_path / "b"))) == 60
    assert len(build_dataset("fmnist", train=True, data_dir=str(tmp_path / "a"))) == 40


def test_concurrent_cold_cache_builds_do_not_collide(tmp_path):
    _write_idx(tmp_path / "src", 2000, 0)
    code = ("import sys; from lcnn_zoo.commands.data import build_dataset; "
            f"assert len(build_dataset('fmnist', train=True, data_dir={str(tmp_path / 'src')!r})) == 2000")
    env = {**os.environ, "LCNN_ZOO_CACHE": str(tmp_path / "cache")}
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stderr.read()


def test_image_folder_labels_come_from_the_training_split(tmp_path):
    _image_folder(tmp_path / "d", {"train": ["cat", "dog", "emu"], "val": ["dog", "emu"]})
    tr = build_dataset(f"folder:{tmp_path / 'd'}", train=True, channels=1)
    va = build_dataset(f"folder:{tmp_path / 'd'}", train=False, channels=1, classes=tr.classes)
    assert tr.classes == va.classes == ["cat", "dog", "emu"]
    assert sorted({y for _, y in va}) == [1, 2]  # dog and emu keep their training labels


def test_image_folder_errors_name_the_problem(tmp_path, capsys):
    _image_folder(tmp_path / "nosplit", ["a", "b"], splits=("train",))
    fails_with(capsys, ["train", "--dataset", f"folder:{tmp_path / 'nosplit'}", "--epochs", "1", "--output",
                        str(tmp_path / "runs")], "no val/", "--eval-on-train")
    _image_folder(tmp_path / "mixed", ["a", "b"], size=(20, 20))
    Image.fromarray(np.zeros((30, 24), np.uint8), mode="L").save(tmp_path / "mixed" / "train" / "a" / "big.png")
    ds = build_dataset(f"folder:{tmp_path / 'mixed'}", train=True, channels=1)
    with pytest.raises(UserError, match="--input-size"):
        [ds[i] for i in range(len(ds))]
    bad = tmp_path / "mixed" / "val" / "a" / "0.png"
    bad.write_bytes(bad.read_bytes()[:40])  # truncated
    ds = build_dataset(f"folder:{tmp_path / 'mixed'}", train=False, channels=1, image_size=(20, 20))
    with pytest.raises(UserError, match=str(bad)):
        [ds[i] for i in range(len(ds))]


def test_subsets_work_for_every_dataset_kind(tmp_path):
    """--train-subset / --test-subset on an image folder (issue 32; refused before): a fixed random
    subset, the same for a seed, with the folder's class names; in-memory data stays in memory."""
    from lcnn_zoo.commands.data import TensorImageDataset, subset
    from lcnn_zoo.commands.options import train_config
    from lcnn_zoo.commands.training import _datasets

    for split, n in (("train", 6), ("val", 3)):
        for c in ("a", "b"):
            (tmp_path / "f" / split / c).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(np.full((8, 8), 40 * i, dtype=np.uint8)).save(tmp_path / "f" / split / c / f"{i}.png")
    folder = build_dataset(f"folder:{tmp_path / 'f'}", train=True, channels=1)
    part = subset(folder, 5, seed=1)
    assert len(part) == 5 and part.classes == ["a", "b"]
    assert [part[i][1] for i in range(5)] == [subset(folder, 5, seed=1)[i][1] for i in range(5)]
    memory = TensorImageDataset(torch.zeros(10, 1, 2, 2, dtype=torch.uint8), torch.arange(10) % 2)
    assert isinstance(subset(memory, 4), TensorImageDataset)
    data = _datasets(train_config(["--dataset", f"folder:{tmp_path / 'f'}", "--train-subset", "7",
                                   "--test-subset", "2", "--input-size", "1", "8", "8"]))
    assert (len(data.train), len(data.test), data.num_classes, data.classes) == (7, 2, 2, ["a", "b"])


def test_every_table_entry_has_both_halves_and_names_every_list_of_datasets():
    """Issue 33, item 4: one table of datasets. Each entry describes and builds its own dataset (a half
    left to the base class would raise NotImplementedError), and every list of dataset names (DATASETS,
    timm's torch/ names, the --dataset help of train and eval, a model card's Hub datasets) is the table's."""
    import dataclasses

    from lcnn_zoo.commands.cli import build_parser
    from lcnn_zoo.commands.config import TrainConfig
    from lcnn_zoo.commands.data import DATASETS, SOURCES, TORCH_DATASETS, DataSource, dataset_source
    from lcnn_zoo.commands.options import train_config

    assert DATASETS == tuple(SOURCES) == tuple(s.name for s in SOURCES.values())
    assert {"cifar10", "cifar100", "fmnist", "folder:<path>", "hf:<name>"} == set(DATASETS)
    for name, source in SOURCES.items():
        for half in ("describe", "build"):
            assert getattr(type(source), half) is not getattr(DataSource, half), (name, half)
        typed = name.replace("<path>", "/some/folder").replace("<name>", "owner/data")
        assert dataset_source(typed) is source and dataset_source(typed.upper()) is source
        assert all(dataset_source(alias) is source for alias in source.aliases)
    assert TORCH_DATASETS and all(name in SOURCES for name in TORCH_DATASETS.values())
    for timm_name, name in TORCH_DATASETS.items():
        assert train_config(["--dataset", timm_name]).dataset == name
    listed = " | ".join(DATASETS)
    assert next(f for f in dataclasses.fields(TrainConfig) if f.name == "dataset").metadata["help"] == listed
    eval_parser = build_parser()._subparsers._group_actions[0].choices["eval"]
    assert next(a for a in eval_parser._actions if a.dest == "dataset").help == listed
    with pytest.raises(UserError, match="unknown dataset 'imagenet'; choose one of " + ", ".join(DATASETS)):
        dataset_source("imagenet")
    from lcnn_zoo.commands.publishing import card_dataset  # a model card names the Hub's copy of each

    assert [card_dataset(name) for name, s in SOURCES.items() if s.hub_id] == [
        ("uoft-cs/cifar10", "CIFAR-10"), ("uoft-cs/cifar100", "CIFAR-100"),
        ("zalando-datasets/fashion_mnist", "Fashion-MNIST")]


def _describe_agrees_with_build(name, data_dir=None, **options):
    """What describe_dataset says of ``name`` against both splits that its DataInfo builds (and
    build_dataset builds: the same entry); returns the DataInfo."""
    from lcnn_zoo.commands.data import TensorImageDataset, describe_dataset, num_classes_of

    info = describe_dataset(name, data_dir=data_dir)
    splits = [info.build(train=train, data_dir=data_dir, **options) for train in (True, False)]
    for train, ds in zip((True, False), splits):
        assert type(ds) is type(build_dataset(name, train=train, data_dir=data_dir, **options))
        assert num_classes_of(ds) == info.num_classes
        if info.classes is not None:
            assert list(ds.classes) == info.classes
        x, y = ds[len(ds) - 1]
        assert x.dtype == torch.float32 and 0 <= float(x.min()) and float(x.max()) <= 1
        assert 0 <= y < info.num_classes
        if info.channels is not None:
            assert x.shape[0] == info.channels
        if info.size is not None:
            assert tuple(x.shape[1:]) == tuple(info.size)
        assert isinstance(ds, TensorImageDataset) == info.in_memory
        if info.in_memory:
            assert int(ds.labels.max()) < info.num_classes
    if info.images is not None:
        assert (len(splits[0]), len(splits[1])) == tuple(info.images)
    return info


@needs_fmnist
def test_what_fashion_mnist_is_described_as_is_what_it_loads(tmp_path, monkeypatch):
    monkeypatch.setenv("LCNN_ZOO_CACHE", str(tmp_path / "cache"))
    info = _describe_agrees_with_build("fmnist")
    assert (info.num_classes, info.channels, info.size, info.images) == (10, 1, (28, 28), (60000, 10000))
    _write_idx(tmp_path / "small", 40, 0)  # counts come from the idx headers, not the official sizes
    assert _describe_agrees_with_build("fmnist", data_dir=str(tmp_path / "small")).images == (40, 20)


def test_what_a_cifar_stand_in_is_described_as_is_what_it_loads(tmp_path):
    sys.path.insert(0, str(REPO))
    from examples.cifar_standin import write

    write(tmp_path, 37, 11)
    for name, n in (("cifar10", 10), ("cifar100", 100)):
        info = _describe_agrees_with_build(name, data_dir=str(tmp_path))
        assert (info.num_classes, info.channels, info.size, info.images) == (n, 3, (32, 32), (37, 11))
        assert info.classes == [f"class{i}" for i in range(n)]


def test_what_an_image_folder_is_described_as_is_what_it_loads(tmp_path):
    _image_folder(tmp_path / "d", {"train": ["cat", "dog", "emu"], "val": ["dog", "emu"]})
    info = _describe_agrees_with_build(f"folder:{tmp_path / 'd'}", channels=1)
    assert (info.classes, info.channels, info.in_memory) == (["cat", "dog", "emu"], None, False)


def test_hf_without_the_datasets_package_is_one_line_before_any_work(tmp_path, capsys, monkeypatch):
    """``datasets`` is optional: without it an hf: dataset fails in one line saying how to get it, in the
    preflight (describe), before a run folder is made."""
    from lcnn_zoo.commands.data import DataNotFoundError, describe_dataset

    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets → ImportError
    for call in (lambda: describe_dataset("hf:owner/data"), lambda: build_dataset("hf:owner/data", train=True)):
        with pytest.raises(DataNotFoundError, match="hf:owner/data needs the 'datasets' package: pip install datasets"):
            call()
    fails_with(capsys, ["train", "--dataset", "hf:owner/data", "--epochs", "1", "--output", str(tmp_path / "runs")],
               "pip install datasets")
    assert not (tmp_path / "runs").exists()


def _hf_dataset(root: Path, image="image", label="label", sizes=(("train", 9), ("test", 6))):
    """A local Hugging Face dataset (parquet files, one per split) of small RGB and grey images."""
    datasets = pytest.importorskip("datasets")
    features = datasets.Features({image: datasets.Image(), label: datasets.ClassLabel(names=["cat", "dog", "eel"])})
    rng = np.random.default_rng(0)
    for split, n in sizes:
        images = [Image.fromarray(rng.integers(0, 256, (10, 12, 3) if i % 2 else (10, 12), dtype=np.uint8))
                  for i in range(n)]
        rows = {image: images, label: [i % 3 for i in range(n)]}
        datasets.Dataset.from_dict(rows, features=features).to_parquet(str(root / "data" / f"{split}-0.parquet"))
    return root


def test_an_hf_dataset_is_read_by_timm_offline(tmp_path):
    """Issue 33, item 7c: hf: datasets are read by timm's hfds reader (create_dataset("hfds/…")), offline
    from a local dataset: the image and label columns found (CIFAR-100's img/fine_label too), images as
    [0, 1] tensors at the channels and size asked for, the labels, and the class names of its label
    feature (so --num-classes is not needed)."""
    from timm.data import ImageDataset

    from lcnn_zoo.commands.options import train_config
    from lcnn_zoo.commands.training import _datasets

    for image, label in (("image", "label"), ("img", "fine_label")):
        root = _hf_dataset(tmp_path / image, image, label)
        for train, n in ((True, 9), (False, 6)):
            ds = build_dataset(f"hf:{root}", train=train, channels=1, image_size=(8, 8))
            assert isinstance(ds, ImageDataset) and len(ds) == n and ds.classes == ["cat", "dog", "eel"]
            samples = [ds[i] for i in range(n)]
            assert [y for _, y in samples] == [i % 3 for i in range(n)]
            assert all(x.shape == (1, 8, 8) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
                       for x, _ in samples)
        x, _ = build_dataset(f"hf:{root}", train=False)[0]  # a grey image, as RGB at its own size
        assert x.shape == (3, 10, 12) and torch.equal(x[0], x[2])
    data = _datasets(train_config(["--dataset", f"hf:{root}", "--input-size", "3", "16", "16"]))
    assert (len(data.train), len(data.test), data.num_classes, data.classes) == (9, 6, 3, ["cat", "dog", "eel"])


def _png_claiming(width: int, height: int) -> bytes:
    """A valid PNG header claiming width × height grey pixels (PIL refuses to decode over ~179M)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b""))


@pytest.mark.parametrize("bad", [b"not an image", _png_claiming(20000, 20000)], ids=["not-an-image", "too-many-pixels"])
def test_an_hf_image_that_cannot_be_read_is_refused_not_replaced_by_the_next(tmp_path, caplog, bad):
    """timm's ImageDataset skips an image it cannot read and returns the next image with the next
    image's label (one log line saying it skipped): an evaluation measured another set than the one
    named. PIL's refusal of an image claiming too many pixels is no OSError: timm passed it on raw."""
    datasets = pytest.importorskip("datasets")
    from lcnn_zoo.commands.data import DataNotFoundError

    def png(value):
        out = io.BytesIO()
        Image.fromarray(np.full((6, 6), value, np.uint8)).save(out, "PNG")
        return {"bytes": out.getvalue(), "path": None}
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    rows = {"image": [png(10), {"bytes": bad, "path": None}, png(200)], "label": [0, 1, 0]}
    for split in ("train", "test"):
        datasets.Dataset.from_dict(rows, features=features).to_parquet(str(tmp_path / "data" / f"{split}-0.parquet"))
    ds = build_dataset(f"hf:{tmp_path}", train=False)
    assert [ds[0][1], ds[2][1]] == [0, 0] and float(ds[2][0].mean()) > 0.7  # the readable ones, as they are
    caplog.clear()
    with pytest.raises(DataNotFoundError, match=r"\(test split\): image 1 cannot be read \(not an image, damaged, "):
        ds[1]
    assert not [r.getMessage() for r in caplog.records if r.name.startswith("timm")]  # no "Skipped sample"


def test_an_hf_dataset_that_cannot_be_read_is_one_line(tmp_path):
    from lcnn_zoo.commands.data import DataNotFoundError

    root = _hf_dataset(tmp_path / "d", "pixels", "y")
    with pytest.raises(UserError, match=r"no image/label columns in \['pixels', 'y'\]"):
        build_dataset(f"hf:{root}", train=True)
    with pytest.raises(DataNotFoundError, match="could not load Hugging Face dataset 'nobody/nothing' split 'test'"):
        build_dataset("hf:nobody/nothing", train=False)  # offline (tests/conftest.py), not in the cache
    _hf_dataset(tmp_path / "notest", sizes=(("train", 3),))
    with pytest.raises(DataNotFoundError, match="split 'test'"):
        build_dataset(f"hf:{tmp_path / 'notest'}", train=False)
