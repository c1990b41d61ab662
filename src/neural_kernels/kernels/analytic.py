"""The exact infinite-width kernel of an architecture (Shankar et al.'s recursion).

For every image pair the input covariance ``(H, W, H, W)`` goes through each layer's
kernel map (:meth:`Serial.kernel`). Cost ``O(N^2 (HW)^2)``. Pairs are processed in
blocks of ``block_size x block_size`` images on the GPU when there is one; a
symmetric kernel computes only the blocks on and above the diagonal and mirrors them.
Per-image standard deviations at every nonlinear layer come from one cheap pass over
the images paired with themselves.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from numpy.typing import NDArray
from tqdm import tqdm

from neural_kernels.architectures import Serial
from neural_kernels.device import resolve_device
from neural_kernels.errors import NeuralKernelsError
from neural_kernels.settings import ANALYTIC_PRECISIONS

log = logging.getLogger(__name__)

#: Bytes of one block's covariance tensor ``(B, B, H, W, H, W)`` that ``block_size=None``
#: aims at on a GPU (2 GiB); on a CPU, one core's L2 cache (:func:`l2_cache_bytes`), so
#: that the block stays in cache across the ~13 elementwise passes of each ReLU map.
#: Measured, 384 digits on one core: 1 MiB L2 (AMD EPYC), float64: 5x5 blocks 7-8.7 s
#: against 10-12.6 s at 8x8; float32 ("mixed"): 8x8 3.9-4.6 s against 4.9-5.4 s at 5x5.
#: On another 2-core machine (L2 not recorded) 8x8 float64 blocks took 1024 digits from
#: 54 s (32x32 blocks) to 24 s.
GPU_BLOCK_BYTES = 2**31
DEFAULT_L2_BYTES = 2**21  # when the cache size cannot be read (not Linux)


def l2_cache_bytes() -> int:
    """One core's L2 cache in bytes, from Linux sysfs; ``DEFAULT_L2_BYTES`` otherwise."""
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            if (index / "level").read_text().strip() != "2":
                continue
            size = (index / "size").read_text().strip().upper()
        except OSError:
            continue
        units = {"K": 2**10, "M": 2**20, "G": 2**30}
        if size[-1:] in units and size[:-1].isdigit():
            return int(size[:-1]) * units[size[-1]]
        if size.isdigit():
            return int(size)
    return DEFAULT_L2_BYTES


def auto_block_size(
    height: int, width: int, device: torch.device, precision: str = "float64"
) -> int:
    """Images per block side so that a block fills one L2 cache (CPU) or 2 GiB (GPU).

    A block's covariance tensor has ``B^2 (H W)^2`` entries of 8 bytes (``float64``) or
    4 (``float32``, and ``mixed`` whose early layers, most of the work, are float32).
    """
    budget = GPU_BLOCK_BYTES if device.type == "cuda" else l2_cache_bytes()
    entries = budget // (8 if precision == "float64" else 4)
    return max(1, math.isqrt(entries // (height * width) ** 2))


def _as_images(images: NDArray, name: str) -> NDArray:
    if images.ndim != 4:
        raise NeuralKernelsError(
            f"{name}: expected images of shape (N, H, W, C), got {images.shape}"
        )
    if not np.issubdtype(images.dtype, np.floating):
        raise NeuralKernelsError(
            f"{name}: expected float images, got {images.dtype}; whiten or scale them first"
        )
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
    images = _as_images(images, "images")
    symmetric = images2 is None
    rows = images if symmetric else _as_images(images2, "images2")
    if rows.shape[1:] != images.shape[1:]:
        raise NeuralKernelsError(
            f"images2 have shape {rows.shape[1:]} per image but images {images.shape[1:]}"
        )
    arch.check_image_size(*images.shape[1:3])
    run_device = resolve_device(device)
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
    with tqdm(
        total=grid.pairs(todo),
        unit="pair",
        unit_scale=True,
        disable=not progress,
        desc=f"analytic {arch.name}",
    ) as bar:
        for i, j in todo:
            bounds = grid.bounds(i, j)
            block = _block_kernel(arch, rows, images, stds, bounds, dtypes, run_device)
            _store_block(grid, i, j, block, out, done)
            r0, r1, c0, c1 = bounds
            bar.update((r1 - r0) * (c1 - c0))
    return out
