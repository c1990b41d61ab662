"""Every failure a sentence: full and read-only disks, a mount point as the output,
degenerate data, records that disagree with their blocks, options that do not apply,
and Ctrl-C.

Each case runs the command-line entry point (in process, or as its own process where a
signal or a capped filesystem is involved) and checks the contract: exit status 1, one
``error: ...`` line on stderr (no traceback), and nothing half-written. The disk cases
mount small tmpfs filesystems and skip, saying why, where mounting is not allowed.
"""

from __future__ import annotations

import errno
import json
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml
from sklearn.datasets import load_digits
from sklearn.metrics.pairwise import rbf_kernel
from test_solvers import write_kernel_dir

from neural_kernels import outputs, plan
from neural_kernels.cli import main
from neural_kernels.errors import NeuralKernelsError

STAGE = [sys.executable, "-m", "neural_kernels"]


def refused(args: list[str], capsys, message: str) -> str:
    """``main(args)`` exits 1 with one ``error:`` line holding ``message`` (last, after
    any progress bars) and no traceback."""
    assert main(["-q", *args]) == 1
    lines = capsys.readouterr().err.strip().splitlines()  # after any progress bars
    err = lines[-1] if lines else ""
    assert err.startswith("error: ") and sum(line.startswith("error") for line in lines) == 1
    assert "Traceback" not in "\n".join(lines) and message in err, lines
    return err


def no_outputs(directory: Path) -> bool:
    """Nothing but (removed) scratch: no visible file in ``directory``."""
    return not directory.exists() or not [p for p in directory.rglob("*") if p.is_file()]


@pytest.fixture(scope="module")
def digits() -> dict:
    """Whitened-like 8x8 digits (train 40, val 10, test 10) and an RBF kernel problem."""
    data = load_digits()
    x = data.images[:60, :, :, None] / 16.0
    x = ((x - x.mean(0)) / x.std()).astype(np.float32)
    flat, y = data.data[:200] / 16.0, data.target[:200]
    k = rbf_kernel(flat, flat[:120], gamma=0.05)
    problem = {
        "train": k[:120, :120],
        "val": k[120:160, :120],
        "test": k[160:, :120],
        "y": {"train": y[:120], "val": y[120:160], "test": y[160:]},
    }
    return {"images": {"train": x[:40], "val": x[40:50], "test": x[50:60]}, "problem": problem}


def save_images(root: Path, images: dict) -> dict[str, Path]:
    root.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, rows in images.items():
        paths[split] = root / f"{split}_images.npy"
        np.save(paths[split], rows)
    return paths


def labels_args(labels: dict[str, Path]) -> list[str]:
    return ["--labels", *(f"{split}={path}" for split, path in labels.items())]


# ------------------------------------------------------------------------------- disks


@pytest.fixture
def mount_tmpfs(tmp_path: Path) -> Iterator:
    """``mount(path, size, read_only=False)``: a tmpfs of ``size`` at ``path``, unmounted
    after the test; skips where mounting is not allowed."""
    mounted: list[Path] = []

    def mount(path: Path, size: str, read_only: bool = False) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        options = f"size={size}" + (",ro" if read_only else "")
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, f"nk-{uuid.uuid4().hex[:8]}", str(path)],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip()}); needs root")
        mounted.append(path)
        return path

    yield mount
    for path in reversed(mounted):
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_a_full_disk_is_refused_before_any_work(digits, tmp_path, mount_tmpfs, capsys):
    """kernel-analytic (once SIGBUS), kernel (once numpy's OSError), kernel-shard and zca
    refuse up front with both sizes: nothing computed, nothing written."""
    images = save_images(tmp_path / "in", digits["images"])
    disk = mount_tmpfs(tmp_path / "disk", "8k")
    spec = ["--arch", "myrtle5", "--device", "cpu", "--train", str(images["train"])]
    cases = {
        "kernel-analytic": ["kernel-analytic", *spec, "--out-dir", str(disk / "a")],
        "kernel-shard": ["kernel-shard", *spec, "--networks", "2", "--chunk-networks", "1",
                         "--width", "4", "--out-dir", str(disk / "s")],
        "kernel": ["kernel", "--method", "analytic", "--arch", "myrtle5", "--device", "cpu",
                   "--images", str(images["train"]), "--out", str(disk / "k" / "K.npy")],
        "zca": ["zca", str(images["train"]), "--out-dir", str(disk / "z")],
    }  # fmt: skip
    for stage, args in cases.items():
        err = refused(args, capsys, " would write 12.8 kB" if stage != "zca" else " would write")
        assert err.startswith(f"error: {stage}")
        assert "free; free space there or choose another output directory" in err
        assert no_outputs(disk), stage


def test_a_download_to_a_full_disk_is_refused_not_retried(
    archive_server, tmp_path, mount_tmpfs, capsys
):
    """The archive's Content-Length is checked against the free space; a write that
    fails anyway is a disk error, not a 'network error' retried with backoff."""
    payload = np.random.default_rng(0).bytes(64_000)
    (archive_server.root / "a.tar.gz").write_bytes(payload)
    disk = mount_tmpfs(tmp_path / "disk", "16k")
    checksum = "sha256:" + __import__("hashlib").sha256(payload).hexdigest()
    args = ["download", "--url", archive_server.url("a.tar.gz"), "--checksum", checksum]
    refused([*args, "--out", str(disk / "a.tar.gz")], capsys, "download would write 64 kB")
    assert not list(disk.iterdir()) and sum(archive_server.hits.values()) == 1


def test_a_disk_that_fills_during_a_run_is_enospc_not_sigbus(
    digits, tmp_path, mount_tmpfs, capsys, monkeypatch
):
    """Memory-mapped outputs are allocated up front: a disk filled by someone else after
    the space check gives ENOSPC naming the file, never SIGBUS on a later write."""
    disk = mount_tmpfs(tmp_path / "disk", "64k")
    with pytest.raises(OSError) as caught:
        outputs.open_memmap(disk / "K.npy", np.float64, (100, 100))  # 80 kB > 64 kB
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(disk / "K.npy")
    assert not (disk / "K.npy").exists()
    # the stage: the up-front check passes (as if the disk filled right after it)
    images = save_images(tmp_path / "in", digits["images"])
    monkeypatch.setattr(outputs, "free_bytes", lambda path: 10**12)
    args = ["kernel-analytic", "--arch", "myrtle5", "--device", "cpu"]
    args += ["--train", str(images["train"]), "--eval", f"test={images['test']}"]
    sized = np.ones((100, 8, 8, 1), np.float32)  # 100 x 100 float64 = 80 kB
    np.save(tmp_path / "in" / "big.npy", sized)
    args[args.index(str(images["train"]))] = str(tmp_path / "in" / "big.npy")
    err = refused([*args, "--out-dir", str(disk / "a")], capsys, "no space left on its")
    assert "cannot write " + str(disk) in err and "Traceback" not in err
    assert not (disk / "a").exists() or no_outputs(disk / "a")


def test_a_mount_point_is_a_working_output_directory(digits, tmp_path, mount_tmpfs, capsys):
    """Scratch lives on the output's own filesystem: a mounted output directory works
    (it once failed with 'Invalid cross-device link' after computing everything), and
    the analytic kernel's resume directory beside it is moved across."""
    images = save_images(tmp_path / "in", digits["images"])
    out = mount_tmpfs(tmp_path / "results" / "a", "16m")
    args = ["kernel-analytic", "--arch", "myrtle5", "--device", "cpu"]
    args += ["--train", str(images["train"]), "--eval", f"test={images['test']}"]
    assert main(["-q", *args, "--out-dir", str(out)]) == 0, capsys.readouterr().err
    assert main(["-q", *args, "--out-dir", str(tmp_path / "plain")]) == 0
    for name in ("train.npy", "test.npy"):
        np.testing.assert_array_equal(np.load(out / name), np.load(tmp_path / "plain" / name))
    assert not list(out.glob(".*")) and not (tmp_path / "results" / ".a.resume").exists()
    zca_out = mount_tmpfs(tmp_path / "results" / "z", "16m")
    assert main(["-q", "zca", str(images["train"]), "--out-dir", str(zca_out)]) == 0
    assert (zca_out / "zca.json").exists() and not list(zca_out.glob(".*"))


def test_a_read_only_output_is_one_sentence(digits, tmp_path, mount_tmpfs, capsys):
    images = save_images(tmp_path / "in", digits["images"])
    disk = mount_tmpfs(tmp_path / "ro", "1m", read_only=True)
    err = refused(["zca", str(images["train"]), "--out-dir", str(disk / "z")], capsys, "read-only")
    assert str(disk / "z") in err and "choose a writable output directory" in err


# ------------------------------------------------------------------------ degenerate data


def test_one_class_and_a_huge_label_are_refused(digits, tmp_path, capsys):
    """Labels of a single class (test accuracy 1.0 by construction) and a label of
    99999 (100,000 target columns for 120 rows) are refused by solve, prepare and train."""
    kernel = tmp_path / "kernel"
    labels = write_kernel_dir(kernel, digits["problem"])
    solve = ["solve", "--kernel-dir", str(kernel), "--method", "flow"]
    y = digits["problem"]["y"]
    for name, train, message in (
        ("one", np.zeros_like(y["train"]), "a classifier needs at least two classes"),
        ("huge", np.where(np.arange(120) == 7, 99999, y["train"]), "the largest label is 99999"),
    ):
        np.save(labels["train"], train)
        refused([*solve, *labels_args(labels), "--out-dir", str(tmp_path / name)], capsys, message)
        assert not (tmp_path / name).exists()
    # prepare, from a custom .npz of one class
    images = (np.load(save_images(tmp_path / "in", digits["images"])["train"]) > 0).astype(np.uint8)
    np.savez(tmp_path / "one.npz", images=images[..., 0] * 255, labels=np.zeros(40, np.int64))
    prepare = ["prepare", "--source", "custom", "--npz", str(tmp_path / "one.npz")]
    refused([*prepare, "--out", str(tmp_path / "p")], capsys, "at least two classes")
    assert no_outputs(tmp_path / "p")


def test_train_refuses_one_class(tmp_path, capsys):
    from conftest import prepared_digits

    data = prepared_digits(tmp_path, 120)
    np.save(data / "train_labels.npy", np.zeros_like(np.load(data / "train_labels.npy")))
    args = ["train", "--data", str(data), "--model", "myrtle5", "--epochs", "1", "--no-progress"]
    refused([*args, "--out-dir", str(tmp_path / "net")], capsys, "at least two classes")
    assert no_outputs(tmp_path / "net")


def test_zero_images_and_a_zca_of_one_image_are_refused(digits, tmp_path, capsys):
    images = save_images(tmp_path / "in", digits["images"])
    empty = tmp_path / "in" / "empty.npy"
    np.save(empty, np.zeros((0, 8, 8, 1), np.float32))
    refused(
        ["kernel", "--method", "estimate", "--arch", "myrtle5", "--images", str(empty),
         "--out", str(tmp_path / "k" / "K.npy")],
        capsys, "no images",
    )  # fmt: skip
    assert no_outputs(tmp_path / "k")
    refused(["zca", str(empty), "--out-dir", str(tmp_path / "z0")], capsys, "on 0 image(s)")
    one = tmp_path / "in" / "one.npy"
    np.save(one, np.load(images["train"])[:1])
    err = refused(["zca", str(one), "--out-dir", str(tmp_path / "z1")], capsys, "on 1 image(s)")
    assert "at least 2" in err
    assert no_outputs(tmp_path / "z0") and no_outputs(tmp_path / "z1")


def test_a_blank_image_is_refused_by_the_analytic_kernel_as_by_the_estimate(
    digits, tmp_path, capsys
):
    """Its normalised kernel divides by zero: the estimate already refused it; the
    analytic kernel gave a diagonal of 0.53 instead of 1."""
    train = np.load(save_images(tmp_path / "in", digits["images"])["train"])
    train[5] = 0.0
    np.save(tmp_path / "blank.npy", train)
    common = ["--arch", "myrtle5", "--device", "cpu"]
    err = refused(
        ["kernel", "--method", "analytic", *common, "--images", str(tmp_path / "blank.npy"),
         "--out", str(tmp_path / "k" / "K.npy")],
        capsys, "1 of 40 images are all zeros (rows 5)",
    )  # fmt: skip
    assert "blank.npy" in err
    refused(
        ["kernel-analytic", *common, "--train", str(tmp_path / "blank.npy"),
         "--out-dir", str(tmp_path / "a")],
        capsys, "all zeros",
    )  # fmt: skip
    assert no_outputs(tmp_path / "k") and no_outputs(tmp_path / "a")


@pytest.mark.parametrize("method", ["flow", "boosting", "ridge"])
def test_a_kernel_that_is_not_psd_is_refused(digits, tmp_path, capsys, method):
    """50 eigenvalues at -0.5 x the largest: the flow clipped them as round-off and
    reported an accuracy; now flow, boosting's batch blocks and ridge all refuse."""
    problem = dict(digits["problem"])
    values, vectors = np.linalg.eigh(problem["train"])
    values[:50] = -0.5 * values[-1]
    problem["train"] = (vectors * values) @ vectors.T
    problem["train"] = (problem["train"] + problem["train"].T) / 2
    labels = write_kernel_dir(tmp_path / "kernel", problem)
    args = ["solve", "--kernel-dir", str(tmp_path / "kernel"), "--method", method]
    args += ["--batch-size", "60"] if method == "boosting" else []
    message = "is not positive semi-definite"
    refused([*args, *labels_args(labels), "--out-dir", str(tmp_path / "out")], capsys, message)
    assert not (tmp_path / "out").exists()


def test_round_off_is_not_a_negative_eigenvalue(digits, tmp_path):
    """A rank-deficient PSD kernel (eigenvalues of 1e-16 either side of zero) passes."""
    from neural_kernels.solvers.flow import kernel_eigh

    features = np.random.default_rng(0).normal(size=(120, 10))
    values, _ = kernel_eigh(__import__("torch").from_numpy(features @ features.T))
    assert float(values.min()) == 0.0


# ------------------------------------------------------------- records and their blocks


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda text: text[:-5], "cannot read it as JSON"),
        (lambda text: json.dumps({**json.loads(text), "method": "magic"}), "method 'magic'"),
        (lambda text: json.dumps({**json.loads(text), "arch": "myrtle99"}), "myrtle99"),
        (
            lambda text: json.dumps(
                {**json.loads(text), "features": 7, "settings": {"networks": 2, "width": 4}}
            ),
            "features 7",
        ),
        (
            lambda text: json.dumps(
                {**json.loads(text), "inputs": {**json.loads(text)["inputs"], "test": {"rows": 3}}}
            ),
            "but kernel.json records 3",
        ),
    ],
)
def test_a_kernel_record_is_checked_against_its_blocks(digits, tmp_path, capsys, edit, message):
    labels = write_kernel_dir(tmp_path / "kernel", digits["problem"])
    meta = tmp_path / "kernel" / "kernel.json"
    meta.write_text(edit(meta.read_text()))
    args = ["solve", "--kernel-dir", str(tmp_path / "kernel"), "--method", "flow"]
    refused([*args, *labels_args(labels), "--out-dir", str(tmp_path / "out")], capsys, message)
    assert not (tmp_path / "out").exists()


def test_a_truncated_shard_and_a_crc32_checksum_are_one_sentence(digits, tmp_path, capsys):
    images = save_images(tmp_path / "in", digits["images"])
    shard = ["kernel-shard", "--arch", "myrtle5", "--networks", "2", "--chunk-networks", "1"]
    shard += ["--width", "4", "--device", "cpu", "--train", str(images["train"])]
    assert main(["-q", *shard, "--out-dir", str(tmp_path / "s")]) == 0
    capsys.readouterr()
    data = (tmp_path / "s" / "train.npy").read_bytes()
    (tmp_path / "s" / "train.npy").write_bytes(data[: len(data) // 2])
    merge = ["kernel-merge", str(tmp_path / "s"), "--out-dir", str(tmp_path / "m")]
    refused(merge, capsys, "the shard is damaged")
    assert no_outputs(tmp_path / "m")
    download = ["download", "--url", "http://127.0.0.1:9/x", "--checksum", "crc32:1234"]
    refused([*download, "--out", str(tmp_path / "d")], capsys, "algorithm one of md5")


# ------------------------------------------------------------ options that do not apply


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["solve", "--method", "flow", "--lambdas", "1", "2"], "does not use --lambdas (used by"),
        (["solve", "--method", "ridge", "--steps", "3"], "does not use --steps (used by boosting)"),
        (
            ["kernel", "--method", "analytic", "--arch", "myrtle5", "--networks", "8"],
            "kernel --method analytic does not use --networks",
        ),
        (
            ["zca", "x.npy", "--transform", "t.npz", "--rank", "3"],
            "zca --transform does not use --rank",
        ),
    ],
)
def test_options_that_do_not_apply_are_errors(tmp_path, capsys, args, message):
    outs = ["--out-dir", str(tmp_path / "o")] if args[0] != "kernel" else []
    outs += ["--kernel-dir", "k", "--labels", "train=a"] if args[0] == "solve" else []
    outs += ["--images", "x.npy", "--out", str(tmp_path / "K.npy")] if args[0] == "kernel" else []
    refused([*args, *outs], capsys, message)
    assert not (tmp_path / "o").exists()


def test_the_config_is_checked_when_it_is_read():
    """shards beyond the chunks, and a solver option its method does not use, fail when
    the config is read (the workflow calls plan.check_config before building jobs)."""
    from neural_kernels.settings import SolverSettings  # noqa: F401 (the registry)

    config = yaml.safe_load((Path(__file__).parents[1] / "config" / "config.yaml").read_text())
    plan.check_settings(config)
    estimate = next(name for name, k in config["kernels"].items() if k["method"] == "estimate")
    bad = {**config, "kernels": {estimate: {**config["kernels"][estimate], "shards": 99}}}
    with pytest.raises(NeuralKernelsError, match=rf"kernels.{estimate}: 99 shards cannot split"):
        plan.check_settings(bad)
    bad = {**config, "solvers": {"f": {"method": "flow", "lambdas": [1.0]}}}
    with pytest.raises(NeuralKernelsError, match="solvers.f: solve --method flow does not use"):
        plan.check_settings(bad)


# ---------------------------------------------------------------------------- Ctrl-C


def blocks_done(mask: Path) -> bool:
    try:  # the mask may be caught while its header is being written
        return np.load(mask, mmap_mode="r").sum() >= 5
    except (OSError, ValueError):
        return False


def test_ctrl_c_is_one_line_naming_where_a_rerun_resumes(digits, tmp_path):
    images = save_images(tmp_path / "in", digits["images"])
    out = tmp_path / "out"
    args = ["kernel-analytic", "--arch", "myrtle10", "--precision", "float64", "--block-size"]
    args += ["1", "--device", "cpu", "--train", str(images["train"]), "--val", str(images["val"])]
    mask = tmp_path / ".out.resume" / "train.done.npy"
    process = subprocess.Popen(
        [*STAGE, *args, "--out-dir", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 120
    while not blocks_done(mask):
        assert process.poll() is None and time.monotonic() < deadline, "never got under way"
        time.sleep(0.02)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    lines = err.decode().strip().splitlines()
    assert process.returncode == 130, err.decode()[-2000:]
    assert "Traceback" not in err.decode()
    assert lines[-1] == f"error: interrupted; rerunning resumes from {tmp_path / '.out.resume'}"
    assert not (out / "kernel.json").exists() and mask.exists()
