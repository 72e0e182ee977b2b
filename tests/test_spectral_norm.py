"""Spectral normalisation on the true operator, checked by SVD of the dense (unrolled) Jacobian."""
import copy
import warnings

import pytest
import timm
import torch
from timm.layers import Conv2dSame
from torch import nn
from torch.autograd.functional import jacobian

from lcnn_zoo import (
    SpectralNorm,
    converge_spectral_norms,
    fold,
    frozen_state,
    lcnnify,
    spectral_norm,
)
from lcnn_zoo.layers import spectral_norm_modules

from model_helpers import dense_norm


def operator_norm(module, shape):
    """Largest singular value of the layer's unrolled linear map (bias removed), by dense SVD."""
    x = torch.zeros(1, *shape, dtype=torch.float64)
    j = jacobian(lambda z: module(z), x)
    j = j.reshape(-1, x.numel())
    return torch.linalg.matrix_norm(j, 2).item()


CONVS = {
    "plain": lambda: nn.Conv2d(4, 6, 3, padding=1),
    "stride2": lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1),
    "stride2_k4_odd_size": lambda: nn.Conv2d(4, 6, 4, stride=2, padding=1),
    "dilation": lambda: nn.Conv2d(4, 4, 3, padding=2, dilation=2),
    "grouped": lambda: nn.Conv2d(4, 6, 3, padding=1, groups=2),
    "depthwise": lambda: nn.Conv2d(4, 4, 3, padding=1, groups=4),
    "rect_kernel": lambda: nn.Conv2d(4, 6, (1, 3), padding=(0, 1)),
    "pad_same": lambda: nn.Conv2d(4, 6, 4, padding="same"),
    "no_pad_1x1": lambda: nn.Conv2d(4, 6, 1),
    "reflect": lambda: nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect"),
    "circular": lambda: nn.Conv2d(4, 6, 3, padding=1, padding_mode="circular"),
    "timm_same_stride2": lambda: Conv2dSame(4, 6, 3, stride=2),
    "timm_same_k4": lambda: Conv2dSame(4, 6, 4),
}


@pytest.mark.parametrize("name", sorted(CONVS))
def test_conv_operator_norm_is_one(name):
    conv = CONVS[name]().double()
    shape = (4, 7, 9)
    spectral_norm(conv, shape, init_iterations=0)
    converge_spectral_norms(conv, n_iter=500, tol=1e-12)
    conv.eval()
    assert operator_norm(conv, shape) == pytest.approx(1.0, rel=1e-2)


def test_sigma_equals_svd_of_unnormalised_operator():
    conv = nn.Conv2d(3, 5, 3, stride=2, padding=1, groups=1).double()
    shape = (3, 6, 6)
    true = operator_norm(conv, shape)
    spectral_norm(conv, shape, init_iterations=0)
    converge_spectral_norms(conv, n_iter=1000, tol=1e-13)
    sn = conv.parametrizations.weight[0]
    assert sn.sigma(conv.parametrizations.weight.original).item() == pytest.approx(true, rel=1e-3)


def test_adjoint_is_exact():
    """⟨A v, u⟩ = ⟨v, Aᵀ u⟩ for every padding flavour."""
    for name, make in CONVS.items():
        conv = make().double()
        spectral_norm(conv, (4, 7, 9), init_iterations=0)
        sn = conv.parametrizations.weight[0]
        w = conv.parametrizations.weight.original
        v = torch.randn(1, 4, 7, 9, dtype=torch.float64)
        u = torch.randn_like(sn.operator(v, w))
        lhs = (sn.operator(v, w) * u).sum()
        rhs = (v * sn.adjoint(u, w)).sum()
        assert lhs.item() == pytest.approx(rhs.item(), rel=1e-10), name


def test_norm_depends_on_input_size():
    """The zero-padded conv's norm grows with the input size; it is exact for the size it was built for."""
    torch.manual_seed(1)
    conv = nn.Conv2d(2, 2, 3, padding=1).double()
    small, large = operator_norm(conv, (2, 3, 3)), operator_norm(conv, (2, 12, 12))
    assert large > small * 1.01
    spectral_norm(conv, (2, 3, 3), init_iterations=0)
    converge_spectral_norms(conv, 500, tol=1e-13)
    conv.eval()
    assert operator_norm(conv, (2, 3, 3)) == pytest.approx(1.0, rel=1e-3)
    assert operator_norm(conv, (2, 12, 12)) > 1.01  # normalised for 3x3 inputs, not for 12x12


def test_linear():
    lin = nn.Linear(7, 5).double()
    spectral_norm(lin)
    converge_spectral_norms(lin, 200)
    lin.eval()
    assert torch.linalg.matrix_norm(lin.weight, 2).item() == pytest.approx(1.0, rel=1e-6)


def test_one_iteration_per_training_forward_none_in_eval():
    conv = nn.Conv2d(3, 4, 3, padding=1)
    spectral_norm(conv, (3, 5, 5), init_iterations=0)
    sn = conv.parametrizations.weight[0]
    w = conv.parametrizations.weight.original.detach()
    u0 = sn._u.clone()
    x = torch.randn(2, 3, 5, 5)
    conv.train()
    conv(x)
    v1 = sn.adjoint(u0, w)
    v1 = v1 / v1.norm()
    av = sn.operator(v1, w)
    torch.testing.assert_close(sn._v, v1)
    torch.testing.assert_close(sn._u, av / av.norm())
    conv.eval()
    u, v = sn._u.clone(), sn._v.clone()
    conv(x)
    assert torch.equal(sn._u, u) and torch.equal(sn._v, v)
    conv.train()
    with frozen_state(conv):
        conv(x)
    assert torch.equal(sn._u, u) and torch.equal(sn._v, v)


def test_eval_sees_every_weight_change_and_caches_only_inside_parametrize_cached():
    """No implicit cache: weights changed through .data (EMA/SWA/pruning tools) or swapped in by
    torch.func.functional_call are always seen; parametrize.cached() is the opt-in cache."""
    from torch.nn.utils import parametrize

    conv = nn.Conv2d(3, 4, 3, padding=1).double()
    spectral_norm(conv, (3, 5, 5))
    conv.eval()
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    orig = conv.parametrizations.weight.original
    with torch.no_grad():
        before = conv(x)
        orig.data[0].mul_(-3.0)  # not seen by autograd's version counter
        after = conv(x)
    sn = conv.parametrizations.weight[0]
    expected = torch.nn.functional.conv2d(x, orig / sn.sigma(orig), conv.bias, padding=1)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, expected)
    # functional_call with temporary weights, many times (a recycled pointer must not be mistaken)
    for i in range(50):
        w = torch.randn_like(orig)
        out = torch.func.functional_call(conv, {"parametrizations.weight.original": w}, (x,))
        torch.testing.assert_close(out, torch.nn.functional.conv2d(x, w / sn.sigma(w), conv.bias, padding=1))
    with torch.no_grad(), parametrize.cached():
        assert conv.weight is conv.weight  # computed once within the block
    # with grad needed (fine-tuning in eval mode), the weight is differentiable
    conv(torch.randn(1, 3, 5, 5, dtype=torch.float64)).sum().backward()
    assert conv.parametrizations.weight.original.grad is not None


def test_gradient_through_sigma():
    """d(W/σ)/dW includes σ's dependence on W: compare with finite differences (float64)."""
    conv = nn.Conv2d(2, 3, 3, padding=1).double()
    spectral_norm(conv, (2, 4, 4))
    converge_spectral_norms(conv, 300, tol=1e-14)
    conv.eval()
    x = torch.randn(2, 2, 4, 4, dtype=torch.float64)
    orig = conv.parametrizations.weight.original
    conv(x).pow(2).sum().backward()
    g = orig.grad.clone()
    d = torch.randn_like(orig)
    h = 1e-6
    with torch.no_grad():
        orig.add_(h * d)
        fp = conv(x).pow(2).sum()
        orig.sub_(2 * h * d)
        fm = conv(x).pow(2).sum()
        orig.add_(h * d)
    assert (g * d).sum().item() == pytest.approx(((fp - fm) / (2 * h)).item(), rel=1e-5)


def test_state_dict_loads_without_dummy_forward():
    def build(lazy):
        torch.manual_seed(0)
        m = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), Conv2dSame(4, 4, 3, stride=2), nn.Flatten(), nn.Linear(64, 2))
        spectral_norm(m[0], None if lazy else (3, 8, 8))
        spectral_norm(m[1], None if lazy else (4, 8, 8))
        spectral_norm(m[3])
        return m

    src = build(lazy=False)
    src.train()
    for _ in range(3):
        src(torch.randn(2, 3, 8, 8))
    src.eval()
    x = torch.randn(2, 3, 8, 8)
    for lazy in (False, True):
        torch.manual_seed(123)  # different random singular vectors
        dst = build(lazy)
        dst.load_state_dict(src.state_dict())
        dst.eval()
        torch.testing.assert_close(dst(x), src(x))
    keys = set(src.state_dict())
    assert {"0.weight", "0.weight_u", "0.weight_v", "0.bias", "3.weight", "3.weight_u"} <= keys
    assert not any("parametrizations" in k for k in keys)


def test_loaded_stale_vectors_are_converged_so_a_compiled_forward_is_within_its_bound():
    """Vectors saved mid-training (one power step per step only tracks σ) or averaged are converged at
    load, from where they are: a compiled forward, which uses the vectors as they are, then gives the
    normalised layer its bound (issue 31, case 7); vectors that are already converged load unchanged."""
    torch.manual_seed(0)
    conv = spectral_norm(nn.Conv2d(3, 8, 3, padding=1), (3, 8, 8))
    w = conv.parametrizations.weight.original.detach()
    truth = dense_norm(lambda x: torch.nn.functional.conv2d(x, w, padding=1), torch.zeros(1, 3, 8, 8))
    state = conv.state_dict()
    converged_v = state["weight_v"].clone()
    state["weight_v"] = converged_v + 0.5 * torch.randn_like(converged_v)  # stale
    for saved, moved in ((state, True), ({**state, "weight_v": converged_v}, False)):
        dst = spectral_norm(nn.Conv2d(3, 8, 3, padding=1), (3, 8, 8))
        dst.load_state_dict(saved)
        sn = dst.parametrizations.weight[0]
        assert sn.residual(w) <= sn.init_tol
        assert torch.equal(sn._v, saved["weight_v"]) is not moved
        dst.eval()
        compiled = torch.compile(dst, backend="eager")
        with torch.no_grad():
            sigma = float(sn.sigma(w))
            out = compiled(torch.zeros(1, 3, 8, 8))  # (runs: the compiled forward uses the vectors as loaded)
        assert out.shape == (1, 8, 8, 8)
        assert truth / sigma <= 1 + sn.init_tol
    from lcnn_zoo.layers import exact_vectors

    resumed = spectral_norm(nn.Conv2d(3, 8, 3, padding=1), (3, 8, 8))
    with exact_vectors():  # a resumed training run keeps its tracking state exactly
        resumed.load_state_dict(state)
    assert torch.equal(resumed.parametrizations.weight[0]._v, state["weight_v"])


def test_plain_checkpoint_loads_into_normalised_layer():
    """An ordinary conv checkpoint (key 'weight') loads as the unnormalised weight."""
    plain = nn.Conv2d(3, 4, 3, padding=1)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    spectral_norm(conv, (3, 6, 6))
    result = conv.load_state_dict(plain.state_dict(), strict=False)
    assert set(result.missing_keys) == {"parametrizations.weight.0._u", "parametrizations.weight.0._v"}
    assert torch.equal(conv.parametrizations.weight.original, plain.weight)


def test_lazy_initialises_on_first_forward():
    conv = Conv2dSame(3, 4, 3, stride=2)
    spectral_norm(conv)
    sn = conv.parametrizations.weight[0]
    assert sn.input_shape is None
    conv(torch.randn(1, 3, 9, 9))
    assert sn.input_shape == (3, 9, 9) and sn.padding == (1, 1, 1, 1)


def test_errors():
    with pytest.raises(TypeError):
        spectral_norm(nn.Conv1d(2, 2, 3))
    with pytest.raises(ValueError, match="channels"):
        spectral_norm(nn.Conv2d(3, 4, 3), (5, 8, 8))
    with pytest.raises(ValueError, match="too small"):
        spectral_norm(nn.Conv2d(3, 4, 5), (3, 2, 2))
    with pytest.raises(ValueError, match="layer_type"):
        SpectralNorm(torch.randn(3, 3), "conv3d")


def test_sigma_is_computed_in_full_precision_under_autocast():
    """Under bf16 autocast the power iteration's convolutions would run in bf16 (a normalised norm
    of 1.003, issue 20): the normalised weight is the same as without autocast."""
    from lcnn_zoo.conversion import LCNNConversionWarning

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LCNNConversionWarning)
        lcnnify(model, input_size=(3, 8, 8))
    for train in (False, True):
        model.train(train)
        conv = model[1]
        state = {k: v.clone() for k, v in conv.state_dict().items()}
        plain = conv.weight.detach().clone()
        conv.load_state_dict(state)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = conv.weight.detach().clone()
        assert mixed.dtype == torch.float32
        torch.testing.assert_close(mixed, plain, rtol=1e-6, atol=1e-7)


def test_an_averaged_copy_is_within_its_bound_at_its_first_eval_forward():
    """timm's ModelEmaV3 (defaults: buffers averaged) after high-lr SGD: the averaged v is not the top
    singular vector of the averaged weights (stale before any eval forward); the first eval forward
    re-converges them, so every layer is within the stated 1e-3 (true norms from a 300-product Lanczos
    run per layer) with no call to converge_spectral_norms, and fold has nothing to warn about. A write
    through ``.data`` is not seen (documented): converge_spectral_norms is needed then."""

    import timm
    from timm.utils import ModelEmaV3

    from lcnn_zoo.folding import stale_spectral_norms
    from lcnn_zoo.layers import spectral_norm_modules

    torch.manual_seed(0)
    model = timm.create_model("lcnn_resnet20", num_classes=10, in_chans=1, img_size=(8, 8))
    ema = ModelEmaV3(model, decay=0.9)
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    for step in range(25):
        loss = torch.nn.functional.cross_entropy(model(torch.rand(8, 1, 8, 8)), torch.randint(0, 10, (8,)))
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema.update(model, step=step)

    def worst(m):
        ratios = []
        for mod, sn in spectral_norm_modules(m):
            w = mod.parametrizations.weight.original.detach()
            exact = copy.deepcopy(sn)
            exact.converge(w, 300, 1e-9)
            ratios.append(float(exact.operator(exact._v, w).norm()) / float(sn.sigma(w)))
        return max(ratios)

    averaged = ema.module.eval()
    assert stale_spectral_norms(averaged)  # what the EMA left in the buffers
    with torch.no_grad():
        averaged(torch.rand(2, 1, 8, 8))
    assert not stale_spectral_norms(averaged)
    assert worst(averaged) <= 1.001
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fold(averaged)
    # The trained model itself, switched to eval: the same.
    model.eval()
    with torch.no_grad():
        model(torch.rand(2, 1, 8, 8))
    assert not stale_spectral_norms(model)
    # Through .data the change is invisible to the check; converge_spectral_norms restores the vectors.
    conv = next(m for m, _ in spectral_norm_modules(model))
    conv.parametrizations.weight.original.data.mul_(torch.linspace(0.2, 3.0, conv.out_channels).view(-1, 1, 1, 1))
    with torch.no_grad():
        model(torch.rand(2, 1, 8, 8))
    assert stale_spectral_norms(model)
    converge_spectral_norms(model, 400, tol=1e-4)
    assert not stale_spectral_norms(model)


def test_eval_reconverges_when_only_the_singular_vectors_are_overwritten():
    """Vectors overwritten with no weight change (copied from another model DDP-style, a state dict
    holding only them, a buffer replaced): the eval operator norm used to be 1.85-2.87, as the check
    for a stale state looked at the weight alone. The first eval forward re-converges them now,
    and a forward with nothing changed checks nothing (no operator product)."""
    torch.manual_seed(0)
    shape = (3, 6, 6)
    conv = nn.Conv2d(3, 5, 3, padding=1).double()
    other = nn.Conv2d(3, 5, 3, padding=1).double()
    spectral_norm(conv, shape)
    spectral_norm(other, shape)
    conv.eval()
    sn = conv.parametrizations.weight[0]
    x = torch.rand(2, *shape, dtype=torch.float64)

    def true_norm():
        with torch.no_grad():
            conv(x)  # the eval forward that must see the new vectors
        return operator_norm(conv, shape)

    assert true_norm() == pytest.approx(1.0, abs=1e-3)
    with torch.no_grad():  # in place, as DDP's buffer broadcast writes them
        sn._u.copy_(torch.randn_like(sn._u))
        sn._v.copy_(torch.randn_like(sn._v))
    assert true_norm() == pytest.approx(1.0, abs=1e-3)
    # another layer's vectors, loaded through the state dict without its weight
    vectors = {k: v for k, v in other.state_dict().items() if k in ("weight_u", "weight_v")}
    conv.load_state_dict(vectors, strict=False)
    assert torch.equal(sn._v, other.parametrizations.weight[0]._v)
    assert true_norm() == pytest.approx(1.0, abs=1e-3)
    # a buffer replaced by another tensor
    sn._v = torch.randn_like(sn._v)
    assert true_norm() == pytest.approx(1.0, abs=1e-3)
    # a whole converted model whose vectors are another model's (the weights kept)
    torch.manual_seed(1)
    net = lcnnify(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2)).double(),
                  input_size=shape)
    donor = lcnnify(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2)).double(),
                    input_size=shape)
    net.load_state_dict({k: v for k, v in donor.state_dict().items() if k.endswith(("weight_u", "weight_v"))},
                        strict=False)
    net.eval()
    with torch.no_grad():
        net(x)
    for layer, in_shape in ((net[0], shape), (net[2], (4, 6, 6))):
        assert operator_norm(layer, in_shape) == pytest.approx(1.0, abs=1e-3)
    # nothing changed: the next eval forward runs no operator product
    calls = []
    sn.residual = lambda w: calls.append(w) or 0.0
    with torch.no_grad():
        conv(x)
    assert not calls


TRAIN_GRAD_LAYERS = {
    "conv": lambda: nn.Conv2d(3, 5, 3, padding=1),
    "conv_stride_groups": lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2),
    "conv_asymmetric_same": lambda: Conv2dSame(3, 4, 4, stride=2),
    "conv_unread_rows": lambda: nn.Conv2d(3, 4, 3, stride=2),
    "linear": lambda: nn.Linear(7, 5),
}


@pytest.mark.parametrize("name", sorted(TRAIN_GRAD_LAYERS))
def test_training_forward_gradient_matches_autograd_through_the_norm(name):
    """The training forward's σ = uᵀA_W v with its precomputed gradient (one Function) gives the value
    and the weight gradient of autograd through W / ‖A_W v‖ at the same, freshly updated v (float64)."""
    torch.manual_seed(0)
    layer = TRAIN_GRAD_LAYERS[name]().double()
    spectral_norm(layer, None if name == "linear" else (layer.in_channels, 6, 6))
    sn = layer.parametrizations.weight[0]
    orig = layer.parametrizations.weight.original
    with torch.no_grad():
        orig.add_(0.3 * torch.randn_like(orig))  # vectors one step behind the weight, as in training
    layer.train()
    x = torch.randn(2, *((7,) if name == "linear" else (layer.in_channels, 6, 6)), dtype=torch.float64)
    r = torch.randn_like(layer(x))
    orig.grad = None
    out_new = layer(x)  # one training forward: one power step, then σ and its gradient
    (out_new * r).sum().backward()
    g_new = orig.grad.clone()
    # Reference: autograd through the norm at the vector the training forward stored.
    sn.eval()
    w_ref_t = orig.detach().clone().requires_grad_(True)
    v = sn._v.clone()
    w_ref = w_ref_t / sn.operator(v, w_ref_t).norm()
    out = (torch.nn.functional.linear(x, w_ref, layer.bias) if name == "linear"
           else layer._conv_forward(x, w_ref, layer.bias) if not isinstance(layer, Conv2dSame)
           else torch.nn.functional.conv2d(torch.nn.functional.pad(x, sn.padding), w_ref, layer.bias, layer.stride))
    (out * r).sum().backward()
    torch.testing.assert_close(out_new.detach(), out.detach(), rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(g_new, w_ref_t.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("channels", [(1, 3), (2, 4)])
def test_a_stem_adapted_to_replicated_channels_keeps_its_function_and_its_bound(channels):
    """timm's stem adaptation (adapt_input_conv: the kernel repeated r times, scaled 1/r) of a
    normalised conv: on replicated input the adapted layer computes what the checkpoint's did, and its
    dense operator norm is 1/√r ≤ 1 (the gain travels in the state dict as weight_gain)."""
    from timm.models import adapt_input_conv
    c0, c = channels
    torch.manual_seed(0)
    src = spectral_norm(nn.Conv2d(c0, 3, 3, padding=1, bias=False).double(), (c0, 5, 5)).eval()
    dst = spectral_norm(nn.Conv2d(c, 3, 3, padding=1, bias=False).double(), (c, 5, 5)).eval()
    state = src.state_dict()
    state["weight"] = adapt_input_conv(c, state["weight"], base_chans=c0)  # what timm's load_pretrained does
    dst.load_state_dict(state)
    x = torch.rand(2, c0, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(dst(x.repeat(1, c // c0, 1, 1)), src(x), rtol=1e-6, atol=1e-9)
    assert operator_norm(dst, (c, 5, 5)) == pytest.approx((c0 / c) ** 0.5, rel=1e-3)
    saved = dst.state_dict()
    assert float(saved["weight_gain"]) == pytest.approx((c0 / c) ** 0.5)
    again = spectral_norm(nn.Conv2d(c, 3, 3, padding=1, bias=False).double(), (c, 5, 5)).eval()
    again.load_state_dict(saved)  # a fresh layer takes the gain from the state dict
    torch.testing.assert_close(again(x.repeat(1, c // c0, 1, 1)), src(x), rtol=1e-6, atol=1e-9)
    with pytest.raises(ValueError, match=r"weight_gain must be a 0-dim tensor in \(0, 1\], got \(\) = 2"):
        again.load_state_dict({**saved, "weight_gain": torch.tensor(2.0, dtype=torch.float64)})
    plain = again.state_dict()
    del plain["weight_gain"]
    again.load_state_dict(plain)  # no gain in the state dict: none on the layer
    assert "weight_gain" not in again.state_dict()


def test_a_stem_whose_channels_are_not_replicated_gets_no_gain():
    src = spectral_norm(nn.Conv2d(1, 3, 3, padding=1, bias=False).double(), (1, 5, 5))
    dst = spectral_norm(nn.Conv2d(3, 3, 3, padding=1, bias=False).double(), (3, 5, 5))
    state = src.state_dict()
    # another weight of the adapted shape: not a replication
    state["weight"] = torch.randn(3, 3, 3, 3, dtype=torch.float64)
    with pytest.warns(UserWarning, match="recomputed from its loaded weight"):
        dst.load_state_dict(state)
    assert "weight_gain" not in dst.state_dict()
    assert operator_norm(dst.eval(), (3, 5, 5)) == pytest.approx(1.0, rel=2e-3)


def test_state_dict_of_another_input_size_loads_with_converged_vectors():
    src = timm.create_model("lcnn_resnet20.cifar10", pretrained_cfg_overlay=dict(input_size=(3, 24, 24)))
    dst = timm.create_model("lcnn_resnet20.cifar10")
    with pytest.warns(UserWarning, match="recomputed from its loaded weight"):
        dst.load_state_dict(src.state_dict())
    for m, sn in spectral_norm_modules(dst):
        assert sn.last_residual <= 1e-3
    conv = dst.stages[2][0].conv2
    x = torch.zeros(1, 64, 8, 8)
    assert dense_norm(lambda t: conv._conv_forward(t, conv.weight, None), x) == pytest.approx(1.0, abs=2e-3)


def test_deferred_convergence_and_exact_vectors_hold_only_inside_their_block_in_its_thread():
    """Inside ``deferred_convergence`` a new spectral norm is left unconverged until the block ends (its
    weights are about to be loaded), and inside ``exact_vectors`` loaded vectors are kept as saved; a
    model another thread builds or loads meanwhile is treated as outside both blocks (they are
    context variables, not process-wide globals)."""
    import threading

    from lcnn_zoo.layers import exact_vectors
    from lcnn_zoo.layers.spectral_norm import deferred_convergence

    def build() -> nn.Module:
        return spectral_norm(nn.Conv2d(3, 8, 3, padding=1), (3, 8, 8))

    def residual(layer: nn.Module) -> float:
        return layer.parametrizations.weight[0].residual(layer.parametrizations.weight.original)

    stale = build().state_dict()
    stale["weight_v"] = torch.randn_like(stale["weight_v"])  # not a singular vector of the weight
    built, loaded = {}, {}

    def other_thread():
        built["layer"] = build()
        loaded["layer"] = build()
        loaded["layer"].load_state_dict(stale)

    with deferred_convergence(), exact_vectors():
        mine = build()
        tol = mine.parametrizations.weight[0].init_tol
        assert residual(mine) > tol  # deferred: random vectors until the block ends
        worker = threading.Thread(target=other_thread)
        worker.start()
        worker.join()
        assert residual(built["layer"]) <= tol  # the other thread's model converged at once
        kept = build()
        kept.load_state_dict(stale)
        assert torch.equal(kept.parametrizations.weight[0]._v, stale["weight_v"])  # kept exactly as saved
    assert residual(mine) <= tol  # converged on leaving the block
    assert residual(loaded["layer"]) <= tol  # and its stale loaded vectors were converged, not kept
    assert not torch.equal(loaded["layer"].parametrizations.weight[0]._v, stale["weight_v"])


def test_an_eval_forward_refreshes_sigma_while_another_thread_compiles():
    """torch.compiler.is_compiling() reads a process-wide flag that another thread's inductor compile
    raises: the eval refresh skipped for it used stale vectors (an output 1.2x too large, the layer's
    norm above 1). Raised here by hand, as that thread would."""
    import torch.compiler as tc

    from lcnn_zoo.layers import spectral_norm_of

    torch.manual_seed(0)
    model = timm.create_model("lcnn_resnet20", img_size=16, num_classes=3).eval()
    x = torch.randn(2, 1, 16, 16)
    model(x)
    with torch.no_grad():  # new weights for the stem (an optimizer step, a load)
        model.conv1.parametrizations.weight.original.copy_(torch.randn(16, 1, 3, 3))
    flagged = copy.deepcopy(model)
    tc._is_compiling_flag = True
    try:
        out = flagged.conv1(x)
    finally:
        tc._is_compiling_flag = False
    torch.testing.assert_close(out, model.conv1(x), rtol=1e-4, atol=1e-5)
    sn = spectral_norm_of(flagged.conv1)
    assert sn.residual(flagged.conv1.parametrizations.weight.original) < 1e-3
