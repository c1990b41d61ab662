"""Trained network baselines: ResNet18 from scratch and a finite-width Myrtle network.

* :func:`resnet18` is torchvision's ResNet18 with random initialisation (never
  pretrained weights); a stem for other than 3 input channels replaces ``conv1``.
* :class:`MyrtleNetwork` is the Myrtle definition of :mod:`neural_kernels.architectures`
  (one network of ``width`` channels, the same ``Serial.init``/``Serial.apply`` as the
  kernel estimate, ending with the finite layer of the kernels' final projection)
  followed by a trained linear readout: the thesis's "wide network".

:func:`train_network` trains either with SGD (momentum 0.9, weight decay 5e-4, a
per-step cosine or step schedule) on the train and validation splits of a prepared
dataset together, the thesis's training-set size (the kernels' refit protocol), for
the configured number of epochs, and reports the test accuracy of the final epoch.
Nothing is selected on validation, which is what lets it be trained on: the number
of epochs is a setting, and the default cosine schedule ends at a learning rate of
zero, where the final weights are the natural ones to report. Layout of its output
directory (``results/networks/<dataset>/<name>/``)::

    model.pt       the final weights and what rebuilds them (load_model)
    metrics.json   settings, per-epoch history, training size, test accuracy,
                   timings, device, peak memory (written last)

Per-epoch checkpoints live in ``.<name>.resume/`` beside the output directory, keyed
by a hash of the settings and the dataset: an interrupted run resumes after its last
finished epoch, a changed configuration starts afresh. Accuracies are fractions in
[0, 1].
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms.v2 import functional as TF
from tqdm import tqdm

from neural_kernels import __version__
from neural_kernels.architectures import Layer, myrtle
from neural_kernels.catalog import MYRTLE_STAGES
from neural_kernels.checks import check_classes, check_labels
from neural_kernels.data.prepared import REFIT_SPLITS, load_meta, load_split
from neural_kernels.device import device_name, peak_memory_mb, reset_peak_memory, resolve_device
from neural_kernels.errors import DataError, NeuralKernelsError
from neural_kernels.layout import NETWORK_METRICS as METRICS
from neural_kernels.layout import NETWORK_MODEL as MODEL
from neural_kernels.outputs import resume_dir, resume_key, staged_directory, write_json
from neural_kernels.settings import TrainSettings

log = logging.getLogger(__name__)

#: ``schedule: step`` multiplies the learning rate by ``STEP_FACTOR`` at these shares of
#: the training steps (the usual ResNet recipe: / 10 at 50% and 75%).
STEP_MILESTONES = (0.5, 0.75)
STEP_FACTOR = 0.1
CHECKPOINT = "checkpoint.pt"
#: Datasets up to this size (uint8 bytes, all splits) are copied to the GPU once;
#: larger ones stay in host memory and are sent batch by batch.
DEVICE_DATA_BYTES = 8 * 2**30


# ----------------------------------------------------------------------------- models


def resnet18(num_classes: int, in_channels: int = 3) -> nn.Module:
    """torchvision's ResNet18, randomly initialised, with ``num_classes`` outputs.

    For ``in_channels != 3`` (e.g. grayscale digits) the 7x7 stem convolution is
    replaced by one with that many input channels; the rest is torchvision's.
    """
    from torchvision.models import resnet18 as torchvision_resnet18

    model = torchvision_resnet18(weights=None, num_classes=num_classes)
    if in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    return model


class MyrtleNetwork(nn.Module):
    """One finite Myrtle network of ``width`` channels with a linear readout.

    The layers are ``myrtle(name, activation, gamma)``; what its ``Serial.init``
    returns becomes parameters (convolution and dense weights, trained) or buffers
    (the Gaussian layers' random phases, fixed). ``features(x)`` is
    ``Serial.apply(x, params)``: the globally pooled activations of one network of the
    kernel estimate, then the finite layer of the final projection (unit-RMS
    scaling, a dense ``width -> width`` layer and the nonlinearity, whose
    infinite-width limit is the kernels' ``relu_project``/``exponential_shifted_project``),
    ``(B, width)``; ``forward`` maps them to class scores with
    ``nn.Linear(width, num_classes)``.
    """

    def __init__(
        self,
        name: str,
        num_classes: int,
        *,
        width: int = 64,
        in_channels: int = 3,
        activation: str = "relu",
        gamma: float = 1.0,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        self.arch = myrtle(name, activation, gamma)
        self.width = width
        generator = generator or torch.Generator().manual_seed(0)
        self._param_names: list[str | tuple[str, str | None] | None] = []
        for index, (layer, value) in enumerate(
            zip(self.arch.layers, self.arch.init(generator, in_channels, 1, width), strict=True)
        ):
            if layer.projects:
                dense, inner = value
                self.register_parameter(f"dense{index}", nn.Parameter(dense))
                inner_name = self._register(layer.nonlinearity, index, inner)
                self._param_names.append((f"dense{index}", inner_name))
            else:
                self._param_names.append(self._register(layer, index, value))
        self.readout = nn.Linear(width, num_classes)

    def _register(self, layer: Layer, index: int, value: torch.Tensor | None) -> str | None:
        """Register a layer's weights: a trained parameter (convolutions) or a fixed
        buffer (the Gaussian layers' phases), named ``<param_name><index>``."""
        if value is None:
            return None
        name = f"{layer.param_name}{index}"
        if layer.trains:
            self.register_parameter(name, nn.Parameter(value))
        else:
            self.register_buffer(name, value)
        return name

    def layer_params(self) -> list:
        """The per-layer parameters in the order ``Serial.apply`` takes them."""

        def get(name: str | None) -> torch.Tensor | None:
            return None if name is None else getattr(self, name)

        return [
            (get(name[0]), get(name[1])) if isinstance(name, tuple) else get(name)
            for name in self._param_names
        ]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, width)`` features of NCHW images, after the final projection's layer."""
        return self.arch.apply(x, self.layer_params())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.readout(self.features(x))


def build_model(
    model: str,
    num_classes: int,
    in_channels: int,
    *,
    width: int = 64,
    activation: str = "relu",
    gamma: float = 1.0,
    seed: int = 0,
) -> nn.Module:
    """A freshly initialised ``model`` (``resnet18`` or a registered Myrtle
    architecture, :data:`~neural_kernels.catalog.MYRTLE_STAGES`), seeded by ``seed``.

    The global torch RNG (which torchvision's initialisers use) is forked, so the
    caller's random state is left untouched.
    """
    if model != "resnet18":
        MYRTLE_STAGES.lookup(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if model == "resnet18":
            return resnet18(num_classes, in_channels)
        generator = torch.Generator().manual_seed(seed)
        return MyrtleNetwork(
            model,
            num_classes,
            width=width,
            in_channels=in_channels,
            activation=activation,
            gamma=gamma,
            generator=generator,
        )


# ------------------------------------------------------------------ data and augmentation


@dataclass(frozen=True)
class Augmentation:
    """The thesis's light augmentation: RandomCrop(crop) + RandomHorizontalFlip.

    ``train`` draws, per image, a crop position (uniform over every ``crop x crop``
    window, no padding, as ``torchvision.transforms.v2.RandomCrop(crop)``) and, with
    ``flip``, a mirror with probability 1/2 (``RandomHorizontalFlip()``), from its own
    generator; it is one gather on the device. (torchvision's batched transforms draw
    one crop for a whole batch; per-image calls would cost a Python loop per image.)
    ``eval`` is ``CenterCrop(crop)`` (torchvision's), deterministic. Without ``crop``
    both keep the full image; batches are uint8 NHWC in, uint8 NCHW out.
    """

    crop: int | None = None
    flip: bool = False

    def check(self, shape: tuple[int, ...], where: str) -> tuple[int, int]:
        """The ``(height, width)`` after cropping images of ``shape`` (H, W, C)."""
        height, width = shape[0], shape[1]
        if self.crop is None:
            return height, width
        if self.crop > min(height, width):
            raise NeuralKernelsError(
                f"{where} has images of {'x'.join(map(str, shape))} (H x W x C), smaller "
                f"than the crop {self.crop}x{self.crop}; choose a crop of at most "
                f"{min(height, width)} or no crop (crop: null, or leave out --crop)"
            )
        return self.crop, self.crop

    def train(self, batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Randomly cropped and flipped copies of a uint8 NHWC batch, NCHW."""
        n, height, width = batch.shape[:3]
        if self.crop is None and not self.flip:
            return batch.permute(0, 3, 1, 2)
        size_h, size_w = self.check(tuple(batch.shape[1:]), "the batch")
        top = torch.randint(0, height - size_h + 1, (n,), generator=generator)
        left = torch.randint(0, width - size_w + 1, (n,), generator=generator)
        mirror = (
            torch.rand(n, generator=generator) < 0.5 if self.flip else torch.zeros(n, dtype=bool)
        )
        top, left, mirror = (t.to(batch.device) for t in (top, left, mirror))
        ar_h = torch.arange(size_h, device=batch.device)
        ar_w = torch.arange(size_w, device=batch.device)
        rows = top[:, None] + ar_h
        cols = left[:, None] + torch.where(mirror[:, None], size_w - 1 - ar_w, ar_w)
        index = torch.arange(n, device=batch.device)[:, None, None]
        return batch[index, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)

    def eval(self, batch: torch.Tensor) -> torch.Tensor:
        """The centre crop (or the whole image) of a uint8 NHWC batch, NCHW."""
        batch = batch.permute(0, 3, 1, 2)
        if self.crop is None:
            return batch
        return TF.center_crop(batch, [self.crop, self.crop])


@dataclass
class Split:
    """One split held as a uint8 NHWC tensor (on the device when it fits) and labels."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, rows: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Images ``(B, H, W, C)`` uint8 and labels of ``rows``, on ``device``."""
        rows = rows.to(self.images.device)
        images, labels = self.images[rows], self.labels[rows]
        non_blocking = device.type == "cuda"
        return (
            images.to(device, non_blocking=non_blocking),
            labels.to(device, non_blocking=non_blocking),
        )


def load_splits(data_dir: Path, device: torch.device) -> tuple[dict[str, Split], dict]:
    """The train/val/test splits of a prepared dataset, and its ``meta.json``."""
    meta = load_meta(data_dir)
    splits = {}
    total = 0
    raw = {}
    for split in ("train", "val", "test"):
        data = load_split(data_dir, split, mmap=False)
        if data.images.dtype != np.uint8 or data.images.ndim != 4:
            raise DataError(
                f"{data_dir}/{split}_images.npy: expected uint8 (N, H, W, C), got "
                f"{data.images.dtype} {data.images.shape}"
            )
        if len(data.labels) == 0:
            raise DataError(f"{data_dir}: the {split} split is empty; networks need all three")
        labels_file = f"{data_dir}/{split}_labels.npy"
        check_labels(data.labels, labels_file, int(meta["num_classes"]))
        if split == "train":
            check_classes(data.labels, labels_file)
        raw[split] = data
        total += data.images.nbytes
    store = device if device.type == "cuda" and total <= DEVICE_DATA_BYTES else torch.device("cpu")
    for split, data in raw.items():
        images = torch.from_numpy(np.ascontiguousarray(data.images))
        splits[split] = Split(images.to(store), torch.from_numpy(data.labels).long().to(store))
    return splits, meta


def channel_stats(
    images: torch.Tensor, chunk_entries: int = 2**24
) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation of uint8 NHWC images scaled to [0, 1].

    Pixel sums and sums of squares are exact (int64), accumulated in chunks of about
    ``chunk_entries`` pixels on the images' device.
    """
    channels = images.shape[-1]
    rows = max(1, chunk_entries // max(1, images[0].numel()))
    total = torch.zeros(channels, dtype=torch.int64, device=images.device)
    squares = torch.zeros(channels, dtype=torch.int64, device=images.device)
    for start in range(0, len(images), rows):
        x = images[start : start + rows].reshape(-1, channels).long()
        total += x.sum(0)
        squares += x.square().sum(0)
    count = images.numel() // channels
    mean = total.cpu().double() / (255.0 * count)
    var = squares.cpu().double() / (255.0**2 * count) - mean.square()
    return mean.tolist(), var.clamp_min(0.0).sqrt().clamp_min(1e-6).tolist()


class Normalizer:
    """uint8 NCHW -> float ``(x / 255 - mean) / std`` per channel, in a given memory format."""

    def __init__(
        self, mean: list[float], std: list[float], device: torch.device, channels_last: bool
    ):
        std_t = torch.tensor(std, dtype=torch.float32, device=device).reshape(1, -1, 1, 1)
        mean_t = torch.tensor(mean, dtype=torch.float32, device=device).reshape(1, -1, 1, 1)
        self.scale = 1.0 / (255.0 * std_t)
        self.shift = -mean_t / std_t
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        x = batch.to(torch.float32).contiguous(memory_format=self.memory_format)
        return x.mul_(self.scale).add_(self.shift)


def train_batches(order: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """``order`` in consecutive batches; a trailing batch of one joins the previous one.

    (Batch normalisation cannot train on a single image.)
    """
    batches = list(order.split(batch_size))
    if len(batches) > 1 and len(batches[-1]) == 1:
        batches[-2:] = [torch.cat(batches[-2:])]
    return batches


# ----------------------------------------------------------------------------- training


def lr_factor(step: int, total: int, schedule: str) -> float:
    """The learning-rate multiplier after ``step`` of ``total`` optimiser steps."""
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))
    return STEP_FACTOR ** sum(step >= round(m * total) for m in STEP_MILESTONES)


@contextlib.contextmanager
def _deterministic(enabled: bool, device: torch.device) -> Iterator[None]:
    """``torch.use_deterministic_algorithms(enabled)`` for a block, restored afterwards.

    cuDNN autotuning (``benchmark``) is on only when not deterministic.
    """
    previous = torch.are_deterministic_algorithms_enabled()
    benchmark = torch.backends.cudnn.benchmark
    try:
        if enabled:
            if device.type == "cuda":
                os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            # On CUDA a few backward kernels (ResNet's adaptive average pool) have no
            # deterministic version: warn there instead of failing.
            torch.use_deterministic_algorithms(True, warn_only=device.type == "cuda")
            torch.backends.cudnn.benchmark = False
        elif device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        yield
    finally:
        torch.use_deterministic_algorithms(previous)
        torch.backends.cudnn.benchmark = benchmark


def _amp_dtype(device: torch.device) -> torch.dtype | None:
    """bf16 autocast on GPUs that support it, fp16 on older ones, none on the CPU."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def evaluate(
    model: nn.Module,
    split: Split,
    augment: Augmentation,
    normalize: Normalizer,
    device: torch.device,
    batch_size: int,
    amp: torch.dtype | None = None,
) -> float:
    """Accuracy of ``model`` on ``split`` (centre-cropped, in eval mode)."""
    model.eval()
    correct = torch.zeros((), dtype=torch.int64, device=device)
    with torch.no_grad(), torch.autocast(device.type, dtype=amp, enabled=amp is not None):
        for rows in torch.arange(len(split)).split(batch_size):
            images, labels = split.batch(rows, device)
            logits = model(normalize(augment.eval(images)))
            correct += (logits.argmax(1) == labels).sum()
    return correct.item() / len(split)


def _rng_states(generators: dict[str, torch.Generator]) -> dict:
    states = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
        **{name: g.get_state() for name, g in generators.items()},
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(states: dict, generators: dict[str, torch.Generator]) -> None:
    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])
    for name, g in generators.items():
        g.set_state(states[name])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _save_atomic(obj: object, path: Path) -> None:
    partial = path.with_name(path.name + ".partial")
    torch.save(obj, partial)
    os.replace(partial, path)


def _cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.detach().to("cpu", copy=True) for key, value in model.state_dict().items()}


@dataclass
class TrainState:
    """What a checkpoint restores: weights, optimiser, schedule, loss scaler, RNGs."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    generators: dict[str, torch.Generator]

    def state_dict(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": _rng_states(self.generators),
        }

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        _set_rng_states(state["rng"], self.generators)


def train_epoch(
    state: TrainState,
    split: Split,
    augment: Augmentation,
    normalize: Normalizer,
    batch_size: int,
    device: torch.device,
    amp: torch.dtype | None = None,
    desc: str = "epoch",
    progress: bool = True,
) -> dict:
    """One pass of SGD over ``split`` in a seeded random order, one step per batch.

    Returns the mean training loss, the accuracy on the (augmented) training batches
    as they were seen, and the seconds it took.
    """
    started = time.perf_counter()
    state.model.train()
    order = torch.randperm(len(split), generator=state.generators["order"])
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    batches = train_batches(order, batch_size)
    for rows in tqdm(batches, desc=desc, unit="batch", disable=not progress, mininterval=1.0):
        images, labels = split.batch(rows, device)
        x = normalize(augment.train(images, state.generators["augment"]))
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            logits = state.model(x)
        loss = F.cross_entropy(logits.float(), labels)
        state.optimizer.zero_grad(set_to_none=True)
        state.scaler.scale(loss).backward()
        state.scaler.step(state.optimizer)
        state.scaler.update()
        state.scheduler.step()
        loss_sum += loss.detach() * len(rows)
        correct += (logits.detach().argmax(1) == labels).sum()
    train_loss = loss_sum.item() / len(split)  # .item() waits for the device
    return {
        "train_loss": train_loss,
        "train_accuracy": correct.item() / len(split),
        "train_seconds": time.perf_counter() - started,
    }


def fit_split(splits: dict[str, Split]) -> Split:
    """The train split followed by the validation split: the refit's training set."""
    parts = [splits[name] for name in REFIT_SPLITS]
    return Split(torch.cat([p.images for p in parts]), torch.cat([p.labels for p in parts]))


#: What metrics.json says of the protocol (see the module docstring).
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


def _new_state(
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
    amp = _amp_dtype(run_device)
    channels_last = run_device.type == "cuda"
    state = _new_state(settings, data, len(fit), run_device, amp, channels_last)
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
    _save_atomic(checkpoint | run.state.state_dict(), run.checkpoint_path)
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
    with _deterministic(run.settings.deterministic, run.device):
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
                "state_dict": _cpu_state(run.state.model),
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
