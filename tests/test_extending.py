"""The three "Extending" recipes of README.md, each run end to end through the CLI.

A new architecture is one ``register_architecture`` call, a new solver one candidate
generator and one ``register_solver`` call, a new data source one reader and one
``register_source`` call; nothing else in the package changes. Each test registers a
toy one, runs it through ``neural-kernels``, checks the result against an independent
computation, and unregisters it.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse.linalg
import torch
from sklearn.datasets import load_digits
from test_reference_kernels import _stages, reference_kernel

from neural_kernels.catalog import (
    MYRTLE_STAGES,
    SOLVERS,
    Solver,
    register_architecture,
    register_solver,
)
from neural_kernels.cli import main
from neural_kernels.data.readers import LabelledImages, RawDataset
from neural_kernels.data.sources import SOURCES, Source, register_source
from neural_kernels.registry import Registry


@contextlib.contextmanager
def unregistered_after(registry: Registry, name: str) -> Iterator[None]:
    """Remove ``name`` from ``registry`` afterwards, so other tests see the built-ins."""
    try:
        yield
    finally:
        registry.pop(name, None)


def run(args: list[str], capsys: pytest.CaptureFixture) -> dict:
    """``neural-kernels -q ARGS``: its exit status must be 0; returns its JSON."""
    code = main(["-q", *args])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out)


# --------------------------------------------------------------- a new architecture


def test_a_registered_architecture_runs_through_the_cli(tmp_path, capsys):
    # myrtle3: conv relu | pool2 | conv relu | global pool | relu_project. On 16x16
    # images the reference's written-out layer maps (tests/test_reference_kernels.py)
    # compute the same kernel with pool8 as the global pool.
    rng = np.random.default_rng(0)
    images = rng.normal(size=(4, 16, 16, 3))
    np.save(tmp_path / "x.npy", images)
    with unregistered_after(MYRTLE_STAGES, "myrtle3"):
        register_architecture("myrtle3", (1, 1))
        common = ["--arch", "myrtle3", "--images", str(tmp_path / "x.npy"), "--device", "cpu"]
        run(["kernel", *common, "--method", "analytic", "--out", str(tmp_path / "a.npy")], capsys)
        run(
            ["kernel", *common, "--method", "estimate", "--width", "64", "--networks", "64",
             "--out", str(tmp_path / "e.npy")],
            capsys,
        )  # fmt: skip
        with pytest.raises(SystemExit):
            main(["train", "--help"])
        assert "myrtle3" in capsys.readouterr().out  # `train --model` lists it too
    analytic, estimate = np.load(tmp_path / "a.npy"), np.load(tmp_path / "e.npy")
    expected = reference_kernel(_stages((1, 1), "relu"), images)
    np.testing.assert_allclose(analytic, expected, rtol=0, atol=1e-12)
    assert np.abs(estimate - analytic).max() < 0.05  # 4096 random features
    assert "myrtle3" not in MYRTLE_STAGES


# --------------------------------------------------------------------- a new solver


def ridge_cg_candidates(settings, fit, targets, device, progress):
    """Kernel ridge regression by conjugate gradients, one class column at a time."""
    kernel = np.asarray(fit.kernel, dtype=np.float64)
    y = targets.cpu().numpy()
    for lam in settings.lambdas:
        system = kernel + lam * np.eye(len(kernel))
        alpha = np.column_stack(
            [scipy.sparse.linalg.cg(system, column, rtol=1e-13, atol=0.0)[0] for column in y.T]
        )
        scores = {"train": kernel @ alpha}
        scores |= {name: np.asarray(block) @ alpha for name, block in fit.evals.items()}
        yield {"lambda": lam}, {name: torch.from_numpy(s) for name, s in scores.items()}


@pytest.fixture(scope="module")
def digits_kernel(tmp_path_factory) -> tuple[Path, list[str]]:
    """A refit-layout kernel directory of the Myrtle5 kernel on 200 digits, and the
    ``--labels`` arguments of `solve`."""
    root = tmp_path_factory.mktemp("digits")
    data = load_digits()
    x = (data.images[:200, :, :, None] / 16.0).astype(np.float32)
    y = data.target[:200]
    splits = {"train": slice(0, 120), "val": slice(120, 160), "test": slice(160, 200)}
    for split, rows in splits.items():
        np.save(root / f"{split}_images.npy", x[rows])
        np.save(root / f"{split}_labels.npy", y[rows])
    code = main(
        ["-q", "kernel-analytic", "--arch", "myrtle5", "--device", "cpu",
         "--train", str(root / "train_images.npy"), "--val", str(root / "val_images.npy"),
         "--eval", f"test={root / 'test_images.npy'}", "--out-dir", str(root / "kernel")]
    )  # fmt: skip
    assert code == 0
    labels = [f"{split}={root / f'{split}_labels.npy'}" for split in splits]
    return root / "kernel", labels


def test_a_registered_solver_runs_through_the_cli(digits_kernel, tmp_path, capsys):
    kernel_dir, labels = digits_kernel
    common = ["solve", "--kernel-dir", str(kernel_dir), "--labels", *labels, "--device", "cpu"]
    grid = ["--lambdas", "1e-1", "1e-3"]
    with unregistered_after(SOLVERS, "ridge-cg"):
        register_solver(
            Solver(
                name="ridge-cg",
                grid="lambdas",
                settings=("lambdas",),
                candidates=ridge_cg_candidates,
                description="kernel ridge regression by conjugate gradients",
            )
        )
        cg = run(
            [*common, "--method", "ridge-cg", *grid, "--out-dir", str(tmp_path / "cg")], capsys
        )
    direct = run([*common, "--method", "ridge", *grid, "--out-dir", str(tmp_path / "ch")], capsys)
    for key in ("lambda", "accuracy"):
        assert cg["selected"][key] == direct["selected"][key]
    assert cg["test_accuracy"] == direct["test_accuracy"] > 0.8
    got, want = (np.load(tmp_path / name / "predictions.npz") for name in ("cg", "ch"))
    for split in ("val", "test"):
        np.testing.assert_allclose(got[f"{split}_scores"], want[f"{split}_scores"], atol=1e-5)
    metrics = json.loads((tmp_path / "cg" / "metrics.json").read_text())
    assert metrics["settings"] == {"method": "ridge-cg", "lambdas": [0.1, 0.001]}
    assert metrics["refit"] and metrics["training_size"]["images"] == 160
    assert "ridge-cg" not in SOLVERS


# ---------------------------------------------------------------- a new data source


def stripes_source(files) -> RawDataset:
    """A toy source: 8x8 images of horizontal (class 0) or vertical (class 1) stripes."""
    rng = np.random.default_rng(0)
    base = np.zeros((8, 8), dtype=np.uint8)
    base[::2] = 255
    images = np.stack([base if i % 2 == 0 else base.T for i in range(40)])[..., None]
    noise = rng.integers(0, 20, size=images.shape, dtype=np.uint8)
    labels = np.arange(40) % 2
    return RawDataset(
        splits={"all": LabelledImages(images | noise, labels.astype(np.int64))},
        classes=["horizontal", "vertical"],
    )


def test_a_registered_source_runs_through_the_cli(tmp_path, capsys):
    out = tmp_path / "stripes"
    with unregistered_after(SOURCES, "stripes"):
        register_source(
            Source("stripes", stripes_source, "horizontal or vertical stripes", test_fraction=0.25)
        )
        assert run(["sources"], capsys)["stripes"]["input"] is None
        sizes = run(
            ["prepare", "--source", "stripes", "--out", str(out), "--val-fraction", "0.2"], capsys
        )
    assert sizes == {"train": 24, "val": 6, "test": 10}  # test: its own 0.25 of 40
    meta = json.loads((out / "meta.json").read_text())
    assert meta["source"] == "stripes" and meta["classes"] == ["horizontal", "vertical"]
    assert meta["test_fraction"] == 0.25 and meta["image_size"] is None
    labels = np.load(out / "test_labels.npy")
    assert np.bincount(labels).tolist() == [5, 5]  # stratified
    assert "stripes" not in SOURCES
