"""The linear operators whose norm spectral normalisation divides by (paper §3.4.1): pure maths,
no parametrization. Each is a small object with ``shapes``, ``apply``, ``adjoint`` and
``sigma_gradient`` — :class:`LinearOperator` (the matrix of an ``nn.Linear``) and
:class:`Conv2dOperator` (the whole convolution on inputs of one size: stride, explicit padding of
any mode, dilation, groups; bias excluded) — and :func:`conv_padding`, a convolution's padding made
explicit for an input size (timm's dynamic TF-'same' padding included).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, cast

import torch
import torch.nn.functional as F
from timm.layers import Conv2dSame
from timm.layers.padding import pad_same_arg
from torch import nn

__all__ = ["LinearOperator", "Conv2dOperator", "OPERATORS", "conv_padding"]


class LinearOperator:
    """x ↦ W x for a weight of shape (out, in); singular vectors of shapes (in,) and (out,)."""

    layer_type = "linear"
    padding = (0, 0, 0, 0)

    def shapes(self, weight: torch.Tensor, input_shape: Optional[Sequence[int]] = None
               ) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
        """(v's shape (in,), u's shape (out,)) for ``weight`` (out, in); ``input_shape`` is not used.

        Raises:
            ValueError: ``weight`` is not 2-D.
        """
        if weight.dim() != 2:
            raise ValueError(f"SpectralNorm(layer_type='linear') needs a 2D weight, got shape {tuple(weight.shape)}")
        return (weight.shape[1],), (weight.shape[0],)

    def apply(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """W x: (in,) → (out,)."""
        return torch.mv(weight, x)

    def adjoint(self, y: torch.Tensor, weight: torch.Tensor, in_shape: Sequence[int]) -> torch.Tensor:
        """Wᵀ y: (out,) → (in,); ``in_shape`` is not used."""
        return torch.mv(weight.t(), y)

    def sigma_gradient(self, u: torch.Tensor, v: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """∂(uᵀ W v)/∂W = u vᵀ (out, in)."""
        return torch.outer(u, v)

    def describe(self) -> str:
        """The operator's settings, for :class:`~lcnn_zoo.layers.SpectralNorm`'s repr."""
        return "layer_type=linear"


class Conv2dOperator:
    """x ↦ conv2d(pad(x), W) on (1, C_in, H, W) inputs, bias excluded (it does not change the
    Lipschitz constant). ``padding`` is (left, right, top, bottom) as for ``F.pad``, or None until
    the input size is known (timm's dynamic TF-'same' padding)."""

    layer_type = "conv2d"

    def __init__(self, stride: Tuple[int, int] = (1, 1), padding: Optional[Tuple[int, int, int, int]] = (0, 0, 0, 0),
                 dilation: Tuple[int, int] = (1, 1), groups: int = 1, padding_mode: str = "zeros") -> None:
        self.stride = tuple(stride)
        self.padding: Optional[Tuple[int, int, int, int]] = (
            None if padding is None else cast(Tuple[int, int, int, int], tuple(padding)))
        self.dilation = tuple(dilation)
        self.groups = groups
        self.padding_mode = padding_mode

    def _padding(self) -> Tuple[int, int, int, int]:
        """``padding``, which is set (by the input size, for dynamic padding) before the operator is used."""
        assert self.padding is not None, "Conv2dOperator: the padding is not known yet (no input size)"
        return self.padding

    def shapes(self, weight: torch.Tensor, input_shape: Optional[Sequence[int]]
               ) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
        """(v's shape (1, C_in, H, W), u's shape (1, C_out, H_out, W_out)) for inputs of ``input_shape`` (C, H, W).

        Raises:
            ValueError: ``weight`` is not 4-D, ``input_shape`` is not (C, H, W), its C does not fit the
                weight and groups, or it is too small for the kernel.
        """
        if weight.dim() != 4:
            raise ValueError(f"SpectralNorm(layer_type='conv2d') needs a 4D weight, got shape {tuple(weight.shape)}")
        if input_shape is None or len(input_shape) != 3:
            raise ValueError(f"SpectralNorm(conv2d) needs input_shape=(C, H, W), got {input_shape}")
        c, h, w = (int(s) for s in input_shape)
        if c != weight.shape[1] * self.groups:
            raise ValueError(f"SpectralNorm: input has {c} channels, the conv expects {weight.shape[1] * self.groups}")
        left, right, top, bottom = self._padding()
        kh, kw = weight.shape[-2:]
        ho = (h + top + bottom - self.dilation[0] * (kh - 1) - 1) // self.stride[0] + 1
        wo = (w + left + right - self.dilation[1] * (kw - 1) - 1) // self.stride[1] + 1
        if ho <= 0 or wo <= 0:
            raise ValueError(f"SpectralNorm: input shape {(c, h, w)} is too small for kernel "
                             f"{(kh, kw)}, stride {self.stride}, dilation {self.dilation}")
        return (1, c, h, w), (1, weight.shape[0], ho, wo)

    def _symmetric_padding(self) -> Optional[Tuple[int, int]]:
        left, right, top, bottom = self._padding()
        if self.padding_mode == "zeros" and left == right and top == bottom:
            return (top, left)
        return None

    def apply(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """A_W x = conv2d(pad(x), W), bias-free: (N, C_in, H, W) → (N, C_out, H_out, W_out)."""
        sym = self._symmetric_padding()
        if sym is None:
            mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
            x = F.pad(x, self._padding(), mode=mode)
            sym = (0, 0)
        return F.conv2d(x, weight, None, self.stride, sym, self.dilation, self.groups)

    def adjoint(self, y: torch.Tensor, weight: torch.Tensor, in_shape: Sequence[int]) -> torch.Tensor:
        """The exact adjoint of :meth:`apply` for inputs of shape ``in_shape`` (1, C, H, W)."""
        if self.padding_mode != "zeros":
            # Reflect/replicate/circular padding: let autograd build the adjoint (a VJP).
            with torch.enable_grad():
                x = torch.zeros(tuple(in_shape), device=y.device, dtype=y.dtype, requires_grad=True)
                (out,) = torch.autograd.grad(self.apply(x, weight.detach()), x, y)
            return out
        left, right, top, bottom = self._padding()
        hp, wp = in_shape[-2] + top + bottom, in_shape[-1] + left + right
        kh, kw = weight.shape[-2:]
        base_h = (y.shape[-2] - 1) * self.stride[0] + self.dilation[0] * (kh - 1) + 1
        base_w = (y.shape[-1] - 1) * self.stride[1] + self.dilation[1] * (kw - 1) + 1
        # Rows/columns the conv never reads (hp - base < stride) get a zero adjoint: output_padding.
        out_pad = (hp - base_h, wp - base_w)
        sym = self._symmetric_padding()
        if sym is not None:
            return F.conv_transpose2d(y, weight, None, self.stride, sym, out_pad, self.groups, self.dilation)
        x = F.conv_transpose2d(y, weight, None, self.stride, 0, out_pad, self.groups, self.dilation)
        return x[..., top:top + in_shape[-2], left:left + in_shape[-1]]

    @property
    def sigma_gradient(self):
        """∂⟨u, A_W v⟩/∂W (W's shape): the convolution's weight gradient for input v and output
        gradient u. None for reflect/replicate/circular padding (autograd differentiates those)."""
        return self._sigma_gradient if self.padding_mode == "zeros" else None

    def _sigma_gradient(self, u: torch.Tensor, v: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        sym = self._symmetric_padding()
        if sym is None:
            v = F.pad(v, self._padding())
            sym = (0, 0)
        # convolution_backward itself, as torch.nn.grad.conv2d_weight calls it, with the weight in place of
        # the stand-in that helper builds for its shape (two more ops per call: new_empty and expand)
        return torch.ops.aten.convolution_backward(u, v, weight, None, self.stride, sym, self.dilation, False, [0, 0],
                                                   self.groups, (False, True, False))[1]

    def norm_bound(self, weight: torch.Tensor) -> torch.Tensor:
        """An upper bound on ‖A_W‖₂ that holds at every input size (0-dim; for a convolution whose
        input size is unknown). A_W = Σ_ij (W_ij ⊗ S_ij)∘P over the kernel taps (i, j): W_ij mixes the
        channels (block-diagonal over the groups, norm max_g ‖W_ij^g‖₂), S_ij selects one distinct
        padded-input position per output position (norm ≤ 1, any stride and dilation), and the
        padding P copies each input pixel m_h·m_w times at most: once with zero padding, at most
        1 + [pad before > 0] + [pad after > 0] per dimension with reflect and circular padding
        (each side copies distinct pixels: torch allows at most the input's size there), and
        1 + pad before + pad after with replicate padding. So ‖A_W‖₂ ≤ √(m_h·m_w) · Σ_ij max_g ‖W_ij^g‖₂."""
        w = weight.detach()
        g = self.groups
        co, ci, kh, kw = w.shape
        taps = w.reshape(g, co // g, ci, kh * kw).permute(3, 0, 1, 2)  # (taps, groups, out/g, in/g)
        bound = torch.linalg.matrix_norm(taps, ord=2).amax(dim=1).sum()
        if self.padding_mode != "zeros" and self.padding is not None:
            left, right, top, bottom = self.padding

            def copies(before: int, after: int) -> int:
                if self.padding_mode == "replicate":
                    return 1 + before + after
                return 1 + (before > 0) + (after > 0)

            bound = bound * (copies(left, right) * copies(top, bottom)) ** 0.5
        return bound

    def describe(self) -> str:
        """The operator's settings, for :class:`~lcnn_zoo.layers.SpectralNorm`'s repr."""
        return (f"layer_type=conv2d, stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
                f"groups={self.groups}")


OPERATORS = {"linear": LinearOperator, "conv2d": Conv2dOperator}


def conv_padding(conv: nn.Conv2d, input_hw: Optional[Sequence[int]]) -> Tuple[int, int, int, int]:
    """Explicit (left, right, top, bottom) padding of ``conv`` for inputs of spatial size ``input_hw``."""
    kh, kw = conv.kernel_size
    if isinstance(conv, Conv2dSame) or getattr(conv, "same_pad", False):
        if input_hw is None:
            raise ValueError(f"{type(conv).__name__} pads dynamically: the input size must be known")
        # timm computes TF-'same' padding from the actual input size; use its own helper.
        return cast(Tuple[int, int, int, int],
                    tuple(pad_same_arg(list(input_hw), [kh, kw], list(conv.stride), list(conv.dilation))))
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            return (0, 0, 0, 0)
        # 'same' (stride 1): total d(k-1), the odd extra element goes to the right/bottom.
        th, tw = conv.dilation[0] * (kh - 1), conv.dilation[1] * (kw - 1)
        return (tw // 2, tw - tw // 2, th // 2, th - th // 2)
    ph, pw = conv.padding
    return (pw, pw, ph, ph)
