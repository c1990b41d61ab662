"""The files of a kernel directory and of an estimate shard (torch-free: the workflow's
Snakefiles read these names to declare their outputs).

A *full* split's kernel fits the validation rows too (one symmetric ``train.npy`` over
train + val, which the solve stage selects on and then refits on): its eval blocks
are ``test`` only, and ``val`` too for a kernel augmented by crops (its fitted val rows
are random windows; the selection scores the centre windows). A *subset*'s kernel is
not refit: ``val`` stays an eval block.
"""

from __future__ import annotations

KERNEL_META = "kernel.json"
SHARD_META = "shard.json"
#: The merge's row blocks, in bytes of float64 rows, so that what it holds in flight
#: does not grow with the kernel's width (4096 fixed rows held 1.8 GB at 16000 rows,
#: benchmarks/scale.py).
MERGE_BLOCK_BYTES = 128 << 20


def merge_block_rows(columns: int, block_bytes: int = MERGE_BLOCK_BYTES) -> int:
    """Rows of a ``columns``-wide float64 block that fit ``block_bytes`` (at least 1)."""
    return max(1, block_bytes // (8 * columns))


def eval_splits(fits_val: bool, crops: bool = False) -> list[str]:
    """The splits scored against the fitted rows (separate ``<split>.npy`` blocks)."""
    return ["test"] if fits_val and not crops else ["val", "test"]


def kernel_files(fits_val: bool, crops: bool = False) -> list[str]:
    """Every file of a kernel directory, ``kernel.json`` last."""
    blocks = (f"{split}.npy" for split in eval_splits(fits_val, crops))
    return ["train.npy", *blocks, KERNEL_META]


def shard_files(fits_val: bool, crops: bool = False) -> list[str]:
    """Every file of an estimate shard directory (raw sums), ``shard.json`` last."""
    splits = eval_splits(fits_val, crops)
    blocks = [f"{split}{suffix}.npy" for split in splits for suffix in ("", "_sqnorm")]
    return ["train.npy", *blocks, SHARD_META]
