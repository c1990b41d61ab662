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

from neural_kernels.architectures.layers import (
    ACTIVATIONS,
    AvgPool,
    Conv,
    Gaussian,
    GlobalAvgPool,
    Layer,
    Project,
    Relu,
)
from neural_kernels.architectures.serial import (
    Serial,
    conv_input_covariance,
    input_covariance,
    myrtle,
    self_input_covariance,
    spec_network,
)

__all__ = [
    "ACTIVATIONS",
    "AvgPool",
    "Conv",
    "Gaussian",
    "GlobalAvgPool",
    "Layer",
    "Project",
    "Relu",
    "Serial",
    "conv_input_covariance",
    "input_covariance",
    "myrtle",
    "self_input_covariance",
    "spec_network",
]
