"""Kernels augmented by random crops (the thesis's T4 and T5 augmented kernels).

A kernel with ``crop: s`` fits ``copies`` seeded random ``s x s`` windows of every fitted
image (then their mirrors with flips) and scores the centre windows of the eval
images; the result must be the kernel of those crops written out explicitly.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from torchvision.transforms.v2 import functional as TF

from neural_kernels.architectures import spec_network
from neural_kernels.cli import main
from neural_kernels.data.rows import centre_crops, random_crops
from neural_kernels.errors import DataError, NeuralKernelsError
from neural_kernels.kernels.analytic import analytic_kernel
from neural_kernels.kernels.estimate import estimate_kernel
from neural_kernels.kernels.inputs import ImageRows, KernelInputs
from neural_kernels.kernels.merge import merge_shards
from neural_kernels.kernels.stage import analytic_files, estimate_shard
from neural_kernels.settings import AnalyticSettings, EstimateSettings, KernelSpec
from neural_kernels.solvers.flow import flow_path, one_hot_targets

SPEC = KernelSpec("myrtle5", flips=True, crop=6, copies=2, crop_seed=7)
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def splits(tmp_path_factory) -> dict:
    """Digits (8x8x1, scaled) split 24 / 8 / 6, written as .npy files."""
    root = tmp_path_factory.mktemp("crops")
    data = load_digits()
    x = (data.images[:38, :, :, None] / 16.0).astype(np.float64)
    y = data.target[:38]
    parts = {"train": slice(0, 24), "val": slice(24, 32), "test": slice(32, 38)}
    out = {"root": root}
    for split, rows in parts.items():
        np.save(root / f"{split}.npy", x[rows])
        np.save(root / f"{split}_labels.npy", y[rows])
        out[split], out[f"{split}_labels"] = x[rows], y[rows]
    return out


def explicit_rows(images: np.ndarray, stream: int) -> np.ndarray:
    """The fitted rows of SPEC written out: copy 0, copy 1, then all their mirrors."""
    crops = random_crops(len(images), 8, 8, 6, SPEC.copies, SPEC.crop_seed, stream, "test")
    windows = [
        np.stack([img[r : r + 6, c : c + 6] for img, (r, c) in zip(images, offsets, strict=True)])
        for offsets in crops.offsets
    ]
    unmirrored = np.concatenate(windows)
    return np.concatenate([unmirrored, unmirrored[:, :, ::-1]])


def explicit_inputs(splits: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fitted rows (train, then val: streams 0 and 1), centre-cropped val and test."""
    fitted = np.concatenate([explicit_rows(splits["train"], 0), explicit_rows(splits["val"], 1)])
    return fitted, splits["val"][:, 1:7, 1:7], splits["test"][:, 1:7, 1:7]


def test_random_crops_are_seeded_reproducible_and_inside_the_image():
    a = random_crops(500, 64, 64, 56, 3, seed=1, stream=0, what="x")
    b = random_crops(500, 64, 64, 56, 3, seed=1, stream=0, what="x")
    np.testing.assert_array_equal(a.offsets, b.offsets)
    assert a.offsets.shape == (3, 500, 2) and a.offsets.min() == 0 and a.offsets.max() == 8
    for other in (
        random_crops(500, 64, 64, 56, 3, 2, 0, "x"),
        random_crops(500, 64, 64, 56, 3, 1, 1, "x"),
    ):
        assert not np.array_equal(a.offsets, other.offsets)  # another seed, another split
    # every one of the 9 x 9 corners is drawn (uniform over the windows that fit)
    assert len({tuple(o) for o in a.offsets.reshape(-1, 2)}) == 81


def test_eval_rows_are_torchvision_centre_crops(tmp_path):
    images = np.random.default_rng(0).normal(size=(3, 64, 64, 3))
    np.save(tmp_path / "x.npy", images)
    for size in (56, 49, 7):
        rows = ImageRows(
            tmp_path / "x.npy", crop=lambda n, h, w, s=size: centre_crops(n, h, w, s, "x")
        )
        expected = TF.center_crop(torch.from_numpy(images).permute(0, 3, 1, 2), [size, size])
        np.testing.assert_array_equal(rows[0:3], expected.permute(0, 2, 3, 1).numpy())


@pytest.mark.parametrize("method", ["analytic", "estimate"])
def test_a_crop_augmented_kernel_equals_the_kernel_of_explicit_crops(splits, tmp_path, method):
    root = splits["root"]
    # val is fitted (random crops); its centre crops are scored as well, unasked
    inputs = KernelInputs(root / "train.npy", {"test": root / "test.npy"}, val=root / "val.npy")
    fitted, val, test = explicit_inputs(splits)
    net = spec_network(SPEC)
    if method == "analytic":
        record = analytic_files(
            inputs, tmp_path / "k", SPEC, AnalyticSettings(), device="cpu", progress=False
        )
        expected = {
            "train": analytic_kernel(net, fitted, device="cpu", progress=False),
            "val": analytic_kernel(net, fitted, val, device="cpu", progress=False),
            "test": analytic_kernel(net, fitted, test, device="cpu", progress=False),
        }
        atol = 1e-12
    else:
        settings = EstimateSettings(width=8, networks=8, chunk_networks=4, seed=3)
        estimate_shard(inputs, tmp_path / "s", SPEC, settings, device="cpu", progress=False)
        record = merge_shards([tmp_path / "s"], tmp_path / "k")
        together = np.concatenate([fitted, val, test])
        full = estimate_kernel(net, together, None, settings, device=CPU, progress=False)
        n, m = len(fitted), len(val)
        expected = {"train": full[:n, :n], "val": full[n : n + m, :n], "test": full[n + m :, :n]}
        atol = 1e-6  # float32 features, batched differently
    for name, block in expected.items():
        np.testing.assert_allclose(
            np.load(tmp_path / "k" / f"{name}.npy"), block, rtol=0, atol=atol
        )
    assert (record["crop"], record["copies"], record["crop_seed"]) == (6, 2, 7)
    layout = record["inputs"]["train"]["layout"]
    assert [(s["split"], s["mirrored"], s["copy"]) for s in layout[:4]] == [
        ("train", False, 0), ("train", False, 1), ("train", True, 0), ("train", True, 1),
    ]  # fmt: skip
    assert layout[-1]["stop"] == len(fitted) == 4 * (24 + 8)
    assert record["inputs"]["image_shape"] == [6, 6, 1]


def test_a_crop_larger_than_the_images_is_a_clear_error_before_anything_runs(
    splits, tmp_path, capsys
):
    root = splits["root"]
    code = main(
        ["kernel-analytic", "--arch", "myrtle5", "--crop", "9", "--device", "cpu",
         "--train", str(root / "train.npy"), "--eval", f"test={root / 'test.npy'}",
         "--out-dir", str(tmp_path / "out" / "k")]
    )  # fmt: skip
    assert code == 1
    assert "crop 9x9 does not fit the 8x8 images" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # no output, no resume directory


def test_solve_selects_on_val_centre_crops_and_refits_on_every_crop(splits, tmp_path, capsys):
    root = splits["root"]
    kernel = tmp_path / "kernel"
    assert main(
        ["-q", "kernel-analytic", "--arch", "myrtle5", "--crop", "6", "--copies", "2",
         "--flips", "--crop-seed", "7", "--device", "cpu", "--train", str(root / "train.npy"),
         "--val", str(root / "val.npy"), "--eval", f"val={root / 'val.npy'}",
         "--eval", f"test={root / 'test.npy'}", "--out-dir", str(kernel)]
    ) == 0  # fmt: skip
    labels = [f"{split}={root / f'{split}_labels.npy'}" for split in ("train", "val", "test")]
    assert main(
        ["-q", "solve", "--kernel-dir", str(kernel), "--labels", *labels, "--method", "flow",
         "--eta-t", "1", "100", "10000", "--device", "cpu", "--out-dir", str(tmp_path / "solve")]
    ) == 0  # fmt: skip
    capsys.readouterr()
    metrics = json.loads((tmp_path / "solve" / "metrics.json").read_text())
    assert metrics["fitted_rows"] == {"selection": 4 * 24, "refit": 4 * 32}
    assert metrics["kernel"]["crop"] == 6 and metrics["kernel"]["copies"] == 2
    # selection by hand: the flow on the 96 train rows, scored on val's centre crops
    block = torch.from_numpy(np.load(kernel / "train.npy")[:96, :96])
    targets = torch.from_numpy(one_hot_targets(np.tile(splits["train_labels"], 4), 10))
    val_block = np.load(kernel / "val.npy")[:, :96]
    for (eta_t, scores), point in zip(
        flow_path(block, targets, {"val": val_block}, (1.0, 100.0, 10000.0)),
        metrics["grid"],
        strict=True,
    ):
        accuracy = float((scores["val"].argmax(1).numpy() == splits["val_labels"]).mean())
        assert point["eta_t"] == eta_t and point["accuracy"]["val"] == accuracy


@pytest.mark.parametrize(("arch", "side", "crop"), [("myrtle11", 64, 56), ("myrtle15", 224, 196)])
def test_the_thesis_crops_run_at_their_size(tmp_path, arch, side, crop):
    # Myrtle11 at 56 pools to 28, 14, 7; Myrtle15 at 196 to 98, 49, 24 (the odd side
    # drops its last row and column), 12, 6: both give a kernel with a unit diagonal.
    np.save(tmp_path / "x.npy", np.random.default_rng(0).normal(size=(3, side, side, 3)))
    spec = KernelSpec(arch, crop=crop)
    inputs = KernelInputs(tmp_path / "x.npy", {"test": tmp_path / "x.npy"})
    settings = EstimateSettings(width=2, networks=1, chunk_networks=1, batch_size=3)
    estimate_shard(inputs, tmp_path / "s", spec, settings, device="cpu", progress=False)
    record = merge_shards([tmp_path / "s"], tmp_path / "k")
    assert record["inputs"]["image_shape"] == [crop, crop, 3]
    np.testing.assert_allclose(np.diag(np.load(tmp_path / "k" / "train.npy")), 1.0, atol=1e-12)
    assert np.load(tmp_path / "k" / "test.npy").shape == (3, 3)


def test_rows_slice_across_copies_and_mirrors_and_reject_mismatched_splits(splits, tmp_path):
    root = splits["root"]
    crop = lambda n, h, w: random_crops(n, h, w, 6, 2, 7, 0, "x")  # noqa: E731
    rows = ImageRows(root / "train.npy", np.array([5, 0, 3]), flips=True, crop=crop)
    everything = rows[0 : len(rows)]
    assert everything.shape == (12, 6, 6, 1)
    for start, stop in [(2, 5), (5, 8), (0, 12), (7, 7), (9, 3)]:
        np.testing.assert_array_equal(rows[start:stop], everything[start:stop])
    np.save(tmp_path / "big.npy", np.zeros((4, 10, 10, 1)))
    inputs = KernelInputs(root / "train.npy", {"test": tmp_path / "big.npy"})
    with pytest.raises(
        DataError, match=r"test has images of shape \(10, 10, 1\), train \(8, 8, 1\)"
    ):
        analytic_files(inputs, tmp_path / "k", SPEC, device="cpu", progress=False)
    with pytest.raises(NeuralKernelsError, match="copies and crop_seed concern crops"):
        KernelSpec("myrtle5", copies=2)


def test_a_kernel_without_crops_records_what_it_did_before(splits, tmp_path):
    root = splits["root"]
    inputs = KernelInputs(root / "train.npy", {"test": root / "test.npy"})
    settings = EstimateSettings(width=2, networks=1, chunk_networks=1)
    estimate_shard(
        inputs, tmp_path / "s", KernelSpec("myrtle5"), settings, device="cpu", progress=False
    )
    record = merge_shards([tmp_path / "s"], tmp_path / "k")
    assert not {"crop", "copies", "crop_seed"} & record.keys()
    assert "copy" not in record["inputs"]["train"]["layout"][0]
