"""Host memory that a workflow job asks a cluster for, sized by its inputs and settings.

The workflow's rules (``workflow/rules/common.smk``) call these when a job is ready to
run, so the input files exist: every estimate reads ``.npy`` headers and file sizes,
never the data. Each is an upper bound of the job's peak memory in MiB (what
``sbatch --mem`` means by MB): :data:`BASE_BYTES` for the interpreter and its
libraries, plus what the job holds in memory, plus its memory-mapped outputs up to
:data:`MAPPED_BYTES` (the page cache writes those back and reclaims them when a job
nears its limit, so they need not fit). A workflow floor (config
``resources.min_mem_mb``) and per-stage overrides (``resources.mem_mb``) apply on top,
in the workflow.
"""

from __future__ import annotations

import math
import shutil
import subprocess
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

from neural_kernels.catalog import SOLVERS
from neural_kernels.errors import DataError
from neural_kernels.kernels.merge import merge_block_rows
from neural_kernels.settings import (
    ANALYTIC_CPU_BLOCK_BYTES,
    ZCA_BLOCK_BYTES,
    ZCA_RESIDENT_BYTES,
    EstimateSettings,
    KernelSpec,
    SolverSettings,
    ZcaSettings,
)
from neural_kernels.solvers import memory as solver_memory
from neural_kernels.solvers.memory import SolveSizes

MIB = 1 << 20
#: Python, NumPy, torch and their libraries: the digits jobs of the default run peak
#: at 0.7-1.1 GiB (their benchmark files' max_rss), almost all of it this.
BASE_BYTES = 1536 * MIB
#: A memory-mapped output counts up to this much: written pages that the kernel has
#: not yet written back (reclaimable; Linux throttles a writer long before).
MAPPED_BYTES = 8 << 30
#: Workspace of an analytic kernel's blocks: at least this, and on a CPU
#: :data:`ANALYTIC_BLOCK_COPIES` copies of a block's float64 ``B^2 (H W)^2``
#: covariances per worker thread (2 MiB blocks with the automatic block size, or one
#: image pair's covariances where that is larger; on a GPU they live in GPU memory).
ANALYTIC_WORKSPACE_BYTES = 1 << 30
ANALYTIC_BLOCK_COPIES = 8
#: Activations a training step keeps for the backward pass, in float32 values per
#: input value (about ResNet18's at 224 x 224; the Myrtle networks keep fewer).
TRAIN_ACTIVATIONS_PER_INPUT = 400
#: Decoded images per archive byte (JPEG archives decode to about 10x their size),
#: with room for the prepared copies.
PREPARE_BYTES_PER_ARCHIVE_BYTE = 16


def npy_shape(path: Path | str) -> tuple[int, ...]:
    """The shape of a ``.npy`` array (memory-mapped: only its header is read)."""
    try:
        return tuple(np.load(path, mmap_mode="r").shape)
    except (OSError, ValueError) as error:
        raise DataError(f"cannot read {path} as a .npy array ({error})") from None


def _mib(n_bytes: float) -> int:
    return math.ceil((BASE_BYTES + n_bytes) / MIB)


def _mapped(n_bytes: float) -> float:
    """What a memory-mapped output of ``n_bytes`` counts for (:data:`MAPPED_BYTES`)."""
    return min(n_bytes, MAPPED_BYTES)


def zca_mem_mb(image_files: Iterable[Path | str], fit_on: int, settings: ZcaSettings) -> int:
    """ZCA whitening: the float64 spectrum (exact: three ``P x P`` matrices, the
    covariance, its eigenvectors and the whitening matrix; randomized: four
    ``P x (k + oversample)`` and two ``N x (k + oversample)``), the streamed row blocks,
    the fitted rows when small enough to stay resident, and one whitened split
    (float32, memory-mapped) at a time."""
    shapes = [npy_shape(path) for path in image_files]
    p = math.prod(shapes[0][1:])
    n_fit = sum(shape[0] for shape in shapes[:fit_on]) * (2 if settings.flips else 1)
    exact = settings.solver_for(p) == "exact"
    rank = settings.rank or min(n_fit, p)
    columns = rank + settings.oversample
    spectrum = 8 * (3 * p * p if exact else (4 * p + 2 * n_fit) * columns)
    resident = 4 * n_fit * p if 4 * n_fit * p <= ZCA_RESIDENT_BYTES else 0
    largest_split = _mapped(4 * max(math.prod(shape) for shape in shapes))
    return _mib(spectrum + 3 * ZCA_BLOCK_BYTES + resident + largest_split)


def kernel_rows(
    train: Path | str,
    evals: Mapping[str, Path | str],
    spec: KernelSpec,
    *,
    val: Path | str | None = None,
    train_indices: Path | str | None = None,
) -> tuple[int, int]:
    """(fitted rows, eval rows) of a kernel stage (the layout of
    :mod:`neural_kernels.kernels.stage`): the train images (or the subset's) and, when
    fitted, the val images, times the crops' copies and the mirrors; the eval splits'
    rows, plus val's centre crops when val is fitted and cropped."""
    fitted = npy_shape(train_indices)[0] if train_indices else npy_shape(train)[0]
    if val is not None:
        fitted += npy_shape(val)[0]
    fitted *= (spec.copies if spec.crop is not None else 1) * (2 if spec.flips else 1)
    eval_paths = dict(evals)
    if spec.crop is not None and val is not None:
        eval_paths.setdefault("val", val)
    return fitted, sum(npy_shape(path)[0] for path in eval_paths.values())


def kernel_bytes(fitted_rows: int, eval_rows: int) -> int:
    """Bytes of a kernel's float64 blocks: ``N x N`` fitted and ``M x N`` eval."""
    return 8 * fitted_rows * (fitted_rows + eval_rows)


def estimate_mem_mb(
    fitted_rows: int,
    eval_rows: int,
    image_shape: tuple[int, ...],
    settings: EstimateSettings,
    *,
    on_gpu: bool,
) -> int:
    """An estimate shard. On a GPU its float64 sums accumulate in GPU memory and go to
    the memory-mapped outputs; on the CPU the sums themselves are in memory (one pass
    over all tiles), with three activation tensors of ``chunk_networks x width x
    batch_size`` images."""
    blocks = kernel_bytes(fitted_rows, eval_rows)
    if on_gpu:
        return _mib(_mapped(blocks))
    height, width = image_shape[:2]
    per_tensor = settings.chunk_networks * settings.width * settings.batch_size
    return _mib(blocks + _mapped(blocks) + 3 * 4 * per_tensor * height * width)


def analytic_mem_mb(
    fitted_rows: int,
    eval_rows: int,
    image_shape: tuple[int, ...] = (1, 1),
    block_size: int | None = None,
    workers: int = 1,
) -> int:
    """An analytic kernel: its memory-mapped float64 blocks and its blocks' workspace,
    :data:`ANALYTIC_WORKSPACE_BYTES` or, if more, the copies of ``workers`` blocks'
    ``B^2 (H W)^2`` covariances (``workers``: the job's threads on a CPU, 1 on a GPU)."""
    pixels = image_shape[0] * image_shape[1]
    if block_size is None:
        block = max(ANALYTIC_CPU_BLOCK_BYTES, 8 * pixels**2)
    else:
        block = 8 * block_size**2 * pixels**2
    workspace = max(ANALYTIC_WORKSPACE_BYTES, workers * ANALYTIC_BLOCK_COPIES * block)
    return _mib(_mapped(kernel_bytes(fitted_rows, eval_rows)) + workspace)


def merge_mem_mb(kernel_file_bytes: int, fitted_rows: int, shards: int) -> int:
    """Merging shards: the merged kernel (memory-mapped) and, in flight, one row block
    of :data:`~neural_kernels.kernels.merge.MERGE_BLOCK_BYTES` from every shard, their
    sum and its projection (:func:`~neural_kernels.kernels.merge.merge_shards`)."""
    block_rows = merge_block_rows(fitted_rows)
    in_flight = (shards + 2) * block_rows * fitted_rows * 8
    return _mib(_mapped(kernel_file_bytes) + in_flight)


def solve_mem_mb(settings: SolverSettings, sizes: SolveSizes, *, on_gpu: bool = False) -> int:
    """A solve: what its solver holds (the registry's footprint,
    :mod:`neural_kernels.solvers.memory`), or beside a GPU what the host keeps of it;
    a streaming solver's memory-mapped kernel is page cache, reclaimed under the job's
    limit, and not counted."""
    solver = SOLVERS.lookup(settings.method)
    if on_gpu:
        return _mib(solver_memory.host_bytes_beside_gpu(solver.streams, sizes.rows))
    return _mib(solver.holds_bytes(settings, sizes.rows, sizes.eval_rows, sizes.classes))


def train_mem_mb(image_files: Iterable[Path | str], batch_size: int, *, on_gpu: bool) -> int:
    """Training a network: every split's images as stored (uint8, held in memory) and,
    on the CPU, a batch's float32 activations kept for the backward pass."""
    paths = list(image_files)
    images = sum(np.load(path, mmap_mode="r").nbytes for path in paths)
    activations = 0
    if not on_gpu:
        per_image = math.prod(npy_shape(paths[0])[1:])
        activations = 4 * TRAIN_ACTIVATIONS_PER_INPUT * batch_size * per_image
    return _mib(images + activations)


def prepare_mem_mb(archive_bytes: int) -> int:
    """Preparing a dataset from an archive: the decoded images and their prepared
    copies (the bundled digits have no archive)."""
    return _mib(PREPARE_BYTES_PER_ARCHIVE_BYTE * archive_bytes)


def machine_has_gpus() -> bool:
    """Whether this machine has an NVIDIA GPU (``nvidia-smi -L`` lists one): what the
    workflow's ``gpus: auto`` asks (without importing torch into snakemake)."""
    if shutil.which("nvidia-smi") is None:
        return False
    try:
        listed = subprocess.run(
            ["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return listed.returncode == 0 and "GPU" in listed.stdout
