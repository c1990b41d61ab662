# Helpers shared by the rules: config access and target lists. No science here: the
# rules call `python -m neural_kernels <stage>`; every path comes from
# neural_kernels.layout and every option from the settings classes of
# neural_kernels.settings (the package defines each once).

import json
import os

from snakemake.common.tbdstring import TBDString
from snakemake.utils import validate

from neural_kernels import layout, plan, resources
from neural_kernels.data.prepared import (
    REFIT_SPLITS,
    SPLITS,
    prepared_files,
    split_files,
    subset_files,
)
from neural_kernels.data.sources import ARCHIVES, SOURCES
from neural_kernels.layout import (
    FULL_VIEW,
    SUBSET_VIEW,
    benchmark_file,
    files,
    fits_val,
    kernel_files,
    log_file,
    shard_files,
    subset_of,
)
from neural_kernels.seeds import derived_seed
from neural_kernels.solvers.memory import solve_sizes
from neural_kernels.fields import command_line, from_config
from neural_kernels.settings import (
    DEFAULT_STORAGE,
    EstimateSettings,
    KernelSpec,
    PrepareSettings,
    SolverSettings,
    TrainSettings,
    ZcaSettings,
)

validate(config, "../schemas/config.schema.yaml")

DATASETS = config["datasets"]
KERNELS = config["kernels"]
SOLVERS = config["solvers"]
NETWORKS = config["networks"]
CONDA_ENV = "../envs/neural_kernels.yaml"
NO_MATCH = "(?!)"  # a wildcard constraint that matches nothing


def methods(method, crops=None):
    """Constraint matching the names of the kernels computed by ``method`` (and, unless
    ``crops`` is None, augmented by crops or not)."""
    names = [
        name
        for name, k in KERNELS.items()
        if k["method"] == method and crops in (None, has_crops(name))
    ]
    return "|".join(names) or NO_MATCH


def has_crops(kernel):
    """Whether a kernel is augmented by crops (its full view then scores val's centre
    crops as an eval block too)."""
    return KERNELS[kernel]["crop"] is not None


# Every name a dataset lists is defined, every entry's settings hold together, and no
# dense solve exceeds the configured memory: refused now, not after hours of kernels.
plan.check_config(config)


wildcard_constraints:
    dataset="|".join(DATASETS),
    archive="|".join(a.filename for a in ARCHIVES.values()).replace(".", r"\."),
    size=r"\d+",
    seed=r"\d+",
    kernel="|".join(KERNELS) or NO_MATCH,
    solver="|".join(SOLVERS) or NO_MATCH,
    network="|".join(NETWORKS) or NO_MATCH,
    view=f"{FULL_VIEW}|{SUBSET_VIEW}",
    shard=r"\d+",


def input_dir(wildcards, input):
    """The directory of a rule's first input file."""
    return os.path.dirname(input[0])


def output_dir(wildcards, output):
    """The directory of a rule's first output file."""
    return os.path.dirname(output[0])


def dataset_archive(name):
    """The downloaded archive of an archive-backed dataset."""
    return layout.archive_file(name, ARCHIVES[DATASETS[name]["source"]].filename)


def dataset_url(wildcards):
    cfg = DATASETS[wildcards.dataset]
    return cfg.get("url", ARCHIVES[cfg["source"]].url)


def dataset_checksum(wildcards):
    cfg = DATASETS[wildcards.dataset]
    return cfg.get("checksum", ARCHIVES[cfg["source"]].checksum)


def prepare_inputs(wildcards):
    """The archive or .npz a dataset is prepared from (nothing for digits)."""
    cfg = DATASETS[wildcards.dataset]
    source = SOURCES[cfg["source"]]
    if source.input == "archive":
        return {"archive": dataset_archive(wildcards.dataset)}
    if source.input == "npz":
        return {"npz": cfg["path"]}
    return {}


def prepare_args(wildcards, input):
    """Command-line options of `neural-kernels prepare` for one dataset."""
    cfg = DATASETS[wildcards.dataset]
    args = [f"--source {cfg['source']}", command_line(PrepareSettings, cfg)]
    if "archive" in input.keys():
        args += [
            f"--archive '{input.archive}'",
            f"--checksum {dataset_checksum(wildcards)}",
        ]
    if "npz" in input.keys():
        args.append(f"--npz '{input.npz}'")
    return " ".join(args)


def prepared_dataset(name):
    return files(layout.data_dir(name), prepared_files())


def subset_views(name):
    """The view name of every subset of a dataset."""
    cfg = DATASETS[name]["subsets"]
    return [
        layout.subset_view(size, seed) for size in cfg["sizes"] for seed in cfg["seeds"]
    ]


def zca_settings(name):
    """The global 'zca' settings with the dataset's own 'zca' entry laid over them."""
    return {**config["zca"], **DATASETS[name].get("zca", {})}


def zca_args(wildcards):
    """Command-line options of `neural-kernels zca` for one dataset: fitted on train +
    val (the leading inputs, in SPLITS order), the training set of the refit."""
    cfg = zca_settings(wildcards.dataset)
    args = [f"--fit-on {len(REFIT_SPLITS)}", command_line(ZcaSettings, cfg)]
    return " ".join(args + [f"--device {cfg['device']}"])


def zca_targets():
    return [f"{layout.zca_dir(name)}/{layout.ZCA_META}" for name in DATASETS]


def data_targets():
    """Every prepared dataset's and subset's meta.json (meta.json is written last)."""
    targets = []
    for name in DATASETS:
        targets.append(f"{layout.data_dir(name)}/{layout.DATA_META}")
        targets += [
            f"{layout.subset_dir(name, view)}/{layout.DATA_META}"
            for view in subset_views(name)
        ]
    return targets


def kernel_views(name):
    """(view, kernel names) of a dataset: the full split and every subset."""
    cfg = DATASETS[name]
    views = [(FULL_VIEW, cfg["kernels"])] if cfg["kernels"] else []
    subsets = cfg["subsets"]
    if subsets["kernels"]:
        views += [(view, subsets["kernels"]) for view in subset_views(name)]
    return views


def kernel_targets():
    """Every configured kernel directory's kernel.json (written last)."""
    return [
        f"{layout.kernel_dir(name, view, kernel)}/{layout.KERNEL_META}"
        for name in DATASETS
        for view, kernels in kernel_views(name)
        for kernel in kernels
    ]


def kernel_inputs(wildcards):
    """Whitened train/val/test images, and the subset's row indices for a subset view."""
    zca = layout.zca_dir(wildcards.dataset)
    inputs = {split: f"{zca}/{split_files(split)[0]}" for split in SPLITS}
    if not fits_val(wildcards.view):
        subset = layout.subset_dir(wildcards.dataset, wildcards.view)
        inputs["indices"] = f"{subset}/train_indices.npy"
    return inputs


def kernel_args(wildcards, input):
    """Inputs and architecture options shared by the kernel subcommands."""
    cfg = KERNELS[wildcards.kernel]
    fitted = fits_val(wildcards.view)
    args = [f"--train '{input.train}'"]
    if fitted:
        args.append(f"--val '{input.val}'")
    splits = layout.eval_splits(fitted, has_crops(wildcards.kernel))
    args += [f"--eval {split}='{input[split]}'" for split in splits]
    if "indices" in input.keys():
        args.append(f"--train-indices '{input.indices}'")
    args += [command_line(KernelSpec, cfg), f"--device {cfg['device']}"]
    if cfg["precision"] is not None:
        args.append(f"--precision {cfg['precision']}")
    return " ".join(args)


def estimate_seed(wildcards):
    """The random networks' seed: the kernel's own on the full split; on a subset, one
    derived from (kernel seed, subset seed), so that the spread over subsets covers the
    networks' randomness too."""
    seed = KERNELS[wildcards.kernel]["seed"]
    subset = subset_of(wildcards.view)
    return seed if subset is None else derived_seed(seed, subset[1])


def estimate_args(wildcards, input):
    """`neural-kernels kernel-shard` options of one shard."""
    cfg = KERNELS[wildcards.kernel]
    settings = {**cfg, "precision": None, "seed": estimate_seed(wildcards)}
    args = [kernel_args(wildcards, input), command_line(EstimateSettings, settings)]
    args += [f"--shard {wildcards.shard}", f"--shards {cfg['shards']}"]
    return " ".join(args)


def analytic_args(wildcards, input):
    """`neural-kernels kernel-analytic` options."""
    cfg = KERNELS[wildcards.kernel]
    block = f" --block-size {cfg['block_size']}" if cfg["block_size"] else ""
    return f"{kernel_args(wildcards, input)}{block}{storage_arg(wildcards)}"


def storage_arg(wildcards):
    """`--storage` of a kernel whose files are not float64 (none otherwise, so that the
    runs from before the setting keep their command lines)."""
    dtype = KERNELS[wildcards.kernel]["storage"]
    return "" if dtype == DEFAULT_STORAGE else f" --storage {dtype}"


def kernel_shard_files(wildcards):
    """Every file of every shard of an estimated kernel (all are the merge's inputs)."""
    cfg = KERNELS[wildcards.kernel]
    names = shard_files(fits_val(wildcards.view), has_crops(wildcards.kernel))
    return [
        path
        for shard in range(cfg["shards"])
        for path in files(
            layout.shard_dir(
                wildcards.dataset, wildcards.view, wildcards.kernel, shard
            ),
            names,
        )
    ]


def kernel_shard_dirs(wildcards, input):
    """The shard directories, quoted for the shell, in shard order."""
    dirs = dict.fromkeys(os.path.dirname(path) for path in input)
    return " ".join(f"'{d}'" for d in dirs)


def solve_targets():
    """Every (dataset, view, kernel, solver)'s metrics.json (written last)."""
    targets = []
    for name in DATASETS:
        cfg = DATASETS[name]
        for view, kernels in kernel_views(name):
            targets += [
                f"{layout.solve_dir(name, view, kernel, solver)}/{layout.SOLVE_METRICS}"
                for kernel in kernels
                for solver in kernel_solvers(name, view, kernel)
            ]
    return targets


def kernel_solvers(dataset, view, kernel):
    """The solvers run on a kernel: the dataset's (its subsets') list, or the full
    split's per-kernel exception ('kernel_solvers')."""
    cfg = DATASETS[dataset]
    if not fits_val(view):
        return cfg["subsets"]["solvers"]
    return cfg["kernel_solvers"].get(kernel, cfg["solvers"])


def solve_inputs(wildcards):
    """The kernel's blocks and kernel.json, and the labels (a subset's own train labels)."""
    kernel = layout.kernel_dir(wildcards.dataset, wildcards.view, wildcards.kernel)
    data = layout.data_dir(wildcards.dataset)
    blocks = kernel_files(fits_val(wildcards.view), has_crops(wildcards.kernel))
    inputs = {"kernel": files(kernel, blocks)}
    inputs |= {f"{split}_labels": f"{data}/{split_files(split)[1]}" for split in SPLITS}
    if not fits_val(wildcards.view):
        subset = layout.subset_dir(wildcards.dataset, wildcards.view)
        inputs["train_labels"] = f"{subset}/{split_files('train')[1]}"
    return inputs


def solve_args(wildcards, input):
    """`neural-kernels solve` options of one solver on one kernel."""
    cfg = SOLVERS[wildcards.solver]
    labels = " ".join(f"{split}='{input[f'{split}_labels']}'" for split in SPLITS)
    args = [
        f"--kernel-dir '{os.path.dirname(input.kernel[0])}'",
        f"--labels {labels}",
        command_line(SolverSettings, cfg),
        f"--device {cfg['device']}",
    ]
    return " ".join(args)


def network_targets():
    """Every configured network's metrics.json (written last)."""
    return [
        f"{layout.network_dir(name, network)}/{layout.NETWORK_METRICS}"
        for name, cfg in DATASETS.items()
        for network in cfg["networks"]
    ]


def network_inputs(wildcards):
    """The prepared dataset a network trains on."""
    return prepared_dataset(wildcards.dataset)


def network_args(wildcards):
    """`neural-kernels train` options of one network definition."""
    cfg = NETWORKS[wildcards.network]
    return f"{command_line(TrainSettings, cfg)} --device {cfg['device']}"


def report_inputs():
    """Every result the report reads (so it renders after all of them)."""
    return (
        data_targets()
        + zca_targets()
        + kernel_targets()
        + solve_targets()
        + network_targets()
    )


# What a job asks a cluster for (workflow/profiles/slurm). A local run is limited by
# --cores only (and by --resources, e.g. gpu=1 in workflow/profiles/local): mem_mb,
# runtime and gpu do not stop a laptop. Memory comes from neural_kernels.resources,
# evaluated when the job is ready (its inputs exist), floored by resources.min_mem_mb.


def job_device(wildcards):
    """The configured device of a GPU-capable job: its network, solver, kernel or ZCA."""
    if "network" in wildcards.keys():
        return NETWORKS[wildcards.network]["device"]
    if "solver" in wildcards.keys():
        return SOLVERS[wildcards.solver]["device"]
    if "kernel" in wildcards.keys():
        return KERNELS[wildcards.kernel]["device"]
    return zca_settings(wildcards.dataset)["device"]


# config 'gpus': whether the machines that run the jobs have GPUs ('auto': this one).
GPUS = (
    resources.machine_has_gpus() if config["gpus"] == "auto" else bool(config["gpus"])
)


def job_gpus(wildcards):
    """GPUs of a GPU-capable job: 1 on device cuda, and on auto where the machines have
    GPUs (config 'gpus'); 0 otherwise."""
    device = job_device(wildcards)
    return int(device.startswith("cuda") or (device == "auto" and GPUS))


def job_threads(wildcards):
    """Cores of a GPU-capable job (config 'threads'): a few beside a GPU, many on the CPU."""
    return config["threads"]["gpu_job" if job_gpus(wildcards) else "cpu_job"]


def job_runtime(stage):
    """The time limit (minutes) of a stage's jobs: config resources.runtime."""
    return config["resources"]["runtime"][stage]


def job_mem_mb(stage, estimate):
    """The memory (MB) of a stage's jobs: config resources.mem_mb[stage] when set, else
    ``estimate(wildcards, input)`` (neural_kernels.resources), at least min_mem_mb;
    times the attempt, so that a job killed for memory asks for more when retried."""
    cfg = config["resources"]

    def mem_mb(wildcards, input, attempt):
        if stage in cfg["mem_mb"]:
            return cfg["mem_mb"][stage] * attempt
        if not all(map(os.path.exists, input)):
            # a dry run's <TBD>: snakemake evaluates it again once the inputs exist
            return TBDString()
        return max(cfg["min_mem_mb"], estimate(wildcards, input)) * attempt

    return mem_mb


def small_job(wildcards, input):
    """A job that reads small files only (subsets, the report): the floor."""
    return 0


def prepare_estimate(wildcards, input):
    archive = sum(os.path.getsize(path) for path in input)
    return resources.prepare_mem_mb(archive)


def zca_estimate(wildcards, input):
    cfg = from_config(ZcaSettings, zca_settings(wildcards.dataset))
    return resources.zca_mem_mb(input, len(REFIT_SPLITS), cfg)


def kernel_rows(wildcards, input):
    """(fitted rows, eval rows) of a kernel job, from its inputs' .npy headers."""
    fitted = fits_val(wildcards.view)
    splits = layout.eval_splits(fitted, has_crops(wildcards.kernel))
    return resources.kernel_rows(
        input.train,
        {split: input[split] for split in splits},
        from_config(KernelSpec, KERNELS[wildcards.kernel]),
        val=input.val if fitted else None,
        train_indices=input.get("indices"),
    )


def kernel_image_shape(wildcards, input):
    """The (height, width) a kernel job's networks see: the images', or the crops'."""
    crop = KERNELS[wildcards.kernel]["crop"]
    return (crop, crop) if crop else resources.npy_shape(input.train)[1:3]


def estimate_shard_estimate(wildcards, input):
    cfg = KERNELS[wildcards.kernel]
    settings = from_config(EstimateSettings, {**cfg, "precision": None})
    on_gpu = bool(job_gpus(wildcards))
    rows = kernel_rows(wildcards, input)
    shape = kernel_image_shape(wildcards, input)
    return resources.estimate_mem_mb(*rows, shape, settings, on_gpu=on_gpu)


def merge_estimate(wildcards, input):
    shards = KERNELS[wildcards.kernel]["shards"]
    train = [path for path in input if os.path.basename(path) == "train.npy"]
    one_shard = sum(map(os.path.getsize, input)) / shards
    fitted_rows = resources.npy_shape(train[0])[0]
    return resources.merge_mem_mb(one_shard, fitted_rows, shards)


def analytic_estimate(wildcards, input):
    rows = kernel_rows(wildcards, input)
    shape = kernel_image_shape(wildcards, input)
    block_size = KERNELS[wildcards.kernel]["block_size"]
    workers = 1 if job_gpus(wildcards) else job_threads(wildcards)  # a block per thread
    return resources.analytic_mem_mb(*rows, shape, block_size, workers)


def solve_estimate(wildcards, input):
    settings = from_config(SolverSettings, SOLVERS[wildcards.solver])
    sizes = solve_sizes(input.kernel, input.train_labels)
    return resources.solve_mem_mb(settings, sizes, on_gpu=bool(job_gpus(wildcards)))


def train_estimate(wildcards, input):
    images = [path for path in input if path.endswith("_images.npy")]
    batch_size = NETWORKS[wildcards.network]["batch_size"]
    on_gpu = bool(job_gpus(wildcards))
    return resources.train_mem_mb(images, batch_size, on_gpu=on_gpu)
