"""Model-wide state of the LCNN layers: forward passes that change nothing (:func:`frozen_state`),
eval mode for a block (:func:`eval_mode`),
converged spectral norms (:func:`converge_spectral_norms`) and BatchNorm statistics recomputed
(:func:`recalibrate_batchnorm`)."""
from __future__ import annotations

import contextlib
from typing import Any, Iterable, Iterator, List, Optional, Tuple

import torch
from torch import nn

from .batchnorm import LipschitzBatchNorm2d
from .spectral_norm import SpectralNorm, spectral_norm_modules

__all__ = ["frozen_state", "eval_mode", "converge_spectral_norms", "recalibrate_batchnorm"]


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode within the block; restore its train/eval mode on exit (an exception too).

    Only the root's flag is saved: a model whose submodules were in mixed modes gets them all back in
    the root's mode, as ``model.train(mode)`` sets them.

    Args:
        model: the module.

    Yields:
        ``model``, in eval mode.
    """
    was = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was)


@contextlib.contextmanager
def frozen_state(model: nn.Module) -> Iterator[nn.Module]:
    """Context in which forward passes change no state: no power iteration, no BatchNorm statistics update.

    Batch statistics are still *used* in training mode. Used for the second forward of
    finite-difference GradReg and for gradient-checkpoint recomputes, so one optimisation step
    updates BatchNorm statistics and spectral-norm vectors exactly once, and the frozen pass computes
    the same function as the recording one (the same singular vectors, the same γ-clips). Ordinary
    ``nn.BatchNorm*`` layers that track running statistics run at momentum 0 and get their batch
    counter back on exit.

    Args:
        model: the model whose LCNN layers and BatchNorms are frozen (all its submodules).

    Yields:
        ``model``; its layers' settings are restored on exit (an exception too).
    """
    saved: List[Tuple[nn.Module, str, Any]] = []
    counters: List[Tuple[torch.Tensor, torch.Tensor]] = []
    for m in model.modules():
        if isinstance(m, LipschitzBatchNorm2d):
            saved.append((m, "update_stats", m.update_stats))
            m.update_stats = False
        elif isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            # Momentum 0 rather than track_running_stats=False: the running statistics stay as they
            # are, and the forward saves the same tensors for backward as the recording one (which a
            # gradient-checkpoint recompute must). The batch counter it advances is put back on exit.
            counter = m.num_batches_tracked
            assert counter is not None  # (a BatchNorm that tracks running statistics has its counter)
            saved.append((m, "momentum", m.momentum))
            counters.append((counter, counter.clone()))
            m.momentum = 0.0
        elif isinstance(m, SpectralNorm):
            saved.append((m, "frozen", m.frozen))
            m.frozen = True
    try:
        yield model
    finally:
        for m, name, value in saved:
            setattr(m, name, value)
        with torch.no_grad():
            for counter, start in counters:
                counter.copy_(start)


@torch.no_grad()
def converge_spectral_norms(model: nn.Module, n_iter: int = 50, tol: Optional[float] = None) -> int:
    """Converge the singular vectors of every spectrally normalised layer for its current weight.

    Use after training with few iterations, after averaging weights (EMA/SWA — averaged singular
    vectors are not singular vectors), or before export. Layers whose input size is still unknown
    are skipped.

    Args:
        model: the model (any module holding spectrally normalised layers).
        n_iter: at most this many operator products per layer (Lanczos, see :meth:`SpectralNorm.converge`).
        tol: stop a layer once its σ is accurate to ``tol`` (relative); None runs all ``n_iter``.

    Returns:
        The number of layers processed.
    """
    count = 0
    for m, sn in spectral_norm_modules(model):
        if sn._v is None:
            continue
        parametrizations: Any = m.parametrizations  # (torch's stubs type a submodule as Tensor | Module)
        sn.converge(parametrizations.weight.original, n_iter, tol)
        count += 1
    return count


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches: Iterable[torch.Tensor]) -> int:
    """Recompute every BatchNorm's running statistics as the plain average over ``batches``.

    Each batch is one forward in training mode with the spectral norms frozen (the model's mode, the
    BatchNorms' momenta and the spectral norms' settings are restored afterwards). For short runs:
    the running variance starts at 1 and an LCNN's early activations have a variance near 1e-3, so
    after n steps at momentum 0.1 the estimate still holds 0.9ⁿ of its start and eval mode
    normalises with a variance far too large for the first ~100 steps.

    Args:
        model: the model (γ-Lipschitz and ordinary BatchNorms are recalibrated).
        batches: model inputs, e.g. ``(x for x, _ in loader)``; each is passed to ``model`` as is.

    Returns:
        The number of batches used.
    """
    bns = [m for m in model.modules() if isinstance(m, (LipschitzBatchNorm2d, nn.modules.batchnorm._BatchNorm))]
    sns = [m for m in model.modules() if isinstance(m, SpectralNorm)]
    saved = [(bn, bn.momentum) for bn in bns]
    frozen = [(sn, sn.frozen) for sn in sns]
    was_training = model.training
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average
    for sn in sns:
        sn.frozen = True
    n = 0
    try:
        model.train()
        for x in batches:
            model(x)
            n += 1
    finally:
        for bn, momentum in saved:
            bn.momentum = momentum
        for sn, value in frozen:
            sn.frozen = value
        model.train(was_training)
    return n
