"""A prepared dataset as the training loop reads it: splits held as uint8 tensors (on
the GPU when they fit), the random crops and flips, the per-channel normalisation and
the shuffled batches."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torchvision.transforms.v2 import functional as TF

from neural_kernels.checks import check_classes, check_labels
from neural_kernels.data.prepared import REFIT_SPLITS, load_meta, load_split
from neural_kernels.errors import DataError, NeuralKernelsError

log = logging.getLogger(__name__)

#: Datasets up to this size (uint8 bytes, all splits) are copied to the GPU once;
#: larger ones stay in host memory and are sent batch by batch.
DEVICE_DATA_BYTES = 8 * 2**30


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


def fit_split(splits: dict[str, Split]) -> Split:
    """The train split followed by the validation split: the refit's training set."""
    parts = [splits[name] for name in REFIT_SPLITS]
    return Split(torch.cat([p.images for p in parts]), torch.cat([p.labels for p in parts]))


#: What metrics.json says of the protocol (see the module docstring).
