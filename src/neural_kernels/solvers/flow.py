"""Closed-form kernel regression: gradient flow and kernel ridge regression.

Kernel regression fits ``alpha`` on the train kernel ``K = K(X, X)`` and the targets
``Y`` (``N x C``) and predicts ``f(Z) = K(Z, X) alpha``.

* **Gradient flow** (the thesis's solver): gradient descent on ``1/2 ||F - Y||^2`` in
  continuous time, ``d alpha / dt = eta (Y - K alpha)`` from ``alpha_0 = 0``, gives

      alpha_t = K^{-1} (exp(-eta t K) - I) (-Y) = V diag(phi(l)) V^T Y,
      phi(l) = (1 - exp(-eta t l)) / l,   phi(0) = eta t,

  with ``K = V diag(l) V^T``. It is defined for every symmetric PSD ``K``, singular
  included, and one eigendecomposition serves every ``eta t``. The thesis proves the
  formula through the block matrix exponential ``exp([[-eta t K, I], [0, 0]])``, whose
  top-right block is ``(-eta t K)^{-1} (exp(-eta t K) - I)``;
  :func:`gradient_flow_alpha_expm` computes it that way, independently.
* **Kernel ridge regression**: ``alpha = (K + lambda I)^{-1} Y`` by Cholesky
  (``lambda = 1 / (eta t)`` is the thesis's ``(K + I / eta)^{-1}``).

Everything runs in float64 on the device of the kernel tensor (CUDA or CPU).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import scipy.linalg
import torch
from numpy.typing import NDArray

from neural_kernels.errors import DataError, NeuralKernelsError
from neural_kernels.solvers.memory import FLOAT64_BYTES, SOLVE_BLOCK_BYTES
from neural_kernels.solvers.problem import Matrix

if TYPE_CHECKING:
    from neural_kernels.settings import SolverSettings
    from neural_kernels.solvers.problem import Fit

Tensor = torch.Tensor

#: Below this ``eta t * l`` the flow factor uses its Taylor limit ``eta t (1 - x / 2)``.
_TAYLOR = 1e-8
#: Largest ``-l_min / l_max`` of a PSD kernel's eigenvalues that counts as round-off.
#: Our kernels (float64, or float32 storage, on 200 to 2874 rows) have none negative;
#: rounding each entry by 6e-8 moves an eigenvalue by far less than this.
PSD_RTOL = 1e-5


def one_hot_targets(labels: NDArray, num_classes: int) -> NDArray:
    """Centred one-hot targets ``(N, C)``: 1 - 1/C for the class, -1/C elsewhere.

    Centring shifts every column's prediction ``K(Z, X) alpha`` by the same amount
    (all solvers are linear in ``Y`` and each row of the shift is constant), so it
    changes no argmax and no accuracy; it only makes a zero prediction the neutral one.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise NeuralKernelsError(
            f"labels must be a 1-d array of integers in [0, {num_classes}), got shape "
            f"{labels.shape} and range [{labels.min(initial=0)}, {labels.max(initial=0)}]"
        )
    targets = np.full((len(labels), num_classes), -1.0 / num_classes)
    targets[np.arange(len(labels)), labels] += 1.0
    return targets


def kernel_eigh(kernel: Tensor, what: str = "the kernel") -> tuple[Tensor, Tensor]:
    """Eigenvalues (ascending, clipped at 0) and eigenvectors of a symmetric PSD kernel.

    Negative eigenvalues of a PSD kernel are rounding errors; clipping them to zero
    makes the flow take its ``phi(0) = eta t`` limit there instead of growing
    exponentially. One below ``-PSD_RTOL`` times the largest is no rounding error: the
    kernel is not PSD, and a :class:`DataError` says so.
    """
    _check_square(kernel)
    eigenvalues, eigenvectors = torch.linalg.eigh(kernel)
    if len(eigenvalues):
        lowest, largest = float(eigenvalues[0]), float(eigenvalues[-1].abs())
        if lowest < -PSD_RTOL * largest:
            ratio = -lowest / max(largest, 1e-300)
            raise _not_psd(
                what, f"its most negative eigenvalue is {lowest:.4g}, {ratio:.2g} of its largest"
            )
    return eigenvalues.clamp_min(0.0), eigenvectors


def _not_psd(what: str, evidence: str) -> DataError:
    return DataError(
        f"{what} is not positive semi-definite: {evidence} (round-off stays below "
        f"{PSD_RTOL:g}); a kernel of random features or of the analytic recursion is PSD, "
        "so this one was damaged or made elsewhere: recompute it"
    )


def check_psd(kernel: Tensor, what: str = "the kernel") -> None:
    """Raise unless ``K + PSD_RTOL tr(K) I`` has a Cholesky factor, that is unless every
    eigenvalue of ``K`` is above ``-PSD_RTOL tr(K)`` (``tr(K) >= l_max``: the check of
    :func:`kernel_eigh` without an eigendecomposition, a little more lenient)."""
    shift = PSD_RTOL * float(kernel.diagonal().sum().abs())
    eye = torch.eye(len(kernel), dtype=kernel.dtype, device=kernel.device)
    _, info = torch.linalg.cholesky_ex(kernel + shift * eye)
    if int(info) != 0:
        raise _not_psd(
            what, f"K + {shift:.3g} I ({PSD_RTOL:g} of its trace) has no Cholesky factor"
        )


def flow_filter(eigenvalues: Tensor, eta_t: float) -> Tensor:
    """``phi(l) = (1 - exp(-eta t l)) / l`` of each eigenvalue, ``eta t`` at ``l = 0``.

    Computed as ``eta t * g(eta t l)`` with ``g(x) = -expm1(-x) / x`` (no cancellation,
    no division by a vanishing eigenvalue) and ``g(x) = 1 - x / 2`` below 1e-8.
    """
    if not eta_t > 0:
        raise NeuralKernelsError(f"eta_t must be positive, got {eta_t}")
    x = eta_t * eigenvalues
    small = x < _TAYLOR
    safe = torch.where(small, torch.ones_like(x), x)
    return eta_t * torch.where(small, 1.0 - x / 2, -torch.expm1(-safe) / safe)


def flow_alpha_from_eigh(
    eigenvalues: Tensor, eigenvectors: Tensor, targets: Tensor, eta_t: float
) -> Tensor:
    """``alpha_t = V diag(phi(l)) V^T Y`` from an eigendecomposition of ``K``."""
    projected = eigenvectors.T @ targets
    return eigenvectors @ (flow_filter(eigenvalues, eta_t)[:, None] * projected)


def gradient_flow_alpha(kernel: Tensor, targets: Tensor, eta_t: float) -> Tensor:
    """``alpha_t = K^{-1} (exp(-eta t K) - I)(-Y)`` through one eigendecomposition."""
    return flow_alpha_from_eigh(*kernel_eigh(kernel), targets, eta_t)


def gradient_flow_alpha_expm(kernel: NDArray, targets: NDArray, eta_t: float) -> NDArray:
    """The same ``alpha_t`` through the thesis's block matrix exponential.

    ``exp([[A, I], [0, 0]]) = [[exp(A), A^{-1} (exp(A) - I)], [0, I]]`` (the top-right
    block is the series ``sum_k A^k / (k+1)!``, defined for singular ``A`` too); with
    ``A = -eta t K`` it gives ``K^{-1}(exp(-eta t K) - I) = -eta t * top-right``, so
    ``alpha_t = eta t * top-right @ Y``. Costs ``O((2N)^3)``; for checking.
    """
    kernel = np.asarray(kernel, dtype=np.float64)
    n = len(kernel)
    block = np.zeros((2 * n, 2 * n))
    block[:n, :n] = -eta_t * kernel
    block[:n, n:] = np.eye(n)
    top_right = scipy.linalg.expm(block)[:n, n:]
    return eta_t * top_right @ np.asarray(targets, dtype=np.float64)


def kernel_ridge_alpha(kernel: Tensor, targets: Tensor, lam: float) -> Tensor:
    """``alpha = (K + lambda I)^{-1} Y`` by a Cholesky factorisation.

    Raises :class:`NeuralKernelsError` (naming ``lambda`` and the fix) when
    ``K + lambda I`` is not numerically positive definite, which happens for a
    rank-deficient kernel (e.g. fewer random features than images) and a tiny
    ``lambda``.
    """
    _check_square(kernel)
    if not lam > 0:
        raise NeuralKernelsError(f"lambda must be positive, got {lam}")
    shifted = kernel + lam * torch.eye(len(kernel), dtype=kernel.dtype, device=kernel.device)
    factor, info = torch.linalg.cholesky_ex(shifted)
    if int(info) != 0:
        raise NeuralKernelsError(
            f"K + lambda I is not positive definite for lambda = {lam:g} (Cholesky failed at "
            f"column {int(info)}); use a larger lambda or the gradient-flow solver, which "
            "handles singular kernels"
        )
    return torch.cholesky_solve(targets, factor)


def kernel_rows(kernel: Matrix, rows: NDArray | slice, device: torch.device) -> Tensor:
    """``kernel[rows]`` as a float64 tensor on ``device``, copied once: a memory map is
    read lazily, and rows picked by an index array (already a copy) are not copied
    again."""
    if isinstance(kernel, Tensor):
        return kernel[rows].to(device=device, dtype=torch.float64)
    block = kernel[rows]
    shared = np.may_share_memory(block, kernel)  # a view (a slice); else already a copy
    block = np.array(block, np.float64) if shared else np.asarray(block, np.float64)
    return torch.from_numpy(block).to(device)


def block_rows(columns: int, block_bytes: int = SOLVE_BLOCK_BYTES) -> int:
    """Rows of a ``columns``-wide float64 block that fit ``block_bytes`` (at least 1)."""
    return max(1, block_bytes // (FLOAT64_BYTES * max(columns, 1)))


def kernel_matmul(kernel: Matrix, right: Tensor, block_bytes: int = SOLVE_BLOCK_BYTES) -> Tensor:
    """``kernel @ right`` with ``kernel`` streamed to ``right``'s device in row blocks
    of ``block_bytes`` (a memory map is never read whole)."""
    n = kernel.shape[0]
    out = torch.empty(n, right.shape[1], dtype=right.dtype, device=right.device)
    step = block_rows(kernel.shape[1], block_bytes)
    for start in range(0, n, step):
        rows = slice(start, min(n, start + step))
        out[rows] = kernel_rows(kernel, rows, right.device) @ right
    return out


def kernel_submatrix(
    kernel: Matrix, index: NDArray, device: torch.device, block_bytes: int = SOLVE_BLOCK_BYTES
) -> Tensor:
    """``kernel[index][:, index]`` (``index`` sorted) as a float64 tensor on ``device``,
    reading ``block_bytes`` of full rows at a time."""
    out = torch.empty(len(index), len(index), dtype=torch.float64, device=device)
    columns = torch.from_numpy(np.asarray(index)).to(device)
    step = block_rows(kernel.shape[1], block_bytes)
    for start in range(0, len(index), step):
        part = slice(start, start + step)
        out[part] = kernel_rows(kernel, index[part], device)[:, columns]
    return out


def flow_path(
    kernel: Tensor, targets: Tensor, evals: Mapping[str, Matrix], eta_ts: Sequence[float]
) -> Iterator[tuple[float, dict[str, Tensor]]]:
    """Predictions of the gradient flow for every ``eta t``, from one eigendecomposition.

    Yields ``(eta_t, {"train": K alpha_t, <split>: K(Z, X) alpha_t})``. With
    ``K = V diag(l) V^T`` and ``c = diag(phi(l)) V^T Y``: ``K alpha_t = V diag(l) c`` and
    ``K(Z, X) alpha_t = (K(Z, X) V) c``, the products ``K(Z, X) V`` formed once.
    """
    eigenvalues, eigenvectors = kernel_eigh(kernel)
    projected = eigenvectors.T @ targets
    bases = {name: kernel_matmul(k, eigenvectors) for name, k in evals.items()}
    for eta_t in eta_ts:
        coefficients = flow_filter(eigenvalues, eta_t)[:, None] * projected
        train = eigenvectors @ (eigenvalues[:, None] * coefficients)
        yield eta_t, {"train": train} | {name: b @ coefficients for name, b in bases.items()}


def ridge_path(
    kernel: Tensor, targets: Tensor, evals: Mapping[str, Matrix], lambdas: Sequence[float]
) -> Iterator[tuple[float, dict[str, Tensor] | str]]:
    """Predictions of kernel ridge regression for every ``lambda`` (one Cholesky each).

    Yields ``(lambda, scores)`` as :func:`flow_path` does, or ``(lambda, message)``
    when ``K + lambda I`` is not positive definite, so that one failing ``lambda``
    does not stop the grid. A kernel that is not PSD beyond round-off is refused first
    (:func:`check_psd`).
    """
    check_psd(kernel)
    for lam in lambdas:
        try:
            alpha = kernel_ridge_alpha(kernel, targets, lam)
        except NeuralKernelsError as error:
            yield lam, str(error)
            continue
        yield (
            lam,
            {"train": kernel @ alpha}
            | {name: kernel_matmul(k, alpha) for name, k in evals.items()},
        )


#: What a solver's candidate generator yields: hyperparameters and, for each of
#: ``"train"`` and the fit's eval splits, the ``(rows, classes)`` scores, or an error
#: message for a grid point that failed (see :mod:`neural_kernels.catalog`).
Candidates = Iterator[tuple[dict, dict[str, Tensor] | str]]


def dense_kernel(fit: Fit, device: torch.device) -> Tensor:
    """The fit's kernel block as a float64 tensor on ``device`` (read in full)."""
    return torch.from_numpy(np.array(fit.kernel, dtype=np.float64)).to(device)


def flow_candidates(
    settings: SolverSettings, fit: Fit, targets: Tensor, device: torch.device, progress: bool
) -> Candidates:
    """The gradient flow at every ``settings.eta_t`` (:func:`flow_path`)."""
    path = flow_path(dense_kernel(fit, device), targets, fit.evals, settings.eta_t)
    return (({"eta_t": eta_t}, scores) for eta_t, scores in path)


def ridge_candidates(
    settings: SolverSettings, fit: Fit, targets: Tensor, device: torch.device, progress: bool
) -> Candidates:
    """Kernel ridge regression at every ``settings.lambdas`` (:func:`ridge_path`)."""
    path = ridge_path(dense_kernel(fit, device), targets, fit.evals, settings.lambdas)
    return (({"lambda": lam}, scores) for lam, scores in path)


def _check_square(kernel: Tensor) -> None:
    if kernel.ndim != 2 or kernel.shape[0] != kernel.shape[1]:
        raise NeuralKernelsError(f"expected a square kernel, got shape {tuple(kernel.shape)}")
