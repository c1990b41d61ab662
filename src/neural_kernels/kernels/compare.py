"""How far an estimated kernel is from the analytic one."""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray


def centred_relative_error(estimate: NDArray, exact: NDArray, block_rows: int = 2048) -> float:
    """``||H (K_est - K) H||_F / ||H K H||_F`` with ``H = I - 11^T / N``, streamed.

    Double centring removes the large constant part that every Myrtle kernel shares
    (entries near 1 on digits), which would make any estimate look 1e-3 close; what
    remains is the part that classifies. Both ``N x N`` symmetric matrices may be
    memory maps: they are read in row blocks, twice (row means, then the sums).
    ``(H A H)_ij = A_ij - m_i - m_j + g`` with ``m`` the row means and ``g`` the grand
    mean of a symmetric ``A``.
    """
    n = len(exact)
    if estimate.shape != exact.shape or exact.shape != (n, n):
        raise ValueError(f"expected two N x N kernels, got {estimate.shape} and {exact.shape}")
    diff_means, exact_means = np.empty(n), np.empty(n)
    for start in range(0, n, block_rows):
        rows = slice(start, start + block_rows)
        e = np.asarray(exact[rows], dtype=np.float64)
        diff_means[rows] = (np.asarray(estimate[rows], dtype=np.float64) - e).mean(axis=1)
        exact_means[rows] = e.mean(axis=1)
    diff_grand, exact_grand = diff_means.mean(), exact_means.mean()
    num = den = 0.0
    for start in range(0, n, block_rows):
        rows = slice(start, start + block_rows)
        e = np.asarray(exact[rows], dtype=np.float64)
        d = np.asarray(estimate[rows], dtype=np.float64) - e
        d += diff_grand - diff_means[rows, None] - diff_means[None, :]
        e = e + exact_grand - exact_means[rows, None] - exact_means[None, :]
        num += float(np.sum(d * d))
        den += float(np.sum(e * e))
    return float(np.sqrt(num / den))
