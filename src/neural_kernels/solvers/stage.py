"""The ``solve`` stage: one solver on one kernel directory, with model selection.

Reads ``<kernel dir>/{train,val,test}.npy`` and ``kernel.json`` (see
``neural_kernels.kernels.stage``) and the integer labels of each split; fits every
hyperparameter of the solver's grid; picks the one with the best *validation*
accuracy (the headline number is that choice's test accuracy) and also records the
best-on-test value, labelled as such, because the reference implementation of the
analytic-kernel paper (Shankar et al. 2020) selected on the test set.

Ties go to the most regularised candidate: the smallest ``eta t`` (flow), the largest
``lambda`` (ridge), the fewest steps and then the smallest ``eta t`` (boosting).

Outputs in ``out_dir``: ``predictions.npz`` (the selected model's scores and predicted
classes on val and test, with the true labels) and ``metrics.json`` (written last).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from numpy.typing import NDArray

from neural_kernels.device import device_name, peak_memory_mb, reset_peak_memory, resolve_device
from neural_kernels.errors import DataError, NeuralKernelsError
from neural_kernels.outputs import staged_directory, write_json
from neural_kernels.solvers.boosting import boosting_path
from neural_kernels.solvers.flow import flow_path, one_hot_targets, ridge_path

log = logging.getLogger(__name__)

METHODS = ("flow", "ridge", "boosting")
SPLITS = ("train", "val", "test")
METRICS = "metrics.json"
PREDICTIONS = "predictions.npz"
#: Default grids: 2 points per decade. The Myrtle kernels have a unit diagonal, so
#: these absolute values suit every dataset (eigenvalues run up to about N).
DEFAULT_ETA_T = tuple(float(10.0**e) for e in np.arange(-2.0, 8.01, 0.5))
DEFAULT_LAMBDAS = tuple(float(10.0**e) for e in np.arange(1.0, -9.01, -0.5))
DEFAULT_BOOSTING_ETA_T = (1e2, 1e4)
TARGETS = "centred one-hot: 1 - 1/C for the class, -1/C elsewhere"


@dataclass(frozen=True)
class SolverSettings:
    """A solver and its hyperparameter grid.

    ``eta_t``: flow and boosting (the per-batch flow); ``lambdas``: ridge;
    ``batch_size`` (``M``), ``steps`` and ``seed`` (of the batch shuffles): boosting.
    """

    method: str
    eta_t: tuple[float, ...] = ()
    lambdas: tuple[float, ...] = ()
    batch_size: int = 256
    steps: int = 20
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise NeuralKernelsError(
                f"unknown solver method {self.method!r}; choose one of {', '.join(METHODS)}"
            )
        default_eta_t = DEFAULT_BOOSTING_ETA_T if self.method == "boosting" else DEFAULT_ETA_T
        # Grids ordered from the most regularised candidate (see the tie rule).
        eta_t = sorted(float(v) for v in self.eta_t or default_eta_t)
        lambdas = sorted((float(v) for v in self.lambdas or DEFAULT_LAMBDAS), reverse=True)
        object.__setattr__(self, "eta_t", tuple(eta_t))
        object.__setattr__(self, "lambdas", tuple(lambdas))
        grid = self.lambdas if self.method == "ridge" else self.eta_t
        if min(grid) <= 0 or not all(map(math.isfinite, grid)):
            name = "lambdas" if self.method == "ridge" else "eta_t"
            raise NeuralKernelsError(f"{name} must be positive finite numbers, got {list(grid)}")
        if self.batch_size < 1 or self.steps < 1 or self.seed < 0:
            raise NeuralKernelsError("batch_size and steps must be >= 1 and seed >= 0")

    def describe(self) -> dict:
        """The settings that matter for this method (what metrics.json records)."""
        keys = {
            "flow": ("method", "eta_t"),
            "ridge": ("method", "lambdas"),
            "boosting": ("method", "eta_t", "batch_size", "steps", "seed"),
        }[self.method]
        return {key: getattr(self, key) for key in keys}


def accuracy(scores: torch.Tensor, labels: NDArray) -> float:
    """Share of rows whose largest score is at the true label."""
    return float((scores.argmax(dim=1).cpu().numpy() == labels).mean())


def _load_npy(path: Path, mmap: bool = False) -> NDArray:
    try:
        return np.load(path, mmap_mode="r" if mmap else None)
    except (OSError, ValueError) as error:
        raise DataError(f"cannot read {path} as a .npy array ({error})") from None


def load_problem(
    kernel_dir: Path, labels: Mapping[str, Path]
) -> tuple[dict, dict[str, NDArray], dict[str, NDArray]]:
    """``kernel.json``, the kernel blocks (memory-mapped) and the labels of each split.

    With flips the kernel's train rows are the images then their mirrors, so the train
    labels are repeated. Shapes are checked against the labels.
    """
    kernel_dir = Path(kernel_dir)
    meta_path = kernel_dir / "kernel.json"
    if not meta_path.exists():
        raise DataError(
            f"{kernel_dir} is not a finished kernel directory (no kernel.json); "
            "compute the kernel first (snakemake kernels, or neural-kernels kernel-analytic)"
        )
    record = json.loads(meta_path.read_text())
    missing = [split for split in SPLITS if split not in labels]
    if missing:
        raise NeuralKernelsError(f"labels missing for split(s) {', '.join(missing)}")
    ys = {split: _load_npy(Path(labels[split])).astype(np.int64) for split in SPLITS}
    if record.get("flips"):
        ys["train"] = np.concatenate([ys["train"], ys["train"]])
    blocks = {split: _load_npy(kernel_dir / f"{split}.npy", mmap=True) for split in SPLITS}
    n = len(ys["train"])
    doubled = " (train labels doubled by flips)" if record.get("flips") else ""
    for split in SPLITS:
        expected = (len(ys[split]), n)
        if blocks[split].shape != expected:
            raise DataError(
                f"{kernel_dir / (split + '.npy')} has shape {blocks[split].shape} but the "
                f"labels give {expected}{doubled}; "
                "were the kernel and the labels made from the same dataset and subset?"
            )
    return record, blocks, ys


def _candidates(
    settings: SolverSettings,
    blocks: Mapping[str, NDArray],
    targets: torch.Tensor,
    device: torch.device,
    progress: bool,
) -> Iterator[tuple[dict, dict[str, torch.Tensor] | str]]:
    """``(hyperparameters, predictions or an error message)`` for every grid point."""
    evals = {split: blocks[split] for split in SPLITS if split != "train"}
    if settings.method == "boosting":
        path = boosting_path(
            blocks["train"],
            targets,
            evals,
            batch_size=settings.batch_size,
            steps=settings.steps,
            eta_ts=settings.eta_t,
            seed=settings.seed,
            progress=progress,
        )
        for step, scores in path:
            for eta_t, score in zip(settings.eta_t, scores, strict=True):
                yield {"step": step, "eta_t": eta_t}, score
        return
    kernel = torch.from_numpy(np.array(blocks["train"], dtype=np.float64)).to(device)
    if settings.method == "flow":
        for eta_t, score in flow_path(kernel, targets, evals, settings.eta_t):
            yield {"eta_t": eta_t}, score
    else:
        for lam, score in ridge_path(kernel, targets, evals, settings.lambdas):
            yield {"lambda": lam}, score


def solve_files(
    kernel_dir: Path,
    labels: Mapping[str, Path],
    out_dir: Path,
    settings: SolverSettings,
    *,
    device: str = "auto",
    progress: bool = True,
) -> dict:
    """Fit ``settings``' grid on ``kernel_dir``, select on val, write ``out_dir``."""
    started = time.perf_counter()
    record, blocks, ys = load_problem(kernel_dir, labels)
    num_classes = int(max(y.max(initial=0) for y in ys.values())) + 1
    run_device = resolve_device(device, stage=f"solve ({settings.method})")
    reset_peak_memory(run_device)
    targets = torch.from_numpy(one_hot_targets(ys["train"], num_classes)).to(run_device)
    loaded = time.perf_counter()

    grid: list[dict] = []
    selected: dict | None = None
    best_on_test: dict | None = None
    kept: dict[str, NDArray] = {}
    for params, scores in _candidates(settings, blocks, targets, run_device, progress):
        if isinstance(scores, str):
            log.warning("%s: %s", params, scores)
            grid.append({**params, "error": scores})
            continue
        acc = {split: accuracy(scores[split], ys[split]) for split in SPLITS}
        point = {**params, "accuracy": acc, "seconds": time.perf_counter() - loaded}
        grid.append(point)
        if selected is None or acc["val"] > selected["accuracy"]["val"]:
            selected = point
            kept = {split: scores[split].float().cpu().numpy() for split in ("val", "test")}
        if best_on_test is None or acc["test"] > best_on_test["accuracy"]["test"]:
            best_on_test = point
    if selected is None:
        raise NeuralKernelsError(
            f"every grid point of the {settings.method} solver failed "
            f"({grid[0].get('error', '')}); widen the grid (larger lambdas) or use the flow"
        )
    solve_seconds = time.perf_counter() - loaded
    result = {
        "method": settings.method,
        "settings": settings.describe(),
        "kernel_dir": str(kernel_dir),
        "kernel": {
            key: record.get(key)
            for key in ("method", "arch", "activation", "gamma", "flips", "features")
        },
        "targets": TARGETS,
        "num_classes": num_classes,
        "sizes": {split: len(ys[split]) for split in SPLITS},
        "grid": grid,
        "selected": {
            **selected,
            "rule": "best validation accuracy; ties to the most regularised candidate",
        },
        "test_accuracy": selected["accuracy"]["test"],
        "best_on_test": {
            **best_on_test,
            "note": "chosen on the test split itself (optimistic), as the reference "
            "implementation of Shankar et al. 2020 selected",
        },
        "device": device_name(run_device),
        "seconds": {
            "load": loaded - started,
            "solve": solve_seconds,
            "total": time.perf_counter() - started,
        },
        **peak_memory_mb(run_device),
    }
    with staged_directory(Path(out_dir), last=METRICS) as stage:
        np.savez(
            stage / PREDICTIONS,
            **{f"{split}_scores": kept[split] for split in kept},
            **{f"{split}_predictions": kept[split].argmax(axis=1) for split in kept},
            **{f"{split}_labels": ys[split] for split in kept},
        )
        write_json(stage / METRICS, result)
    return result
