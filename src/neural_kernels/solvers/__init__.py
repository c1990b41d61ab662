"""Kernel regression solvers: gradient flow, kernel ridge, batched boosting; the solve stage.

The solvers by name are :data:`neural_kernels.catalog.SOLVERS` (torch-free).
The functions below are imported on first use, so that reading the registry does not
import torch.
"""

from __future__ import annotations

from neural_kernels.registry import lazy_attributes

_EXPORTS = {
    "neural_kernels.solvers.boosting": ("boosting_path",),
    "neural_kernels.solvers.flow": (
        "flow_path", "gradient_flow_alpha", "gradient_flow_alpha_expm", "kernel_ridge_alpha",
        "one_hot_targets", "ridge_path",
    ),
}  # fmt: skip
__all__ = sorted(name for names in _EXPORTS.values() for name in names)


__getattr__ = lazy_attributes(__name__, _EXPORTS)
