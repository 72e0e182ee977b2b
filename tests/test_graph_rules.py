"""lcnn_zoo.graph_rules: the merges, upsamplings and gates lcnnify rewrites from the traced graph.

A rewritten block keeps its class, attributes and state-dict keys, and its forward computes the
original one with each merge rescaled (checked against the formula written out); deep copies,
pickles, fold, torch.compile and a change of input size see the rewritten function.
"""
import copy
import io
import pickle
import warnings

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from lcnn_zoo import LCNNConversionWarning, fold, lcnnify, set_input_size
from lcnn_zoo.graph_rules import TracedForward

SIZE = (3, 8, 8)


class Block(nn.Module):
    """A residual block of no known class: act(conv_a(x) + conv_b(x)), and a 2-way concatenation."""

    def __init__(self):
        super().__init__()
        self.conv_a = nn.Conv2d(4, 4, 3, padding=1)
        self.conv_b = nn.Conv2d(4, 4, 1)
        self.bn = nn.BatchNorm2d(8)
        self.act = nn.ReLU()
        self.kind = "mine"  # an attribute of the instance, kept by the rewrite

    def forward(self, x):
        y = self.act(self.conv_a(x) + self.conv_b(x))
        return self.bn(torch.cat([y, x], 1))


class Net(nn.Module):
    def __init__(self, gate=False):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.block = Block()
        self.gate = SqueezeExcite(8) if gate else nn.Identity()
        self.up = nn.Upsample(scale_factor=2, mode="nearest")  # operator norm 2
        self.post = nn.Sequential(nn.Conv2d(8, 8, 1), nn.ReLU())
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        y = self.gate(self.block(self.stem(x)))
        return self.head(F.adaptive_avg_pool2d(self.post(self.up(y)), 1).flatten(1))


class SqueezeExcite(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.fc = nn.Conv2d(c, c, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.fc(x.mean((2, 3), keepdim=True)))


def convert(model, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LCNNConversionWarning)
        return lcnnify(model, input_size=SIZE, **kw).eval()


def test_a_block_of_no_known_class_is_averaged_and_keeps_what_it_was():
    torch.manual_seed(0)
    model = convert(Net())
    block = model.block
    assert model.lcnn_report.ok, str(model.lcnn_report)
    assert type(block) is Block and block.kind == "mine" and isinstance(block.forward, TracedForward)
    assert model.lcnn_report.converted["merge_rescaled"] == 1
    x = torch.rand(2, 4, 8, 8)
    with torch.no_grad():  # the original forward with the sum averaged and the concatenation over √2
        y = block.act((block.conv_a(x) + block.conv_b(x)) / 2)
        expected = block.bn(torch.cat([y, x], 1) / 2 ** 0.5)
        torch.testing.assert_close(block(x), expected)
    twin = convert(Net())  # a checkpoint of the converted model loads into another conversion
    twin.load_state_dict(model.state_dict())
    with torch.no_grad():
        x3 = torch.rand(2, *SIZE)
        torch.testing.assert_close(twin(x3), model(x3))
    plain = convert(Net(), average_residuals=False)
    assert set(plain.state_dict()) == set(model.state_dict())  # the rewrite adds and renames no key
    assert not plain.lcnn_report.ok


def test_the_upsampling_is_rescaled_by_its_measured_norm():
    model = convert(Net())
    assert isinstance(model.up, nn.Sequential) and model.up[1].scale == pytest.approx(0.5, rel=1e-4)


def test_copies_pickles_fold_and_compile_run_the_rewritten_forward():
    torch.manual_seed(0)
    model = convert(Net())
    x = torch.rand(2, *SIZE)
    with torch.no_grad():
        ref = model(x)
        twin = copy.deepcopy(model)
        assert twin.block.forward.owner is twin.block  # bound to the copy, not to the original
        torch.testing.assert_close(twin(x), ref)
        with torch.no_grad():
            twin.block.conv_b.parametrizations.weight.original.add_(torch.randn_like(twin.block.conv_b.weight))
        assert not torch.allclose(twin(x), ref) and torch.equal(model(x), ref)
        folded = fold(model)  # an LCNN pickles through its state dict or folded (parametrizations do not pickle)
        torch.testing.assert_close(folded(x), ref, rtol=1e-4, atol=1e-5)
        buf = io.BytesIO()
        torch.save(folded, buf)
        buf.seek(0)
        loaded = torch.load(buf, weights_only=False)
        assert isinstance(loaded.block.forward, TracedForward) and loaded.block.forward.owner is loaded.block
        torch.testing.assert_close(loaded(x), folded(x))
        torch.testing.assert_close(pickle.loads(pickle.dumps(folded))(x), folded(x))
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        torch.testing.assert_close(compiled(x), ref)


def test_train_mode_runs_the_rewritten_forward_too():
    torch.manual_seed(0)
    model = convert(Net())
    model.train()
    loss = model(torch.rand(4, *SIZE)).square().mean()
    loss.backward()
    assert model.block.conv_b.parametrizations.weight.original.grad is not None


def test_gates_are_kept_by_default_and_said_so_or_removed_on_request():
    kept = convert(Net(gate=True))
    assert not kept.lcnn_report.ok and 'gates="keep"' in str(kept.lcnn_report)
    removed = convert(Net(gate=True), gates="remove")
    assert removed.lcnn_report.ok, str(removed.lcnn_report)
    assert isinstance(removed.gate, nn.Identity) and removed.lcnn_report.converted["gate_removed"] == 1
    with pytest.raises(ValueError, match="gates must be"):
        lcnnify(Net(), input_size=SIZE, gates="drop")


class Optional_(nn.Module):
    """DLA's pattern: an optional shortcut argument (tracing alone would fix `if shortcut is None`)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x, shortcut=None):
        return self.conv(x) + (x if shortcut is None else shortcut)


class ModeDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        return self.conv(x) + x if self.training else self.conv(x) + 2 * x


class Holder(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.head = nn.Linear(3 * 64, 2)

    def forward(self, x):
        return self.head(self.inner(x).flatten(1))


@pytest.mark.parametrize("inner, why", [(Optional_, "optional or variadic"), (ModeDependent, "train and eval")])
def test_blocks_that_cannot_be_traced_alone_keep_the_finding_with_the_reason(inner, why):
    model = convert(Holder(inner()))
    assert not model.lcnn_report.ok and why in str(model.lcnn_report)
    assert "forward" not in model.inner.__dict__


def test_set_input_size_and_timm_api_after_the_rewrite():
    torch.manual_seed(0)
    model = timm.create_model("regnetx_002", num_classes=3)
    convert(model)
    assert model.lcnn_report.ok, str(model.lcnn_report)
    set_input_size(model, (3, 16, 16))
    assert model.lcnn_report.ok and model.lcnn_report.input_size == (3, 16, 16)
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        assert model.forward_features(x).shape[0] == 2
        model.reset_classifier(7)
        assert model(x).shape == (2, 7)
    features = timm.create_model("regnetx_002", features_only=True, out_indices=(1, 2))
    convert(features)
    with torch.no_grad():
        assert [f.shape[1] for f in features(torch.rand(1, *SIZE))] == features.feature_info.channels()
