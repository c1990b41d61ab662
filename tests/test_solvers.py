"""Kernel solvers: flow (eigendecomposition vs block exponential), ridge, boosting, solve stage."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.metrics.pairwise import rbf_kernel

from neural_kernels import limits
from neural_kernels.catalog import SOLVERS
from neural_kernels.cli import main
from neural_kernels.errors import DataError, NeuralKernelsError
from neural_kernels.solvers import (
    boosting_path,
    flow_path,
    gradient_flow_alpha,
    gradient_flow_alpha_expm,
    kernel_ridge_alpha,
    memory,
    one_hot_targets,
    ridge_path,
)
from neural_kernels.solvers import stage as stage_module
from neural_kernels.solvers.flow import flow_filter, kernel_matmul, kernel_submatrix
from neural_kernels.solvers.stage import SolverSettings, solve_files


def t(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(x, dtype=np.float64))


def random_psd(n: int, rank: int, seed: int = 0) -> np.ndarray:
    """A symmetric PSD matrix of the given rank, scaled to a unit mean diagonal."""
    features = np.random.default_rng(seed).normal(size=(n, rank))
    kernel = features @ features.T / rank
    return (kernel + kernel.T) / 2


@pytest.fixture(scope="module")
def digits_problem() -> dict:
    """An RBF kernel on 600 digits split 400 / 100 / 100 (unit diagonal; about 85% test).

    ``train``/``val``/``test``: the blocks against the 400 train rows (a subset's
    layout); ``fit``/``fit_test``: the symmetric train + val block and test against it
    (the refit layout of a full split).
    """
    data = load_digits()
    x, y = data.data[:600] / 16.0, data.target[:600]
    k = rbf_kernel(x, x[:500], gamma=0.05)
    return {
        "train": k[:400, :400],
        "val": k[400:500, :400],
        "test": k[500:, :400],
        "fit": k[:500],
        "fit_test": k[500:],
        "y": {"train": y[:400], "val": y[400:500], "test": y[500:]},
    }


@pytest.mark.parametrize("rank", [30, 12])  # full rank and rank-deficient
@pytest.mark.parametrize("eta_t", [0.01, 1.0, 30.0])
def test_flow_by_eigendecomposition_equals_block_matrix_exponential(rank, eta_t):
    kernel = random_psd(30, rank, seed=rank)
    targets = np.random.default_rng(1).normal(size=(30, 3))
    expected = gradient_flow_alpha_expm(kernel, targets, eta_t)
    got = gradient_flow_alpha(t(kernel), t(targets), eta_t).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-8 * max(1.0, np.abs(expected).max()))


def test_flow_filter_takes_the_limit_at_zero_eigenvalues():
    eigenvalues = torch.tensor([0.0, 1e-300, 1e-12, 1e-3, 1.0, 1e3], dtype=torch.float64)
    phi = flow_filter(eigenvalues, 10.0)
    assert torch.isfinite(phi).all()
    assert phi[0] == 10.0 and phi[1] == pytest.approx(10.0, rel=1e-15)
    assert phi[2] == pytest.approx(10.0 * (1 - 1e-11 / 2), rel=1e-14)
    expected = (1 - np.exp(-10.0 * eigenvalues[3:].numpy())) / eigenvalues[3:].numpy()
    np.testing.assert_allclose(phi[3:].numpy(), expected, rtol=1e-14)
    with pytest.raises(NeuralKernelsError, match="eta_t must be positive"):
        flow_filter(eigenvalues, 0.0)


def test_flow_tends_to_the_pseudo_inverse_solution():
    rng = np.random.default_rng(2)
    features = rng.normal(size=(40, 15))  # rank 15 < 40: K is singular
    eval_features = rng.normal(size=(7, 15))
    kernel, cross = features @ features.T, eval_features @ features.T
    targets = one_hot_targets(rng.integers(0, 4, 40), 4)
    pinv_alpha = np.linalg.pinv(kernel) @ targets
    errors = []
    for eta_t in (0.1, 1.0, 10.0, 1e4):
        _, scores = next(flow_path(t(kernel), t(targets), {"z": cross}, [eta_t]))
        errors.append(np.abs(scores["z"].numpy() - cross @ pinv_alpha).max())
        alpha = gradient_flow_alpha(t(kernel), t(targets), eta_t).numpy()
        np.testing.assert_allclose(scores["train"].numpy(), kernel @ alpha, atol=1e-9)
    # The error falls to the rounding floor; past it, the rounding-level eigenvalues of
    # the null space (phi = eta t there) let it grow like eta t * 1e-14.
    assert errors[0] > errors[1] > errors[2] and errors[1] > 1e-6
    assert max(errors[2:]) < 1e-9


def test_flow_matches_explicit_gradient_descent_with_a_small_step():
    kernel = random_psd(25, 25, seed=3)
    targets = np.random.default_rng(4).normal(size=(25, 2))
    step, n_steps = 1e-3, 2000  # eta t = 2
    alpha = np.zeros_like(targets)
    for _ in range(n_steps):
        alpha += step * (targets - kernel @ alpha)  # d alpha / dt = eta (Y - K alpha)
    flow = gradient_flow_alpha(t(kernel), t(targets), step * n_steps).numpy()
    # Euler's global error is O(step): here about 1e-3 relative.
    np.testing.assert_allclose(alpha, flow, rtol=0, atol=5e-3 * np.abs(flow).max())
    assert np.abs(alpha - flow).max() > 0  # a real comparison, not the same code


def test_ridge_and_flow_agree_as_lambda_equals_one_over_eta_t_goes_to_zero():
    kernel = random_psd(30, 30, seed=5) + 0.1 * np.eye(30)
    targets = np.random.default_rng(6).normal(size=(30, 3))
    exact = np.linalg.solve(kernel, targets)
    gaps = []
    for eta_t in (1e2, 1e4, 1e8):
        ridge = kernel_ridge_alpha(t(kernel), t(targets), 1.0 / eta_t).numpy()
        flow = gradient_flow_alpha(t(kernel), t(targets), eta_t).numpy()
        gaps.append(np.abs(ridge - flow).max())
        np.testing.assert_allclose(ridge, np.linalg.solve(kernel + np.eye(30) / eta_t, targets))
    assert gaps[-1] < 1e-6 * np.abs(exact).max() and gaps[-1] < gaps[0]
    np.testing.assert_allclose(flow, exact, rtol=1e-6, atol=1e-9)


def test_ridge_reports_a_failed_factorisation_clearly():
    kernel = random_psd(20, 5, seed=7) - 1e-3 * np.eye(20)  # indefinite
    targets = np.ones((20, 1))
    with pytest.raises(NeuralKernelsError, match=r"not positive definite for lambda = 1e-06"):
        kernel_ridge_alpha(t(kernel), t(targets), 1e-6)
    # along a path, a lambda below round-off fails alone (a PSD kernel of rank 5 of 20);
    # an indefinite kernel is refused whole (test_failures.py)
    singular = t(random_psd(20, 5, seed=7))
    results = dict(ridge_path(singular, t(targets), {}, [1.0, 1e-18]))
    assert isinstance(results[1.0], dict) and "lambda = 1e-18" in results[1e-18]


def test_boosting_with_one_batch_and_one_step_equals_the_flow(digits_problem):
    p = digits_problem
    targets = t(one_hot_targets(p["y"]["train"], 10))
    evals = {"val": p["val"]}
    (step, [boost]), *_ = boosting_path(
        p["train"], targets, evals, batch_size=400, steps=1, eta_ts=[50.0], progress=False
    )
    _, flow = next(flow_path(t(p["train"]), targets, evals, [50.0]))
    assert step == 1
    for split in ("train", "val"):
        np.testing.assert_allclose(boost[split].numpy(), flow[split].numpy(), atol=1e-10)


def test_boosting_training_error_decreases_and_reaches_the_full_solve(digits_problem):
    p = digits_problem
    targets = t(one_hot_targets(p["y"]["train"], 10))
    errors, val_accuracy = [], []
    for _, [scores] in boosting_path(
        p["train"], targets, {"val": p["val"]}, batch_size=100, steps=12, eta_ts=[1e4],
        seed=3, progress=False,
    ):  # fmt: skip
        errors.append(float(((scores["train"] - targets) ** 2).mean()))
        val_accuracy.append(np.mean(scores["val"].argmax(1).numpy() == p["y"]["val"]))
    assert all(b < a for a, b in zip(errors, errors[1:], strict=False))
    assert errors[-1] < 0.1 * errors[0]
    _, full = next(flow_path(t(p["train"]), targets, {"val": p["val"]}, [1e4]))
    full_accuracy = np.mean(full["val"].argmax(1).numpy() == p["y"]["val"])
    assert val_accuracy[0] < full_accuracy - 0.05  # one step is far from the full solve
    assert val_accuracy[-1] >= full_accuracy - 0.02


def test_boosting_yields_each_steps_own_predictions(digits_problem):
    # Collected with list(), every step keeps its own values (copies, not views of the
    # buffers that later steps update): equal to a fresh run stopped at that step.
    p = digits_problem
    targets = t(one_hot_targets(p["y"]["train"], 10))
    kwargs = dict(batch_size=100, eta_ts=[10.0, 1e3], seed=2, progress=False)
    path = list(boosting_path(p["train"], targets, {"val": p["val"]}, steps=3, **kwargs))
    assert [step for step, _ in path] == [1, 2, 3]
    assert not torch.equal(path[0][1][0]["train"], path[2][1][0]["train"])
    for steps in (1, 2):
        *_, (_, fresh) = boosting_path(
            p["train"], targets, {"val": p["val"]}, steps=steps, **kwargs
        )
        for kept, again in zip(path[steps - 1][1], fresh, strict=True):
            for split in ("train", "val"):
                torch.testing.assert_close(kept[split], again[split], rtol=0, atol=0)


def test_boosting_streams_a_memory_map_like_a_tensor(digits_problem, tmp_path):
    p = digits_problem
    np.save(tmp_path / "k.npy", p["train"])
    mapped = np.load(tmp_path / "k.npy", mmap_mode="r")
    targets = t(one_hot_targets(p["y"]["train"], 10))
    kwargs = dict(batch_size=64, steps=2, eta_ts=[10.0, 1e3], seed=1, progress=False)
    row = 8 * len(mapped)  # bytes of one float64 row: blocks of 37 rows, then of 1
    for block_bytes in (37 * row, 1):
        streamed = boosting_path(mapped, targets, {}, block_bytes=block_bytes, **kwargs)
        in_memory = list(boosting_path(t(p["train"]), targets, {}, **kwargs))[-1][1]
        for a, b in zip(list(streamed)[-1][1], in_memory, strict=True):
            torch.testing.assert_close(a["train"], b["train"], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(
        kernel_matmul(mapped, targets, 50 * row).numpy(), p["train"] @ targets.numpy()
    )
    index = np.sort(np.random.default_rng(0).choice(len(mapped), 70, replace=False))
    for block_bytes in (1, 9 * row, 1 << 30):
        block = kernel_submatrix(mapped, index, torch.device("cpu"), block_bytes).numpy()
        np.testing.assert_array_equal(block, p["train"][np.ix_(index, index)])


def test_centring_the_targets_changes_no_prediction(digits_problem):
    p = digits_problem
    centred = t(one_hot_targets(p["y"]["train"], 10))
    plain = centred + 0.1
    for (_, a), (_, b) in zip(
        flow_path(t(p["train"]), centred, {"test": p["test"]}, [1.0, 1e3]),
        flow_path(t(p["train"]), plain, {"test": p["test"]}, [1.0, 1e3]),
        strict=True,
    ):
        assert torch.equal(a["test"].argmax(1), b["test"].argmax(1))


def test_one_hot_targets_rejects_bad_labels():
    np.testing.assert_allclose(one_hot_targets(np.array([1, 0]), 2), [[-0.5, 0.5], [0.5, -0.5]])
    with pytest.raises(NeuralKernelsError, match=r"in \[0, 3\)"):
        one_hot_targets(np.array([0, 3]), 3)


def layout(counts: dict[str, int], flips: bool) -> list[dict]:
    """kernel.json's row layout: each split's rows, then their mirrors with flips."""
    segments, start = [], 0
    for split, count in counts.items():
        for mirrored in (False, True) if flips else (False,):
            segments.append(
                {"split": split, "start": start, "stop": start + count, "mirrored": mirrored}
            )
            start += count
    return segments


def write_kernel_dir(
    path: Path, problem: dict, flips: bool = False, refit: bool = False
) -> dict[str, Path]:
    """A kernel directory: the subset layout (val an eval block) or, with ``refit``, the
    full layout (val rows in the symmetric block after the train rows)."""
    path.mkdir(parents=True)
    counts = {"train": len(problem["y"]["train"])}
    if refit:
        counts["val"] = len(problem["y"]["val"])
        np.save(path / "train.npy", problem["fit"])
        np.save(path / "test.npy", problem["fit_test"])
    else:
        for split in ("train", "val", "test"):
            np.save(path / f"{split}.npy", problem[split])
    rows = layout(counts, flips)
    record = {
        "method": "analytic",
        "flips": flips,
        "inputs": {"train": {"rows": rows[-1]["stop"], "layout": rows}},
    }
    (path / "kernel.json").write_text(json.dumps(record))
    labels = {}
    for split in ("train", "val", "test"):
        labels[split] = path.parent / f"{split}_labels.npy"
        np.save(labels[split], problem["y"][split])
    return labels


@pytest.mark.parametrize("refit", [False, True])
@pytest.mark.parametrize("method", ["flow", "ridge", "boosting"])
def test_solve_files_selects_on_validation_and_records_best_on_test(
    digits_problem, tmp_path, method, refit
):
    labels = write_kernel_dir(tmp_path / "kernel", digits_problem, refit=refit)
    options = {"batch_size": 100, "steps": 4} if method == "boosting" else {}
    settings = SolverSettings(method, **options)
    record = solve_files(tmp_path / "kernel", labels, tmp_path / "out", settings, progress=False)
    grid = [point for point in record["grid"] if "accuracy" in point]
    best_val = max(point["accuracy"]["val"] for point in grid)
    first = next(point for point in grid if point["accuracy"]["val"] == best_val)
    assert record["selected"]["accuracy"] == first["accuracy"]
    assert record["test_accuracy"] == first["accuracy"]["test"] > 0.8
    assert record["best_on_test"]["accuracy"]["test"] == max(p["accuracy"]["test"] for p in grid)
    assert "test split" in record["best_on_test"]["note"]
    expected_points = {"flow": 21, "ridge": 21, "boosting": 4 * 2}[method]
    assert len(record["grid"]) == expected_points
    saved = json.loads((tmp_path / "out/metrics.json").read_text())
    assert saved["selected"] == record["selected"] and saved["device"] == "cpu"
    predictions = np.load(tmp_path / "out/predictions.npz")
    accuracy = np.mean(predictions["test_predictions"] == digits_problem["y"]["test"])
    assert accuracy == pytest.approx(record["test_accuracy"])
    assert predictions["val_scores"].shape == (100, 10)


def test_most_regularised_candidate_wins_ties(digits_problem, tmp_path):
    labels = write_kernel_dir(tmp_path / "kernel", digits_problem)
    settings = SolverSettings("flow", eta_t=(1e6, 1e5, 1e7))  # all interpolate: same accuracy
    record = solve_files(tmp_path / "kernel", labels, tmp_path / "out", settings, progress=False)
    assert [p["eta_t"] for p in record["grid"]] == [1e5, 1e6, 1e7]
    assert record["selected"]["eta_t"] == 1e5


def test_solve_files_doubles_train_labels_with_flips(digits_problem, tmp_path):
    p = dict(digits_problem)
    p["train"] = np.block([[p["train"], p["train"]], [p["train"], p["train"]]])
    p["val"], p["test"] = np.hstack([p["val"]] * 2), np.hstack([p["test"]] * 2)
    labels = write_kernel_dir(tmp_path / "kernel", p, flips=True)
    record = solve_files(
        tmp_path / "kernel", labels, tmp_path / "out", SolverSettings("ridge"), progress=False
    )
    assert record["sizes"]["train"] == 400 and record["test_accuracy"] > 0.8
    assert record["training_size"] == {"images": 400, "rows": 800, "splits": ["train"]}
    assert not record["refit"]


def test_refit_uses_the_validation_rows(digits_problem, tmp_path):
    # The full-split layout: one symmetric block over train + val. Selection fits the
    # 400 train rows and scores val; the headline refits the selected eta t on all 500
    # rows and scores test against them.
    p = digits_problem
    labels = write_kernel_dir(tmp_path / "kernel", p, refit=True)
    grid = (1.0, 30.0, 1e3, 1e5)
    record = solve_files(
        tmp_path / "kernel", labels, tmp_path / "out",
        SolverSettings("flow", eta_t=grid), progress=False,
    )  # fmt: skip
    assert record["refit"] and record["sizes"] == {"train": 400, "val": 100, "test": 100}
    assert record["training_size"] == {"images": 500, "rows": 500, "splits": ["train", "val"]}
    assert record["fitted_rows"] == {"selection": 400, "refit": 500}
    eta_t = record["selected"]["eta_t"]
    y = p["y"]

    def flow_scores(kernel: np.ndarray, labels: np.ndarray, rows: np.ndarray) -> np.ndarray:
        alpha = gradient_flow_alpha(t(kernel), t(one_hot_targets(labels, 10)), eta_t)
        return rows @ alpha.numpy()

    # Selection: val accuracy of every candidate from the 400 train rows alone.
    for point in record["grid"]:
        alpha = gradient_flow_alpha(
            t(p["train"]), t(one_hot_targets(y["train"], 10)), point["eta_t"]
        ).numpy()
        val = np.mean((p["val"] @ alpha).argmax(1) == y["val"])
        assert point["accuracy"]["val"] == pytest.approx(val)
    # Headline: the selected eta t refit on train + val, test scored against all 500.
    both = np.concatenate([y["train"], y["val"]])
    refit = flow_scores(p["fit"], both, p["fit_test"])
    train_only = flow_scores(p["train"], y["train"], p["test"])
    predictions = np.load(tmp_path / "out/predictions.npz")
    np.testing.assert_allclose(predictions["test_scores"], refit, rtol=1e-5, atol=1e-6)
    assert np.abs(refit - train_only).max() > 1e-3  # the val rows changed the model
    assert record["test_accuracy"] == pytest.approx(np.mean(refit.argmax(1) == y["test"]))
    assert record["selected"]["accuracy"]["test"] == record["test_accuracy"]
    assert "refit on train + val (500 images" in record["protocol"]
    assert "train + val" in record["best_on_test"]["note"]


def test_refit_with_flips_fits_the_mirrors_of_train_and_val(digits_problem, tmp_path):
    # Rows in kernel.json's order: train, train mirrors, val, val mirrors (a mirror here
    # is a copy of its image's row).
    p = dict(digits_problem)
    order = np.r_[0:400, 0:400, 400:500, 400:500]
    p["fit"] = p["fit"][np.ix_(order, order)]
    p["fit_test"] = p["fit_test"][:, order]
    labels = write_kernel_dir(tmp_path / "kernel", p, flips=True, refit=True)
    record = solve_files(
        tmp_path / "kernel", labels, tmp_path / "out", SolverSettings("flow"), progress=False
    )
    assert record["training_size"] == {"images": 500, "rows": 1000, "splits": ["train", "val"]}
    assert record["fitted_rows"] == {"selection": 800, "refit": 1000}
    assert record["test_accuracy"] > 0.8


def test_mismatched_labels_are_a_clear_error_and_write_nothing(digits_problem, tmp_path):
    labels = write_kernel_dir(tmp_path / "kernel", digits_problem)
    np.save(labels["val"], digits_problem["y"]["val"][:50])
    with pytest.raises(DataError, match=r"val\.npy has shape \(100, 400\) but kernel.json and"):
        solve_files(tmp_path / "kernel", labels, tmp_path / "out", SolverSettings("flow"))
    assert not (tmp_path / "out").exists()
    with pytest.raises(DataError, match="no kernel.json"):
        solve_files(tmp_path, labels, tmp_path / "out", SolverSettings("flow"))


def test_every_ridge_failure_is_a_clear_error(tmp_path):
    bad = {"train": random_psd(10, 2), "val": np.zeros((2, 10)), "test": np.zeros((2, 10))}
    bad["y"] = {"train": np.arange(10) % 2, "val": np.array([0, 1]), "test": np.array([0, 1])}
    labels = write_kernel_dir(tmp_path / "kernel", bad)
    with pytest.raises(NeuralKernelsError, match="every grid point of the ridge solver failed"):
        solve_files(
            tmp_path / "kernel", labels, tmp_path / "out",
            SolverSettings("ridge", lambdas=(1e-18,)), progress=False,
        )  # fmt: skip
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"method": "newton"}, "unknown solver method"),
        ({"method": "flow", "eta_t": (1.0, -2.0)}, "eta_t must be positive"),
        ({"method": "ridge", "lambdas": (0.0,)}, "lambdas must be positive"),
        ({"method": "boosting", "steps": 0}, "steps must be >= 1"),
    ],
)
def test_bad_solver_settings_are_rejected(settings, message):
    with pytest.raises(NeuralKernelsError, match=message):
        SolverSettings(**settings)


def test_solve_cli_runs_and_reports_errors(digits_problem, tmp_path, capsys):
    labels = write_kernel_dir(tmp_path / "kernel", digits_problem)
    args = ["solve", "--kernel-dir", str(tmp_path / "kernel"), "--method", "boosting"]
    args += ["--batch-size", "100", "--steps", "2", "--eta-t", "1000", "--out-dir"]
    label_args = ["--labels", *(f"{split}={path}" for split, path in labels.items())]
    assert main([*args, str(tmp_path / "out"), *label_args]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["selected"]["eta_t"] == 1000.0 and result["test_accuracy"] > 0.8
    assert main([*args, str(tmp_path / "out2"), "--labels", "train"]) == 1
    assert "--labels takes NAME=PATH" in capsys.readouterr().err


@pytest.mark.cuda
def test_gpu_solvers_match_cpu(digits_problem, tmp_path):
    labels = write_kernel_dir(tmp_path / "kernel", digits_problem)
    for method in ("flow", "ridge", "boosting", "pcg"):
        settings = SolverSettings(method, batch_size=100, steps=3, rank=100)
        cpu, gpu = (
            solve_files(
                tmp_path / "kernel", labels, tmp_path / f"{method}-{device}", settings,
                device=device, progress=False,
            )
            for device in ("cpu", "cuda")
        )  # fmt: skip
        assert gpu["device"] != "cpu"
        for a, b in zip(cpu["grid"], gpu["grid"], strict=True):
            assert a["accuracy"] == pytest.approx(b["accuracy"], abs=0.011)


# ------------------------------------------------------------------ stage boundaries


def solve_refused(kernel_dir: Path, labels: dict, out: Path, message: str) -> None:
    """The solve raises ``message`` (a regex) and writes nothing."""
    with pytest.raises(DataError, match=message):
        solve_files(kernel_dir, labels, out, SolverSettings("flow"), progress=False)
    assert not out.exists()


@pytest.mark.parametrize("refit", [False, True])
def test_a_kernel_with_nan_is_refused_naming_the_file_and_rows(digits_problem, tmp_path, refit):
    labels = write_kernel_dir(tmp_path / "kernel", digits_problem, refit=refit)
    train = np.load(tmp_path / "kernel" / "train.npy")
    train[17, 42] = train[42, 17] = np.nan  # one pair, kept symmetric
    np.save(tmp_path / "kernel" / "train.npy", train)
    n = len(train)
    message = rf"kernel/train.npy: 2 of {n} rows hold NaN or infinite values \(rows 17, 42\)"
    solve_refused(tmp_path / "kernel", labels, tmp_path / "out", message)
    # an eval block too
    labels = write_kernel_dir(tmp_path / "k2", digits_problem, refit=refit)
    test = np.load(tmp_path / "k2" / "test.npy")
    test[5, 0] = np.inf
    np.save(tmp_path / "k2" / "test.npy", test)
    solve_refused(tmp_path / "k2", labels, tmp_path / "out", r"k2/test.npy: 1 of 100 .*rows 5\)")


def test_an_asymmetric_fitted_block_is_refused(digits_problem, tmp_path):
    labels = write_kernel_dir(tmp_path / "kernel", digits_problem, refit=True)
    train = np.load(tmp_path / "kernel" / "train.npy")
    train[3, 250] += 1e-3  # K(x3, x250) != K(x250, x3): pieces from different runs
    np.save(tmp_path / "kernel" / "train.npy", train)
    message = r"train.npy is not symmetric: \|K\[3, 250\] - K\[250, 3\]\| = 0.001"
    solve_refused(tmp_path / "kernel", labels, tmp_path / "out", message)
    # round-off is not asymmetry
    train[3, 250] = train[250, 3] * (1 + 1e-12)
    np.save(tmp_path / "kernel" / "train.npy", train)
    solve_files(tmp_path / "kernel", labels, tmp_path / "out", SolverSettings("flow"))
    assert (tmp_path / "out" / "metrics.json").exists()


def test_a_kernel_record_that_does_not_match_its_blocks_is_refused(digits_problem, tmp_path):
    labels = write_kernel_dir(tmp_path / "kernel", digits_problem, refit=True)
    np.save(tmp_path / "kernel" / "train.npy", digits_problem["fit"][:490, :490])
    message = r"train.npy has shape \(490, 490\) but kernel.json and the labels give \(500, 500\)"
    solve_refused(tmp_path / "kernel", labels, tmp_path / "out", message)


@pytest.mark.parametrize(
    ("split", "labels", "message"),
    [
        ("test", lambda y: np.where(np.arange(len(y)) == 4, 10, y), r"out of range 0..9 \(rows 4"),
        ("val", lambda y: np.where(np.arange(len(y)) == 0, -1, y), r"out of range 0..9 \(rows 0,"),
        (
            "train",
            lambda y: np.where(np.arange(len(y)) == 9, -3, y),
            r"out of range >= 0 \(rows 9,",
        ),
        ("test", lambda y: y.astype(np.float64), "must be a 1-d integer array"),
    ],
)
def test_labels_out_of_range_are_refused(digits_problem, tmp_path, split, labels, message):
    paths = write_kernel_dir(tmp_path / "kernel", digits_problem)
    np.save(paths[split], labels(digits_problem["y"][split]))
    solve_refused(tmp_path / "kernel", paths, tmp_path / "out", f"{split}_labels.npy: .*{message}")


def test_a_solver_that_cannot_fit_is_refused_before_reading_the_kernel(
    digits_problem, tmp_path, monkeypatch, capsys
):
    labels = write_kernel_dir(tmp_path / "kernel", digits_problem, refit=True)
    # 500 fitted rows, 100 eval rows: the dense solvers hold 4 x 8 x 500^2 = 7.6 MiB
    budget = limits.MemoryAvailable(5 * 2**20, "a test's budget")
    monkeypatch.setattr(limits, "memory_available", lambda: budget)
    monkeypatch.setattr(memory, "SOLVE_BLOCK_BYTES", 1 << 20)  # a 1 MiB row block
    read = []
    monkeypatch.setattr(stage_module, "load_problem", lambda *a: read.append(a))
    args = ["solve", "--kernel-dir", str(tmp_path / "kernel"), "--labels"]
    args += [f"{split}={path}" for split, path in labels.items()]
    for method in ("flow", "ridge"):
        out = tmp_path / method
        assert main([*args, "--method", method, "--out-dir", str(out)]) == 1
        error = capsys.readouterr().err
        want = (
            rf"error: solve --method {method} would hold 0.01 GiB \(its 500 x 500 float64 "
            r"fitted block whole\) but this job has 0.00 GiB \(a test's budget\); use "
            r"--method boosting or --method pcg, which stream the kernel from disk"
        )
        assert re.search(want, error), error
        assert not out.exists() and not read
    # the streaming solvers hold (N + E) x C per grid point and a row block: they fit
    settings = SolverSettings("pcg", lambdas=(0.1,), rank=50)
    solver = SOLVERS["pcg"]
    assert solver.holds_bytes(settings, 500, 100, 10) < budget.bytes
    monkeypatch.undo()
    record = solve_files(
        tmp_path / "kernel", labels, tmp_path / "pcg", settings, progress=False
    )  # fmt: skip
    assert record["test_accuracy"] > 0.8
