"""Every stage's settings, each choice defined once: default, allowed values, help.

A stage's settings are one frozen dataclass; each field is a
:func:`~neural_kernels.fields.setting` whose metadata carries its help text and, where
the values are a closed set, its choices (a tuple, or a registry's names). The
command-line interface derives its options from these fields
(:mod:`neural_kernels.fields`), and
``tests/test_settings.py`` checks the workflow's schema
(``workflow/schemas/config.schema.yaml``) against them, so none of them can drift.

Torch-free on purpose: the CLI builds every subcommand's options from these classes,
and a job that needs no torch (prepare, subset, report) should not pay for importing
it (6.5 s on a 2-core machine). The registries of things implemented with torch
(activations, solvers) are read lazily, by name.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from neural_kernels.catalog import SOLVERS
from neural_kernels.errors import NeuralKernelsError
from neural_kernels.fields import (
    Checked,
    changed_fields,
    fraction,
    positive_int,
    refuse_unused,
    setting,
)
from neural_kernels.registry import LazyChoices

DEVICE_HELP = "auto (CUDA when present), cpu, cuda or cuda:N"


# ------------------------------------------------------------------------------ data


@dataclasses.dataclass(frozen=True)
class DownloadSettings(Checked):
    """How hard ``download`` tries before giving up."""

    retries: int = setting(
        3, "extra attempts after a transient failure (HTTP 5xx/429/408, network error)", minimum=0
    )
    timeout: float = setting(60.0, "socket timeout in seconds", minimum=0)


@dataclasses.dataclass(frozen=True)
class PrepareSettings(Checked):
    """How a source's images are split into train, val and test."""

    val_fraction: float = setting(
        0.1, "share of the training data held out (seeded, class-stratified) for validation",
        parse=fraction,
    )  # fmt: skip
    test_fraction: float | None = setting(
        None,
        "share held out as test when the source has no official test split "
        "(default: the source's own, 0.1 for imagenet_r, the thesis's 9:1, else 0.2)",
        parse=fraction,
    )
    seed: int = setting(0, "seed of the hold-outs (and of synthetic images)", minimum=0)
    image_size: int | None = setting(
        None,
        "imagenet_r: resize images to this square size (default 224); synthetic: their "
        "size (default 32)",
        parse=positive_int,
        minimum=8,
    )
    size: int | None = setting(
        None, "synthetic: training images (train + val)", parse=positive_int, minimum=1
    )
    test_size: int | None = setting(
        None, "synthetic: test images (default: a fifth of size)", parse=positive_int, minimum=1
    )
    channels: int = setting(3, "synthetic: channels of every image", parse=positive_int, minimum=1)
    classes: int = setting(10, "synthetic: classes", parse=positive_int, minimum=2)


# ------------------------------------------------------------------------------- ZCA

ZCA_VARIANTS = ("thesis", "shankar")
ZCA_SOLVERS = ("exact", "randomized", "auto")
ZCA_DTYPES = ("float32", "float64")
#: ``solver="auto"`` uses the exact eigendecomposition up to this many features
#: (a 4096 x 4096 float64 covariance is 128 MiB) and the randomized SVD above.
ZCA_AUTO_EXACT_MAX_FEATURES = 4096
#: ZCA's default row blocks hold about this many bytes (float32).
ZCA_BLOCK_BYTES = 1 << 28
#: Preprocessed rows up to this size stay on the device between the randomized
#: solver's passes instead of being re-read from the (memory-mapped) input.
ZCA_RESIDENT_BYTES = 1 << 30


@dataclasses.dataclass(frozen=True)
class ZcaSettings(Checked):
    """ZCA whitening: which variant, which solver, and their parameters.

    ``thesis``: ``(x - mean) V diag(sqrt(N-1) / (D + eps)) V^T``; ``shankar``: per-image
    centring and unit norm, then ``x (C + eps I)^(-1/2)``.
    """

    variant: str = setting(
        "thesis", "thesis or shankar (Shankar et al. 2020)", choices=ZCA_VARIANTS
    )
    solver: str = setting(
        "auto", "auto: exact up to 4096 features, randomized above", choices=ZCA_SOLVERS
    )
    rank: int | None = setting(
        None, "k components (default min(N, P); randomized: needed)", parse=positive_int, minimum=1
    )
    eps: float | None = setting(
        None,
        "thesis: added to singular values (default 0.1); shankar: eigenvalue bias (1e-5)",
        parse=float,
        minimum=0,
    )
    oversample: int = setting(10, "randomized: extra columns of the test matrix", minimum=0)
    power_iters: int = setting(4, "randomized: power iterations", minimum=0)
    flips: bool = setting(False, "fit on the images and their horizontal flips")
    seed: int = setting(0, "randomized: seed of the test matrix", minimum=0)
    dtype: str = setting(
        "float32",
        "working precision of the streamed products (exact eigendecomposition: float64)",
        choices=ZCA_DTYPES,
    )

    def solver_for(self, n_features: int) -> str:
        """The solver that runs on ``n_features`` features (``auto`` resolved)."""
        if self.solver != "auto":
            return self.solver
        return "exact" if n_features <= ZCA_AUTO_EXACT_MAX_FEATURES else "randomized"

    def fit_options(self) -> dict:
        """The fit's own options (what zca.json records as ``options``)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "dtype"}


# --------------------------------------------------------------------------- kernels

KERNEL_METHODS = ("analytic", "estimate")
ANALYTIC_PRECISIONS = ("float64", "mixed", "float32")
ESTIMATE_PRECISIONS = ("float32", "tf32", "bf16")
#: dtypes of a kernel's stored files (benchmarks/storage.py measures what float32 changes):
#: the analytic stage's and the merge's option (an estimate's shards keep float64 sums)
KERNEL_STORAGES = ("float64", "float32")
DEFAULT_STORAGE = KERNEL_STORAGES[0]
STORAGE_HELP = (
    "dtype of the kernel files: float32 halves them and every solver pass over them "
    "(computed, summed and solved in float64)"
)
ARCHITECTURE_NAMES = LazyChoices("neural_kernels.catalog:MYRTLE_STAGES")
ACTIVATION_NAMES = LazyChoices("neural_kernels.architectures:ACTIVATIONS")


#: KernelSpec's fields that concern crops (a record holds them only with crops).
CROP_KEYS = ("crop", "copies", "crop_seed")


@dataclasses.dataclass(frozen=True)
class KernelSpec(Checked):
    """Which kernel: the architecture, its nonlinearity, and flip augmentation."""

    arch: str = setting(
        help="the architecture (neural_kernels.catalog)", choices=ARCHITECTURE_NAMES
    )
    activation: str = setting("relu", "the nonlinearity", choices=ACTIVATION_NAMES)
    gamma: float = setting(1.0, "gaussian: exp(gamma (r - 1))", minimum=0)
    flips: bool = setting(
        False, "append the horizontal mirrors of the fitted images, doubling them"
    )
    crop: int | None = setting(
        None,
        "augment by crops: COPIES random CROP x CROP windows of every fitted image (drawn "
        "once from CROP_SEED), the centre window of every eval image",
        parse=positive_int,
        minimum=1,
    )
    copies: int = setting(
        1, "random crops per fitted image (with crop)", parse=positive_int, minimum=1
    )
    crop_seed: int = setting(0, "seed of the random crops (with crop)", minimum=0)

    def __post_init__(self) -> None:
        if not self.gamma > 0:
            raise NeuralKernelsError(f"gamma must be positive, got {self.gamma}")
        if self.crop is None and (self.copies != 1 or self.crop_seed != 0):
            raise NeuralKernelsError("copies and crop_seed concern crops: set crop too")
        super().__post_init__()


#: Bytes of one block's covariance tensor ``(B, B, H, W, H, W)`` that an automatic
#: analytic block size aims at on a CPU (one block per worker thread) and on a GPU.
#: Measured on 2 cores (512 KiB L2 each), 192 digits, Myrtle5, 2 block workers: float64
#: 4x4 blocks 3.5 s, 8x8 1.78, 11x11 1.84, 14x14 1.89, 20x20 2.29; "mixed" (float32
#: early layers) 8x8 0.88 s, 11x11 0.75, 16x16 0.76, 22x22 0.92. Small blocks pay
#: torch's per-operation overhead, large ones leave the cache.
ANALYTIC_CPU_BLOCK_BYTES = 1 << 21
ANALYTIC_GPU_BLOCK_BYTES = 1 << 31


@dataclasses.dataclass(frozen=True)
class AnalyticSettings(Checked):
    """How the exact kernel is computed (the result does not depend on it)."""

    block_size: int | None = setting(
        None,
        "images per block side (default: 2 MiB blocks on a CPU, 2 GiB on a GPU)",
        parse=positive_int,
        minimum=1,
    )
    precision: str = setting(
        "float64",
        "float64, mixed (float64 after the last 2x2 pool, as Shankar et al.) or float32",
        choices=ANALYTIC_PRECISIONS,
    )
    storage: str = setting(DEFAULT_STORAGE, STORAGE_HELP, choices=KERNEL_STORAGES)


@dataclasses.dataclass(frozen=True)
class EstimateSettings(Checked):
    """How many random networks, how wide, and how they are computed."""

    width: int = setting(64, "channels of each random network", parse=positive_int, minimum=1)
    networks: int = setting(
        64, "random networks (features = networks x width)", parse=positive_int, minimum=1
    )
    chunk_networks: int = setting(
        16,
        "networks drawn and run together (the unit of seeding and sharding)",
        parse=positive_int,
        minimum=1,
    )
    batch_size: int = setting(256, "images per forward pass", parse=positive_int, minimum=1)
    precision: str = setting(
        "float32",
        "float32, tf32 or bf16 features (products accumulated in float64)",
        choices=ESTIMATE_PRECISIONS,
    )
    seed: int = setting(0, "seed of the random networks", minimum=0)
    tile_rows: int = setting(2048, "rows per Gram tile", parse=positive_int, minimum=1)

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
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- solvers

SOLVER_NAMES = LazyChoices("neural_kernels.catalog:SOLVERS")


@dataclasses.dataclass(frozen=True)
class SolverSettings:
    """A solver and its hyperparameter grid (empty grid: the solver's default grid).

    ``eta_t``: flow and boosting (the per-batch flow); ``lambdas``: ridge and pcg;
    ``batch_size`` (``M``), ``steps`` and ``seed`` (of the batch shuffles): boosting;
    ``rank`` (of the pivoted Cholesky preconditioner), ``tolerance`` (relative
    residual) and ``max_iterations``: pcg.
    The grids are sorted from the most regularised candidate (see the tie rule of
    :mod:`neural_kernels.solvers.stage`).
    """

    method: str = setting(help="the solver (neural_kernels.catalog)", choices=SOLVER_NAMES)
    eta_t: tuple[float, ...] = setting(
        (), "flow/boosting: eta t grid (default: the solver's)", parse=float, many=True
    )
    lambdas: tuple[float, ...] = setting(
        (), "ridge/pcg: lambda grid (default: the solver's)", parse=float, many=True
    )
    batch_size: int = setting(256, "boosting: batch size M", parse=positive_int, minimum=1)
    steps: int = setting(20, "boosting: number of steps", parse=positive_int, minimum=1)
    seed: int = setting(0, "boosting: seed of the batch shuffles", minimum=0)
    rank: int = setting(1000, "pcg: rank of the preconditioner", parse=positive_int, minimum=1)
    tolerance: float = setting(1e-8, "pcg: relative residual to stop at", parse=float)
    max_iterations: int = setting(
        500, "pcg: iterations (passes over the kernel) at most", parse=positive_int, minimum=1
    )

    def __post_init__(self) -> None:
        solver = SOLVERS.lookup(self.method)
        unused = changed_fields(self, keep=("method", *solver.settings))
        users = [name for name, other in SOLVERS.items() if set(unused) & set(other.settings)]
        refuse_unused(f"solve --method {self.method}", unused, " and ".join(users))
        eta_t = sorted(float(v) for v in self.eta_t or solver.default_eta_t)
        lambdas = sorted((float(v) for v in self.lambdas or solver.default_lambdas), reverse=True)
        object.__setattr__(self, "eta_t", tuple(eta_t))
        object.__setattr__(self, "lambdas", tuple(lambdas))
        grid = getattr(self, solver.grid)
        if not grid or min(grid) <= 0 or not all(map(math.isfinite, grid)):
            raise NeuralKernelsError(
                f"{solver.grid} must be positive finite numbers, got {list(grid)}"
            )
        if self.batch_size < 1 or self.steps < 1 or self.seed < 0:
            raise NeuralKernelsError("batch_size and steps must be >= 1 and seed >= 0")
        if not 0 < self.tolerance < 1 or self.rank < 1 or self.max_iterations < 1:
            raise NeuralKernelsError(
                "pcg needs 0 < tolerance < 1, rank >= 1 and max_iterations >= 1"
            )

    @classmethod
    def using(cls, method: str, **options: Any) -> SolverSettings:
        """``method``'s settings from ``options``, keeping the ones it uses: for a plan
        that sets every solver's options at once (the constructor refuses the others)."""
        used = SOLVERS.lookup(method).settings
        return cls(method, **{key: value for key, value in options.items() if key in used})

    def describe(self) -> dict:
        """The settings that matter for this method (what metrics.json records)."""
        keys = ("method", *SOLVERS[self.method].settings)
        return {key: getattr(self, key) for key in keys}


# -------------------------------------------------------------------------- networks

SCHEDULES = ("cosine", "step")
MODEL_NAMES = LazyChoices("neural_kernels.catalog:MYRTLE_STAGES", first=("resnet18",))
#: Peak learning rates unless told. The Myrtle networks end with the finite layer of
#: the kernels' final projection, whose unit-RMS scaling makes them insensitive to the
#: scale of their convolutions: on digits (width 64, 20 epochs) lr 0.1 does not train
#: them (the loss stays at ln 10), 0.05 gives 97% and 0.02 99% test accuracy.
DEFAULT_LR = {"resnet18": 0.1}
DEFAULT_MYRTLE_LR = 0.02


@dataclasses.dataclass(frozen=True)
class TrainSettings(Checked):
    """Everything that defines a training run (and keys its resume checkpoint).

    ``width``, ``activation`` and ``gamma`` concern the Myrtle networks only. ``lr`` is
    the peak learning rate of a per-step schedule: ``cosine`` decays it to zero,
    ``step`` multiplies it by 0.1 at 50% and 75% of the steps. ``lr=None`` takes the
    model's :data:`DEFAULT_LR`.
    """

    model: str = setting("resnet18", "resnet18 or a finite Myrtle network", choices=MODEL_NAMES)
    width: int = setting(64, "myrtle: channels", parse=positive_int, minimum=1)
    activation: str = setting("relu", "myrtle: the nonlinearity", choices=ACTIVATION_NAMES)
    gamma: float = setting(1.0, "myrtle, gaussian: exp(gamma (r - 1))", minimum=0)
    epochs: int = setting(30, "passes over the training set", parse=positive_int, minimum=1)
    batch_size: int = setting(128, "images per SGD step", parse=positive_int, minimum=1)
    lr: float | None = setting(
        None, "peak learning rate (default 0.1; Myrtle networks 0.02)", parse=float, minimum=0
    )
    momentum: float = setting(0.9, "SGD momentum", minimum=0)
    weight_decay: float = setting(5e-4, "SGD weight decay", minimum=0)
    schedule: str = setting(
        "cosine",
        "per step: cosine to zero, or step (x0.1 at 50%% and 75%%)",
        choices=SCHEDULES,
    )
    crop: int | None = setting(
        None,
        "train on random CROP x CROP windows, evaluate on the centre one",
        parse=positive_int,
        minimum=1,
    )
    flip: bool = setting(False, "random horizontal flips in training")
    seed: int = setting(0, "seed of the weights, data order and augmentation", minimum=0)
    deterministic: bool = setting(
        False, "torch.use_deterministic_algorithms(True): bit-for-bit reruns (slower on GPUs)"
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.lr is None:
            object.__setattr__(self, "lr", DEFAULT_LR.get(self.model, DEFAULT_MYRTLE_LR))
        if not self.lr > 0 or not self.gamma > 0:
            raise NeuralKernelsError("lr and gamma must be positive")

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)
