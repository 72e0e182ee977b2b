"""lcnn-zoo: low-curvature neural networks (Srinivas, Matoba et al., NeurIPS 2022) for timm users.

Public API::

    from lcnn_zoo import lcnnify, fold, LCNNPenalty, curvature_stats

``import lcnn_zoo`` registers the zoo's ``lcnn_*`` models in timm. The one exception is the
``lcnn-zoo`` command itself: it registers them when it runs a command, so that ``lcnn-zoo train
--help`` answers without importing torch and timm (seconds).
"""
from __future__ import annotations

import importlib
import os
import sys
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "layers": ("CenteredSoftplus", "FrozenCenteredSoftplus", "LipschitzBatchNorm2d", "LipschitzBatchNormAct2d", "Scale",
               "SpectralNorm", "centered_softplus", "converge_spectral_norms", "frozen_state", "recalibrate_batchnorm",
               "spectral_norm", "remove_spectral_norm"),
    "conversion": ("ConversionReport", "LCNNConversionWarning", "LCNNInputSizeWarning", "lcnnify", "set_input_size"),
    "folding": ("fold",),
    "penalty": ("LCNNPenalty", "attach_penalty", "gradreg_exact", "gradreg_fd_backward", "param_groups"),
    "geometry": ("CurvatureStats", "curvature_stats", "gradient_robustness", "relative_discrepancy"),
    "curvature_bound": ("BoundCheck", "HessianBound", "hessian_bound", "verify_bounds"),
    "errors": ("UserError",),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lcnn_zoo' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_WHERE))


def register_models() -> None:
    """Register the zoo's ``lcnn_*`` models in timm (what ``import lcnn_zoo`` does)."""
    importlib.import_module(".models", __name__)


if os.path.basename(sys.argv[0] if sys.argv else "") != "lcnn-zoo":
    register_models()
