"""ZCA whitening, exact or by randomized SVD, streamed in row blocks (CPU or GPU).

Let ``X`` be the ``N x P`` matrix of flattened training images (uint8 pixels are
scaled to [0, 1]; float images are used as given), centred by its feature mean
``mu``, with thin SVD ``X - 1 mu^T = U D V^T``. Two variants are provided:

* ``thesis`` (the thesis, slide "ZCA"): ``zca(x) = (x - mu) V diag(sqrt(N-1) / (D + eps)) V^T``.
  With rank ``k < P`` this projects onto the top-``k`` principal subspace.
* ``shankar`` (Shankar et al. 2020, reference code of "Neural Kernels Without
  Tangents"): every image is first centred over its own pixels and scaled to unit L2
  norm; then, with ``C = X^T X / N`` (no feature centring) and eigenvalue bias
  ``eps`` (1e-5 for CIFAR-10), ``zca(x) = x (C + eps I)^{-1/2}``. With rank ``k < P``
  the top-``k`` eigenpairs ``(D^2/N, V)`` are kept exactly and the ``P - k`` other
  eigenvalues are replaced by their mean, which is known exactly from the trace,
  ``m = (tr C - sum D^2/N) / (P - k)`` with ``tr C`` the mean squared norm of the
  images (1 after the unit-norm step), so
  ``zca(x) = x V diag((D^2/N + eps)^{-1/2}) V^T + (m + eps)^{-1/2} (x - x V V^T)``.
  (Scaling the complement by ``eps^{-1/2}``, i.e. taking ``m = 0``, is far from the
  exact transform when ``eps`` is comparable to ``1/P``, as for 224x224 images.)

Solvers: ``exact`` accumulates the ``P x P`` covariance and eigendecomposes it
(``O(N P^2 + P^3)``, float64); ``randomized`` is the Halko-Martinsson-Tropp range
finder with ``q`` power iterations (``O(N P l q)`` with ``l = k + oversample``) and never
forms a ``P x P`` matrix. Both stream ``X`` in row blocks, so ``X`` may be a memory-map
larger than device memory; with ``flips`` each block is followed by its horizontally
flipped copy, so the fit sees ``2N`` images.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from numpy.typing import NDArray
from tqdm.auto import tqdm

from neural_kernels.checks import check_finite
from neural_kernels.data.rows import StackedRows
from neural_kernels.device import (
    device_name,
    peak_memory_mb,
    reset_peak_memory,
    resolve_device,
    resolve_dtype,
)
from neural_kernels.errors import DataError, NeuralKernelsError
from neural_kernels.layout import ZCA_META, ZCA_TRANSFORM
from neural_kernels.outputs import (
    array_bytes,
    open_memmap,
    require_space,
    staged_directory,
    write_json,
)
from neural_kernels.settings import (
    ZCA_BLOCK_BYTES,
    ZCA_RESIDENT_BYTES,
    ZCA_SOLVERS,
    ZCA_VARIANTS,
    ZcaSettings,
)

#: ``eps`` of each variant unless told: the thesis's is added to singular values of
#: [0, 1]-scaled pixels; Shankar et al.'s eigenvalue bias for CIFAR-10 is 1e-5.
DEFAULT_EPS = {"thesis": 0.1, "shankar": 1e-5}
#: The settings of :func:`zca_fit` unless told (frozen, so one instance serves all calls).
DEFAULT_SETTINGS = ZcaSettings()


@dataclass
class ZCATransform:
    """A fitted whitening map ``x -> (x' - mean) V diag(scales) V^T + c (residual)``.

    ``x'`` is the flattened image after the variant's per-image step, ``V`` is
    ``components`` (``P x k``, orthonormal columns) and ``c`` is ``complement_scale``
    applied to the part of ``x' - mean`` orthogonal to ``V`` (0: projected out).
    """

    variant: str
    solver: str
    eps: float
    image_shape: tuple[int, int, int]
    n_samples: int
    mean: NDArray[np.float64]
    components: NDArray[np.float64]
    singular_values: NDArray[np.float64]
    scales: NDArray[np.float64]
    complement_scale: float

    @property
    def rank(self) -> int:
        return self.components.shape[1]

    def save(self, path: Path | str) -> None:
        """Write the transform as an ``.npz`` that :meth:`load` reads back."""
        fields = asdict(self)
        fields["image_shape"] = np.asarray(self.image_shape)
        with open(path, "wb") as handle:
            np.savez(handle, **fields)

    @classmethod
    def load(cls, path: Path | str) -> ZCATransform:
        """Read a transform written by :meth:`save`."""
        try:
            with np.load(path, allow_pickle=False) as data:
                return cls(
                    variant=str(data["variant"]),
                    solver=str(data["solver"]),
                    eps=float(data["eps"]),
                    image_shape=tuple(int(v) for v in data["image_shape"]),
                    n_samples=int(data["n_samples"]),
                    mean=data["mean"],
                    components=data["components"],
                    singular_values=data["singular_values"],
                    scales=data["scales"],
                    complement_scale=float(data["complement_scale"]),
                )
        except (OSError, KeyError, ValueError) as error:
            raise DataError(f"{path} is not a ZCA transform written by zca ({error})") from None


def default_block_rows(n_features: int) -> int:
    """Rows per block so that one float32 block is about 256 MiB."""
    return max(1, ZCA_BLOCK_BYTES // (4 * n_features))


#: Fewest images a ZCA fit takes: one image minus the mean is zero.
MIN_FIT_IMAGES = 2


def _check_images(images: NDArray, name: str) -> tuple[int, int, int]:
    if images.ndim != 4:
        raise DataError(f"{name}: expected images (N, H, W, C), got shape {images.shape}")
    if images.dtype != np.uint8 and not np.issubdtype(images.dtype, np.floating):
        raise DataError(f"{name}: expected uint8 or float images, got dtype {images.dtype}")
    return tuple(int(v) for v in images.shape[1:])


def per_image_rows(
    block: NDArray, variant: str, device: torch.device, dtype: torch.dtype, name: str
) -> torch.Tensor:
    """Flatten a block of images to rows, scale uint8 to [0, 1], apply the variant's step.

    ``shankar``: subtract each row's mean and divide by its L2 norm (an all-constant
    image becomes all zeros). Raises on NaN or infinite values.
    """
    rows = torch.from_numpy(np.array(block)).to(device).reshape(len(block), -1)
    scaled = rows.to(dtype) / 255.0 if rows.dtype == torch.uint8 else rows.to(dtype)
    if not torch.isfinite(scaled).all():
        raise DataError(f"{name}: images contain NaN or infinite values; clean them before ZCA")
    if variant == "shankar":
        scaled = scaled - scaled.mean(dim=1, keepdim=True)
        norms = scaled.norm(dim=1, keepdim=True)
        scaled = scaled / torch.where(norms > 0, norms, torch.ones_like(norms))
    return scaled


def _row_blocks(images: NDArray, block_rows: int, flips: bool) -> Iterator[NDArray]:
    """Consecutive row blocks of ``images``, each followed by its flip when ``flips``."""
    for start in range(0, len(images), block_rows):
        block = images[start : start + block_rows]
        yield block
        if flips:
            yield block[:, :, ::-1]


def _randomized_range(
    times: Callable[[torch.Tensor], torch.Tensor],
    t_times: Callable[[torch.Tensor], torch.Tensor],
    omega: torch.Tensor,
    power_iters: int,
) -> torch.Tensor:
    """Orthonormal ``Q`` with ``range(Q) ~ range(A)`` (Halko et al. 2011, Alg. 4.4).

    ``times(M) = A M`` and ``t_times(M) = A^T M``; each power iteration
    re-orthonormalises both products, which keeps small singular values accurate.
    """
    q = torch.linalg.qr(times(omega)).Q
    for _ in range(power_iters):
        q = torch.linalg.qr(t_times(q)).Q
        q = torch.linalg.qr(times(q)).Q
    return q


@dataclass(frozen=True)
class _FitPlan:
    """A checked fit: the variant, solver and rank chosen, the sizes, where it runs.

    ``n`` counts the images the fit sees (flips double them), ``p`` the features of
    one image; ``resident``: the preprocessed rows are kept on the device between the
    randomized solver's passes (they fit in :data:`ZCA_RESIDENT_BYTES`).
    """

    variant: str
    solver: str
    rank: int
    eps: float
    image_shape: tuple[int, int, int]
    n: int
    p: int
    flips: bool
    device: torch.device
    dtype: torch.dtype
    block_rows: int
    resident: bool


def _check_choices(variant: str, solver: str) -> None:
    """The variant and solver must be known ones."""
    if variant not in ZCA_VARIANTS:
        raise NeuralKernelsError(f"unknown ZCA variant {variant!r}; choose one of {ZCA_VARIANTS}")
    if solver not in ZCA_SOLVERS:
        raise NeuralKernelsError(f"unknown ZCA solver {solver!r}; choose one of {ZCA_SOLVERS}")


def _fit_eps(variant: str, eps: float | None) -> float:
    """The checked ``eps`` (the variant's :data:`DEFAULT_EPS` when ``None``)."""
    if eps is None:
        eps = DEFAULT_EPS[variant]
    if eps <= 0:
        raise NeuralKernelsError(f"eps must be positive, got {eps}")
    return eps


def _fit_rank(rank: int | None, solver: str, n: int, p: int, flips: bool) -> int:
    """The checked rank: ``min(N, P)`` by default, required by the randomized solver."""
    if rank is None:
        if solver == "randomized":
            raise NeuralKernelsError(
                f"the randomized solver needs a rank k (P = {p} features); set it, e.g. "
                f"rank: {min(n, p, 1024)}"
            )
        rank = min(n, p)
    if not 1 <= rank <= min(n, p):
        raise NeuralKernelsError(
            f"rank {rank} is not in 1..min(N, P) = {min(n, p)} for N = {n} images"
            f"{' (flips double N)' if flips else ''} of P = {p} features; choose a rank "
            f"<= {min(n, p)}"
        )
    return rank


def _plan_fit(
    images: NDArray,
    settings: ZcaSettings,
    device: torch.device | str,
    block_rows: int | None,
    name: str,
) -> _FitPlan:
    """Check ``settings`` against ``images`` and resolve every default of the fit."""
    _check_choices(settings.variant, settings.solver)
    eps = _fit_eps(settings.variant, settings.eps)
    image_shape = _check_images(images, name)
    if len(images) < MIN_FIT_IMAGES:
        raise DataError(
            f"{name}: ZCA cannot be fitted on {len(images)} image(s): it needs at least "
            f"{MIN_FIT_IMAGES} (centred on their mean, a single image is all zeros and "
            "would whiten every image to a blank one); fit on the training split"
        )
    n = len(images) * (2 if settings.flips else 1)
    p = math.prod(image_shape)
    solver = settings.solver_for(p)
    rank = _fit_rank(settings.rank, solver, n, p, settings.flips)
    dtype = resolve_dtype(settings.dtype)
    return _FitPlan(
        variant=settings.variant,
        solver=solver,
        rank=rank,
        eps=eps,
        image_shape=image_shape,
        n=n,
        p=p,
        flips=settings.flips,
        device=torch.device(device),
        dtype=dtype,
        block_rows=block_rows or default_block_rows(p),
        resident=n * p * torch.finfo(dtype).bits // 8 <= ZCA_RESIDENT_BYTES,
    )


def _fit_progress(plan: _FitPlan, n_images: int, power_iters: int) -> tqdm:
    """A progress bar counting the row blocks that every pass of the fit reads."""
    n_blocks = math.ceil(n_images / plan.block_rows) * (2 if plan.flips else 1)
    passes = 1 if plan.variant == "thesis" else 0  # the feature mean needs a pass
    passes += 1 if plan.solver == "exact" or plan.resident else 2 * power_iters + 2
    return tqdm(
        total=passes * n_blocks, desc=f"zca fit ({plan.solver})", unit="block", mininterval=1.0
    )


def _prepared_rows(images: NDArray, plan: _FitPlan, name: str, bar: tqdm) -> Iterator[torch.Tensor]:
    """The fit's row blocks (flips included) after the variant's per-image step."""
    for block in _row_blocks(images, plan.block_rows, plan.flips):
        yield per_image_rows(block, plan.variant, plan.device, plan.dtype, name)
        bar.update()


def _feature_mean(raw: Callable[[], Iterator[torch.Tensor]], plan: _FitPlan) -> torch.Tensor:
    """The float64 feature mean of the rows (``thesis``); zeros for ``shankar`` (no pass)."""
    if plan.variant != "thesis":
        return torch.zeros(plan.p, dtype=torch.float64, device=plan.device)
    total = torch.zeros(plan.p, dtype=torch.float64, device=plan.device)
    for rows in raw():
        total += rows.sum(dim=0, dtype=torch.float64)
    return total / plan.n


def _centred(
    raw: Callable[[], Iterator[torch.Tensor]], mean: torch.Tensor, cache: bool
) -> Callable[[], Iterator[torch.Tensor]]:
    """The row blocks minus ``mean`` (working dtype), re-read on each call unless ``cache``."""

    def centred_blocks() -> Iterator[torch.Tensor]:
        for rows in raw():
            yield rows - mean

    if cache:
        return list(centred_blocks()).__iter__
    return centred_blocks


def _exact_spectrum(
    blocks: Callable[[], Iterator[torch.Tensor]], plan: _FitPlan
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Singular values, components and ``trace(A^T A)`` from the float64 covariance."""
    cov = torch.zeros(plan.p, plan.p, dtype=torch.float64, device=plan.device)
    for rows in blocks():
        rows64 = rows.to(torch.float64)
        cov.addmm_(rows64.T, rows64)
    total_square = float(cov.trace())
    evals, evecs = torch.linalg.eigh(cov)
    del cov
    order = torch.argsort(evals, descending=True)[: plan.rank]
    return evals[order].clamp_min(0).sqrt(), evecs[:, order], total_square


def _randomized_spectrum(
    blocks: Callable[[], Iterator[torch.Tensor]], plan: _FitPlan, settings: ZcaSettings
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Singular values, components and ``trace(A^T A)`` by the randomized SVD of ``A``."""
    width = min(plan.rank + settings.oversample, plan.n, plan.p)
    generator = torch.Generator().manual_seed(settings.seed)
    omega = torch.randn(plan.p, width, generator=generator, dtype=plan.dtype).to(plan.device)
    total_square = 0.0
    first_pass = True

    def times(mat: torch.Tensor) -> torch.Tensor:
        nonlocal total_square, first_pass
        out = []
        for rows in blocks():
            out.append(rows @ mat)
            if first_pass:  # the trace comes with the first product, A Omega
                total_square += float(torch.linalg.vector_norm(rows)) ** 2
        first_pass = False
        return torch.cat(out)

    def t_times(q: torch.Tensor) -> torch.Tensor:
        acc = torch.zeros(plan.p, q.shape[1], dtype=plan.dtype, device=plan.device)
        start = 0
        for rows in blocks():
            acc.addmm_(rows.T, q[start : start + len(rows)])
            start += len(rows)
        return acc

    q = _randomized_range(times, t_times, omega, settings.power_iters)
    # A^T Q = (Q^T A)^T = W S U_B^T, so A ~ Q Q^T A = (Q U_B) S W^T: V = W.
    w, s, _ = torch.linalg.svd(t_times(q).to(torch.float64), full_matrices=False)
    return s[: plan.rank], w[:, : plan.rank], total_square


def _thesis_scales(singular: torch.Tensor, plan: _FitPlan) -> tuple[torch.Tensor, float]:
    """``sqrt(N-1) / (D + eps)``; the complement is projected out (scale 0)."""
    return math.sqrt(plan.n - 1) / (singular + plan.eps), 0.0


def _shankar_scales(
    singular: torch.Tensor, total_square: float, plan: _FitPlan
) -> tuple[torch.Tensor, float]:
    """``(D^2/N + eps)^(-1/2)``, and ``(m + eps)^(-1/2)`` on the complement (see above)."""
    scales = (singular**2 / plan.n + plan.eps).rsqrt()
    complement = 0.0
    if plan.rank < plan.p:
        rest = max(total_square - float((singular**2).sum()), 0.0) / plan.n / (plan.p - plan.rank)
        complement = (rest + plan.eps) ** -0.5
    return scales, complement


def zca_fit(
    images: NDArray,
    settings: ZcaSettings = DEFAULT_SETTINGS,
    *,
    device: torch.device | str = "cpu",
    block_rows: int | None = None,
    name: str = "images",
) -> ZCATransform:
    """Fit ZCA whitening on ``images`` ``(N, H, W, C)`` (see the module docstring).

    ``settings.rank`` defaults to ``min(N, P)`` for the exact solver and is required for
    the randomized one; ``settings.eps`` defaults to :data:`DEFAULT_EPS` of the variant.
    ``settings.dtype`` is the working precision of the block products; the exact
    covariance and its eigendecomposition are always float64.
    """
    plan = _plan_fit(images, settings, device, block_rows, name)
    bar = _fit_progress(plan, len(images), settings.power_iters)

    def raw() -> Iterator[torch.Tensor]:
        return _prepared_rows(images, plan, name, bar)

    mean = _feature_mean(raw, plan)
    blocks = _centred(raw, mean.to(plan.dtype), plan.solver == "randomized" and plan.resident)
    # trace(A^T A) of the centred rows A: the sum of all P eigenvalues times N.
    if plan.solver == "exact":
        singular, components, total_square = _exact_spectrum(blocks, plan)
    else:
        singular, components, total_square = _randomized_spectrum(blocks, plan, settings)
    bar.close()
    if plan.variant == "thesis":
        scales, complement = _thesis_scales(singular, plan)
    else:
        scales, complement = _shankar_scales(singular, total_square, plan)
    return ZCATransform(
        variant=plan.variant,
        solver=plan.solver,
        eps=float(plan.eps),
        image_shape=plan.image_shape,
        n_samples=plan.n,
        mean=mean.cpu().numpy(),
        components=components.cpu().numpy(),
        singular_values=singular.cpu().numpy(),
        scales=scales.cpu().numpy(),
        complement_scale=complement,
    )


def zca_apply(
    transform: ZCATransform,
    images: NDArray,
    *,
    out: NDArray[np.float32] | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    block_rows: int | None = None,
    name: str = "images",
) -> NDArray[np.float32]:
    """Whiten ``images`` ``(N, H, W, C)`` with a fitted transform, in row blocks.

    Returns float32 images of the same shape, written into ``out`` (e.g. an
    ``open_memmap``) when given.
    """
    image_shape = _check_images(images, name)
    if image_shape != tuple(transform.image_shape):
        raise DataError(
            f"{name}: images of shape {image_shape} cannot be whitened by a transform "
            f"fitted on images of shape {tuple(transform.image_shape)}"
        )
    device = torch.device(device)
    if out is None:
        out = np.empty(images.shape, dtype=np.float32)
    p = math.prod(image_shape)
    block_rows = block_rows or default_block_rows(p)
    mean = torch.as_tensor(transform.mean, device=device, dtype=dtype)
    v = torch.as_tensor(transform.components, device=device, dtype=dtype)
    scales = torch.as_tensor(transform.scales, device=device, dtype=dtype)
    for start in tqdm(
        range(0, len(images), block_rows), desc=f"zca apply {name}", unit="block", mininterval=1.0
    ):
        block = images[start : start + block_rows]
        rows = per_image_rows(block, transform.variant, device, dtype, name) - mean
        coords = rows @ v
        white = (coords * scales) @ v.T
        if transform.complement_scale:
            white += transform.complement_scale * (rows - coords @ v.T)
        out[start : start + len(rows)] = white.reshape(len(rows), *image_shape).cpu().numpy()
    return out


def _check_names(inputs: list[Path]) -> None:
    """The inputs' file names must differ: the outputs are named after them."""
    names = [Path(p).name for p in inputs]
    if len(set(names)) != len(names):
        raise NeuralKernelsError(
            f"input file names must differ (outputs are named after them): {names}"
        )


def _read_inputs(inputs: list[Path], fit_on: int) -> list[NDArray]:
    """Memory-map every input ``.npy``; ``fit_on`` must be in ``1..len(inputs)``."""
    arrays = []
    for path in inputs:
        try:
            arrays.append(np.load(path, mmap_mode="r"))
        except (OSError, ValueError) as error:
            raise DataError(f"cannot read {path} as a .npy array ({error})") from None
    if not 1 <= fit_on <= len(inputs):
        raise NeuralKernelsError(f"fit_on must be in 1..{len(inputs)} (the inputs), got {fit_on}")
    return arrays


def _zca_record(
    transform: ZCATransform,
    fitted_on: list[str],
    options: dict,
    device: torch.device,
    dtype: str,
    fit_seconds: float,
) -> dict:
    """zca.json before the apply timings and peak memory are added."""
    return {
        "variant": transform.variant,
        "solver": transform.solver,
        "rank": transform.rank,
        "eps": transform.eps,
        "n_samples": transform.n_samples,
        "n_features": int(math.prod(transform.image_shape)),
        "image_shape": list(transform.image_shape),
        "fitted_on": fitted_on,
        "options": options,
        "singular_values": {
            "first": float(transform.singular_values[0]),
            "last": float(transform.singular_values[-1]),
        },
        "complement_scale": transform.complement_scale,
        "device": device_name(device),
        "dtype": dtype,
        "fit_seconds": fit_seconds,
        "apply_seconds": {},
    }


def _whiten_file(
    transform: ZCATransform,
    images: NDArray,
    out_path: Path,
    name: str,
    *,
    device: torch.device,
    dtype: torch.dtype,
    block_rows: int | None,
) -> float:
    """Whiten ``images`` into the float32 ``.npy`` ``out_path``; returns the seconds taken."""
    started = time.perf_counter()
    out = open_memmap(out_path, np.float32, images.shape)
    zca_apply(
        transform, images, out=out, device=device, dtype=dtype, block_rows=block_rows, name=name
    )
    check_finite(
        out,
        f"the whitened {name}",
        "the transform is not finite (eps 0 with a singular covariance?); nothing was written",
    )
    out.flush()
    del out
    return time.perf_counter() - started


def whiten_files(
    inputs: list[Path],
    out_dir: Path,
    settings: ZcaSettings | None = None,
    *,
    transform_path: Path | None = None,
    fit_on: int = 1,
    device: str = "auto",
    block_rows: int | None = None,
) -> dict:
    """The ``zca`` stage: fit on ``inputs[:fit_on]`` stacked (or load ``transform_path``),
    whiten all. The workflow fits on train + val: the training set of the refit.

    ``settings`` (default :class:`ZcaSettings`) define the fit; with ``transform_path``
    only their ``dtype`` is used. Writes ``out_dir/<input file name>`` (float32, same
    shape) for every input, ``out_dir/transform.npz`` and ``out_dir/zca.json``
    (settings, spectrum summary, timings, device and peak memory), all or nothing.
    Returns the JSON record.
    """
    settings = ZcaSettings() if settings is None else settings
    _check_names(inputs)
    run_device = resolve_device(device, stage="zca")
    work_dtype = resolve_dtype(settings.dtype)
    reset_peak_memory(run_device)
    arrays = _read_inputs(inputs, fit_on)
    sizes = {p.name: array_bytes(a.shape, np.float32) for p, a in zip(inputs, arrays, strict=True)}
    require_space(out_dir, sizes, "zca")
    fitted = [str(path) for path in inputs[:fit_on]]
    started = time.perf_counter()
    if transform_path is None:
        transform = zca_fit(
            StackedRows(arrays[:fit_on]),
            settings,
            device=run_device,
            block_rows=block_rows,
            name=" + ".join(fitted),
        )
        fitted_on, options = fitted, settings.fit_options()
    else:
        transform = ZCATransform.load(transform_path)
        fitted_on, options = [str(transform_path)], {}
    fit_seconds = time.perf_counter() - started
    record = _zca_record(transform, fitted_on, options, run_device, settings.dtype, fit_seconds)
    with staged_directory(out_dir, last=ZCA_META) as stage:
        transform.save(stage / ZCA_TRANSFORM)
        for path, images in zip(inputs, arrays, strict=True):
            record["apply_seconds"][path.name] = _whiten_file(
                transform,
                images,
                stage / path.name,
                str(path),
                device=run_device,
                dtype=work_dtype,
                block_rows=block_rows,
            )
        record.update(peak_memory_mb(run_device))
        write_json(stage / ZCA_META, record)
    return record
