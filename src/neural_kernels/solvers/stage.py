"""The ``solve`` stage: one solver on one kernel directory, with model selection.

Reads a kernel directory (``train.npy``, the eval blocks and ``kernel.json``, see
``neural_kernels.kernels.stage``) and the integer labels of each split, and follows
the thesis's protocol:

1. **Selection.** Fit every hyperparameter of the solver's grid (``eta t``, ``lambda``,
   boosting steps) on the *train* rows and score it on the validation split; the
   candidate with the best validation accuracy is selected. Ties go to the most
   regularised candidate: the smallest ``eta t`` (flow), the largest ``lambda``
   (ridge), the fewest steps and then the smallest ``eta t`` (boosting).
2. **Refit.** When the kernel's fitted rows hold the validation split after the train
   rows (its symmetric block covers train + val: the full splits), fit the grid again
   on *train + val* (with their mirrors under flips) and score it on the test split:
   the headline is the test accuracy of the selected candidate refit on train + val,
   so the training set has the thesis's size (CIFAR-10: 50,000 images). A subset's
   kernel (val is an eval block there) is not refit: the thesis trains on exactly the
   subset's images.

Every grid point records ``accuracy``: ``val`` from the selection fit, ``test`` (and
``train``, on the rows it was fitted on) from the headline fit. ``best_on_test`` is the
grid point with the best of those test accuracies, labelled as such: the reference
implementation of the analytic-kernel paper (Shankar et al. 2020) chose its
regulariser on the test set after fitting on the whole training set, and that is the
protocol it reproduces.

Outputs in ``out_dir``: ``predictions.npz`` (the selected candidate's scores and
predicted classes on val, from the selection fit, and on test, from the headline fit,
with the true labels) and ``metrics.json`` (written last).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from numpy.typing import NDArray

from neural_kernels.checks import check_finite, check_labels, check_symmetric
from neural_kernels.data.prepared import REFIT_SPLITS
from neural_kernels.device import device_name, peak_memory_mb, reset_peak_memory, resolve_device
from neural_kernels.errors import DataError, NeuralKernelsError
from neural_kernels.kernels.layout import KERNEL_META
from neural_kernels.layout import SOLVE_METRICS as METRICS
from neural_kernels.layout import SOLVE_PREDICTIONS as PREDICTIONS
from neural_kernels.outputs import staged_directory, write_json
from neural_kernels.settings import CROP_KEYS, SolverSettings, resolve
from neural_kernels.solvers.flow import Matrix, one_hot_targets
from neural_kernels.solvers.registry import SOLVERS

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
TARGETS = "centred one-hot: 1 - 1/C for the class, -1/C elsewhere"
SELECTION_RULE = "best validation accuracy; ties to the most regularised candidate"


def accuracy(scores: torch.Tensor, labels: NDArray) -> float:
    """Share of rows whose largest score is at the true label."""
    return float((scores.argmax(dim=1).cpu().numpy() == labels).mean())


def _load_npy(path: Path, mmap: bool = False) -> NDArray:
    try:
        return np.load(path, mmap_mode="r" if mmap else None)
    except (OSError, ValueError) as error:
        raise DataError(f"cannot read {path} as a .npy array ({error})") from None


@dataclass
class Fit:
    """One fit of the grid: a kernel block, the targets' labels, the blocks it scores."""

    kernel: Matrix  # K(X, X) of the fitted rows
    labels: NDArray  # the class of every fitted row
    evals: dict[str, Matrix]  # split -> K(Z, X)
    eval_labels: dict[str, NDArray]
    images: int  # distinct images fitted (mirrors not counted)
    splits: tuple[str, ...]  # the splits whose rows are fitted


@dataclass
class Problem:
    """A kernel directory read for solving: its record, the selection fit and the refit."""

    record: dict
    selection: Fit
    refit: Fit | None
    num_classes: int
    sizes: dict[str, int]  # images per split


def _layout(record: dict, kernel_dir: Path) -> list[dict]:
    """The fitted rows' segments from ``kernel.json``, checked to tile the block."""
    try:
        layout = record["inputs"]["train"]["layout"]
        rows = record["inputs"]["train"]["rows"]
    except (KeyError, TypeError):
        raise DataError(
            f"{kernel_dir / KERNEL_META} does not describe its fitted rows (inputs.train."
            "layout): it was written by an older version; recompute the kernel"
        ) from None
    splits = [segment["split"] for segment in layout]
    starts = [0, *(segment["stop"] for segment in layout)]
    tiled = [segment["start"] for segment in layout] == starts[:-1] and starts[-1] == rows
    # train rows first, then val rows (REFIT_SPLITS order), tiling [0, rows)
    ordered = splits and splits[0] == "train" and set(splits) <= set(REFIT_SPLITS)
    if not (tiled and ordered and splits == sorted(splits, key=REFIT_SPLITS.index)):
        raise DataError(
            f"{kernel_dir / KERNEL_META}: malformed row layout {layout} for {rows} rows; "
            "recompute the kernel"
        )
    return layout


def _read_record(kernel_dir: Path) -> dict:
    """``kernel.json`` of a finished kernel directory, or a clear error."""
    meta_path = kernel_dir / KERNEL_META
    if not meta_path.exists():
        raise DataError(
            f"{kernel_dir} is not a finished kernel directory (no {KERNEL_META}); "
            "compute the kernel first (snakemake kernels, or neural-kernels kernel-analytic)"
        )
    return json.loads(meta_path.read_text())


def _read_labels(labels: Mapping[str, Path]) -> dict[str, NDArray]:
    """The integer labels of every split."""
    missing = [split for split in SPLITS if split not in labels]
    if missing:
        raise NeuralKernelsError(f"labels missing for split(s) {', '.join(missing)}")
    ys = {split: _load_npy(Path(labels[split])) for split in SPLITS}
    check_labels(ys["train"], str(labels["train"]))
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


def _check_segments(layout: list[dict], ys: dict[str, NDArray], kernel_dir: Path) -> None:
    """Every segment of fitted rows has as many rows as its split has labels."""
    for segment in layout:
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
        expected = (rows if name == "train" else len(ys[name]), rows)
        if block.shape != expected:
            raise DataError(
                f"{kernel_dir / (name + '.npy')} has shape {block.shape} but kernel.json and "
                f"the labels give {expected}; recompute the kernel or pass its own labels"
            )
    return blocks


def _refit_fits(
    blocks: dict[str, NDArray], layout: list[dict], ys: dict[str, NDArray], row_labels: NDArray
) -> tuple[Fit, Fit]:
    """Selection on the train rows scored on the val rows; refit on all, scored on test."""
    kernel = blocks["train"]
    train_rows = max(seg["stop"] for seg in layout if seg["split"] == "train")
    if "val" in blocks:  # crops: the fitted val rows are random windows, the block the centre
        val_block = blocks["val"][:, :train_rows]
    else:
        val = next(seg for seg in layout if seg["split"] == "val" and not seg["mirrored"])
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

    The fitted rows' labels follow ``kernel.json``'s layout (mirrored rows repeat their
    images' labels). Every block's shape is checked against the labels.
    """
    kernel_dir = Path(kernel_dir)
    record = _read_record(kernel_dir)
    ys = _read_labels(labels)
    layout = _layout(record, kernel_dir)
    _check_segments(layout, ys, kernel_dir)
    fitted = [segment["split"] for segment in layout]
    row_labels = np.concatenate([ys[segment["split"]] for segment in layout])
    blocks = _read_blocks(kernel_dir, record, ys, len(row_labels))
    _check_blocks(blocks, kernel_dir)
    if "val" in fitted:
        selection, refit = _refit_fits(blocks, layout, ys, row_labels)
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


def _key(params: dict) -> tuple:
    return tuple(sorted(params.items()))


def _run_grid(
    settings: SolverSettings,
    fit: Fit,
    num_classes: int,
    device: torch.device,
    progress: bool,
    keep: Callable[[dict, dict[str, float]], bool],
) -> tuple[dict[tuple, dict], dict[str, NDArray]]:
    """Every grid point's accuracies on ``fit``; the eval scores of the point ``keep``
    accepts last (``keep(params, accuracy)`` is asked in grid order)."""
    targets = torch.from_numpy(one_hot_targets(fit.labels, num_classes)).to(device)
    started = time.perf_counter()
    points: dict[tuple, dict] = {}
    kept: dict[str, NDArray] = {}
    candidates = resolve(SOLVERS.lookup(settings.method).candidates)
    for params, scores in candidates(settings, fit, targets, device, progress):
        if isinstance(scores, str):
            log.warning("%s: %s", params, scores)
            points[_key(params)] = {**params, "error": scores}
            continue
        acc = {"train": accuracy(scores["train"], fit.labels)}
        acc |= {split: accuracy(scores[split], y) for split, y in fit.eval_labels.items()}
        points[_key(params)] = {**params, "accuracy": acc, "seconds": time.perf_counter() - started}
        if keep(params, acc):
            kept = {split: scores[split].float().cpu().numpy() for split in fit.evals}
    del targets
    return points, kept


def _select(
    settings: SolverSettings, problem: Problem, device: torch.device, progress: bool
) -> tuple[dict[tuple, dict], dict[str, NDArray], dict]:
    """The grid fitted on the train rows and scored on val; the best on val."""
    best: dict = {}

    def better_on_val(params: dict, acc: dict[str, float]) -> bool:
        if best and acc["val"] <= best["accuracy"]["val"]:
            return False
        best.update(params=params, accuracy=acc)
        return True

    points, kept = _run_grid(
        settings, problem.selection, problem.num_classes, device, progress, better_on_val
    )
    if not best:
        first_error = next(iter(points.values())).get("error", "")
        raise NeuralKernelsError(
            f"every grid point of the {settings.method} solver failed ({first_error}); "
            "widen the grid (larger lambdas) or use the flow"
        )
    return points, kept, best


def _refit(
    settings: SolverSettings, problem: Problem, device: torch.device, progress: bool, best: dict
) -> tuple[dict[tuple, dict], dict[str, NDArray]]:
    """The grid refit on train + val and scored on test; the selected point's scores."""
    selected_key = _key(best["params"])
    points, kept = _run_grid(
        settings,
        problem.refit,
        problem.num_classes,
        device,
        progress,
        lambda params, acc: _key(params) == selected_key,
    )
    if "error" in points[selected_key]:
        raise NeuralKernelsError(
            f"the selected {best['params']} fails on train + val "
            f"({points[selected_key]['error']}); widen the grid (larger lambdas) or "
            "use the flow"
        )
    return points, kept


def _merged_grid(selection: dict[tuple, dict], refit: dict[tuple, dict] | None) -> list[dict]:
    """Every grid point: val from the selection fit, train and test from the refit."""
    grid = []
    for key, point in selection.items():
        if refit is not None:
            again = refit[key]
            if "error" in point or "error" in again:
                point = {**point, "error": point.get("error") or f"refit: {again['error']}"}
                point.pop("accuracy", None)
            else:
                point = {
                    **point,
                    "accuracy": {
                        "train": again["accuracy"]["train"],
                        "val": point["accuracy"]["val"],
                        "test": again["accuracy"]["test"],
                    },
                    "seconds": point["seconds"] + again["seconds"],
                }
        grid.append(point)
    return grid


def solve_files(
    kernel_dir: Path,
    labels: Mapping[str, Path],
    out_dir: Path,
    settings: SolverSettings,
    *,
    device: str = "auto",
    progress: bool = True,
) -> dict:
    """Select ``settings``' grid on val, refit on train + val where the kernel allows it,
    write ``out_dir`` (see the module docstring)."""
    started = time.perf_counter()
    problem = load_problem(kernel_dir, labels)
    run_device = resolve_device(device, stage=f"solve ({settings.method})")
    reset_peak_memory(run_device)
    loaded = time.perf_counter()
    selection, kept, best = _select(settings, problem, run_device, progress)
    selection_seconds = time.perf_counter() - loaded
    refit_points = None
    if problem.refit is not None:
        refit_points, refit_kept = _refit(settings, problem, run_device, progress, best)
        kept["test"] = refit_kept["test"]
    seconds = {
        "load": loaded - started,
        "selection": selection_seconds,
        "refit": time.perf_counter() - loaded - selection_seconds,
    }
    grid = _merged_grid(selection, refit_points)
    result = _record(settings, problem, grid, _key(best["params"]), kernel_dir, run_device)
    result["seconds"] = seconds | {
        "solve": time.perf_counter() - loaded,
        "total": time.perf_counter() - started,
    }
    result |= peak_memory_mb(run_device)
    headline = problem.refit or problem.selection
    eval_labels = {**problem.selection.eval_labels, **headline.eval_labels}
    _write_outputs(Path(out_dir), kept, eval_labels, result)
    return result


def _record(
    settings: SolverSettings,
    problem: Problem,
    grid: list[dict],
    selected_key: tuple,
    kernel_dir: Path,
    device: torch.device,
) -> dict:
    """metrics.json but for the timings and memory (see the module docstring)."""
    scored = [point for point in grid if "accuracy" in point]
    selected = next(point for point in scored if _key(_params(point)) == selected_key)
    best_on_test = max(scored, key=lambda point: point["accuracy"]["test"])
    headline = problem.refit or problem.selection
    fitted_rows = {"selection": len(problem.selection.labels)}
    if problem.refit is not None:
        fitted_rows["refit"] = len(problem.refit.labels)
    kernel_keys = ("method", "arch", "activation", "gamma", "flips", "features")
    kernel_keys += tuple(key for key in CROP_KEYS if key in problem.record)
    return {
        "method": settings.method,
        "settings": settings.describe(),
        "kernel_dir": str(kernel_dir),
        "kernel": {key: problem.record.get(key) for key in kernel_keys},
        "targets": TARGETS,
        "num_classes": problem.num_classes,
        "sizes": problem.sizes,
        "refit": problem.refit is not None,
        "protocol": _protocol(problem),
        "training_size": {
            "images": headline.images,
            "rows": len(headline.labels),
            "splits": list(headline.splits),
        },
        "fitted_rows": fitted_rows,
        "grid": grid,
        "selected": {**selected, "rule": SELECTION_RULE},
        "test_accuracy": selected["accuracy"]["test"],
        "best_on_test": {
            **best_on_test,
            "note": "chosen on the test split itself (optimistic), as the reference "
            "implementation of Shankar et al. 2020 selected, after fitting on "
            + " + ".join(headline.splits),
        },
        "device": device_name(device),
    }


def _write_outputs(
    out_dir: Path, kept: dict[str, NDArray], eval_labels: dict[str, NDArray], result: dict
) -> None:
    """predictions.npz and metrics.json (last), all or nothing."""
    for split, scores in kept.items():
        check_finite(
            scores,
            f"{out_dir}: the selected candidate's {split} scores",
            "the solver diverged (an eta t or lambda too extreme for this kernel?); "
            "nothing was written",
        )
    with staged_directory(out_dir, last=METRICS) as stage:
        np.savez(
            stage / PREDICTIONS,
            **{f"{split}_scores": kept[split] for split in kept},
            **{f"{split}_predictions": kept[split].argmax(axis=1) for split in kept},
            **{f"{split}_labels": eval_labels[split] for split in kept},
        )
        write_json(stage / METRICS, result)


def _params(point: dict) -> dict:
    return {key: point[key] for key in ("eta_t", "lambda", "step") if key in point}


def _protocol(problem: Problem) -> str:
    selection = problem.selection
    if problem.refit is None:
        return (
            f"selected on val after fitting on train ({selection.images} images, "
            f"{len(selection.labels)} rows); not refit: the training set is the train "
            "split itself"
        )
    return (
        f"selected on val after fitting on train ({selection.images} images, "
        f"{len(selection.labels)} rows), then refit on train + val ({problem.refit.images} "
        f"images, {len(problem.refit.labels)} rows) and scored on test"
    )
