"""Row sources read lazily by contiguous slices: several image arrays stacked in order,
and the crops that augment a kernel's rows.

The kernel stages stack the train rows and the validation rows into the one fitted
set of the refit (train rows first), and ZCA is fitted on the same images; neither
copies the arrays up front. A kernel augmented by crops reads seeded random windows
of its fitted images and the centre windows of its eval images (:class:`Crops`),
window by window as the rows are read.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from numpy.typing import NDArray

from neural_kernels.errors import DataError, NeuralKernelsError


class Rows(Protocol):
    """What a row source offers: a length, an (N, ...) shape, a dtype, slices."""

    def __len__(self) -> int: ...

    @property
    def shape(self) -> tuple[int, ...]: ...

    @property
    def dtype(self) -> np.dtype: ...

    def __getitem__(self, key: slice) -> NDArray: ...


class StackedRows:
    """``parts[0]``'s rows, then ``parts[1]``'s, ...: one array to whoever slices it.

    Every part must have the same per-row shape and dtype. Slices must be contiguous
    (``step`` 1); a slice across parts concatenates their pieces.
    """

    def __init__(self, parts: Sequence[Rows]):
        if not parts:
            raise NeuralKernelsError("StackedRows needs at least one part")
        first = parts[0]
        for part in parts[1:]:
            if tuple(part.shape[1:]) != tuple(first.shape[1:]) or part.dtype != first.dtype:
                raise DataError(
                    f"cannot stack rows of shape {tuple(part.shape[1:])} ({part.dtype}) under "
                    f"rows of shape {tuple(first.shape[1:])} ({first.dtype}); the splits "
                    "must come from one dataset"
                )
        self.parts = list(parts)
        self.offsets = np.cumsum([0, *(len(p) for p in self.parts)])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self), *self.parts[0].shape[1:])

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def dtype(self) -> np.dtype:
        return self.parts[0].dtype

    def __getitem__(self, key: slice) -> NDArray:
        if not isinstance(key, slice):
            raise NeuralKernelsError("StackedRows supports contiguous slices only")
        start, stop, step = key.indices(len(self))
        if step != 1:
            raise NeuralKernelsError("StackedRows supports contiguous slices only")
        pieces = []
        for part, lo, hi in zip(self.parts, self.offsets[:-1], self.offsets[1:], strict=True):
            a, b = max(start, lo), min(stop, hi)
            if a < b:
                pieces.append(np.asarray(part[a - lo : b - lo]))
        if not pieces:
            return np.empty((0, *self.shape[1:]), self.dtype)
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)


@dataclass(frozen=True)
class Crops:
    """``size x size`` windows of ``count`` images, ``copies`` windows per image.

    ``offsets[c, i]`` is the top-left corner ``(row, column)`` of copy ``c`` of image
    ``i``: drawn once, uniformly over every window that fits, from ``seed`` and
    ``stream`` (:func:`random_crops`), or the centre window (:func:`centre_crops`).
    """

    size: int
    offsets: NDArray[np.int64]  # (copies, count, 2)

    @property
    def copies(self) -> int:
        return self.offsets.shape[0]

    def apply(self, images: NDArray, copy: int, first: int) -> NDArray:
        """The windows of copy ``copy`` of images ``first, first + 1, ...`` (NHWC)."""
        offsets = self.offsets[copy, first : first + len(images)]
        windows = np.lib.stride_tricks.sliding_window_view(
            images, (self.size, self.size), axis=(1, 2)
        )  # (N, H - s + 1, W - s + 1, C, s, s), a view
        picked = windows[np.arange(len(images)), offsets[:, 0], offsets[:, 1]]
        return np.ascontiguousarray(picked.transpose(0, 2, 3, 1))


def _check_crop(size: int, height: int, width: int, what: str) -> None:
    if not 1 <= size <= min(height, width):
        raise DataError(
            f"crop {size}x{size} does not fit the {height}x{width} images of {what}; "
            f"choose a crop of at most {min(height, width)}"
        )


def random_crops(
    count: int, height: int, width: int, size: int, copies: int, seed: int, stream: int, what: str
) -> Crops:
    """``copies`` uniformly random ``size x size`` windows per image, from ``(seed, stream)``
    (a split's own stream, so that train and val draw independently); reproducible."""
    _check_crop(size, height, width, what)
    rng = np.random.default_rng(np.random.SeedSequence((seed, stream)))
    rows = rng.integers(0, height - size + 1, size=(copies, count))
    cols = rng.integers(0, width - size + 1, size=(copies, count))
    return Crops(size, np.stack([rows, cols], axis=-1).astype(np.int64))


def centre_crops(count: int, height: int, width: int, size: int, what: str) -> Crops:
    """The centre ``size x size`` window of every image (torchvision's CenterCrop:
    top-left corner ``round((H - size) / 2)``, ``round((W - size) / 2)``)."""
    _check_crop(size, height, width, what)
    corner = [int(round((height - size) / 2.0)), int(round((width - size) / 2.0))]
    return Crops(size, np.tile(np.asarray(corner, dtype=np.int64), (1, count, 1)))
