"""The kernel estimated from many narrow, untrained, randomly initialised networks.

The thesis's method: ``n`` independent networks of ``w`` channels each run side by
side (grouped convolutions: one wide network whose channel groups never mix); the
features are their last-layer outputs, ``F = n w`` of them, and

    G = sum over networks of Phi Phi^T,      K_ij = f(G_ij / sqrt(G_ii G_jj)),

``Phi`` being the globally pooled activations and ``f`` the architecture's final
:class:`~neural_kernels.architectures.Project` map (``relu_project`` or
``exponential_shifted_project`` of Shankar et al.). ``E[G] / F`` is the analytic pooled
kernel (up to the finite-width bias of each narrow network); the cosine
``G_ij / sqrt(G_ii G_jj)`` is that of the concatenated features of all networks, and
``f`` of it is the exact infinite-width limit of a final dense layer + nonlinearity on
them (the finite layer of ``Project``), so no further random features are drawn.

Networks are drawn in *chunks* (``chunk_networks`` networks, seeded by
``(seed, chunk index)`` on the CPU, so every device draws the same weights); a shard
is a contiguous range of chunks and returns raw float64 sums, so merging shards is an
addition and gives the same kernel whatever the shard count. The Gram products run in
float32 (TF32 or bf16 features when asked) and are accumulated in float64, one
triangle of row tiles for the symmetric train block; when the accumulators would not
fit the device, rows are processed in passes that recompute the features.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from numpy.typing import NDArray
from tqdm import tqdm

from neural_kernels.architectures import Project, Serial
from neural_kernels.errors import NeuralKernelsError
from neural_kernels.settings import EstimateSettings

log = logging.getLogger(__name__)


def chunk_parameters(
    arch: Serial, settings: EstimateSettings, chunk: int, in_channels: int
) -> list:
    """The weights of chunk ``chunk``'s networks, drawn on the CPU from ``(seed, chunk)``.

    Only the layers that make the random features (``arch.head``): the final
    projection is applied exactly to their Gram matrix.
    """
    state = np.random.SeedSequence((settings.seed, chunk)).generate_state(1, np.uint64)[0]
    generator = torch.Generator().manual_seed(int(state))
    params = arch.init(generator, in_channels, settings.chunk_networks_at(chunk), settings.width)
    return params[: len(arch.head)]


@contextlib.contextmanager
def _matmul_precision(precision: str) -> Iterator[None]:
    """Allow TF32 tensor-core products for 'tf32' and 'bf16'; plain float32 otherwise."""
    old = torch.get_float32_matmul_precision()
    old_cudnn = torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision("high" if precision != "float32" else "highest")
    torch.backends.cudnn.allow_tf32 = precision != "float32"
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(old)
        torch.backends.cudnn.allow_tf32 = old_cudnn


def random_features(
    arch: Serial,
    params: list,
    images: NDArray,
    *,
    batch_size: int,
    device: torch.device,
    precision: str = "float32",
) -> torch.Tensor:
    """Last-layer outputs ``(N, networks * width)`` (float32, on ``device``) of NHWC images."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    device_params = [None if p is None else p.to(device, dtype) for p in params]
    out = []
    for start in range(0, len(images), batch_size):
        x = torch.tensor(np.asarray(images[start : start + batch_size]), dtype=torch.float32)
        x = x.to(device).permute(0, 3, 1, 2).to(dtype)
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            out.append(arch.apply(x, device_params, project=False).float())
    return torch.cat(out)


def _row_tiles(n_train: int, n_eval: int, tile: int) -> list[tuple[int, int, int]]:
    """``(row start, row stop, first column)`` of each accumulator tile.

    Rows ``0..n_train`` are the train block (a tile starting at row ``r`` holds columns
    ``r..n_train``: one triangle); rows after them are eval rows (all columns).
    """
    tiles = [(r, min(r + tile, n_train), r) for r in range(0, n_train, tile)]
    total = n_train + n_eval
    tiles += [(r, min(r + tile, total), 0) for r in range(n_train, total, tile)]
    return tiles


def _passes(tiles: list[tuple[int, int, int]], n_train: int, budget: int) -> list[list[int]]:
    """Group tiles into passes whose float64 accumulators fit ``budget`` bytes."""
    passes: list[list[int]] = [[]]
    used = 0
    for index, (r0, r1, c0) in enumerate(tiles):
        size = (r1 - r0) * (n_train - c0) * 8
        if passes[-1] and used + size > budget:
            passes.append([])
            used = 0
        passes[-1].append(index)
        used += size
    return passes


def _device_budget(device: torch.device, feature_bytes: int) -> int:
    """Bytes available for accumulators: most of the free GPU memory, unbounded on CPU."""
    if device.type != "cuda":
        return 1 << 62
    free, _ = torch.cuda.mem_get_info(device)
    return max(int(0.75 * (free - 3 * feature_bytes)), 1 << 28)


@dataclass(frozen=True)
class _TilePlan:
    """The accumulator tiles of :func:`estimate_sums` and the passes that group them.

    The eval sets are stacked after the ``n_train`` train rows: set ``names[k]`` holds
    the global rows ``offsets[k]..offsets[k + 1]``.
    """

    n_train: int
    n_eval: int
    names: tuple[str, ...]
    offsets: NDArray
    tiles: list[tuple[int, int, int]]
    passes: list[list[int]]

    def spans(self) -> Iterator[tuple[str, int, int]]:
        """``(name, first global row, stop)`` of each eval set."""
        return zip(self.names, self.offsets[:-1], self.offsets[1:], strict=True)


def _plan_tiles(
    n_train: int,
    evals: Mapping[str, NDArray],
    settings: EstimateSettings,
    device: torch.device,
    max_accumulator_bytes: int | None,
) -> _TilePlan:
    """Tile the train triangle and the eval rows; group the tiles into passes that fit."""
    names = tuple(evals)
    sizes = [len(evals[name]) for name in names]
    n_eval = sum(sizes)
    tiles = _row_tiles(n_train, n_eval, settings.tile_rows)
    feature_bytes = (n_train + n_eval) * settings.chunk_networks * settings.width * 4
    budget = max_accumulator_bytes or _device_budget(device, feature_bytes)
    passes = _passes(tiles, n_train, budget)
    offsets = np.cumsum([n_train, *sizes])
    return _TilePlan(n_train, n_eval, names, offsets, tiles, passes)


@dataclass
class _SumsJob:
    """One :func:`estimate_sums` call: its inputs, tile plan, outputs and timings."""

    arch: Serial
    train: NDArray
    evals: Mapping[str, NDArray]
    settings: EstimateSettings
    device: torch.device
    plan: _TilePlan
    out_train: NDArray
    out_evals: dict[str, NDArray]
    sqnorms: dict[str, NDArray]
    seconds: dict[str, float]


def _stacked_eval_rows(evals: Mapping[str, NDArray], plan: _TilePlan, r0: int, r1: int) -> NDArray:
    """Rows r0..r1 (global eval row numbers, past n_train) of the stacked eval sets."""
    parts = []
    for name, start, stop in plan.spans():
        lo, hi = max(r0, start), min(r1, stop)
        if lo < hi:
            parts.append(np.asarray(evals[name][lo - start : hi - start]))
    return np.concatenate(parts)


def _synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA), so that timings measure it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _one_chunk(
    job: _SumsJob,
    chunk: int,
    pass_tiles: list[int],
    acc: dict[int, torch.Tensor],
    eval_sq: torch.Tensor,
    need_eval: bool,
) -> None:
    """Add chunk ``chunk``'s feature products to the pass's tiles (and eval sq. norms)."""
    plan, settings, n_train = job.plan, job.settings, job.plan.n_train
    params = chunk_parameters(job.arch, settings, chunk, job.train.shape[3])
    options = dict(batch_size=settings.batch_size, device=job.device, precision=settings.precision)
    started = time.perf_counter()
    phi = random_features(job.arch, params, job.train, **options)
    phi_eval = None
    if need_eval:
        stacked = _stacked_eval_rows(job.evals, plan, n_train, n_train + plan.n_eval)
        phi_eval = random_features(job.arch, params, stacked, **options)
        eval_sq += phi_eval.double().square().sum(dim=1)
    _synchronize(job.device)
    mid = time.perf_counter()
    for index in pass_tiles:
        r0, r1, c0 = plan.tiles[index]
        rows = phi[r0:r1] if r0 < n_train else phi_eval[r0 - n_train : r1 - n_train]
        acc[index].add_(rows @ phi[c0:].T)
    _synchronize(job.device)
    job.seconds["features"] += mid - started
    job.seconds["gram"] += time.perf_counter() - mid


def _store_tiles(job: _SumsJob, pass_tiles: list[int], acc: dict[int, torch.Tensor]) -> None:
    """Copy a finished pass's tiles to the outputs (mirroring the train triangle)."""
    plan = job.plan
    for index in pass_tiles:
        r0, r1, c0 = plan.tiles[index]
        block = acc.pop(index).cpu().numpy()
        if r0 < plan.n_train:
            job.out_train[r0:r1, c0:] = block
            job.out_train[r1:, r0:r1] = block[:, r1 - r0 :].T
        else:
            for name, start, stop in plan.spans():
                lo, hi = max(r0, start), min(r1, stop)
                if lo < hi:
                    job.out_evals[name][lo - start : hi - start] = block[lo - r0 : hi - r0]


def _one_pass(job: _SumsJob, pass_tiles: list[int], chunks: range, bar: tqdm) -> None:
    """Accumulate the tiles of one pass over every chunk, then store them."""
    tiles, n_train = job.plan.tiles, job.plan.n_train
    acc = {
        index: torch.zeros(
            (tiles[index][1] - tiles[index][0], n_train - tiles[index][2]),
            dtype=torch.float64,
            device=job.device,
        )
        for index in pass_tiles
    }
    eval_sq = torch.zeros(job.plan.n_eval, dtype=torch.float64, device=job.device)
    need_eval = any(tiles[i][0] >= n_train for i in pass_tiles)
    for chunk in chunks:
        _one_chunk(job, chunk, pass_tiles, acc, eval_sq, need_eval)
        bar.update()
    _store_tiles(job, pass_tiles, acc)
    if need_eval:
        values = eval_sq.cpu().numpy()
        for name, start, stop in job.plan.spans():
            job.sqnorms[name] = values[start - n_train : stop - n_train]


def estimate_sums(
    arch: Serial,
    train: NDArray,
    evals: Mapping[str, NDArray],
    settings: EstimateSettings,
    *,
    chunks: range | None = None,
    device: torch.device,
    out_train: NDArray | None = None,
    out_evals: Mapping[str, NDArray] | None = None,
    progress: bool = True,
    max_accumulator_bytes: int | None = None,
) -> dict:
    """Raw float64 sums of feature products over the networks of ``chunks``.

    Returns ``{"train": G (N x N, symmetric), "<name>": G_eval (M x N) for each eval
    set, "<name>_sqnorm": sum of squared features of each eval image (M,),
    "features": count, "seconds": {...}}``. ``out_*`` may be memory maps to write into.
    """
    chunks = range(settings.chunks) if chunks is None else chunks
    n_train = len(train)
    height, width, _ = train.shape[1:]
    arch.check_image_size(height, width)
    plan = _plan_tiles(n_train, evals, settings, device, max_accumulator_bytes)
    out_train = np.zeros((n_train, n_train)) if out_train is None else out_train
    out_evals = dict(out_evals or {})
    for name, start, stop in plan.spans():
        if name not in out_evals:
            out_evals[name] = np.zeros((stop - start, n_train))
    sqnorms = {name: np.zeros(stop - start) for name, start, stop in plan.spans()}
    seconds = {"features": 0.0, "gram": 0.0}
    job = _SumsJob(
        arch, train, evals, settings, device, plan, out_train, out_evals, sqnorms, seconds
    )
    bar = tqdm(
        total=len(plan.passes) * len(chunks),
        unit="chunk",
        disable=not progress,
        desc=f"estimate {arch.name} ({settings.features} features)",
    )
    with bar, _matmul_precision(settings.precision):
        for pass_tiles in plan.passes:
            _one_pass(job, pass_tiles, chunks, bar)
    features = sum(settings.chunk_networks_at(c) for c in chunks) * settings.width
    result = {
        "train": out_train,
        "features": features,
        "seconds": seconds,
        "passes": len(plan.passes),
    }
    for name in plan.names:
        result[name] = out_evals[name]
        result[f"{name}_sqnorm"] = sqnorms[name]
    return result


def projected_kernel(
    gram: NDArray,
    row_sqnorm: NDArray,
    col_sqnorm: NDArray,
    final: Project | None,
    out: NDArray | None = None,
    block_rows: int = 4096,
) -> NDArray:
    """``K_ij = f(G_ij / sqrt(a_i b_j))``: the final projection on a Gram matrix.

    ``a``/``b`` are the rows'/columns' squared feature norms (the Gram diagonal) and
    ``f`` is ``final.of_correlation`` (the cosine itself when ``final`` is ``None``).
    The 1/F of the feature average cancels. Works in row blocks, so ``gram`` and
    ``out`` may be memory maps (``out`` may be ``gram`` itself).
    """
    if np.any(row_sqnorm <= 0) or np.any(col_sqnorm <= 0):
        raise NeuralKernelsError(
            "an image has all-zero features (a blank image?); its normalised kernel is undefined"
        )
    out = np.empty(gram.shape) if out is None else out
    inv_col = 1.0 / np.sqrt(col_sqnorm)
    inv_row = 1.0 / np.sqrt(row_sqnorm)
    for start in range(0, gram.shape[0], block_rows):
        stop = start + block_rows
        cosine = np.asarray(gram[start:stop]) * inv_row[start:stop, None] * inv_col
        if final is not None:
            cosine = final.of_correlation(torch.from_numpy(cosine)).numpy()
        out[start:stop] = cosine
    return out


def estimate_kernel(
    arch: Serial,
    images: NDArray,
    images2: NDArray | None = None,
    settings: EstimateSettings | None = None,
    *,
    device: torch.device,
    progress: bool = True,
) -> NDArray:
    """The estimated ``K(images2, images)``, or the symmetric ``K(images, images)``."""
    settings = settings or EstimateSettings()
    evals = {} if images2 is None else {"z": images2}
    sums = estimate_sums(arch, images, evals, settings, device=device, progress=progress)
    diag = np.diagonal(sums["train"]).copy()
    if images2 is None:
        return projected_kernel(sums["train"], diag, diag, arch.final, out=sums["train"])
    return projected_kernel(sums["z"], sums["z_sqnorm"], diag, arch.final, out=sums["z"])
