"""What a job asks a cluster for: neural_kernels.resources, from .npy headers and settings.

The default run checks every job's peak memory against its request
(test_workflow.check_memory_requests) and these row counts against the kernels it
writes; here, the formulas against their closed forms at the thesis's sizes.
"""

from __future__ import annotations

import numpy as np
import pytest

from neural_kernels import resources
from neural_kernels.errors import DataError
from neural_kernels.resources import BASE_BYTES, MIB
from neural_kernels.settings import EstimateSettings, KernelSpec, ZcaSettings


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


def test_kernel_memory_is_its_float64_blocks_at_the_thesis_sizes():
    # T3's CIFAR-10 Myrtle10 analytic kernel: 50000 fitted rows, 10000 test rows
    blocks = 8 * 50_000 * 60_000
    assert resources.kernel_bytes(50_000, 10_000) == blocks
    want = (BASE_BYTES + blocks + resources.ANALYTIC_WORKSPACE_BYTES) / MIB
    assert resources.analytic_mem_mb(50_000, 10_000) == int(np.ceil(want))
    assert 24_000 < resources.analytic_mem_mb(50_000, 10_000) < 26_000
    # an estimate shard on a GPU holds its sums only; on the CPU three activations too
    settings = EstimateSettings(width=64, networks=256, chunk_networks=16, batch_size=256)
    on_gpu = resources.estimate_mem_mb(50_000, 10_000, (32, 32), settings, on_gpu=True)
    on_cpu = resources.estimate_mem_mb(50_000, 10_000, (32, 32), settings, on_gpu=False)
    assert on_gpu == resources.analytic_mem_mb(50_000, 10_000) - 1024
    assert (on_cpu - on_gpu) * MIB == pytest.approx(3 * 4 * 16 * 64 * 256 * 32 * 32, abs=MIB)
    # a solve holds four times its kernel files; a merge two shards' worth
    assert resources.solve_mem_mb(blocks) == int(np.ceil((BASE_BYTES + 4 * blocks) / MIB))
    assert resources.merge_mem_mb(4 * blocks, 4) == int(np.ceil((BASE_BYTES + 2 * blocks) / MIB))


def test_zca_memory_follows_the_solver(tmp_path, cifar):
    files = [cifar["train"], cifar["val"], cifar["test"]]
    exact = resources.zca_mem_mb(files, 2, ZcaSettings(solver="exact"))
    p = 32 * 32 * 3
    # three P x P float64 matrices, three row blocks, the largest whitened split; the
    # 50000 fitted rows (614 MB) stay resident, below zca.RESIDENT_BYTES
    want = 3 * 8 * p * p + 3 * (1 << 28) + 4 * 50_000 * p + 4 * 45_000 * p
    assert exact == int(np.ceil((BASE_BYTES + want) / MIB))
    # ImageNet-R at 224 x 224: the randomized solver's P x (k + oversample), never P x P
    big = [sparse_npy(tmp_path / f"r{i}.npy", (n, 224, 224, 3)) for i, n in enumerate((900, 100))]
    settings = ZcaSettings(solver="auto", rank=1000)
    p = 224 * 224 * 3
    randomized = resources.zca_mem_mb(big, 2, settings)
    want = 4 * 8 * p * 1010 + 3 * (1 << 28) + 4 * 1000 * p + 4 * 900 * p
    assert randomized == int(np.ceil((BASE_BYTES + want) / MIB))


def test_training_memory_counts_every_split_and_cpu_activations(cifar):
    files = list(cifar.values())
    images = 4 * 60_000 * 32 * 32 * 3
    on_gpu = resources.train_mem_mb(files, 128, on_gpu=True)
    assert on_gpu == int(np.ceil((BASE_BYTES + images) / MIB))
    on_cpu = resources.train_mem_mb(files, 128, on_gpu=False)
    activations = 4 * resources.TRAIN_ACTIVATIONS_PER_INPUT * 128 * 32 * 32 * 3
    assert (on_cpu - on_gpu) * MIB == pytest.approx(activations, abs=MIB)
