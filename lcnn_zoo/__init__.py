"""lcnn-zoo: low-curvature neural networks (Srinivas, Matoba et al., NeurIPS 2022) for timm users.

Public API::

    from lcnn_zoo import lcnnify, fold, LCNNPenalty, curvature_stats
"""
from .layers import (
    CenteredSoftplus,
    FrozenCenteredSoftplus,
    LipschitzBatchNorm2d,
    LipschitzBatchNormAct2d,
    Scale,
    SpectralNorm,
    centered_softplus,
    converge_spectral_norms,
    frozen_state,
    remove_spectral_norm,
    spectral_norm,
)
from .conversion import (ConversionReport, LCNNConversionWarning, LCNNInputSizeWarning, fold, lcnnify,
                         set_input_size)
from .penalty import LCNNPenalty, gradreg_exact, gradreg_fd_backward, param_groups
from .geometry import CurvatureStats, curvature_stats, gradient_robustness, relative_discrepancy
from . import models  # noqa: F401  (registers lcnn_* in timm)

__version__ = "0.1.0"

__all__ = [
    "CenteredSoftplus", "FrozenCenteredSoftplus", "LipschitzBatchNorm2d", "LipschitzBatchNormAct2d", "Scale",
    "SpectralNorm", "centered_softplus", "converge_spectral_norms", "frozen_state", "spectral_norm",
    "remove_spectral_norm",
    "ConversionReport", "LCNNConversionWarning", "LCNNInputSizeWarning", "fold", "lcnnify", "set_input_size",
    "LCNNPenalty", "gradreg_exact", "gradreg_fd_backward", "param_groups",
    "CurvatureStats", "curvature_stats", "gradient_robustness", "relative_discrepancy",
]
