"""The kernel regression solvers by name: the registry the CLI, the config schema's
check and the solve stage read.

Torch-free on purpose: the CLI lists the names in its options. Each entry names its
candidate generator as ``"module:function"`` (imported when a solve runs): a function
``(settings, fit, targets, device, progress)`` that yields ``(hyperparameters,
scores)`` for every point of its grid, ``scores`` mapping ``"train"`` and each eval
split of ``fit`` to a ``(rows, classes)`` tensor, or an error message for a point that
failed (see :func:`neural_kernels.solvers.flow.flow_candidates`). Hyperparameters may
carry a ``"diagnostics"`` entry (pcg's iterations and residual), which metrics.json
records but selection ignores. Each entry also states what it holds in memory
(:mod:`neural_kernels.solvers.memory`) and whether it streams the kernel from disk; a
solver that does not is refused up front where its footprint exceeds the job's memory.
A new solver is such a function and one :func:`register_solver` call.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from neural_kernels.settings import Registry
from neural_kernels.solvers import memory

if TYPE_CHECKING:
    from neural_kernels.settings import SolverSettings

#: Default grids: 2 points per decade. The Myrtle kernels have a unit diagonal, so
#: these absolute values suit every dataset (eigenvalues run up to about N).
DEFAULT_ETA_T = tuple(float(10.0**e) for e in np.arange(-2.0, 8.01, 0.5))
DEFAULT_LAMBDAS = tuple(float(10.0**e) for e in np.arange(1.0, -9.01, -0.5))
DEFAULT_BOOSTING_ETA_T = (1e2, 1e4)


@dataclass(frozen=True)
class Solver:
    """A registered solver.

    ``grid``: the :class:`~neural_kernels.settings.SolverSettings` field it searches
    (``eta_t`` or ``lambdas``), sorted from the most regularised candidate;
    ``settings``: every field it reads (what metrics.json records);
    ``candidates``: its generator (``"module:function"`` or the function itself);
    ``footprint``: the bytes it holds, ``(settings, rows, eval_rows, classes, grid)``
    (:mod:`neural_kernels.solvers.memory`); ``streams``: whether it reads the kernel
    from disk in row blocks (else it loads the fitted block whole and is refused where
    that cannot fit).
    """

    name: str
    grid: str
    settings: tuple[str, ...]
    candidates: str | Callable
    description: str
    footprint: Callable[..., int] = memory.dense_bytes
    streams: bool = False
    default_eta_t: tuple[float, ...] = DEFAULT_ETA_T
    default_lambdas: tuple[float, ...] = DEFAULT_LAMBDAS

    def holds_bytes(self, settings: SolverSettings, rows: int, eval_rows: int, classes: int) -> int:
        """What this solver holds on a problem of these sizes, in bytes."""
        grid = len(getattr(settings, self.grid))
        return self.footprint(settings, rows, eval_rows, classes, grid)


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
           footprint=memory.boosting_bytes, streams=True,
           default_eta_t=DEFAULT_BOOSTING_ETA_T),
    Solver("pcg", "lambdas", ("lambdas", "rank", "tolerance", "max_iterations"),
           f"{_STAGE}.pcg:pcg_candidates",
           "kernel ridge regression by preconditioned conjugate gradients, streamed",
           footprint=memory.pcg_bytes, streams=True),
):  # fmt: skip
    register_solver(_solver)
