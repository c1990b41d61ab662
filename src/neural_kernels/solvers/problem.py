"""The solve stage's record types: a kernel block, one fit of the protocol, and the
problem read from a kernel directory (:mod:`neural_kernels.solvers.kernel_dir` reads
it; the solvers and :mod:`neural_kernels.solvers.stage` use it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from numpy.typing import NDArray

#: A kernel block: a tensor, or a (memory-mapped) float64 array read in row blocks.
Matrix = NDArray | torch.Tensor


@dataclass
class Fit:
    """One fit of the grid: a kernel block, the targets' labels, the blocks it scores."""

    kernel: Matrix  # K(X, X) of the fitted rows
    labels: NDArray  # the class of every fitted row
    evals: dict[str, Matrix]  # split -> K(Z, X)
    eval_labels: dict[str, NDArray]
    images: int  # distinct images fitted (mirrors not counted)
    splits: tuple[str, ...]  # the splits whose rows are fitted


@dataclass
class Problem:
    """A kernel directory read for solving: its record, the selection fit and the refit."""

    record: dict
    selection: Fit
    refit: Fit | None
    num_classes: int
    sizes: dict[str, int]  # images per split
