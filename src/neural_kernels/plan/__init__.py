"""The experiment plan of a workflow config, as typed code.

``workflow/rules/common.smk`` builds one :class:`Plan` from the validated config and
wires its methods to the rules; everything the rules need lives here, where tests and
users call it from Python:

* :mod:`.checks`: what the schema cannot check (cross-references, settings that must
  hold together, dense solves that cannot fit), when the config is read;
* :mod:`.targets`: each dataset's views, kernels and solvers, every job's target, the
  seeds derived for subsets;
* :mod:`.commands`: every job's inputs and command line;
* :mod:`.jobs`: every job's device, GPUs, cores, time limit and memory request.
"""

from neural_kernels.plan.checks import check_config, check_references, check_settings
from neural_kernels.plan.commands import input_dir, output_dir
from neural_kernels.plan.jobs import Plan

__all__ = ["Plan", "check_config", "check_references", "check_settings", "input_dir", "output_dir"]
