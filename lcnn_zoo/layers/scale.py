"""Multiplication by a constant: the factor 1/2 that averages the two branches of a residual sum, so
that the sum of two 1-Lipschitz maps stays 1-Lipschitz (the network bound of §3.2 is then the
product of its layers' bounds)."""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["Scale"]


class Scale(nn.Module):
    """Multiply the input by a constant: y = scale · x.

    Used to average residual branches: (branch + shortcut) / 2 of two 1-Lipschitz maps is
    1-Lipschitz. Its Lipschitz constant is |scale|; it has no parameters and no buffers.

    Args:
        scale: the constant factor (stored as a Python float).

    Shape:
        - Input: (*), any shape.
        - Output: (*), the input's shape.
    """

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = float(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return ``x * scale``."""
        return x * self.scale

    def extra_repr(self) -> str:
        """The factor, as printed in the module's repr."""
        return f"{self.scale}"
