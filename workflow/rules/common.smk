# Helpers shared by the rules: config access and target lists. No science here: the
# rules call `python -m neural_kernels <stage>`; file layouts come from the package.

import os

from snakemake.utils import validate

from neural_kernels.data.prepared import SPLITS, prepared_files, subset_files
from neural_kernels.data.sources import ARCHIVES

validate(config, "../schemas/config.schema.yaml")

DATASETS = config["datasets"]
CONDA_ENV = "../envs/neural_kernels.yaml"


wildcard_constraints:
    dataset="|".join(DATASETS),
    archive="|".join(a.filename for a in ARCHIVES.values()).replace(".", r"\."),
    size=r"\d+",
    seed=r"\d+",


def input_dir(wildcards, input):
    """The directory of a rule's first input file."""
    return os.path.dirname(input[0])


def output_dir(wildcards, output):
    """The directory of a rule's first output file."""
    return os.path.dirname(output[0])


def dataset_archive(name):
    """resources/<name>/<official file name> of an archive-backed dataset."""
    return f"resources/{name}/{ARCHIVES[DATASETS[name]['source']].filename}"


def dataset_url(wildcards):
    cfg = DATASETS[wildcards.dataset]
    return cfg.get("url", ARCHIVES[cfg["source"]].url)


def dataset_checksum(wildcards):
    cfg = DATASETS[wildcards.dataset]
    return cfg.get("checksum", ARCHIVES[cfg["source"]].checksum)


def prepare_inputs(wildcards):
    """The archive or .npz a dataset is prepared from (nothing for digits)."""
    cfg = DATASETS[wildcards.dataset]
    if cfg["source"] in ARCHIVES:
        return {"archive": dataset_archive(wildcards.dataset)}
    if cfg["source"] == "custom":
        return {"npz": cfg["path"]}
    return {}


def prepare_args(wildcards, input):
    """Command-line options of `neural-kernels prepare` for one dataset."""
    cfg = DATASETS[wildcards.dataset]
    args = [
        f"--source {cfg['source']}",
        f"--val-fraction {cfg['val_fraction']}",
        f"--seed {cfg['seed']}",
        f"--image-size {cfg['image_size']}",
    ]
    if cfg["test_fraction"] is not None:
        args.append(f"--test-fraction {cfg['test_fraction']}")
    if "archive" in input.keys():
        args += [
            f"--archive '{input.archive}'",
            f"--checksum {dataset_checksum(wildcards)}",
        ]
    if "npz" in input.keys():
        args.append(f"--npz '{input.npz}'")
    return " ".join(args)


def prepared_dataset(name):
    return [f"results/data/{name}/{f}" for f in prepared_files()]


def subset_dirs(name):
    cfg = DATASETS[name]["subsets"]
    return [
        f"results/data/{name}/subsets/n{size}-seed{seed}"
        for size in cfg["sizes"]
        for seed in cfg["seeds"]
    ]


def zca_settings(name):
    """The global 'zca' settings with the dataset's own 'zca' entry laid over them."""
    return {**config["zca"], **DATASETS[name].get("zca", {})}


def zca_args(wildcards):
    """Command-line options of `neural-kernels zca` for one dataset."""
    cfg = zca_settings(wildcards.dataset)
    args = [
        f"--variant {cfg['variant']}",
        f"--solver {cfg['solver']}",
        f"--oversample {cfg['oversample']}",
        f"--power-iters {cfg['power_iters']}",
        f"--seed {cfg['seed']}",
        f"--device {cfg['device']}",
        f"--dtype {cfg['dtype']}",
    ]
    if cfg["rank"] is not None:
        args.append(f"--rank {cfg['rank']}")
    if cfg["eps"] is not None:
        args.append(f"--eps {cfg['eps']}")
    if cfg["flips"]:
        args.append("--flips")
    return " ".join(args)


def zca_targets():
    return [f"results/zca/{name}/zca.json" for name in DATASETS]


def data_targets():
    """Every prepared dataset's and subset's meta.json (meta.json is written last)."""
    targets = []
    for name in DATASETS:
        targets.append(f"results/data/{name}/meta.json")
        targets += [f"{d}/meta.json" for d in subset_dirs(name)]
    return targets
