"""Each real archive format, in miniature: served, downloaded, verified, converted."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from miniature import make_cifar10, make_imagenet_r, make_tiny_imagenet
from neural_kernels.data import download_file, load_meta, load_split, prepare_dataset
from neural_kernels.data.prepared import SPLITS, prepared_files
from neural_kernels.errors import ChecksumError, DataError


def md5_of(path) -> str:
    return "md5:" + hashlib.md5(path.read_bytes()).hexdigest()


def fetch(server, name, tmp_path):
    """Download a served archive through the real code path."""
    served = server.root / name
    return download_file(server.url(name), tmp_path / "resources" / name, md5_of(served)), md5_of(
        served
    )


def rows_of(images: np.ndarray) -> set[bytes]:
    return {row.tobytes() for row in images}


def assert_prepared(out, n_total: int, num_classes: int):
    assert sorted(p.name for p in out.iterdir()) == sorted(prepared_files())
    meta = load_meta(out)
    assert sum(meta["splits"][s]["size"] for s in SPLITS) == n_total
    for split in SPLITS:
        data = load_split(out, split)
        assert isinstance(data.images, np.memmap) and data.images.dtype == np.uint8
        assert data.labels.dtype == np.int64 and len(data.labels) == meta["splits"][split]["size"]
        counts = np.bincount(data.labels, minlength=num_classes).tolist()
        assert counts == meta["splits"][split]["class_counts"]
    return meta


def test_cifar10_archive(archive_server, tmp_path):
    expected = make_cifar10(archive_server.root / "cifar-10-python.tar.gz")
    archive, checksum = fetch(archive_server, "cifar-10-python.tar.gz", tmp_path)
    out = tmp_path / "data" / "cifar10"
    meta = prepare_dataset(
        "cifar10", out, archive=archive, val_fraction=0.2, seed=3, checksum=checksum
    )
    assert_prepared(out, 130, 10)
    assert meta["classes"] == expected["classes"] and meta["official_test_split"]
    assert meta["image_shape"] == [32, 32, 3] and meta["checksum"] == checksum
    test = load_split(out, "test")
    np.testing.assert_array_equal(test.images, expected["test_images"])
    np.testing.assert_array_equal(test.labels, expected["test_labels"])
    train, val = load_split(out, "train"), load_split(out, "val")
    assert len(val.labels) == 20 and np.bincount(val.labels).tolist() == [2] * 10
    # train + val is exactly the official training set, image with its label.
    pairs = {(img.tobytes(), int(lab)) for img, lab in zip(train.images, train.labels, strict=True)}
    pairs |= {(img.tobytes(), int(lab)) for img, lab in zip(val.images, val.labels, strict=True)}
    want = {
        (img.tobytes(), int(lab))
        for img, lab in zip(expected["train_images"], expected["train_labels"], strict=True)
    }
    assert pairs == want


def test_tiny_imagenet_archive(archive_server, tmp_path):
    expected = make_tiny_imagenet(archive_server.root / "tiny-imagenet-200.zip")
    archive, checksum = fetch(archive_server, "tiny-imagenet-200.zip", tmp_path)
    out = tmp_path / "data" / "tiny"
    meta = prepare_dataset(
        "tiny_imagenet", out, archive=archive, val_fraction=0.25, seed=0, checksum=checksum
    )
    assert_prepared(out, expected["n_train"] + len(expected["test_labels"]), 4)
    assert meta["classes"] == expected["classes"] and meta["wnids"] == expected["wnids"]
    assert meta["image_shape"] == [64, 64, 3]
    # Official val (labels from val_annotations.txt) is our test split, kept in order.
    test = load_split(out, "test")
    np.testing.assert_array_equal(test.labels, expected["test_labels"])
    colours = test.images[:, 32, 32].astype(int)
    assert np.abs(colours - expected["test_colours"].astype(int)).max() <= 3
    assert meta["splits"]["train"]["size"] + meta["splits"]["val"]["size"] == expected["n_train"]
    assert not list((tmp_path / "data").glob(".*partial*"))


def test_imagenet_r_archive_is_resized_and_split_9_to_1(archive_server, tmp_path):
    expected = make_imagenet_r(archive_server.root / "imagenet-r.tar")
    archive, checksum = fetch(archive_server, "imagenet-r.tar", tmp_path)
    out = tmp_path / "data" / "imr"
    meta = prepare_dataset(
        "imagenet_r",
        out,
        archive=archive,
        image_size=16,
        test_fraction=0.1,
        val_fraction=1 / 9,
        seed=1,
        checksum=checksum,
    )
    assert_prepared(out, expected["n"], 3)
    assert meta["image_shape"] == [16, 16, 3] and meta["image_size"] == 16
    assert meta["classes"] == expected["classes"]
    assert meta["splits"]["test"]["class_counts"] == [1, 1, 1]  # stratified 9:1
    again = tmp_path / "data" / "imr2"
    prepare_dataset(
        "imagenet_r", again, archive=archive, image_size=16, test_fraction=0.1,
        val_fraction=1 / 9, seed=1,
    )  # fmt: skip
    for split in SPLITS:  # seeded: the same split twice
        np.testing.assert_array_equal(
            load_split(out, split).images, load_split(again, split).images
        )


def test_digits_split_is_stratified_and_seeded(tmp_path):
    a = prepare_dataset("digits", tmp_path / "a", val_fraction=0.1, test_fraction=0.2, seed=0)
    b = prepare_dataset("digits", tmp_path / "b", val_fraction=0.1, test_fraction=0.2, seed=0)
    prepare_dataset("digits", tmp_path / "c", val_fraction=0.1, test_fraction=0.2, seed=1)
    assert_prepared(tmp_path / "a", 1797, 10)
    assert a["splits"] == b["splits"]
    assert a["image_shape"] == [8, 8, 1] and not a["official_test_split"]
    train = load_split(tmp_path / "a", "train").images
    test = load_split(tmp_path / "a", "test").images
    assert train.max() == 255 and train.min() == 0
    np.testing.assert_array_equal(train, load_split(tmp_path / "b", "train").images)
    assert not np.array_equal(test, load_split(tmp_path / "c", "test").images)
    # Stratified: every class keeps its share (to within one image) in the test split.
    assert a["splits"]["test"]["size"] == 360
    totals = np.sum([a["splits"][s]["class_counts"] for s in SPLITS], axis=0)
    assert np.abs(np.array(a["splits"]["test"]["class_counts"]) - 0.2 * totals).max() <= 1


def test_prepared_splits_are_disjoint(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(200, 4, 4, 3), dtype=np.uint8)
    npz = tmp_path / "mine.npz"
    np.savez(npz, images=images, labels=np.arange(200) % 4, classes=np.array(list("abcd")))
    meta = prepare_dataset("custom", tmp_path / "out", npz=npz, val_fraction=0.25, seed=5)
    seen = [rows_of(load_split(tmp_path / "out", s).images) for s in SPLITS]
    assert set.union(*seen) == rows_of(images) and sum(map(len, seen)) == 200
    assert meta["classes"] == ["a", "b", "c", "d"]


def test_custom_npz_with_test_split_and_greyscale(tmp_path):
    npz = tmp_path / "mine.npz"
    np.savez(
        npz,
        images=np.zeros((40, 5, 5), np.uint8),
        labels=np.arange(40) % 2,
        test_images=np.ones((6, 5, 5), np.int32),
        test_labels=np.array([0, 1, 0, 1, 0, 1]),
    )
    meta = prepare_dataset("custom", tmp_path / "out", npz=npz, val_fraction=0.5)
    assert meta["image_shape"] == [5, 5, 1] and meta["official_test_split"]
    assert meta["splits"]["test"]["size"] == 6 and meta["splits"]["val"]["size"] == 20


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"images": np.zeros((4, 2, 2), np.uint8)}, "missing key 'labels'"),
        ({"images": np.zeros((4, 2, 2)), "labels": np.zeros(4, int)}, "expected uint8 pixels"),
        ({"images": np.zeros((4, 2, 2), np.uint8), "labels": np.zeros(3, int)}, "one label per"),
        ({"images": np.zeros((4, 2, 2), np.uint8), "labels": -np.ones(4, int)}, "negative"),
        ({"images": np.zeros((4, 2, 2), np.uint8), "labels": np.zeros(4)}, "integer class ids"),
        ({"images": np.zeros(4, np.uint8), "labels": np.zeros(4, int)}, r"\(N, H, W, C\)"),
        ({"images": np.zeros((4, 2, 2), np.uint8), "labels": np.zeros(4, int), "x": 1}, "unknown"),
        (
            {"images": np.zeros((4, 2, 2), np.uint8), "labels": np.zeros(4, int),
             "test_images": np.zeros((1, 2, 2), np.uint8)},
            "both 'test_images' and 'test_labels'",
        ),
    ],
)  # fmt: skip
def test_malformed_npz_is_rejected_cleanly(tmp_path, arrays, message):
    npz = tmp_path / "bad.npz"
    np.savez(npz, **arrays)
    out = tmp_path / "out"
    with pytest.raises(DataError, match=message) as info:
        prepare_dataset("custom", out, npz=npz)
    assert str(npz) in str(info.value)
    assert list(out.iterdir()) == [] and [p.name for p in tmp_path.iterdir()] == ["bad.npz", "out"]


def test_not_an_npz_file(tmp_path):
    npz = tmp_path / "bad.npz"
    npz.write_bytes(b"PK\x03\x04 this is not really a zip")
    with pytest.raises(DataError, match="not a readable .npz"):
        prepare_dataset("custom", tmp_path / "out", npz=npz)


def test_truncated_archive_is_rejected_and_leaves_nothing(tmp_path):
    archive = tmp_path / "cifar-10-python.tar.gz"
    make_cifar10(archive)
    good = md5_of(archive)
    archive.write_bytes(archive.read_bytes()[:5000])
    out = tmp_path / "out"
    with pytest.raises(ChecksumError, match="truncated or not the expected archive"):
        prepare_dataset("cifar10", out, archive=archive, checksum=good)
    with pytest.raises(DataError, match="cifar-10-python.tar.gz: unreadable archive"):
        prepare_dataset("cifar10", out, archive=archive)  # no checksum: the reader notices
    assert list(out.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cifar-10-python.tar.gz", "out"]


def test_missing_archive(tmp_path):
    with pytest.raises(DataError, match="does not exist: download it first"):
        prepare_dataset("cifar10", tmp_path / "out", archive=tmp_path / "nope.tar.gz")


def test_wrong_archive_for_source(tmp_path):
    archive = tmp_path / "imagenet-r.tar"
    make_imagenet_r(archive)
    with pytest.raises(DataError, match="Is this the CIFAR-10"):
        prepare_dataset("cifar10", tmp_path / "out", archive=archive)


def test_failed_rerun_keeps_the_previous_good_output(tmp_path):
    out = tmp_path / "out"
    prepare_dataset("digits", out)
    before = (out / "meta.json").read_text()
    npz = tmp_path / "bad.npz"
    np.savez(npz, images=np.zeros((4, 2, 2)), labels=np.zeros(4, int))
    with pytest.raises(DataError):
        prepare_dataset("custom", out, npz=npz)
    assert (out / "meta.json").read_text() == before
    assert json.loads(before)["source"] == "digits"
