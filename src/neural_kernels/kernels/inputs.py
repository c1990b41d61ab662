"""What a kernel stage reads: image rows (indexed, cropped, mirrored), the fitted rows
(train, then val, each followed by its mirrors) and the eval splits, checked for NaN and
blank images, and the records that describe them (see :mod:`.stage` for the directory
they fill).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from neural_kernels.checks import check_finite
from neural_kernels.data.prepared import SPLITS
from neural_kernels.data.rows import Crops, StackedRows, centre_crops, random_crops
from neural_kernels.errors import DataError, NeuralKernelsError
from neural_kernels.outputs import array_bytes
from neural_kernels.settings import CROP_KEYS, KernelSpec

#: What kernel.json and shard.json record of the kernel (KernelSpec's fields).
SPEC_KEYS = tuple(field.name for field in dataclasses.fields(KernelSpec))


#: Why a kernel stage refuses images with NaN or infinite values.
NONFINITE_IMAGES = (
    "every kernel entry of these images would be NaN; check the prepared images and "
    "rerun zca (which rejects NaN in its input)"
)
#: Why a kernel stage refuses to commit a NaN or infinite result of finite images.
NONFINITE_RESULT = (
    "the computed kernel is not finite although its images are (an overflow: a "
    "kernel of huge inputs, or a bug); nothing was written"
)


def check_finite_blocks(blocks: Mapping[str, NDArray], where: Path) -> None:
    """Every computed block (``<where>/<name>.npy``) is finite, before it is committed."""
    for name, block in blocks.items():
        check_finite(block, f"{where / name}.npy (computed)", NONFINITE_RESULT)


#: Makes the crops of ``count`` images of ``height x width``
#: (:func:`~neural_kernels.data.rows.random_crops`, ``centre_crops``).
CropMaker = Callable[[int, int, int], Crops]


class ImageRows:
    """Rows of an NHWC ``.npy`` (memory-mapped), optionally indexed, cropped and
    flip-doubled.

    The rows are ``images[indices]`` (with ``crop``: copy 0 of their windows, then copy
    1, ...), followed with ``flips`` by the horizontal mirrors of all of those, read
    lazily slice by slice (nothing is copied up front).
    """

    def __init__(
        self,
        path: Path,
        indices: NDArray | None = None,
        flips: bool = False,
        crop: CropMaker | None = None,
    ):
        try:
            self.base = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as error:
            raise DataError(f"cannot read {path} as a .npy array ({error})") from None
        if self.base.ndim != 4 or not np.issubdtype(self.base.dtype, np.floating):
            raise DataError(
                f"{path}: expected float images (N, H, W, C), got {self.base.dtype} "
                f"{self.base.shape}; kernels take whitened (zca) or scaled images"
            )
        if indices is not None and (
            indices.min(initial=0) < 0 or indices.max(initial=0) >= len(self.base)
        ):
            raise DataError(f"indices out of range for {path} ({len(self.base)} images)")
        check_finite(self.base, str(path), NONFINITE_IMAGES, indices)
        self.path, self.indices, self.flips = path, indices, flips
        self.count = len(self.base) if indices is None else len(indices)
        if self.count == 0:
            raise DataError(
                f"{path}: no images (shape {self.base.shape}"
                f"{', no indices' if indices is not None else ''}); a kernel needs at least "
                "one image: check the split or subset it was made from"
            )
        self.crops = None if crop is None else crop(self.count, *self.base.shape[1:3])
        self.copies = 1 if self.crops is None else self.crops.copies
        self.unmirrored = self.count * self.copies

    def __len__(self) -> int:
        return self.unmirrored * (2 if self.flips else 1)

    @property
    def shape(self) -> tuple[int, ...]:
        if self.crops is None:
            return (len(self), *self.base.shape[1:])
        return (len(self), self.crops.size, self.crops.size, self.base.shape[3])

    @property
    def ndim(self) -> int:
        return self.base.ndim

    @property
    def dtype(self) -> np.dtype:
        return self.base.dtype

    def _images(self, start: int, stop: int) -> NDArray:
        if self.indices is None:
            return np.asarray(self.base[start:stop])
        return self.base[self.indices[start:stop]]

    def _rows(self, start: int, stop: int) -> NDArray:
        """Unmirrored rows ``[start, stop)``: images, or their windows copy by copy."""
        if self.crops is None:
            return self._images(start, stop)
        if start >= stop:
            return np.empty((0, *self.shape[1:]), self.base.dtype)
        pieces = []
        for copy in range(start // self.count, (stop - 1) // self.count + 1):
            first = copy * self.count
            lo, hi = max(start, first) - first, min(stop, first + self.count) - first
            pieces.append(self.crops.apply(self._images(lo, hi), copy, lo))
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    def __getitem__(self, key: slice) -> NDArray:
        start, stop, step = key.indices(len(self))
        if step != 1:
            raise NeuralKernelsError("ImageRows supports contiguous slices only")
        parts, unmirrored = [], self.unmirrored
        if start < unmirrored:
            parts.append(self._rows(start, min(stop, unmirrored)))
        if stop > unmirrored:
            lo, hi = max(start, unmirrored) - unmirrored, stop - unmirrored
            parts.append(self._rows(lo, hi)[:, :, ::-1])
        if not parts:
            return np.empty((0, *self.shape[1:]), self.base.dtype)
        return np.ascontiguousarray(np.concatenate(parts))


def _load_indices(path: Path | None) -> NDArray | None:
    if path is None:
        return None
    try:
        return np.load(path).astype(np.int64)
    except (OSError, ValueError) as error:
        raise DataError(f"cannot read indices {path} ({error})") from None


class FittedRows(StackedRows):
    """The fitted rows: train (then mirrors), then val (then mirrors) when given."""

    def __init__(self, parts: Mapping[str, ImageRows]):
        super().__init__(list(parts.values()))
        self.named = dict(parts)

    def segments(self) -> list[dict]:
        """The segments of rows: split, ``[start, stop)``, whether mirrored and, for a
        kernel augmented by crops, which copy of the windows."""
        segments = []
        for (split, part), start in zip(self.named.items(), self.offsets, strict=False):
            start = int(start)
            for mirrored in (False, True) if part.flips else (False,):
                for copy in range(part.copies):
                    segment = {"split": split, "start": start, "stop": start + part.count}
                    segment["mirrored"] = mirrored
                    if part.crops is not None:
                        segment["copy"] = copy
                    segments.append(segment)
                    start += part.count
        return segments


@dataclass(frozen=True)
class KernelInputs:
    """The image files of a kernel stage: fitted rows (train [+ val]) and eval splits."""

    train: Path
    evals: Mapping[str, Path]
    train_indices: Path | None = None
    val: Path | None = None


def crop_maker(spec: KernelSpec, split: str | None, path: Path) -> CropMaker | None:
    """The crops of a split's images: random windows of a fitted split (its own stream
    of ``spec.crop_seed``), the centre window of an eval split (``split`` None)."""
    if spec.crop is None:
        return None
    if split is None:
        return functools.partial(centre_crops, size=spec.crop, what=str(path))
    return functools.partial(
        random_crops,
        size=spec.crop,
        copies=spec.copies,
        seed=spec.crop_seed,
        stream=SPLITS.index(split),
        what=str(path),
    )


def resolve_inputs(
    inputs: KernelInputs, spec: KernelSpec
) -> tuple[FittedRows, dict[str, ImageRows]]:
    """The fitted rows and the eval splits' rows, read from ``inputs``' files.

    With crops the val split may be both fitted (its random windows, for the refit) and
    an eval split (its centre windows, which the selection scores); otherwise it is one
    or the other.
    """
    train, indices = Path(inputs.train), _load_indices(inputs.train_indices)
    parts = {"train": ImageRows(train, indices, spec.flips, crop_maker(spec, "train", train))}
    if inputs.val is not None:
        if "val" in inputs.evals and spec.crop is None:
            raise NeuralKernelsError(
                "the val split is either fitted (val=...) or an eval split, not both "
                "(both only for a kernel augmented by crops)"
            )
        val = Path(inputs.val)
        parts["val"] = ImageRows(val, flips=spec.flips, crop=crop_maker(spec, "val", val))
    rows = FittedRows(parts)
    evals = dict(inputs.evals)
    if spec.crop is not None and inputs.val is not None:
        evals.setdefault("val", inputs.val)  # the selection scores val's centre crops
    eval_rows = {
        name: ImageRows(Path(p), crop=crop_maker(spec, None, Path(p))) for name, p in evals.items()
    }
    base = parts["train"].base.shape[1:]
    for name, images in {**parts, **eval_rows}.items():
        if images.base.shape[1:] != base:
            raise DataError(
                f"{name} has images of shape {images.base.shape[1:]}, train {base}; the "
                "splits must come from one dataset"
            )
    return rows, eval_rows


def describe_inputs(rows: FittedRows, evals: Mapping[str, ImageRows]) -> dict:
    train = rows.named["train"]
    return {
        "train": {
            "file": str(train.path),
            "rows": len(rows),
            "flips": train.flips,
            "subset": train.indices is not None,
            "files": {split: str(part.path) for split, part in rows.named.items()},
            "layout": rows.segments(),  # the key of earlier kernels: their records stay valid
        },
        **{name: {"file": str(e.path), "rows": len(e)} for name, e in evals.items()},
        "image_shape": list(train.shape[1:]),
    }


def spec_record(method: str, spec: KernelSpec, settings: dict) -> dict:
    """A record's leading keys: the method, the kernel and the method's settings.

    The crop keys are written only for a kernel augmented by crops, so that the record
    (and the resume key hashed from it) of every other kernel stays what it was.
    """
    kernel = dataclasses.asdict(spec)
    if spec.crop is None:
        kernel = {key: kernel[key] for key in SPEC_KEYS if key not in CROP_KEYS}
    return {"method": method, **kernel, "settings": settings}


def block_shapes(rows: FittedRows, eval_rows: Mapping[str, ImageRows]) -> dict[str, tuple]:
    """``train`` and ``<eval>``: the shape of each kernel block (one column per fitted row)."""
    n = len(rows)
    return {"train": (n, n), **{name: (len(e), n) for name, e in eval_rows.items()}}


def file_bytes(shapes: Mapping[str, tuple], dtype: object) -> dict[str, int]:
    """``<name>.npy`` -> its bytes, for :func:`~neural_kernels.outputs.require_space`."""
    return {f"{name}.npy": array_bytes(shape, dtype) for name, shape in shapes.items()}
