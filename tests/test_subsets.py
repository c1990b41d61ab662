"""Class-balanced subsets and seeded hold-outs."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from neural_kernels.data import load_split, prepare_dataset, write_subset
from neural_kernels.data.prepared import subset_files
from neural_kernels.data.splits import balanced_subset, stratified_holdout
from neural_kernels.errors import DataError


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "digits"
    prepare_dataset("digits", out)
    return out


def test_balanced_subset_counts_and_determinism():
    labels = np.repeat(np.arange(10), [50, 60, 70, 80, 90, 100, 110, 120, 130, 140])
    rows = balanced_subset(labels, 1280 // 20, seed=4)
    assert len(set(rows.tolist())) == 64
    counts = np.bincount(labels[rows], minlength=10)
    assert counts.min() == 6 and counts.max() == 7 and counts.sum() == 64
    np.testing.assert_array_equal(rows, balanced_subset(labels, 64, seed=4))
    assert not np.array_equal(np.sort(rows), np.sort(balanced_subset(labels, 64, seed=5)))


def test_balanced_subset_errors():
    labels = np.repeat(np.arange(3), [2, 10, 10])
    with pytest.raises(DataError, match="class 0 has 2 training images"):
        balanced_subset(labels, 12, seed=0)
    with pytest.raises(DataError, match="at least one image of each of the 3 classes"):
        balanced_subset(labels, 2, seed=0)


def test_stratified_holdout_errors_name_the_fix():
    with pytest.raises(DataError, match="smallest class has 1 images"):
        stratified_holdout(np.array([0, 0, 0, 1]), 0.5, seed=0)
    with pytest.raises(DataError, match="strictly between 0 and 1"):
        stratified_holdout(np.array([0, 1]), 1.0, seed=0)


def test_write_subset_maps_back_to_parent(digits, tmp_path):
    out = tmp_path / "n100-seed0"
    meta = write_subset(digits, 100, 0, out)
    assert sorted(p.name for p in out.iterdir()) == sorted(subset_files())
    assert meta["splits"]["train"]["class_counts"] == [10] * 10
    parent = load_split(digits, "train")
    rows = np.load(out / "train_indices.npy")
    np.testing.assert_array_equal(np.load(out / "train_images.npy"), parent.images[rows])
    np.testing.assert_array_equal(np.load(out / "train_labels.npy"), parent.labels[rows])
    again = write_subset(digits, 100, 0, tmp_path / "again")
    np.testing.assert_array_equal(rows, np.load(tmp_path / "again" / "train_indices.npy"))
    assert again["splits"] == meta["splits"]


def test_subset_larger_than_train_split(digits, tmp_path):
    with pytest.raises(DataError, match="larger than the"):
        write_subset(digits, 100_000, 0, tmp_path / "big")
    assert not (tmp_path / "big").exists()


def test_subset_of_unprepared_directory(tmp_path):
    with pytest.raises(DataError, match="meta.json is missing"):
        write_subset(tmp_path, 10, 0, tmp_path / "out")


def test_cli_prepare_and_subset(tmp_path):
    def run(*args):
        return subprocess.run(
            [sys.executable, "-m", "neural_kernels", "-q", *args],
            capture_output=True, text=True, check=False,
        )  # fmt: skip

    data = tmp_path / "digits"
    result = run("prepare", "--source", "digits", "--out", str(data), "--val-fraction", "0.2")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"train": 1149, "val": 288, "test": 360}
    result = run(
        "subset", "--data", str(data), "--size", "50", "--seed", "1", "--out", str(tmp_path / "s")
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["class_counts"] == [5] * 10
    result = run("prepare", "--source", "digits", "--out", str(data), "--val-fraction", "1.5")
    assert result.returncode == 2 and "not strictly between 0 and 1" in result.stderr
    result = run("prepare", "--source", "cifar10", "--out", str(tmp_path / "c"))
    assert result.returncode == 1 and "needs --archive" in result.stderr


@pytest.mark.parametrize("command", ["sources", "download", "prepare", "subset", "zca"])
def test_every_subcommand_documents_itself(command):
    result = subprocess.run(
        [sys.executable, "-m", "neural_kernels", command, "--help"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 0 and "usage: neural-kernels" in result.stdout
