"""Scale-out: config/thesis.yaml, the local and slurm profiles, GPU resources, devices.

The slurm checks need no cluster: a dry run parses the profile with
snakemake-executor-plugin-slurm loaded (its settings are validated even then), and the
plugin's own functions turn the dry run's resources into sbatch arguments and pick
partitions from the example partition file.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from snakemake.utils import validate

from conftest import copy_workflow
from miniature import make_cifar10, make_imagenet_r, make_tiny_imagenet
from neural_kernels.data.sources import ARCHIVES
from neural_kernels.device import resolve_device
from neural_kernels.errors import NeuralKernelsError
from neural_kernels.plan import Plan
from neural_kernels.report.tables import cell_solvers

REPO = Path(__file__).resolve().parents[1]
THESIS = REPO / "config/thesis.yaml"
SCHEMA = REPO / "workflow/schemas/config.schema.yaml"
SLURM = "workflow/profiles/slurm"
LOCAL = "workflow/profiles/local"
GPU_RULES = {"zca_whiten", "kernel_estimate_shard", "kernel_analytic", "solve", "train_network"}
CPU_RULES = {"download_archive", "prepare_dataset", "subset", "kernel_merge", "report"}
SLURM_ENV = ("NK_SLURM_ACCOUNT", "NK_SLURM_PARTITION", "SNAKEMAKE_SLURM_PARTITIONS")


def snakemake(workdir: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in SLURM_ENV} | (env or {})
    return subprocess.run(
        [sys.executable, "-m", "snakemake", *args],
        cwd=workdir, env=clean, capture_output=True, text=True, check=False, timeout=600,
    )  # fmt: skip


def plan_of(config: dict) -> Plan:
    """The experiment plan of ``config``, validated (defaults filled) as common.smk does."""
    validate(config, str(REPO / "workflow/schemas/config.schema.yaml"))
    return Plan(config)


def dry_run_jobs(stdout: str) -> list[dict]:
    """The jobs of a dry run: rule, wildcards, threads and resources of each.

    A ``<rule>_subset`` or ``<rule>_crops`` job (the same rule with a subset's, or a
    crop-augmented kernel's, output layout, made by ``use rule ... with:``) is counted
    as ``<rule>``.
    """
    jobs: list[dict] = []
    for line in stdout.splitlines():
        if match := re.fullmatch(r"(?:local)?rule (\w+):", line):
            rule = match.group(1).removesuffix("_subset").removesuffix("_crops")
            jobs.append({"rule": rule, "wildcards": {}, "threads": 1, "resources": {}})
        elif jobs and (match := re.fullmatch(r"    (wildcards|resources|threads): (.*)", line)):
            key, value = match.groups()
            if key == "threads":
                jobs[-1]["threads"] = int(value)
            else:
                jobs[-1][key] = dict(item.split("=", 1) for item in value.split(", "))
    return jobs


def with_defaults(config: dict) -> dict:
    """A copy of ``config`` validated, with the schema's defaults filled in."""
    config = copy.deepcopy(config)
    validate(config, str(SCHEMA))
    return config


def thesis_config() -> dict:
    """config/thesis.yaml with the schema's defaults filled in."""
    return with_defaults(yaml.safe_load(THESIS.read_text()))


def runnable_cells(thesis: dict) -> int:
    """Cells of report/thesis.yaml that an experiment of ours can fill."""
    return sum(
        "missing" not in cell and bool({"kernel", "network", "kernel_time"} & cell.keys())
        for table in thesis["tables"]
        for row in table["rows"]
        for cell in row["cells"]
    )


def expected_job_counts(config: dict) -> dict[str, int]:
    """How many jobs of each rule the config asks for (the DAG's job stats)."""
    counts = dict.fromkeys(GPU_RULES | CPU_RULES | {"kernel_merge", "all"}, 0)
    counts["report"] = counts["all"] = 1
    for cfg in config["datasets"].values():
        counts["download_archive"] += cfg["source"] in ARCHIVES
        counts["prepare_dataset"] += 1
        counts["zca_whiten"] += 1
        subsets = cfg["subsets"]
        n_subsets = len(subsets["sizes"]) * len(subsets["seeds"])
        counts["subset"] += n_subsets
        counts["train_network"] += len(cfg["networks"])
        views = [(cfg["kernels"], cfg["solvers"])] + [
            (subsets["kernels"], subsets["solvers"])
        ] * n_subsets
        for view, (kernels, solvers) in enumerate(views):
            for name in kernels:
                per_kernel = cfg.get("kernel_solvers", {}) if view == 0 else {}
                counts["solve"] += len(per_kernel.get(name, solvers))
                kernel = config["kernels"][name]
                if kernel["method"] == "analytic":
                    counts["kernel_analytic"] += 1
                else:
                    counts["kernel_estimate_shard"] += kernel["shards"]
                    counts["kernel_merge"] += 1
    return counts


def job_device(config: dict, job: dict) -> str:
    w = job["wildcards"]
    if job["rule"] == "train_network":
        return config["networks"][w["network"]]["device"]
    if job["rule"] == "solve":
        return config["solvers"][w["solver"]]["device"]
    if job["rule"].startswith("kernel_"):
        return config["kernels"][w["kernel"]]["device"]
    return {**config["zca"], **config["datasets"][w["dataset"]].get("zca", {})}["device"]


@pytest.fixture(scope="module")
def slurm_dry_run(tmp_path_factory) -> subprocess.CompletedProcess:
    """The issue's command: the thesis config through the slurm profile, dry."""
    workdir = copy_workflow(tmp_path_factory.mktemp("slurm"))
    return snakemake(workdir, "-n", "--configfile", "config/thesis.yaml", "--profile", SLURM)


@pytest.mark.workflow
def test_slurm_dry_run_resolves_the_thesis_dag_with_gpus_on_gpu_rules(slurm_dry_run):
    assert slurm_dry_run.returncode == 0, slurm_dry_run.stderr
    assert f"Using profile {SLURM}" in slurm_dry_run.stdout + slurm_dry_run.stderr
    config = thesis_config()
    jobs = dry_run_jobs(slurm_dry_run.stdout)
    counts = {
        rule: sum(job["rule"] == rule for job in jobs) for rule in expected_job_counts(config)
    }
    assert counts == expected_job_counts(config)
    # the config replaced the embedded default (digits), it was not merged into it
    assert not [job for job in jobs if job["wildcards"].get("dataset") == "digits"]
    for job in jobs:
        resources = job["resources"]
        if job["rule"] in GPU_RULES:
            wanted = "0" if job_device(config, job) == "cpu" else "1"
            assert resources.get("gpu") == wanted, job
        else:
            assert "gpu" not in resources, job
        if job["rule"] != "all":
            assert int(resources["runtime"]) > 0, job
            assert resources["mem_mb"] == "<TBD>" or int(resources["mem_mb"]) > 0, job
        # partition and account come from the environment, which sets none here
        assert not {"slurm_partition", "slurm_account"} & resources.keys(), job
    gpu_jobs = [job for job in jobs if job["resources"].get("gpu") == "1"]
    assert {job["rule"] for job in gpu_jobs} == GPU_RULES
    # the full-size solves run on the CPU (their kernels do not fit a GPU), the rest not
    cpu_solves = {job["wildcards"]["solver"] for job in jobs if job["resources"].get("gpu") == "0"}
    assert cpu_solves == {"flow_cpu", "ridge_cpu"}


def test_thesis_config_fills_every_runnable_cell_of_the_report():
    """Statically: each cell of report/thesis.yaml has an experiment in config/thesis.yaml."""
    config = thesis_config()
    tables = yaml.safe_load((REPO / "report/thesis.yaml").read_text())["tables"]
    checked = 0
    for table in tables:
        datasets = {
            name: cfg
            for name, cfg in config["datasets"].items()
            if cfg["source"] == table["dataset"]
        }
        assert datasets, table["id"]
        for row in table["rows"]:
            for cell in row["cells"]:
                if "missing" in cell or not {"kernel", "network", "kernel_time"} & cell.keys():
                    continue
                checked += 1
                found = []
                for cfg in datasets.values():
                    if "network" in cell:
                        found += [
                            name
                            for name in cfg["networks"]
                            if cell["network"].items() <= config["networks"][name].items()
                        ]
                        continue
                    spec = cell.get("kernel") or cell["kernel_time"]
                    if table["view"] == "full":
                        per_kernel = cfg.get("kernel_solvers", {})
                        kernels = {k: per_kernel.get(k, cfg["solvers"]) for k in cfg["kernels"]}
                    else:
                        assert table["subset_size"] in cfg["subsets"]["sizes"], table["id"]
                        assert len(cfg["subsets"]["seeds"]) >= 2  # a mean and a spread
                        subsets = cfg["subsets"]
                        kernels = dict.fromkeys(subsets["kernels"], subsets["solvers"])
                    for name, solvers in kernels.items():
                        methods = {config["solvers"][s]["method"] for s in solvers}
                        if "solver" in cell and not methods & set(cell_solvers(cell)):
                            continue
                        if spec.items() <= config["kernels"][name].items():
                            found.append(name)
                assert found, (
                    f"{table['id']} {row['label']}: nothing in config/thesis.yaml fills {cell}"
                )
    assert checked == runnable_cells({"tables": tables})


def test_thesis_config_sizes_shards_to_the_gpu_assumption():
    """The cost model of config/thesis.yaml's header: shards of a few GPU-hours each.

    Convolution FLOPs per image of each random network, at an assumed 40 TFLOP/s on one
    80 GB GPU, with the passes that the estimate's accumulator planner makes there.
    """
    from neural_kernels.catalog import MYRTLE_STAGES
    from neural_kernels.kernels.estimate import _passes, _row_tiles

    config = thesis_config()
    # (fitted rows: train + val, the refit's training set; test rows against them)
    splits = {"cifar10": (50_000, 10_000), "tiny_imagenet": (100_000, 10_000)}
    splits["imagenet_r"] = (27_000, 3_000)
    sides = {"myrtle11": 64, "myrtle15": 224}
    hours = {}
    for name, cfg in config["datasets"].items():
        for kernel_name in cfg["kernels"]:
            kernel = config["kernels"][kernel_name]
            if kernel["method"] != "estimate":
                continue
            side = kernel["crop"] or sides.get(kernel["arch"], 32)
            flops, channels = 0, 3
            for index, convs in enumerate(MYRTLE_STAGES[kernel["arch"]]):
                side //= 2 if index else 1
                for _ in range(convs):
                    flops += 2 * side * side * 9 * channels * kernel["width"]
                    channels = kernel["width"]
            images, n_eval = splits[name]
            n_train = images * (2 if kernel["flips"] else 1) * kernel["copies"]
            if kernel["crop"]:  # val's centre crops are scored as an eval block too
                n_eval += round(config["datasets"][name]["val_fraction"] * images)
            chunk_features = kernel["chunk_networks"] * kernel["width"]
            budget = 0.75 * (79e9 - 3 * (n_train + n_eval) * chunk_features * 4)
            tiles = _row_tiles(n_train, n_eval, kernel["tile_rows"])
            passes = len(_passes(tiles, n_train, int(budget)))
            images = passes * n_train + n_eval
            hours[kernel_name] = images * kernel["networks"] * flops / 40e12 / 3600
            per_shard = hours[kernel_name] / kernel["shards"]
            assert 0.25 < per_shard < 4, (name, kernel_name, hours, kernel["shards"])
            # an activation tensor of one batch and chunk stays near 3.4 GB
            side = kernel["crop"] or sides.get(kernel["arch"], 32)
            activation = kernel["batch_size"] * chunk_features * 4 * side * side
            assert activation < 4e9, kernel_name
    # the numbers the config's comments and the README quote
    assert round(hours["myrtle10_estimate"], 1) == 1.2
    assert round(hours["myrtle11_crop56_flips_estimate"]) == 16
    assert round(hours["myrtle15_crop196_estimate"], 1) == 3.9
    assert round(hours["myrtle15_estimate"], 1) == 4.7


@pytest.mark.workflow
def test_slurm_profile_takes_partition_and_account_from_the_environment(workdir):
    text = (REPO / SLURM / "config.v9+.yaml").read_text()
    assert not re.search(r"^\s*slurm_(partition|account): [^?]", text, flags=re.M)
    env = {"NK_SLURM_ACCOUNT": "proj42", "NK_SLURM_PARTITION": "long"}
    result = snakemake(
        workdir, "-n", "--cores", "64", "--configfile", "config/thesis.yaml", "--profile", SLURM,
        env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    jobs = [job for job in dry_run_jobs(result.stdout) if job["rule"] != "all"]
    assert jobs
    for job in jobs:
        assert job["resources"]["slurm_account"] == "proj42", job
        assert job["resources"]["slurm_partition"] == "long", job
        if job["rule"] in GPU_RULES:
            assert job["threads"] == (8 if job["resources"]["gpu"] == "1" else 32), job
    # what the plugin makes of them: its own sbatch arguments for a GPU and a CPU job
    from snakemake_executor_plugin_slurm.submit_string import get_submit_command
    from snakemake_executor_plugin_slurm.utils import set_gres_string

    def sbatch(job: dict) -> str:
        fake = fake_job(job)
        params = {
            "run_uuid": "neural-kernels_test", "slurm_logfile": "x.log", "comment_str": "c",
            "account": f"-A {fake.resources['slurm_account']}",
            "partition": f"-p {fake.resources['slurm_partition']}", "workdir": str(workdir),
        }  # fmt: skip
        return get_submit_command(fake, params) + set_gres_string(fake)

    shard = next(job for job in jobs if job["rule"] == "kernel_estimate_shard")
    call = sbatch(shard)
    # (memory: from the shard's inputs once they exist; tests/test_slurm.py sees it)
    assert "--gpus=1" in call and "--cpus-per-task=8" in call
    assert "-A proj42" in call and "-p long" in call and "-t 480" in call
    merge = next(job for job in jobs if job["rule"] == "kernel_merge")
    call = sbatch(merge)
    assert "--gpus" not in call and "--ntasks=1" in call and "--cpus-per-task=1" in call


class _Resources(dict):
    """Snakemake's job resources as the plugin reads them: .get() and attributes."""

    def __getattr__(self, name: str):
        return self[name]


def fake_job(job: dict) -> SimpleNamespace:
    """A dry-run job in the shape the plugin's functions read (numbers as ints)."""
    resources = _Resources(
        {
            key: int(value) if value.isdigit() else value
            for key, value in job["resources"].items()
            if value != "<TBD>"
        }
    )
    return SimpleNamespace(name=job["rule"], threads=job["threads"], resources=resources)


@pytest.mark.workflow
def test_example_partitions_send_gpu_jobs_to_the_gpu_partition(workdir):
    """The plugin's partition selection, reading partitions.example.yaml, per job."""
    from snakemake_executor_plugin_slurm.partitions import get_best_partition, read_partition_file

    partitions = read_partition_file(REPO / SLURM / "partitions.example.yaml")
    result = snakemake(
        workdir, "-n", "--cores", "64", "--configfile", "config/thesis.yaml", "--profile", SLURM
    )
    assert result.returncode == 0, result.stderr
    jobs = [job for job in dry_run_jobs(result.stdout) if job["rule"] != "all"]
    logger = logging.getLogger("test")
    chosen = {}
    for job in jobs:
        wants_gpu = job["resources"].get("gpu") == "1"
        name = get_best_partition(partitions, fake_job(job), logger)
        assert name == ("gpu" if wants_gpu else "cpu"), job
        chosen[job["rule"], wants_gpu] = name
    assert ("solve", False) in chosen and ("solve", True) in chosen


@pytest.mark.workflow
@pytest.mark.parametrize(
    ("setting", "message"),
    [
        # a misspelled setting of the plugin: not one of its options
        ("slurm-keep-successfull-logs: true", "unrecognized arguments"),
        # values the plugin's validator rejects (ExecutorSettings.__post_init__)
        ("slurm-init-seconds-before-status-checks: 0", "must be a positive integer"),
        ("slurm-status-command: qstat", "Invalid status command"),
        ("slurm-requeue: true\nslurm-no-requeue: true", "mutually exclusive"),
    ],
)
def test_slurm_profile_settings_are_validated_by_the_plugin(workdir, setting, message):
    profile = workdir / SLURM / "config.v9+.yaml"
    profile.write_text(profile.read_text() + setting + "\n")
    result = snakemake(workdir, "-n", "--configfile", "config/thesis.yaml", "--profile", SLURM)
    assert result.returncode != 0
    assert message in result.stdout + result.stderr


def gpu_capable_jobs(plan: Plan) -> list[SimpleNamespace]:
    """The wildcards of one job of each GPU-capable kind per configured name: ZCA per
    dataset, a kernel, a solver, a network."""
    dataset = next(iter(plan.datasets))
    jobs = [SimpleNamespace(dataset=name) for name in plan.datasets]
    jobs += [SimpleNamespace(dataset=dataset, kernel=kernel) for kernel in plan.kernels]
    jobs += [SimpleNamespace(dataset=dataset, solver=solver) for solver in plan.solvers]
    return jobs + [SimpleNamespace(dataset=dataset, network=n) for n in plan.networks]


@pytest.mark.workflow
def test_no_job_asks_for_a_gpu_where_the_config_says_there_are_none(workdir):
    """'gpus: false' (--config gpus=False for the thesis config on a CPU-only cluster;
    'auto', the default, on this machine without an NVIDIA GPU): device auto asks for
    no GPU and the CPU's cores; 'gpus: true' for a GPU and the GPU job's cores. The
    plan decides (neural_kernels.plan.jobs); one dry run shows the rules ask it."""
    result = snakemake(workdir, "-n", "--profile", SLURM)
    assert result.returncode == 0, result.stderr
    jobs = [job for job in dry_run_jobs(result.stdout) if job["rule"] in GPU_RULES]
    assert jobs and {job["resources"]["gpu"] for job in jobs} == {"0"}
    assert {job["threads"] for job in jobs} == {1}
    thesis = yaml.safe_load((workdir / "config/thesis.yaml").read_text())
    for gpus, asked, threads in ((False, {0}, {32}), (True, {1}, {8})):
        plan = plan_of({**copy.deepcopy(thesis), "gpus": gpus})
        jobs = gpu_capable_jobs(plan)
        auto = [job for job in jobs if plan.job_device(job) == "auto"]
        assert auto and {plan.job_gpus(job) for job in auto} == asked, gpus
        assert {plan.job_threads(job) for job in auto} == threads, gpus
    # device cuda asks for one all the same
    config = yaml.safe_load((workdir / "config/config.yaml").read_text())
    config["kernels"]["myrtle7_analytic"]["device"] = "cuda"
    plan = plan_of({**config, "gpus": False})
    asking = {getattr(job, "kernel", None) for job in gpu_capable_jobs(plan) if plan.job_gpus(job)}
    assert asking == {"myrtle7_analytic"}


def test_the_config_overrides_memory_and_time_limits(tmp_path):
    """resources.mem_mb, runtime and min_mem_mb as the plan hands them to the rules (the
    slurm dry run above shows the rules ask for what the plan says)."""
    config = yaml.safe_load((REPO / "config/config.yaml").read_text())
    config["resources"] = {
        "min_mem_mb": 3000,
        "mem_mb": {"solve": 5000},
        "runtime": {"kernel_analytic": 60},
    }
    validate(config, str(REPO / "workflow/schemas/config.schema.yaml"))
    plan = Plan(config, pending=lambda: "<TBD>")
    job = SimpleNamespace(dataset="digits", kernel="myrtle5_analytic", solver="flow")
    solve = plan.job_mem_mb("solve", plan.solve_estimate)
    # the override, doubled on the second attempt (a job killed for memory asks for more)
    assert (solve(job, [], attempt=1), solve(job, [], attempt=2)) == (5000, 10000)
    assert plan.job_runtime("kernel_analytic") == 60
    assert plan.job_runtime("kernel_estimate_shard") == 480  # the default
    # prepare (digits: no input) is sized now: the floor; the rest once inputs exist
    assert plan.job_mem_mb("prepare_dataset", plan.prepare_estimate)(job, [], attempt=1) == 3000
    zca = plan.job_mem_mb("zca_whiten", plan.zca_estimate)
    assert zca(job, [str(tmp_path / "train.npy")], attempt=1) == "<TBD>"


@pytest.mark.workflow
@pytest.mark.parametrize(
    ("env", "message"),
    [
        # the profile hands both to the plugin, which validates them
        ({"NK_SLURM_STATUS_COMMAND": "qstat"}, "Invalid status command"),
        ({"NK_SLURM_STATUS_WAIT": "0"}, "must be a positive integer"),
    ],
)
def test_status_settings_come_from_the_environment(workdir, env, message):
    result = snakemake(workdir, "-n", "--profile", SLURM, env=env)
    assert result.returncode != 0
    assert message in result.stdout + result.stderr


@pytest.mark.workflow
def test_local_profile_resolves_the_thesis_dag(workdir):
    result = snakemake(
        workdir, "-n", "--cores", "4", "--configfile", "config/thesis.yaml", "--profile", LOCAL
    )
    assert result.returncode == 0, result.stderr
    assert f"Using profile {LOCAL}" in result.stdout + result.stderr
    counts = expected_job_counts(thesis_config())
    assert len(dry_run_jobs(result.stdout)) == sum(counts.values())


def test_a_stage_logs_the_device_it_runs_on(caplog):
    with caplog.at_level(logging.INFO, logger="neural_kernels.device"):
        device = resolve_device("auto", stage="solve (flow)")
        resolve_device("cpu", stage="zca")
        resolve_device("cpu")  # no stage: no line
    lines = [r.getMessage() for r in caplog.records]
    if device.type == "cpu":
        assert lines[0] == "solve (flow) runs on cpu (device auto: torch sees no CUDA GPU)"
    else:
        assert lines[0].startswith("solve (flow) runs on ") and "auto" not in lines[0]
    assert lines[1:] == ["zca runs on cpu"]


# ---------------------------------------------------------------------------------
# The thesis config end to end, on miniature archives of every kind, on the CPU.

MINIATURES = {
    "cifar10": lambda path: make_cifar10(path, per_batch=10, n_test=10),  # 50 + 10 images
    "tiny_imagenet": make_tiny_imagenet,  # 4 classes: 40 + 12 images, 64x64
    "imagenet_r": make_imagenet_r,  # 3 classes: 30 images
}
SUBSET_SIZE = 10  # one image per class


def md5_of(path: Path) -> str:
    return "md5:" + hashlib.md5(path.read_bytes()).hexdigest()


def miniature_thesis_config(server) -> dict:
    """config/thesis.yaml with its archives on the loopback server and its sizes shrunk.

    Only sizes change (and the addresses): every dataset, kernel, solver and network
    definition, list and flag of the real config is kept.
    """
    config = yaml.safe_load(THESIS.read_text())
    for cfg in config["datasets"].values():
        filename = ARCHIVES[cfg["source"]].filename
        path = server.root / filename
        if not path.exists():
            MINIATURES[cfg["source"]](path)
        cfg["url"], cfg["checksum"] = server.url(filename), md5_of(path)
        if cfg["source"] == "cifar10":
            cfg["val_fraction"] = 0.2  # one image per class
        if cfg["source"] == "imagenet_r":
            cfg["image_size"] = 196  # the thesis's RandomCrop(196) needs it; Myrtle15 32
        if cfg.get("zca", {}).get("rank"):
            cfg["zca"]["rank"] = 8
        if cfg.get("subsets", {}).get("sizes"):
            cfg["subsets"] |= {"sizes": [SUBSET_SIZE], "seeds": [0, 1]}
    for kernel in config["kernels"].values():
        if kernel["method"] == "estimate":  # one network of 4 channels: one shard
            kernel |= {"width": 4, "networks": 1, "chunk_networks": 1, "shards": 1}
            kernel["batch_size"] = 16
    for solver in config["solvers"].values():
        if solver["method"] == "boosting":
            solver |= {"batch_size": 16, "steps": 2}
    for network in config["networks"].values():
        network |= {"epochs": 1, "batch_size": 16}
        if network["model"] != "resnet18":
            network["width"] = 8
    return config


@pytest.mark.workflow
def test_thesis_config_runs_end_to_end_on_miniature_archives(workdir, archive_server):
    config = miniature_thesis_config(archive_server)
    (workdir / "mini.yaml").write_text(yaml.safe_dump(config))
    # T2 is about 1280-image subsets; the miniature's are smaller
    thesis = yaml.safe_load((workdir / "report/thesis.yaml").read_text())
    for table in thesis["tables"]:
        if table.get("subset_size"):
            table["subset_size"] = SUBSET_SIZE
    (workdir / "report/thesis.yaml").write_text(yaml.safe_dump(thesis, allow_unicode=True))

    # one thread a job: two of these small jobs at a time on 2 cores, not one
    result = snakemake(
        workdir, "--cores", "2", "--max-threads", "1", "--scheduler", "greedy",
        "--configfile", "mini.yaml",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    counts = expected_job_counts(with_defaults(config))
    results = workdir / "results"
    solves = sorted(results.glob("solve/*/*/*/*/metrics.json"))
    assert len(solves) == counts["solve"]
    kernels = sorted(results.glob("kernels/*/*/*/kernel.json"))
    assert len(kernels) == counts["kernel_merge"] + counts["kernel_analytic"]
    assert not list(results.glob("kernels/*/*/*/shards"))  # merged, then deleted
    networks = sorted(results.glob("networks/*/*/metrics.json"))
    assert len(networks) == counts["train_network"]
    for path in solves + kernels + networks:
        record = json.loads(path.read_text())
        assert "cpu" in (record.get("devices") or [record.get("device")]), path
    for name in config["datasets"]:
        assert json.loads((results / f"zca/{name}/zca.json").read_text())["device"] == "cpu"
    # every GPU-capable stage says in its log on which device it ran
    for rule in GPU_RULES:
        logs = list((results / "logs" / rule).rglob("*.log"))
        assert logs, rule
        for log in logs:
            assert " runs on cpu" in log.read_text(), log

    # the report fills every cell the thesis config runs, from these results
    from neural_kernels.report.collect import collect
    from neural_kernels.report.tables import fill_tables, load_thesis

    tables = fill_tables(load_thesis(workdir / "report/thesis.yaml"), collect(results))
    statuses = {
        (table.id, row.label, cell.column): cell.status
        for table in tables
        for row in table.rows
        for cell in row.cells
    }
    assert set(statuses.values()) <= {"ok", "missing", "empty"}, statuses
    assert list(statuses.values()).count("ok") == runnable_cells(thesis)
    assert (workdir / "report/report.html").stat().st_size > 0


def test_miniature_config_keeps_the_thesis_structure(archive_server):
    """The shrinking changes sizes only: the same datasets, kernels, solvers, networks."""
    mini = miniature_thesis_config(archive_server)
    real = yaml.safe_load(THESIS.read_text())
    assert mini.keys() == real.keys()
    for section in ("datasets", "kernels", "solvers", "networks"):
        assert mini[section].keys() == real[section].keys(), section
    for name, cfg in real["datasets"].items():
        for key in ("source", "kernels", "solvers", "networks"):
            assert mini["datasets"][name].get(key) == cfg.get(key), (name, key)
        subsets = mini["datasets"][name].get("subsets", {})
        assert subsets.get("kernels") == cfg.get("subsets", {}).get("kernels"), name
    for name, kernel in real["kernels"].items():
        for key in ("arch", "method", "activation", "flips", "precision"):
            assert mini["kernels"][name].get(key) == kernel.get(key), (name, key)
    for name, network in real["networks"].items():
        for key in ("model", "crop", "flip"):
            assert mini["networks"][name].get(key) == network.get(key), (name, key)
    validate(mini, str(SCHEMA))


def test_readme_full_reproduction_commands_name_real_files():
    """The section's commands use the profiles and config that this repository has."""
    text = (REPO / "README.md").read_text()
    section = text.split("## Running the full reproduction", 1)[1].split("\n## ", 1)[0]
    commands = [
        line.strip()
        for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S)
        for line in block.splitlines()
        if line.strip()
    ]
    assert any("--profile workflow/profiles/local" in c for c in commands)
    assert any("--profile workflow/profiles/slurm" in c and " -n " in c for c in commands)
    assert "neural-kernels report --results results --out-dir report" in commands
    for command in commands:
        for flag in ("--profile", "--configfile"):
            for path in re.findall(rf"{flag} (\S+)", command):
                assert (REPO / path).exists(), command
    for variable in ("NK_SLURM_ACCOUNT", "NK_SLURM_PARTITION"):
        assert variable in (REPO / SLURM / "config.v9+.yaml").read_text()


def test_a_solve_no_node_or_gpu_can_hold_is_refused_before_any_job(workdir):
    """The plan refuses it (neural_kernels.sizing.check_solves_fit); one dry run shows
    Snakemake stops there, before any job."""
    config = yaml.safe_load(THESIS.read_text())
    config["datasets"]["tiny_imagenet"]["solvers"].append("flow_cpu")
    (workdir / "sized.yaml").write_text(yaml.safe_dump(config))
    result = snakemake(workdir, "-n", "--configfile", "sized.yaml")
    out = result.stdout + result.stderr
    assert result.returncode != 0
    assert (
        "tiny_imagenet/myrtle11_crop56_flips_estimate/flow_cpu: flow holds 1314 GB (200000 "
        "fitted rows, a 320 GB block, 4 times) but a node has 256 GB" in out
    ), out[-3000:]
    assert "Use boosting or pcg, which stream the kernel from disk" in out
    config["resources"]["node_mem_mb"] = 1_400_000  # a node with the memory passes
    plan_of(copy.deepcopy(config))
    # a streaming solver's grid too big for the GPU is refused too
    config["resources"]["gpu_mem_mb"] = 20_000
    with pytest.raises(NeuralKernelsError) as refused:
        plan_of(copy.deepcopy(config))
    assert (
        "tiny_imagenet/myrtle11_crop56_flips_estimate/pcg_large: pcg holds 31 GB (200000 + "
        "20000 rows x 200 classes x its grid) but a GPU has 20 GB" in str(refused.value)
    )
