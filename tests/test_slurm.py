"""The slurm profile and the solvers' memory on a real one-node SLURM cluster that
enforces memory (tests/slurm_cluster.py: task/cgroup, ConstrainRAMSpace).

* A small target of the default config (six jobs: prepare, subset, zca, one estimate
  shard, its merge, a solve) goes through ``workflow/profiles/slurm`` on a CPU-only
  node of 2 cores and 16 GB with no accounting; its outputs must equal a local run's,
  bit for bit, and every sbatch job must have asked for what the node has: no GPU,
  memory within 16 GB. Its solve is given too little memory on purpose: killed, it is
  retried with twice (and three times) as much until it completes (the workflow scales
  mem_mb by the attempt).
* The memory limit is real: a job that allocates past its ``--mem`` is killed; under a
  cap of half a kernel's train block, boosting and pcg complete with an uncapped run's
  accuracies, and flow refuses in seconds with one line, writing nothing.

Skipped, with the reason, where the daemons cannot start (not root, SLURM not
installed, another cluster's configuration in /etc/slurm, no writable memory cgroup,
daemons that do not start).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import slurm_cluster
import yaml
from test_profiles import SLURM, snakemake

from conftest import REPO, copy_workflow
from neural_kernels.solvers.stage import SolverSettings, solve_files

BENCHMARK = REPO / "benchmarks/solvers.py"
TARGET = "results/solve/digits/n200-seed0/myrtle5_estimate_small/flow/metrics.json"
#: What README's cluster section tells a CPU-only cluster without accounting to set.
CLUSTER_ENV = {"NK_SLURM_STATUS_COMMAND": "squeue", "NK_SLURM_STATUS_WAIT": "3"}
NODE_MEM_MB = 16000
#: Too little for a solve (Python and torch alone hold 0.53 GB, beside the job step's
#: snakemake): the first attempt fails, and a retry asks for this times the attempt.
SOLVE_FIRST_MB = 500
#: The capped solves' kernel: 14000 fitted rows, a 1.57 GB float64 train block. Half of
#: it, the cap, leaves room for Python and torch (0.29 GB anonymous, 0.24 GB of code).
ROWS, EVAL_ROWS = 14_000, 1_000
FINAL_STATES = {"COMPLETED", "FAILED", "OUT_OF_MEMORY", "CANCELLED", "TIMEOUT", "NODE_FAIL"}
#: The streaming solvers as the capped jobs run them (small, so that the test is quick).
STREAMING = {
    "boosting": ["--batch-size", "2000", "--steps", "1", "--eta-t", "1000"],
    "pcg": ["--rank", "300", "--lambdas", "1.0", "--tolerance", "1e-4"],
}


def _solvers_benchmark():
    """benchmarks/solvers.py, whose on-disk RBF kernel the capped solves read."""
    spec = importlib.util.spec_from_file_location("solvers_benchmark", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """One enforcing single-node cluster for this module's tests."""
    reason = slurm_cluster.unavailable()
    if reason:
        pytest.skip(reason)
    try:
        with slurm_cluster.single_node_cluster(
            tmp_path_factory.mktemp("slurm"), mem_mb=NODE_MEM_MB
        ) as root:
            yield root
    except slurm_cluster.ClusterUnavailable as error:
        pytest.skip(f"the SLURM daemons cannot start here: {error}")


def _outputs(workdir: Path) -> dict[str, Path]:
    """Every result file of a run but its logs and benchmarks."""
    results = workdir / "results"
    return {
        str(path.relative_to(results)): path
        for path in results.rglob("*")
        if path.is_file() and path.relative_to(results).parts[0] not in ("logs", "benchmarks")
    }


def _sbatch_jobs(ids: list[str]) -> list[dict[str, str]]:
    """The cluster's jobs ``ids`` (MinJobAge keeps finished ones), as scontrol shows them."""
    result = subprocess.run(
        ["scontrol", "show", "job", "--oneliner"], capture_output=True, text=True, check=True
    )
    jobs = [
        dict(item.split("=", 1) for item in line.split() if "=" in item)
        for line in result.stdout.splitlines()
    ]
    return [job for job in jobs if job.get("JobId") in ids]


def _memory_mb(job: dict[str, str]) -> int:
    return int(re.fullmatch(r"(\d+)M", job["MinMemoryNode"]).group(1))


@pytest.mark.workflow
def test_the_slurm_profile_runs_the_default_config_on_a_cpu_only_cluster(cluster, tmp_path):
    local = copy_workflow(_mkdir(tmp_path / "local"))
    result = snakemake(local, "--cores", "2", TARGET)
    assert result.returncode == 0, result.stderr[-3000:]

    workdir = copy_workflow(_mkdir(tmp_path / "cluster"))
    config_file = workdir / "config" / "config.yaml"  # (snakemake --config passes strings)
    config = yaml.safe_load(config_file.read_text())
    config.setdefault("resources", {}).setdefault("mem_mb", {})["solve"] = SOLVE_FIRST_MB
    config_file.write_text(yaml.safe_dump(config))
    result = snakemake(workdir, "--profile", SLURM, TARGET, env=CLUSTER_ENV)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-5000:]

    submitted = re.findall(r"has been submitted with SLURM jobid (\d+)", log)
    jobs = _sbatch_jobs(submitted)
    assert len(jobs) == len(submitted), (submitted, jobs)
    for job in jobs:
        assert "gpu" not in job["TRES"], job  # no GPU asked of a CPU-only node
        assert SOLVE_FIRST_MB <= _memory_mb(job) <= NODE_MEM_MB, job
    solves = [job for job in jobs if job.get("Comment", "").startswith("rule_solve")]
    others = [job for job in jobs if job not in solves]
    assert len(others) == 5 and {job["JobState"] for job in others} == {"COMPLETED"}, others
    # the starved solve failed, and each retry asked for its first request times the
    # attempt (snakemake's `attempt` scales mem_mb) until one completed
    states = [job["JobState"] for job in solves]
    assert len(solves) >= 2 and states[-1] == "COMPLETED", solves
    assert set(states[:-1]) <= {"FAILED", "OUT_OF_MEMORY"}, solves
    asked_mb = [_memory_mb(job) for job in solves]
    assert asked_mb == [SOLVE_FIRST_MB * attempt for attempt in range(1, len(solves) + 1)]
    # a job's memory follows its inputs (the ZCA's three 256 MiB row blocks, at least)
    asked = dict(re.findall(r"rule (\w+):.*?mem_mb=(\d+)", log, flags=re.S))
    assert int(asked["zca_whiten"]) > 2000, asked

    ours, theirs = _outputs(workdir), _outputs(local)
    assert ours.keys() == theirs.keys()
    for name, path in ours.items():
        if path.suffix == ".npy":
            np.testing.assert_array_equal(np.load(path), np.load(theirs[name]), err_msg=name)
        elif path.suffix == ".npz":
            with np.load(path) as a, np.load(theirs[name]) as b:
                assert a.keys() == b.keys(), name
                for key in a:
                    np.testing.assert_array_equal(a[key], b[key], err_msg=f"{name}: {key}")
    metrics = [json.loads(p.read_text()) for p in (workdir / TARGET, local / TARGET)]
    assert metrics[0]["test_accuracy"] == metrics[1]["test_accuracy"]
    selected = [{k: v for k, v in m["selected"].items() if k != "seconds"} for m in metrics]
    assert selected[0] == selected[1]


def _sbatch(root: Path, name: str, mem_mb: int, command: str) -> str:
    result = subprocess.run(
        ["sbatch", "--parsable", f"--mem={mem_mb}", "--cpus-per-task=1", f"--job-name={name}",
         f"--output={root / name}.log", f"--chdir={root}", "--wrap", command],
        capture_output=True, text=True, check=True,
        env=os.environ | {"OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    return result.stdout.strip().split(";")[0]


def _wait(ids: list[str], timeout: float = 600) -> list[dict[str, str]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        jobs = _sbatch_jobs(ids)
        if len(jobs) == len(ids) and all(job["JobState"] in FINAL_STATES for job in jobs):
            return jobs
        time.sleep(1)
    raise AssertionError(f"jobs still running after {timeout} s: {_sbatch_jobs(ids)}")


def _solve_command(kernel_dir: Path, labels: dict[str, Path], method: str, out: Path) -> str:
    label_args = " ".join(f"{split}={path}" for split, path in labels.items())
    extra = " ".join(STREAMING.get(method, []))
    return (
        f"{sys.executable} -m neural_kernels solve --kernel-dir {kernel_dir} --labels "
        f"{label_args} --method {method} {extra} --out-dir {out}"
    )


@pytest.mark.workflow
def test_a_memory_cap_kills_hogs_refuses_dense_solves_and_streams_the_rest(cluster, tmp_path):
    kernel_dir, labels = _solvers_benchmark().write_rbf_kernel(tmp_path, ROWS, EVAL_ROWS)
    cap_mb = 8 * ROWS * ROWS // 2 // 2**20  # half the train block: 747 MB
    hog = f"{sys.executable} -c 'import numpy; a = numpy.ones({2 * cap_mb} << 17); print(a.sum())'"
    ids = {"hog": _sbatch(tmp_path, "hog", cap_mb, hog)}
    for method in ("flow", "boosting", "pcg"):
        command = _solve_command(kernel_dir, labels, method, tmp_path / method)
        ids[method] = _sbatch(tmp_path, method, cap_mb, command)

    uncapped = {}  # meanwhile, the same solves in this process, without a cap
    for method, options in STREAMING.items():
        settings = {"boosting": {"batch_size": 2000, "steps": 1, "eta_t": (1000.0,)},
                    "pcg": {"rank": 300, "lambdas": (1.0,), "tolerance": 1e-4}}[method]  # fmt: skip
        assert len(options) == 2 * len(settings)
        uncapped[method] = solve_files(
            kernel_dir, labels, tmp_path / f"{method}_uncapped",
            SolverSettings(method, **settings), progress=False,
        )  # fmt: skip

    jobs = {job["JobName"]: job for job in _wait(list(ids.values()))}
    assert jobs["hog"]["JobState"] == "OUT_OF_MEMORY", jobs["hog"]  # the limit is real
    refusal = (tmp_path / "flow.log").read_text()
    assert jobs["flow"]["JobState"] == "FAILED" and jobs["flow"]["ExitCode"] == "1:0", refusal
    assert re.search(r"would hold \d+\.\d+ GiB .* but this job has \d+\.\d+ GiB", refusal)
    assert "--method boosting or --method pcg" in refusal and "cgroup" in refusal
    hours, minutes, seconds = map(int, jobs["flow"]["RunTime"].split(":"))
    assert hours == minutes == 0 and seconds < 30, jobs["flow"]  # fails fast
    assert not (tmp_path / "flow").exists()  # and writes nothing
    for method in STREAMING:
        log = (tmp_path / f"{method}.log").read_text()
        assert jobs[method]["JobState"] == "COMPLETED", (jobs[method], log[-3000:])
        capped = json.loads((tmp_path / method / "metrics.json").read_text())
        for a, b in zip(capped["grid"], uncapped[method]["grid"], strict=True):
            assert a["accuracy"] == b["accuracy"], (a, b)
        assert capped["test_accuracy"] == uncapped[method]["test_accuracy"] > 0.9
        with (
            np.load(tmp_path / method / "predictions.npz") as a,
            np.load(tmp_path / f"{method}_uncapped" / "predictions.npz") as b,
        ):
            np.testing.assert_allclose(a["test_scores"], b["test_scores"], rtol=1e-5, atol=1e-6)


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True)
    return path
