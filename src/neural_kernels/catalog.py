"""The architectures that configs, the CLI and the report name: the registry.

Torch-free on purpose: the CLI lists these names in its options, and a job that needs
no torch (prepare, subset, report) should not pay for importing it. A Myrtle-style
architecture is its convolutions per stage; :func:`neural_kernels.architectures.myrtle`
builds the layers (both the finite network and its kernel) from that.
"""

from __future__ import annotations

from neural_kernels.settings import Registry

#: Convolutions per stage (a 2x2 average pool between stages, a global one at the end).
#: Myrtle5/7/10 are Shankar et al.'s; Myrtle11 (64x64) and Myrtle15 (224x224) are this
#: project's reconstruction: the thesis names them without defining them.
MYRTLE_STAGES: Registry = Registry("architecture")
#: The architectures the thesis names without defining them (ours, see above).
RECONSTRUCTED: list[str] = []


def register_architecture(
    name: str, stages: tuple[int, ...], *, reconstructed: bool = False
) -> tuple[int, ...]:
    """Register a Myrtle-style architecture: ``stages[s]`` convolutions in stage ``s``.

    Every registered name is accepted by ``neural-kernels kernel*``/``train`` at once;
    a config needs it in the schema's ``arch``/``model`` enums too
    (``tests/test_settings.py`` fails until it is there).
    """
    if not stages or min(stages) < 1:
        raise ValueError(f"{name}: every stage needs at least one convolution, got {stages}")
    if reconstructed:
        RECONSTRUCTED.append(name)
    return MYRTLE_STAGES.register(name, tuple(stages))


register_architecture("myrtle5", (2, 1, 1))
register_architecture("myrtle7", (2, 2, 2))
register_architecture("myrtle10", (3, 3, 3))
register_architecture("myrtle11", (3, 3, 3, 1), reconstructed=True)
register_architecture("myrtle15", (3, 3, 3, 2, 2, 1), reconstructed=True)
