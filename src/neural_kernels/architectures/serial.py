"""A network as a list of layers (:class:`Serial`): its random features and its kernel
from one definition, and the Myrtle networks of the catalog."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from neural_kernels.architectures.layers import (
    ACTIVATIONS,
    AvgPool,
    Conv,
    GlobalAvgPool,
    Layer,
    Project,
    Tensor,
    position_diagonal,
)
from neural_kernels.catalog import MYRTLE_STAGES
from neural_kernels.errors import NeuralKernelsError

if TYPE_CHECKING:
    from neural_kernels.settings import KernelSpec


def input_covariance(x: Tensor, y: Tensor) -> Tensor:
    """``k[a, b, i, j, k, l] = (1/C) sum_c x[a, i, j, c] y[b, k, l, c]`` of NHWC images."""
    return torch.einsum("aijc,bklc->abijkl", x, y) / x.shape[-1]


def _patches(x: Tensor) -> Tensor:
    """3x3 zero-padded patches of NHWC images: ``(N, C * 9, H * W)``."""
    return F.unfold(x.permute(0, 3, 1, 2), kernel_size=3, padding=1)


def conv_input_covariance(x: Tensor, y: Tensor) -> Tensor:
    """``Conv().kernel(input_covariance(x, y))`` in one matrix product of 3x3 patches.

    ``k[a, b, p, q] = (1 / 9C) <patch_x(p), patch_y(q)>``, shaped ``(A, B, H, W, H, W)``.
    """
    a, h, w, c = x.shape
    px = _patches(x).transpose(1, 2).reshape(a * h * w, -1)
    py = _patches(y).transpose(1, 2).reshape(len(y) * h * w, -1)
    k = (px @ py.T).div_(9 * c).reshape(a, h, w, len(y), h, w)
    return k.permute(0, 3, 1, 2, 4, 5).contiguous()


def self_input_covariance(x: Tensor) -> Tensor:
    """The input covariance of each image with itself, ``(N, 1, H, W, H, W)``."""
    return (torch.einsum("aijc,aklc->aijkl", x, x) / x.shape[-1]).unsqueeze(1)


@dataclass(frozen=True)
class Serial:
    """A network as a sequence of layers; ``name`` is what configs and files call it."""

    name: str
    layers: tuple[Layer, ...]
    stages: tuple[int, ...] = field(default=())

    @property
    def min_image_size(self) -> int:
        """The smallest input side for which every pooled map is at least 1x1."""
        return math.prod(layer.pools for layer in self.layers)

    def check_image_size(self, height: int, width: int) -> None:
        """Raise a clear error if ``height x width`` images are too small for the pools."""
        if min(height, width) < self.min_image_size:
            raise NeuralKernelsError(
                f"{self.name} pools {self.min_image_size.bit_length() - 1} times and needs "
                f"images of at least {self.min_image_size}x{self.min_image_size}; got "
                f"{height}x{width}. Pick a shallower architecture or larger images."
            )

    @property
    def final(self) -> Project | None:
        """The final :class:`Project` layer, if the network ends with one."""
        return self.layers[-1] if self.layers and self.layers[-1].projects else None

    @property
    def head(self) -> tuple[Layer, ...]:
        """The layers whose outputs are the random features (all but a final Project)."""
        return self.layers[:-1] if self.final is not None else self.layers

    def init(self, generator: torch.Generator, in_channels: int, networks: int, width: int) -> list:
        """Parameters of ``networks`` independent networks of ``width`` channels each."""
        params = []
        c_in, shared = in_channels, True
        for layer in self.layers:
            params.append(layer.init(generator, c_in, networks, width, shared))
            if layer.sets_width:
                c_in, shared = width, False
        return params

    def apply(self, x: Tensor, params: Sequence, *, project: bool = True) -> Tensor:
        """Features ``(B, networks * width)`` of NCHW images ``x``.

        With ``project=False`` a final :class:`Project` is skipped and the features are
        the globally pooled activations: the estimator applies the projection's exact
        infinite-width map to the normalised Gram matrix of every network at once.
        """
        layers = self.layers if project else self.head
        for layer, p in zip(layers, params, strict=False):
            x = layer.apply(x, p)
        return x.flatten(1)

    def kernel(
        self,
        k: Tensor,
        stds_x: Sequence[Tensor] | None = None,
        stds_y: Sequence[Tensor] | None = None,
        *,
        float64_from: int | None = None,
        start: int = 0,
    ) -> tuple[Tensor, list[Tensor]]:
        """Propagate an input covariance through every layer's kernel map.

        Cross mode (``stds_x``/``stds_y`` given, one ``(A, H, W)``/``(B, H, W)`` tensor
        per layer with ``needs_std``, as returned in self mode): ``k`` is
        ``(A, B, H, W, H, W)``. Self mode (both ``None``): ``k`` is
        ``(N, 1, H, W, H, W)``, each image with itself, and the standard deviations are
        read off its diagonal. Returns the ``(A, B)`` kernel and the standard deviations
        used. Layers from index ``float64_from`` on run in float64. ``start`` skips
        leading layers already applied (see :func:`conv_input_covariance`).
        """
        used: list[Tensor] = []
        self_mode = stds_x is None
        for index, layer in enumerate(self.layers):
            if index < start:
                continue
            if float64_from is not None and index == float64_from:
                k = k.double()
            sx = sy = None
            if layer.needs_std:
                if self_mode:
                    std = position_diagonal(k).clamp_min(0.0).sqrt()
                    sx, sy = std[:, None, :, :, None, None], std[:, None, None, None, :, :]
                else:
                    std = stds_x[len(used)].to(k.dtype)
                    sx = std[:, None, :, :, None, None]
                    sy = stds_y[len(used)].to(k.dtype)[None, :, None, None, :, :]
                used.append(std)
            k = layer.kernel(k, sx, sy)
        return k.reshape(k.shape[0], k.shape[1]), used

    def cross_kernel(
        self,
        x: Tensor,
        y: Tensor,
        stds_x: Sequence[Tensor],
        stds_y: Sequence[Tensor],
        *,
        float64_from: int | None = None,
    ) -> Tensor:
        """The ``(A, B)`` kernel of NHWC images ``x`` and ``y`` given their self stds.

        A leading :class:`Conv` is fused with the input covariance into one matrix
        product of patches (:func:`conv_input_covariance`).
        """
        if self.layers and self.layers[0].patch_conv:
            k, start = conv_input_covariance(x, y), 1
        else:
            k, start = input_covariance(x, y), 0
        return self.kernel(k, stds_x, stds_y, float64_from=float64_from, start=start)[0]

    def self_kernel(
        self, x: Tensor, *, float64_from: int | None = None
    ) -> tuple[Tensor, list[Tensor]]:
        """``k(x, x)`` of each image ``(N,)`` and its per-layer stds (see :meth:`kernel`)."""
        k, stds = self.kernel(self_input_covariance(x), float64_from=float64_from)
        return k[:, 0], stds

    @property
    def last_stage_start(self) -> int:
        """Index of the first layer after the last 2x2 pool (Shankar et al.'s float64 part)."""
        pools = [i for i, layer in enumerate(self.layers) if layer.pools > 1]
        return pools[-1] + 1 if pools else 0


def myrtle(name: str, activation: str = "relu", gamma: float = 1.0) -> Serial:
    """The Myrtle network ``name`` (see :data:`~neural_kernels.catalog.MYRTLE_STAGES`)
    with ``activation`` (see :data:`ACTIVATIONS`).

    Stages of ``[Conv, activation] x c_s`` separated by 2x2 average pools, then a global
    average pool and the final :class:`Project` of the activation (Shankar et al.'s
    ``relu_project`` or ``exponential_shifted_project``, which gives ``k(x, x) = 1``).
    Generic in the image size.
    """
    stages = MYRTLE_STAGES.lookup(name)
    if not gamma > 0:
        raise NeuralKernelsError(f"gamma must be positive, got {gamma}")
    nonlinearity: Layer = ACTIVATIONS.lookup(activation)(gamma)
    layers: list[Layer] = []
    for index, convs in enumerate(stages):
        if index:
            layers.append(AvgPool())
        for _ in range(convs):
            layers += [Conv(), nonlinearity]
    layers += [GlobalAvgPool(), Project(nonlinearity)]
    return Serial(name, tuple(layers), stages)


def spec_network(spec: KernelSpec) -> Serial:
    """The network of a kernel's settings: :func:`myrtle` of its arch, activation and
    gamma."""
    return myrtle(spec.arch, spec.activation, spec.gamma)
