"""File-level kernel stages that the workflow's rules call.

Layout of a kernel directory (``results/kernels/<dataset>/<view>/<kernel>/``):
``train.npy`` (``N x N``, float64, symmetric): the kernel of the *fitted rows*;
``<eval>.npy`` (``M x N`` for each eval split) and ``kernel.json`` (settings, sizes,
the fitted rows' layout, timings, device, throughput), written last.

The fitted rows are the train split's rows (a subset's, when indexed), then their
horizontal mirrors with flips; given a validation split (``val=``), its rows follow
(then theirs mirrors with flips), so that one symmetric block holds train + val: the
solve stage selects hyperparameters on the val rows against the train rows and then
refits on all of them (the thesis's training-set sizes). ``kernel.json``'s
``inputs.train.layout`` lists these segments (split, first and last row, mirrored).
Without ``val=`` (a subset, which is not refit) the val split is an eval split.

An estimate shard directory holds raw sums instead: ``train.npy``, ``<eval>.npy``,
``<eval>_sqnorm.npy`` and ``shard.json``.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray

from neural_kernels.architectures import Project, Serial, myrtle
from neural_kernels.checks import check_finite
from neural_kernels.data.prepared import SPLITS
from neural_kernels.data.rows import Crops, StackedRows, centre_crops, random_crops
from neural_kernels.device import device_name, peak_memory_mb, reset_peak_memory, resolve_device
from neural_kernels.errors import DataError, NeuralKernelsError
from neural_kernels.kernels.analytic import analytic_kernel, auto_block_size
from neural_kernels.kernels.estimate import estimate_sums, projected_kernel
from neural_kernels.kernels.layout import (
    KERNEL_META,
    MERGE_BLOCK_BYTES,
    SHARD_META,
    merge_block_rows,
)
from neural_kernels.outputs import (
    array_bytes,
    move_file,
    open_memmap,
    read_json,
    require_space,
    resume_dir,
    resume_key,
    same_filesystem,
    save_npy,
    staged_directory,
    write_json,
)
from neural_kernels.settings import (
    CROP_KEYS,
    DEFAULT_STORAGE,
    AnalyticSettings,
    EstimateSettings,
    KernelSpec,
)

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

#: What kernel.json and shard.json record of the kernel (KernelSpec's fields).
SPEC_KEYS = tuple(field.name for field in dataclasses.fields(KernelSpec))
#: The default of :func:`analytic_files` (frozen, so one instance serves every call).
DEFAULT_ANALYTIC = AnalyticSettings()


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

    def layout(self) -> list[dict]:
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


def _inputs(inputs: KernelInputs, spec: KernelSpec) -> tuple[FittedRows, dict[str, ImageRows]]:
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


def _describe(rows: FittedRows, evals: Mapping[str, ImageRows]) -> dict:
    train = rows.named["train"]
    return {
        "train": {
            "file": str(train.path),
            "rows": len(rows),
            "flips": train.flips,
            "subset": train.indices is not None,
            "files": {split: str(part.path) for split, part in rows.named.items()},
            "layout": rows.layout(),
        },
        **{name: {"file": str(e.path), "rows": len(e)} for name, e in evals.items()},
        "image_shape": list(train.shape[1:]),
    }


def _spec_record(method: str, spec: KernelSpec, settings: dict) -> dict:
    """A record's leading keys: the method, the kernel and the method's settings.

    The crop keys are written only for a kernel augmented by crops, so that the record
    (and the resume key hashed from it) of every other kernel stays what it was.
    """
    kernel = dataclasses.asdict(spec)
    if spec.crop is None:
        kernel = {key: kernel[key] for key in SPEC_KEYS if key not in CROP_KEYS}
    return {"method": method, **kernel, "settings": settings}


def _open_sums(
    stage: Path, rows: FittedRows, eval_rows: Mapping[str, ImageRows]
) -> tuple[NDArray, dict[str, NDArray]]:
    """Memory-mapped float64 ``train.npy`` and ``<eval>.npy`` (one column per fitted row)."""
    shapes = _block_shapes(rows, eval_rows)
    out_train = open_memmap(stage / "train.npy", np.float64, shapes.pop("train"))
    out_evals = {
        name: open_memmap(stage / f"{name}.npy", np.float64, shape)
        for name, shape in shapes.items()
    }
    return out_train, out_evals


def _block_shapes(rows: FittedRows, eval_rows: Mapping[str, ImageRows]) -> dict[str, tuple]:
    """``train`` and ``<eval>``: the shape of each kernel block (one column per fitted row)."""
    n = len(rows)
    return {"train": (n, n), **{name: (len(e), n) for name, e in eval_rows.items()}}


def _block_bytes(shapes: Mapping[str, tuple], dtype: object) -> dict[str, int]:
    """``<name>.npy`` -> its bytes, for :func:`~neural_kernels.outputs.require_space`."""
    return {f"{name}.npy": array_bytes(shape, dtype) for name, shape in shapes.items()}


def estimate_shard(
    inputs: KernelInputs,
    out_dir: Path,
    spec: KernelSpec,
    settings: EstimateSettings,
    *,
    shard: int = 0,
    shards: int = 1,
    device: str = "auto",
    progress: bool = True,
) -> dict:
    """One shard of an estimated kernel: raw float64 sums over its networks' features.

    ``inputs.val`` puts the validation rows into the fitted (symmetric) block after the
    train rows (see the module docstring).
    """
    net = spec.network()
    chunks = settings.shard_chunks(shard, shards)
    rows, eval_rows = _inputs(inputs, spec)
    sizes = _block_bytes(_block_shapes(rows, eval_rows), np.float64)
    require_space(Path(out_dir), sizes, f"kernel-shard {shard + 1}/{shards}")
    run_device = resolve_device(device, stage=f"kernel-shard {shard + 1}/{shards}")
    reset_peak_memory(run_device)
    started = time.perf_counter()
    with staged_directory(Path(out_dir), last=SHARD_META) as stage:
        out_train, out_evals = _open_sums(stage, rows, eval_rows)
        sums = estimate_sums(
            net,
            rows,
            eval_rows,
            settings,
            chunks=chunks,
            device=run_device,
            out_train=out_train,
            out_evals=out_evals,
            progress=progress,
        )
        check_finite_blocks({"train": out_train, **out_evals}, Path(out_dir))
        for name in eval_rows:
            save_npy(stage / f"{name}_sqnorm.npy", sums[f"{name}_sqnorm"])
        out_train.flush()
        for array in out_evals.values():
            array.flush()
        seconds = time.perf_counter() - started
        n_images = len(rows) + sum(len(e) for e in eval_rows.values())
        record = {
            **_spec_record("estimate", spec, settings.as_dict()),
            "shard": shard,
            "shards": shards,
            "chunks": [chunks.start, chunks.stop],
            "features": sums["features"],
            "inputs": _describe(rows, eval_rows),
            "device": device_name(run_device),
            "passes": sums["passes"],
            "seconds": {"total": seconds, **sums["seconds"]},
            "image_features_per_second": n_images
            * sums["features"]
            / max(sums["seconds"]["features"], 1e-9),
            **peak_memory_mb(run_device),
        }
        write_json(stage / SHARD_META, record)
    return record


def _load_sums(path: Path) -> NDArray:
    """A shard's memory-mapped sums, or a clear error for a missing or truncated file."""
    try:
        return np.load(path, mmap_mode="r")
    except (OSError, ValueError) as error:
        raise DataError(
            f"cannot read {path} as a .npy array ({error}): the shard is damaged (a full "
            "disk? a copy cut short?); delete it and rerun its kernel-shard job"
        ) from None


def _shard_settings(shard_dir: Path, meta: dict) -> EstimateSettings:
    """A shard's recorded estimate settings, or a clear error for a shard that another
    version of the package wrote (settings it does not know)."""
    known = {field.name for field in dataclasses.fields(EstimateSettings)}
    unknown = sorted(set(meta.get("settings", {})) - known)
    if unknown:
        raise DataError(
            f"{Path(shard_dir) / SHARD_META} has estimate settings this version does not "
            f"know ({', '.join(unknown)}): another version of neural-kernels wrote it; "
            "delete the shards and rerun their kernel-shard jobs"
        )
    return EstimateSettings(**meta["settings"])


def _check_same_configuration(shard_dirs: list[Path], metas: list[dict]) -> None:
    """Every shard has the first one's kernel, settings, shard count and inputs."""
    first = metas[0]
    same = (*SPEC_KEYS, "settings", "shards", "inputs")
    for directory, meta in zip(shard_dirs, metas, strict=True):
        for key in same:
            if meta.get(key) != first.get(key):
                raise NeuralKernelsError(
                    f"shard {directory} differs from {shard_dirs[0]} in {key!r}; "
                    "rerun the shards with one configuration"
                )


def _check_coverage(metas: list[dict], settings: EstimateSettings) -> None:
    """The shards cover every chunk of ``settings`` exactly once."""
    covered = sorted(c for meta in metas for c in range(*meta["chunks"]))
    if covered != list(range(settings.chunks)):
        raise NeuralKernelsError(
            f"the shards cover chunks {covered[:5]}... but need each of 0..{settings.chunks - 1} "
            "exactly once; pass every shard directory once"
        )


def _add_sums(
    stage: Path, shard_dirs: list[Path], inputs: dict, names: list[str], block_rows: int
) -> dict[str, NDArray]:
    """Memory-mapped ``<name>.npy`` in ``stage``: the shards' sums, added in row blocks."""
    n = inputs["train"]["rows"]
    outs = {}
    for name in names:
        shape = (n if name == "train" else inputs[name]["rows"], n)
        parts = [_load_sums(Path(d) / f"{name}.npy") for d in shard_dirs]
        for shard_dir, part in zip(shard_dirs, parts, strict=True):
            if part.shape != shape:
                raise DataError(
                    f"{Path(shard_dir) / name}.npy has shape {part.shape} but its "
                    f"{SHARD_META} gives {shape}; the shard is damaged or from another "
                    "run: delete it and rerun its kernel-shard job"
                )
        out = open_memmap(stage / f"{name}.npy", np.float64, shape)
        for start in range(0, shape[0], block_rows):
            rows = slice(start, start + block_rows)
            out[rows] = sum(part[rows] for part in parts)
        outs[name] = out
    return outs


def _project_sums(
    outs: dict[str, NDArray], shard_dirs: list[Path], final: Project | None, block_rows: int
) -> None:
    """Turn each summed Gram matrix in ``outs`` into its kernel, in place."""
    diag = np.diagonal(outs["train"]).copy()
    for name in outs:
        row_sq = (
            diag
            if name == "train"
            else sum(np.load(Path(d) / f"{name}_sqnorm.npy") for d in shard_dirs)
        )
        projected_kernel(outs[name], row_sq, diag, final, out=outs[name], block_rows=block_rows)
        outs[name].flush()


def _stored_as(outs: dict[str, NDArray], dtype: np.dtype, block_rows: int) -> dict[str, NDArray]:
    """The float64 kernel files in ``outs`` rewritten as ``dtype`` (the ``storage``
    setting), in row blocks; unchanged for float64."""
    if dtype == np.float64:
        return outs
    stored = {}
    for name, array in outs.items():
        path = Path(array.filename)
        out = open_memmap(path.with_suffix(".part"), dtype, array.shape)
        for start in range(0, array.shape[0], block_rows):
            out[start : start + block_rows] = array[start : start + block_rows]
        out.flush()
        del array
        os.replace(path.with_suffix(".part"), path)
        stored[name] = np.load(path, mmap_mode="r")
    return stored


def _merged_record(metas: list[dict], started: float) -> dict:
    """kernel.json of merged shards: the shards' configuration, totals and timings."""
    first = metas[0]
    keys = ("method", *SPEC_KEYS, "settings", "inputs")
    record = {key: first[key] for key in keys if key in first}
    shard_seconds = [m["seconds"]["total"] for m in metas]
    record.update(
        features=sum(m["features"] for m in metas),
        shards=len(metas),
        devices=sorted({m["device"] for m in metas}),
        seconds={
            "shards_total": sum(shard_seconds),
            "shards_max": max(shard_seconds),
            "features": sum(m["seconds"]["features"] for m in metas),
            "gram": sum(m["seconds"]["gram"] for m in metas),
            "merge": time.perf_counter() - started,
        },
        image_features_per_second=sum(m["image_features_per_second"] for m in metas) / len(metas),
        shard_peak_memory_mb=max(m.get("host_peak_rss_mb", 0.0) for m in metas),
    )
    return record


def merge_shards(
    shard_dirs: list[Path],
    out_dir: Path,
    storage: str = DEFAULT_STORAGE,
    block_bytes: int = MERGE_BLOCK_BYTES,
) -> dict:
    """Add the shards' sums and apply the final projection; write a kernel directory.

    The shards must come from the same settings and cover every chunk exactly once.
    ``storage`` is the dtype of the files: the sums and the projection are float64, and
    float32 files hold that kernel rounded once.
    """
    started = time.perf_counter()
    metas = [read_json(Path(d) / SHARD_META) for d in shard_dirs]
    first = metas[0]
    _check_same_configuration(shard_dirs, metas)
    settings = _shard_settings(shard_dirs[0], first)
    final = myrtle(first["arch"], first["activation"], first["gamma"]).final
    _check_coverage(metas, settings)
    evals = [name for name in first["inputs"] if name not in ("train", "image_shape")]
    block_rows = merge_block_rows(first["inputs"]["train"]["rows"], block_bytes)
    n = first["inputs"]["train"]["rows"]
    shapes = {name: (first["inputs"][name]["rows"], n) for name in ["train", *evals]}
    sizes = _block_bytes(shapes, np.float64)
    if np.dtype(storage) != np.float64:  # the float64 sums and their rounded copy
        sizes |= {f"{k} ({storage})": v for k, v in _block_bytes(shapes, storage).items()}
    require_space(Path(out_dir), sizes, "kernel-merge")
    with staged_directory(Path(out_dir), last=KERNEL_META) as stage:
        outs = _add_sums(stage, shard_dirs, first["inputs"], ["train", *evals], block_rows)
        _project_sums(outs, shard_dirs, final, block_rows)
        outs = _stored_as(outs, np.dtype(storage), block_rows)
        check_finite_blocks(outs, Path(out_dir))
        record = _merged_record(metas, started) | {"storage": storage}
        write_json(stage / KERNEL_META, record)
    return record


def _resume_block_size(
    scratch: Path, settings: AnalyticSettings, rows: FittedRows, device: torch.device
) -> tuple[int, bool]:
    """The block size to use, and whether it is chosen automatically.

    An automatic block size depends on the host (CPU or GPU): a resumed
    run keeps the one its finished blocks were computed with (``auto_block_size`` in
    the resume directory ``scratch``), wherever it now runs.
    """
    block_size = settings.block_size
    auto_file = scratch / "auto_block_size"
    if block_size is None and auto_file.exists():
        block_size = int(auto_file.read_text())
    auto = block_size is None
    block_size = block_size or auto_block_size(*rows.shape[1:3], device, settings.precision)
    return block_size, auto


def _open_blocks(
    scratch: Path, name: str, shape: tuple[int, int], settings: AnalyticSettings, fresh: bool
) -> tuple[NDArray, NDArray]:
    """The memory-mapped kernel ``<name>.npy`` in ``scratch`` and its mask of done blocks.

    Both are reopened when resuming (and present), created otherwise.
    """
    n_rows, n_cols = shape
    path, mask = scratch / f"{name}.npy", scratch / f"{name}.done.npy"
    block_size = settings.block_size
    blocks = -(-n_rows // block_size) * -(-n_cols // block_size)
    if fresh or not path.exists() or not mask.exists():
        out = open_memmap(path, settings.storage, shape)
        done = open_memmap(mask, np.bool_, (blocks,))
    else:
        out = np.load(path, mmap_mode="r+")
        done = np.load(mask, mmap_mode="r+")
        log.info("resuming %s: %d of %d blocks done", name, int(done.sum()), blocks)
    return out, done


def _analytic_matrix(
    net: Serial,
    rows: FittedRows,
    images: ImageRows | None,
    scratch: Path,
    name: str,
    settings: AnalyticSettings,
    fresh: bool,
    device: torch.device,
    progress: bool,
) -> float:
    """Compute (or finish) ``<name>.npy`` in ``scratch``; returns the seconds it took.

    ``K(images, rows)``, or the symmetric ``K(rows, rows)`` when ``images`` is ``None``;
    ``settings.block_size`` is set.
    """
    n_rows = len(rows) if images is None else len(images)
    out, done = _open_blocks(scratch, name, (n_rows, len(rows)), settings, fresh)
    started = time.perf_counter()
    analytic_kernel(
        net,
        rows,
        images,
        block_size=settings.block_size,
        precision=settings.precision,
        device=str(device),
        out=out,
        done=done,
        progress=progress,
    )
    out.flush()
    done.flush()
    return time.perf_counter() - started


def _move_in(out_dir: Path, scratch: Path, names: list[str], record: dict) -> None:
    """Move the finished kernels from ``scratch`` into ``out_dir``, kernel.json last."""
    with staged_directory(out_dir, last=KERNEL_META) as stage:
        for name in names:
            move_file(scratch / f"{name}.npy", stage / f"{name}.npy")
        write_json(stage / KERNEL_META, record)
    shutil.rmtree(scratch, ignore_errors=True)


def _require_analytic_space(
    out_dir: Path,
    scratch: Path,
    rows: FittedRows,
    eval_rows: Mapping[str, ImageRows],
    storage: str,
) -> None:
    """Refuse up front a kernel-analytic whose blocks do not fit: the resume directory's
    files not yet there, and where it lies on another filesystem than ``out_dir`` (a
    mount point), the whole kernel there too."""
    sizes = _block_bytes(_block_shapes(rows, eval_rows), storage)
    missing = {name: size for name, size in sizes.items() if not (scratch / name).exists()}
    require_space(scratch, missing, "kernel-analytic")
    if not same_filesystem(scratch, out_dir):
        require_space(out_dir, sizes, "kernel-analytic")


def _analytic_record_settings(settings: AnalyticSettings) -> dict:
    """The settings kernel.json and the resume key hold: ``storage`` only when it is not
    float64, so that the runs (and resume directories) from before the setting keep
    their keys."""
    kept = {"block_size": settings.block_size, "precision": settings.precision}
    return kept | ({"storage": settings.storage} if settings.storage != DEFAULT_STORAGE else {})


def analytic_files(
    inputs: KernelInputs,
    out_dir: Path,
    spec: KernelSpec,
    settings: AnalyticSettings = DEFAULT_ANALYTIC,
    *,
    device: str = "auto",
    progress: bool = True,
) -> dict:
    """The analytic kernel directory; an interrupted run resumes from finished blocks.

    ``inputs.val`` puts the validation rows into the fitted (symmetric) block after the
    train rows (see the module docstring).

    Blocks are written to memory maps in ``.<out_dir name>.resume/`` beside
    ``out_dir``, with a mask of finished blocks, and moved in at the end.
    """
    net = spec.network()
    rows, eval_rows = _inputs(inputs, spec)
    run_device = resolve_device(device, stage="kernel-analytic")
    out_dir = Path(out_dir)
    # resume_dir's directory, read before the key, which includes the block size.
    scratch = out_dir.parent / f".{out_dir.name}.resume"
    block_size, auto = _resume_block_size(scratch, settings, rows, run_device)
    settings = dataclasses.replace(settings, block_size=block_size)
    reset_peak_memory(run_device)
    record = {
        **_spec_record("analytic", spec, _analytic_record_settings(settings)),
        "inputs": _describe(rows, eval_rows),
    }
    _require_analytic_space(out_dir, scratch, rows, eval_rows, settings.storage)
    scratch, fresh = resume_dir(out_dir, resume_key(record))
    if auto:
        (scratch / "auto_block_size").write_text(str(block_size))
    started = time.perf_counter()
    seconds = {}
    pairs = 0
    for name, images in [("train", None), *eval_rows.items()]:
        seconds[name] = _analytic_matrix(
            net, rows, images, scratch, name, settings, fresh, run_device, progress
        )
        pairs += len(images) * len(rows) if images is not None else len(rows) * (len(rows) + 1) // 2
    record.update(
        storage=settings.storage,
        device=device_name(run_device),
        seconds={"total": time.perf_counter() - started, **seconds},
        pairs=pairs,
        pairs_per_second=pairs / max(time.perf_counter() - started, 1e-9),
        **peak_memory_mb(run_device),
    )
    names = ["train", *eval_rows]
    check_finite_blocks({n: np.load(scratch / f"{n}.npy", mmap_mode="r") for n in names}, out_dir)
    _move_in(out_dir, scratch, names, record)
    return record
