"""The exact infinite-width kernel of an architecture (Shankar et al.'s recursion).

For every image pair the input covariance ``(H, W, H, W)`` goes through each layer's
kernel map (:meth:`Serial.kernel`). Cost ``O(N^2 (HW)^2)``. Pairs are processed in
blocks of ``block_size x block_size`` images on the GPU when there is one; a
symmetric kernel computes only the blocks on and above the diagonal and mirrors them.
Per-image standard deviations at every nonlinear layer come from one cheap pass over
the images paired with themselves.

On the CPU the blocks are shared among ``torch.get_num_threads()`` worker threads, each
running its block's operations single-threaded (torch releases the GIL inside every
operation): the blocks are small, so splitting each operation across the cores
(torch's intra-op threads) mostly pays synchronisation. Measured on 2 cores, 128
digits, Myrtle5, 5x5 blocks: 2.03 s with 2 intra-op threads, 1.50 s with 2 block
workers (2.62 s on one core). A block's result does not depend on how many workers
there are (each computes a whole block single-threaded); one worker, whose operations
use all of torch's threads, agrees with them to round-off (tested to 1e-13).
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from numpy.typing import NDArray
from tqdm import tqdm

from neural_kernels.architectures import Serial
from neural_kernels.checks import check_not_blank
from neural_kernels.device import keep_freed_cpu_memory, resolve_device
from neural_kernels.errors import NeuralKernelsError
from neural_kernels.settings import (
    ANALYTIC_CPU_BLOCK_BYTES,
    ANALYTIC_GPU_BLOCK_BYTES,
    ANALYTIC_PRECISIONS,
)

log = logging.getLogger(__name__)


def auto_block_size(
    height: int, width: int, device: torch.device, precision: str = "float64"
) -> int:
    """Images per block side so that a block's tensor fills 2 MiB (CPU) or 2 GiB (GPU):
    :data:`~neural_kernels.settings.ANALYTIC_CPU_BLOCK_BYTES` (measured there) and
    ``ANALYTIC_GPU_BLOCK_BYTES``.

    A block's covariance tensor has ``B^2 (H W)^2`` entries of 8 bytes (``float64``) or
    4 (``float32``, and ``mixed`` whose early layers, most of the work, are float32).
    """
    budget = ANALYTIC_GPU_BLOCK_BYTES if device.type == "cuda" else ANALYTIC_CPU_BLOCK_BYTES
    entries = budget // (8 if precision == "float64" else 4)
    return max(1, math.isqrt(entries // (height * width) ** 2))


def _as_images(images: NDArray, name: str, arch: Serial) -> NDArray:
    """``images``, checked: float ``(N, H, W, C)`` of a size ``arch`` takes, none blank."""
    if images.ndim != 4:
        raise NeuralKernelsError(
            f"{name}: expected images of shape (N, H, W, C), got {images.shape}"
        )
    if not np.issubdtype(images.dtype, np.floating):
        raise NeuralKernelsError(
            f"{name}: expected float images, got {images.dtype}; whiten or scale them first"
        )
    arch.check_image_size(*images.shape[1:3])
    check_not_blank(images, str(getattr(images, "path", name)))
    return images


def _precision(arch: Serial, precision: str) -> tuple[torch.dtype, int | None]:
    """The working dtype and the index of the first float64 layer, if any.

    ``mixed``: float32 up to the last 2x2 pool, float64 after (Shankar et al.'s configs).
    """
    if precision not in ANALYTIC_PRECISIONS:
        raise NeuralKernelsError(
            f"unknown precision {precision!r}; choose one of {', '.join(ANALYTIC_PRECISIONS)}"
        )
    if precision == "float64":
        return torch.float64, None
    return torch.float32, arch.last_stage_start if precision == "mixed" else None


def self_stds(
    arch: Serial,
    images: NDArray,
    *,
    block_size: int = 64,
    precision: str = "float64",
    device: torch.device | None = None,
) -> tuple[list[torch.Tensor], NDArray]:
    """Per-image standard deviations at each nonlinear layer, and ``k(x, x)`` unnormalised.

    Returns ``stds`` (one host float64 ``(N, H_l, W_l)`` tensor per layer that needs
    them, as :meth:`Serial.kernel` takes them) and the final diagonal (all ones when the
    architecture ends with its projection).
    """
    device = device or resolve_device("auto")
    dtype, float64_from = _precision(arch, precision)
    chunks: list[list[torch.Tensor]] = []
    diagonal = []
    for start in range(0, len(images), block_size):
        x = torch.tensor(np.asarray(images[start : start + block_size]), dtype=dtype)
        k, used = arch.self_kernel(x.to(device), float64_from=float64_from)
        chunks.append([s.double().cpu() for s in used])
        diagonal.append(k.double().cpu().numpy())
    stds = [torch.cat([c[i] for c in chunks]) for i in range(len(chunks[0]))]
    return stds, np.concatenate(diagonal)


@dataclass(frozen=True)
class _BlockGrid:
    """The blocks of an ``n_rows x n_cols`` kernel, ``size`` images per block side."""

    n_rows: int
    n_cols: int
    size: int
    symmetric: bool

    @property
    def row_blocks(self) -> int:
        return math.ceil(self.n_rows / self.size)

    @property
    def col_blocks(self) -> int:
        return math.ceil(self.n_cols / self.size)

    def bounds(self, i: int, j: int) -> tuple[int, int, int, int]:
        """``(r0, r1, c0, c1)``: the rows and columns of block ``(i, j)``."""
        r0, r1 = i * self.size, min(self.n_rows, (i + 1) * self.size)
        c0, c1 = j * self.size, min(self.n_cols, (j + 1) * self.size)
        return r0, r1, c0, c1

    def todo(self, done: NDArray) -> list[tuple[int, int]]:
        """The unfinished blocks (on and above the diagonal when symmetric)."""
        return [
            (i, j)
            for i in range(self.row_blocks)
            for j in range(self.col_blocks)
            if not (self.symmetric and j < i) and not done[i * self.col_blocks + j]
        ]

    def pairs(self, blocks: list[tuple[int, int]]) -> int:
        """The image pairs in ``blocks``."""
        return sum(
            min(self.size, self.n_rows - i * self.size)
            * min(self.size, self.n_cols - j * self.size)
            for i, j in blocks
        )


def _outputs(
    grid: _BlockGrid, out: NDArray | None, done: NDArray | None
) -> tuple[NDArray, NDArray]:
    """``out`` and the resume mask ``done``, allocated when not given, shapes checked."""
    if out is None:
        out = np.empty((grid.n_rows, grid.n_cols))
    if out.shape != (grid.n_rows, grid.n_cols):
        raise NeuralKernelsError(
            f"out has shape {out.shape}, expected {(grid.n_rows, grid.n_cols)}"
        )
    blocks = grid.row_blocks * grid.col_blocks
    if done is None:
        done = np.zeros(blocks, dtype=bool)
    if done.shape != (blocks,):
        raise NeuralKernelsError("the resume mask does not match the kernel's block layout")
    return out, done


def _block_kernel(
    arch: Serial,
    rows: NDArray,
    cols: NDArray,
    stds: tuple[list[torch.Tensor], list[torch.Tensor]],
    bounds: tuple[int, int, int, int],
    precision: tuple[torch.dtype, int | None],
    device: torch.device,
) -> NDArray:
    """``K(rows[r0:r1], cols[c0:c1])`` as a host float64 array.

    ``stds``: the rows' and columns' :func:`self_stds`; ``precision``: the working
    dtype and first float64 layer (:func:`_precision`).
    """
    (r0, r1, c0, c1), (dtype, float64_from) = bounds, precision
    x = torch.tensor(np.asarray(rows[r0:r1]), dtype=dtype, device=device)
    y = torch.tensor(np.asarray(cols[c0:c1]), dtype=dtype, device=device)
    sx = [s[r0:r1].to(device) for s in stds[0]]
    sy = [s[c0:c1].to(device) for s in stds[1]]
    k = arch.cross_kernel(x, y, sx, sy, float64_from=float64_from)
    return k.double().cpu().numpy()


#: Blocks in flight per worker thread: enough to keep every worker busy while the main
#: thread stores results, few enough that a huge kernel's blocks are not all queued.
BLOCKS_IN_FLIGHT = 4


def cpu_block_workers(device: torch.device) -> int:
    """Worker threads for the blocks: torch's CPU threads on the CPU, one on a GPU."""
    return torch.get_num_threads() if device.type == "cpu" else 1


def computed_blocks(
    compute: Callable[[tuple[int, int]], NDArray],
    blocks: Sequence[tuple[int, int]],
    workers: int,
) -> Iterator[NDArray]:
    """``compute(block)`` for every block, yielded in order, on ``workers`` threads.

    With more than one worker, each runs its operations single-threaded
    (``torch.set_num_threads(1)`` for the duration, restored after) and at most
    :data:`BLOCKS_IN_FLIGHT` blocks per worker are queued. When the consumer stops early
    (an error, an interrupt) the queued blocks are cancelled and the running ones
    finish before this returns.
    """
    if workers <= 1:
        yield from map(compute, blocks)
        return
    threads = torch.get_num_threads()
    pool = ThreadPoolExecutor(
        workers,
        thread_name_prefix="analytic-block",
        initializer=torch.set_num_threads,  # before a worker's first operation
        initargs=(1,),
    )
    try:
        torch.set_num_threads(1)
        todo = iter(blocks)
        pending: deque[Future[NDArray]] = deque()
        for block in todo:
            pending.append(pool.submit(compute, block))
            if len(pending) >= BLOCKS_IN_FLIGHT * workers:
                break
        while pending:
            result = pending.popleft().result()
            block = next(todo, None)
            if block is not None:
                pending.append(pool.submit(compute, block))
            yield result
    finally:
        try:
            pool.shutdown(wait=True, cancel_futures=True)
        finally:
            torch.set_num_threads(threads)


def _grid_block(
    grid: _BlockGrid,
    arch: Serial,
    rows: NDArray,
    cols: NDArray,
    stds: tuple[list[torch.Tensor], list[torch.Tensor]],
    precision: tuple[torch.dtype, int | None],
    device: torch.device,
    block: tuple[int, int],
) -> NDArray:
    """:func:`_block_kernel` of block ``(i, j)`` of ``grid``."""
    return _block_kernel(arch, rows, cols, stds, grid.bounds(*block), precision, device)


def _store_block(
    grid: _BlockGrid, i: int, j: int, block: NDArray, out: NDArray, done: NDArray
) -> None:
    """Write block ``(i, j)`` (and its mirror when symmetric) and mark it done."""
    r0, r1, c0, c1 = grid.bounds(i, j)
    if grid.symmetric and i == j:
        block = (block + block.T) / 2  # exactly symmetric despite rounding
    out[r0:r1, c0:c1] = block
    if grid.symmetric and i != j:
        out[c0:c1, r0:r1] = block.T
    done[i * grid.col_blocks + j] = True
    if grid.symmetric:
        done[j * grid.col_blocks + i] = True


def analytic_kernel(
    arch: Serial,
    images: NDArray,
    images2: NDArray | None = None,
    *,
    block_size: int | None = None,
    precision: str = "float64",
    device: str = "auto",
    out: NDArray | None = None,
    done: NDArray | None = None,
    progress: bool = True,
) -> NDArray:
    """``K(images2, images)`` (``M x N``), or the symmetric ``K(images, images)``.

    ``block_size`` images per block side (``None``: :func:`auto_block_size`).
    ``images``/``images2`` are float ``(N, H, W, C)`` arrays (memory maps are fine).
    ``out`` (float64 ``M x N``, e.g. a memory-mapped ``.npy``) receives the result;
    ``done`` (bool, one entry per block pair, flattened row-major over
    ``ceil(M / block_size) x ceil(N / block_size)``) marks finished blocks: they are
    skipped, and each finished block is marked, so an interrupted call resumes.
    """
    images = _as_images(images, "images", arch)
    symmetric = images2 is None
    rows = images if symmetric else _as_images(images2, "images2", arch)
    if rows.shape[1:] != images.shape[1:]:
        raise NeuralKernelsError(
            f"images2 have shape {rows.shape[1:]} per image but images {images.shape[1:]}"
        )
    run_device = resolve_device(device)
    if run_device.type == "cpu":
        keep_freed_cpu_memory()  # the blocks' tensors are allocated and freed by the million
    dtypes = _precision(arch, precision)
    block_size = block_size or auto_block_size(*images.shape[1:3], run_device, precision)
    grid = _BlockGrid(len(rows), len(images), block_size, symmetric)
    out, done = _outputs(grid, out, done)
    stds_cols, _ = self_stds(arch, images, precision=precision, device=run_device)
    stds_rows = (
        stds_cols if symmetric else self_stds(arch, rows, precision=precision, device=run_device)[0]
    )
    stds = (stds_rows, stds_cols)
    todo = grid.todo(done)
    compute = partial(_grid_block, grid, arch, rows, images, stds, dtypes, run_device)
    results = computed_blocks(compute, todo, cpu_block_workers(run_device))
    with (
        closing(results),
        tqdm(
            total=grid.pairs(todo),
            unit="pair",
            unit_scale=True,
            disable=not progress,
            desc=f"analytic {arch.name}",
        ) as bar,
    ):
        for (i, j), block in zip(todo, results, strict=True):
            _store_block(grid, i, j, block, out, done)
            bar.update(block.size)
    return out
