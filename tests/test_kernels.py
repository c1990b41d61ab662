"""Myrtle kernels: closed forms, kernel properties, estimate -> analytic, shards, resume."""

from __future__ import annotations

import dataclasses
import json
import math
import platform
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from neural_kernels import architectures, layout
from neural_kernels.architectures import (
    Conv,
    GlobalAvgPool,
    Relu,
    Serial,
    myrtle,
)
from neural_kernels.cli import main
from neural_kernels.device import keep_freed_cpu_memory
from neural_kernels.errors import DataError, NeuralKernelsError
from neural_kernels.kernels import analytic, stage
from neural_kernels.kernels.analytic import (
    analytic_kernel,
    auto_block_size,
    computed_blocks,
)
from neural_kernels.kernels.estimate import EstimateSettings, estimate_kernel
from neural_kernels.kernels.inputs import ImageRows, KernelInputs
from neural_kernels.kernels.merge import merge_shards
from neural_kernels.kernels.stage import analytic_files, estimate_shard
from neural_kernels.settings import AnalyticSettings, KernelSpec
from neural_kernels.solvers.flow import kernel_rows

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def digits() -> np.ndarray:
    """The first 48 digits, centred, scaled to about unit variance, NHWC float32."""
    x = load_digits().images[:48, :, :, None].astype(np.float64) / 16.0
    return ((x - x.mean(0)) / x.std()).astype(np.float32)


def arc_cosine_reference(a: np.ndarray, b: np.ndarray) -> float:
    """Cho & Saul's order-1 arc-cosine kernel, scaled by 2: (1/pi)|a||b|(sin t + (pi-t)cos t)."""
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    theta = np.arccos(np.clip(a @ b / (na * nb), -1.0, 1.0))
    return na * nb / np.pi * (np.sin(theta) + (np.pi - theta) * np.cos(theta))


def test_one_conv_layer_matches_closed_form_arc_cosine():
    rng = np.random.default_rng(0)
    images = rng.normal(size=(5, 4, 4, 2))
    net = Serial("one_conv", (Conv(), Relu(), GlobalAvgPool()))
    padded = np.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)))
    # The pre-activation covariance at (p, q) is <patch_x(p), patch_y(q)> / (9 C): the
    # arc-cosine kernel of the scaled patches, averaged over all position pairs.
    patches = np.stack(
        [padded[:, i : i + 3, j : j + 3, :].reshape(5, -1) for i in range(4) for j in range(4)],
        axis=1,
    ) / math.sqrt(9 * 2)
    expected = np.array(
        [
            [
                np.mean([arc_cosine_reference(p, q) for p in patches[a] for q in patches[b]])
                for b in range(5)
            ]
            for a in range(5)
        ]
    )
    got = analytic_kernel(net, images, progress=False)
    np.testing.assert_allclose(got, expected, rtol=1e-12)


@pytest.mark.parametrize(("arch", "activation"), [("myrtle5", "relu"), ("myrtle7", "gaussian")])
def test_analytic_kernel_is_symmetric_psd_with_unit_diagonal(digits, arch, activation):
    kernel = analytic_kernel(
        myrtle(arch, activation), digits[:24].astype(np.float64), block_size=7, progress=False
    )
    assert kernel.dtype == np.float64
    np.testing.assert_array_equal(kernel, kernel.T)
    np.testing.assert_allclose(np.diag(kernel), 1.0, atol=1e-12)
    assert np.linalg.eigvalsh(kernel).min() > -1e-12
    assert np.all(np.abs(kernel) <= 1 + 1e-12)


def test_cross_kernel_block_size_and_precision(digits):
    net = myrtle("myrtle5")
    x, z = digits[:20].astype(np.float64), digits[20:26].astype(np.float64)
    joint = analytic_kernel(net, np.concatenate([x, z]), block_size=16, progress=False)
    cross = analytic_kernel(net, x, z, block_size=5, progress=False)
    np.testing.assert_allclose(cross, joint[20:, :20], rtol=1e-13)
    mixed = analytic_kernel(net, x, z, precision="mixed", progress=False)
    np.testing.assert_allclose(mixed, cross, atol=1e-6)


def test_auto_block_size_fills_its_budget_and_gives_the_same_kernel(digits):
    assert auto_block_size(8, 8, CPU) == 8  # 64 pairs x 8^4 entries = 2 MiB of float64
    assert auto_block_size(8, 8, CPU, "mixed") == 11  # 121 x 8^4 float32 entries < 2 MiB
    assert auto_block_size(32, 32, CPU) == 1
    assert auto_block_size(32, 32, torch.device("cuda")) == 16  # 2 GiB of float64
    net, x = myrtle("myrtle5"), digits[:21].astype(np.float64)
    np.testing.assert_allclose(
        analytic_kernel(net, x, progress=False),
        analytic_kernel(net, x, block_size=21, progress=False),
        rtol=1e-13,
    )


@pytest.mark.parametrize("images2", [False, True])
def test_block_workers_do_not_change_the_kernel(digits, monkeypatch, images2):
    """Blocks on 1 or 3 worker threads: the same bits, and torch's threads restored."""
    net, x = myrtle("myrtle5"), digits[:23].astype(np.float64)
    z = digits[23:30].astype(np.float64) if images2 else None
    kernels = []
    for workers in (1, 3):
        monkeypatch.setattr(analytic, "cpu_block_workers", lambda device, n=workers: n)
        threads = torch.get_num_threads()
        kernels.append(analytic_kernel(net, x, z, block_size=4, device="cpu", progress=False))
        assert torch.get_num_threads() == threads
    np.testing.assert_allclose(kernels[0], kernels[1], rtol=1e-13)


def test_computed_blocks_come_in_order_and_stop_with_their_consumer():
    threads = torch.get_num_threads()
    started: list[int] = []

    def compute(block: tuple[int, int]) -> np.ndarray:
        started.append(block[0])
        time.sleep(0.002 * (block[0] % 3))  # later blocks often finish first
        assert torch.get_num_threads() == 1  # each worker runs its operations alone
        return np.full((1, 1), block[0])

    blocks = [(i, 0) for i in range(40)]
    got = [int(b[0, 0]) for b in computed_blocks(compute, blocks, workers=2)]
    assert got == list(range(40))
    assert torch.get_num_threads() == threads

    # The consumer stops while blocks are queued: they are cancelled, the running ones
    # finish. Blocks from 2 on wait for `release`, so 2 + 2 workers at most ever start.
    started.clear()
    release = threading.Event()

    def held(block: tuple[int, int]) -> np.ndarray:
        started.append(block[0])
        if block[0] >= 2:
            release.wait(5)
        return np.full((1, 1), block[0])

    results = computed_blocks(held, blocks, workers=2)
    assert [int(next(results)[0, 0]) for _ in range(2)] == [0, 1]
    deadline = time.monotonic() + 30
    while len(started) < 4 and time.monotonic() < deadline:  # both workers hold a block
        time.sleep(0.01)
    threading.Timer(0.2, release.set).start()
    results.close()
    assert sorted(started) == [0, 1, 2, 3]  # none of the queued blocks ran
    assert torch.get_num_threads() == threads

    def failing(block: tuple[int, int]) -> np.ndarray:
        if block[0] == 5:
            raise KeyboardInterrupt
        return np.zeros((1, 1))

    results = computed_blocks(failing, blocks, workers=2)
    with pytest.raises(KeyboardInterrupt):
        for index, _ in enumerate(results):
            assert index < 5  # blocks before the failing one arrive, none after
    assert torch.get_num_threads() == threads


def test_interrupted_block_workers_mark_only_finished_blocks(digits, monkeypatch):
    net, x = myrtle("myrtle5"), digits[:26].astype(np.float64)
    fresh = analytic_kernel(net, x, block_size=3, device="cpu", progress=False)
    monkeypatch.setattr(analytic, "cpu_block_workers", lambda device: 2)
    grid = 9 * 9  # ceil(26 / 3) blocks per side; the upper triangle is computed
    out, done = np.full((26, 26), np.nan), np.zeros(grid, dtype=bool)
    lock, calls = threading.Lock(), {"n": 0}
    original = Serial.cross_kernel

    def failing(self, *args, **kw):
        with lock:
            calls["n"] += 1
            fail = calls["n"] == 12
        if fail:
            raise KeyboardInterrupt
        return original(self, *args, **kw)

    monkeypatch.setattr(Serial, "cross_kernel", failing)
    with pytest.raises(KeyboardInterrupt):
        analytic_kernel(net, x, block_size=3, device="cpu", out=out, done=done, progress=False)
    finished = [(i, j) for i in range(9) for j in range(9) if done[i * 9 + j]]
    assert 0 < len(finished) < grid
    for i, j in finished:  # every block marked done holds its final values
        rows, cols = slice(3 * i, 3 * i + 3), slice(3 * j, 3 * j + 3)
        np.testing.assert_allclose(out[rows, cols], fresh[rows, cols], rtol=1e-13)
    monkeypatch.setattr(Serial, "cross_kernel", original)
    analytic_kernel(net, x, block_size=3, device="cpu", out=out, done=done, progress=False)
    np.testing.assert_allclose(out, fresh, rtol=1e-13)


def test_cpu_allocator_keeps_freed_memory_where_it_is_glibc():
    assert keep_freed_cpu_memory() is (platform.libc_ver()[0] == "glibc")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("numpy_asin", [True, False])
def test_relu_map_on_the_cpu_matches_torch_asin(dtype, numpy_asin, monkeypatch):
    # Either arcsin (NumPy's where it is vectorised, torch's otherwise): the same map.
    monkeypatch.setattr(architectures.layers, "_NUMPY_ASIN", numpy_asin)
    k = torch.linspace(-2.0, 2.0, 1001, dtype=dtype)
    sx, sy = torch.full_like(k, 1.5), torch.full_like(k, 0.8)
    r = (k / 1.2).clamp(-1, 1)
    expected = 1.2 * (torch.sqrt(1 - r**2) + r * (math.pi - torch.acos(r))) / math.pi
    torch.testing.assert_close(Relu().kernel(k.clone(), sx, sy), expected)


def test_gaussian_map_is_exp_of_correlation():
    layer = myrtle("myrtle5", "gaussian", gamma=0.5).layers[1]
    k = torch.tensor([[[[[[0.3]]]]]], dtype=torch.float64)
    sx, sy = torch.full_like(k, 2.0), torch.full_like(k, 0.5)
    got = layer.kernel(k, sx, sy).item()
    assert got == pytest.approx(1.0 * math.exp(0.5 * (0.3 - 1.0)), rel=1e-14)


@pytest.mark.parametrize("activation", ["relu", "gaussian"])
def test_final_projection_finite_layer_tends_to_its_map(activation):
    # Two pooled feature vectors with cosine r; a dense layer + nonlinearity of a growing
    # output width: the mean product of its outputs tends to f(r) (relu_project or
    # exp(gamma (r - 1))), the map the analytic kernel and the estimate apply.
    final = myrtle("myrtle5", activation, gamma=0.7).final
    generator = torch.Generator().manual_seed(0)
    a, b = (
        torch.randn(32, generator=generator, dtype=torch.float64),
        torch.randn(32, generator=generator, dtype=torch.float64),
    )
    for mix in (0.2, 0.6, 0.95):
        y = mix * a + (1 - mix) * b
        x = torch.stack([3.0 * a, 0.5 * y]).reshape(2, 32, 1, 1)  # scales must not matter
        r = torch.nn.functional.cosine_similarity(a, y, dim=0)
        expected = final.of_correlation(r.reshape(1)).item()
        errors = []
        for width in (64, 200_000):
            params = final.init(generator, 32, 1, width, False)
            params = tuple(None if p is None else p.double() for p in params)
            out = final.apply(x, params).reshape(2, width)
            errors.append(abs((out[0] @ out[1]).item() / width - expected))
        assert errors[1] < 0.01, (mix, errors)
    # relu_project at a few cosines, written out; exp(gamma (r - 1)) for the Gaussian.
    r = torch.tensor([-1.0, -0.3, 0.0, 0.5, 1.0], dtype=torch.float64)
    if activation == "relu":
        expected = (torch.sqrt(1 - r**2) + r * (math.pi - torch.acos(r))) / math.pi
    else:
        expected = torch.exp(0.7 * (r - 1))
    torch.testing.assert_close(final.of_correlation(r.clone()), expected, rtol=1e-14, atol=1e-15)


def centred_error(estimate: np.ndarray, exact: np.ndarray) -> float:
    """Relative Frobenius error of the doubly centred kernels (the part that classifies)."""
    n = len(exact)
    centre = np.eye(n) - 1.0 / n
    return np.linalg.norm(centre @ (estimate - exact) @ centre) / np.linalg.norm(
        centre @ exact @ centre
    )


def test_estimate_converges_to_analytic_as_features_grow(digits):
    net = myrtle("myrtle5")
    exact = analytic_kernel(net, digits.astype(np.float64), progress=False)
    errors = {}
    for networks in (2, 8, 32):
        runs = [
            centred_error(
                estimate_kernel(
                    net,
                    digits,
                    settings=EstimateSettings(
                        width=128, networks=networks, chunk_networks=8, seed=seed
                    ),
                    device=CPU,
                    progress=False,
                ),
                exact,
            )
            for seed in range(2)
        ]
        errors[networks * 128] = float(np.mean(runs))
    f = sorted(errors)
    # 1/sqrt(F) would shrink the error 4x over a 16x range of F; the finite-width bias
    # of 128-channel networks keeps it from going all the way.
    assert errors[f[0]] > errors[f[1]] > errors[f[2]], errors
    assert errors[f[0]] / errors[f[2]] > 2.5, errors
    assert errors[f[2]] < 0.15, errors
    # The uncentred kernel is already close.
    full = estimate_kernel(
        net,
        digits,
        settings=EstimateSettings(width=128, networks=32, chunk_networks=32),
        device=CPU,
        progress=False,
    )
    assert np.linalg.norm(full - exact) / np.linalg.norm(exact) < 0.01


def test_estimate_is_normalised_and_seeded(digits):
    net = myrtle("myrtle5")
    settings = EstimateSettings(width=16, networks=8, chunk_networks=4, seed=3)
    first = estimate_kernel(net, digits[:16], settings=settings, device=CPU, progress=False)
    again = estimate_kernel(net, digits[:16], settings=settings, device=CPU, progress=False)
    other = estimate_kernel(
        net,
        digits[:16],
        settings=EstimateSettings(width=16, networks=8, chunk_networks=4, seed=4),
        device=CPU,
        progress=False,
    )
    np.testing.assert_array_equal(first, again)
    assert not np.allclose(first, other)
    np.testing.assert_allclose(np.diag(first), 1.0, atol=1e-12)
    np.testing.assert_allclose(first, first.T, atol=1e-15)
    cross = estimate_kernel(net, digits[:16], digits[16:20], settings, device=CPU, progress=False)
    joint = estimate_kernel(
        net,
        np.concatenate([digits[:16], digits[16:20]]),
        settings=settings,
        device=CPU,
        progress=False,
    )
    np.testing.assert_allclose(cross, joint[16:, :16], atol=1e-6)


def test_row_passes_and_tiles_do_not_change_the_sums(digits):
    from neural_kernels.kernels.estimate import estimate_sums

    net = myrtle("myrtle5")
    settings = EstimateSettings(width=8, networks=4, chunk_networks=2, tile_rows=5)
    evals = {"val": digits[30:37], "test": digits[37:48]}
    one = estimate_sums(
        net,
        digits[:30],
        evals,
        EstimateSettings(width=8, networks=4, chunk_networks=2),
        device=CPU,
        progress=False,
    )
    many = estimate_sums(
        net,
        digits[:30],
        evals,
        settings,
        device=CPU,
        progress=False,
        max_accumulator_bytes=30 * 8 * 12,
    )
    assert many["passes"] > 3
    for key in ("train", "val", "test", "val_sqnorm", "test_sqnorm"):
        np.testing.assert_allclose(many[key], one[key], rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(one["train"], one["train"].T)


@pytest.fixture
def split_files(tmp_path: Path, digits) -> dict[str, Path]:
    paths = {}
    for name, rows in (("train", digits[:24]), ("val", digits[24:30]), ("test", digits[30:40])):
        paths[name] = tmp_path / f"{name}_images.npy"
        np.save(paths[name], rows)
    paths["indices"] = tmp_path / "indices.npy"
    np.save(paths["indices"], np.array([5, 1, 17, 3, 9, 12, 0, 22, 8, 14]))
    return paths


SETTINGS = EstimateSettings(width=8, networks=16, chunk_networks=2, seed=1)


def run_shards(files: dict[str, Path], root: Path, shards: int, flips: bool = False) -> dict:
    dirs = []
    for shard in range(shards):
        dirs.append(root / f"s{shards}-{shard}")
        estimate_shard(
            KernelInputs(files["train"], {"val": files["val"], "test": files["test"]}),
            dirs[-1],
            KernelSpec("myrtle5", flips=flips),
            SETTINGS,
            shard=shard,
            shards=shards,
            progress=False,
            device="cpu",
        )
    merge_shards(dirs, root / f"merged{shards}")
    return {
        name: np.load(root / f"merged{shards}" / f"{name}.npy") for name in ("train", "val", "test")
    }


def test_merging_2_or_4_shards_equals_one(split_files, tmp_path):
    one = run_shards(split_files, tmp_path, 1, flips=True)
    assert one["train"].shape == (48, 48) and one["test"].shape == (10, 48)
    for shards in (2, 4):
        merged = run_shards(split_files, tmp_path, shards, flips=True)
        for name in one:
            np.testing.assert_allclose(merged[name], one[name], rtol=0, atol=1e-13)
    record = json.loads((tmp_path / "merged4" / "kernel.json").read_text())
    assert record["features"] == 16 * 8 and record["shards"] == 4
    with pytest.raises(NeuralKernelsError, match="exactly once"):
        merge_shards([tmp_path / "s4-0", tmp_path / "s4-0"], tmp_path / "bad")
    with pytest.raises(NeuralKernelsError, match="differs"):
        merge_shards([tmp_path / "s2-0", tmp_path / "s4-1"], tmp_path / "bad")
    # a shard of another version (a setting this one does not know): said, not a TypeError
    meta = json.loads((tmp_path / "s1-0/shard.json").read_text())
    meta["settings"]["storage"] = "float64"
    (tmp_path / "s1-0/shard.json").write_text(json.dumps(meta))
    with pytest.raises(NeuralKernelsError, match=r"does not know \(storage\).*another version"):
        merge_shards([tmp_path / "s1-0"], tmp_path / "bad")
    assert not (tmp_path / "bad" / "kernel.json").exists()


def test_float32_storage_writes_the_float64_kernel_rounded_once(split_files, tmp_path):
    """``storage: float32``: the merge and the analytic stage compute in float64 and store
    the same kernel rounded to float32 (half the bytes), said in kernel.json; a solve
    reads it as float64."""
    inputs = KernelInputs(split_files["train"], {"test": split_files["test"]})
    spec = KernelSpec("myrtle5")
    settings = dataclasses.replace(SETTINGS, networks=4)
    estimate_shard(inputs, tmp_path / "shard", spec, settings, device="cpu", progress=False)
    for storage in ("float64", "float32"):
        merge_shards([tmp_path / "shard"], tmp_path / f"est-{storage}", storage=storage)
        analytic = AnalyticSettings(block_size=8, precision="mixed", storage=storage)
        analytic_files(inputs, tmp_path / f"an-{storage}", spec, analytic, device="cpu",
                       progress=False)  # fmt: skip
    for kind in ("est", "an"):
        record = json.loads((tmp_path / f"{kind}-float32/kernel.json").read_text())
        assert record["storage"] == "float32"
        for name in ("train", "test"):
            wide = np.load(tmp_path / f"{kind}-float64/{name}.npy")
            narrow = np.load(tmp_path / f"{kind}-float32/{name}.npy")
            assert wide.dtype == np.float64 and narrow.dtype == np.float32
            np.testing.assert_array_equal(narrow, wide.astype(np.float32))
        assert sorted(p.name for p in (tmp_path / f"{kind}-float32").iterdir()) == [
            "kernel.json", "test.npy", "train.npy"
        ]  # fmt: skip
    # a float64 analytic record keeps the keys it had before the setting existed
    record = json.loads((tmp_path / "an-float64/kernel.json").read_text())
    assert set(record["settings"]) == {"block_size", "precision"}
    # the solvers read float32 blocks in float64: the same flow as on the rounded kernel
    narrow = np.load(tmp_path / "est-float32/train.npy", mmap_mode="r")
    rows = torch.from_numpy(np.asarray(narrow, np.float64))
    np.testing.assert_array_equal(kernel_rows(narrow, slice(0, 24), CPU).numpy(), rows[:24])


def test_flips_double_train_rows_only(split_files, tmp_path):
    rows = ImageRows(split_files["train"], flips=True)
    base = np.load(split_files["train"])
    np.testing.assert_array_equal(rows[20:28], np.concatenate([base[20:24], base[0:4, :, ::-1]]))
    indexed = ImageRows(split_files["train"], np.load(split_files["indices"]))
    np.testing.assert_array_equal(indexed[2:6], base[[17, 3, 9, 12]])
    analytic_files(
        KernelInputs(split_files["train"], {"test": split_files["test"]}, split_files["indices"]),
        tmp_path / "an",
        KernelSpec("myrtle5", flips=True),
        progress=False,
        device="cpu",
    )
    train = np.load(tmp_path / "an" / "train.npy")
    test = np.load(tmp_path / "an" / "test.npy")
    assert train.shape == (20, 20) and test.shape == (10, 20)
    direct = analytic_kernel(
        myrtle("myrtle5"),
        base[[5, 1, 17, 3, 9, 12, 0, 22, 8, 14]][:, :, ::-1].astype(np.float64),
        progress=False,
    )
    np.testing.assert_allclose(train[10:, 10:], direct, rtol=1e-12)


def test_val_rows_join_the_fitted_block_after_train_and_its_mirrors(split_files, tmp_path):
    # The refit layout: one symmetric block over train, train mirrors, val, val mirrors,
    # and the test rows against all of them; kernel.json says which rows are which.
    train, val = np.load(split_files["train"]), np.load(split_files["val"])
    stacked = np.concatenate([train, train[:, :, ::-1], val, val[:, :, ::-1]])
    inputs = KernelInputs(
        split_files["train"], {"test": split_files["test"]}, val=split_files["val"]
    )
    spec = KernelSpec("myrtle5", flips=True)
    analytic_files(inputs, tmp_path / "an", spec)
    record = json.loads((tmp_path / "an" / "kernel.json").read_text())
    assert record["inputs"]["train"]["layout"] == [
        {"split": "train", "start": 0, "stop": 24, "mirrored": False},
        {"split": "train", "start": 24, "stop": 48, "mirrored": True},
        {"split": "val", "start": 48, "stop": 54, "mirrored": False},
        {"split": "val", "start": 54, "stop": 60, "mirrored": True},
    ]
    assert sorted(p.name for p in (tmp_path / "an").iterdir()) == [
        "kernel.json", "test.npy", "train.npy"
    ]  # fmt: skip
    net = myrtle("myrtle5")
    direct = analytic_kernel(net, stacked.astype(np.float64), progress=False)
    np.testing.assert_allclose(np.load(tmp_path / "an" / "train.npy"), direct, atol=1e-12)
    test = np.load(split_files["test"]).astype(np.float64)
    cross = analytic_kernel(net, stacked.astype(np.float64), test, progress=False)
    np.testing.assert_allclose(np.load(tmp_path / "an" / "test.npy"), cross, atol=1e-12)
    # The estimate's shards stack the same rows: equal to the estimate of the stacked set.
    estimate_shard(inputs, tmp_path / "s0", spec, SETTINGS, progress=False, device="cpu")
    merge_shards([tmp_path / "s0"], tmp_path / "est")
    whole = estimate_kernel(net, stacked, settings=SETTINGS, device=CPU, progress=False)
    np.testing.assert_allclose(np.load(tmp_path / "est" / "train.npy"), whole, atol=1e-6)
    merged = json.loads((tmp_path / "est" / "kernel.json").read_text())
    assert merged["inputs"]["train"]["layout"] == record["inputs"]["train"]["layout"]
    with pytest.raises(NeuralKernelsError, match="either fitted"):
        analytic_files(
            KernelInputs(split_files["train"], {"val": split_files["val"]}, val=split_files["val"]),
            tmp_path / "bad", KernelSpec("myrtle5"), progress=False,
        )  # fmt: skip


def test_interrupted_analytic_run_resumes_from_finished_blocks(split_files, tmp_path, monkeypatch):
    inputs = KernelInputs(split_files["train"], {"val": split_files["val"]})
    args = (KernelSpec("myrtle5"), AnalyticSettings(block_size=4))
    kwargs = dict(progress=False, device="cpu")
    # One block worker, so that the 10th call is the 10th block (test_faults.py kills
    # the real, multi-threaded stage).
    monkeypatch.setattr(analytic, "cpu_block_workers", lambda device: 1)
    analytic_files(inputs, tmp_path / "fresh", *args, **kwargs)
    calls = {"n": 0}
    original = Serial.cross_kernel

    def failing(self, *args, **kw):
        calls["n"] += 1
        if calls["n"] == 10:
            raise KeyboardInterrupt
        return original(self, *args, **kw)

    monkeypatch.setattr(Serial, "cross_kernel", failing)
    with pytest.raises(KeyboardInterrupt):
        analytic_files(inputs, tmp_path / "out", *args, **kwargs)
    assert not (tmp_path / "out" / "kernel.json").exists()
    assert (tmp_path / ".out.resume").is_dir()
    calls["n"] = -1000
    analytic_files(inputs, tmp_path / "out", *args, **kwargs)
    blocks = 6 * 7 // 2 + 2 * 6  # train triangle (6 x 6 blocks) + val (2 x 6 blocks)
    assert calls["n"] + 1000 == blocks - 9
    for name in ("train", "val"):
        np.testing.assert_array_equal(
            np.load(tmp_path / "out" / f"{name}.npy"), np.load(tmp_path / "fresh" / f"{name}.npy")
        )
    assert not (tmp_path / ".out.resume").exists()


def test_resumed_run_keeps_its_automatic_block_size(split_files, tmp_path, monkeypatch):
    """A retry on another kind of host (a GPU) keeps the finished blocks."""
    inputs = KernelInputs(split_files["train"], {"val": split_files["val"]})
    spec, kwargs = KernelSpec("myrtle5"), dict(progress=False, device="cpu")
    monkeypatch.setattr(stage, "auto_block_size", lambda *args: 4)
    monkeypatch.setattr(analytic, "cpu_block_workers", lambda device: 1)  # 10th call = block
    calls = {"n": 0}
    original = Serial.cross_kernel

    def failing(self, *args, **kw):
        calls["n"] += 1
        if calls["n"] == 10:
            raise KeyboardInterrupt
        return original(self, *args, **kw)

    monkeypatch.setattr(Serial, "cross_kernel", failing)
    with pytest.raises(KeyboardInterrupt):
        analytic_files(inputs, tmp_path / "out", spec, **kwargs)
    monkeypatch.setattr(stage, "auto_block_size", lambda *args: 7)  # the "other host"
    calls["n"] = -1000
    record = analytic_files(inputs, tmp_path / "out", spec, **kwargs)
    assert record["settings"]["block_size"] == 4
    assert calls["n"] + 1000 == 6 * 7 // 2 + 2 * 6 - 9  # only the unfinished blocks
    fresh = analytic_files(inputs, tmp_path / "fresh", spec, **kwargs)
    assert fresh["settings"]["block_size"] == 7  # no resume: this host's choice
    for name in ("train", "val"):
        np.testing.assert_allclose(
            np.load(tmp_path / "out" / f"{name}.npy"),
            np.load(tmp_path / "fresh" / f"{name}.npy"),
            rtol=1e-12,
        )


def test_killed_shard_is_recomputed_on_rerun(split_files, tmp_path):
    out = tmp_path / "shard"
    command = [
        sys.executable, "-m", "neural_kernels", "kernel-shard",
        "--train", str(split_files["train"]), "--eval", f"test={split_files['test']}",
        "--arch", "myrtle10", "--networks", "4000", "--chunk-networks", "1", "--width", "4",
        "--device", "cpu", "--out-dir", str(out),
    ]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not list(out.glob(".shard.partial-*/train.npy")):
        assert time.monotonic() < deadline and process.poll() is None
        time.sleep(0.1)
    time.sleep(1.0)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (out / "shard.json").exists() and not (out / "train.npy").exists()
    command[command.index("4000")] = "6"
    rerun = subprocess.run(command, capture_output=True, text=True, check=False)
    assert rerun.returncode == 0, rerun.stderr
    assert json.loads((out / "shard.json").read_text())["features"] == 24


def test_kernel_cli_analytic_and_estimate(split_files, tmp_path, capsys):
    out = tmp_path / "k" / "K.npy"
    assert (
        main(
            [
                "-q",
                "kernel",
                "--arch",
                "myrtle5",
                "--method",
                "analytic",
                "--images",
                str(split_files["train"]),
                "--images2",
                str(split_files["test"]),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    expected = analytic_kernel(
        myrtle("myrtle5"),
        np.load(split_files["train"]).astype(float),
        np.load(split_files["test"]).astype(float),
        progress=False,
    )
    np.testing.assert_allclose(np.load(out), expected, rtol=1e-12)
    assert (
        main(
            [
                "-q",
                "kernel",
                "--arch",
                "myrtle5",
                "--method",
                "estimate",
                "--networks",
                "4",
                "--width",
                "8",
                "--flips",
                "--images",
                str(split_files["val"]),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    estimate = np.load(out)
    assert estimate.shape == (12, 12) and estimate.dtype == np.float64
    capsys.readouterr()


@pytest.mark.parametrize(
    ("arch", "images", "message"),
    [
        ("myrtle15", np.zeros((2, 8, 8, 1), np.float32), "at least 32x32"),
        ("myrtle5", np.zeros((2, 8, 8, 1), np.uint8), "float images"),
        ("myrtle5", np.zeros((2, 8, 8), np.float32), "(N, H, W, C)"),
    ],
)
def test_kernel_cli_rejects_bad_images(tmp_path, capsys, arch, images, message):
    np.save(tmp_path / "x.npy", images)
    code = main(
        [
            "kernel",
            "--arch",
            arch,
            "--method",
            "analytic",
            "--images",
            str(tmp_path / "x.npy"),
            "--out",
            str(tmp_path / "K.npy"),
        ]
    )
    assert code == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "K.npy").exists()


def test_estimate_settings_reject_bad_shards():
    with pytest.raises(NeuralKernelsError, match="shards cannot split"):
        EstimateSettings(networks=4, chunk_networks=2).shard_chunks(0, 3)
    with pytest.raises(NeuralKernelsError, match="precision"):
        EstimateSettings(precision="float16")


@pytest.mark.cuda
def test_gpu_matches_cpu(digits):
    net = myrtle("myrtle5")
    x = digits[:16].astype(np.float64)
    np.testing.assert_allclose(
        analytic_kernel(net, x, device="cuda", progress=False),
        analytic_kernel(net, x, device="cpu", progress=False),
        rtol=1e-10,
    )
    settings = EstimateSettings(width=16, networks=8, chunk_networks=32)
    np.testing.assert_allclose(
        estimate_kernel(
            net, digits[:16], settings=settings, device=torch.device("cuda"), progress=False
        ),
        estimate_kernel(net, digits[:16], settings=settings, device=CPU, progress=False),
        atol=1e-4,
    )


def test_kernel_directory_record_names():
    assert layout.KERNEL_META == "kernel.json" and layout.SHARD_META == "shard.json"


# ------------------------------------------------------------------ stage boundaries


def with_nan(path: Path, row: int) -> Path:
    images = np.load(path)
    images[row, 2, 3, 0] = np.nan
    broken = path.with_name("broken_" + path.name)
    np.save(broken, images)
    return broken


@pytest.mark.parametrize("method", ["analytic", "estimate"])
def test_nan_images_are_refused_by_the_kernel_command(split_files, tmp_path, capsys, method):
    broken = with_nan(split_files["train"], row=3)
    out = tmp_path / "k" / "K.npy"
    args = ["-q", "kernel", "--arch", "myrtle5", "--method", method, "--images", str(broken)]
    assert main([*args, "--out", str(out)]) == 1
    error = capsys.readouterr().err
    assert f"{broken}: 1 of 24 rows hold NaN or infinite values (rows 3)" in error
    assert "rerun zca" in error
    assert not out.exists() and not list(out.parent.glob("*"))


def test_nan_images_are_refused_by_the_kernel_stages(split_files, tmp_path):
    broken = with_nan(split_files["test"], row=7)
    inputs = KernelInputs(split_files["train"], {"test": broken}, val=split_files["val"])
    with pytest.raises(DataError, match=r"broken_test_images.npy: 1 of 10 rows .* \(rows 7\)"):
        analytic_files(inputs, tmp_path / "a", KernelSpec("myrtle5"), progress=False)
    with pytest.raises(DataError, match=r"\(rows 7\)"):
        estimate_shard(inputs, tmp_path / "s", KernelSpec("myrtle5"), SETTINGS, progress=False)
    assert not (tmp_path / "a").exists() and not (tmp_path / ".a.resume").exists()
    assert not list((tmp_path / "s").glob("*")) and not list(tmp_path.glob("s/.s.partial-*"))
    # a subset's kernel checks its own rows only: row 7 of train is not among them
    train = with_nan(split_files["train"], row=7)
    subset = KernelInputs(train, {"test": split_files["test"]}, split_files["indices"])
    analytic_files(subset, tmp_path / "ok", KernelSpec("myrtle5"), progress=False)
    train = with_nan(split_files["train"], row=17)  # the subset's third row
    subset = KernelInputs(train, {"test": split_files["test"]}, split_files["indices"])
    with pytest.raises(DataError, match=r"1 of 10 rows .* \(rows 17\)"):
        analytic_files(subset, tmp_path / "bad", KernelSpec("myrtle5"), progress=False)


def test_a_kernel_that_overflows_is_never_committed(split_files, tmp_path):
    """Finite images whose float32 products overflow: the result check refuses it."""
    huge = tmp_path / "huge.npy"
    np.save(huge, np.load(split_files["train"]) * np.float32(1e30))
    inputs = KernelInputs(huge, {})
    with pytest.raises(DataError, match=r"train.npy \(computed\): .* not finite although"):
        analytic_files(
            inputs, tmp_path / "a", KernelSpec("myrtle5"), AnalyticSettings(precision="mixed"),
            progress=False,
        )  # fmt: skip
    assert not (tmp_path / "a").exists()
    with pytest.raises(DataError, match=r"train.npy \(computed\)"):
        estimate_shard(inputs, tmp_path / "s", KernelSpec("myrtle5"), SETTINGS, progress=False)
    assert not list((tmp_path / "s").glob("*"))


def test_a_shard_that_does_not_match_its_record_is_refused(split_files, tmp_path):
    inputs = KernelInputs(split_files["train"], {"test": split_files["test"]})
    for shard in (0, 1):
        estimate_shard(
            inputs, tmp_path / f"s{shard}", KernelSpec("myrtle5"), SETTINGS,
            shard=shard, shards=2, progress=False,
        )  # fmt: skip
    np.save(tmp_path / "s1" / "test.npy", np.zeros((9, 24)))  # damaged: one row short
    with pytest.raises(DataError, match=r"s1/test.npy has shape \(9, 24\) but its shard.json"):
        merge_shards([tmp_path / "s0", tmp_path / "s1"], tmp_path / "merged")
    assert not list((tmp_path / "merged").glob("*"))
