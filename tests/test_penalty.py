"""LCNN penalty (eq. 5), GradReg exact vs finite differences, optimizer parameter groups."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lcnn_zoo import (
    CenteredSoftplus,
    LCNNPenalty,
    LipschitzBatchNorm2d,
    gradreg_exact,
    gradreg_fd_backward,
    lcnnify,
    param_groups,
)


def small_lcnn(dtype=torch.float64):
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Conv2d(4, 4, 3, stride=2, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Flatten(), nn.Linear(4 * 3 * 3, 3)).to(dtype)
    return lcnnify(model, input_size=(2, 6, 6), beta_init=2.0, gamma_init=3.0)


def test_penalty_value_and_gradient():
    model = small_lcnn()
    acts = [m for m in model.modules() if isinstance(m, CenteredSoftplus)]
    bns = [m for m in model.modules() if isinstance(m, LipschitzBatchNorm2d)]
    with torch.no_grad():
        acts[1].log_beta.fill_(math.log(7.0))
        bns[0].gamma_raw.fill_(0.3)
    pen = LCNNPenalty(lambda_beta=0.1, lambda_gamma=0.5)
    expected = 0.1 * (2.0 + 7.0) + 0.5 * (math.log(3.0) + math.log(1 + math.log1p(math.exp(0.3))))
    value = pen(model)
    assert value.item() == pytest.approx(expected, rel=1e-10)
    value.backward()
    # d(λβ β)/d log β = λβ β
    assert acts[1].log_beta.grad.item() == pytest.approx(0.1 * 7.0, rel=1e-10)
    terms = pen.terms(model)
    assert terms["sum_beta"].item() == pytest.approx(9.0) and set(terms) == {"sum_beta", "sum_log_gamma"}
    assert LCNNPenalty()(nn.Linear(2, 2)).item() == 0.0
    with pytest.raises(ValueError):
        LCNNPenalty(lambda_beta=-1)


@pytest.mark.parametrize("layers", ["gamma_only", "beta_only"])
def test_penalty_of_a_net_with_one_kind_of_layer(layers):
    """Only γ-Lipschitz BatchNorms (no centered softplus), or only softplus: value and gradient are the
    formula's (the ``torch._foreach_*`` ops return tuples; adding one to the empty list of the missing
    kind raised a TypeError)."""
    if layers == "gamma_only":
        model = nn.Sequential(nn.Conv2d(2, 4, 3), LipschitzBatchNorm2d(4, gamma_init=3.0), LipschitzBatchNorm2d(4))
        params = [m.gamma_raw for m in model if isinstance(m, LipschitzBatchNorm2d)]
        expected = sum(torch.log(1 + F.softplus(p)) for p in params)
    else:
        model = nn.Sequential(nn.Conv2d(2, 4, 3), CenteredSoftplus(beta_init=2.0), CenteredSoftplus(beta_init=7.0))
        params = [m.log_beta for m in model if isinstance(m, CenteredSoftplus)]
        expected = sum(torch.exp(p) for p in params)
    value = LCNNPenalty(lambda_beta=0.1, lambda_gamma=0.5)(model)
    expected = (0.5 if layers == "gamma_only" else 0.1) * expected
    torch.testing.assert_close(value, expected)
    for got, want in zip(torch.autograd.grad(value, params), torch.autograd.grad(expected, params)):
        torch.testing.assert_close(got, want)


def per_sample_input_grads(model, x, y):
    rows = []
    for i in range(x.shape[0]):
        xi = x[i:i + 1].clone().requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(model(xi), y[i:i + 1]), xi)
        rows.append(g)
    return torch.cat(rows)


def test_gradreg_exact_penalty_is_mean_squared_per_sample_gradient():
    model = small_lcnn().eval()
    x, y = torch.randn(5, 2, 6, 6, dtype=torch.float64), torch.randint(0, 3, (5,))
    out = gradreg_exact(model, x, y)
    g = per_sample_input_grads(model, x, y)
    assert out.penalty.item() == pytest.approx(g.pow(2).sum().item() / 5, rel=1e-10)
    assert out.loss.item() == pytest.approx(F.cross_entropy(model(x), y).item(), rel=1e-12)


@pytest.mark.parametrize("train_mode", [False, True])
def test_finite_difference_gradreg_matches_exact(train_mode):
    """Parameter gradients of L + λR: double backprop vs two forward/backward passes."""
    torch.manual_seed(0)
    model = small_lcnn()
    model.train(train_mode)
    x, y = torch.randn(6, 2, 6, 6, dtype=torch.float64), torch.randint(0, 3, (6,))
    lam = 0.3
    params = [p for p in model.parameters()]

    state = {k: v.clone() for k, v in model.state_dict().items()}
    out = gradreg_exact(model, x, y)
    exact = torch.autograd.grad(out.loss + lam * out.penalty, params, allow_unused=True)
    model.load_state_dict(state)  # same singular vectors / BN statistics for the second method

    for p in params:
        p.grad = None
    fd_out = gradreg_fd_backward(model, x, y, lam, step=1e-5)
    assert fd_out.penalty.item() == pytest.approx(out.penalty.item(), rel=1e-8)
    num = sum(((p.grad if p.grad is not None else 0) - (e if e is not None else 0)).pow(2).sum()
              for p, e in zip(params, exact) if e is not None or p.grad is not None)
    den = sum(e.pow(2).sum() for e in exact if e is not None)
    assert (num / den).sqrt().item() < 1e-3


def test_fd_gradreg_updates_state_once():
    model = small_lcnn(torch.float32).train()
    bn = next(m for m in model.modules() if isinstance(m, LipschitzBatchNorm2d))
    x, y = torch.randn(4, 2, 6, 6), torch.randint(0, 3, (4,))
    gradreg_fd_backward(model, x, y, 0.1)
    assert bn.num_batches_tracked.item() == 1


def test_param_groups_exclude_beta_gamma():
    model = small_lcnn()
    groups = param_groups(model, 5e-4)
    decay_ids = {id(p) for p in groups[0]["params"]}
    no_decay_ids = {id(p) for p in groups[1]["params"]}
    curv = {id(m.log_beta) for m in model.modules() if isinstance(m, CenteredSoftplus)}
    curv |= {id(m.gamma_raw) for m in model.modules() if isinstance(m, LipschitzBatchNorm2d)}
    assert curv == no_decay_ids and not curv & decay_ids
    assert groups[0]["weight_decay"] == 5e-4 and groups[1]["weight_decay"] == 0.0
    assert len(decay_ids) + len(no_decay_ids) == len(list(model.parameters()))
    groups_1d = param_groups(model, 5e-4, exclude_1d=True)
    assert all(p.ndim > 1 for p in groups_1d[0]["params"])
    torch.optim.SGD(groups, lr=0.1)  # accepted by optimizers


def test_penalty_matches_its_terms_for_many_layers_and_extreme_gammas():
    """The foreach penalty against the per-layer formula (terms) by autograd: value and every gradient,
    with a fixed-β layer and γ-parameters far into both tails of the softplus."""
    torch.manual_seed(0)
    acts = [CenteredSoftplus(beta_init=b) for b in (0.5, 3.0, 40.0)] + [CenteredSoftplus(2.0, learnable=False)]
    bns = [LipschitzBatchNorm2d(2, gamma_init=g) for g in (1.0001, 2.0, 10.0, 500.0)]
    model = nn.Sequential(*acts, *bns).double()
    with torch.no_grad():
        bns[-1].gamma_raw.fill_(120.0)  # softplus(120) = 120: exp(120) would overflow float32
        bns[0].gamma_raw.fill_(-60.0)
    pen = LCNNPenalty(lambda_beta=0.3, lambda_gamma=0.7)
    params = [a.log_beta for a in acts[:3]] + [b.gamma_raw for b in bns]
    value = pen(model)
    grads = torch.autograd.grad(value * 2.0, params)
    t = pen.terms(model)
    want = 0.3 * t["sum_beta"] + 0.7 * t["sum_log_gamma"]
    want_grads = torch.autograd.grad(want * 2.0, params)
    assert value.item() == pytest.approx(want.item(), rel=1e-14)
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-300)


# ---- the penalty at every optimizer step (timm's train.py, any loop) ----------------------------
def _penalised_pair(lam=0.05):
    """(model with ``lcnn_penalty=lam`` attached, the same model with nothing attached), one init."""
    import timm
    torch.manual_seed(0)
    attached = timm.create_model("lcnn_resnet20", img_size=(8, 8), lcnn_penalty=lam)
    plain = timm.create_model("lcnn_resnet20", img_size=(8, 8))
    plain.load_state_dict(attached.state_dict())
    return attached.train(), plain.train()


def _steps(model, optimizer, batches, *, penalty=None, scaler=None, accumulate=1):
    for i, (x, y) in enumerate(batches):
        loss = F.cross_entropy(model(x), y) / accumulate
        if penalty is not None and i % accumulate == 0:
            loss = loss + penalty(model)
        (scaler.scale(loss) if scaler is not None else loss).backward()
        if (i + 1) % accumulate == 0:
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad()


@pytest.mark.parametrize("mode", ["sgd", "grad_scaler", "fused_adam_grad_scaler", "accumulate"])
def test_an_attached_penalty_trains_as_loss_plus_penalty(mode):
    """attach_penalty (here through the model kwarg lcnn_penalty, as timm's train.py passes it) gives the
    step of a loop that adds R to its loss itself: plain, under a GradScaler (which unscales first),
    with an optimizer that unscales inside its fused step, and with gradient accumulation (R once per step)."""
    attached, plain = _penalised_pair()
    g = torch.Generator().manual_seed(1)
    batches = [(torch.rand(4, 1, 8, 8, generator=g), torch.randint(0, 10, (4,), generator=g)) for _ in range(4)]

    def optimizer(model):
        if mode.startswith("fused_adam"):
            return torch.optim.Adam(model.parameters(), lr=1e-2, fused=True)
        return torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)

    kw = {}
    if "grad_scaler" in mode:
        kw["scaler"] = lambda: torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    accumulate = 2 if mode == "accumulate" else 1
    for model, pen in ((attached, None), (plain, LCNNPenalty(0.05, 0.05))):
        _steps(model, optimizer(model), batches, penalty=pen, accumulate=accumulate,
               scaler=kw["scaler"]() if kw else None)
    for (k, a), b in zip(attached.state_dict().items(), plain.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=k)
    unpenalised = _penalised_pair()[1]
    _steps(unpenalised, optimizer(unpenalised), batches, accumulate=accumulate)
    bn = "bn1.gamma_raw"
    assert not torch.allclose(unpenalised.state_dict()[bn], plain.state_dict()[bn])  # R changed the step


def test_attach_penalty_is_removable_and_refuses_a_net_without_beta_or_gamma():
    import timm

    from lcnn_zoo import attach_penalty
    attached, plain = _penalised_pair()
    handle = attach_penalty(attached)
    handle.remove()
    x, y = torch.rand(2, 1, 8, 8), torch.tensor([1, 2])
    for model in (attached, plain):
        _steps(model, torch.optim.SGD(model.parameters(), lr=0.5), [(x, y)])
    for (k, a), b in zip(attached.state_dict().items(), plain.state_dict().values()):
        assert torch.equal(a, b), k
    with pytest.raises(ValueError, match="has no learnable β or γ"):
        timm.create_model("lcnn_resnet20_relu", img_size=(8, 8), lcnn_penalty=1e-3)


def test_an_attached_penalty_says_once_that_it_is_applied_and_with_which_lambdas(caplog):
    """Issue 32, item 9: timm's train.py with --model-kwargs lcnn_penalty=… logged nothing about it.
    The first optimizer step that applies the penalty logs one line (INFO, which timm's scripts show)
    with λβ, λγ and how many parameters it reaches; later steps add nothing."""
    import logging

    attached, _ = _penalised_pair(lam=0.02)
    x, y = torch.rand(2, 1, 8, 8), torch.tensor([1, 2])
    with caplog.at_level(logging.INFO, logger="lcnn_zoo"):
        _steps(attached, torch.optim.SGD(attached.parameters(), lr=0.1), [(x, y)] * 3)
    lines = [r.getMessage() for r in caplog.records if r.name == "lcnn_zoo.penalty"]
    from lcnn_zoo.penalty import curvature_parameters

    n = sum(len(ps) for ps in curvature_parameters(attached).values())
    assert lines == [f"LCNN penalty (lcnn_zoo.attach_penalty) applied at this and every optimizer step: "
                     f"λβ 0.02, λγ 0.02 on the {n} β/γ parameters of CifarResNet the optimizer holds"]
