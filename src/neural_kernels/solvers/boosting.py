"""Batched stochastic gradient boosting of kernel regressors (the thesis's solver at scale).

Keep a regressor ``F`` (zero at the start). Each step shuffles the ``N`` training
points (seeded), splits them into ``l = ceil(N / M)`` batches ``X_j`` of at most ``M``
points, and on every batch solves for the residual with the gradient-flow operator,

    alpha_j = K_jj^{-1} (exp(-eta t K_jj) - I)(-(Y_j - F(X_j))),

averages the batch solutions, ``alpha = (1/l) sum_j alpha_j`` (each ``alpha_j`` lives
on its own batch's points, so ``alpha`` is an ``N x C`` matrix), and updates
``F(z) <- F(z) + K(z, X) alpha``. The averaging is the damping of an additive Schwarz
iteration: each batch's operator is a self-adjoint contraction in the kernel's norm, so
their mean is one too and the error of ``F`` (towards an interpolant of ``Y``) never
grows in that norm. A step costs
``l`` eigendecompositions of ``M x M`` blocks (``O(N M^2)``) plus one pass over the
kernel rows for the update (``O(N^2 C)``); the full ``N x N`` kernel is never factorised.
With ``M >= N`` one step is exactly the gradient flow.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from numpy.typing import NDArray
from tqdm import tqdm

from neural_kernels.errors import NeuralKernelsError
from neural_kernels.solvers.flow import (
    Candidates,
    Matrix,
    flow_alpha_from_eigh,
    kernel_eigh,
    kernel_matmul,
    kernel_submatrix,
)
from neural_kernels.solvers.memory import SOLVE_BLOCK_BYTES

if TYPE_CHECKING:
    from neural_kernels.settings import SolverSettings
    from neural_kernels.solvers.problem import Fit

Tensor = torch.Tensor


def boosting_batches(n: int, batch_size: int, rng: np.random.Generator) -> list[NDArray]:
    """A seeded shuffle of ``range(n)`` split into ``ceil(n / M)`` near-equal sorted batches."""
    parts = np.array_split(rng.permutation(n), math.ceil(n / batch_size))
    return [np.sort(part) for part in parts]


def boosting_path(
    kernel: Matrix,
    targets: Tensor,
    evals: Mapping[str, Matrix],
    *,
    batch_size: int,
    steps: int,
    eta_ts: Sequence[float],
    seed: int = 0,
    block_bytes: int = SOLVE_BLOCK_BYTES,
    progress: bool = True,
) -> Iterator[tuple[int, list[dict[str, Tensor]]]]:
    """Run boosting for every ``eta t`` at once; yield after each step.

    ``kernel``: ``K(X, X)`` (a memory map is read ``block_bytes`` at a time); ``targets``:
    ``Y`` (``N x C``, on the working device); ``evals``: split -> ``K(Z, X)``. The ``eta
    t`` runs share the batch shuffles and eigendecompositions. Yields ``(step, scores)``,
    ``scores[i]`` the predictions ``{"train": F(X), <split>: F(Z)}`` of ``eta_ts[i]``
    after ``step`` steps (1-based): copies, which later steps leave alone, so
    ``list(boosting_path(...))`` holds every step's own predictions.
    """
    n = kernel.shape[0]
    if kernel.ndim != 2 or kernel.shape[1] != n or len(targets) != n:
        raise NeuralKernelsError(
            f"boosting needs a square N x N kernel and N targets; got kernel "
            f"{tuple(kernel.shape)} and {len(targets)} targets"
        )
    if batch_size < 1 or steps < 1 or not eta_ts:
        raise NeuralKernelsError("boosting needs batch_size >= 1, steps >= 1 and an eta_t")
    device, classes = targets.device, targets.shape[1]
    columns = [slice(i * classes, (i + 1) * classes) for i in range(len(eta_ts))]
    # Every eta t's predictions side by side, so one pass over the kernel updates all.
    width = classes * len(eta_ts)
    scores = {"train": torch.zeros(n, width, dtype=targets.dtype, device=device)} | {
        name: torch.zeros(k.shape[0], width, dtype=targets.dtype, device=device)
        for name, k in evals.items()
    }
    rng = np.random.default_rng(seed)
    total = steps * math.ceil(n / batch_size)
    with tqdm(total=total, unit="batch", disable=not progress, desc="boosting") as bar:
        for step in range(1, steps + 1):
            batches = boosting_batches(n, batch_size, rng)
            alpha = torch.zeros_like(scores["train"])
            for batch in batches:
                index = torch.from_numpy(batch).to(device)
                block = kernel_submatrix(kernel, batch, device, block_bytes)
                eigenvalues, eigenvectors = kernel_eigh(block, "a batch block of the kernel")
                for eta_t, cols in zip(eta_ts, columns, strict=True):
                    residual = targets[index] - scores["train"][index, cols]
                    alpha[index, cols] = flow_alpha_from_eigh(
                        eigenvalues, eigenvectors, residual, eta_t
                    ) / len(batches)
                bar.update(1)
            scores["train"] += kernel_matmul(kernel, alpha, block_bytes)
            for name, k in evals.items():
                scores[name] += kernel_matmul(k, alpha, block_bytes)
            yield (
                step,
                [{name: s[:, cols].clone() for name, s in scores.items()} for cols in columns],
            )


def boosting_candidates(
    settings: SolverSettings, fit: Fit, targets: Tensor, device: torch.device, progress: bool
) -> Candidates:
    """Boosting after every step at every ``settings.eta_t`` (:func:`boosting_path`)."""
    path = boosting_path(
        fit.kernel,
        targets,
        fit.evals,
        batch_size=settings.batch_size,
        steps=settings.steps,
        eta_ts=settings.eta_t,
        seed=settings.seed,
        progress=progress,
    )
    for step, scores in path:
        for eta_t, score in zip(settings.eta_t, scores, strict=True):
            yield {"step": step, "eta_t": eta_t}, score
