"""What a job asks a cluster for: neural_kernels.resources, from .npy headers and settings.

The default run checks every job's peak memory against its request
(test_workflow.check_memory_requests) and these row counts against the kernels it
writes; here, the formulas against their closed forms at the thesis's sizes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO
from neural_kernels import limits, resources
from neural_kernels.errors import DataError
from neural_kernels.resources import BASE_BYTES, MIB
from neural_kernels.settings import EstimateSettings, KernelSpec, SolverSettings, ZcaSettings
from neural_kernels.solvers.memory import SolveSizes, solve_sizes


def sparse_npy(path, shape, dtype=np.float32):
    """A .npy of ``shape`` whose data are never written (a sparse file)."""
    np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape).flush()
    return path


@pytest.fixture
def cifar(tmp_path):
    """CIFAR-10's whitened splits (45000 / 5000 / 10000 images of 32 x 32 x 3)."""
    return {
        split: sparse_npy(tmp_path / f"{split}_images.npy", (n, 32, 32, 3))
        for split, n in (("train", 45_000), ("val", 5_000), ("test", 10_000))
    }


def test_npy_shape_reads_the_header_and_names_a_bad_file(tmp_path, cifar):
    assert resources.npy_shape(cifar["val"]) == (5_000, 32, 32, 3)
    bad = tmp_path / "bad.npy"
    bad.write_bytes(b"not an array")
    with pytest.raises(DataError, match="bad.npy"):
        resources.npy_shape(bad)


def test_kernel_rows_follow_the_stage_layout(tmp_path, cifar):
    evals = {"test": cifar["test"]}
    plain = KernelSpec(arch="myrtle10")
    assert resources.kernel_rows(cifar["train"], evals, plain, val=cifar["val"]) == (
        50_000, 10_000
    )  # fmt: skip
    flips = KernelSpec(arch="myrtle10", flips=True)
    assert resources.kernel_rows(cifar["train"], evals, flips, val=cifar["val"])[0] == 100_000
    # crops: copies of every fitted image, val's centre crops scored as an eval block
    crops = KernelSpec(arch="myrtle5", crop=28, copies=3, flips=True)
    assert resources.kernel_rows(cifar["train"], evals, crops, val=cifar["val"]) == (
        6 * 50_000, 10_000 + 5_000
    )  # fmt: skip
    # a subset fits its indexed rows only and scores val and test
    indices = tmp_path / "train_indices.npy"
    np.save(indices, np.arange(1280))
    subset = resources.kernel_rows(
        cifar["train"], {"val": cifar["val"], **evals}, plain, train_indices=indices
    )
    assert subset == (1280, 15_000)


def test_kernel_memory_at_the_thesis_sizes():
    # T3's CIFAR-10 Myrtle10 kernel: 50000 fitted rows, 10000 test rows, 24 GB of blocks
    blocks = 8 * 50_000 * 60_000
    assert resources.kernel_bytes(50_000, 10_000) == blocks
    mapped = resources.MAPPED_BYTES  # 8 GiB: the memory maps' written-back pages
    workspace = resources.ANALYTIC_WORKSPACE_BYTES
    assert resources.analytic_mem_mb(50_000, 10_000) == mib(mapped + workspace)
    # a configured block size: eight float64 B^2 (HW)^2 covariances (B = 8: 4 GiB)
    covariances = 8 * 8 * 8**2 * (32 * 32) ** 2
    assert resources.analytic_mem_mb(50_000, 10_000, (32, 32), 8) == mib(mapped + covariances)
    # on a CPU, one block per worker thread: 32 workers of 32x32 images hold 32 x 8
    # copies of one pair's 8 MiB covariances (the automatic block size is 1 there)
    pair = 8 * (32 * 32) ** 2
    assert resources.analytic_mem_mb(50_000, 10_000, (32, 32), None, 32) == mib(
        mapped + 32 * 8 * pair
    )
    assert resources.analytic_mem_mb(50_000, 10_000, (8, 8), None, 2) == mib(mapped + workspace)
    assert resources.analytic_mem_mb(50_000, 10_000, (32, 32), 8, 16) == mib(
        mapped + 16 * covariances
    )
    # an estimate shard on a GPU sums in GPU memory; on the CPU its float64 sums are in
    # memory (one pass) beside the memory maps, with three activation tensors
    settings = EstimateSettings(width=64, networks=256, chunk_networks=16, batch_size=256)
    on_gpu = resources.estimate_mem_mb(50_000, 10_000, (32, 32), settings, on_gpu=True)
    on_cpu = resources.estimate_mem_mb(50_000, 10_000, (32, 32), settings, on_gpu=False)
    assert on_gpu == mib(mapped)
    activations = 3 * 4 * 16 * 64 * 256 * 32 * 32
    assert on_cpu == mib(blocks + mapped + activations)
    # a merge: the merged memory map and one 128 MiB block (335 rows of 50000) of each
    # shard, their sum and its projection; the block does not grow with the width
    assert resources.merge_mem_mb(blocks, 50_000, 4) == mib(mapped + 6 * 335 * 50_000 * 8)
    assert resources.merge_mem_mb(0, 200_000, 4) * MIB <= BASE_BYTES + 6 * (128 << 20) + MIB


def mib(n_bytes: float) -> int:
    return int(np.ceil((BASE_BYTES + n_bytes) / MIB))


def test_solve_memory_follows_what_each_solver_holds(tmp_path):
    # T1's CIFAR-10 kernel: 50000 fitted rows, 10000 test rows, 10 classes
    n, e, c = 50_000, 10_000, 10
    kernel = [
        sparse_npy(tmp_path / "train.npy", (n, n), np.float64),
        sparse_npy(tmp_path / "test.npy", (e, n), np.float64),
    ]
    labels = tmp_path / "train_labels.npy"
    np.save(labels, np.arange(45_000) % c)
    sizes = solve_sizes(kernel, labels)
    assert sizes == SolveSizes(rows=n, eval_rows=e, classes=c)
    block = 1 << 27  # a streamed row block
    # the dense solvers hold four N x N float64 matrices (measured 4.03-4.12)
    flow = SolverSettings("flow", eta_t=(1.0, 10.0))
    dense = 4 * 8 * n * n + 8 * e * n + block + 4 * 8 * (n + e) * c
    assert resources.solve_mem_mb(flow, sizes) == mib(dense)
    assert resources.solve_mem_mb(SolverSettings("ridge"), sizes) == mib(dense)
    # boosting: M x M blocks and (N + E) x C predictions per eta t, never N x N
    boosting = SolverSettings("boosting", batch_size=5000, eta_t=(100.0, 1e3, 1e4))
    want = 5 * 8 * 5000**2 + 5 * 8 * (n + e) * c * 3 + block
    assert resources.solve_mem_mb(boosting, sizes) == mib(want)
    # pcg: the N x r preconditioner twice and the CG state of every lambda and class
    pcg = SolverSettings("pcg", lambdas=(1e-2, 1e-3), rank=1000)
    want = 2 * 8 * n * 1000 + 9 * 8 * n * c * 2 + 8 * e * c * 2 + block
    assert resources.solve_mem_mb(pcg, sizes) == mib(want)
    assert resources.solve_mem_mb(pcg, sizes) < resources.solve_mem_mb(flow, sizes) / 30
    # beside a GPU the host keeps the fitted block (dense) or row blocks (streaming)
    assert resources.solve_mem_mb(flow, sizes, on_gpu=True) == mib(8 * n * n + 2 * block)
    assert resources.solve_mem_mb(pcg, sizes, on_gpu=True) == mib(2 * block)
    with pytest.raises(DataError, match="no train.npy"):
        solve_sizes(kernel[1:], labels)


def test_zca_memory_follows_the_solver(tmp_path, cifar):
    files = [cifar["train"], cifar["val"], cifar["test"]]
    # solver auto: exact up to 4096 features, as zca_fit resolves it
    assert ZcaSettings().solver_for(3072) == "exact"
    assert ZcaSettings().solver_for(12288) == "randomized"
    exact = resources.zca_mem_mb(files, 2, ZcaSettings(solver="exact"))
    p = 32 * 32 * 3
    # three P x P float64 matrices, three row blocks, the 50000 fitted rows (614 MB,
    # resident: below ZCA_RESIDENT_BYTES), the largest whitened split (memory-mapped)
    want = 3 * 8 * p * p + 3 * (1 << 28) + 4 * 50_000 * p + 4 * 45_000 * p
    assert exact == mib(want)
    # ImageNet-R at 224 x 224: the randomized solver's P x (k + oversample) and
    # N x (k + oversample) matrices, never P x P
    big = [sparse_npy(tmp_path / f"r{i}.npy", (n, 224, 224, 3)) for i, n in enumerate((900, 100))]
    p = 224 * 224 * 3
    randomized = resources.zca_mem_mb(big, 2, ZcaSettings(solver="auto", rank=1000))
    want = (4 * p + 2 * 1000) * 1010 * 8 + 3 * (1 << 28) + 4 * 1000 * p + 4 * 900 * p
    assert randomized == mib(want)


def test_training_memory_counts_the_stored_images_and_cpu_activations(tmp_path):
    files = [
        sparse_npy(tmp_path / f"{split}.npy", (n, 32, 32, 3), np.uint8)
        for split, n in (("train", 45_000), ("val", 5_000), ("test", 10_000))
    ]
    images = 60_000 * 32 * 32 * 3  # uint8, as networks.load_splits keeps them
    assert resources.train_mem_mb(files, 128, on_gpu=True) == mib(images)
    activations = 4 * resources.TRAIN_ACTIVATIONS_PER_INPUT * 128 * 32 * 32 * 3
    assert resources.train_mem_mb(files, 128, on_gpu=False) == mib(images + activations)


def test_this_machine_has_no_gpu_unless_nvidia_smi_lists_one(monkeypatch, tmp_path):
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H200 (UUID: GPU-0)'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert resources.machine_has_gpus()
    fake.write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed' >&2; exit 9\n")
    assert not resources.machine_has_gpus()
    monkeypatch.setenv("PATH", str(tmp_path / "none"))
    assert not resources.machine_has_gpus()


MEMORY_CGROUP = Path("/sys/fs/cgroup/memory")


@pytest.mark.skipif(
    not os.access(MEMORY_CGROUP, os.W_OK), reason="the cgroup v1 memory controller is not writable"
)
def test_memory_available_is_the_cgroup_limit_less_what_is_in_use():
    group = MEMORY_CGROUP / f"nk-test-{os.getpid()}"
    group.mkdir()
    try:
        (group / "memory.limit_in_bytes").write_text(str(1 << 30))
        script = (
            "import json, numpy; from neural_kernels import limits; "
            "hold = numpy.ones(200 << 17); "  # 200 MiB
            "m = limits.memory_available(); print(json.dumps([m.bytes, m.source]))"
        )
        enter = f"echo $$ > {group}/cgroup.procs && exec {sys.executable} -c '{script}'"
        result = subprocess.run(["sh", "-c", enter], capture_output=True, text=True, check=True)
        available, source = json.loads(result.stdout)
        assert str(group) in source and "1.00 GiB" in source
        # the limit less the anonymous memory in use: Python, NumPy and the 200 MiB
        assert (1 << 30) - 300 * MIB < available < (1 << 30) - 200 * MIB
    finally:
        group.rmdir()


def fake_proc(tmp_path, monkeypatch, cgroup: str, mountinfo: str, anon_kb: int = 1024) -> None:
    """Point neural_kernels.limits at a /proc of ``tmp_path``'s (8 GiB available)."""
    proc = tmp_path / "proc"
    proc.mkdir()
    files = {"cgroup": cgroup, "mountinfo": mountinfo, "meminfo": "MemAvailable: 8388608 kB\n",
             "status": f"VmRSS: {2 * anon_kb} kB\nRssAnon: {anon_kb} kB\n"}  # fmt: skip
    for name, text in files.items():
        (proc / name).write_text(text)
    constants = {"PROC_SELF_CGROUP": "cgroup", "PROC_SELF_MOUNTINFO": "mountinfo",
                 "PROC_MEMINFO": "meminfo", "PROC_SELF_STATUS": "status"}  # fmt: skip
    for constant, name in constants.items():
        monkeypatch.setattr(limits, constant, proc / name)
    for variable in ("SLURM_MEM_PER_NODE", "SLURM_MEM_PER_CPU", "SLURM_CPUS_ON_NODE"):
        monkeypatch.delenv(variable, raising=False)


def cgroup_dir(path: Path, limit: str, stat: str) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / ("memory.max" if "anon" in stat else "memory.limit_in_bytes")).write_text(limit)
    (path / "memory.stat").write_text(stat)
    return path


def test_memory_available_reads_cgroup_v1_seen_from_a_container(tmp_path, monkeypatch):
    # the container's cgroup /docker/abc is the root of its memory mount; the process
    # sits in its sub-cgroup job, limited to 1 GiB, under the container's 4 GiB
    mount = tmp_path / "memory"
    cgroup_dir(mount, str(4 << 30), "total_rss 0\n")
    job = cgroup_dir(mount / "job", str(1 << 30), f"cache 5\ntotal_rss {100 * MIB}\n")
    fake_proc(
        tmp_path, monkeypatch, "5:cpu:/docker/abc/job\n4:memory:/docker/abc/job\n0::/\n",
        f"30 20 0:26 /docker/abc {mount} rw - cgroup cgroup rw,memory\n",
    )  # fmt: skip
    found = limits.memory_available()
    assert found.bytes == (1 << 30) - 100 * MIB and str(job) in found.source
    assert len(limits.cgroup_limits()) == 2  # and its parent's, up to the mount
    # no limit anywhere: the machine's available memory
    (job / "memory.limit_in_bytes").write_text("9223372036854771712")  # v1 "unlimited"
    (mount / "memory.limit_in_bytes").write_text("9223372036854771712")
    assert limits.memory_available() == limits.MemoryAvailable(
        8 << 30, "the machine's available memory"
    )


def test_memory_available_reads_cgroup_v2_and_slurm(tmp_path, monkeypatch):
    mount = tmp_path / "unified"
    cgroup_dir(mount / "user.slice", str(2 << 30), "anon 0\n")
    cgroup_dir(mount / "user.slice/x", "max", f"anon {300 * MIB}\nfile 7\n")
    fake_proc(
        tmp_path, monkeypatch, "0::/user.slice/x\n",
        f"35 25 0:30 / {mount} rw - cgroup2 cgroup2 rw\n", anon_kb=100 * 1024,
    )  # fmt: skip
    found = limits.memory_available()  # x has no limit ("max"): its parent's
    assert found.bytes == 2 << 30 and str(mount / "user.slice") in found.source
    # SLURM's request, less this process's anonymous memory (100 MiB)
    monkeypatch.setenv("SLURM_MEM_PER_NODE", "1000")
    assert limits.memory_available().bytes == 900 * MIB
    monkeypatch.setenv("SLURM_MEM_PER_NODE", "0")  # --mem=0: the whole node
    assert limits.memory_available().bytes == 2 << 30
    monkeypatch.delenv("SLURM_MEM_PER_NODE")
    monkeypatch.setenv("SLURM_MEM_PER_CPU", "500")
    monkeypatch.setenv("SLURM_CPUS_ON_NODE", "2")
    found = limits.memory_available()
    assert found.bytes == 900 * MIB and "--mem-per-cpu 500 MB x 2 CPUs" in found.source


def test_planned_solves_follow_the_sources_official_sizes():
    from neural_kernels import sizing

    config = sizing.load_config(REPO / "config/thesis.yaml")
    solves = {(s.dataset, s.kernel, s.solver): s for s in sizing.planned_solves(config)}
    cifar = solves[("cifar10", "myrtle10_gaussian_estimate", "flow_cpu")]
    assert cifar.sizes == SolveSizes(50_000, 10_000, 10) and not cifar.on_gpu
    assert cifar.holds_bytes == 4 * 8 * 50_000**2 + 8 * 10_000 * 50_000 + (1 << 27) + (
        4 * 8 * 60_000 * 10
    )
    assert cifar.hours == pytest.approx(2 * 12 * 50_000**3 / 1e12 / 3600)
    flips = solves[("cifar10", "myrtle10_gaussian_flips_estimate", "pcg")]
    assert flips.sizes.rows == 100_000 and flips.on_gpu
    # T4 with crop 56 + flips: 100000 images x 1 crop x 2; val's centre crops scored too
    crops = solves[("tiny_imagenet", "myrtle11_crop56_flips_estimate", "boosting")]
    assert crops.sizes == SolveSizes(200_000, 10_000 + 10_000, 200)
    assert crops.kernel_gb == pytest.approx(8 * 200_000 * 220_000 / 1e9)
    # boosting: two passes over the 320 GB block a step at 2 GB/s, 20 steps, two fits
    assert crops.hours == pytest.approx(2 * 20 * 2 * 320 / 2 / 3600, rel=0.01)
    # ImageNet-R: a seeded 9:1 hold-out of its 30000 images is test
    r = solves[("imagenet_r", "myrtle15_estimate", "flow")]
    assert r.sizes == SolveSizes(27_000, 3_000, 200)
    assert not [s for s in solves.values() if s.dataset == "tiny_imagenet" and s.method == "flow"]
