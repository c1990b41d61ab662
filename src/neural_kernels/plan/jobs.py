"""What each job asks a cluster for: its device, GPUs, cores, time and memory.

A local run is limited by ``--cores`` only (and by ``--resources``, e.g. ``gpu=1`` in
``workflow/profiles/local``): ``mem_mb``, ``runtime`` and ``gpu`` do not stop a laptop.
Memory comes from :mod:`neural_kernels.resources` (measured models of what each stage
holds), evaluated when the job is ready (its inputs exist), floored by
``resources.min_mem_mb`` and multiplied by the attempt.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from neural_kernels import layout, resources
from neural_kernels.data.prepared import REFIT_SPLITS
from neural_kernels.fields import from_config
from neural_kernels.layout import fits_val
from neural_kernels.plan.commands import Commands
from neural_kernels.plan.targets import wildcard
from neural_kernels.settings import EstimateSettings, KernelSpec, SolverSettings, ZcaSettings
from neural_kernels.solvers.memory import solve_sizes

MemoryModel = Callable[[Any, Any], float]


class Plan(Commands):
    """A workflow config as typed code: checked, its targets, every job's inputs,
    options and resources. ``pending`` is what a memory request is while its inputs do
    not exist yet (Snakemake's ``TBDString`` in a dry run)."""

    def __init__(self, config: dict, pending: Callable[[], Any] = lambda: None):
        super().__init__(config)
        self.pending = pending
        gpus = config["gpus"]
        # whether the machines that run the jobs have GPUs ('auto': this one)
        self.gpus = resources.machine_has_gpus() if gpus == "auto" else bool(gpus)

    def job_device(self, wildcards: Any) -> str:
        """The configured device of a GPU-capable job: its network, solver, kernel or ZCA."""
        for name, section in (("network", self.networks), ("solver", self.solvers),
                              ("kernel", self.kernels)):  # fmt: skip
            if wildcard(wildcards, name) is not None:
                return section[wildcard(wildcards, name)]["device"]
        return self.zca_settings(wildcards.dataset)["device"]

    def job_gpus(self, wildcards: Any) -> int:
        """GPUs of a GPU-capable job: 1 on device cuda, and on auto where the machines
        have GPUs (config 'gpus'); 0 otherwise."""
        device = self.job_device(wildcards)
        return int(device.startswith("cuda") or (device == "auto" and self.gpus))

    def job_threads(self, wildcards: Any) -> int:
        """Cores of a GPU-capable job (config 'threads'): a few beside a GPU, many on
        the CPU."""
        return self.config["threads"]["gpu_job" if self.job_gpus(wildcards) else "cpu_job"]

    def job_runtime(self, stage: str) -> int:
        """The time limit (minutes) of a stage's jobs: config resources.runtime."""
        return self.config["resources"]["runtime"][stage]

    def job_mem_mb(self, stage: str, estimate: MemoryModel) -> Callable[..., Any]:
        """The memory (MB) of a stage's jobs: config resources.mem_mb[stage] when set,
        else ``estimate(wildcards, input)``, at least min_mem_mb; times the attempt, so
        that a job killed for memory asks for more when retried."""
        cfg = self.config["resources"]

        def mem_mb(wildcards: Any, input: Any, attempt: int) -> Any:
            if stage in cfg["mem_mb"]:
                return cfg["mem_mb"][stage] * attempt
            if not all(map(os.path.exists, input)):
                return self.pending()  # evaluated again once the inputs exist
            return max(cfg["min_mem_mb"], estimate(wildcards, input)) * attempt

        return mem_mb

    # ------------------------------------------------------------------ memory models

    @staticmethod
    def small_job(wildcards: Any, input: Any) -> float:
        """A job that reads small files only (subsets, the report): the floor."""
        return 0

    @staticmethod
    def prepare_estimate(wildcards: Any, input: Any) -> float:
        return resources.prepare_mem_mb(sum(os.path.getsize(path) for path in input))

    def zca_estimate(self, wildcards: Any, input: Any) -> float:
        cfg = from_config(ZcaSettings, self.zca_settings(wildcards.dataset))
        return resources.zca_mem_mb(input, len(REFIT_SPLITS), cfg)

    def kernel_rows(self, wildcards: Any, input: Any) -> tuple[int, int]:
        """(fitted rows, eval rows) of a kernel job, from its inputs' .npy headers."""
        fitted = fits_val(wildcards.view)
        splits = layout.eval_splits(fitted, self.has_crops(wildcards.kernel))
        return resources.kernel_rows(
            input.train,
            {split: input[split] for split in splits},
            from_config(KernelSpec, self.kernels[wildcards.kernel]),
            val=input.val if fitted else None,
            train_indices=input.get("indices"),
        )

    def kernel_image_shape(self, wildcards: Any, input: Any) -> tuple[int, int]:
        """The (height, width) a kernel job's networks see: the images', or the crops'."""
        crop = self.kernels[wildcards.kernel]["crop"]
        return (crop, crop) if crop else resources.npy_shape(input.train)[1:3]

    def estimate_shard_estimate(self, wildcards: Any, input: Any) -> float:
        settings = from_config(
            EstimateSettings, {**self.kernels[wildcards.kernel], "precision": None}
        )
        rows = self.kernel_rows(wildcards, input)
        shape = self.kernel_image_shape(wildcards, input)
        on_gpu = bool(self.job_gpus(wildcards))
        return resources.estimate_mem_mb(*rows, shape, settings, on_gpu=on_gpu)

    def merge_estimate(self, wildcards: Any, input: Any) -> float:
        shards = self.kernels[wildcards.kernel]["shards"]
        train = [path for path in input if os.path.basename(path) == "train.npy"]
        one_shard = sum(map(os.path.getsize, input)) / shards
        return resources.merge_mem_mb(one_shard, resources.npy_shape(train[0])[0], shards)

    def analytic_estimate(self, wildcards: Any, input: Any) -> float:
        rows = self.kernel_rows(wildcards, input)
        shape = self.kernel_image_shape(wildcards, input)
        block_size = self.kernels[wildcards.kernel]["block_size"]
        # a block per thread on the CPU
        workers = 1 if self.job_gpus(wildcards) else self.job_threads(wildcards)
        return resources.analytic_mem_mb(*rows, shape, block_size, workers)

    def solve_estimate(self, wildcards: Any, input: Any) -> float:
        settings = from_config(SolverSettings, self.solvers[wildcards.solver])
        sizes = solve_sizes(input.kernel, input.train_labels)
        return resources.solve_mem_mb(settings, sizes, on_gpu=bool(self.job_gpus(wildcards)))

    def train_estimate(self, wildcards: Any, input: Any) -> float:
        images = [path for path in input if path.endswith("_images.npy")]
        batch_size = self.networks[wildcards.network]["batch_size"]
        on_gpu = bool(self.job_gpus(wildcards))
        return resources.train_mem_mb(images, batch_size, on_gpu=on_gpu)
