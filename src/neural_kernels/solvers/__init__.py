"""Kernel regression solvers: gradient flow, kernel ridge, batched boosting; the solve stage."""

from neural_kernels.solvers.boosting import boosting_path
from neural_kernels.solvers.flow import (
    flow_path,
    gradient_flow_alpha,
    gradient_flow_alpha_expm,
    kernel_ridge_alpha,
    one_hot_targets,
    ridge_path,
)

__all__ = [
    "boosting_path",
    "flow_path",
    "gradient_flow_alpha",
    "gradient_flow_alpha_expm",
    "kernel_ridge_alpha",
    "one_hot_targets",
    "ridge_path",
]
