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

import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch
from numpy.typing import NDArray

from neural_kernels.catalog import SOLVERS
from neural_kernels.checks import check_finite
from neural_kernels.device import (
    device_name,
    peak_memory_mb,
    reset_peak_memory,
    resolve_device,
    return_freed_cpu_memory,
)
from neural_kernels.errors import NeuralKernelsError
from neural_kernels.layout import SOLVE_METRICS as METRICS
from neural_kernels.layout import SOLVE_PREDICTIONS as PREDICTIONS
from neural_kernels.outputs import staged_directory, write_json
from neural_kernels.registry import resolve
from neural_kernels.settings import CROP_KEYS, SolverSettings
from neural_kernels.solvers.flow import one_hot_targets
from neural_kernels.solvers.kernel_dir import check_memory, load_problem
from neural_kernels.solvers.problem import Fit, Problem

__all__ = ["Fit", "Problem", "SolverSettings", "load_problem", "solve_files"]

log = logging.getLogger(__name__)

TARGETS = "centred one-hot: 1 - 1/C for the class, -1/C elsewhere"
SELECTION_RULE = "best validation accuracy; ties to the most regularised candidate"


def accuracy(scores: torch.Tensor, labels: NDArray) -> float:
    """Share of rows whose largest score is at the true label."""
    return float((scores.argmax(dim=1).cpu().numpy() == labels).mean())


#: The entry of a grid point's hyperparameters that describes how its fit went (pcg's
#: iterations and residual) rather than which point it is.
DIAGNOSTICS = "diagnostics"


def _key(params: dict) -> tuple:
    return tuple(sorted((k, v) for k, v in params.items() if k != DIAGNOSTICS))


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
            if DIAGNOSTICS in point or DIAGNOSTICS in again:
                point[DIAGNOSTICS] = {
                    "selection": point.get(DIAGNOSTICS),
                    "refit": again.get(DIAGNOSTICS),
                }
        elif DIAGNOSTICS in point:
            point = {**point, DIAGNOSTICS: {"selection": point[DIAGNOSTICS]}}
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
    run_device = resolve_device(device, stage=f"solve ({settings.method})")
    return_freed_cpu_memory()  # hold what the solver holds, not what it once held
    check_memory(settings, Path(kernel_dir), labels, run_device)
    problem = load_problem(kernel_dir, labels)
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
