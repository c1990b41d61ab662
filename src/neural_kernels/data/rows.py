"""Row sources read lazily by contiguous slices: several image arrays stacked in order.

The kernel stages stack the train rows and the validation rows into the one fitted
set of the refit (train rows first), and ZCA is fitted on the same images; neither
copies the arrays up front.
"""

from __future__ import annotations

from collections.abc import Sequence
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
