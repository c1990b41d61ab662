"""The experiment plan of a workflow config: what it defines and how the parts refer to
each other, checked when the config is read (``workflow/rules/common.smk`` calls
:func:`check_config` before Snakemake builds a single job).

The JSON schema (``workflow/schemas/config.schema.yaml``) checks each entry's keys and
types; this module checks what a schema cannot: that every name a dataset lists is
defined, that every entry's settings make sense together (an estimate's shards split
its chunks, a solver takes only the options it uses), and that the dense solves fit
the configured memory (:func:`neural_kernels.sizing.check_solves_fit`).
"""

from __future__ import annotations

from neural_kernels.errors import NeuralKernelsError
from neural_kernels.fields import from_config
from neural_kernels.settings import EstimateSettings, SolverSettings
from neural_kernels.sizing import check_solves_fit


def _defined(section: str, defined: dict) -> str:
    return f"defined under '{section}' (defined: {', '.join(defined) or 'none'})"


def check_references(config: dict) -> None:
    """Every kernel, solver and network a dataset lists (its own and its subsets') is
    defined, and ``kernel_solvers`` names only the dataset's kernels."""
    kernels, solvers, networks = config["kernels"], config["solvers"], config["networks"]
    for name, cfg in config["datasets"].items():
        for section, defined in (("kernels", kernels), ("solvers", solvers)):
            for item in cfg[section] + cfg["subsets"][section]:
                if item not in defined:
                    raise NeuralKernelsError(
                        f"dataset {name!r} lists {section[:-1]} {item!r}, which is not "
                        f"{_defined(section, defined)}; define it or remove it"
                    )
        for kernel, listed in cfg["kernel_solvers"].items():
            if kernel not in cfg["kernels"]:
                raise NeuralKernelsError(
                    f"dataset {name!r} sets kernel_solvers for {kernel!r}, which is not in its "
                    f"kernels ({', '.join(cfg['kernels']) or 'none'}); add it or remove the entry"
                )
            for item in listed:
                if item not in solvers:
                    raise NeuralKernelsError(
                        f"dataset {name!r} lists solver {item!r} for kernel {kernel!r}, which "
                        f"is not {_defined('solvers', solvers)}"
                    )
        for item in cfg["networks"]:
            if item not in networks:
                raise NeuralKernelsError(
                    f"dataset {name!r} lists network {item!r}, which is not "
                    f"{_defined('networks', networks)}; define it or remove it"
                )


def check_settings(config: dict) -> None:
    """Every estimate kernel's ``shards`` split its chunks, and every solver entry is a
    valid :class:`~neural_kernels.settings.SolverSettings` (options it does not use are
    errors), so that a bad entry fails now, not when its job runs."""
    for name, cfg in config["kernels"].items():
        if cfg["method"] != "estimate":
            continue
        try:
            settings = from_config(EstimateSettings, {**cfg, "precision": None})
            settings.shard_chunks(0, cfg.get("shards", 1))
        except NeuralKernelsError as error:
            raise NeuralKernelsError(f"config kernels.{name}: {error}") from None
    for name, cfg in config["solvers"].items():
        try:
            from_config(SolverSettings, cfg)
        except NeuralKernelsError as error:
            raise NeuralKernelsError(f"config solvers.{name}: {error}") from None


def check_config(config: dict) -> None:
    """Everything above, then that every dense solve fits the configured memory."""
    check_references(config)
    check_settings(config)
    check_solves_fit(config)
