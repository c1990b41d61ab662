"""Checks at the stage boundaries: what a stage reads, and what it is about to commit.

Each scans its array in row blocks (memory maps stay on disk) and raises one
:class:`~neural_kernels.errors.DataError` naming the file, the offending rows and the
likely cause. The stages call them before anything is moved into place, so a failed
check leaves no output behind.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from numpy.typing import NDArray

from neural_kernels.errors import DataError

#: Bytes per scanned row block (a memory map is read this much at a time).
BLOCK_BYTES = 1 << 27
#: Tile rows of the symmetry check (a 2048 x 2048 float64 tile is 32 MiB; it holds
#: two tiles' difference and its absolute value at a time).
BLOCK_ROWS = 2048
#: Largest ``|K - K^T|``, relative to the largest ``|K_ii|``, of a symmetric block:
#: ours are symmetric to round-off (< 1e-15); a larger gap means mismatched pieces.
SYMMETRY_RTOL = 1e-6


def _blocks(n: int, block_rows: int) -> Iterator[slice]:
    for start in range(0, n, block_rows):
        yield slice(start, min(start + block_rows, n))


def _rows_text(rows: NDArray) -> str:
    shown = ", ".join(str(int(r)) for r in rows[:5])
    return shown + (f", ... ({len(rows)} rows)" if len(rows) > 5 else "")


def nonfinite_rows(
    array: NDArray, indices: NDArray | None = None, block_rows: int | None = None
) -> NDArray:
    """The rows of ``array`` (or of ``array[indices]``, given as indices into
    ``array``) that hold a NaN or an infinity, scanned ``block_rows`` at a time
    (default: :data:`BLOCK_BYTES` worth)."""
    n = len(array) if indices is None else len(indices)
    row_bytes = array.dtype.itemsize * int(np.prod(array.shape[1:]))
    block_rows = block_rows or max(1, BLOCK_BYTES // max(row_bytes, 1))
    bad = []
    for rows in _blocks(n, block_rows):
        block = np.asarray(array[rows] if indices is None else array[indices[rows]])
        flat = block.reshape(len(block), -1)
        hits = np.flatnonzero(~np.isfinite(flat).all(axis=1)) + rows.start
        bad.append(hits if indices is None else indices[hits])
    return np.concatenate(bad) if bad else np.empty(0, np.int64)


def check_finite(array: NDArray, what: str, cause: str, indices: NDArray | None = None) -> None:
    """Raise unless every row of ``array`` (or of ``array[indices]``) is finite."""
    bad = nonfinite_rows(array, indices)
    if len(bad):
        total = len(array) if indices is None else len(indices)
        raise DataError(
            f"{what}: {len(bad)} of {total} rows hold NaN or infinite values (rows "
            f"{_rows_text(bad)}); {cause}"
        )


def check_symmetric(
    block: NDArray, what: str, rtol: float = SYMMETRY_RTOL, block_rows: int = BLOCK_ROWS
) -> None:
    """Raise unless the square ``block`` equals its transpose to ``rtol`` of its
    largest diagonal magnitude (compared tile by tile: ``K[a, b]`` with ``K[b, a]^T``)."""
    n = block.shape[0]
    if block.shape != (n, n):
        raise DataError(f"{what}: a fitted kernel block must be square, got {block.shape}")
    scale = float(np.abs(np.diagonal(block)).max(initial=0.0)) or 1.0
    worst, where = 0.0, (0, 0)
    tiles = list(_blocks(n, block_rows))
    for i, a in enumerate(tiles):
        for b in tiles[i:]:
            gap = np.abs(np.asarray(block[a, b]) - np.asarray(block[b, a]).T)
            if gap.size and gap.max() > worst:
                r, c = np.unravel_index(int(gap.argmax()), gap.shape)
                worst, where = float(gap.max()), (a.start + int(r), b.start + int(c))
    if worst > rtol * scale:
        raise DataError(
            f"{what} is not symmetric: |K[{where[0]}, {where[1]}] - K[{where[1]}, "
            f"{where[0]}]| = {worst:.3g} (largest |K_ii| {scale:.3g}); a fitted block is "
            "K(X, X): were its pieces written by different runs? Recompute the kernel"
        )


def check_labels(labels: NDArray, what: str, num_classes: int | None = None) -> None:
    """Raise unless ``labels`` are integers in ``0..num_classes - 1`` (or ``>= 0``)."""
    if labels.ndim != 1 or not (
        np.issubdtype(labels.dtype, np.integer) or np.issubdtype(labels.dtype, np.bool_)
    ):
        raise DataError(
            f"{what}: labels must be a 1-d integer array, got {labels.dtype} {labels.shape}"
        )
    high = num_classes if num_classes is not None else np.iinfo(np.int64).max
    bad = np.flatnonzero((labels < 0) | (labels >= high))
    if len(bad):
        allowed = f"0..{num_classes - 1}" if num_classes is not None else ">= 0"
        raise DataError(
            f"{what}: {len(bad)} labels out of range {allowed} (rows {_rows_text(bad)}, "
            f"values {sorted(set(labels[bad][:5].tolist()))}); the solvers predict the "
            "train split's classes only: were the labels made from another dataset?"
        )


#: The label space (largest label + 1) may be at most ``max(LABEL_SPACE_FLOOR, rows)``:
#: the solvers build one target column per class, and a few classes without images
#: (ImageNet-R's 200 of 1000 ids, a small subset of many classes) are normal; a label
#: far beyond the rows (99999 among 1,437 digits) is a mislabelled file.
LABEL_SPACE_FLOOR = 1000


def check_classes(labels: NDArray, what: str) -> None:
    """Raise unless the fitted ``labels`` hold at least two classes and a label space
    no larger than ``max(LABEL_SPACE_FLOOR, len(labels))``."""
    if len(labels) == 0:
        raise DataError(f"{what}: no labels (no images to fit); give a non-empty training set")
    present = np.unique(labels)
    if len(present) < 2:
        raise DataError(
            f"{what}: every one of the {len(labels)} labels is class {int(present[0])}; a "
            "classifier needs at least two classes (every prediction would be right): "
            "check the labels file"
        )
    space, bound = int(labels.max()) + 1, max(LABEL_SPACE_FLOOR, len(labels))
    if space > bound:
        raise DataError(
            f"{what}: the largest label is {space - 1}, so {space} target columns for "
            f"{len(labels)} rows ({len(present)} classes present); labels must be class "
            f"ids 0..C-1 with C <= max({LABEL_SPACE_FLOOR}, rows): renumber the classes"
        )


def check_not_blank(images: NDArray, what: str) -> None:
    """Raise if an image of ``images`` (an array or row source of ``(N, ...)`` images,
    scanned in row blocks) is all zeros: its normalised kernel ``k(x, y) / sqrt(k(x, x)
    k(y, y))`` divides by zero (the estimate refuses its all-zero features alike)."""
    n = len(images)
    block_rows = max(1, BLOCK_BYTES // (8 * max(int(np.prod(images.shape[1:])), 1)))
    blank = []
    for rows in _blocks(n, block_rows):
        flat = np.asarray(images[rows]).reshape(rows.stop - rows.start, -1)
        blank.append(np.flatnonzero(~flat.any(axis=1)) + rows.start)
    bad = np.concatenate(blank) if blank else np.empty(0, np.int64)
    if len(bad):
        raise DataError(
            f"{what}: {len(bad)} of {n} images are all zeros (rows {_rows_text(bad)}); the "
            "normalised kernel of a blank image is undefined. Remove them (a ZCA fitted on "
            "too few images whitens every image to zeros)"
        )
