"""lcnn_zoo.commands.steps: each ``--reg`` step accumulates the gradient of its own objective, checked against
that objective written out here with autograd (task loss + λβ Σβ + λγ Σ log γ + λ_grad ‖∇ₓℓ‖²)."""
from contextlib import nullcontext

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

import lcnn_zoo  # noqa: F401  (registers the models)
from lcnn_zoo.commands.config import TrainConfig
from lcnn_zoo.commands.steps import ExactGradRegStep, FDGradRegStep, Regulariser, make_regulariser
from lcnn_zoo.layers import CenteredSoftplus, LipschitzBatchNorm2d


def _model():
    torch.manual_seed(0)
    return timm.create_model("lcnn_resnet20", num_classes=3, in_chans=1).double()


def _objective(model, x, y, lambda_beta, lambda_gamma, lambda_grad):
    """The step's objective, independently: double backprop through the whole model."""
    xx = x.detach().requires_grad_(True)
    loss = F.cross_entropy(model(xx), y)
    (gx,) = torch.autograd.grad(loss * x.shape[0], xx, create_graph=True)
    betas = [m.beta for m in model.modules() if isinstance(m, CenteredSoftplus)]
    gammas = [m.gamma for m in model.modules() if isinstance(m, LipschitzBatchNorm2d)]
    total = loss + lambda_beta * sum(betas) + lambda_gamma * sum(torch.log(g) for g in gammas)
    return total + lambda_grad * gx.pow(2).sum() / x.shape[0]


@pytest.mark.parametrize("reg,gradreg", [("none", "exact"), ("lcnn", "exact"), ("gradreg", "exact"),
                                          ("lcnn_gradreg", "exact"), ("lcnn_gradreg", "fd")])
def test_each_step_accumulates_the_gradient_of_its_objective(reg, gradreg):
    cfg = TrainConfig(reg=reg, gradreg=gradreg, lambda_beta=1e-3, lambda_gamma=1e-2, lambda_grad=0.1,
                      fd_step=1e-5).validate()
    x, y = torch.rand(4, 1, 12, 12, dtype=torch.float64), torch.tensor([0, 1, 2, 0])
    lam_b = cfg.lambda_beta if "lcnn" in reg else 0.0
    lam_g = cfg.lambda_gamma if "lcnn" in reg else 0.0
    lam_x = cfg.lambda_grad if "gradreg" in reg else 0.0
    ref, model = _model(), _model()
    ref.eval(), model.eval()  # eval mode: the same function in both passes (no statistics updated)
    _objective(ref, x, y, lam_b, lam_g, lam_x).backward()
    step = make_regulariser(cfg, torch.nn.CrossEntropyLoss(), model, seed=0)
    assert type(step) is {"none": Regulariser, "lcnn": Regulariser, "gradreg": ExactGradRegStep,
                          "lcnn_gradreg": ExactGradRegStep if gradreg == "exact" else FDGradRegStep}[reg]
    out = step.step(model, x, y, nullcontext, None)
    assert float(out.loss) == pytest.approx(float(F.cross_entropy(ref(x), y)), rel=1e-12)
    tol = 1e-10 if gradreg == "exact" else 1e-4  # the finite difference is O(step)
    for (name, p), q in zip(ref.named_parameters(), model.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=tol, atol=tol, msg=name)
    assert ("sum_beta" in out.stats) == ("lcnn" in reg) and ("grad_sq" in out.stats) == ("gradreg" in reg)


@pytest.mark.parametrize("gradreg", ["fd", "exact"])
def test_fp16_gradscaler_step_with_gradreg(gradreg):
    """The GradScaler path of both GradReg steps (it runs on GPUs; here on CPU, where only the step is
    exercised): FD GradReg scales by hand, so the scaler's lazily created scale must exist first."""
    model = timm.create_model("lcnn_resnet20.cifar10", num_classes=3)
    cfg = TrainConfig(reg="lcnn_gradreg", gradreg=gradreg).validate()
    step = make_regulariser(cfg, torch.nn.CrossEntropyLoss(), model, seed=0)
    scaler = torch.amp.GradScaler("cpu")
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    out = step.step(model, torch.rand(4, 3, 32, 32), torch.randint(0, 3, (4,)),
                    lambda: torch.autocast("cpu", dtype=torch.float16), scaler)
    scaler.step(opt)
    scaler.update()
    assert np.isfinite(float(out.loss)) and out.stats["grad_sq"] > 0
