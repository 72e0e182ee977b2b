"""LCNN building blocks, one file per section of the paper:

* :mod:`.activation` — centered softplus with learnable β (§3.3);
* :mod:`.operators` — the true linear operators of Linear/Conv2d layers, pure maths (§3.4.1);
* :mod:`.spectral_norm` — spectral normalisation by those operators' norms, a parametrization (§3.4.1);
* :mod:`.batchnorm` — γ-Lipschitz BatchNorm, with synchronised statistics for DDP (§3.4.2);
* :mod:`.scale` — the constant factor that averages residual branches (§3.2's product bound);
* :mod:`.state` — model-wide state: frozen passes, eval mode, converged spectral norms, recalibrated
  BatchNorm.

The activation's one-pass kernels (``torch.library`` ops, inductor, Triton) are not a section of the
paper: they live in :mod:`._kernels`, which only :mod:`.activation` imports.

The LCNN layers are registered as FX leaf modules with timm (``register_notrace_module``), so
timm's FX feature extraction treats each as one operation.
"""
from timm.layers import register_notrace_module

from .activation import (
    DEFAULT_BETA_INIT,
    CenteredSoftplus,
    FrozenCenteredSoftplus,
    centered_softplus,
)
from .batchnorm import (
    DEFAULT_GAMMA_INIT,
    LipschitzBatchNorm2d,
    LipschitzBatchNormAct2d,
    sync_batchnorm,
)
from .operators import Conv2dOperator, LinearOperator, conv_padding
from .scale import Scale
from .spectral_norm import (
    CONVERGENCE_TOL,
    SpectralNorm,
    exact_vectors,
    remove_spectral_norm,
    spectral_norm,
    spectral_norm_modules,
    spectral_norm_of,
)
from .state import converge_spectral_norms, eval_mode, frozen_state, recalibrate_batchnorm

for _cls in (CenteredSoftplus, LipschitzBatchNorm2d, LipschitzBatchNormAct2d):
    register_notrace_module(_cls)

__all__ = [
    "CenteredSoftplus", "FrozenCenteredSoftplus", "centered_softplus", "DEFAULT_BETA_INIT",
    "LipschitzBatchNorm2d", "LipschitzBatchNormAct2d", "sync_batchnorm", "DEFAULT_GAMMA_INIT",
    "Scale",
    "SpectralNorm", "LinearOperator", "Conv2dOperator", "spectral_norm", "remove_spectral_norm",
    "spectral_norm_modules", "spectral_norm_of", "conv_padding", "CONVERGENCE_TOL", "exact_vectors",
    "frozen_state", "eval_mode", "converge_spectral_norms", "recalibrate_batchnorm",
]
