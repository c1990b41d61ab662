"""What each solver holds in memory, in bytes, from the sizes of its problem.

Torch-free: the workflow sizes a solve job's memory request from these
(:func:`neural_kernels.resources.solve_mem_mb`) and the solve stage compares them with
the memory the job has before it loads anything (:mod:`neural_kernels.solvers.stage`).
A footprint counts the arrays the solver allocates (float64: 8 bytes an entry), not
Python and torch themselves (``resources.BASE_BYTES``) nor the page cache of the
memory-mapped kernel, which the operating system reclaims under a memory limit.

On a GPU the footprint is GPU memory; the host then holds
:func:`host_bytes_beside_gpu`.

``rows``: ``N``, the fitted rows of the largest fit (the refit on train + val);
``eval_rows``: ``E``, the rows of every eval block together; ``classes``: ``C``;
``grid``: the points of its grid solved side by side (``eta t`` or ``lambda``);
``settings``: its parameters. Measured anonymous peaks (RssAnon,
sampled every 2 ms) on this project's 2-core machine: the dense solvers, 4.03-4.12
times the fitted block at N = 4000 and 8000 (the model: 4); the streaming ones, see
``tests/test_memory_cap.py``, which runs them under a cgroup limit.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from neural_kernels.errors import DataError

if TYPE_CHECKING:
    from neural_kernels.settings import SolverSettings

#: Bytes of kernel rows a streaming solver reads (and converts to float64) at a time:
#: the row blocks of every ``K @ V`` pass and of boosting's batch blocks.
SOLVE_BLOCK_BYTES = 1 << 27
#: Bytes of one float64 entry.
FLOAT64_BYTES = 8
#: Float64 ``N x N`` matrices the dense solvers hold at their peak: the fitted block,
#: the eigenvectors (flow) or the shifted copy and Cholesky factor (ridge), and
#: LAPACK's workspace (``syevd``: 2 N^2; measured 4.03-4.12 in all).
DENSE_COPIES = 4
#: ``N x C`` (and ``E x C``) float64 arrays per grid point the streaming solvers hold:
#: boosting, its predictions, the step's update, the ``K alpha`` product and the copies
#: of two steps' predictions; pcg, its solution, residual, search direction, the
#: active columns' copies, ``K P``, the targets and the predictions.
BOOSTING_COLUMN_COPIES = 5
PCG_COLUMN_COPIES = 9
#: Copies of an ``M x M`` batch block boosting holds (the block, its eigenvectors and
#: the eigendecomposition's workspace).
BATCH_COPIES = 5


@dataclass(frozen=True)
class SolveSizes:
    """The sizes a solver's memory depends on: fitted rows ``N`` (train + val on a full
    split), the rows of every eval block together and the classes."""

    rows: int
    eval_rows: int
    classes: int


def solve_sizes(kernel_files: Iterable[Path | str], train_labels: Path | str) -> SolveSizes:
    """:class:`SolveSizes` from a kernel directory's ``.npy`` headers (``train.npy``
    holds the fitted rows, every other block is scored) and the train labels."""
    shapes = {}
    for path in (Path(p) for p in kernel_files if str(p).endswith(".npy")):
        try:
            shapes[path.name] = np.load(path, mmap_mode="r").shape
        except (OSError, ValueError) as error:
            raise DataError(f"cannot read {path} as a .npy array ({error})") from None
    if "train.npy" not in shapes:
        raise DataError(f"no train.npy among the kernel's files {sorted(shapes)}")
    labels = np.load(train_labels, mmap_mode="r")
    classes = int(labels.max()) + 1 if labels.size else 1
    eval_rows = sum(shape[0] for name, shape in shapes.items() if name != "train.npy")
    return SolveSizes(shapes["train.npy"][0], eval_rows, classes)


def dense_bytes(
    settings: SolverSettings, rows: int, eval_rows: int, classes: int, grid: int
) -> int:
    """Flow and ridge: :data:`DENSE_COPIES` ``N x N`` float64 matrices (the fitted
    block read whole, its eigenvectors or Cholesky factor, the workspace), the flow's
    ``E x N`` eval products ``K(Z, X) V``, one streamed row block and the scores."""
    return (
        DENSE_COPIES * FLOAT64_BYTES * rows * rows
        + FLOAT64_BYTES * eval_rows * rows
        + SOLVE_BLOCK_BYTES
        + 4 * FLOAT64_BYTES * (rows + eval_rows) * classes
    )


def boosting_bytes(
    settings: SolverSettings, rows: int, eval_rows: int, classes: int, grid: int
) -> int:
    """Boosting: the ``M x M`` batch block and its eigendecomposition, the ``(N + E) x C``
    predictions of every ``eta t`` (:data:`BOOSTING_COLUMN_COPIES` times) and one
    streamed row block; the kernel itself stays on disk."""
    batch = min(settings.batch_size, rows)
    columns = classes * grid
    return (
        BATCH_COPIES * FLOAT64_BYTES * batch * batch
        + BOOSTING_COLUMN_COPIES * FLOAT64_BYTES * (rows + eval_rows) * columns
        + SOLVE_BLOCK_BYTES
    )


def pcg_bytes(settings: SolverSettings, rows: int, eval_rows: int, classes: int, grid: int) -> int:
    """pcg: the ``N x r`` pivoted Cholesky factor and the preconditioner's basis, the
    CG state of every ``lambda`` and class (:data:`PCG_COLUMN_COPIES` ``N x C`` arrays
    each), the ``E x C`` predictions and one streamed row block."""
    rank = min(settings.rank, rows)
    columns = classes * grid
    return (
        2 * FLOAT64_BYTES * rows * rank
        + PCG_COLUMN_COPIES * FLOAT64_BYTES * rows * columns
        + FLOAT64_BYTES * eval_rows * columns
        + SOLVE_BLOCK_BYTES
    )


def host_bytes_beside_gpu(streams: bool, rows: int) -> int:
    """Host memory of a solve whose solver works on a GPU: a dense solver reads the
    fitted block whole before moving it (``8 N^2``), a streaming one a row block, each
    with one more row block of room."""
    return (0 if streams else FLOAT64_BYTES * rows * rows) + 2 * SOLVE_BLOCK_BYTES
