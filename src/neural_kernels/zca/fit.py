"""Fitting ZCA whitening: the exact covariance or the randomized range finder, over
images streamed in row blocks (see the package docstring for the formulas).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from numpy.typing import NDArray
from tqdm.auto import tqdm

from neural_kernels.device import resolve_dtype
from neural_kernels.errors import DataError, NeuralKernelsError
from neural_kernels.settings import ZCA_RESIDENT_BYTES, ZCA_SOLVERS, ZCA_VARIANTS, ZcaSettings
from neural_kernels.zca.transform import (
    DEFAULT_EPS,
    MIN_FIT_IMAGES,
    ZCATransform,
    check_images,
    default_block_rows,
    per_image_rows,
)

#: The settings of :func:`zca_fit` unless told (frozen, so one instance serves all calls).
DEFAULT_SETTINGS = ZcaSettings()


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
    image_shape = check_images(images, name)
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
