"""What the tests share: a briefly trained zoo model, its safetensors file, an exact output
comparison, the operator norm of a map from its dense Jacobian, and a run folder as training leaves it."""
import functools

import timm
import torch
from safetensors.torch import save_file
from torch import nn
from torch.autograd.functional import jacobian

import lcnn_zoo  # noqa: F401  (registers the zoo's models in timm)


def trained(name: str = "lcnn_resnet20.cifar10", steps: int = 2, **kw) -> nn.Module:
    """``name`` after ``steps`` SGD steps on random data (so its weights differ from any init); eval mode."""
    torch.manual_seed(0)
    model = timm.create_model(name, **kw)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    c, h, w = model.pretrained_cfg["input_size"]
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(torch.rand(8, c, h, w)), torch.randint(0, 10, (8,))).backward()
        opt.step()
    return model.eval()


def checkpoint(tmp_path, name: str = "lcnn_resnet20.cifar10", **kw):
    """A freshly built ``name``'s state dict written to ``tmp_path/w.safetensors``; returns the path."""
    model = timm.create_model(name, **kw)
    path = tmp_path / "w.safetensors"
    save_file(model.state_dict(), str(path))
    return path


def same_outputs(a: nn.Module, b: nn.Module, shape=(3, 32, 32)) -> None:
    """``a`` and ``b`` give bit-identical outputs on a random batch (both put in eval mode)."""
    x = torch.rand(4, *shape)
    a.eval(), b.eval()
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)


def dense_norm(fn, x: torch.Tensor) -> float:
    """Largest singular value of the Jacobian of ``fn`` at ``x`` (dense; float64 ``x`` for tight checks)."""
    j = jacobian(fn, x, vectorize=True).reshape(-1, x.numel())
    return torch.linalg.matrix_norm(j, 2).item()


@functools.lru_cache(maxsize=1)
def _fmnist_model() -> nn.Module:
    """An lcnn_resnet20 for Fashion-MNIST, as ``lcnn-zoo train`` builds it (built once: an LCNN's
    construction converges its spectral norms, seconds on a busy 2-core machine)."""
    from lcnn_zoo.commands.factory import create_model

    return create_model("lcnn_resnet20", input_size=(1, 28, 28), num_classes=10)


def run_folder(path, *, epoch: int = 1, epochs: int = 1, finished: bool = True, argv=()):
    """A run folder as ``lcnn-zoo train`` leaves it after ``epoch`` of ``epochs`` epochs of an
    lcnn_resnet20 on Fashion-MNIST (``finished``: with its summary saying so and its final weights),
    written through :class:`~lcnn_zoo.commands.checkpoint.RunFolder` without training (untrained weights): for
    tests of what reads run folders. ``argv``: more ``lcnn-zoo train`` options for its recipe."""
    from lcnn_zoo.commands.checkpoint import RunFolder, rng_state
    from lcnn_zoo.commands.options import train_config

    cfg = train_config(["--dataset", "fmnist", "--model", "lcnn_resnet20", "--reg", "lcnn", "--epochs", str(epochs),
                        "--output", str(path.parent), "--experiment", path.name, *argv])
    from torchvision.datasets import FashionMNIST

    model = _fmnist_model()
    classes = list(FashionMNIST.classes)
    history = [{"epoch": e + 1, "train_loss": 2.0, "eval_top1": 10.0} for e in range(epoch)]
    best = {"epoch": 1, "eval_top1": 10.0}
    path.mkdir(parents=True)
    folder = RunFolder(path)
    folder.write_args(cfg.to_dict())
    folder.save_weights(model.state_dict(), RunFolder.BEST)
    folder.save_checkpoint({
        "epoch": epoch, "arch": cfg.model, "num_classes": 10, "input_size": [1, 28, 28], "classes": classes,
        "state_dict": model.state_dict(), "optimizer": torch.optim.SGD(model.parameters(), lr=0.1).state_dict(),
        "scheduler": None, "state_dict_ema": None, "scaler": None, "rng": rng_state(), "history": history,
        "best": best, "config": cfg.to_dict()})
    folder.write_summary({"run_dir": str(path), "model": cfg.model, "dataset": "fmnist", "reg": cfg.reg,
                          "epochs": epochs, "num_classes": 10, "classes": classes, "input_size": [1, 28, 28],
                          "final": {"top1": 10.0}, "best": best, "finished": finished, "history": history})
    if finished:
        folder.save_weights(model.state_dict())
    return path


# Weights that are valid files but wrong in content (issue 31, cases 3, 8 and 10): the case, the
# tensor it damages, and how. "i32" relabels a float tensor's bytes as int32 (what a hand-edited
# safetensors header does): a load would cast those integers to float silently.
DAMAGES = {
    "nan": ("conv1.weight", lambda t: t.index_fill(0, torch.tensor([0]), float("nan"))),
    "inf": ("fc.weight", lambda t: t.index_fill(0, torch.tensor([1]), float("inf"))),
    "i32": ("stages.0.0.conv1.weight", lambda t: t.contiguous().view(torch.int32)),
    "gamma_raw": ("bn1.gamma_raw", lambda t: torch.full_like(t, float("nan"))),
    "log_beta": ("act1.log_beta", lambda t: torch.full_like(t, float("nan"))),
    "running_var": ("stages.1.0.bn2.running_var", lambda t: t.index_fill(0, torch.tensor([3]), -1.0)),
    # finite log β whose β is not a finite positive number in float32 (hostile pass, I08b)
    "beta_overflow": ("act1.log_beta", lambda t: torch.full_like(t, 100.0)),
    "beta_underflow": ("stages.0.0.act1.log_beta", lambda t: torch.full_like(t, -200.0)),
    # zeroed spectral-norm singular vectors: residual 0, read as converged (hostile pass, W2)
    "u_zero": ("fc.weight_u", torch.zeros_like),
    "v_zero": ("stages.0.0.conv1.weight_v", torch.zeros_like),
}


def damaged(state, case: str):
    """A copy of ``state`` with one tensor damaged as :data:`DAMAGES` says; returns (state, tensor name)."""
    name, how = DAMAGES[case]
    out = dict(state)
    out[name] = how(state[name].clone())
    return out, name
