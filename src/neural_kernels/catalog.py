"""The name tables that configs, the CLI and the report read: architectures and solvers.

Torch-free on purpose: the CLI lists these names in its options, and a job that needs
no torch (prepare, subset, report) should not pay for importing it. Entries name their
implementations as ``"module:function"``, imported when used
(:func:`neural_kernels.registry.resolve`), so this module sits below the settings and
the stages that implement them.

**Architectures.** A Myrtle-style architecture is its convolutions per stage;
:func:`neural_kernels.architectures.myrtle` builds the layers (both the finite network
and its kernel) from that.

**Solvers.** Each entry names its candidate generator: a function ``(settings, fit,
targets, device, progress)`` that yields ``(hyperparameters, scores)`` for every point
of its grid, ``scores`` mapping ``"train"`` and each eval split of ``fit`` to a
``(rows, classes)`` tensor, or an error message for a point that failed (see
:func:`neural_kernels.solvers.flow.flow_candidates`). Hyperparameters may carry a
``"diagnostics"`` entry (pcg's iterations and residual), which metrics.json records but
selection ignores. Each entry also states what it holds in memory
(:mod:`neural_kernels.solvers.memory`) and whether it streams the kernel from disk; a
solver that does not is refused up front where its footprint exceeds the job's memory.
A new solver is such a function and one :func:`register_solver` call.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from neural_kernels.registry import Registry, resolve

#: Convolutions per stage (a 2x2 average pool between stages, a global one at the end).
#: Myrtle5/7/10 are Shankar et al.'s; Myrtle11 (64x64) and Myrtle15 (224x224) are this
#: project's reconstruction: the thesis names them without defining them.
MYRTLE_STAGES: Registry = Registry("architecture")
#: The architectures the thesis names without defining them (ours, see above).
RECONSTRUCTED: list[str] = []


def register_architecture(
    name: str, stages: tuple[int, ...], *, reconstructed: bool = False
) -> tuple[int, ...]:
    """Register a Myrtle-style architecture: ``stages[s]`` convolutions in stage ``s``.

    Every registered name is accepted by ``neural-kernels kernel*``/``train`` at once;
    a config needs it in the schema's ``arch``/``model`` enums too
    (``tests/test_settings.py`` fails until it is there).
    """
    if not stages or min(stages) < 1:
        raise ValueError(f"{name}: every stage needs at least one convolution, got {stages}")
    if reconstructed:
        RECONSTRUCTED.append(name)
    return MYRTLE_STAGES.register(name, tuple(stages))


register_architecture("myrtle5", (2, 1, 1))
register_architecture("myrtle7", (2, 2, 2))
register_architecture("myrtle10", (3, 3, 3))
register_architecture("myrtle11", (3, 3, 3, 1), reconstructed=True)
register_architecture("myrtle15", (3, 3, 3, 2, 2, 1), reconstructed=True)


# ---------------------------------------------------------------------------- solvers

_MEMORY = "neural_kernels.solvers.memory"
#: Default grids: 2 points per decade. The Myrtle kernels have a unit diagonal, so
#: these absolute values suit every dataset (eigenvalues run up to about N).
DEFAULT_ETA_T = tuple(10.0 ** (k / 2) for k in range(-4, 17))  # 1e-2 .. 1e8
DEFAULT_LAMBDAS = tuple(10.0 ** (k / 2) for k in range(2, -19, -1))  # 10 .. 1e-9
DEFAULT_BOOSTING_ETA_T = (1e2, 1e4)


@dataclass(frozen=True)
class Solver:
    """A registered solver.

    ``grid``: the :class:`~neural_kernels.settings.SolverSettings` field it searches
    (``eta_t`` or ``lambdas``), sorted from the most regularised candidate;
    ``settings``: every field it reads (what metrics.json records);
    ``candidates``: its generator (``"module:function"`` or the function itself);
    ``footprint``: the bytes it holds, ``(settings, rows, eval_rows, classes, grid)``
    (``"module:function"`` or the function; see :mod:`neural_kernels.solvers.memory`);
    ``streams``: whether it reads the kernel from disk in row blocks (else it loads the
    fitted block whole and is refused where that cannot fit).
    """

    name: str
    grid: str
    settings: tuple[str, ...]
    candidates: str | Callable
    description: str
    footprint: str | Callable[..., int] = f"{_MEMORY}:dense_bytes"
    streams: bool = False
    default_eta_t: tuple[float, ...] = DEFAULT_ETA_T
    default_lambdas: tuple[float, ...] = DEFAULT_LAMBDAS

    def holds_bytes(self, settings: Any, rows: int, eval_rows: int, classes: int) -> int:
        """What this solver holds on a problem of these sizes, in bytes (``settings``: a
        :class:`~neural_kernels.settings.SolverSettings`, which sits above this table)."""
        grid = len(getattr(settings, self.grid))
        return resolve(self.footprint)(settings, rows, eval_rows, classes, grid)


SOLVERS: Registry = Registry("solver method")


def register_solver(solver: Solver) -> Solver:
    """Add ``solver`` under its name; ``neural-kernels solve --method`` accepts it at once
    (a config needs it in the schema's solver ``method`` enum too)."""
    return SOLVERS.register(solver.name, solver)


_STAGE = "neural_kernels.solvers"
for _solver in (
    Solver("flow", "eta_t", ("eta_t",), f"{_STAGE}.flow:flow_candidates",
           "gradient flow, one eigendecomposition for every eta t"),
    Solver("ridge", "lambdas", ("lambdas",), f"{_STAGE}.flow:ridge_candidates",
           "kernel ridge regression, a Cholesky factorisation per lambda"),
    Solver("boosting", "eta_t", ("eta_t", "batch_size", "steps", "seed"),
           f"{_STAGE}.boosting:boosting_candidates",
           "batched stochastic gradient boosting; never factorises the full kernel",
           footprint=f"{_MEMORY}:boosting_bytes", streams=True,
           default_eta_t=DEFAULT_BOOSTING_ETA_T),
    Solver("pcg", "lambdas", ("lambdas", "rank", "tolerance", "max_iterations"),
           f"{_STAGE}.pcg:pcg_candidates",
           "kernel ridge regression by preconditioned conjugate gradients, streamed",
           footprint=f"{_MEMORY}:pcg_bytes", streams=True),
):  # fmt: skip
    register_solver(_solver)
