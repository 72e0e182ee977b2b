"""Spectral normalisation on the true linear operator of a layer (paper §3.4.1; Ryu et al. 2019).

A weight parametrization W ↦ W / σ(W), σ = ‖A_W‖₂, where A_W is the layer's bias-free linear map:
the matrix for ``nn.Linear``, and for ``nn.Conv2d`` the whole convolution on inputs of a fixed
size (stride, padding of any mode, dilation and groups included). The operators are the pure maths
of :mod:`.operators` (:class:`LinearOperator`, :class:`Conv2dOperator`); this module is the
parametrization's lifecycle: :class:`SpectralNorm` runs power iteration on an operator, converges and
adapts its vectors, and loads and saves them. This file is the only one that touches the
parametrization's hooks: :func:`spectral_norm` registers it, :func:`remove_spectral_norm` bakes
the normalised weight back into a plain parameter.
"""
from __future__ import annotations

import contextlib
import warnings
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Optional, Sequence, Tuple, cast

import torch
from timm.layers import Conv2dSame
from torch import nn
from torch.nn.utils import parametrize

from ..linalg import lanczos
from . import prepared
from .operators import OPERATORS, Conv2dOperator, LinearOperator, conv_padding

__all__ = ["SpectralNorm", "LinearOperator", "Conv2dOperator", "spectral_norm", "remove_spectral_norm",
           "spectral_norm_modules", "spectral_norm_of", "divide_by_sigma_backward", "conv_padding",
           "deferred_convergence", "exact_vectors", "CONVERGENCE_TOL",
           "MAX_INIT_ITERATIONS"]

CONVERGENCE_TOL = 1e-3  # relative accuracy of σ reached at initialisation (conversion, new input size)
MAX_INIT_ITERATIONS = 1000  # operator products allowed to reach it
LANCZOS_STEPS = 20  # Krylov dimension of one convergence cycle
_EPS = 1e-12
EXPORT_MESSAGE = ("lcnn_zoo: export lcnn_zoo.fold(model), not the LCNN itself (ONNX, torch.export): its spectral "
                  "norms are computed at every call; fold bakes them into plain layers")
_INIT_SEED = 0  # start vectors come from a private generator: building a model leaves torch's RNG alone


def _normalize(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm().clamp_min(_EPS)




class _DivideBySigma(torch.autograd.Function):
    """W ↦ W / σ(W) where σ is linear in W with gradient G = ∂σ/∂W (σ = uᵀA_W v, u and v constants).

    Backward: g ↦ (g − ⟨g, W⟩/σ · G) / σ, written with differentiable ops (so a create_graph backward
    records it)."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, sigma: torch.Tensor, grad_sigma: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(weight, sigma, grad_sigma)
        return weight / sigma

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        weight, sigma, grad_sigma = ctx.saved_tensors
        return divide_by_sigma_backward(grad, weight, sigma, grad_sigma), None, None


def divide_by_sigma_backward(grad: torch.Tensor, weight: torch.Tensor, sigma: torch.Tensor,
                             grad_sigma: torch.Tensor) -> torch.Tensor:
    """The gradient of W ↦ W / σ(W) at ``grad``: (g − ⟨g, W⟩/σ · ∂σ/∂W) / σ, in differentiable ops.

    Args:
        grad: the gradient of the normalised weight.
        weight: W.
        sigma: σ(W) (0-dim).
        grad_sigma: ∂σ/∂W, W's shape.
    """
    coef = (grad * weight).sum() / sigma
    return torch.addcmul(grad, grad_sigma, coef, value=-1.0).div_(sigma)


class SpectralNorm(nn.Module):
    """Parametrization W ↦ W / σ(W), σ = ‖A_W‖₂ the spectral norm of the layer's bias-free linear operator.

    * ``layer_type="linear"``: A_W is the matrix W (out, in).
    * ``layer_type="conv2d"``: A_W is the full convolution x ↦ conv2d(pad(x), W) on inputs of
      shape (C_in, H, W) = ``input_shape`` — stride, padding (any mode, symmetric or the
      asymmetric TF-'same' padding of timm's ``Conv2dSame``), dilation and groups included, bias
      excluded. The singular "vectors" are tensors of the input shape (``_v``: (1, C_in, H, W)) and
      output shape (``_u``: (1, C_out, H_out, W_out)); the adjoint is ``conv_transpose2d``
      (autograd's VJP for non-zero padding modes), exact for grouped and depthwise convolutions.
      The norm of a zero-padded convolution grows with H, W: it is computed for the size given to
      :func:`lcnn_zoo.lcnnify`, and at another size the layer is not guaranteed 1-Lipschitz.

    Power iteration, with σ = ‖A_W v‖ differentiated w.r.t. W (u, v constants, as in Miyato et al.):

    * at initialisation, until σ is accurate to ``init_tol`` (relative; at most ``init_iterations``);
    * in training mode, ``n_power_iterations`` steps per forward, on persistent buffers;
    * in eval mode, σ is recomputed from the current weight at every call (nothing is cached, so
      weights changed in any way — ``.data``, EMA/SWA tools, ``torch.func.functional_call`` — are
      seen), and the vectors are re-converged (to ``init_tol``, warm-started) at the first eval
      forward after the weight or a singular-vector buffer was written in place or replaced (its
      version counter or storage differs from the last check). So an averaged copy (timm's
      ModelEmaV3, SWA) and vectors overwritten alone (``copy_``, ``load_state_dict``, a DDP buffer
      broadcast) are within their bound without :func:`~lcnn_zoo.converge_spectral_norms`; writes
      through ``.data`` and eval under ``torch.compile`` or ``torch.func`` transforms (which use the
      vectors as they are) need that call. For repeated calls with fixed weights,
      ``torch.nn.utils.parametrize.cached()`` caches the normalised weight within its block;
      :func:`lcnn_zoo.fold` bakes it for deployment.

    The buffers are allocated at construction when the input shape is known, so a state_dict loads
    into a freshly built model without a dummy forward; with ``input_shape=None`` by
    :meth:`initialize` (the first forward) or from a loaded state_dict. A state dict whose singular
    vectors have other shapes (another input size or channel count) loads too: the vectors are
    recomputed for this layer's shape from the loaded weight.

    Args:
        weight: the layer's weight, (out, in) or (C_out, C_in / groups, kH, kW); only read (its
            shape, device, dtype and the values the vectors are converged for).
        layer_type: "linear" or "conv2d".
        input_shape: (C_in, H, W) of one input sample (conv2d); None: set later (see above).
        stride: the convolution's stride.
        padding: (left, right, top, bottom) as for ``F.pad``, or None until the input size is known
            (timm's dynamic TF-'same' padding).
        dilation: the convolution's dilation.
        groups: the convolution's groups.
        padding_mode: "zeros", "reflect", "replicate" or "circular".
        n_power_iterations: power steps per training-mode forward (≥ 0; with 0, training mode
            computes σ as eval mode does).
        init_iterations: at most this many operator products each time the vectors are converged.
        init_tol: the relative accuracy of σ they are converged to.

    Shape:
        - Input: the weight, (out, in) or (C_out, C_in / groups, kH, kW).
        - Output: W / σ(W), the weight's shape.

    Raises:
        ValueError: an unknown ``layer_type``, a negative ``n_power_iterations``, a weight of the
            wrong rank, or an ``input_shape`` that does not fit the weight.
    """

    if TYPE_CHECKING:  # a buffer that is None unless a stem gain is set (registered in __init__)
        _gain: Optional[torch.Tensor]

    def __init__(self, weight: torch.Tensor, layer_type: str = "linear", *,
                 input_shape: Optional[Sequence[int]] = None,
                 stride: Tuple[int, int] = (1, 1), padding: Optional[Tuple[int, int, int, int]] = (0, 0, 0, 0),
                 dilation: Tuple[int, int] = (1, 1), groups: int = 1, padding_mode: str = "zeros",
                 n_power_iterations: int = 1, init_iterations: int = MAX_INIT_ITERATIONS,
                 init_tol: float = CONVERGENCE_TOL) -> None:
        super().__init__()
        if layer_type not in OPERATORS:
            raise ValueError(f"SpectralNorm: layer_type must be one of {sorted(OPERATORS)}, got {layer_type!r}")
        if n_power_iterations < 0:
            raise ValueError(f"SpectralNorm: n_power_iterations must be >= 0, got {n_power_iterations}")
        self.op = LinearOperator() if layer_type == "linear" else Conv2dOperator(stride, padding, dilation, groups,
                                                                            padding_mode)
        if layer_type == "conv2d" and weight.dim() != 4:
            raise ValueError(f"SpectralNorm(layer_type='conv2d') needs a 4D weight, got shape {tuple(weight.shape)}")
        self.n_power_iterations = n_power_iterations
        self.init_iterations = init_iterations
        self.init_tol = init_tol
        self.frozen = False  # True inside `frozen_state`: no power iteration
        self.last_residual = 0.0  # relative residual of the last `converge` (see there)
        self.vectors_loaded = False  # set when a state dict provided the singular vectors
        self.auto_converge = True  # eval mode: re-converge the vectors when the weight or they have changed
        self._converged_for: Optional[Tuple] = None  # (storage pointer, version) of W, u, v last checked
        self.register_buffer("_u", None)
        self.register_buffer("_v", None)
        # A fixed factor ≤ 1 on the normalised weight, or None (no factor, no buffer). Set when a stem
        # is adapted to replicated input channels (see _adapt_vectors): the normalised weight then has
        # norm gain, and the net computes on replicated input what it computed on the original.
        self.register_buffer("_gain", None)
        if layer_type == "linear" or input_shape is not None:
            self.initialize(weight, input_shape)

    # ---- shapes ---------------------------------------------------------------------------
    @property
    def layer_type(self) -> str:
        """The operator's kind: ``"linear"`` or ``"conv2d"``."""
        return self.op.layer_type

    @property
    def padding(self) -> Optional[Tuple[int, int, int, int]]:
        """The explicit (left, right, top, bottom) padding of the operator; None until the input size is known."""
        return self.op.padding

    @property
    def input_shape(self) -> Optional[Tuple[int, ...]]:
        """Shape of one input sample the operator acts on (None until known)."""
        if self._v is None:
            return None
        return tuple(self._v.shape[1:]) if self.layer_type == "conv2d" else tuple(self._v.shape)

    @torch.no_grad()
    def initialize(self, weight: torch.Tensor, input_shape: Optional[Sequence[int]] = None) -> int:
        """Allocate random unit singular vectors for ``input_shape`` and converge them (up to
        ``init_iterations`` power iterations, to ``init_tol``). Returns the iterations run."""
        v_shape, u_shape = self.op.shapes(weight, input_shape)
        gen = torch.Generator().manual_seed(_INIT_SEED)
        fk: Dict[str, Any] = {"device": weight.device, "dtype": weight.dtype}
        self._v = _normalize(torch.randn(v_shape, generator=gen).to(**fk))
        self._u = _normalize(torch.randn(u_shape, generator=gen).to(**fk))
        self.vectors_loaded = False
        if _DEFERRED.get() is not None:  # weights (and vectors) are about to be loaded: see deferred_convergence
            return 0
        iters, _ = self.converge(weight, self.init_iterations, self.init_tol)
        return iters

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:
        if self._v is None:  # lazily-shaped buffers take their shape from the checkpoint
            for name in ("_u", "_v"):
                if prefix + name in state_dict:
                    setattr(self, name, torch.empty_like(state_dict[prefix + name]))
        gain = state_dict.get(prefix + "_gain")
        if gain is not None:  # a stem gain travels with the weights; a state dict without one has none
            if not (isinstance(gain, torch.Tensor) and gain.dim() == 0 and bool(torch.isfinite(gain))
                    and 0.0 < float(gain) <= 1.0):
                raise ValueError(f"{prefix}weight_gain must be a 0-dim tensor in (0, 1], got "
                                 f"{tuple(gain.shape) if isinstance(gain, torch.Tensor) else type(gain).__name__}"
                                 + (f" = {float(gain):.4g}" if isinstance(gain, torch.Tensor) and gain.numel() == 1
                                    else "")
                                 + ": a larger factor would break the layer's 1-Lipschitz bound")
            if self._gain is None:
                self._gain = torch.empty_like(gain, device=self._v.device if self._v is not None else gain.device)
        else:
            self._gain = None
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def prepare_load(self, state_dict, prefix: str) -> None:
        """Make the singular vectors of a state dict about to be loaded (internal keys under ``prefix``,
        the parametrized layer's) fit this layer: vectors saved for another input size or channel
        count are recomputed from the state dict's weight, and a weight without vectors (an ordinary
        checkpoint) gets vectors converged for it."""
        ku, kv = prefix + "parametrizations.weight.0._u", prefix + "parametrizations.weight.0._v"
        weight = state_dict.get(prefix + "parametrizations.weight.original")
        has_vectors = ku in state_dict and kv in state_dict
        if self._v is None:
            self.vectors_loaded = self.vectors_loaded or has_vectors
            return
        if has_vectors and (tuple(state_dict[kv].shape) != tuple(self._v.shape)
                            or tuple(state_dict[ku].shape) != tuple(self._u.shape)):
            has_vectors = self._adapt_vectors(state_dict, prefix, ku, kv, weight)
        elif has_vectors and weight is not None and self._fits(weight):
            self._converge_if_stale(state_dict, ku, kv, weight)
        elif not has_vectors and weight is not None and self._fits(weight):
            self.converge(weight.to(self._v), self.init_iterations, self.init_tol)
            has_vectors = True
        self.vectors_loaded = self.vectors_loaded or has_vectors

    @torch.no_grad()
    def _converge_if_stale(self, state_dict, ku: str, kv: str, weight: torch.Tensor) -> None:
        """Loaded vectors that are not singular vectors of the loaded weight to ``init_tol`` (saved
        mid-training, where one power step per step only tracks σ, or averaged by an EMA) are
        converged from where they are, and the state dict gets the converged ones. Eager eval would
        re-converge them at its first forward, but a compiled or ``torch.func`` forward uses the
        vectors as they are: there a stale v makes σ too small and the layer's norm above 1."""
        if _EXACT.get() or not (torch.is_tensor(state_dict[kv]) and torch.is_tensor(state_dict[ku])) or weight.is_meta:
            return
        w = weight.detach().to(self._v)
        if self._residual_of(w, state_dict[kv].to(self._v)) <= self.init_tol:
            return
        self._v.copy_(state_dict[kv])
        self._u.copy_(state_dict[ku])
        self.converge(w, self.init_iterations, self.init_tol)
        state_dict[ku], state_dict[kv] = self._u.clone(), self._v.clone()

    def _fits(self, weight: torch.Tensor) -> bool:
        try:
            self.op.shapes(weight, self.input_shape)
            return True
        except ValueError:
            return False

    @torch.no_grad()
    def _adapt_vectors(self, state_dict, prefix: str, ku: str, kv: str, weight: Optional[torch.Tensor]) -> bool:
        """The checkpoint's singular vectors were computed for another input shape or channel count:
        recompute them for ours from the checkpoint's weight (True), or keep ours when it holds no
        fitting weight for this layer (False; e.g. timm dropped a classifier of another size)."""
        if weight is not None and self._fits(weight) and self._replicated(state_dict[ku], state_dict[kv], weight):
            return self._adapt_replicated(state_dict, prefix, ku, kv)
        if weight is not None and self._fits(weight):
            self.converge(weight.to(self._v), self.init_iterations, self.init_tol)
            # One text for every layer (no name, no shapes), so the default filter shows it once per load
            # rather than once per layer (a ResNet-50's 53 lines before its first forward).
            warnings.warn("lcnn_zoo: the checkpoint's singular vectors were saved at another input size or channel "
                          "count than this model's: each layer's are recomputed from its loaded weight",
                          stacklevel=4)
            adapted = True
        else:
            adapted = False
        state_dict[ku], state_dict[kv] = self._u.clone(), self._v.clone()
        return adapted

    def _replicated(self, u: torch.Tensor, v: torch.Tensor, weight: torch.Tensor) -> bool:
        """Whether ``weight`` is a stem adapted from the checkpoint's c₀ input channels to this layer's
        c = r·c₀ the way timm adapts one (``adapt_input_conv``: the kernel repeated r times, scaled by
        1/r): the same output shape, the same spatial size, and r identical channel groups."""
        if (not isinstance(self.op, Conv2dOperator) or self.op.groups != 1 or u.shape != self._u.shape
                or v.dim() != 4):
            return False
        c0, c = v.shape[1], self._v.shape[1]
        if v.shape[0] != 1 or v.shape[2:] != self._v.shape[2:] or c <= c0 or c % c0:
            return False
        groups = weight.reshape(weight.shape[0], c // c0, c0, *weight.shape[2:])
        return bool((groups == groups[:, :1]).all())

    @torch.no_grad()
    def _adapt_replicated(self, state_dict, prefix: str, ku: str, kv: str) -> bool:
        """Singular vectors and gain for a stem timm adapted to r = c/c₀ times the channels. Its operator
        is A' = (1/r)·A∘S (S sums the r channel groups), so σ' = σ/√r, u' = u and v' = (v, …, v)/√r,
        exactly; the gain 1/√r makes the layer compute on replicated input (x, …, x) what the
        checkpoint's layer computed on x (the net's function is kept, and its bound: gain ≤ 1)."""
        v = state_dict[kv]
        r = self._v.shape[1] // v.shape[1]
        state_dict[kv] = v.repeat(1, r, 1, 1).div_(r ** 0.5).to(self._v)
        state_dict[ku] = state_dict[ku].to(self._u)
        gain = float(state_dict[prefix + "parametrizations.weight.0._gain"]) if (
            prefix + "parametrizations.weight.0._gain") in state_dict else 1.0
        state_dict[prefix + "parametrizations.weight.0._gain"] = torch.tensor(gain / r ** 0.5, dtype=self._v.dtype)
        return True

    def _with_gain(self, weight: torch.Tensor) -> torch.Tensor:
        return weight if self._gain is None else weight * self._gain

    # ---- the operator ----------------------------------------------------------------------
    def operator(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """A_W x (bias-free). Linear: (in,) → (out,); conv2d: (N, C_in, H, W) → (N, C_out, H_out, W_out)."""
        return self.op.apply(x, weight)

    def adjoint(self, y: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """A_Wᵀ y, the exact adjoint of :meth:`operator`."""
        return self.op.adjoint(y, weight, self._v.shape)

    # ---- power iteration --------------------------------------------------------------------
    def _check_ready(self) -> None:
        if self._v is None or self.op.padding is None:
            raise RuntimeError(
                "SpectralNorm: the conv input size is unknown. Pass input_size=(C, H, W) to lcnnify(), "
                "run one forward pass, or load a state_dict that contains the 'weight_u'/'weight_v' buffers.")

    @torch.no_grad()
    def power_iteration(self, weight: torch.Tensor, n_iter: int) -> None:
        """Run ``n_iter`` full power iterations on the buffers (in place)."""
        self._check_ready()
        weight = weight.detach()
        u, v = self._u, self._v
        for _ in range(n_iter):
            v = _normalize(self.adjoint(u, weight))
            u = _normalize(self.operator(v, weight))
        if n_iter:
            self._u.copy_(u)
            self._v.copy_(v)

    @torch.no_grad()
    def converge(self, weight: torch.Tensor, max_iter: int, tol: Optional[float] = CONVERGENCE_TOL
                 ) -> Tuple[int, float]:
        """Converge the singular vectors: Lanczos on AᵀA in cycles of up to ``LANCZOS_STEPS``
        products, each restarted from the last Ritz vector, until σ is accurate to ``tol``
        (relative) or ``max_iter`` operator products have run.

        The test is the residual of AᵀA at v: with ρ = ‖Av‖² and r = AᵀAv − ρv, AᵀA has an
        eigenvalue within ‖r‖ of ρ, so ‖r‖/ρ ≤ tol puts σ within ``tol``/2 of a singular value (the
        largest, which the iteration converges to from a random start). ``tol=None`` runs all
        ``max_iter`` products. Returns (products run, final relative residual).
        """
        self._check_ready()
        weight = weight.detach()
        if weight.is_meta:  # a model built on the meta device holds no values to iterate on
            return 0, float("nan")
        shape = self._v.shape

        def matvec(q: torch.Tensor) -> torch.Tensor:
            return self.adjoint(self.operator(q.reshape(shape), weight), weight).reshape(1, -1)

        v = self._v.reshape(1, -1)
        gen = torch.Generator().manual_seed(_INIT_SEED)
        used, residual = 0, float("inf")
        while used < max_iter:
            steps = min(LANCZOS_STEPS, max_iter - used)
            if steps > 1:
                _, ritz = lanczos(matvec, v, steps, gen, return_vectors=True)
                assert ritz is not None  # return_vectors=True
                v = ritz
                used += steps
            w = matvec(v)  # one more product: the residual, and a power step
            used += 1
            rho = float((w * v).sum())
            residual = float((w - rho * v).norm()) / max(rho, _EPS)
            v = _normalize(w)
            if tol is not None and residual <= tol:
                break
        if used:
            self._v.copy_(v.reshape(shape))
            self._u.copy_(_normalize(self.operator(self._v, weight)))
            self.last_residual = residual
        return used, residual

    def sigma(self, weight: torch.Tensor) -> torch.Tensor:
        """Current estimate of ‖A_W‖₂ = ‖A_W v̂‖, v̂ = v/‖v‖ (0-dim, differentiable w.r.t. ``weight``).

        v is normalised here, not only where it is written: a copy whose buffers were averaged
        (timm's ModelEmaV3 averages buffers by default, SWA too) holds a v of norm below 1, which
        would shrink σ and let W/σ exceed 1."""
        v = self._v
        return (self.operator(v, weight).norm() / v.norm().clamp_min(_EPS)).clamp_min(_EPS)

    @torch.no_grad()
    def residual(self, weight: torch.Tensor) -> float:
        """‖AᵀAv̂ − ρv̂‖ / ρ with ρ = ‖Av̂‖²: σ is within half of it (relative) of a singular value
        of A_W (see :meth:`converge`); a large value means the singular vectors are stale."""
        self._check_ready()
        return self._residual_of(weight.detach(), self._v)

    def _residual_of(self, weight: torch.Tensor, v: torch.Tensor) -> float:
        """:meth:`residual` at the vector ``v`` (of ``_v``'s shape) instead of the buffer."""
        v = _normalize(v)
        w = self.adjoint(self.operator(v, weight), weight)
        rho, off = torch.stack([(w * v).sum(), (w - (w * v).sum() * v).norm()]).tolist()  # one host read
        return off / max(rho, _EPS)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        """W / σ(W) (times the stem gain, if one is set); see the class docs for when σ is updated.

        Raises:
            RuntimeError: under ONNX export or ``torch.export`` (export :func:`lcnn_zoo.fold`'s result),
                or when a convolution's input size is still unknown.
        """
        if torch.onnx.is_in_onnx_export() or torch.compiler.is_exporting():
            # Both ONNX exporters would fail deep inside (or export the power iteration); torch.export too
            # would carry every σ computation into the graph.
            raise RuntimeError(EXPORT_MESSAGE)
        self._check_ready()
        if self.training:  # the value the model's pre-forward computed for all layers at once, if any
            record = self.n_power_iterations > 0 and not self.frozen
            given = prepared.for_graph(self, record)  # compiled: W/σ, computed before the graph
            if given is not None:
                return self._with_gain(given[0])
            ready = prepared.take(self, (weight, self._u, self._v), record)
            if ready is not None:
                return self._with_gain(ready)
        device = weight.device.type
        if device in ("cpu", "cuda") and torch.is_autocast_enabled(device):
            # Under autocast the operator's convolutions would run in bf16/fp16 and σ be off by
            # their rounding (a normalised norm of 1.003): σ is computed in the weight's precision.
            with torch.autocast(device, enabled=False):
                return self._normalized(weight)
        return self._normalized(weight)

    def _normalized(self, weight: torch.Tensor) -> torch.Tensor:
        if self.training and self.n_power_iterations > 0:
            return self._with_gain(self._training_normalized(weight, update=not self.frozen))
        if not self.frozen:
            self._refresh(weight)
        return self._with_gain(weight / self.sigma(weight))

    def _training_normalized(self, weight: torch.Tensor, update: bool) -> torch.Tensor:
        """Training mode: W / σ with σ = ‖A_W v‖ after ``n_power_iterations`` steps written to the
        buffers (``update``), or with the buffers' v as they are (a frozen forward: FD GradReg's second
        pass, a gradient-checkpoint recompute). Both run the same ops on the same values, so a frozen
        forward computes the recording one's function and saves the same tensors for backward."""
        by_autograd = self.op.sigma_gradient is None  # reflect/replicate/circular padding
        with torch.no_grad():
            w = weight  # (no graph is recorded in this block)
            v = self._v
            if update:
                u = self._u
                for _ in range(self.n_power_iterations - 1):
                    u = _normalize(self.operator(_normalize(self.adjoint(u, w)), w))
                t = self.adjoint(u, w)
                v = _normalize(t) if by_autograd else torch.div(t, torch.linalg.vector_norm(t).clamp_min_(_EPS),
                                                                 out=self._v)
        if by_autograd:
            av = self.operator(v, weight)
            sigma = av.norm().clamp_min(_EPS)
            if update:
                with torch.no_grad():
                    self._v.copy_(v)
                    self._u.copy_(av.detach() / sigma.detach())
            return weight / sigma
        with torch.no_grad():
            s = self.operator(v, w)
            sigma = torch.linalg.vector_norm(s).clamp_min_(_EPS)
            u = torch.div(s, sigma, out=self._u) if update else s / sigma
            grad_sigma = self.op.sigma_gradient(u, v, w)
        # σ(W) = uᵀA_W v with u, v the iteration's constants (Miyato et al.): its value is ‖A_W v‖ and
        # its gradient the tensor ∂(uᵀA_W v)/∂W, already computed without autograd; so the normalisation
        # is one Function with a two-op backward instead of autograd through a convolution and a norm.
        return _DivideBySigma.apply(weight, sigma, grad_sigma)

    def _refresh(self, weight: torch.Tensor) -> None:
        """Eval mode: converge the vectors for this weight once per change of it or of the vectors
        (see the class docs)."""
        # (is_dynamo_compiling and is_exporting, not is_compiling: that one reads a process-wide flag that
        # another thread's inductor compile raises, and a refresh skipped for it would leave σ stale)
        if not self.auto_converge or prepared.tracing() or torch.jit.is_scripting() or weight.is_meta:
            return
        try:
            key = self._state_key(weight)
        except (RuntimeError, AttributeError):  # a functorch-wrapped or storage-less tensor: used as it is
            return
        if key == self._converged_for:
            return
        with torch.no_grad():
            if self.residual(weight) > self.init_tol:
                self.converge(weight, self.init_iterations, self.init_tol)
                key = self._state_key(weight)  # converge wrote the vectors (their versions moved on)
        self._converged_for = key

    def _state_key(self, weight: torch.Tensor) -> Tuple:
        """What the vectors were last checked against: the storage pointer and version of the weight
        and of both singular-vector buffers. Tensor._version counts in-place writes (no public API
        exposes it); with the pointer it tells a weight written by an optimizer, an EMA update or
        load_state_dict, and vectors overwritten without a weight change (``copy_``, a state dict or
        a DDP broadcast of the buffers alone, a buffer replaced by another tensor). A training forward
        writes the vectors too, so the first eval forward after it checks them once more."""
        return tuple((t.data_ptr(), t._version) for t in (weight, self._u, self._v))

    def __prepare_scriptable__(self):
        raise RuntimeError(
            "lcnn_zoo: an LCNN cannot be compiled with TorchScript (its spectral norms are torch parametrizations, "
            "which TorchScript does not support); script lcnn_zoo.fold(model) instead, or use torch.export / "
            "torch.compile.")

    def extra_repr(self) -> str:
        """The operator's settings and the input shape, as printed in the module's repr."""
        return f"{self.op.describe()}, input_shape={self.input_shape}"


def _needs_input_size(conv: nn.Conv2d) -> bool:
    return isinstance(conv, Conv2dSame) or bool(getattr(conv, "same_pad", False))


def spectral_norm(module: nn.Module, input_shape: Optional[Sequence[int]] = None, *,
                  n_power_iterations: int = 1, init_iterations: int = MAX_INIT_ITERATIONS,
                  init_tol: float = CONVERGENCE_TOL) -> nn.Module:
    """Register :class:`SpectralNorm` on ``module.weight`` (an ``nn.Linear`` or ``nn.Conv2d``), in place.

    σ is converged to ``init_tol`` at once when the operator's shape is known (within
    :func:`deferred_convergence`: on leaving its block, unless a loaded state dict gave the vectors).

    State-dict layout (like torch's legacy ``spectral_norm``): ``weight`` holds the *unnormalised*
    weight, ``weight_u``/``weight_v`` the singular vectors. Keeping the plain ``weight`` key means
    ordinary checkpoints (e.g. timm ImageNet weights) load into a converted model, and timm's
    classifier/stem adaptation, which works on ``<layer>.weight``, keeps working.

    Args:
        module: an ``nn.Linear`` or ``nn.Conv2d`` (timm's ``Conv2dSame`` included).
        input_shape: (C, H, W) of one input sample, which a convolution's operator norm is computed
            for; None: taken from the first forward (a one-shot pre-hook) or from a loaded state
            dict. Not used for ``nn.Linear``.
        n_power_iterations: power iterations per training-mode forward.
        init_iterations: at most this many operator products when the vectors are converged.
        init_tol: the relative accuracy of σ they are converged to.

    Returns:
        ``module``, its ``weight`` now parametrized.

    Raises:
        TypeError: ``module`` is neither an ``nn.Linear`` nor an ``nn.Conv2d``.
        ValueError: ``input_shape`` does not fit the convolution (see :class:`SpectralNorm`).
    """
    kw: Dict[str, Any] = dict(n_power_iterations=n_power_iterations, init_iterations=init_iterations,
                              init_tol=init_tol)
    if isinstance(module, nn.Linear):
        sn = SpectralNorm(module.weight.detach(), "linear", **kw)
    elif isinstance(module, nn.Conv2d):
        hw = None
        if input_shape is not None:
            input_shape = tuple(int(s) for s in input_shape)
            hw = input_shape[1:]
        # Dynamic TF-'same' padding with an unknown input size: the padding is set on first forward.
        padding = None if hw is None and _needs_input_size(module) else conv_padding(module, hw)
        sn = SpectralNorm(
            module.weight.detach(), "conv2d", input_shape=input_shape,
            stride=cast(Tuple[int, int], module.stride), padding=padding,  # (Conv2d's are pairs)
            dilation=cast(Tuple[int, int], module.dilation), groups=module.groups,
            padding_mode=module.padding_mode, **kw)
        if sn._v is None or sn.padding is None:
            module.register_forward_pre_hook(_lazy_init_hook)
    else:
        raise TypeError(f"spectral_norm supports nn.Linear and nn.Conv2d, got {type(module).__name__}")
    # A lazily-shaped conv cannot be evaluated yet: skip parametrize's eager consistency check.
    lazy = sn._v is None or sn.padding is None
    parametrize.register_parametrization(module, "weight", sn, unsafe=lazy)
    module.register_state_dict_post_hook(_sn_state_dict_hook)
    module.register_load_state_dict_pre_hook(_sn_load_pre_hook)
    deferred = _DEFERRED.get()
    if deferred is not None and not lazy:
        deferred.append(module)
    return module


def spectral_norm_of(module: nn.Module) -> Optional[SpectralNorm]:
    """The :class:`SpectralNorm` on ``module.weight``, or None."""
    if parametrize.is_parametrized(module, "weight"):
        parametrizations: Any = module.parametrizations  # a ModuleDict of ParametrizationLists
        for p in parametrizations.weight:
            if isinstance(p, SpectralNorm):
                return p
    return None


# What `deferred_convergence` and `exact_vectors` switch on, as context variables rather than globals: only the
# code inside their `with`, in its own thread (or asyncio task), sees it; another thread's models converge as usual.
_DEFERRED: ContextVar[Optional[List[nn.Module]]] = ContextVar("lcnn_zoo_deferred_convergence", default=None)
_EXACT: ContextVar[bool] = ContextVar("lcnn_zoo_exact_vectors", default=False)  # loaded vectors kept as saved


@contextlib.contextmanager
def exact_vectors() -> Iterator[None]:
    """Within this block, a loaded state dict's singular vectors are kept exactly as saved, even when
    they are not converged for its weight (elsewhere loading converges them: see
    :meth:`SpectralNorm.prepare_load`). For resuming a training run: its vectors are the tracking
    state of one power step per step, and converging them would make the resumed run differ from
    the one that was not interrupted."""
    token = _EXACT.set(True)
    try:
        yield
    finally:
        _EXACT.reset(token)


@contextlib.contextmanager
def deferred_convergence() -> Iterator[None]:
    """Within this block, new spectral norms start from random vectors without converging them;
    on exit, those that no loaded state dict gave singular vectors are converged (to ``init_tol``).

    For building a model whose weights are loaded right away (pretrained tags): converging the
    random initial weights' norms would be thrown away.
    """
    pending: List[nn.Module] = []
    token = _DEFERRED.set(pending)
    try:
        yield
    finally:
        _DEFERRED.reset(token)
    for module in pending:
        sn = spectral_norm_of(module)
        if sn is not None and sn._v is not None and not sn.vectors_loaded:
            parametrizations: Any = module.parametrizations
            sn.converge(parametrizations.weight.original, sn.init_iterations, sn.init_tol)


@torch.no_grad()
def remove_spectral_norm(module: nn.Module) -> nn.Module:
    """Bake the spectrally normalised weight into a plain parameter and remove the parametrization.

    The new ``weight`` holds the current (eval-mode) value W/σ, and every hook :func:`spectral_norm`
    added is removed. A convolution whose input size is still unknown (no forward has reached it and none was given)
    has no σ yet: it gets W/σ̄ instead, σ̄ ≥ its operator norm at every input size
    (:meth:`Conv2dOperator.norm_bound`), so it is 1-Lipschitz at any size it may be run at.

    Not ``parametrize.remove_parametrizations``: on a deep copy it deletes the property from the
    parametrized class that the copy *shares* with the original model, breaking the original.

    Args:
        module: a layer :func:`spectral_norm` was registered on.

    Returns:
        ``module``, now an instance of its original class with a plain ``weight`` parameter.

    Raises:
        ValueError: ``module`` has no spectral norm, or has other parametrizations too.
    """
    if spectral_norm_of(module) is None:
        raise ValueError(f"remove_spectral_norm: {type(module).__name__} has no spectral norm")
    parametrizations: Any = module.parametrizations  # a ModuleDict of ParametrizationLists
    if set(parametrizations.keys()) != {"weight"} or len(parametrizations.weight) != 1:
        raise ValueError(f"remove_spectral_norm: {type(module).__name__} has other parametrizations too")
    sn: SpectralNorm = parametrizations.weight[0]
    if sn._v is None or sn.padding is None:
        # A conv no forward has reached and no input size was given for: its σ is undefined (it depends
        # on the input size). W / (a bound on its norm at every input size): 1-Lipschitz at any size.
        assert isinstance(sn.op, Conv2dOperator)  # a linear layer's vectors are allocated at construction
        original = parametrizations.weight.original.detach()
        w = sn._with_gain(original / sn.op.norm_bound(original).clamp_min(_EPS)).clone()
    else:
        was_training = sn.training
        sn.eval()
        w = cast(torch.Tensor, module.weight).detach().clone()
        sn.train(was_training)
    drop_hooks(module._forward_pre_hooks, _lazy_init_hook)
    drop_hooks(module._state_dict_hooks, _sn_state_dict_hook)
    drop_hooks(module._load_state_dict_pre_hooks, _sn_load_pre_hook)
    module.__class__ = type(module).__bases__[0]  # parametrize injects a direct subclass of the layer's class
    del module._modules["parametrizations"]
    module.register_parameter("weight", nn.Parameter(w))
    return module


def drop_hooks(hooks, fn) -> None:
    """Remove every hook that is ``fn`` (or wraps it) from one of a module's hook dicts.

    By identity in the dict, not by handle: a deep copy of a model (fold, an EMA copy) carries the
    hooks but not the handles they were registered with, and the dicts are where torch keeps them
    (no public API removes a hook without its handle)."""
    for key in [k for k, h in hooks.items() if getattr(h, "hook", h) is fn]:
        del hooks[key]


# parametrize's internal key  <->  public key
_SN_KEYS = (("parametrizations.weight.original", "weight"),
            ("parametrizations.weight.0._u", "weight_u"),
            ("parametrizations.weight.0._v", "weight_v"),
            ("parametrizations.weight.0._gain", "weight_gain"))


def _sn_state_dict_hook(module: nn.Module, state_dict, prefix: str, local_metadata) -> None:
    for internal, public in _SN_KEYS:
        if prefix + internal in state_dict:
            state_dict[prefix + public] = state_dict.pop(prefix + internal)


def _sn_load_pre_hook(module: nn.Module, state_dict, prefix: str, local_metadata, strict, missing_keys,
                      unexpected_keys, error_msgs) -> None:
    for internal, public in _SN_KEYS:
        if prefix + public in state_dict and prefix + internal not in state_dict:
            state_dict[prefix + internal] = state_dict.pop(prefix + public)
    sn = spectral_norm_of(module)
    if sn is not None:
        sn.prepare_load(state_dict, prefix)


def _lazy_init_hook(module: nn.Module, args) -> None:
    sn = spectral_norm_of(module)
    if sn is None:
        return
    x = args[0]
    if sn.op.padding is None:  # only a Conv2d registers this hook (see spectral_norm)
        sn.op.padding = conv_padding(cast(nn.Conv2d, module), x.shape[-2:])
    if sn._v is None:
        sn.initialize(module.parametrizations.weight.original, tuple(x.shape[1:]))
    drop_hooks(module._forward_pre_hooks, _lazy_init_hook)  # done: no per-call cost from now on


def spectral_norm_modules(model: nn.Module) -> Iterator[Tuple[nn.Module, SpectralNorm]]:
    """Yield (layer, SpectralNorm parametrization) for every spectrally normalised weight."""
    for m in model.modules():
        sn = spectral_norm_of(m)
        if sn is not None:
            yield m, sn
