"""The configured solves at the sources' official sizes, before anything is downloaded:
what each holds, what its job asks for, and how long it should take.

The workflow refuses, before any job runs, a solve on a full split that the configured
node (``resources.node_mem_mb``) or GPU (``resources.gpu_mem_mb``) cannot hold, such
as a dense solver (flow, ridge) on a block too big for them (:func:`check_solves_fit`);
README's
"Running the full reproduction" prints :func:`solve_table` of ``config/thesis.yaml``
(``tests/test_readme.py`` checks that it is current). Sizes follow the kernel layout
of :mod:`neural_kernels.kernels.stage`: a full split fits train + val (times the
crops' copies and the mirrors) and scores test, plus val's centre crops when cropped.
A custom source's sizes are known only from its data; the solve stage's own check
(:func:`neural_kernels.solvers.kernel_dir.check_memory`) covers it when the job runs.

The hours are a model, not a measurement (``benchmarks/solvers.py`` measures):
:data:`EIGH_MATMUL_UNITS` and :data:`CHOLESKY_MATMUL_UNITS` were measured on this
project's 2-core machine (eigh of an N x N float64 matrix takes as long as 12 N^3
multiply-adds at its matmul rate, a Cholesky 0.8), and the rates below are stated
assumptions about the cluster.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from neural_kernels.catalog import SOLVERS
from neural_kernels.data.sources import ARCHIVES, SOURCES
from neural_kernels.data.synthetic import test_images
from neural_kernels.errors import NeuralKernelsError
from neural_kernels.fields import from_config
from neural_kernels.resources import MIB, SolveSizes, machine_has_gpus, solve_mem_mb
from neural_kernels.settings import DEFAULT_STORAGE, KernelSpec, SolverSettings
from neural_kernels.solvers import memory

#: Assumed rates: a CPU node's float64 matmul (32 cores), a GPU's float64 matmul (an
#: H100's tensor cores sustain about 50 of their 67 TFLOP/s), and the rate at which a
#: streamed kernel is read from a node's local disk or parallel file system.
CPU_FLOPS = 1e12
GPU_FLOPS = 5e13
DISK_BYTES_PER_S = 2e9
#: Measured here: ``torch.linalg.eigh`` (``syevd``) of N x N costs 12 N^3 multiply-adds
#: of the matmul rate, ``torch.linalg.cholesky`` 0.8 N^3 (N = 2000 and 4000, 2 cores).
EIGH_MATMUL_UNITS = 12.0
CHOLESKY_MATMUL_UNITS = 0.8


@dataclass(frozen=True)
class PlannedSolve:
    """One configured solve on a full split at its source's official sizes."""

    dataset: str
    kernel: str
    solver: str
    method: str
    on_gpu: bool
    sizes: SolveSizes
    holds_bytes: int  # on the GPU when on_gpu, else on the host
    asked_mb: int  # the host memory its job asks for (before the workflow's floor)
    hours: float
    entry_bytes: int = 8  # of the kernel's files: its storage setting

    @property
    def kernel_gb(self) -> float:
        """The kernel's files: the fitted block and the eval rows."""
        rows = self.sizes.rows
        return self.entry_bytes * rows * (rows + self.sizes.eval_rows) / 1e9


def planned_sizes(dataset: dict, spec: KernelSpec) -> SolveSizes | None:
    """A full split's fitted rows, eval rows and classes at its source's official sizes
    or, for synthetic data, the configured ones (``None`` for a source without them:
    digits and custom data)."""
    source, archive = dataset["source"], ARCHIVES.get(dataset["source"])
    if source == "synthetic":  # the config says how many
        fit_images, classes = dataset["size"], dataset["classes"]
        eval_rows = test_images(fit_images, dataset.get("test_size"), classes)
    elif archive is None:
        return None
    elif archive.test_images is None:  # a seeded hold-out of all images is test
        fraction = dataset.get("test_fraction") or SOURCES[source].test_fraction
        eval_rows = round(archive.train_images * fraction)
        fit_images, classes = archive.train_images - eval_rows, archive.classes
    else:
        fit_images, eval_rows = archive.train_images, archive.test_images
        classes = archive.classes
    copies = spec.copies if spec.crop is not None else 1
    rows = fit_images * copies * (2 if spec.flips else 1)
    if spec.crop is not None:  # val's centre crops are scored by the selection
        eval_rows += round(fit_images * dataset["val_fraction"])
    return SolveSizes(rows, eval_rows, classes)


def solve_hours(
    settings: SolverSettings, sizes: SolveSizes, on_gpu: bool, entry_bytes: int = 8
) -> float:
    """Modelled hours of a solve: selection on train and refit on train + val (taken as
    two fits of ``N`` rows). Dense: one eigendecomposition (flow) or a Cholesky per
    ``lambda`` (ridge) at the device's matmul rate. Streaming: its passes over the
    kernel at :data:`DISK_BYTES_PER_S` (boosting: two a step, its batches and the
    update, plus ``N / M`` batch eigendecompositions; pcg: at most ``max_iterations``
    plus two, and the preconditioner's ``r`` rows), each pass ``entry_bytes`` (the
    kernel's storage) per entry."""
    n, flops = sizes.rows, GPU_FLOPS if on_gpu else CPU_FLOPS
    kernel_pass = entry_bytes * n * n / DISK_BYTES_PER_S
    if settings.method == "flow":
        seconds = EIGH_MATMUL_UNITS * n**3 / flops
    elif settings.method == "ridge":
        seconds = len(settings.lambdas) * CHOLESKY_MATMUL_UNITS * n**3 / flops
    elif settings.method == "boosting":
        batch = min(settings.batch_size, n)
        eighs = math.ceil(n / batch) * EIGH_MATMUL_UNITS * batch**3 / flops
        seconds = settings.steps * (2 * kernel_pass + eighs)
    elif settings.method == "pcg":
        rank = min(settings.rank, n)
        preconditioner = entry_bytes * n * rank / DISK_BYTES_PER_S
        seconds = (settings.max_iterations + 2) * kernel_pass + preconditioner
    else:  # a registered solver without a model
        return math.nan
    return 2 * seconds / 3600


def planned_solves(config: dict) -> list[PlannedSolve]:
    """Every configured solve on a full split of a dataset with official sizes."""
    planned = []
    gpus = machine_has_gpus() if config["gpus"] == "auto" else bool(config["gpus"])
    for name, dataset in config["datasets"].items():
        for kernel in dataset.get("kernels", []):
            kernel_cfg = config["kernels"][kernel]
            spec = from_config(KernelSpec, kernel_cfg)
            entry_bytes = np.dtype(kernel_cfg.get("storage", DEFAULT_STORAGE)).itemsize
            sizes = planned_sizes(dataset, spec)
            if sizes is None:
                continue
            solvers = dataset.get("kernel_solvers", {}).get(kernel, dataset.get("solvers", []))
            for solver in solvers:
                entry = config["solvers"][solver]
                settings = from_config(SolverSettings, entry)
                device = entry.get("device", "auto")
                on_gpu = device.startswith("cuda") or (device == "auto" and gpus)
                registered = SOLVERS.lookup(settings.method)
                holds = registered.holds_bytes(settings, sizes.rows, sizes.eval_rows, sizes.classes)
                planned.append(
                    PlannedSolve(
                        name, kernel, solver, settings.method, on_gpu, sizes, holds,
                        solve_mem_mb(settings, sizes, on_gpu=on_gpu),
                        solve_hours(settings, sizes, on_gpu, entry_bytes), entry_bytes,
                    )
                )  # fmt: skip
    return planned


def _unfit(solve: PlannedSolve, limits: dict[str, int | None]) -> list[str]:
    """Why ``solve`` cannot fit the configured memory (empty: it fits or no limit)."""
    dense = not SOLVERS[solve.method].streams
    name, n = f"{solve.dataset}/{solve.kernel}/{solve.solver}", solve.sizes.rows
    what = (
        f"{n} fitted rows, a {8 * n * n / 1e9:.0f} GB block, {memory.DENSE_COPIES} times"
        if dense
        else f"{n} + {solve.sizes.eval_rows} rows x {solve.sizes.classes} classes x its grid"
    )
    needs = [("GPU" if solve.on_gpu else "node", solve.holds_bytes, what)]
    if solve.on_gpu:  # and the host beside it
        needs.append(("node", solve.asked_mb * MIB, "its host memory beside the GPU"))
    return [
        f"{name}: {solve.method} holds {need / 1e9:.0f} GB ({why}) but a {where} has "
        f"{limits[where] / 1000:.0f} GB"
        for where, need, why in needs
        if limits[where] is not None and need > limits[where] * MIB
    ]


def check_solves_fit(config: dict) -> None:
    """Refuse solves that the configured node (host) or GPU memory cannot hold (no
    limit configured: no check), naming every such solve with both sizes: a dense
    solver's fitted block, a streaming one's grid, a GPU solve's host side."""
    limits = {
        "node": config["resources"].get("node_mem_mb"),
        "GPU": config["resources"].get("gpu_mem_mb"),
    }
    unfit = [line for solve in planned_solves(config) for line in _unfit(solve, limits)]
    if unfit:
        streaming = " or ".join(name for name, s in SOLVERS.items() if s.streams)
        raise NeuralKernelsError(
            "solves that cannot fit (resources.node_mem_mb / gpu_mem_mb): "
            + "; ".join(unfit)
            + f". Use {streaming}, which stream the kernel from disk, for a dense solver's "
            "kernels (kernel_solvers), a smaller grid, batch_size or rank for a streaming "
            "one, or raise the limits if your nodes have more memory"
        )


def solve_table(config: dict) -> str:
    """A markdown table of :func:`planned_solves`: kernel size, solver and device, what
    it holds, what its job asks for and its modelled hours."""
    floor = config["resources"].get("min_mem_mb", 0)
    lines = [
        "| dataset | kernel | fitted rows | kernel GB | solver | on | holds GB | asks GB | hours |",
        "|---|---|---:|---:|---|---|---:|---:|---:|",
    ]
    for s in planned_solves(config):
        asked = max(floor, s.asked_mb) * MIB / 1e9
        lines.append(
            f"| {s.dataset} | {s.kernel} | {s.sizes.rows:,} | {s.kernel_gb:.0f} | {s.solver} "
            f"({s.method}) | {'GPU' if s.on_gpu else 'CPU'} | {s.holds_bytes / 1e9:.1f} | "
            f"{asked:.1f} | {s.hours:.1f} |"
        )
    return "\n".join(lines)


#: The workflow's config schema (this package is installed from the repository).
SCHEMA = Path(__file__).resolve().parents[2] / "workflow" / "schemas" / "config.schema.yaml"


def load_config(path: str | Path) -> dict:
    """A workflow config file, validated against :data:`SCHEMA` with its defaults filled
    in, as Snakemake reads it."""
    import yaml
    from snakemake.utils import validate

    config = yaml.safe_load(Path(path).read_text())
    validate(config, str(SCHEMA))
    return config


def main(argv: list[str] | None = None) -> int:
    """``python -m neural_kernels.sizing config/thesis.yaml``: print :func:`solve_table`
    and check the dense solves."""
    path = (argv if argv is not None else sys.argv[1:] or ["config/thesis.yaml"])[0]
    config = load_config(path)
    print(solve_table(config))
    check_solves_fit(config)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
