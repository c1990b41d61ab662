"""Where every stage's outputs live: the one place that spells a path of ``results/``.

Torch-free: the workflow's rules and target lists (``workflow/rules/common.smk``) and
the report ask these functions; nothing else builds a results path. Every function's
arguments default to the Snakemake wildcard of the same name, so a rule's pattern is
the call without arguments (``kernel_dir()`` is
``results/kernels/{dataset}/{view}/{kernel}``) and a target is the call with values.

A *view* of a dataset is ``full`` (the whole training split) or a class-balanced
subset ``n<size>-seed<seed>`` (:func:`subset_view`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from neural_kernels.data.prepared import META as DATA_META
from neural_kernels.data.prepared import SPLITS, split_files

__all__ = ["DATA_META"]

RESULTS = "results"
RESOURCES = "resources"
FULL_VIEW = "full"
#: A subset view's name, as a regular expression (a wildcard constraint).
SUBSET_VIEW = r"n\d+-seed\d+"
ZCA_META = "zca.json"
ZCA_TRANSFORM = "transform.npz"
SOLVE_METRICS = "metrics.json"
SOLVE_PREDICTIONS = "predictions.npz"
NETWORK_METRICS = "metrics.json"
NETWORK_MODEL = "model.pt"
#: The files of a solve and of a trained network, the record (written last) last.
SOLVE_FILES = (SOLVE_PREDICTIONS, SOLVE_METRICS)
NETWORK_FILES = (NETWORK_MODEL, NETWORK_METRICS)
#: The records of a kernel directory and of an estimate shard (written last). A *full*
#: split's kernel fits the validation rows too (one symmetric ``train.npy`` over train
#: + val, which the solve selects on and then refits on): its eval blocks are ``test``
#: only, and ``val`` too for a kernel augmented by crops (its fitted val rows are random
#: windows; the selection scores the centre windows). A *subset*'s kernel is not
#: refit: ``val`` stays an eval block.
KERNEL_META = "kernel.json"
SHARD_META = "shard.json"


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


def zca_files() -> list[str]:
    """The files of a ZCA directory: the whitened splits, the transform, zca.json last."""
    return [*(split_files(split)[0] for split in SPLITS), ZCA_TRANSFORM, ZCA_META]


def subset_view(size: int | str = "{size}", seed: int | str = "{seed}") -> str:
    """The view name of the subset of ``size`` images drawn with ``seed``."""
    return f"n{size}-seed{seed}"


def subset_of(view: str) -> tuple[int, int] | None:
    """``(size, seed)`` of a subset view; ``None`` for the full view."""
    match = re.fullmatch(r"n(\d+)-seed(\d+)", view)
    if match is None:
        if view != FULL_VIEW:
            raise ValueError(f"{view!r} is neither {FULL_VIEW!r} nor a subset n<size>-seed<seed>")
        return None
    return int(match[1]), int(match[2])


def fits_val(view: str) -> bool:
    """Whether a view's kernel fits the val rows (full: yes, for the refit; subsets: no)."""
    return subset_of(view) is None


def in_results(path: str) -> str:
    """``path`` relative to ``results/`` (the report reads a results tree wherever it
    was copied to): ``in_results(kernel_dir("*", "*", "*"))`` is a glob pattern."""
    return path.removeprefix(f"{RESULTS}/")


def files(directory: str, names: Iterable[str]) -> list[str]:
    """``directory/name`` for every name."""
    return [f"{directory}/{name}" for name in names]


def archive_file(dataset: str = "{dataset}", filename: str = "{archive}") -> str:
    """A downloaded archive: ``resources/<dataset>/<its official file name>``."""
    return f"{RESOURCES}/{dataset}/{filename}"


def data_dir(dataset: str = "{dataset}") -> str:
    """A prepared dataset (see :mod:`neural_kernels.data.prepared`)."""
    return f"{RESULTS}/data/{dataset}"


def subset_dir(dataset: str = "{dataset}", view: str = "{view}") -> str:
    """A class-balanced subset of a prepared dataset's train split."""
    return f"{data_dir(dataset)}/subsets/{view}"


def zca_dir(dataset: str = "{dataset}") -> str:
    """The whitened splits, ``transform.npz`` and ``zca.json`` of a dataset."""
    return f"{RESULTS}/zca/{dataset}"


def kernel_dir(dataset: str = "{dataset}", view: str = "{view}", kernel: str = "{kernel}") -> str:
    """A kernel's blocks and ``kernel.json`` (see :mod:`neural_kernels.kernels.stage`)."""
    return f"{RESULTS}/kernels/{dataset}/{view}/{kernel}"


def shard_dir(
    dataset: str = "{dataset}",
    view: str = "{view}",
    kernel: str = "{kernel}",
    shard: int | str = "{shard}",
) -> str:
    """One shard of an estimated kernel (raw sums; removed once merged)."""
    return f"{kernel_dir(dataset, view, kernel)}/shards/{shard}"


def solve_dir(
    dataset: str = "{dataset}",
    view: str = "{view}",
    kernel: str = "{kernel}",
    solver: str = "{solver}",
) -> str:
    """One solver's ``predictions.npz`` and ``metrics.json`` on one kernel."""
    return f"{RESULTS}/solve/{dataset}/{view}/{kernel}/{solver}"


def network_dir(dataset: str = "{dataset}", network: str = "{network}") -> str:
    """A trained network's ``model.pt`` and ``metrics.json``."""
    return f"{RESULTS}/networks/{dataset}/{network}"


def log_file(rule: str, job: str) -> str:
    """The log of one job of ``rule`` (``job``: its wildcards joined by ``/``)."""
    return f"{RESULTS}/logs/{rule}/{job}.log"


def script_benchmark(name: str = "*") -> str:
    """The JSON a script of ``benchmarks/`` writes by default (the report reads them)."""
    return f"{RESULTS}/benchmarks/{name}.json"


def benchmark_file(rule: str, output: str) -> str:
    """Snakemake's benchmark record of one job of ``rule`` whose output is ``output`` (a
    directory under ``results/``, or a file): ``results/benchmarks/<rule>/<output,
    relative to results/>.tsv``, so that the report finds the stage's own record
    (device, GPU memory) in that directory or the nearest one above it."""
    return f"{RESULTS}/benchmarks/{rule}/{output.removeprefix(RESULTS + '/')}.tsv"
