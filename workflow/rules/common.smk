# Wiring only: the experiment plan is neural_kernels.plan (typed, tested code). This
# file validates the config, builds the plan (which checks cross-references, settings
# and memory when the config is read) and names what the rules use; every path comes
# from neural_kernels.layout and every option from neural_kernels.settings.

import json

from snakemake.common.tbdstring import TBDString
from snakemake.utils import validate

from neural_kernels import layout
from neural_kernels.data.prepared import (
    SPLITS,
    prepared_files,
    split_files,
    subset_files,
)
from neural_kernels.data.sources import ARCHIVES
from neural_kernels.layout import (
    FULL_VIEW,
    SUBSET_VIEW,
    benchmark_file,
    files,
    kernel_files,
    log_file,
    shard_files,
)
from neural_kernels.plan import Plan, input_dir, output_dir

validate(config, "../schemas/config.schema.yaml")

# Refuses now, not after hours of kernels: an undefined name, settings that do not hold
# together, a dense solve that no configured node or GPU can hold.
PLAN = Plan(config, pending=TBDString)
CONDA_ENV = "../envs/neural_kernels.yaml"


wildcard_constraints:
    dataset="|".join(PLAN.datasets),
    archive="|".join(a.filename for a in ARCHIVES.values()).replace(".", r"\."),
    size=r"\d+",
    seed=r"\d+",
    kernel=PLAN.constraint("kernels"),
    solver=PLAN.constraint("solvers"),
    network=PLAN.constraint("networks"),
    view=f"{FULL_VIEW}|{SUBSET_VIEW}",
    shard=r"\d+",
