"""Kernel regression solvers: gradient flow, kernel ridge, batched boosting; the solve stage.

The solvers by name are :data:`neural_kernels.catalog.SOLVERS` (torch-free).
The functions below are imported on first use, so that reading the registry does not
import torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "boosting_path": "neural_kernels.solvers.boosting",
    "flow_path": "neural_kernels.solvers.flow",
    "gradient_flow_alpha": "neural_kernels.solvers.flow",
    "gradient_flow_alpha_expm": "neural_kernels.solvers.flow",
    "kernel_ridge_alpha": "neural_kernels.solvers.flow",
    "one_hot_targets": "neural_kernels.solvers.flow",
    "ridge_path": "neural_kernels.solvers.flow",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> object:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
