"""What a workflow config asks for: its datasets' views, the kernels and solvers of each,
and every job's target file (the ``meta.json``, ``kernel.json`` or ``metrics.json`` it
writes last)."""

from __future__ import annotations

from typing import Any

from neural_kernels import layout
from neural_kernels.data.sources import ARCHIVES
from neural_kernels.layout import FULL_VIEW, fits_val, subset_of
from neural_kernels.plan.checks import check_config
from neural_kernels.seeds import derived_seed

#: A wildcard constraint that matches nothing (a config without such entries).
NO_MATCH = "(?!)"


def wildcard(wildcards: Any, name: str) -> Any:
    """A wildcard's value, ``None`` where the rule has no such wildcard."""
    return getattr(wildcards, name, None)


class Targets:
    """A validated workflow config (the schema's defaults filled in), checked
    (:func:`~neural_kernels.plan.checks.check_config`) when it is made."""

    def __init__(self, config: dict):
        check_config(config)
        self.config = config
        self.datasets: dict = config["datasets"]
        self.kernels: dict = config["kernels"]
        self.solvers: dict = config["solvers"]
        self.networks: dict = config["networks"]

    # ----------------------------------------------------------------- names and views

    def has_crops(self, kernel: str) -> bool:
        """Whether a kernel is augmented by crops (its full view then scores val's
        centre crops as an eval block too)."""
        return self.kernels[kernel]["crop"] is not None

    def kernels_of(self, method: str, crops: bool | None = None) -> str:
        """A wildcard constraint matching the kernels computed by ``method`` (and, unless
        ``crops`` is None, augmented by crops or not)."""
        names = [
            name
            for name, k in self.kernels.items()
            if k["method"] == method and crops in (None, self.has_crops(name))
        ]
        return "|".join(names) or NO_MATCH

    def constraint(self, section: str) -> str:
        """A wildcard constraint matching the names defined under ``section``."""
        return "|".join(self.config[section]) or NO_MATCH

    def subset_views(self, dataset: str) -> list[str]:
        """The view name of every subset of a dataset."""
        cfg = self.datasets[dataset]["subsets"]
        return [layout.subset_view(size, seed) for size in cfg["sizes"] for seed in cfg["seeds"]]

    def kernel_views(self, dataset: str) -> list[tuple[str, list[str]]]:
        """(view, kernel names) of a dataset: the full split and every subset."""
        cfg = self.datasets[dataset]
        views = [(FULL_VIEW, cfg["kernels"])] if cfg["kernels"] else []
        if cfg["subsets"]["kernels"]:
            views += [(view, cfg["subsets"]["kernels"]) for view in self.subset_views(dataset)]
        return views

    def kernel_solvers(self, dataset: str, view: str, kernel: str) -> list[str]:
        """The solvers run on a kernel: the dataset's (its subsets') list, or the full
        split's per-kernel exception ('kernel_solvers')."""
        cfg = self.datasets[dataset]
        if not fits_val(view):
            return cfg["subsets"]["solvers"]
        return cfg["kernel_solvers"].get(kernel, cfg["solvers"])

    def zca_settings(self, dataset: str) -> dict:
        """The global 'zca' settings with the dataset's own 'zca' entry laid over them."""
        return {**self.config["zca"], **self.datasets[dataset].get("zca", {})}

    def estimate_seed(self, kernel: str, view: str) -> int:
        """The random networks' seed: the kernel's own on the full split; on a subset,
        one derived from (kernel seed, subset seed), so that the spread over subsets
        covers the networks' randomness too."""
        seed = self.kernels[kernel]["seed"]
        subset = subset_of(view)
        return seed if subset is None else derived_seed(seed, subset[1])

    # ---------------------------------------------------------------------- downloads

    def dataset_archive(self, dataset: str) -> str:
        """The downloaded archive of an archive-backed dataset."""
        return layout.archive_file(dataset, ARCHIVES[self.datasets[dataset]["source"]].filename)

    def dataset_url(self, wildcards: Any) -> str:
        cfg = self.datasets[wildcards.dataset]
        return cfg.get("url", ARCHIVES[cfg["source"]].url)

    def dataset_checksum(self, wildcards: Any) -> str:
        cfg = self.datasets[wildcards.dataset]
        return cfg.get("checksum", ARCHIVES[cfg["source"]].checksum)

    # ------------------------------------------------------------------------ targets

    def data_targets(self) -> list[str]:
        """Every prepared dataset's and subset's meta.json (meta.json is written last)."""
        targets = []
        for name in self.datasets:
            targets.append(f"{layout.data_dir(name)}/{layout.DATA_META}")
            targets += [
                f"{layout.subset_dir(name, view)}/{layout.DATA_META}"
                for view in self.subset_views(name)
            ]
        return targets

    def zca_targets(self) -> list[str]:
        return [f"{layout.zca_dir(name)}/{layout.ZCA_META}" for name in self.datasets]

    def kernel_jobs(self) -> list[tuple[str, str, str]]:
        """Every configured (dataset, view, kernel)."""
        return [
            (name, view, kernel)
            for name in self.datasets
            for view, kernels in self.kernel_views(name)
            for kernel in kernels
        ]

    def kernel_targets(self) -> list[str]:
        """Every configured kernel directory's kernel.json (written last)."""
        return [f"{layout.kernel_dir(*job)}/{layout.KERNEL_META}" for job in self.kernel_jobs()]

    def solve_targets(self) -> list[str]:
        """Every (dataset, view, kernel, solver)'s metrics.json (written last)."""
        return [
            f"{layout.solve_dir(*job, solver)}/{layout.SOLVE_METRICS}"
            for job in self.kernel_jobs()
            for solver in self.kernel_solvers(*job)
        ]

    def network_targets(self) -> list[str]:
        """Every configured network's metrics.json (written last)."""
        return [
            f"{layout.network_dir(name, network)}/{layout.NETWORK_METRICS}"
            for name, cfg in self.datasets.items()
            for network in cfg["networks"]
        ]

    def report_inputs(self) -> list[str]:
        """Every result the report reads (so it renders after all of them)."""
        return (
            self.data_targets()
            + self.zca_targets()
            + self.kernel_targets()
            + self.solve_targets()
            + self.network_targets()
        )
