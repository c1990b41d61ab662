"""The architecture and activation names that configs and the CLI accept.

Torch-free on purpose: the CLI builds its argument parser from these, and a job that
needs no torch (prepare, subset, report) should not pay for importing it.
"""

from __future__ import annotations

#: Convolutions per stage (a 2x2 average pool between stages, a global one at the end).
#: Myrtle5/7/10 are Shankar et al.'s; Myrtle11 (64x64) and Myrtle15 (224x224) are this
#: project's reconstruction: the thesis names them without defining them.
MYRTLE_STAGES: dict[str, tuple[int, ...]] = {
    "myrtle5": (2, 1, 1),
    "myrtle7": (2, 2, 2),
    "myrtle10": (3, 3, 3),
    "myrtle11": (3, 3, 3, 1),
    "myrtle15": (3, 3, 3, 2, 2, 1),
}
#: The architectures the thesis names without defining them (ours, see above).
RECONSTRUCTED = ("myrtle11", "myrtle15")
#: Nonlinearities: ReLU (arc-cosine kernel) and Shankar et al.'s "Gaussian" (exp).
ACTIVATIONS = ("relu", "gaussian")
