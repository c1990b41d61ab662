"""A kernel directory read for solving: its blocks, labels and the fits of the protocol
(:class:`~neural_kernels.solvers.problem.Problem`).

Reads a kernel directory (``train.npy``, the eval blocks and ``kernel.json``, see
``neural_kernels.kernels.stage``) and the integer labels of each split; checks every
block (shapes against the labels, finite entries, a symmetric fitted block) and builds
the selection fit on the train rows and, where the fitted rows hold the val split, the
refit on train + val (:mod:`neural_kernels.solvers.stage`). Before any of that,
:func:`check_memory` refuses a solver that would hold more memory than the job has.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from numpy.typing import NDArray

from neural_kernels import limits
from neural_kernels.catalog import SOLVERS
from neural_kernels.checks import check_classes, check_finite, check_labels, check_symmetric
from neural_kernels.data.prepared import REFIT_SPLITS
from neural_kernels.device import device_name
from neural_kernels.errors import DataError, NeuralKernelsError
from neural_kernels.layout import KERNEL_META
from neural_kernels.outputs import read_json
from neural_kernels.settings import KERNEL_METHODS, KernelSpec, SolverSettings
from neural_kernels.solvers import memory
from neural_kernels.solvers.problem import Fit, Problem

SPLITS = ("train", "val", "test")


def _load_npy(path: Path, mmap: bool = False) -> NDArray:
    try:
        return np.load(path, mmap_mode="r" if mmap else None)
    except (OSError, ValueError) as error:
        raise DataError(f"cannot read {path} as a .npy array ({error})") from None


def _segments(record: dict, kernel_dir: Path) -> list[dict]:
    """The fitted rows' segments from ``kernel.json``, checked to tile the block."""
    try:
        segments = record["inputs"]["train"]["layout"]
        rows = record["inputs"]["train"]["rows"]
    except (KeyError, TypeError):
        raise DataError(
            f"{kernel_dir / KERNEL_META} does not describe its fitted rows (inputs.train."
            "layout): it was written by an older version; recompute the kernel"
        ) from None
    splits = [segment["split"] for segment in segments]
    starts = [0, *(segment["stop"] for segment in segments)]
    tiled = [segment["start"] for segment in segments] == starts[:-1] and starts[-1] == rows
    # train rows first, then val rows (REFIT_SPLITS order), tiling [0, rows)
    ordered = splits and splits[0] == "train" and set(splits) <= set(REFIT_SPLITS)
    if not (tiled and ordered and splits == sorted(splits, key=REFIT_SPLITS.index)):
        raise DataError(
            f"{kernel_dir / KERNEL_META}: malformed row segments {segments} for {rows} rows; "
            "recompute the kernel"
        )
    return segments


def _read_record(kernel_dir: Path) -> dict:
    """``kernel.json`` of a finished kernel directory, or a clear error."""
    meta_path = kernel_dir / KERNEL_META
    if not meta_path.exists():
        raise DataError(
            f"{kernel_dir} is not a finished kernel directory (no {KERNEL_META}); "
            "compute the kernel first (snakemake kernels, or neural-kernels kernel-analytic)"
        )
    record = read_json(meta_path, "recompute the kernel")
    _check_record(record, meta_path)
    return record


def _check_record(record: dict, meta_path: Path) -> None:
    """The fields of ``kernel.json`` that metrics.json copies hold allowed values: the
    method; the kernel's fields, where present (:class:`~neural_kernels.settings.
    KernelSpec`'s checks); an estimate's ``features``, where present (a positive count,
    its networks x width where those are recorded). A hand-made kernel directory needs
    only ``method`` and ``inputs.train.layout``."""
    fix = "it was edited or written by another program: recompute the kernel"
    method = record.get("method")
    if method not in KERNEL_METHODS:
        raise DataError(
            f"{meta_path}: method {method!r} is not one of {', '.join(KERNEL_METHODS)}; {fix}"
        )
    spec = {f.name: record[f.name] for f in dataclasses.fields(KernelSpec) if f.name in record}
    if "arch" in spec:
        try:
            KernelSpec(**spec)
        except (NeuralKernelsError, TypeError) as error:
            raise DataError(f"{meta_path}: {error}; {fix}") from None
    if "features" in record:
        settings = record.get("settings") or {}
        features = record["features"]
        expected = settings.get("networks", 0) * settings.get("width", 0) or features
        if not isinstance(features, int) or not 1 <= features == expected:
            raise DataError(
                f"{meta_path}: features {features!r}, but a positive count of networks x "
                f"width ({expected!r} from its settings) was expected; {fix}"
            )


def _read_labels(labels: Mapping[str, Path]) -> dict[str, NDArray]:
    """The integer labels of every split."""
    missing = [split for split in SPLITS if split not in labels]
    if missing:
        raise NeuralKernelsError(f"labels missing for split(s) {', '.join(missing)}")
    ys = {split: _load_npy(Path(labels[split])) for split in SPLITS}
    check_labels(ys["train"], str(labels["train"]))
    check_classes(ys["train"], str(labels["train"]))
    num_classes = int(ys["train"].max(initial=0)) + 1
    for split in SPLITS[1:]:
        check_labels(ys[split], str(labels[split]), num_classes)
    return {split: y.astype(np.int64) for split, y in ys.items()}


#: Why the solve refuses a kernel with NaN or infinite entries.
NONFINITE_KERNEL = (
    "the solvers would return NaN scores (or quietly wrong ones); recompute the kernel "
    "(the kernel stages reject non-finite images and results, so it was damaged or made "
    "elsewhere)"
)


def _check_blocks(blocks: Mapping[str, NDArray], kernel_dir: Path) -> None:
    """Every block is finite and the fitted block symmetric, scanned in row blocks."""
    for name, block in blocks.items():
        check_finite(block, str(kernel_dir / f"{name}.npy"), NONFINITE_KERNEL)
    check_symmetric(blocks["train"], str(kernel_dir / "train.npy"))


def _check_segments(segments: list[dict], ys: dict[str, NDArray], kernel_dir: Path) -> None:
    """Every segment of fitted rows has as many rows as its split has labels."""
    for segment in segments:
        if segment["stop"] - segment["start"] != len(ys[segment["split"]]):
            raise DataError(
                f"{kernel_dir}: the kernel has {segment['stop'] - segment['start']} "
                f"{segment['split']} rows{' (mirrored)' if segment['mirrored'] else ''} but "
                f"the labels give {len(ys[segment['split']])}; were the kernel and the labels "
                "made from the same dataset and subset?"
            )


def _read_blocks(
    kernel_dir: Path, record: dict, ys: dict[str, NDArray], rows: int
) -> dict[str, NDArray]:
    """The memory-mapped ``train`` block and eval blocks, their shapes checked."""
    fitted = {segment["split"] for segment in record["inputs"]["train"]["layout"]}
    # a crop-augmented kernel scores val's centre crops too, though val is fitted
    evals = [s for s in SPLITS[1:] if s not in fitted or s in record["inputs"]]
    names = ["train", *evals]
    blocks = {name: _load_npy(kernel_dir / f"{name}.npy", mmap=True) for name in names}
    for name, block in blocks.items():
        recorded = record["inputs"].get(name, {}).get("rows")  # an eval block's
        if name != "train" and recorded is not None and block.shape[0] != recorded:
            raise DataError(
                f"{kernel_dir / (name + '.npy')} has {block.shape[0]} rows but kernel.json "
                f"records {recorded}: the directory mixes files of different runs; recompute "
                "the kernel"
            )
        expected = (rows if name == "train" else len(ys[name]), rows)
        if block.shape != expected:
            raise DataError(
                f"{kernel_dir / (name + '.npy')} has shape {block.shape} but kernel.json and "
                f"the labels give {expected}; recompute the kernel or pass its own labels"
            )
    return blocks


def _refit_fits(
    blocks: dict[str, NDArray], segments: list[dict], ys: dict[str, NDArray], row_labels: NDArray
) -> tuple[Fit, Fit]:
    """Selection on the train rows scored on the val rows; refit on all, scored on test."""
    kernel = blocks["train"]
    train_rows = max(seg["stop"] for seg in segments if seg["split"] == "train")
    if "val" in blocks:  # crops: the fitted val rows are random windows, the block the centre
        val_block = blocks["val"][:, :train_rows]
    else:
        val = next(seg for seg in segments if seg["split"] == "val" and not seg["mirrored"])
        val_block = kernel[val["start"] : val["stop"], :train_rows]
    selection = Fit(
        kernel=kernel[:train_rows, :train_rows],
        labels=row_labels[:train_rows],
        evals={"val": val_block},
        eval_labels={"val": ys["val"]},
        images=len(ys["train"]),
        splits=("train",),
    )
    refit = Fit(
        kernel=kernel,
        labels=row_labels,
        evals={"test": blocks["test"]},
        eval_labels={"test": ys["test"]},
        images=sum(len(ys[split]) for split in REFIT_SPLITS),
        splits=REFIT_SPLITS,
    )
    return selection, refit


def load_problem(kernel_dir: Path, labels: Mapping[str, Path]) -> Problem:
    """Read a kernel directory and the labels of each split; build the fits.

    The fitted rows' labels follow ``kernel.json``'s segments (mirrored rows repeat their
    images' labels). Every block's shape is checked against the labels.
    """
    kernel_dir = Path(kernel_dir)
    record = _read_record(kernel_dir)
    ys = _read_labels(labels)
    segments = _segments(record, kernel_dir)
    _check_segments(segments, ys, kernel_dir)
    fitted = [segment["split"] for segment in segments]
    row_labels = np.concatenate([ys[segment["split"]] for segment in segments])
    blocks = _read_blocks(kernel_dir, record, ys, len(row_labels))
    _check_blocks(blocks, kernel_dir)
    if "val" in fitted:
        selection, refit = _refit_fits(blocks, segments, ys, row_labels)
    else:
        selection = Fit(
            kernel=blocks["train"],
            labels=row_labels,
            evals={"val": blocks["val"], "test": blocks["test"]},
            eval_labels={"val": ys["val"], "test": ys["test"]},
            images=len(ys["train"]),
            splits=("train",),
        )
        refit = None
    num_classes = int(ys["train"].max(initial=0)) + 1
    images = {split: len(ys[split]) for split in SPLITS}
    return Problem(record, selection, refit, num_classes, images)


def _gib(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.2f} GiB"


def check_memory(
    settings: SolverSettings, kernel_dir: Path, labels: Mapping[str, Path], device: torch.device
) -> None:
    """Refuse, before reading the kernel, a solve whose solver would hold more memory
    (:mod:`neural_kernels.solvers.memory`) than this job has
    (:func:`neural_kernels.limits.memory_available`; on a GPU, its free memory too):
    one line with both sizes and what to do instead, and nothing written. Files that
    cannot be read are left to :func:`load_problem`'s errors."""
    blocks = [kernel_dir / f"{name}.npy" for name in SPLITS]
    try:
        sizes = memory.solve_sizes([b for b in blocks if b.exists()], labels["train"])
    except (DataError, OSError, ValueError, KeyError):
        return
    solver = SOLVERS.lookup(settings.method)
    holds = solver.holds_bytes(settings, sizes.rows, sizes.eval_rows, sizes.classes)
    needs = [(holds, limits.memory_available())]
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        gpu = limits.MemoryAvailable(free, f"the free memory of {device_name(device)}")
        host = memory.host_bytes_beside_gpu(solver.streams, sizes.rows)
        needs = [(holds, gpu), (host, limits.memory_available())]
    for need, have in needs:
        if need <= have.bytes:
            continue
        what = (
            f"its {sizes.rows} x {sizes.rows} float64 fitted block whole"
            if not solver.streams
            else f"{sizes.rows} + {sizes.eval_rows} rows x {sizes.classes} classes x its grid"
        )
        streaming = [name for name, s in SOLVERS.items() if s.streams]
        instead = (
            f"use --method {' or --method '.join(streaming)}, which stream the kernel from "
            "disk in row blocks, or give the job more memory"
            if not solver.streams
            else "give the job more memory, or a smaller grid, batch_size or rank"
        )
        raise NeuralKernelsError(
            f"solve --method {settings.method} would hold {_gib(need)} ({what}) but this job "
            f"has {_gib(have.bytes)} ({have.source}); {instead}. Nothing was read or written"
        )
