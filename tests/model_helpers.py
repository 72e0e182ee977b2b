"""What the tests share: a briefly trained zoo model, its safetensors file, an exact output
comparison, and the operator norm of a map from its dense Jacobian."""
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
