"""Operations a training step dispatches per LCNN layer (benchmarks/op_count.py's counter): the
deterministic measure behind docs/performance.md's op counts. Pinned per layer, on small layers,
so that a change that brings back per-element passes or per-layer autograd chains fails here."""
import torch
from torch import nn

from lcnn_zoo import CenteredSoftplus, LCNNPenalty, LipschitzBatchNorm2d, spectral_norm

from benchmarks.op_count import _Count


def step_ops(module: nn.Module, x: torch.Tensor) -> int:
    """Operations of one training-mode forward + backward (after two warm-up steps)."""
    module.train()
    for _ in range(2):
        module(x).sum().backward()
    with _Count() as c:
        module(x).sum().backward()
    return sum(c.ops.values())


def test_centered_softplus_is_one_fused_op_each_way():
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    relu, act = step_ops(nn.ReLU(), x), step_ops(CenteredSoftplus(), x)
    # The fused forward and backward replace ReLU's two ops; β adds its exp, the exp's backward, and
    # the accumulation of its gradient. Unfused this was 13 forward and ~25 backward ops.
    assert act - relu <= 5, (relu, act)


def test_spectral_norm_and_gamma_bn_add_a_fixed_handful_of_ops():
    x = torch.randn(2, 4, 8, 8)
    plain = step_ops(nn.Conv2d(4, 6, 3, padding=1, bias=False), x)
    normed = step_ops(spectral_norm(nn.Conv2d(4, 6, 3, padding=1, bias=False), (4, 8, 8)), x)
    assert normed - plain <= 17, (plain, normed)  # was 29 with autograd through the norm
    xg = torch.randn(2, 4, 8, 8, requires_grad=True)
    bn, lbn = step_ops(nn.BatchNorm2d(4, affine=False), xg), step_ops(LipschitzBatchNorm2d(4), xg)
    assert lbn - bn <= 16, (bn, lbn)  # was 32 with autograd through max/maximum/repeat


def test_penalty_costs_a_constant_number_of_ops_plus_one_per_parameter():
    def ops(n):
        model = nn.Sequential(*[CenteredSoftplus() for _ in range(n)], *[LipschitzBatchNorm2d(2) for _ in range(n)])
        with _Count() as c:
            LCNNPenalty()(model).backward()
        return sum(c.ops.values())

    small, large = ops(2), ops(20)
    assert large - small == 2 * (20 - 2), (small, large)  # one gradient accumulation per parameter
    assert small <= 25
