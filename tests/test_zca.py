"""ZCA whitening: exact vs randomized, closed forms, the reference recipe, errors."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import numpy as np
import pytest
import torch

from neural_kernels.errors import DataError, NeuralKernelsError
from neural_kernels.settings import ZcaSettings
from neural_kernels.zca import ZCATransform, whiten_files, zca_apply, zca_fit

F64 = torch.float64


def decaying_images(n=300, shape=(6, 6, 2), decay=0.8, offset=0.5, seed=0) -> np.ndarray:
    """Images whose centred data matrix has singular values ~ decay**i (a clear gap)."""
    rng = np.random.default_rng(seed)
    p = int(np.prod(shape))
    basis = np.linalg.qr(rng.standard_normal((p, p)))[0]
    rows = (rng.standard_normal((n, p)) * decay ** np.arange(p)) @ basis.T + offset
    return rows.reshape(n, *shape)


def projector(t: ZCATransform) -> np.ndarray:
    return t.components @ t.components.T


def whitened_rows(t: ZCATransform, images: np.ndarray) -> np.ndarray:
    out = np.empty(images.shape, dtype=np.float64)
    return zca_apply(t, images, out=out, dtype=F64).reshape(len(images), -1)


@pytest.mark.parametrize("variant", ["thesis", "shankar"])
def test_randomized_agrees_with_exact_on_top_k_subspace(variant):
    images = decaying_images()
    k = 12
    exact = zca_fit(images, ZcaSettings(variant=variant, solver="exact", rank=k, eps=1e-4))
    rand = zca_fit(
        images, ZcaSettings(variant=variant, solver="randomized", rank=k, eps=1e-4, dtype="float64")
    )
    # Stated tolerance: subspace distance ||P_exact - P_rand||_2 < 1e-6 and singular
    # values to 1e-8 relative (float64, gap ratio 0.8, 4 power iterations).
    assert np.linalg.norm(projector(exact) - projector(rand), 2) < 1e-6
    np.testing.assert_allclose(rand.singular_values, exact.singular_values, rtol=1e-8)
    np.testing.assert_allclose(whitened_rows(rand, images), whitened_rows(exact, images), atol=1e-5)


@pytest.mark.parametrize("solver", ["exact", "randomized"])
def test_thesis_whitened_covariance_is_identity_on_subspace(solver):
    images = decaying_images()
    n, k, eps = len(images), 10, 1e-3
    t = zca_fit(
        images, ZcaSettings(variant="thesis", solver=solver, rank=k, eps=eps, dtype="float64")
    )
    z = whitened_rows(t, images)
    cov = np.cov(z, rowvar=False)  # centred, divided by N - 1
    on_subspace = t.components.T @ cov @ t.components
    d = t.singular_values
    np.testing.assert_allclose(on_subspace, np.diag((d / (d + eps)) ** 2), atol=1e-7)
    assert np.abs(on_subspace - np.eye(k)).max() < 2 * eps / d.min()
    # The thesis's map projects onto the subspace: nothing is left outside it.
    assert np.abs(z - z @ projector(t)).max() < 1e-10
    assert t.n_samples == n and t.complement_scale == 0


@pytest.mark.parametrize("solver", ["exact", "randomized"])
def test_shankar_whitened_covariance_is_identity_on_subspace(solver):
    images = decaying_images()
    n, k, eps = len(images), 10, 1e-7
    t = zca_fit(
        images, ZcaSettings(variant="shankar", solver=solver, rank=k, eps=eps, dtype="float64")
    )
    z = whitened_rows(t, images)
    on_subspace = t.components.T @ (z.T @ z / n) @ t.components
    lam = t.singular_values**2 / n
    np.testing.assert_allclose(on_subspace, np.diag(lam / (lam + eps)), atol=1e-7)
    assert np.abs(on_subspace - np.eye(k)).max() < 1e-3


def reference_shankar(train: np.ndarray, test: np.ndarray, bias: float):
    """The preprocessing recipe of Shankar et al.'s reference code, in plain numpy."""
    out = []
    x = train.reshape(len(train), -1).astype(np.float64)
    y = test.reshape(len(test), -1).astype(np.float64)
    x = x - x.mean(axis=1, keepdims=True)
    y = y - y.mean(axis=1, keepdims=True)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    y /= np.linalg.norm(y, axis=1, keepdims=True)
    evals, evecs = np.linalg.eigh(x.T @ x / len(x))
    whitening = evecs @ np.diag((evals + bias) ** -0.5) @ evecs.T
    out = [x @ whitening, y @ whitening]
    return out


def test_exact_shankar_matches_the_reference_recipe():
    images = decaying_images(n=200, shape=(4, 4, 3))
    train, test = images[:150], images[150:]
    t = zca_fit(train, ZcaSettings(variant="shankar", solver="exact", eps=1e-5, dtype="float64"))
    want_train, want_test = reference_shankar(train, test, 1e-5)
    np.testing.assert_allclose(whitened_rows(t, train), want_train, atol=1e-8)
    np.testing.assert_allclose(whitened_rows(t, test), want_test, atol=1e-8)


def test_exact_thesis_matches_svd_formula():
    images = decaying_images(n=120, shape=(3, 3, 3))
    x = images.reshape(len(images), -1)
    centred = x - x.mean(axis=0)
    _, d, vt = np.linalg.svd(centred, full_matrices=False)
    eps = 0.05
    want = centred @ vt.T @ np.diag(np.sqrt(len(x) - 1) / (d + eps)) @ vt
    t = zca_fit(images, ZcaSettings(variant="thesis", solver="exact", eps=eps, dtype="float64"))
    np.testing.assert_allclose(whitened_rows(t, images), want, atol=1e-8)


def test_randomized_full_rank_shankar_equals_exact():
    images = decaying_images(n=100, shape=(3, 3, 2))
    exact = zca_fit(images, ZcaSettings(variant="shankar", solver="exact", eps=1e-3))
    rand = zca_fit(
        images,
        ZcaSettings(variant="shankar", solver="randomized", rank=18, eps=1e-3, dtype="float64"),
    )
    np.testing.assert_allclose(whitened_rows(rand, images), whitened_rows(exact, images), atol=1e-6)


def test_rank_k_shankar_tends_to_exact_as_k_grows():
    images = decaying_images(n=200, shape=(4, 4, 2), decay=0.9)
    exact = whitened_rows(
        zca_fit(images, ZcaSettings(variant="shankar", solver="exact", eps=1e-3)), images
    )
    errors = [
        np.linalg.norm(
            whitened_rows(
                zca_fit(images, ZcaSettings(variant="shankar", solver="exact", rank=k, eps=1e-3)),
                images,
            )
            - exact
        )
        for k in (4, 12, 24, 32)
    ]
    assert all(a > b for a, b in zip(errors, errors[1:], strict=False)) and errors[-1] < 1e-8


def test_randomized_shankar_complement_uses_the_mean_remaining_eigenvalue():
    # A slowly decaying spectrum and eps comparable to the mean eigenvalue 1/P (as for
    # unit-norm 224x224 images with eps 1e-5): the complement of the top-k subspace holds
    # most of the variance. Scaling it by (m + eps)^-1/2, m the mean of the remaining
    # eigenvalues (exact, from the trace), is much closer to the exact transform than
    # eps^-1/2, and the transform converges to the exact one as k grows.
    images = decaying_images(n=400, shape=(8, 8, 3), decay=0.99, seed=1)
    p, eps = 8 * 8 * 3, 1e-3
    exact = whitened_rows(
        zca_fit(images, ZcaSettings(variant="shankar", solver="exact", eps=eps)), images
    )

    def error(t: ZCATransform) -> float:
        return np.abs(whitened_rows(t, images) - exact).max() / np.abs(exact).max()

    errors = {}
    for k in (16, 64, 128, 176):
        t = zca_fit(
            images,
            ZcaSettings(variant="shankar", solver="randomized", rank=k, eps=eps, dtype="float64"),
        )
        rows = images.reshape(len(images), -1)
        rows = rows - rows.mean(axis=1, keepdims=True)
        trace = np.mean(np.sum((rows / np.linalg.norm(rows, axis=1, keepdims=True)) ** 2, 1))
        mean_rest = (trace - np.sum(t.singular_values**2) / len(images)) / (p - k)
        assert t.complement_scale == pytest.approx((mean_rest + eps) ** -0.5, rel=1e-9)
        errors[k] = error(t)
        old_rule = error(dataclasses.replace(t, complement_scale=eps**-0.5))
        assert errors[k] < 0.4 * old_rule, (k, errors[k], old_rule)
        if k == 16:
            assert old_rule > 1.0  # eps^-1/2: off by more than the signal itself
    values = list(errors.values())
    assert all(a > b for a, b in zip(values, values[1:], strict=False)), errors
    assert values[-1] < 0.01, errors


def test_flips_fit_equals_fit_on_flipped_copies():
    images = decaying_images(n=50, shape=(4, 5, 2))
    doubled = np.concatenate([images, images[:, :, ::-1]])
    with_flips = zca_fit(images, ZcaSettings(solver="exact", flips=True), block_rows=7)
    explicit = zca_fit(doubled, ZcaSettings(solver="exact"))
    assert with_flips.n_samples == 100
    np.testing.assert_allclose(with_flips.mean, explicit.mean, atol=1e-12)
    np.testing.assert_allclose(with_flips.singular_values, explicit.singular_values, rtol=1e-6)


@pytest.mark.parametrize("solver", ["exact", "randomized"])
def test_streaming_block_size_does_not_change_the_fit(solver, monkeypatch):
    images = (decaying_images(n=90) * 40 + 100).clip(0, 255).astype(np.uint8)
    whole = zca_fit(images, ZcaSettings(solver=solver, rank=8, dtype="float64"))
    # Stream from the input on every pass, as for data larger than ZCA_RESIDENT_BYTES.
    monkeypatch.setattr("neural_kernels.zca.fit.ZCA_RESIDENT_BYTES", 0)
    small = zca_fit(images, ZcaSettings(solver=solver, rank=8, dtype="float64"), block_rows=7)
    np.testing.assert_allclose(projector(small), projector(whole), atol=1e-8)
    np.testing.assert_allclose(
        zca_apply(small, images, block_rows=5, dtype=F64), zca_apply(whole, images), atol=1e-4
    )


def test_fit_then_apply_reproduces_the_stage_output(tmp_path):
    images = (decaying_images(n=80, shape=(4, 4, 3)) * 40 + 100).clip(0, 255).astype(np.uint8)
    np.save(tmp_path / "train_images.npy", images[:60])
    np.save(tmp_path / "test_images.npy", images[60:])
    out = tmp_path / "zca"
    record = whiten_files(
        [tmp_path / "train_images.npy", tmp_path / "test_images.npy"],
        out,
        ZcaSettings(variant="thesis", solver="randomized", rank=10, eps=0.1),
    )
    assert sorted(p.name for p in out.iterdir()) == [
        "test_images.npy", "train_images.npy", "transform.npz", "zca.json",
    ]  # fmt: skip
    assert record["rank"] == 10 and record["device"] == "cpu" and record["fit_seconds"] > 0
    transform = ZCATransform.load(out / "transform.npz")
    for name, part in (("train_images.npy", images[:60]), ("test_images.npy", images[60:])):
        stage_output = np.load(out / name)
        assert stage_output.dtype == np.float32 and stage_output.shape == part.shape
        np.testing.assert_array_equal(zca_apply(transform, part), stage_output)
    # Re-applying the saved transform through the CLI gives the same arrays.
    again = tmp_path / "again"
    result = subprocess.run(
        [sys.executable, "-m", "neural_kernels", "-q", "zca", str(tmp_path / "test_images.npy"),
         "--transform", str(out / "transform.npz"), "--out-dir", str(again)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    np.testing.assert_array_equal(
        np.load(again / "test_images.npy"), np.load(out / "test_images.npy")
    )


def test_rank_larger_than_min_n_p_is_a_clear_error():
    images = decaying_images(n=20, shape=(3, 3, 1))
    with pytest.raises(NeuralKernelsError, match=r"rank 10 is not in 1..min\(N, P\) = 9"):
        zca_fit(images, ZcaSettings(solver="exact", rank=10))
    with pytest.raises(NeuralKernelsError, match=r"min\(N, P\) = 20 for N = 20"):
        zca_fit(decaying_images(n=20, shape=(6, 6, 1)), ZcaSettings(solver="randomized", rank=21))
    with pytest.raises(NeuralKernelsError, match="randomized solver needs a rank"):
        zca_fit(images, ZcaSettings(solver="randomized"))


def test_non_finite_input_is_a_clear_error(tmp_path):
    images = decaying_images(n=20, shape=(3, 3, 1))
    images[5, 1, 1, 0] = np.nan
    with pytest.raises(DataError, match="NaN or infinite"):
        zca_fit(images, ZcaSettings(solver="exact"))
    np.save(tmp_path / "bad.npy", images)
    result = subprocess.run(
        [sys.executable, "-m", "neural_kernels", "-q", "zca", str(tmp_path / "bad.npy"),
         "--out-dir", str(tmp_path / "out")],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 1
    assert "bad.npy: images contain NaN or infinite values" in result.stderr
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_apply_to_images_of_another_shape():
    t = zca_fit(decaying_images(n=30, shape=(3, 3, 1)), ZcaSettings(solver="exact"))
    with pytest.raises(DataError, match=r"fitted on images of shape \(3, 3, 1\)"):
        zca_apply(t, decaying_images(n=5, shape=(4, 4, 1)))


@pytest.mark.cuda
def test_gpu_matches_cpu():
    images = decaying_images()
    cpu = zca_fit(images, ZcaSettings(solver="randomized", rank=12, dtype="float64"))
    gpu = zca_fit(images, ZcaSettings(solver="randomized", rank=12, dtype="float64"), device="cuda")
    np.testing.assert_allclose(projector(gpu), projector(cpu), atol=1e-8)
