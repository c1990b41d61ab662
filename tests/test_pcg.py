"""pcg: kernel ridge regression by preconditioned conjugate gradients, streamed.

Checked against closed forms written out here: the pivoted Cholesky factor against the
Nystrom approximation on its pivots, the preconditioner against a dense solve, the CG
solution against ``numpy.linalg.solve(K + lambda I, Y)``, and the solve stage against
``--method ridge`` on the same kernel (the default run compares them on its T1
kernels: test_workflow).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.metrics.pairwise import rbf_kernel
from test_solvers import write_kernel_dir

from neural_kernels.cli import main
from neural_kernels.settings import SolverSettings
from neural_kernels.solvers.flow import one_hot_targets
from neural_kernels.solvers.pcg import (
    low_rank_preconditioner,
    pcg_path,
    pcg_solve,
    pivoted_cholesky,
)

CPU = torch.device("cpu")


def pcg(lambdas: list[float], **settings) -> SolverSettings:
    """pcg's settings with a grid of ``lambdas`` (given from the largest down)."""
    assert lambdas == sorted(lambdas, reverse=True)  # as SolverSettings sorts them
    return SolverSettings("pcg", lambdas=tuple(lambdas), **settings)


@pytest.fixture(scope="module")
def digits() -> dict:
    """An RBF kernel on 500 digits (unit diagonal, full rank, eigenvalues to ~1e-4)."""
    data = load_digits()
    x, y = data.data[:500] / 16.0, data.target[:500]
    return {"kernel": rbf_kernel(x, x, gamma=0.05), "labels": y}


def test_pivoted_cholesky_is_the_nystrom_approximation_on_its_pivots(digits):
    k = digits["kernel"]
    factor, pivots = pivoted_cholesky(torch.from_numpy(k), 40, CPU)
    assert factor.shape == (500, 40) and len(set(pivots)) == 40
    # greedy: the first pivot is a largest diagonal entry
    assert k[pivots[0], pivots[0]] == k.diagonal().max()
    s = np.array(pivots)
    nystrom = k[:, s] @ np.linalg.solve(k[np.ix_(s, s)], k[s, :])
    approx = (factor @ factor.T).numpy()
    np.testing.assert_allclose(approx, nystrom, atol=1e-9)
    np.testing.assert_allclose(approx[s], k[s], atol=1e-12)  # it interpolates K's rows
    # more rank, a smaller remainder: trace(K - L L^T) falls
    remainders = [
        np.trace(k) - float((f**2).sum())
        for f, _ in (pivoted_cholesky(torch.from_numpy(k), r, CPU) for r in (10, 40, 160))
    ]
    assert remainders[0] > remainders[1] > remainders[2] > 0


def test_pivoted_cholesky_stops_at_the_numerical_rank():
    features = np.random.default_rng(0).normal(size=(60, 7))
    k = features @ features.T
    factor, pivots = pivoted_cholesky(torch.from_numpy(k), 30, CPU)
    assert factor.shape == (60, 7) and len(pivots) == 7
    np.testing.assert_allclose((factor @ factor.T).numpy(), k, atol=1e-10)


def test_the_preconditioner_inverts_its_low_rank_matrix_plus_lambda(digits):
    factor, _ = pivoted_cholesky(torch.from_numpy(digits["kernel"]), 30, CPU)
    preconditioner = low_rank_preconditioner(factor)
    v = torch.from_numpy(np.random.default_rng(1).normal(size=(500, 3)))
    lambdas = torch.tensor([1.0, 1e-2, 1e-5], dtype=torch.float64)
    got = preconditioner.solve(v, lambdas).numpy()
    dense = (factor @ factor.T).numpy()
    for j, lam in enumerate(lambdas.tolist()):
        want = np.linalg.solve(dense + lam * np.eye(500), v[:, j].numpy())
        np.testing.assert_allclose(got[:, j], want, rtol=1e-8, atol=1e-8 * abs(want).max())


@pytest.mark.parametrize("rank", [20, 500])  # CG iterates; the preconditioner is exact
def test_pcg_solves_kernel_ridge_for_every_lambda_at_once(digits, rank, tmp_path):
    k = digits["kernel"]
    targets = one_hot_targets(digits["labels"], 10)
    lambdas = [1e-1, 1e-2, 1e-3]  # condition numbers to 3e5 (eigenvalues 1.1e-3 to 320)
    np.save(tmp_path / "k.npy", k)
    mapped = np.load(tmp_path / "k.npy", mmap_mode="r")
    settings = pcg(lambdas, rank=rank, tolerance=1e-10, max_iterations=500)
    result = pcg_solve(mapped, torch.from_numpy(targets), settings, block_bytes=37 * 8 * 500)
    for g, lam in enumerate(lambdas):
        want = np.linalg.solve(k + lam * np.eye(500), targets)
        got = result.alpha[:, g * 10 : (g + 1) * 10].numpy()
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-7 * np.abs(want).max())
        np.testing.assert_allclose(
            result.fitted[:, g * 10 : (g + 1) * 10].numpy(), k @ want, atol=1e-8
        )
        assert result.converged[g] and result.residuals[g] <= 1e-10
    if rank == 20:  # a smaller lambda, a worse conditioned system: more iterations
        assert 1 < result.iterations[0] < result.iterations[1] < result.iterations[2]
    else:
        assert max(result.iterations) <= 3


def test_pcg_records_a_lambda_that_did_not_converge(digits):
    targets = torch.from_numpy(one_hot_targets(digits["labels"], 10))
    kernel = torch.from_numpy(digits["kernel"])
    settings = pcg([1.0, 1e-8], rank=5, tolerance=1e-10, max_iterations=4)
    result = pcg_solve(kernel, targets, settings)
    assert result.iterations == [4, 4] or result.converged[0]
    assert not result.converged[1] and result.residuals[1] > 1e-10
    # the recorded residual is the true one, recomputed from alpha
    lam, alpha = 1e-8, result.alpha[:, 10:].numpy()
    true = targets.numpy() - (digits["kernel"] + lam * np.eye(500)) @ alpha
    norms = np.linalg.norm(true, axis=0) / np.linalg.norm(targets.numpy(), axis=0)
    assert result.residuals[1] == pytest.approx(norms.max(), rel=1e-6)


def test_pcg_path_scores_every_block(digits):
    k, y = digits["kernel"], digits["labels"]
    train, test = k[:400, :400], k[400:, :400]
    targets = torch.from_numpy(one_hot_targets(y[:400], 10))
    settings = pcg([1e-2, 1e-4], rank=50, tolerance=1e-10, max_iterations=300)
    path = pcg_path(torch.from_numpy(train), targets, {"test": test}, settings)
    for lam, scores, diagnostics in path:
        alpha = np.linalg.solve(train + lam * np.eye(400), targets.numpy())
        np.testing.assert_allclose(scores["test"].numpy(), test @ alpha, atol=1e-8)
        np.testing.assert_allclose(scores["train"].numpy(), train @ alpha, atol=1e-8)
        assert diagnostics["converged"] and diagnostics["iterations"] >= 1


def test_solve_pcg_selects_and_scores_as_ridge(digits, tmp_path):
    """The whole stage (selection on val, refit on train + val) through the CLI."""
    k, y = digits["kernel"], digits["labels"]
    problem = {
        "fit": k[:400, :400],
        "fit_test": k[400:, :400],
        "y": {"train": y[:300], "val": y[300:400], "test": y[400:]},
    }
    kernel_dir = tmp_path / "kernel"
    labels = write_kernel_dir(kernel_dir, problem, refit=True)
    label_args = [f"{split}={path}" for split, path in labels.items()]
    lambdas = ["1e-1", "1e-2", "1e-3", "1e-4"]
    common = ["--kernel-dir", str(kernel_dir), "--labels", *label_args, "--lambdas", *lambdas]
    for method in ("ridge", "pcg"):
        extra = ["--rank", "30", "--tolerance", "1e-10"] if method == "pcg" else []
        assert main(["solve", *common, "--method", method, *extra, "--out-dir",
                     str(tmp_path / method)]) == 0  # fmt: skip
    ridge, pcg = (json.loads((tmp_path / m / "metrics.json").read_text()) for m in ("ridge", "pcg"))
    assert pcg["selected"]["lambda"] == ridge["selected"]["lambda"]
    assert pcg["test_accuracy"] == ridge["test_accuracy"]
    for a, b in zip(ridge["grid"], pcg["grid"], strict=True):
        assert a["accuracy"] == b["accuracy"]
        runs = b["diagnostics"]
        assert runs["selection"]["converged"] and runs["refit"]["converged"]
        assert runs["refit"]["residual"] <= 1e-10 and runs["refit"]["iterations"] > 1
    assert pcg["settings"] | {"lambdas": None} == {
        "method": "pcg", "lambdas": None, "rank": 30, "tolerance": 1e-10, "max_iterations": 500
    }  # fmt: skip
    with (
        np.load(tmp_path / "ridge/predictions.npz") as a,
        np.load(tmp_path / "pcg/predictions.npz") as b,
    ):
        for key in ("val_scores", "test_scores"):
            np.testing.assert_allclose(b[key], a[key], rtol=0, atol=1e-6 * np.abs(a[key]).max())


def test_a_zero_target_column_converges_at_once_and_a_breakdown_stops_without_nan(digits):
    kernel = torch.from_numpy(digits["kernel"])
    targets = torch.from_numpy(one_hot_targets(digits["labels"], 10))
    targets[:, 3] = 0.0  # no target: alpha = 0, converged before any iteration
    settings = pcg([1e-2], rank=20, tolerance=1e-10, max_iterations=300)
    result = pcg_solve(kernel, targets, settings)
    assert result.converged == [True] and torch.all(result.alpha[:, 3] == 0)
    assert torch.isfinite(result.alpha).all() and result.residuals[0] <= 1e-10
    # K + lambda I negative definite: p^T (K + lambda I) p < 0 at once, nothing updated
    negative = -torch.eye(50, dtype=torch.float64)
    broken = pcg_solve(negative, targets[:50], pcg([0.5], rank=5, max_iterations=9))
    assert broken.converged == [False] and broken.iterations == [1]
    assert torch.all(broken.alpha == 0) and broken.residuals == [1.0]
