"""Kernel ridge regression by preconditioned conjugate gradients, streaming the kernel.

Solves ``(K + lambda I) alpha = Y`` for every ``lambda`` of the grid and every class
column at once: each iteration is one pass over the kernel's rows, ``K P`` for the
``C x (grid)`` search directions side by side (read from a memory map in row blocks
of :data:`~neural_kernels.solvers.memory.SOLVE_BLOCK_BYTES`), so the ``N x N`` kernel
is never held in memory and never factorised. Each column runs its own CG scalars
(Hestenes and Stiefel 1952; preconditioned form, Saad, *Iterative Methods for Sparse
Linear Systems*, 2003, Algorithm 9.1), and a column stops once its relative residual
``||Y - (K + lambda I) alpha|| / ||Y||`` is below the tolerance.

The preconditioner is the rank-``r`` pivoted Cholesky factor of ``K`` (Harbrecht,
Peters and Schneider 2012; the choice of Gardner et al. 2018's GPyTorch and of Adlam
et al. 2023, who solved kernel ridge regression on millions of CIFAR-10 rows this
way): greedily, the row with the largest remaining diagonal becomes the next pivot, so
``L L^T`` matches ``K`` on its ``r`` dominant directions after reading only ``r`` of
its rows. With ``L = U diag(sqrt(s)) Q^T`` (``U`` orthonormal),
``P = L L^T + lambda I`` has the closed-form inverse (Woodbury)

    P^{-1} v = (v - U diag(s / (s + lambda)) U^T v) / lambda,

and the condition number of ``P^{-1} (K + lambda I)`` falls from
``(l_1 + lambda) / lambda`` to about ``(l_{r+1} + lambda) / lambda``.

Unlike ``scipy.sparse.linalg.cg`` (one right-hand side per call, so ``C x grid``
separate passes over the kernel per iteration) and GPyTorch's ``linear_cg`` (a
``LinearOperator`` in memory), this shares each pass among all columns and reads the
kernel from disk.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm import tqdm

from neural_kernels.errors import NeuralKernelsError
from neural_kernels.solvers.flow import Candidates, kernel_matmul
from neural_kernels.solvers.memory import SOLVE_BLOCK_BYTES
from neural_kernels.solvers.problem import Matrix

if TYPE_CHECKING:
    from neural_kernels.settings import SolverSettings
    from neural_kernels.solvers.problem import Fit

Tensor = torch.Tensor
log = logging.getLogger(__name__)

#: Pivoted Cholesky stops early once the largest remaining diagonal of ``K - L L^T``
#: is below this share of the largest diagonal of ``K`` (the kernel is then numerically
#: of lower rank: the factor already reproduces it to round-off).
PIVOT_RTOL = 1e-12


@dataclass(frozen=True)
class LowRankPreconditioner:
    """``P = U diag(s) U^T + lambda I`` for every column's own ``lambda``.

    ``basis``: ``U``, ``N x r`` with orthonormal columns; ``values``: ``s >= 0``, the
    eigenvalues of the pivoted Cholesky approximation ``L L^T`` of ``K``.
    """

    basis: Tensor
    values: Tensor

    @property
    def rank(self) -> int:
        return int(self.values.numel())

    def solve(self, v: Tensor, lambdas: Tensor) -> Tensor:
        """``P^{-1} v`` column by column (column ``j`` with ``lambdas[j]``)."""
        projected = self.basis.T @ v
        shrink = self.values[:, None] / (self.values[:, None] + lambdas[None, :])
        return (v - self.basis @ (shrink * projected)) / lambdas[None, :]


def kernel_diagonal(kernel: Matrix) -> Tensor:
    """``diag(K)`` as a new float64 CPU tensor (a memory map reads one entry per row)."""
    if isinstance(kernel, Tensor):
        return kernel.diagonal().to(device="cpu", dtype=torch.float64, copy=True)
    return torch.from_numpy(np.array(np.diagonal(kernel), dtype=np.float64))


def kernel_row(kernel: Matrix, index: int, device: torch.device) -> Tensor:
    """Row ``index`` of ``K`` as a float64 tensor on ``device``."""
    if isinstance(kernel, Tensor):
        return kernel[index].to(device=device, dtype=torch.float64)
    return torch.from_numpy(np.array(kernel[index], dtype=np.float64)).to(device)


def pivoted_cholesky(
    kernel: Matrix, rank: int, device: torch.device, progress: bool = False
) -> tuple[Tensor, list[int]]:
    """The rank-``rank`` pivoted Cholesky factor ``L`` (``N x r``) of a PSD ``K``, and
    its pivots.

    Step ``m``: the pivot ``i`` maximises the remaining diagonal ``d = diag(K - L L^T)``;
    ``L[:, m] = (K[:, i] - L L[i]^T) / sqrt(d_i)`` (the row ``K[i]``, by symmetry), and
    ``d -= L[:, m]^2``. Stops early when ``max d <= PIVOT_RTOL * max diag(K)``. Reads
    ``r`` rows of ``K``; costs ``O(N r^2)``. ``L L^T`` is the Nystrom approximation
    ``K[:, S] K[S, S]^{-1} K[S, :]`` on the pivots ``S``.
    """
    n = kernel.shape[0]
    rank = min(rank, n)
    remaining = kernel_diagonal(kernel).to(device)
    stop = PIVOT_RTOL * float(remaining.max()) if n else 0.0
    factor = torch.zeros(n, rank, dtype=torch.float64, device=device)
    pivots: list[int] = []
    with tqdm(total=rank, unit="row", disable=not progress, desc="pcg preconditioner") as bar:
        for m in range(rank):
            pivot = int(remaining.argmax())
            if not float(remaining[pivot]) > stop:
                return factor[:, :m].clone(), pivots
            row = kernel_row(kernel, pivot, device) - factor[:, :m] @ factor[pivot, :m]
            factor[:, m] = row / math.sqrt(float(remaining[pivot]))
            remaining -= factor[:, m] ** 2
            remaining[pivot] = 0.0  # exactly, not its round-off
            remaining.clamp_(min=0.0)
            pivots.append(pivot)
            bar.update(1)
    return factor, pivots


def low_rank_preconditioner(factor: Tensor) -> LowRankPreconditioner:
    """``L L^T = U diag(s) U^T`` from the ``r x r`` eigendecomposition of ``L^T L``."""
    values, vectors = torch.linalg.eigh(factor.T @ factor)
    keep = values > PIVOT_RTOL * float(values.max()) if values.numel() else values > 0
    values, vectors = values[keep], vectors[:, keep]
    return LowRankPreconditioner(basis=factor @ (vectors / values.sqrt()), values=values)


@dataclass
class PcgResult:
    """``alpha`` and ``K alpha`` (``N x (grid C)``: column ``g C + c`` is class ``c``
    of ``lambdas[g]``) and, per ``lambda``, the iterations it took, its final relative
    residual (recomputed from ``alpha``) and whether every class met the tolerance
    within the iteration cap (by CG's recurrence, which the recomputed residual can
    exceed by round-off)."""

    alpha: Tensor
    fitted: Tensor
    iterations: list[int]
    residuals: list[float]
    converged: list[bool]


def _relative_norms(residual: Tensor, scale: Tensor) -> Tensor:
    return torch.linalg.vector_norm(residual, dim=0) / scale


def conjugate_gradients(
    kernel: Matrix,
    rhs: Tensor,
    lambdas: Tensor,
    preconditioner: LowRankPreconditioner,
    *,
    tolerance: float,
    max_iterations: int,
    block_bytes: int = SOLVE_BLOCK_BYTES,
    progress: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """Preconditioned CG on ``(K + lambda_j I) x_j = b_j`` for every column ``j`` of
    ``rhs``, each with its own scalars (Saad 2003, Algorithm 9.1), the active columns
    sharing one streamed pass ``K P`` an iteration. A column stops once its recurrence
    residual ``||r_j|| / ||b_j||`` reaches ``tolerance`` (converged; a zero ``b_j`` at
    once, with ``x_j = 0``), or at a breakdown, a direction with ``p^T (K + lambda I) p``
    not positive (not converged). Returns ``x``, the iterations of each column and
    whether it converged within ``max_iterations``."""
    scale = torch.linalg.vector_norm(rhs, dim=0)
    solution, residual = torch.zeros_like(rhs), rhs.clone()
    converged = scale == 0
    active = torch.nonzero(~converged).flatten()
    iterations = torch.zeros(rhs.shape[1], dtype=torch.long, device=rhs.device)
    z = preconditioner.solve(residual, lambdas)
    direction, rz = z.clone(), (residual * z).sum(0)
    del z
    with tqdm(total=max_iterations, unit="pass", disable=not progress, desc="pcg") as bar:
        for _ in range(max_iterations):
            p = direction[:, active]
            kp = kernel_matmul(kernel, p, block_bytes) + lambdas[active] * p
            curvature = (p * kp).sum(0)
            positive = curvature > 0  # False at a breakdown (and for NaN)
            step = torch.where(positive, rz[active] / curvature, 0.0)
            solution[:, active] += step * p
            residual[:, active] -= step * kp
            iterations[active] += 1
            del kp
            norms = _relative_norms(residual[:, active], scale[active])
            bar.update(1)
            bar.set_postfix(residual=f"{float(norms.max()):.2e}", active=len(active))
            done = positive & (norms <= tolerance)
            converged[active[done]] = True
            still = positive & ~done
            active, p = active[still], p[:, still]
            if not len(active):
                break
            z = preconditioner.solve(residual[:, active], lambdas[active])
            rz_new = (residual[:, active] * z).sum(0)
            direction[:, active] = z + (rz_new / rz[active]) * p
            rz[active] = rz_new
            del z, p
    return solution, iterations, converged


def pcg_solve(
    kernel: Matrix,
    targets: Tensor,
    settings: SolverSettings,
    *,
    block_bytes: int = SOLVE_BLOCK_BYTES,
    progress: bool = False,
) -> PcgResult:
    """Solve ``(K + lambda I) alpha = Y`` for every ``lambda`` of ``settings.lambdas``
    by preconditioned CG.

    ``targets`` (``N x C``) sets the device. All ``C x len(lambdas)`` columns share
    each streamed pass ``K P`` (:func:`conjugate_gradients`), preconditioned by the
    rank-``settings.rank`` pivoted Cholesky factor; a ``lambda`` converged once all its
    columns reached ``settings.tolerance`` within ``settings.max_iterations``. The
    residual recorded per ``lambda`` is recomputed from ``alpha`` (one more pass, which
    also gives ``K alpha``: the largest of its columns'
    ``||Y - (K + lambda I) alpha|| / ||Y||``).
    """
    n, classes = targets.shape
    if kernel.ndim != 2 or tuple(kernel.shape) != (n, n):
        raise NeuralKernelsError(
            f"pcg needs a square N x N kernel and N targets; got kernel {tuple(kernel.shape)} "
            f"and {n} targets"
        )
    lambdas = settings.lambdas
    if not lambdas or min(lambdas) <= 0:
        raise NeuralKernelsError(f"pcg needs positive lambdas, got {list(lambdas)}")
    device, grid = targets.device, len(lambdas)
    columns = torch.tensor(
        [lam for lam in lambdas for _ in range(classes)], dtype=torch.float64, device=device
    )
    factor, _ = pivoted_cholesky(kernel, settings.rank, device, progress)
    preconditioner = low_rank_preconditioner(factor)
    del factor
    rhs = targets.repeat(1, grid)  # column g * C + c is class c of lambdas[g]
    alpha, iterations, converged = conjugate_gradients(
        kernel, rhs, columns, preconditioner, tolerance=settings.tolerance,
        max_iterations=settings.max_iterations, block_bytes=block_bytes, progress=progress,
    )  # fmt: skip
    fitted = kernel_matmul(kernel, alpha, block_bytes)
    scale = torch.linalg.vector_norm(rhs, dim=0).clamp_min(torch.finfo(torch.float64).tiny)
    norms = _relative_norms(rhs - fitted - columns * alpha, scale)  # 0 for a zero column
    return PcgResult(
        alpha=alpha,
        fitted=fitted,
        iterations=[int(k) for k in iterations.view(grid, classes).amax(1).tolist()],
        residuals=[float(r) for r in norms.view(grid, classes).amax(1).tolist()],
        converged=converged.view(grid, classes).all(1).tolist(),
    )


def pcg_path(
    kernel: Matrix,
    targets: Tensor,
    evals: Mapping[str, Matrix],
    settings: SolverSettings,
    *,
    block_bytes: int = SOLVE_BLOCK_BYTES,
    progress: bool = False,
) -> Iterator[tuple[float, dict[str, Tensor], dict]]:
    """Predictions of kernel ridge regression by PCG for every ``lambda``.

    Yields ``(lambda, {"train": K alpha, <split>: K(Z, X) alpha}, diagnostics)`` with
    ``diagnostics`` the iterations, final relative residual and convergence of that
    ``lambda`` (:func:`pcg_solve`). One streamed pass over each eval block scores
    every ``lambda``.
    """
    result = pcg_solve(kernel, targets, settings, block_bytes=block_bytes, progress=progress)
    classes = targets.shape[1]
    scores = {"train": result.fitted}
    scores |= {name: kernel_matmul(k, result.alpha, block_bytes) for name, k in evals.items()}
    for g, lam in enumerate(settings.lambdas):
        cols = slice(g * classes, (g + 1) * classes)
        diagnostics = {
            "iterations": result.iterations[g],
            "residual": result.residuals[g],
            "converged": result.converged[g],
        }
        yield lam, {name: s[:, cols] for name, s in scores.items()}, diagnostics


def pcg_candidates(
    settings: SolverSettings, fit: Fit, targets: Tensor, device: torch.device, progress: bool
) -> Candidates:
    """Kernel ridge regression by PCG at every ``settings.lambdas`` (:func:`pcg_path`)."""
    path = pcg_path(fit.kernel, targets, fit.evals, settings, progress=progress)
    for lam, scores, diagnostics in path:
        if not diagnostics["converged"]:
            log.warning(
                "pcg: lambda %g did not reach the tolerance %g in %d iterations (relative "
                "residual %.2e); its scores are those of the last iterate",
                lam, settings.tolerance, diagnostics["iterations"], diagnostics["residual"],
            )  # fmt: skip
        yield {"lambda": lam, "diagnostics": diagnostics}, scores
