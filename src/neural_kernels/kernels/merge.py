"""``kernel-merge``: add an estimate's shards and apply the final projection.

Each shard (:func:`neural_kernels.kernels.stage.estimate_shard`) holds float64 sums of
feature products over its networks; the merge adds them in row blocks sized in bytes,
normalises them into the kernel (:func:`neural_kernels.kernels.estimate.projected_kernel`)
and writes a kernel directory in the ``storage`` dtype.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from neural_kernels.architectures import Project, myrtle
from neural_kernels.errors import DataError, NeuralKernelsError
from neural_kernels.kernels.estimate import projected_kernel
from neural_kernels.kernels.inputs import SPEC_KEYS, check_finite_blocks, file_bytes
from neural_kernels.layout import KERNEL_META, SHARD_META
from neural_kernels.outputs import (
    open_memmap,
    read_json,
    require_space,
    staged_directory,
    write_json,
)
from neural_kernels.settings import DEFAULT_STORAGE, EstimateSettings

#: The merge's row blocks, in bytes of float64 rows, so that what it holds in flight
#: does not grow with the kernel's width (4096 fixed rows held 1.8 GB at 16000 rows,
#: benchmarks/scale.py).
MERGE_BLOCK_BYTES = 128 << 20


def merge_block_rows(columns: int, block_bytes: int = MERGE_BLOCK_BYTES) -> int:
    """Rows of a ``columns``-wide float64 block that fit ``block_bytes`` (at least 1)."""
    return max(1, block_bytes // (8 * columns))


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
    sizes = file_bytes(shapes, np.float64)
    if np.dtype(storage) != np.float64:  # the float64 sums and their rounded copy
        sizes |= {f"{k} ({storage})": v for k, v in file_bytes(shapes, storage).items()}
    require_space(Path(out_dir), sizes, "kernel-merge")
    with staged_directory(Path(out_dir), last=KERNEL_META) as stage:
        outs = _add_sums(stage, shard_dirs, first["inputs"], ["train", *evals], block_rows)
        _project_sums(outs, shard_dirs, final, block_rows)
        outs = _stored_as(outs, np.dtype(storage), block_rows)
        check_finite_blocks(outs, Path(out_dir))
        record = _merged_record(metas, started) | {"storage": storage}
        write_json(stage / KERNEL_META, record)
    return record
