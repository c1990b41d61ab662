"""The ``train`` stage: build the run, resume from its last checkpoint, train epoch by
epoch, write ``model.pt`` and ``metrics.json`` (see the package docstring)."""

from __future__ import annotations

import logging
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from neural_kernels import __version__
from neural_kernels.architectures import myrtle
from neural_kernels.data.prepared import REFIT_SPLITS, load_meta
from neural_kernels.device import device_name, peak_memory_mb, reset_peak_memory, resolve_device
from neural_kernels.errors import DataError, NeuralKernelsError
from neural_kernels.layout import NETWORK_METRICS as METRICS
from neural_kernels.layout import NETWORK_MODEL as MODEL
from neural_kernels.networks.data import (
    Augmentation,
    Normalizer,
    Split,
    channel_stats,
    fit_split,
    load_splits,
    train_batches,
)
from neural_kernels.networks.models import build_model
from neural_kernels.networks.training import (
    TrainState,
    amp_dtype,
    cpu_state,
    deterministic_algorithms,
    evaluate,
    lr_factor,
    save_atomic,
    train_epoch,
)
from neural_kernels.outputs import resume_dir, resume_key, staged_directory, write_json
from neural_kernels.settings import TrainSettings

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"


PROTOCOL = (
    "trained on train + val for the configured epochs; the final epoch is reported "
    "(no validation-based selection; the cosine schedule ends at a learning rate of zero)"
)


@dataclass
class TrainRun:
    """The pieces of one training run, as :func:`_build_run` assembles them.

    ``data`` is what ``metrics.json`` says of the dataset; ``key`` keys the resume
    directory ``scratch``; ``mean`` and ``std`` are the per-channel statistics of
    ``fit`` (train + val) that ``normalize`` applies.
    """

    settings: TrainSettings
    device: torch.device
    splits: dict[str, Split]
    fit: Split
    augment: Augmentation
    data: dict
    key: str
    scratch: Path
    state: TrainState
    mean: list[float]
    std: list[float]
    normalize: Normalizer
    amp: torch.dtype | None
    channels_last: bool

    @property
    def checkpoint_path(self) -> Path:
        """The per-epoch checkpoint in the resume directory."""
        return self.scratch / CHECKPOINT


def _load_data(
    data_dir: Path, settings: TrainSettings, device: torch.device
) -> tuple[dict[str, Split], Augmentation, dict]:
    """The splits of a prepared dataset, its augmentation and its ``metrics.json`` record.

    The image size is checked against the crop and the model before anything is
    loaded, and every split's images against ``meta.json``.
    """
    meta = load_meta(data_dir)
    shape = tuple(meta["image_shape"])
    augment = Augmentation(settings.crop, settings.flip)
    height, width = augment.check(shape, f"dataset {data_dir}")
    if settings.model != "resnet18":
        myrtle(settings.model).check_image_size(height, width)
    splits, meta = load_splits(data_dir, device)
    for split in splits.values():
        if tuple(split.images.shape[1:]) != shape:
            raise DataError(f"{data_dir}: a split's images are not {shape} as meta.json says")
    data_record = {
        "dir": str(data_dir),
        "image_shape": list(shape),
        "input_shape": [height, width, shape[2]],
        "num_classes": int(meta["num_classes"]),
        "sizes": {name: len(split) for name, split in splits.items()},
        "created": meta.get("created"),
    }
    return splits, augment, data_record


def new_state(
    settings: TrainSettings,
    data: dict,
    fit_size: int,
    device: torch.device,
    amp: torch.dtype | None,
    channels_last: bool,
) -> TrainState:
    """A freshly initialised model with its SGD optimiser, schedule, scaler and RNGs."""
    model = build_model(
        settings.model,
        data["num_classes"],
        data["input_shape"][2],
        width=settings.width,
        activation=settings.activation,
        gamma=settings.gamma,
        seed=settings.seed,
    ).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=settings.lr,
        momentum=settings.momentum,
        weight_decay=settings.weight_decay,
    )
    batches_per_epoch = len(train_batches(torch.arange(fit_size), settings.batch_size))
    total_steps = settings.epochs * batches_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, settings.schedule)
    )
    return TrainState(
        model,
        optimizer,
        scheduler,
        torch.amp.GradScaler(device.type, enabled=amp == torch.float16),
        {
            "order": torch.Generator().manual_seed(settings.seed),
            "augment": torch.Generator().manual_seed(settings.seed + 1),
        },
    )


def _build_run(data_dir: Path, out_dir: Path, settings: TrainSettings, device: str) -> TrainRun:
    """Load the data, prepare the resume directory, build the model and normaliser."""
    run_device = resolve_device(device, stage=f"train {settings.model}")
    splits, augment, data = _load_data(data_dir, settings, run_device)
    fit = fit_split(splits)
    key = resume_key({"settings": settings.as_dict(), "data": data, "fit": "train+val"})
    scratch, _ = resume_dir(out_dir, key)
    reset_peak_memory(run_device)
    amp = amp_dtype(run_device)
    channels_last = run_device.type == "cuda"
    state = new_state(settings, data, len(fit), run_device, amp, channels_last)
    mean, std = channel_stats(fit.images)
    normalize = Normalizer(mean, std, run_device, channels_last)
    return TrainRun(
        settings, run_device, splits, fit, augment, data, key, scratch, state,
        mean, std, normalize, amp, channels_last,
    )  # fmt: skip


def _resume(run: TrainRun) -> tuple[list[dict], int]:
    """Restore the run's checkpoint, if any: the epochs' history so far and their number."""
    if not run.checkpoint_path.exists():
        return [], 0
    # Our own file (keyed by run.key); it holds RNG states, hence weights_only=False.
    checkpoint = torch.load(run.checkpoint_path, map_location="cpu", weights_only=False)
    run.state.load_state_dict(checkpoint)
    history, start_epoch = checkpoint["history"], checkpoint["epoch"]
    log.info("resuming after epoch %d of %d from %s", start_epoch, run.settings.epochs, run.scratch)
    return history, start_epoch


def _run_epoch(run: TrainRun, epoch: int, progress: bool) -> dict:
    """Train epoch ``epoch + 1``; its history record. Raises if the loss diverged."""
    settings = run.settings
    epoch_started = time.perf_counter()
    record = {"epoch": epoch + 1}
    record |= train_epoch(
        run.state,
        run.fit,
        run.augment,
        run.normalize,
        settings.batch_size,
        run.device,
        run.amp,
        desc=f"{settings.model} epoch {epoch + 1}/{settings.epochs}",
        progress=progress,
    )
    if not math.isfinite(record["train_loss"]):
        raise NeuralKernelsError(
            f"the training loss diverged ({record['train_loss']}) in epoch "
            f"{epoch + 1}; lower the learning rate (lr: {settings.lr})"
        )
    record |= {
        "lr": run.state.optimizer.param_groups[0]["lr"],
        "seconds": time.perf_counter() - epoch_started,
        "images_per_second": len(run.fit) / max(record["train_seconds"], 1e-9),
    }
    return record


def _save_checkpoint(run: TrainRun, history: list[dict]) -> None:
    """Checkpoint the state after the last epoch of ``history``, and log that epoch."""
    record = history[-1]
    checkpoint = {"key": run.key, "epoch": record["epoch"], "history": history}
    save_atomic(checkpoint | run.state.state_dict(), run.checkpoint_path)
    log.info(
        "epoch %d/%d: loss %.4f, train + val %.4f (%.0f images/s)",
        record["epoch"],
        run.settings.epochs,
        record["train_loss"],
        record["train_accuracy"],
        record["images_per_second"],
    )


def _train(
    run: TrainRun,
    history: list[dict],
    start_epoch: int,
    progress: bool,
    on_epoch_end: Callable[[dict], None] | None,
) -> float:
    """Train the epochs after ``start_epoch`` (appending to ``history``, checkpointing
    each) and return the final weights' test accuracy."""
    with deterministic_algorithms(run.settings.deterministic, run.device):
        for epoch in range(start_epoch, run.settings.epochs):
            history.append(_run_epoch(run, epoch, progress))
            _save_checkpoint(run, history)
            if on_epoch_end is not None:
                on_epoch_end(history[-1])
        return evaluate(
            run.state.model,
            run.splits["test"],
            run.augment,
            run.normalize,
            run.device,
            2 * run.settings.batch_size,
            run.amp,
        )


def _metrics(
    run: TrainRun, history: list[dict], test_accuracy: float, resumed_from: int, this_run: float
) -> dict:
    """The ``metrics.json`` record of a finished run (``this_run``: its seconds)."""
    return {
        "model": run.settings.model,
        "settings": run.settings.as_dict(),
        "data": run.data,
        "protocol": PROTOCOL,
        "training_size": {"images": len(run.fit), "splits": list(REFIT_SPLITS)},
        "normalization": {"mean": run.mean, "std": run.std},
        "parameters": sum(p.numel() for p in run.state.model.parameters()),
        "epochs": history,
        "test_accuracy": test_accuracy,
        "resumed_from_epoch": resumed_from,
        "seconds": {
            "total": sum(e["seconds"] for e in history[:resumed_from]) + this_run,
            "this_run": this_run,
            "train": sum(e["train_seconds"] for e in history),
        },
        "images_per_second": sum(e["images_per_second"] for e in history) / len(history),
        "device": device_name(run.device),
        "precision": {
            None: "float32",
            torch.bfloat16: "bf16 autocast",
            torch.float16: "fp16 autocast",
        }[run.amp],
        "channels_last": run.channels_last,
        "neural_kernels_version": __version__,
        "torch_version": torch.__version__,
        **peak_memory_mb(run.device),
    }


def _write_outputs(out_dir: Path, run: TrainRun, record: dict) -> None:
    """Write ``model.pt`` (the final weights, what rebuilds them) and ``metrics.json``."""
    settings, data = run.settings, run.data
    with staged_directory(out_dir, last=METRICS) as stage:
        torch.save(
            {
                "state_dict": cpu_state(run.state.model),
                "model": settings.model,
                "num_classes": data["num_classes"],
                "in_channels": data["input_shape"][2],
                "width": settings.width,
                "activation": settings.activation,
                "gamma": settings.gamma,
                "crop": settings.crop,
                "input_shape": list(data["input_shape"]),
                "mean": run.mean,
                "std": run.std,
                "epoch": settings.epochs,
            },
            stage / MODEL,
        )
        write_json(stage / METRICS, record)


def train_network(
    data_dir: Path | str,
    out_dir: Path | str,
    settings: TrainSettings,
    *,
    device: str = "auto",
    progress: bool = True,
    on_epoch_end: Callable[[dict], None] | None = None,
) -> dict:
    """Train ``settings.model`` on train + val; write ``model.pt`` and ``metrics.json``.

    Each epoch trains on shuffled, augmented batches of the train and validation
    splits together (normalised by their per-channel statistics); after the last
    epoch the final weights see the test split. After each epoch a checkpoint (model,
    optimiser, schedule, history, every RNG state) is written to
    ``.<out_dir name>.resume/`` beside ``out_dir``; a rerun with the same settings and
    dataset resumes after the last finished epoch, and removes it when done.
    ``on_epoch_end`` is called with each epoch's record after its checkpoint is saved.
    On CUDA the forward pass runs under bf16 (or fp16) autocast in channels_last;
    on the CPU in float32. Returns the ``metrics.json`` record.
    """
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    started = time.perf_counter()
    run = _build_run(data_dir, out_dir, settings, device)
    history, resumed_from = _resume(run)
    test_accuracy = _train(run, history, resumed_from, progress, on_epoch_end)
    record = _metrics(run, history, test_accuracy, resumed_from, time.perf_counter() - started)
    _write_outputs(out_dir, run, record)
    shutil.rmtree(run.scratch, ignore_errors=True)
    return record


def load_model(path: Path | str, device: str = "cpu") -> tuple[nn.Module, dict]:
    """The trained network saved in ``model.pt`` (in eval mode) and its metadata.

    Inputs are uint8 images normalised as ``(x / 255 - mean) / std`` per channel and
    centre-cropped to ``crop`` when it is set (see :class:`Augmentation`).
    """
    saved = torch.load(Path(path), map_location="cpu", weights_only=True)
    model = build_model(
        saved["model"],
        saved["num_classes"],
        saved["in_channels"],
        width=saved["width"],
        activation=saved["activation"],
        gamma=saved["gamma"],
    )
    model.load_state_dict(saved["state_dict"])
    meta = {key: value for key, value in saved.items() if key != "state_dict"}
    return model.to(resolve_device(device)).eval(), meta
