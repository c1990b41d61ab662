"""The layers of a Myrtle network: each knows its finite-width forward pass and its
infinite-width kernel map (see the package docstring for the conventions), and the
activations by name."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from neural_kernels.errors import NeuralKernelsError
from neural_kernels.registry import Registry

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


def position_diagonal(k: Tensor) -> Tensor:
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


#: The nonlinearities by name: each builds its layer from ``gamma`` (used by the
#: Gaussian only). A new activation is a :class:`Layer` with a finite ``apply`` and its
#: kernel map, registered here (``ACTIVATIONS.register(name, factory)``).
ACTIVATIONS: Registry = Registry("activation")
ACTIVATIONS.register("relu", lambda gamma: Relu())
ACTIVATIONS.register("gaussian", Gaussian)
