"""A fitted ZCA whitening map: its parameters, saved and loaded as ``transform.npz``,
and applied in row blocks (:func:`zca_apply`). :mod:`.fit` fits it; see the package
docstring for the two variants.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from numpy.typing import NDArray
from tqdm.auto import tqdm

from neural_kernels.errors import DataError
from neural_kernels.settings import ZCA_BLOCK_BYTES

#: ``eps`` of each variant unless told: the thesis's is added to singular values of
#: [0, 1]-scaled pixels; Shankar et al.'s eigenvalue bias for CIFAR-10 is 1e-5.
DEFAULT_EPS = {"thesis": 0.1, "shankar": 1e-5}


@dataclass
class ZCATransform:
    """A fitted whitening map ``x -> (x' - mean) V diag(scales) V^T + c (residual)``.

    ``x'`` is the flattened image after the variant's per-image step, ``V`` is
    ``components`` (``P x k``, orthonormal columns) and ``c`` is ``complement_scale``
    applied to the part of ``x' - mean`` orthogonal to ``V`` (0: projected out).
    """

    variant: str
    solver: str
    eps: float
    image_shape: tuple[int, int, int]
    n_samples: int
    mean: NDArray[np.float64]
    components: NDArray[np.float64]
    singular_values: NDArray[np.float64]
    scales: NDArray[np.float64]
    complement_scale: float

    @property
    def rank(self) -> int:
        return self.components.shape[1]

    def save(self, path: Path | str) -> None:
        """Write the transform as an ``.npz`` that :meth:`load` reads back."""
        fields = asdict(self)
        fields["image_shape"] = np.asarray(self.image_shape)
        with open(path, "wb") as handle:
            np.savez(handle, **fields)

    @classmethod
    def load(cls, path: Path | str) -> ZCATransform:
        """Read a transform written by :meth:`save`."""
        try:
            with np.load(path, allow_pickle=False) as data:
                return cls(
                    variant=str(data["variant"]),
                    solver=str(data["solver"]),
                    eps=float(data["eps"]),
                    image_shape=tuple(int(v) for v in data["image_shape"]),
                    n_samples=int(data["n_samples"]),
                    mean=data["mean"],
                    components=data["components"],
                    singular_values=data["singular_values"],
                    scales=data["scales"],
                    complement_scale=float(data["complement_scale"]),
                )
        except (OSError, KeyError, ValueError) as error:
            raise DataError(f"{path} is not a ZCA transform written by zca ({error})") from None


def default_block_rows(n_features: int) -> int:
    """Rows per block so that one float32 block is about 256 MiB."""
    return max(1, ZCA_BLOCK_BYTES // (4 * n_features))


#: Fewest images a ZCA fit takes: one image minus the mean is zero.
MIN_FIT_IMAGES = 2


def check_images(images: NDArray, name: str) -> tuple[int, int, int]:
    if images.ndim != 4:
        raise DataError(f"{name}: expected images (N, H, W, C), got shape {images.shape}")
    if images.dtype != np.uint8 and not np.issubdtype(images.dtype, np.floating):
        raise DataError(f"{name}: expected uint8 or float images, got dtype {images.dtype}")
    return tuple(int(v) for v in images.shape[1:])


def per_image_rows(
    block: NDArray, variant: str, device: torch.device, dtype: torch.dtype, name: str
) -> torch.Tensor:
    """Flatten a block of images to rows, scale uint8 to [0, 1], apply the variant's step.

    ``shankar``: subtract each row's mean and divide by its L2 norm (an all-constant
    image becomes all zeros). Raises on NaN or infinite values.
    """
    rows = torch.from_numpy(np.array(block)).to(device).reshape(len(block), -1)
    scaled = rows.to(dtype) / 255.0 if rows.dtype == torch.uint8 else rows.to(dtype)
    if not torch.isfinite(scaled).all():
        raise DataError(f"{name}: images contain NaN or infinite values; clean them before ZCA")
    if variant == "shankar":
        scaled = scaled - scaled.mean(dim=1, keepdim=True)
        norms = scaled.norm(dim=1, keepdim=True)
        scaled = scaled / torch.where(norms > 0, norms, torch.ones_like(norms))
    return scaled


def zca_apply(
    transform: ZCATransform,
    images: NDArray,
    *,
    out: NDArray[np.float32] | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    block_rows: int | None = None,
    name: str = "images",
) -> NDArray[np.float32]:
    """Whiten ``images`` ``(N, H, W, C)`` with a fitted transform, in row blocks.

    Returns float32 images of the same shape, written into ``out`` (e.g. an
    ``open_memmap``) when given.
    """
    image_shape = check_images(images, name)
    if image_shape != tuple(transform.image_shape):
        raise DataError(
            f"{name}: images of shape {image_shape} cannot be whitened by a transform "
            f"fitted on images of shape {tuple(transform.image_shape)}"
        )
    device = torch.device(device)
    if out is None:
        out = np.empty(images.shape, dtype=np.float32)
    p = math.prod(image_shape)
    block_rows = block_rows or default_block_rows(p)
    mean = torch.as_tensor(transform.mean, device=device, dtype=dtype)
    v = torch.as_tensor(transform.components, device=device, dtype=dtype)
    scales = torch.as_tensor(transform.scales, device=device, dtype=dtype)
    for start in tqdm(
        range(0, len(images), block_rows), desc=f"zca apply {name}", unit="block", mininterval=1.0
    ):
        block = images[start : start + block_rows]
        rows = per_image_rows(block, transform.variant, device, dtype, name) - mean
        coords = rows @ v
        white = (coords * scales) @ v.T
        if transform.complement_scale:
            white += transform.complement_scale * (rows - coords @ v.T)
        out[start : start + len(rows)] = white.reshape(len(rows), *image_shape).cpu().numpy()
    return out
