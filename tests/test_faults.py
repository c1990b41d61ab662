"""Fault injection: every long stage killed part way (SIGKILL, as a cluster's time limit
or an OOM killer does), then rerun, equals an uninterrupted run.

Each stage runs as the workflow runs it, ``python -m neural_kernels <stage>``; the kill
comes when the stage has visibly done part of its work (finished blocks in the resume
memory map, a checkpoint, a progress bar, a scratch directory). After the kill no
output exists; the rerun resumes where the stage can (analytic blocks, training
epochs) and leaves no scratch behind.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.metrics.pairwise import rbf_kernel

from conftest import prepared_digits

STAGE = [sys.executable, "-m", "neural_kernels"]


def run(args: list[str]) -> subprocess.CompletedProcess:
    result = subprocess.run([*STAGE, *args], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def kill_part_way(args: list[str], started: Callable[[Path], bool], log: Path) -> None:
    """Run the stage, SIGKILL it once ``started(log)`` holds (its stderr in ``log``)."""
    with log.open("w") as stderr:
        process = subprocess.Popen([*STAGE, *args], stdout=subprocess.DEVNULL, stderr=stderr)
        deadline = time.monotonic() + 300
        while not started(log):
            assert process.poll() is None, "the stage finished before it could be killed"
            assert time.monotonic() < deadline, "the stage never got under way"
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
        process.wait()


def no_scratch(root: Path) -> bool:
    return not list(root.rglob(".*.partial-*")) and not list(root.rglob(".*.resume"))


def npy_files(directory: Path) -> dict[str, np.ndarray]:
    return {p.name: np.load(p) for p in sorted(directory.glob("*.npy"))}


def assert_same_arrays(a: Path, b: Path) -> None:
    ours, theirs = npy_files(a), npy_files(b)
    assert ours.keys() == theirs.keys() and ours
    for name in ours:
        np.testing.assert_array_equal(ours[name], theirs[name], err_msg=name)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    """Whitened-like float32 digits (train 96, val 16, test 24) and raw uint8 splits."""
    root = tmp_path_factory.mktemp("images")
    x = load_digits().images[:136, :, :, None] / 16.0
    x = ((x - x.mean(0)) / x.std()).astype(np.float32)
    paths = {}
    for name, rows in (("train", x[:96]), ("val", x[96:112]), ("test", x[112:136])):
        paths[name] = root / f"{name}_images.npy"
        np.save(paths[name], rows)
    # CIFAR-sized raw images: the exact ZCA of 3072 features takes seconds to fit and
    # seconds to write (the kill lands while it writes)
    rng = np.random.default_rng(0)
    for name, n in (("raw_train", 7000), ("raw_val", 1000), ("raw_test", 3000)):
        paths[name] = root / name / f"{name.removeprefix('raw_')}_images.npy"
        paths[name].parent.mkdir()
        np.save(paths[name], rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8))
    return paths


def test_killed_analytic_kernel_resumes_to_the_same_blocks(images, tmp_path):
    args = [
        "kernel-analytic", "--arch", "myrtle10", "--precision", "float64",
        "--block-size", "2", "--train", str(images["train"]), "--val", str(images["val"]),
        "--eval", f"test={images['test']}", "--device", "cpu",
    ]  # fmt: skip
    run([*args, "--out-dir", str(tmp_path / "whole")])
    mask = tmp_path / ".out.resume" / "train.done.npy"

    def some_blocks_done(_: Path) -> bool:
        try:  # the mask may be caught while its header is being written
            return np.load(mask, mmap_mode="r").sum() >= 20
        except (OSError, ValueError):
            return False

    kill_part_way([*args, "--out-dir", str(tmp_path / "out")], some_blocks_done, tmp_path / "log")
    assert not (tmp_path / "out" / "kernel.json").exists()
    done = int(np.load(mask).sum())
    rerun = run([*args, "--out-dir", str(tmp_path / "out")])
    assert f"resuming train: {done} of" in rerun.stderr
    assert_same_arrays(tmp_path / "out", tmp_path / "whole")
    assert no_scratch(tmp_path)


def test_killed_estimate_shard_reruns_to_the_same_sums(images, tmp_path):
    args = [
        "kernel-shard", "--arch", "myrtle10", "--width", "8", "--networks", "600",
        "--chunk-networks", "4", "--train", str(images["train"]),
        "--eval", f"test={images['test']}", "--device", "cpu",
    ]  # fmt: skip
    run([*args, "--out-dir", str(tmp_path / "whole")])

    def under_way(log: Path) -> bool:  # its progress bar has moved past 0 chunks
        return re.search(r"\| *[1-9]\d*/150 \[", log.read_text()) is not None

    kill_part_way([*args, "--out-dir", str(tmp_path / "out")], under_way, tmp_path / "log")
    assert not list((tmp_path / "out").glob("[!.]*"))
    run([*args, "--out-dir", str(tmp_path / "out")])
    assert_same_arrays(tmp_path / "out", tmp_path / "whole")
    assert no_scratch(tmp_path)


def test_killed_zca_reruns_to_the_same_whitening(images, tmp_path):
    inputs = [str(images[f"raw_{split}"]) for split in ("train", "val", "test")]
    args = ["zca", *inputs, "--fit-on", "2", "--device", "cpu"]
    run([*args, "--out-dir", str(tmp_path / "whole")])

    def writing(_: Path) -> bool:  # fitted; whitening into the scratch directory
        return any(tmp_path.glob("out/.out.partial-*/*.npy"))

    kill_part_way([*args, "--out-dir", str(tmp_path / "out")], writing, tmp_path / "log")
    assert not list((tmp_path / "out").glob("[!.]*"))
    assert list(tmp_path.glob("out/.out.partial-*"))  # what kill -9 leaves ...
    run([*args, "--out-dir", str(tmp_path / "out")])
    assert_same_arrays(tmp_path / "out", tmp_path / "whole")
    assert no_scratch(tmp_path)  # ... the rerun removes


@pytest.fixture(scope="module")
def kernel_dir(tmp_path_factory) -> tuple[Path, list[str]]:
    """An RBF kernel of 1500 digits in the full split's layout, and its label options."""
    root = tmp_path_factory.mktemp("kernel")
    data = load_digits()
    x, y = data.data[:1797] / 16.0, data.target[:1797]
    k = rbf_kernel(x, x[:1500], gamma=0.05)
    (root / "k").mkdir()
    np.save(root / "k" / "train.npy", k[:1500])
    np.save(root / "k" / "test.npy", k[1500:])
    layout = [
        {"split": "train", "start": 0, "stop": 1300, "mirrored": False},
        {"split": "val", "start": 1300, "stop": 1500, "mirrored": False},
    ]
    record = {"method": "analytic", "inputs": {"train": {"rows": 1500, "layout": layout}}}
    (root / "k" / "kernel.json").write_text(json.dumps(record))
    labels = []
    for split, rows in (("train", y[:1300]), ("val", y[1300:1500]), ("test", y[1500:])):
        np.save(root / f"{split}_labels.npy", rows)
        labels.append(f"{split}={root / f'{split}_labels.npy'}")
    return root / "k", labels


def test_killed_solve_reruns_to_the_same_predictions(kernel_dir, tmp_path):
    directory, labels = kernel_dir
    args = ["solve", "--kernel-dir", str(directory), "--method", "boosting"]
    args += ["--batch-size", "100", "--steps", "20", "--eta-t", *map(str, np.logspace(1, 5, 9))]
    args += ["--device", "cpu", "--labels", *labels]
    run([*args, "--out-dir", str(tmp_path / "whole")])

    def under_way(log: Path) -> bool:  # the boosting steps' progress bar has moved
        return re.search(r"boosting: +[1-9]\d*%", log.read_text()) is not None

    kill_part_way([*args, "--out-dir", str(tmp_path / "out")], under_way, tmp_path / "log")
    assert not list((tmp_path / "out").glob("[!.]*"))
    run([*args, "--out-dir", str(tmp_path / "out")])
    with (
        np.load(tmp_path / "out/predictions.npz") as a,
        np.load(tmp_path / "whole/predictions.npz") as b,
    ):  # noqa: E501
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    metrics = [json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("out", "whole")]
    assert metrics[0]["test_accuracy"] == metrics[1]["test_accuracy"]
    assert no_scratch(tmp_path)


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory) -> Path:
    return prepared_digits(tmp_path_factory.mktemp("small"), 600)


def test_killed_training_resumes_from_its_checkpoint(small_dataset, tmp_path):
    args = [
        "train", "--data", str(small_dataset), "--model", "myrtle5", "--width", "16",
        "--epochs", "12", "--batch-size", "32", "--deterministic", "--device", "cpu",
    ]  # fmt: skip
    run([*args, "--out-dir", str(tmp_path / "whole")])
    checkpoint = tmp_path / ".out.resume" / "checkpoint.pt"
    kill_part_way(
        [*args, "--out-dir", str(tmp_path / "out")], lambda _: checkpoint.exists(), tmp_path / "log"
    )
    assert not list((tmp_path / "out").glob("[!.]*"))
    run([*args, "--out-dir", str(tmp_path / "out")])
    result = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert 1 <= result["resumed_from_epoch"] < 12
    whole = json.loads((tmp_path / "whole" / "metrics.json").read_text())
    assert result["test_accuracy"] == whole["test_accuracy"]
    states = [
        torch.load(tmp_path / d / "model.pt", weights_only=True)["state_dict"]
        for d in ("out", "whole")
    ]
    torch.testing.assert_close(states[0], states[1], rtol=0, atol=0)
    assert no_scratch(tmp_path)


def test_only_a_dead_runs_scratch_on_this_host_is_removed(tmp_path, monkeypatch):
    """staged_directory removes what a killed run left (this host, its PID gone), never
    a live run's, nor another host's (on a shared file system)."""
    from neural_kernels import outputs

    monkeypatch.setattr(outputs.socket, "gethostname", lambda: "node1")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    alive = str(os.getpid())
    names = {
        "dead": f".out.partial-node1-{dead}-abc",
        "alive": f".out.partial-node1-{alive}-abc",
        "other host": f".out.partial-node1-2-{dead}-abc",  # host 'node1-2', not node1
        "other output": f".out2.partial-node1-{dead}-abc",
    }
    for name in names.values():  # scratch lives inside the output directory
        (tmp_path / "out" / name).mkdir(parents=True)
    with outputs.staged_directory(tmp_path / "out") as stage:
        (stage / "x.txt").write_text("x")
    left = {path.name for path in (tmp_path / "out").iterdir()}
    assert names["dead"] not in left
    assert {names["alive"], names["other host"], names["other output"]} <= left
    assert (tmp_path / "out" / "x.txt").read_text() == "x"
