# The thesis reproduction as one DAG. Targets:
#   all   -- everything the config asks for (default)
#   data  -- prepared datasets and their subsets only
#   zca   -- ZCA-whitened splits of every dataset
#   kernels -- every configured kernel (estimated and analytic)
#   solvers -- kernel regression (flow, ridge, boosting) on every kernel
#   networks -- trained baselines (ResNet18, finite Myrtle networks)
#   report -- report/report.html and report.md: the thesis tables beside ours
# See README.md for the config files and the output layout.

from snakemake.utils import min_version

min_version("9.0")

# The embedded default, unless --configfile names configs: they replace it (Snakemake
# would merge them into it), so a complete config such as config/thesis.yaml runs
# exactly what it lists.
if not workflow.overwrite_configfiles:

    configfile: "config/config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/zca.smk"
include: "workflow/rules/kernels.smk"
include: "workflow/rules/solve.smk"
include: "workflow/rules/networks.smk"
include: "workflow/rules/report.smk"


rule all:
    default_target: True
    input:
        PLAN.data_targets(),
        PLAN.zca_targets(),
        PLAN.kernel_targets(),
        PLAN.solve_targets(),
        PLAN.network_targets(),
        "report/report.html",
        "report/report.md",


rule data:
    input:
        PLAN.data_targets(),


rule zca:
    input:
        PLAN.zca_targets(),


rule kernels:
    input:
        PLAN.kernel_targets(),


rule solvers:
    input:
        PLAN.solve_targets(),


rule networks:
    input:
        PLAN.network_targets(),
