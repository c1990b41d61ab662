"""Seeds derived from other seeds (torch-free: the workflow derives them when it plans jobs)."""

from __future__ import annotations

import numpy as np


def derived_seed(*keys: int) -> int:
    """A seed in ``[0, 2^31)`` spawned from ``keys`` by NumPy's ``SeedSequence``.

    Different key tuples give independent streams (the order of the keys matters), so
    e.g. every subset's random networks differ from every other subset's:
    ``derived_seed(kernel seed, subset seed)``.
    """
    if any(key < 0 for key in keys):
        raise ValueError(f"seeds must be non-negative, got {keys}")
    return int(np.random.SeedSequence(list(keys)).generate_state(1)[0] >> 1)
