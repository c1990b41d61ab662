"""Read what a run produced under ``results/``: metrics JSONs and benchmark files.

Nothing is recomputed: every number of the report comes from a file a stage wrote.
A file that exists but cannot be read (malformed JSON, a missing key, a broken
benchmark table) is an error that names the file, so a report never silently drops
an experiment.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from neural_kernels import outputs
from neural_kernels.errors import DataError, NeuralKernelsError
from neural_kernels.layout import (
    DATA_META,
    KERNEL_META,
    NETWORK_METRICS,
    SOLVE_METRICS,
    ZCA_META,
    benchmark_file,
    data_dir,
    in_results,
    kernel_dir,
    network_dir,
    script_benchmark,
    solve_dir,
    subset_dir,
    zca_dir,
)


class ReportError(NeuralKernelsError):
    """A result file the report needs is malformed."""


@dataclass
class Results:
    """Everything found under a results directory, each record tagged with its path."""

    root: Path
    datasets: dict[str, dict] = field(default_factory=dict)  # name -> meta.json
    subsets: dict[tuple[str, str], dict] = field(default_factory=dict)  # (name, view) -> meta
    zca: dict[str, dict] = field(default_factory=dict)  # name -> zca.json
    kernels: list[dict] = field(default_factory=list)  # kernel.json + dataset/view/name
    solves: list[dict] = field(default_factory=list)  # metrics.json + dataset/view/kernel_name
    networks: list[dict] = field(default_factory=list)  # metrics.json + dataset/name
    benchmarks: list[dict] = field(default_factory=list)  # one row per benchmark: file
    scripts: dict[str, dict] = field(default_factory=dict)  # benchmarks/<name>.py JSONs

    def source(self, dataset: str) -> str | None:
        """The source kind (cifar10, digits, ...) of a prepared dataset."""
        return self.datasets.get(dataset, {}).get("source")

    def devices(self) -> list[str]:
        """Every device a stage reports having run on."""
        found: set[str] = set()
        for record in [*self.zca.values(), *self.kernels, *self.solves, *self.networks]:
            found.update(record.get("devices") or [record.get("device")])
        return sorted(d for d in found if d)


def read_json(path: Path, required: Iterable[str] = ()) -> dict:
    """A JSON object from ``path``, with ``required`` keys, or a clear :class:`ReportError`."""
    fix = "delete it and rerun the rule that writes it (snakemake reruns it when it is missing)"
    try:
        record = outputs.read_json(path, fix)
    except DataError as error:
        raise ReportError(str(error)) from None
    missing = [key for key in required if key not in record]
    if missing:
        raise ReportError(
            f"{path}: missing key(s) {', '.join(missing)}; it was written by another version "
            "of the pipeline or edited by hand: delete it and rerun the rule that writes it"
        )
    return record


def read_benchmark(path: Path) -> dict:
    """One Snakemake ``benchmark:`` table: wall seconds and peak RSS (MiB) of a job."""
    try:
        table = pd.read_csv(path, sep="\t")
        row = table.iloc[-1]
        return {"seconds": float(row["s"]), "max_rss_mb": float(row["max_rss"])}
    except (OSError, ValueError, KeyError, IndexError, pd.errors.ParserError) as error:
        raise ReportError(
            f"{path}: not a Snakemake benchmark table ({error!r}); delete it and rerun its rule"
        ) from None


def _parts(path: Path, root: Path) -> list[str]:
    return list(path.relative_to(root).parts)


def _pattern(directory: str, name: str) -> str:
    """A glob, relative to the results root, of every ``name`` in such directories."""
    return in_results(f"{directory}/{name}")


#: The records a stage writes into its output directory (device, timings, memory).
STAGE_RECORDS = (ZCA_META, KERNEL_META, SOLVE_METRICS, NETWORK_METRICS)


def _stage_record(root: Path, job: str) -> str | None:
    """The record of a benchmarked job: in its output directory ``root/job`` or the
    nearest one above it (an estimate shard's is its kernel's), if any."""
    directory = root / job
    while directory != root and root in directory.parents:
        for name in STAGE_RECORDS:
            if (directory / name).is_file():
                return str(directory / name)
        directory = directory.parent
    return None


def collect(results_dir: Path) -> Results:
    """Walk ``results_dir`` (the workflow's ``results/``) and read every result file."""
    root = Path(results_dir)
    results = Results(root)
    for meta in sorted(root.glob(_pattern(data_dir("*"), DATA_META))):
        results.datasets[meta.parent.name] = read_json(meta, ("source", "splits"))
    for meta in sorted(root.glob(_pattern(subset_dir("*", "*"), DATA_META))):
        _, dataset, _, view, _ = _parts(meta, root)
        results.subsets[(dataset, view)] = read_json(meta, ("size", "seed"))
    for meta in sorted(root.glob(_pattern(zca_dir("*"), ZCA_META))):
        results.zca[meta.parent.name] = read_json(meta, ("variant", "solver"))
    for meta in sorted(root.glob(_pattern(kernel_dir("*", "*", "*"), KERNEL_META))):
        _, dataset, view, name, _ = _parts(meta, root)
        record = read_json(meta, ("method", "arch", "activation", "flips", "seconds"))
        results.kernels.append(
            record | {"dataset": dataset, "view": view, "name": name, "path": str(meta)}
        )
    for meta in sorted(root.glob(_pattern(solve_dir("*", "*", "*", "*"), SOLVE_METRICS))):
        _, dataset, view, kernel_name, solver, _ = _parts(meta, root)
        record = read_json(
            meta, ("method", "kernel", "grid", "selected", "test_accuracy", "best_on_test")
        )
        results.solves.append(
            record
            | {
                "dataset": dataset,
                "view": view,
                "kernel_name": kernel_name,
                "solver": solver,
                "path": str(meta),
            }
        )
    for meta in sorted(root.glob(_pattern(network_dir("*", "*"), NETWORK_METRICS))):
        _, dataset, name, _ = _parts(meta, root)
        record = read_json(meta, ("model", "settings", "test_accuracy"))
        results.networks.append(record | {"dataset": dataset, "name": name, "path": str(meta)})
    for table in sorted(root.glob(in_results(benchmark_file("*", "**/*")))):
        rule, *parts = _parts(table, root)[1:]
        job = re.sub(r"\.tsv$", "", "/".join(parts))
        bench = {"rule": rule, "job": job, "path": str(table), "record": _stage_record(root, job)}
        results.benchmarks.append(bench | read_benchmark(table))
    for script in sorted(root.glob(in_results(script_benchmark()))):
        results.scripts[script.stem] = read_json(script)
    return results
