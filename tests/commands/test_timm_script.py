"""``python -m lcnn_zoo.timm_script`` and the calls timm's scripts make on lcnn_* models.

timm's train.py, validate.py, inference.py, benchmark.py and onnx_export.py live in timm's repository,
not in its wheel or sdist, so CI cannot run them. The runner is tested on a stand-in script; the
scripts themselves are exercised through the calls they make, with timm's defaults (``in_chans=3``,
the data config resolved from the model): validate.py/inference.py — ``create_model(..., in_chans=3)``,
``resolve_data_config``, ``create_dataset``/``create_loader`` on an image folder, top-1;
onnx_export.py — ``create_model(..., in_chans=3, exportable=True)`` and ``timm.utils.onnx.onnx_export``;
train.py — ``--model-kwargs lcnn_penalty=…`` is ``create_model(..., lcnn_penalty=…)`` with timm's
``create_optimizer_v2`` and ``NativeScaler`` (tests/test_penalty.py checks the step itself).
The README's "With timm's scripts" section gives the commands, run against a clone of timm.
"""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import lcnn_zoo
from lcnn_zoo.commands.data import build_dataset
from lcnn_zoo.commands.factory import is_lcnn

from cli_helpers import needs_fmnist

REPO = Path(__file__).resolve().parents[2]


def run_script(*args, cwd):
    return subprocess.run([sys.executable, "-m", "lcnn_zoo.commands.timm_script", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})


def test_the_runner_runs_a_script_as_python_would_with_the_zoo_registered(tmp_path):
    (tmp_path / "helper.py").write_text("VALUE = 7\n")
    script = tmp_path / "validate.py"
    script.write_text(
        "import sys, timm, helper\n"  # the script's own folder is importable, as under `python validate.py`
        "assert __name__ == '__main__'\n"
        "print(sys.argv[0].endswith('validate.py'), sys.argv[1:], helper.VALUE)\n"
        "print(sorted(timm.list_models('lcnn_resnet20*'))[0])\n"
        "sys.exit(3)\n")
    done = run_script(script, "--model", "lcnn_resnet20.fmnist", cwd=tmp_path)
    assert done.returncode == 3, done.stderr[-2000:]
    assert done.stdout.splitlines() == ["True ['--model', 'lcnn_resnet20.fmnist'] 7", "lcnn_resnet20"]


def test_the_runner_refuses_what_is_not_a_script_in_one_line(tmp_path):
    done = run_script(tmp_path / "nope.py", cwd=tmp_path)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith("error: ") and "is not a Python script" in done.stderr
    assert len(done.stderr.splitlines()) == 2  # the error and the usage line
    assert run_script("--help", cwd=tmp_path).returncode == 0


@pytest.mark.parametrize("make,reason", [
    (lambda p: p.symlink_to(sys.executable), "null bytes"),  # a link to a binary (issue 31, case 14)
    (lambda p: p.write_text("#!/bin/sh\nif [ -f x ]; then echo $HOME; fi\n"), "(line 2)"),  # a shell script
    (lambda p: p.write_bytes(b"x = '\\xff'\nname = '\xff\xfe'\n"), "utf-8"),
])
def test_a_file_that_is_not_python_is_one_line_before_anything_runs(tmp_path, capsys, monkeypatch, make, reason):
    from lcnn_zoo.commands import timm_script

    script = tmp_path / "x.py"
    make(script)
    monkeypatch.setattr(sys, "argv", ["x"])
    assert timm_script.main([str(script), "--model", "lcnn_resnet20"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"error: {str(script)!r} is not a Python script: ") and reason in err
    assert sys.argv == ["x"]  # nothing was run


def _fmnist_folder(root: Path, n: int) -> Path:
    """The first n Fashion-MNIST test images as grey PNGs in class folders (timm's ImageFolder layout)."""
    ds = build_dataset("fmnist", train=False)
    for i in range(n):
        x, y = ds[i]
        (root / str(y)).mkdir(parents=True, exist_ok=True)
        Image.fromarray((x[0].numpy() * 255).round().astype(np.uint8), "L").save(root / str(y) / f"{i:05d}.png")
    return root


@needs_fmnist
@pytest.mark.parametrize("tag", ["lcnn_resnet20.fmnist", "lcnn_resnet20_softplus.fmnist_gradreg"])
def test_validate_py_calls_on_a_grey_image_folder_give_the_tags_own_predictions(tmp_path, tag):
    """validate.py with timm's defaults: 3 channels (the loader turns grey PNGs into RGB) and the data
    config the model's cfg resolves. Every prediction is the 1-channel tag's on the same images."""
    from timm.data import create_dataset, create_loader, resolve_data_config
    folder = _fmnist_folder(tmp_path / "test", 200)
    model = timm.create_model(tag, pretrained=True, in_chans=3).eval()
    grey = timm.create_model(tag, pretrained=True).eval()
    cfg = resolve_data_config({}, model=model)
    assert cfg["input_size"] == (3, 28, 28)
    loader = create_loader(create_dataset("", root=str(folder)), input_size=cfg["input_size"], batch_size=50,
                           use_prefetcher=False, interpolation=cfg["interpolation"], mean=cfg["mean"],
                           std=cfg["std"], crop_pct=cfg["crop_pct"], num_workers=0, device=torch.device("cpu"))
    with torch.no_grad():
        model(torch.zeros(2, *cfg["input_size"]))  # validate.py's warm-up
        agree, correct, n = 0, 0, 0
        for x, y in loader:
            pred = model(x).argmax(1)
            agree += int((pred == grey(x[:, :1]).argmax(1)).sum())
            correct, n = correct + int((pred == y).sum()), n + len(y)
    assert n == 200 and agree == n
    assert correct / n > 0.8  # the shipped tags are ~91 % on Fashion-MNIST's test set
    # inference.py labels the predictions with the cfg's names: the 3-channel model keeps them
    labels = model.pretrained_cfg["label_names"]
    assert labels and labels == grey.pretrained_cfg["label_names"]


def test_onnx_export_py_calls_export_the_lcnns_eval_function(tmp_path):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    from onnx.reference import ReferenceEvaluator
    from timm.utils.onnx import onnx_export
    model = timm.create_model("lcnn_resnet20.fmnist", pretrained=True, in_chans=3, exportable=True)
    assert not is_lcnn(model)  # built folded: plain layers
    onnx_export(model, str(tmp_path / "m.onnx"), input_size=(3, 28, 28), batch_size=2, check=False)
    onnx.checker.check_model(str(tmp_path / "m.onnx"))
    lcnn = timm.create_model("lcnn_resnet20.fmnist", pretrained=True).eval()
    x = torch.rand(2, 1, 28, 28)
    ev = ReferenceEvaluator(str(tmp_path / "m.onnx"))
    (out,) = ev.run(None, {ev.input_names[0]: x.expand(-1, 3, -1, -1).numpy()})
    torch.testing.assert_close(torch.from_numpy(out), lcnn(x).detach(), rtol=1e-4, atol=1e-5)


def test_train_py_calls_with_the_penalty_as_a_model_kwarg_step_as_loss_plus_penalty():
    """train.py: create_model(**model_kwargs), create_optimizer_v2, NativeScaler(loss, optimizer)."""
    import torch.nn.functional as F
    from timm.optim import create_optimizer_v2
    from timm.utils import NativeScaler
    torch.manual_seed(0)
    attached = timm.create_model("lcnn_resnet20", img_size=(8, 8), **{"lcnn_penalty": 0.05}).train()
    plain = timm.create_model("lcnn_resnet20", img_size=(8, 8)).train()
    plain.load_state_dict(attached.state_dict())
    x, y = torch.rand(4, 1, 8, 8), torch.randint(0, 10, (4,))
    for model, extra in ((attached, None), (plain, lcnn_zoo.LCNNPenalty(0.05, 0.05))):
        opt = create_optimizer_v2(model, "sgd", lr=0.5, weight_decay=5e-4, momentum=0.9)
        scaler = NativeScaler(device="cpu")
        for _ in range(2):
            loss = F.cross_entropy(model(x), y)
            scaler(loss if extra is None else loss + extra(model), opt, clip_grad=None,
                   parameters=model.parameters())
            opt.zero_grad()
    for (k, a), b in zip(attached.state_dict().items(), plain.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.parametrize("tag", ["lcnn_resnet20.fmnist", "lcnn_resnet20.cifar10", "lcnn_resnet18.cifar100"])
def test_inference_py_labels_its_predictions_with_the_tags_class_names(tag):
    """inference.py (issue 32, item 6): a pretrained_cfg without ``label_names`` made timm log "Cannot
    deduce ImageNet subset" and write no label column. It maps indices to names as here; the names
    are the dataset's own, in label order (the 3-channel model of validate.py's test keeps them)."""
    from timm.data import CustomDatasetInfo, DatasetInfoLabelMapper
    from timm.models import get_pretrained_cfg
    from torchvision.datasets import FashionMNIST

    cfg = get_pretrained_cfg(tag)  # what create_model puts in model.pretrained_cfg
    names = cfg.label_names
    assert names is not None and len(names) == cfg.num_classes
    to_label = DatasetInfoLabelMapper(CustomDatasetInfo(label_names=names), label_type="description")
    first, last = {"lcnn_resnet20.fmnist": (FashionMNIST.classes[0], FashionMNIST.classes[9]),
                   "lcnn_resnet20.cifar10": ("airplane", "truck"),
                   "lcnn_resnet18.cifar100": ("apple", "worm")}[tag]
    assert (to_label(0), to_label(cfg.num_classes - 1)) == (first, last)
    if tag.endswith("fmnist"):
        assert list(names) == FashionMNIST.classes
    if tag.endswith("cifar100"):
        assert list(names) == sorted(names) and len(set(names)) == 100  # CIFAR-100's fine labels are alphabetical
