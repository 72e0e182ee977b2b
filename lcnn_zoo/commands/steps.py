"""One training step per ``--reg`` choice: forward, loss, regulariser and backward.

A :class:`Regulariser` accumulates gradients into ``.grad`` and returns what to log; the caller
(:func:`lcnn_zoo.commands.training.train_one_epoch`, or any loop) steps the optimizer. The maths is in
:mod:`lcnn_zoo.penalty`: the LCNN penalty (paper eq. 5) and GradReg (§5) by double backprop or by
finite differences.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Tuple

import torch
from torch import nn

from ..penalty import LCNNPenalty, gradreg_exact, gradreg_fd_backward
from .config import TrainConfig

__all__ = ["StepOutput", "Regulariser", "ExactGradRegStep", "FDGradRegStep", "make_regulariser"]


@dataclass
class StepOutput:
    """loss: mean task loss (0-dim, detached); logits: (B, K); stats: what to log (Σβ, Σlog γ, ‖∇ₓℓ‖²), as
    detached 0-dim tensors on the model's device: a step reads nothing on the host (a GPU would wait for
    it at every step); the loop accumulates them there and reads them at its log interval."""

    loss: torch.Tensor
    logits: torch.Tensor
    stats: Dict[str, torch.Tensor] = field(default_factory=dict)


class Regulariser:
    """One training step of a ``--reg`` choice: forward, loss, backward (gradients accumulated into
    ``.grad``; the caller steps the optimizer). This base class is ``--reg none`` / ``lcnn``."""

    def __init__(self, criterion: Callable, penalty: Optional[LCNNPenalty], core: nn.Module) -> None:
        self.criterion, self.penalty, self.core = criterion, penalty, core

    def _penalty(self) -> Tuple[Optional[torch.Tensor], Dict[str, torch.Tensor]]:
        if self.penalty is None:
            return None, {}
        terms = LCNNPenalty.terms(self.core)
        value = self.penalty.lambda_beta * terms["sum_beta"] + self.penalty.lambda_gamma * terms["sum_log_gamma"]
        return value, {k: v.detach() for k, v in terms.items()}

    def step(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, amp: Callable, scaler) -> StepOutput:
        """One step: forward, loss (+ the LCNN penalty), backward into ``.grad``; the optimizer is not stepped.

        Args:
            model: the model to run (``core``, or a wrapper of it: DDP, compiled).
            x: the input batch.
            y: the targets ``criterion`` takes.
            amp: a zero-argument context-manager factory: the autocast context (or a null one).
            scaler: the AMP ``GradScaler`` (the backward runs on the scaled loss), or None.

        Returns:
            :class:`StepOutput`, detached.
        """
        with amp():
            logits = model(x)
            loss = self.criterion(logits, y)
            pen, stats = self._penalty()
            total = loss if pen is None else loss + pen
        (scaler.scale(total) if scaler is not None else total).backward()
        return StepOutput(loss.detach(), logits.detach(), stats)


class ExactGradRegStep(Regulariser):
    """GradReg by double backpropagation (``--gradreg exact``)."""

    def __init__(self, criterion: Callable, penalty: Optional[LCNNPenalty], core: nn.Module,
                 lambda_grad: float) -> None:
        super().__init__(criterion, penalty, core)
        self.lambda_grad = lambda_grad

    def step(self, model, x, y, amp, scaler) -> StepOutput:
        """As :meth:`Regulariser.step`, with ``lambda_grad`` · R (exact) added to the loss."""
        with amp():
            out = gradreg_exact(model, x, y, self.criterion, loss_scale=_loss_scale(scaler, x.device))
            pen, stats = self._penalty()
            total = out.loss + self.lambda_grad * out.penalty + (0.0 if pen is None else pen)
        (scaler.scale(total) if scaler is not None else total).backward()
        return StepOutput(out.loss.detach(), out.logits.detach(), {**stats, "grad_sq": out.penalty.detach()})


class FDGradRegStep(ExactGradRegStep):
    """GradReg by a finite difference along the input gradient (``--gradreg fd``): two forward/backward
    passes, no double backward. With ``fraction`` < 1 the penalty's second pass runs on a random
    ``fraction`` of the batch, weighted so that its expectation is the full-batch penalty."""

    def __init__(self, criterion, penalty, core, lambda_grad: float, step_size: float, fraction: float,
                 generator: torch.Generator) -> None:
        super().__init__(criterion, penalty, core, lambda_grad)
        self.step_size, self.fraction, self.generator = step_size, fraction, generator

    def step(self, model, x, y, amp, scaler) -> StepOutput:
        """As :meth:`Regulariser.step`, with R's gradient by :func:`~lcnn_zoo.penalty.gradreg_fd_backward`."""
        scale = _loss_scale(scaler, x.device)
        stats: Dict[str, torch.Tensor] = {}

        def extra() -> torch.Tensor:
            pen, terms = self._penalty()
            stats.update(terms)
            assert pen is not None  # (passed only with a penalty)
            return pen

        with amp():
            out = gradreg_fd_backward(model, x, y, self.lambda_grad, loss_fn=self.criterion, step=self.step_size,
                                      extra_loss=extra if self.penalty is not None else None, loss_scale=scale,
                                      fraction=self.fraction, generator=self.generator)
        return StepOutput(out.loss, out.logits, {**stats, "grad_sq": out.penalty})


def _loss_scale(scaler, device: torch.device) -> Optional[torch.Tensor]:
    """The GradScaler's current scale as a 0-dim tensor on ``device``, or None without a scaler.

    ``scaler.scale(1)`` rather than ``get_scale()``: the latter reads the scale on the host (a device
    sync at every step); scale() multiplies on the device, and creates the scale at its first call."""
    return None if scaler is None else scaler.scale(torch.ones((), device=device))


def make_regulariser(cfg: TrainConfig, criterion: Callable, core: nn.Module, seed: int) -> Regulariser:
    """The :class:`Regulariser` of ``cfg.reg`` / ``cfg.gradreg``."""
    penalty = LCNNPenalty(cfg.lambda_beta, cfg.lambda_gamma) if cfg.reg in ("lcnn", "lcnn_gradreg") else None
    if cfg.reg in ("none", "lcnn"):
        return Regulariser(criterion, penalty, core)
    if cfg.gradreg == "exact":
        return ExactGradRegStep(criterion, penalty, core, cfg.lambda_grad)
    return FDGradRegStep(criterion, penalty, core, cfg.lambda_grad, cfg.fd_step, cfg.gradreg_fraction,
                         torch.Generator().manual_seed(seed))
