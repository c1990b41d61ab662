"""One epoch of SGD and the evaluation of a model: the schedule, mixed precision on
CUDA, deterministic algorithms, and the state a checkpoint restores."""

from __future__ import annotations

import contextlib
import math
import os
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from neural_kernels.networks.data import Augmentation, Normalizer, Split, train_batches

#: ``schedule: step`` multiplies the learning rate by ``STEP_FACTOR`` at these shares of
#: the training steps (the usual ResNet recipe: / 10 at 50% and 75%).
STEP_MILESTONES = (0.5, 0.75)
STEP_FACTOR = 0.1


def lr_factor(step: int, total: int, schedule: str) -> float:
    """The learning-rate multiplier after ``step`` of ``total`` optimiser steps."""
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))
    return STEP_FACTOR ** sum(step >= round(m * total) for m in STEP_MILESTONES)


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool, device: torch.device) -> Iterator[None]:
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


def amp_dtype(device: torch.device) -> torch.dtype | None:
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


def save_atomic(obj: object, path: Path) -> None:
    partial = path.with_name(path.name + ".partial")
    torch.save(obj, partial)
    os.replace(partial, path)


def cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
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
