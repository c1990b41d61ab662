"""Myrtle networks as stax-style layer lists: one definition, two meanings.

Every layer knows its finite-width forward pass (``apply``, on a batch of
activations ``(B, n * c, H, W)`` of ``n`` independent networks side by side) and its
infinite-width kernel map (``kernel``, on the covariance tensor of image pairs).

Kernel convention (Shankar et al. 2020, "Neural Kernels Without Tangents"): the
covariance of two images ``x`` (``A`` of them) and ``y`` (``B``) is a tensor
``k[a, b, i, j, k, l]`` over every pair of positions ``(i, j)`` of ``x`` and
``(k, l)`` of ``y``. The input covariance is the channel mean of the pixel products
(:func:`input_covariance`); Shankar et al. sum over channels instead, which scales
every entry by the channel count ``C``. All maps below are positively homogeneous of
degree one, so the factor passes through and the final :class:`Project`, a function of
the cosine of the pooled kernel only, removes it.

Nonlinear maps need the variance of each image at each position, ``k(x, x)_{p, p}``;
they receive its square root as ``std_x`` (broadcastable to ``(A, 1, H, W, 1, 1)``)
and ``std_y`` (to ``(·, B, 1, 1, H, W)``), see :meth:`Serial.kernel`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from neural_kernels.catalog import MYRTLE_STAGES
from neural_kernels.errors import NeuralKernelsError
from neural_kernels.settings import Registry

Tensor = torch.Tensor

_TINY = 1e-30
_TINY_STD = 1e-150  # so that products of standard deviations stay positive


def _shift_sum(k: Tensor, first: int, second: int) -> Tensor:
    """Sum of ``k`` over the joint shifts ``(s, s)``, s in {-1, 0, 1}, of two axes.

    ``out[.., i, .., k, ..] = sum_s k[.., i + s, .., k + s, ..]`` with zeros outside the
    image (SAME padding), done as two in-place adds of shifted views.
    """
    n1, n2 = k.shape[first] - 1, k.shape[second] - 1
    out = k.clone()
    if n1 > 0 and n2 > 0:
        out.narrow(first, 0, n1).narrow(second, 0, n2).add_(
            k.narrow(first, 1, n1).narrow(second, 1, n2)
        )
        out.narrow(first, 1, n1).narrow(second, 1, n2).add_(
            k.narrow(first, 0, n1).narrow(second, 0, n2)
        )
    return out


def _position_diagonal(k: Tensor) -> Tensor:
    """``k[n, 0, i, j, i, j]`` of a self covariance ``(N, 1, H, W, H, W)`` -> ``(N, H, W)``."""
    n, _, h, w = k.shape[:4]
    return k.reshape(n, h * w, h * w).diagonal(dim1=1, dim2=2).reshape(n, h, w)


def _correlation(k: Tensor, std_x: Tensor, std_y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``r = k / (std_x std_y)`` clipped to [-1, 1], with the stds kept positive."""
    std_x, std_y = std_x.clamp_min(_TINY_STD), std_y.clamp_min(_TINY_STD)
    r = torch.mul(k, 1.0 / std_x).mul_(1.0 / std_y).clamp_(-1.0, 1.0)
    return r, std_x, std_y


def numpy_has_simd_asin() -> bool:
    """Whether NumPy's ``arcsin`` is vectorised here (its SVML loops need AVX512_SKX).

    Measured on 102,400 float32 cosines in [-1, 1], one core: with AVX512 (the CI
    machine) NumPy 73 us against torch 265; on an AVX2-only AMD EPYC NumPy falls back
    to a scalar loop, 1,384 us against torch's 262. ``False`` when NumPy does not say.
    """
    try:
        from numpy._core._multiarray_umath import __cpu_features__
    except ImportError:  # pragma: no cover - NumPy 1.x or a changed layout
        return False
    return bool(__cpu_features__.get("AVX512_SKX"))


_NUMPY_ASIN = numpy_has_simd_asin()


def _asin(r: Tensor) -> Tensor:
    """``arcsin(r)``: NumPy's where its SIMD loop exists (:func:`numpy_has_simd_asin`),
    torch's otherwise; the two agree to a unit in the last place."""
    if _NUMPY_ASIN and r.device.type == "cpu" and not r.requires_grad:
        return torch.from_numpy(np.arcsin(r.numpy()))
    return torch.asin(r)


class Layer:
    """A layer: ``init`` (its random weights), ``apply`` (the finite network) and
    ``kernel`` (its infinite-width map of the covariance tensor).

    :class:`Serial` asks a layer these attributes, never its class: ``needs_std``
    (``kernel`` takes the positions' standard deviations), ``pools`` (the factor it
    shrinks each image side by), ``sets_width`` (its output has ``width`` channels per
    network), ``patch_conv`` (a 3x3 convolution the input covariance can be fused with,
    see :func:`conv_input_covariance`), ``projects`` (the final projection, whose map
    the estimate applies exactly to the Gram matrix). A layer with weights says how a
    trained network keeps them: ``param_name`` (its prefix in a state dict) and
    ``trains`` (a trained parameter, or a fixed buffer). A new layer subclasses this (a
    frozen dataclass) and overrides what differs.
    """

    needs_std = False
    pools = 1
    sets_width = False
    patch_conv = False
    projects = False
    param_name = "weight"
    trains = True

    def init(
        self, generator: torch.Generator, c_in: int, networks: int, width: int, shared_input: bool
    ) -> object:
        """Weights of ``networks`` networks side by side (none by default)."""
        return None

    def apply(self, x: Tensor, params: object = None) -> Tensor:
        raise NotImplementedError

    def kernel(self, k: Tensor, std_x: Tensor | None = None, std_y: Tensor | None = None) -> Tensor:
        raise NotImplementedError


@dataclass(frozen=True)
class Conv(Layer):
    """3x3 convolution, SAME zero padding, no bias, weights ``N(0, 1 / (9 c_in))``.

    Kernel map: ``k'(p, q) = (1/9) sum_{|s|_inf <= 1} k(p + s, q + s)`` (Shankar et
    al.'s ``conv3zp``), the average over the 3x3 diagonal neighbourhood.
    """

    sets_width = True
    patch_conv = True
    param_name = "conv"

    def init(
        self, generator: torch.Generator, c_in: int, networks: int, width: int, shared_input: bool
    ) -> Tensor:
        """Weights ``(networks * width, c_in, 3, 3)``; a shared input feeds every network."""
        std = 1.0 / math.sqrt(9 * c_in)
        return torch.randn(networks * width, c_in, 3, 3, generator=generator) * std

    def apply(self, x: Tensor, weight: Tensor) -> Tensor:
        groups = x.shape[1] // weight.shape[1]
        return F.conv2d(x, weight.to(x.dtype), padding=1, groups=groups)

    def kernel(self, k: Tensor, std_x: Tensor | None = None, std_y: Tensor | None = None) -> Tensor:
        return _shift_sum(_shift_sum(k, 2, 4), 3, 5).div_(9.0)


@dataclass(frozen=True)
class Relu(Layer):
    """ReLU with He scale: finite ``sqrt(2) max(z, 0)``.

    Kernel map (arc-cosine of order one, Cho & Saul 2009):
    ``sqrt(kxx kyy) [sqrt(1 - r^2) / pi + r (1 - arccos(r) / pi)]``,
    ``r = k / sqrt(kxx kyy)`` clipped to [-1, 1]; it keeps ``k(x, x) = kxx``.
    """

    needs_std = True

    def apply(self, x: Tensor, params: None = None) -> Tensor:
        return math.sqrt(2.0) * torch.relu(x)

    def kernel(self, k: Tensor, std_x: Tensor, std_y: Tensor) -> Tensor:
        r, std_x, std_y = _correlation(k, std_x, std_y)
        out = _asin(r).add_(math.pi / 2).mul_(r)  # r (pi - arccos r)
        out.add_(r.square_().neg_().add_(1.0).sqrt_())  # + sqrt(1 - r^2)
        return out.mul_(std_x / math.pi).mul_(std_y)


@dataclass(frozen=True)
class Gaussian(Layer):
    """The "Gaussian" nonlinearity of Shankar et al. (``exponential_shifted``).

    Kernel map: ``sqrt(kxx kyy) exp(gamma (r - 1))``. Finite width: random Fourier
    features of the per-position normalised unit, ``nu sqrt(2) cos(sqrt(gamma) z / nu
    + b)`` with ``b ~ U[0, 2 pi)`` per channel and ``nu`` the root mean square of the
    network's channels at that position (an estimate of ``sqrt(kxx)`` that is exact
    only as the width grows), whose expectation over ``b`` and the weights is the map.
    """

    gamma: float = 1.0
    needs_std = True
    param_name = "phases"  # random, never trained
    trains = False

    def init(
        self, generator: torch.Generator, c_in: int, networks: int, width: int, shared_input: bool
    ) -> Tensor:
        if shared_input:
            raise NeuralKernelsError("a Gaussian layer must follow a convolution")
        return torch.rand(networks, c_in, generator=generator) * (2 * math.pi)

    def apply(self, x: Tensor, phases: Tensor) -> Tensor:
        b, channels, h, w = x.shape
        networks, per_net = phases.shape
        z = x.reshape(b, networks, per_net, h, w)
        nu = z.square().mean(dim=2, keepdim=True).sqrt().clamp_min(_TINY)
        phase = phases.to(x.dtype).reshape(1, networks, per_net, 1, 1)
        out = nu * math.sqrt(2.0) * torch.cos(math.sqrt(self.gamma) * z / nu + phase)
        return out.reshape(b, channels, h, w)

    def kernel(self, k: Tensor, std_x: Tensor, std_y: Tensor) -> Tensor:
        r, std_x, std_y = _correlation(k, std_x, std_y)
        return r.sub_(1.0).mul_(self.gamma).exp_().mul_(std_x).mul_(std_y)


@dataclass(frozen=True)
class AvgPool(Layer):
    """2x2 average pool, stride 2 (a trailing odd row or column is dropped).

    Kernel map: the mean of ``k`` over the 2x2 window of ``x`` times that of ``y``.
    """

    pools = 2

    def apply(self, x: Tensor, params: None = None) -> Tensor:
        return F.avg_pool2d(x, 2)

    def kernel(self, k: Tensor, std_x: Tensor | None = None, std_y: Tensor | None = None) -> Tensor:
        for dim in (2, 3, 4, 5):
            half = k.shape[dim] // 2
            k = k.narrow(dim, 0, 2 * half).unflatten(dim, (half, 2))
            k = k.select(dim + 1, 0) + k.select(dim + 1, 1)
        return k.div_(16.0)


@dataclass(frozen=True)
class GlobalAvgPool(Layer):
    """Mean over all positions; kernel map: mean of ``k`` over all position pairs."""

    def apply(self, x: Tensor, params: None = None) -> Tensor:
        return x.mean(dim=(2, 3), keepdim=True)

    def kernel(self, k: Tensor, std_x: Tensor | None = None, std_y: Tensor | None = None) -> Tensor:
        return k.mean(dim=(2, 3, 4, 5), keepdim=True)


@dataclass(frozen=True)
class Project(Layer):
    """The final map of Shankar et al.'s kernels: a nonlinearity of the pooled cosine.

    Kernel map: with ``r = k / sqrt(kxx kyy)`` (clipped to [-1, 1]) the cosine of the
    globally pooled kernel, ``k' = f(r)``, where ``f`` is ``nonlinearity``'s map at
    unit variances: for :class:`Relu`, ``relu_project``,
    ``f(r) = (sqrt(1 - r^2) + r (pi - arccos r)) / pi``; for :class:`Gaussian`,
    ``exponential_shifted_project``, ``f(r) = exp(gamma (r - 1))``. So ``k(x, x) = 1``.

    Finite width: each network's pooled features ``u`` (``width`` of them) are scaled
    to unit root mean square, ``u sqrt(width) / ||u||``, mixed by a dense layer
    ``width -> width`` with weights ``N(0, 1 / width)`` (a 1x1 convolution), and passed
    through the nonlinearity's finite apply. Each output is then a centred Gaussian of
    unit variance whose covariance between two images is ``r``, so as the dense
    layer's output width grows the features' mean product tends to ``f(r)``: the map
    above is the exact infinite-width limit of this dense layer + nonlinearity. The
    random-feature estimate therefore applies ``f`` to the normalised Gram matrix of
    all networks' pooled features together (see :mod:`neural_kernels.kernels.estimate`).
    """

    nonlinearity: Layer
    needs_std = True
    projects = True

    def init(
        self, generator: torch.Generator, c_in: int, networks: int, width: int, shared_input: bool
    ) -> tuple[Tensor, Tensor | None]:
        """Dense weights ``(networks * width, c_in, 1, 1)`` and the nonlinearity's own."""
        dense = torch.randn(networks * width, c_in, 1, 1, generator=generator) / math.sqrt(c_in)
        return dense, self.nonlinearity.init(generator, width, networks, width, False)

    def apply(self, x: Tensor, params: tuple[Tensor, Tensor | None]) -> Tensor:
        dense, inner = params
        b, channels = x.shape[:2]
        networks = channels // dense.shape[1]
        u = x.reshape(b, networks, -1)
        rms = u.square().mean(dim=2, keepdim=True).sqrt().clamp_min(_TINY)
        u = (u / rms).reshape(x.shape)
        z = F.conv2d(u, dense.to(x.dtype), groups=networks)
        return self.nonlinearity.apply(z, inner)

    def of_correlation(self, r: Tensor) -> Tensor:
        """``f(r)`` of a cosine ``r`` in [-1, 1] (in place where it can be)."""
        ones = torch.ones((), dtype=r.dtype, device=r.device)
        return self.nonlinearity.kernel(r, ones, ones)

    def kernel(self, k: Tensor, std_x: Tensor, std_y: Tensor) -> Tensor:
        r, _, _ = _correlation(k, std_x, std_y)
        return self.of_correlation(r)


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
                    std = _position_diagonal(k).clamp_min(0.0).sqrt()
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


#: The nonlinearities by name: each builds its layer from ``gamma`` (used by the
#: Gaussian only). A new activation is a :class:`Layer` with a finite ``apply`` and its
#: kernel map, registered here (``ACTIVATIONS.register(name, factory)``).
ACTIVATIONS: Registry = Registry("activation")
ACTIVATIONS.register("relu", lambda gamma: Relu())
ACTIVATIONS.register("gaussian", Gaussian)


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
