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
import logging
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray

from neural_kernels.architectures import Serial, spec_network
from neural_kernels.device import device_name, peak_memory_mb, reset_peak_memory, resolve_device
from neural_kernels.errors import NeuralKernelsError
from neural_kernels.kernels.analytic import analytic_kernel, auto_block_size
from neural_kernels.kernels.estimate import estimate_kernel, estimate_sums
from neural_kernels.kernels.inputs import (
    FittedRows,
    ImageRows,
    KernelInputs,
    block_shapes,
    check_finite_blocks,
    crop_maker,
    describe_inputs,
    file_bytes,
    resolve_inputs,
    spec_record,
)
from neural_kernels.layout import KERNEL_META, SHARD_META
from neural_kernels.outputs import (
    move_file,
    open_memmap,
    require_space,
    resume_dir,
    resume_key,
    same_filesystem,
    save_npy,
    staged_directory,
    write_json,
)
from neural_kernels.settings import DEFAULT_STORAGE, AnalyticSettings, EstimateSettings, KernelSpec

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

#: The default of :func:`analytic_files` (frozen, so one instance serves every call).
DEFAULT_ANALYTIC = AnalyticSettings()


def _open_sums(
    stage: Path, rows: FittedRows, eval_rows: Mapping[str, ImageRows]
) -> tuple[NDArray, dict[str, NDArray]]:
    """Memory-mapped float64 ``train.npy`` and ``<eval>.npy`` (one column per fitted row)."""
    shapes = block_shapes(rows, eval_rows)
    out_train = open_memmap(stage / "train.npy", np.float64, shapes.pop("train"))
    out_evals = {
        name: open_memmap(stage / f"{name}.npy", np.float64, shape)
        for name, shape in shapes.items()
    }
    return out_train, out_evals


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
    """One shard of an estimated kernel: raw float64 sums over its networks' features
    (``inputs.val``: see the module docstring)."""
    net = spec_network(spec)
    chunks = settings.shard_chunks(shard, shards)
    rows, eval_rows = resolve_inputs(inputs, spec)
    sizes = file_bytes(block_shapes(rows, eval_rows), np.float64)
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
        for array in (out_train, *out_evals.values()):
            array.flush()
        seconds = time.perf_counter() - started
        n_images = len(rows) + sum(len(e) for e in eval_rows.values())
        record = {
            **spec_record("estimate", spec, settings.as_dict()),
            "shard": shard,
            "shards": shards,
            "chunks": [chunks.start, chunks.stop],
            "features": sums["features"],
            "inputs": describe_inputs(rows, eval_rows),
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
    sizes = file_bytes(block_shapes(rows, eval_rows), storage)
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
    net = spec_network(spec)
    rows, eval_rows = resolve_inputs(inputs, spec)
    run_device = resolve_device(device, stage="kernel-analytic")
    out_dir = Path(out_dir)
    # resume_dir's directory, read before the key, which includes the block size.
    scratch = out_dir.parent / f".{out_dir.name}.resume"
    block_size, auto = _resume_block_size(scratch, settings, rows, run_device)
    settings = dataclasses.replace(settings, block_size=block_size)
    reset_peak_memory(run_device)
    record = {
        **spec_record("analytic", spec, _analytic_record_settings(settings)),
        "inputs": describe_inputs(rows, eval_rows),
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


def kernel_file(
    images_path: Path,
    out: Path,
    spec: KernelSpec,
    settings: AnalyticSettings | EstimateSettings,
    *,
    images2: Path | None = None,
    device: str = "auto",
) -> dict:
    """The ``kernel`` command: ``K(images, images)``, or ``K(images2, images)``, as one
    float64 ``.npy`` at ``out`` (no kernel directory, no record); returns its summary.

    The analytic recursion or the estimate, as ``settings`` says; flips and crops
    augment ``images`` as in a kernel directory's fitted rows.
    """
    out = Path(out)
    images = ImageRows(images_path, flips=spec.flips, crop=crop_maker(spec, "train", images_path))
    rows = images
    if images2 is not None:
        rows = ImageRows(images2, crop=crop_maker(spec, None, images2))
        if rows.shape[1:] != images.shape[1:]:
            raise NeuralKernelsError(
                f"--images2 has images of shape {rows.shape[1:]}, --images {images.shape[1:]}"
            )
    shape = (len(rows), len(images))
    require_space(out.parent, file_bytes({out.stem: shape}, np.float64), "kernel")
    run_device = resolve_device(device)
    started = time.perf_counter()
    other = None if images2 is None else rows
    if isinstance(settings, AnalyticSettings):
        kernel = analytic_kernel(
            spec_network(spec),
            images,
            other,
            block_size=settings.block_size,
            precision=settings.precision,
            device=str(run_device),
        )
    else:
        kernel = estimate_kernel(spec_network(spec), images, other, settings, device=run_device)
    seconds = time.perf_counter() - started
    check_finite_blocks({out.stem: kernel}, out.parent)
    with staged_directory(out.parent) as stage:
        save_npy(stage / out.name, kernel.astype(np.float64))
    return {
        "out": str(out),
        "shape": list(kernel.shape),
        "seconds": seconds,
        "device": device_name(run_device),
    }
