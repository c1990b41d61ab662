"""The slurm profile against a real one-node SLURM cluster (tests/slurm_cluster.py).

A small target of the default config (six jobs: prepare, subset, zca, one estimate
shard, its merge, a solve) goes through ``workflow/profiles/slurm`` on a CPU-only node
of 2 cores and 16 GB with no accounting; its outputs must equal a local run's, bit for
bit, and every sbatch job must have asked for what the node has: no GPU, memory within
16 GB. Skipped, with the reason, where the daemons cannot start (not root, SLURM not
installed, another cluster's configuration in /etc/slurm, daemons that do not start).
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import slurm_cluster
from test_profiles import SLURM, snakemake

from conftest import copy_workflow

TARGET = "results/solve/digits/n200-seed0/myrtle5_estimate_small/flow/metrics.json"
#: What README's cluster section tells a CPU-only cluster without accounting to set.
CLUSTER_ENV = {"NK_SLURM_STATUS_COMMAND": "squeue", "NK_SLURM_STATUS_WAIT": "3"}
NODE_MEM_MB = 16000


def _outputs(workdir: Path) -> dict[str, Path]:
    """Every result file of a run but its logs and benchmarks."""
    results = workdir / "results"
    return {
        str(path.relative_to(results)): path
        for path in results.rglob("*")
        if path.is_file() and path.relative_to(results).parts[0] not in ("logs", "benchmarks")
    }


def _sbatch_jobs() -> list[dict[str, str]]:
    """The cluster's jobs (MinJobAge keeps finished ones), as scontrol shows them."""
    result = subprocess.run(
        ["scontrol", "show", "job", "--oneliner"], capture_output=True, text=True, check=True
    )
    return [
        dict(item.split("=", 1) for item in line.split() if "=" in item)
        for line in result.stdout.splitlines()
    ]


@pytest.mark.workflow
@pytest.mark.skipif(bool(slurm_cluster.unavailable()), reason=str(slurm_cluster.unavailable()))
def test_the_slurm_profile_runs_the_default_config_on_a_cpu_only_cluster(tmp_path):
    local = copy_workflow(_mkdir(tmp_path / "local"))
    result = snakemake(local, "--cores", "2", TARGET)
    assert result.returncode == 0, result.stderr[-3000:]

    cluster = copy_workflow(_mkdir(tmp_path / "cluster"))
    try:
        with slurm_cluster.single_node_cluster(_mkdir(tmp_path / "slurm"), mem_mb=NODE_MEM_MB):
            result = snakemake(cluster, "--profile", SLURM, TARGET, env=CLUSTER_ENV)
            jobs = _sbatch_jobs()
    except slurm_cluster.ClusterUnavailable as error:
        pytest.skip(f"the SLURM daemons cannot start here: {error}")
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-5000:]

    submitted = re.findall(r"has been submitted with SLURM jobid (\d+)", log)
    assert len(submitted) == 6, log[-3000:]
    assert len(jobs) == 6 and {job["JobState"] for job in jobs} == {"COMPLETED"}, jobs
    for job in jobs:
        assert "gpu" not in job["TRES"], job  # no GPU asked of a CPU-only node
        memory = int(re.fullmatch(r"(\d+)M", job["MinMemoryNode"]).group(1))
        assert 2000 <= memory <= NODE_MEM_MB, job
    # a job's memory follows its inputs (the ZCA's three 256 MiB row blocks, at least)
    asked = dict(re.findall(r"rule (\w+):.*?mem_mb=(\d+)", log, flags=re.S))
    assert int(asked["zca_whiten"]) > 2000, asked

    ours, theirs = _outputs(cluster), _outputs(local)
    assert ours.keys() == theirs.keys()
    for name, path in ours.items():
        if path.suffix == ".npy":
            np.testing.assert_array_equal(np.load(path), np.load(theirs[name]), err_msg=name)
        elif path.suffix == ".npz":
            with np.load(path) as a, np.load(theirs[name]) as b:
                assert a.keys() == b.keys(), name
                for key in a:
                    np.testing.assert_array_equal(a[key], b[key], err_msg=f"{name}: {key}")
    metrics = [json.loads(p.read_text()) for p in (cluster / TARGET, local / TARGET)]
    assert metrics[0]["test_accuracy"] == metrics[1]["test_accuracy"]
    selected = [{k: v for k, v in m["selected"].items() if k != "seconds"} for m in metrics]
    assert selected[0] == selected[1]


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True)
    return path
