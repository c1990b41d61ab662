"""Every job's inputs and command line, from the config and the job's wildcards.

The methods take the arguments Snakemake passes by name (``wildcards``, ``input``,
``output``), so that the rules name them directly (``params: args=PLAN.solve_args``);
every option comes from a settings class (:func:`neural_kernels.fields.command_line`).
"""

from __future__ import annotations

import os
from typing import Any

from neural_kernels import layout
from neural_kernels.data.prepared import REFIT_SPLITS, SPLITS, prepared_files, split_files
from neural_kernels.data.sources import SOURCES
from neural_kernels.fields import command_line
from neural_kernels.layout import files, fits_val, kernel_files, shard_files
from neural_kernels.plan.targets import Targets
from neural_kernels.settings import (
    DEFAULT_STORAGE,
    EstimateSettings,
    KernelSpec,
    PrepareSettings,
    SolverSettings,
    TrainSettings,
    ZcaSettings,
)


def input_dir(wildcards: Any, input: Any) -> str:
    """The directory of a rule's first input file."""
    return os.path.dirname(input[0])


def output_dir(wildcards: Any, output: Any) -> str:
    """The directory of a rule's first output file."""
    return os.path.dirname(output[0])


def _subset_file(wildcards: Any, key: str, name: str) -> dict[str, str]:
    """``{key: <the subset view's directory>/name}`` for a subset view, else nothing."""
    if fits_val(wildcards.view):
        return {}
    return {key: f"{layout.subset_dir(wildcards.dataset, wildcards.view)}/{name}"}


class Commands(Targets):
    """A config's jobs: what each reads and the options it runs with."""

    # --------------------------------------------------------------------------- data

    def prepare_inputs(self, wildcards: Any) -> dict[str, str]:
        """The archive or .npz a dataset is prepared from (nothing for digits)."""
        cfg = self.datasets[wildcards.dataset]
        source = SOURCES[cfg["source"]]
        if source.input == "archive":
            return {"archive": self.dataset_archive(wildcards.dataset)}
        if source.input == "npz":
            return {"npz": cfg["path"]}
        return {}

    def prepare_args(self, wildcards: Any, input: Any) -> str:
        """Command-line options of `neural-kernels prepare` for one dataset."""
        cfg = self.datasets[wildcards.dataset]
        args = [f"--source {cfg['source']}", command_line(PrepareSettings, cfg)]
        # Snakemake's input is a list with names: `in` alone would test its values
        if "archive" in input.keys():  # noqa: SIM118
            args += [
                f"--archive '{input.archive}'",
                f"--checksum {self.dataset_checksum(wildcards)}",
            ]
        if "npz" in input.keys():  # noqa: SIM118
            args.append(f"--npz '{input.npz}'")
        return " ".join(args)

    def prepared_dataset(self, dataset: str) -> list[str]:
        return files(layout.data_dir(dataset), prepared_files())

    def zca_args(self, wildcards: Any) -> str:
        """Command-line options of `neural-kernels zca` for one dataset: fitted on train
        + val (the leading inputs, in SPLITS order), the training set of the refit."""
        cfg = self.zca_settings(wildcards.dataset)
        args = [f"--fit-on {len(REFIT_SPLITS)}", command_line(ZcaSettings, cfg)]
        return " ".join(args + [f"--device {cfg['device']}"])

    # ------------------------------------------------------------------------ kernels

    def kernel_inputs(self, wildcards: Any) -> dict[str, str]:
        """Whitened train/val/test images, and the subset's row indices for a subset."""
        zca = layout.zca_dir(wildcards.dataset)
        inputs = {split: f"{zca}/{split_files(split)[0]}" for split in SPLITS}
        return inputs | _subset_file(wildcards, "indices", "train_indices.npy")

    def kernel_args(self, wildcards: Any, input: Any) -> str:
        """Inputs and architecture options shared by the kernel subcommands."""
        cfg = self.kernels[wildcards.kernel]
        fitted = fits_val(wildcards.view)
        args = [f"--train '{input.train}'"]
        if fitted:
            args.append(f"--val '{input.val}'")
        splits = layout.eval_splits(fitted, self.has_crops(wildcards.kernel))
        args += [f"--eval {split}='{input[split]}'" for split in splits]
        if "indices" in input.keys():  # noqa: SIM118 (a list with names)
            args.append(f"--train-indices '{input.indices}'")
        args += [command_line(KernelSpec, cfg), f"--device {cfg['device']}"]
        if cfg["precision"] is not None:
            args.append(f"--precision {cfg['precision']}")
        return " ".join(args)

    def estimate_args(self, wildcards: Any, input: Any) -> str:
        """`neural-kernels kernel-shard` options of one shard."""
        cfg = self.kernels[wildcards.kernel]
        seed = self.estimate_seed(wildcards.kernel, wildcards.view)
        settings = {**cfg, "precision": None, "seed": seed}
        args = [self.kernel_args(wildcards, input), command_line(EstimateSettings, settings)]
        args += [f"--shard {wildcards.shard}", f"--shards {cfg['shards']}"]
        return " ".join(args)

    def analytic_args(self, wildcards: Any, input: Any) -> str:
        """`neural-kernels kernel-analytic` options."""
        cfg = self.kernels[wildcards.kernel]
        block = f" --block-size {cfg['block_size']}" if cfg["block_size"] else ""
        return f"{self.kernel_args(wildcards, input)}{block}{self.storage_arg(wildcards)}"

    def storage_arg(self, wildcards: Any) -> str:
        """`--storage` of a kernel whose files are not float64 (none otherwise, so that
        the runs from before the setting keep their command lines)."""
        dtype = self.kernels[wildcards.kernel]["storage"]
        return "" if dtype == DEFAULT_STORAGE else f" --storage {dtype}"

    def kernel_shard_files(self, wildcards: Any) -> list[str]:
        """Every file of every shard of an estimated kernel (all are the merge's inputs)."""
        names = shard_files(fits_val(wildcards.view), self.has_crops(wildcards.kernel))
        dataset, view, kernel = wildcards.dataset, wildcards.view, wildcards.kernel
        return [
            path
            for shard in range(self.kernels[kernel]["shards"])
            for path in files(layout.shard_dir(dataset, view, kernel, shard), names)
        ]

    @staticmethod
    def kernel_shard_dirs(wildcards: Any, input: Any) -> str:
        """The shard directories, quoted for the shell, in shard order."""
        dirs = dict.fromkeys(os.path.dirname(path) for path in input)
        return " ".join(f"'{d}'" for d in dirs)

    # ------------------------------------------------------------ solves and networks

    def solve_inputs(self, wildcards: Any) -> dict[str, Any]:
        """The kernel's blocks and kernel.json, and the labels (a subset's own train
        labels)."""
        kernel = layout.kernel_dir(wildcards.dataset, wildcards.view, wildcards.kernel)
        data = layout.data_dir(wildcards.dataset)
        blocks = kernel_files(fits_val(wildcards.view), self.has_crops(wildcards.kernel))
        inputs: dict[str, Any] = {"kernel": files(kernel, blocks)}
        inputs |= {f"{split}_labels": f"{data}/{split_files(split)[1]}" for split in SPLITS}
        return inputs | _subset_file(wildcards, "train_labels", split_files("train")[1])

    def solve_args(self, wildcards: Any, input: Any) -> str:
        """`neural-kernels solve` options of one solver on one kernel."""
        cfg = self.solvers[wildcards.solver]
        labels = " ".join(f"{split}='{input[f'{split}_labels']}'" for split in SPLITS)
        args = [
            f"--kernel-dir '{os.path.dirname(input.kernel[0])}'",
            f"--labels {labels}",
            command_line(SolverSettings, cfg),
            f"--device {cfg['device']}",
        ]
        return " ".join(args)

    def network_inputs(self, wildcards: Any) -> list[str]:
        """The prepared dataset a network trains on."""
        return self.prepared_dataset(wildcards.dataset)

    def network_args(self, wildcards: Any) -> str:
        """`neural-kernels train` options of one network definition."""
        cfg = self.networks[wildcards.network]
        return f"{command_line(TrainSettings, cfg)} --device {cfg['device']}"
