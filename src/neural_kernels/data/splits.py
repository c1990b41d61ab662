"""Seeded, class-stratified splits and class-balanced subsets (index arithmetic only)."""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from neural_kernels.errors import DataError


def stratified_holdout(
    labels: NDArray[np.integer], fraction: float, seed: int
) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """Split ``range(len(labels))`` into (kept, held out) with ``fraction`` held out.

    Class proportions are kept in both parts (scikit-learn's stratified
    ``train_test_split``); both index arrays come back in a seeded random order.
    """
    if not 0.0 < fraction < 1.0:
        raise DataError(f"a held-out fraction must lie strictly between 0 and 1, got {fraction}")
    from sklearn.model_selection import train_test_split  # lazily: a second to import

    indices = np.arange(len(labels), dtype=np.int64)
    try:
        kept, held = train_test_split(
            indices, test_size=fraction, stratify=labels, random_state=seed, shuffle=True
        )
    except ValueError as error:
        counts = np.bincount(labels)
        raise DataError(
            f"cannot hold out {fraction:.3g} of {len(labels)} images stratified by class "
            f"(smallest class has {counts[counts > 0].min()} images): {error}. Use a "
            f"larger fraction or more images per class."
        ) from None
    return kept, held


def balanced_subset(labels: NDArray[np.integer], size: int, seed: int) -> NDArray[np.int64]:
    """Indices of a random subset of ``size`` images with equal counts per class.

    Each of the C classes present gets ``size // C`` images; the ``size % C`` left over
    go to distinct randomly chosen classes. The result is in a seeded random order.
    """
    classes = np.unique(labels)
    if size < len(classes):
        raise DataError(
            f"a class-balanced subset of {size} images needs at least one image of each "
            f"of the {len(classes)} classes; choose a size >= {len(classes)}"
        )
    rng = np.random.default_rng(seed)
    per_class = np.full(len(classes), size // len(classes))
    per_class[rng.choice(len(classes), size % len(classes), replace=False)] += 1
    chosen = []
    for cls, count in zip(classes, per_class, strict=True):
        members = np.flatnonzero(labels == cls)
        if len(members) < count:
            raise DataError(
                f"class {cls} has {len(members)} training images, fewer than the "
                f"{count} a balanced subset of {size} needs; choose a smaller size"
            )
        chosen.append(rng.choice(members, count, replace=False))
    return rng.permutation(np.concatenate(chosen)).astype(np.int64)
