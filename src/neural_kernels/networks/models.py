"""The trained baselines' models: torchvision's ResNet18 and a finite Myrtle network
with a trained readout (see the package docstring)."""

from __future__ import annotations

import torch
from torch import nn

from neural_kernels.architectures import Layer, myrtle
from neural_kernels.catalog import MYRTLE_STAGES


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
