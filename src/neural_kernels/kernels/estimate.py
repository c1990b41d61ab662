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
import math
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass

import numpy as np
import torch
from numpy.typing import NDArray
from tqdm import tqdm

from neural_kernels.architectures import Project, Serial
from neural_kernels.errors import NeuralKernelsError

log = logging.getLogger(__name__)

PRECISIONS = ("float32", "tf32", "bf16")


@dataclass(frozen=True)
class EstimateSettings:
    """How many random networks, how wide, and how they are computed."""

    width: int = 16
    networks: int = 256
    chunk_networks: int = 32
    batch_size: int = 256
    precision: str = "float32"
    seed: int = 0
    tile_rows: int = 2048

    def __post_init__(self) -> None:
        for name in ("width", "networks", "chunk_networks", "batch_size", "tile_rows"):
            if getattr(self, name) < 1:
                raise NeuralKernelsError(f"{name} must be a positive integer")
        if self.precision not in PRECISIONS:
            raise NeuralKernelsError(
                f"unknown precision {self.precision!r}; choose one of {', '.join(PRECISIONS)}"
            )

    @property
    def chunks(self) -> int:
        return math.ceil(self.networks / self.chunk_networks)

    @property
    def features(self) -> int:
        return self.networks * self.width

    def shard_chunks(self, shard: int, shards: int) -> range:
        """The chunk indices of shard ``shard`` (0-based) out of ``shards``."""
        if not 1 <= shards <= self.chunks:
            raise NeuralKernelsError(
                f"{shards} shards cannot split {self.chunks} chunks of {self.chunk_networks} "
                f"networks; use 1..{self.chunks} shards or smaller chunk_networks"
            )
        if not 0 <= shard < shards:
            raise NeuralKernelsError(f"shard index {shard} is not in 0..{shards - 1}")
        return range(shard * self.chunks // shards, (shard + 1) * self.chunks // shards)

    def chunk_networks_at(self, chunk: int) -> int:
        return min(self.chunk_networks, self.networks - chunk * self.chunk_networks)

    def as_dict(self) -> dict:
        return asdict(self)


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
    names = list(evals)
    sizes = [len(evals[name]) for name in names]
    n_eval = sum(sizes)
    height, width, channels = train.shape[1:]
    arch.check_image_size(height, width)
    if out_train is None:
        out_train = np.zeros((n_train, n_train))
    out_evals = dict(out_evals or {})
    for name, size in zip(names, sizes, strict=True):
        if name not in out_evals:
            out_evals[name] = np.zeros((size, n_train))
    sqnorms = {name: np.zeros(size) for name, size in zip(names, sizes, strict=True)}
    tiles = _row_tiles(n_train, n_eval, settings.tile_rows)
    feature_bytes = (n_train + n_eval) * settings.chunk_networks * settings.width * 4
    budget = max_accumulator_bytes or _device_budget(device, feature_bytes)
    passes = _passes(tiles, n_train, budget)
    offsets = np.cumsum([n_train, *sizes])
    seconds = {"features": 0.0, "gram": 0.0}

    def eval_rows(r0: int, r1: int) -> NDArray:
        """Rows r0..r1 (global eval row numbers, past n_train) of the stacked eval sets."""
        parts = []
        for name, start, stop in zip(names, offsets[:-1], offsets[1:], strict=True):
            lo, hi = max(r0, start), min(r1, stop)
            if lo < hi:
                parts.append(np.asarray(evals[name][lo - start : hi - start]))
        return np.concatenate(parts)

    total_steps = len(passes) * len(chunks)
    bar = tqdm(
        total=total_steps,
        unit="chunk",
        disable=not progress,
        desc=f"estimate {arch.name} ({settings.features} features)",
    )
    with bar, _matmul_precision(settings.precision):
        for pass_tiles in passes:
            acc = {
                index: torch.zeros(
                    (tiles[index][1] - tiles[index][0], n_train - tiles[index][2]),
                    dtype=torch.float64,
                    device=device,
                )
                for index in pass_tiles
            }
            eval_sq = torch.zeros(n_eval, dtype=torch.float64, device=device)
            need_eval = any(tiles[i][0] >= n_train for i in pass_tiles)
            for chunk in chunks:
                params = chunk_parameters(arch, settings, chunk, channels)
                started = time.perf_counter()
                phi = random_features(
                    arch,
                    params,
                    train,
                    batch_size=settings.batch_size,
                    device=device,
                    precision=settings.precision,
                )
                phi_eval = None
                if need_eval:
                    phi_eval = random_features(
                        arch,
                        params,
                        eval_rows(n_train, n_train + n_eval),
                        batch_size=settings.batch_size,
                        device=device,
                        precision=settings.precision,
                    )
                    eval_sq += phi_eval.double().square().sum(dim=1)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                mid = time.perf_counter()
                for index in pass_tiles:
                    r0, r1, c0 = tiles[index]
                    rows = phi[r0:r1] if r0 < n_train else phi_eval[r0 - n_train : r1 - n_train]
                    acc[index].add_(rows @ phi[c0:].T)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                seconds["features"] += mid - started
                seconds["gram"] += time.perf_counter() - mid
                bar.update()
            for index in pass_tiles:
                r0, r1, c0 = tiles[index]
                block = acc.pop(index).cpu().numpy()
                if r0 < n_train:
                    out_train[r0:r1, c0:] = block
                    out_train[r1:, r0:r1] = block[:, r1 - r0 :].T
                else:
                    for name, start, stop in zip(names, offsets[:-1], offsets[1:], strict=True):
                        lo, hi = max(r0, start), min(r1, stop)
                        if lo < hi:
                            out_evals[name][lo - start : hi - start] = block[lo - r0 : hi - r0]
            if need_eval:
                values = eval_sq.cpu().numpy()
                for name, start, stop in zip(names, offsets[:-1], offsets[1:], strict=True):
                    sqnorms[name] = values[start - n_train : stop - n_train]
    features = sum(settings.chunk_networks_at(c) for c in chunks) * settings.width
    result = {"train": out_train, "features": features, "seconds": seconds, "passes": len(passes)}
    for name in names:
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
