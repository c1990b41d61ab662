"""The Snakemake workflow: lint, schema, dry run, and real runs on small data."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from snakemake.utils import validate
from snakemake_interface_common.exceptions import WorkflowError

from miniature import make_cifar10, make_imagenet_r, make_tiny_imagenet
from neural_kernels import resources
from neural_kernels.data import load_meta
from neural_kernels.errors import NeuralKernelsError
from neural_kernels.fields import from_config
from neural_kernels.plan import Plan
from neural_kernels.seeds import derived_seed
from neural_kernels.settings import KernelSpec

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.workflow


#: The whole default run (every thesis cell's digits analogue) took 23.5 min on a
#: slow 2-core machine (AMD EPYC without AVX512), about a quarter of that on CI's; a
#: hung run still fails, well inside CI's limit.
SNAKEMAKE_TIMEOUT = 3000


def snakemake(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "snakemake", "--cores", "2", *args],
        cwd=workdir, capture_output=True, text=True, check=False, timeout=SNAKEMAKE_TIMEOUT,
    )  # fmt: skip


def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


def test_lint_is_clean():
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", "--lint"],
        cwd=REPO, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Congratulations" in result.stdout + result.stderr


def test_snakefmt_is_clean():
    result = subprocess.run(
        [sys.executable, "-m", "snakefmt", "--check", "Snakefile", "workflow"],
        cwd=REPO, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def test_dry_run_resolves_default_dag(workdir):
    result = snakemake(workdir, "-n")
    assert result.returncode == 0, result.stderr
    for rule in (
        "prepare_dataset",
        "subset",
        "zca_whiten",
        "all",
        "kernel_estimate_shard",
        "kernel_merge",
        "kernel_analytic",
        "solve",
        "train_network",
        "report",
    ):
        assert f"rule {rule}:" in result.stdout


@pytest.mark.parametrize(
    ("config", "names"),
    [
        ({"datasets": {"digits": {"source": "digits", "val_fracton": 0.1}}}, "val_fracton"),
        ({"datasets": {"digits": {"source": "digits", "seed": "zero"}}}, "seed"),
        ({"datasets": {"digits": {"source": "digits", "val_fraction": 1.5}}}, "val_fraction"),
        ({"datasets": {"x": {"source": "mnist"}}}, "source"),
        ({"datasets": {"x": {"source": "custom"}}}, "path"),
        ({"datasets": {"x": {"source": "cifar10", "checksum": "md5:123"}}}, "checksum"),
        ({"downloads": {"retries": 2}}, "downloads"),
        ({"download": {"retries": -1}}, "retries"),
        ({"datasets": {"Bad-Name": {"source": "digits"}}}, "Bad-Name"),
        ({"datasets": {"d": {"source": "digits"}}, "zca": {"variant": "pca"}}, "variant"),
        ({"datasets": {"d": {"source": "digits", "zca": {"rnak": 3}}}}, "rnak"),
        ({"datasets": {"d": {"source": "digits"}}, "zca": {"device": "tpu"}}, "device"),
        ({"datasets": {"d": {"source": "digits"}}, "threads": {"gpu_job": 0}}, "gpu_job"),
        (
            {
                "datasets": {"d": {"source": "digits"}},
                "kernels": {"k": {"arch": "myrtle6", "method": "estimate"}},
            },
            "arch",
        ),
        (
            {
                "datasets": {"d": {"source": "digits"}},
                "kernels": {"k": {"arch": "myrtle5", "method": "estimate", "widht": 3}},
            },
            "widht",
        ),
        (
            {"datasets": {"d": {"source": "digits"}}, "solvers": {"s": {"method": "newton"}}},
            "method",
        ),
        (
            {
                "datasets": {"d": {"source": "digits"}},
                "solvers": {"s": {"method": "ridge", "lambdas": [0]}},
            },
            "lambdas",
        ),
        (
            {
                "datasets": {"d": {"source": "digits"}},
                "networks": {"n": {"model": "resnet18", "epcohs": 3}},
            },
            "epcohs",
        ),
    ],
)
def test_schema_rejects_bad_config_naming_the_key(config, names):
    """The schema that common.smk validates every config against (in process: fast)."""
    with pytest.raises(WorkflowError, match="Error validating config") as error:
        validate(config, str(REPO / "workflow/schemas/config.schema.yaml"))
    assert names in str(error.value)


def test_bad_config_stops_the_workflow_before_any_output(workdir):
    bad = {"datasets": {"digits": {"source": "digits", "val_fracton": 0.1}}}
    result = snakemake(workdir, "--configfile", str(write_config(workdir / "bad.yaml", bad)))
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "Error validating config" in output and "val_fracton" in output
    assert not (workdir / "results").exists()


def plan_of(config: dict) -> Plan:
    """The experiment plan of ``config``, validated (defaults filled) as common.smk does."""
    validate(config, str(REPO / "workflow/schemas/config.schema.yaml"))
    return Plan(config)


def test_unknown_kernel_name_is_a_clear_error(workdir):
    """The workflow stops on it before building jobs (a dry run); the plan says why."""
    config = {"datasets": {"d": {"source": "digits", "kernels": ["nope"]}}}
    result = snakemake(workdir, "-n", "--configfile", str(write_config(workdir / "c.yaml", config)))
    assert result.returncode != 0
    assert (
        "lists kernel 'nope', which is not defined under 'kernels'" in result.stdout + result.stderr
    )
    config = {"datasets": {"d": {"source": "digits", "subsets": {"solvers": ["nope"]}}}}
    with pytest.raises(NeuralKernelsError, match="lists solver 'nope', which is not defined"):
        plan_of(config)


def test_kernel_solvers_override_the_full_splits_solvers():
    # T1's kernels run boosting and ridge beside flow; the other kernels flow only
    config = yaml.safe_load((REPO / "config/config.yaml").read_text())
    plan = plan_of(config)
    solves = {tuple(target.split("/")[3:6]) for target in plan.solve_targets()}
    digits = config["datasets"]["digits"]
    expected = {
        ("full", kernel, solver)
        for kernel in digits["kernels"]
        for solver in digits["kernel_solvers"].get(kernel, digits["solvers"])
    }
    expected |= {
        (f"n200-seed{seed}", kernel, "flow")
        for seed in (0, 1, 2)
        for kernel in digits["subsets"]["kernels"]
    }
    assert solves == expected
    assert ("full", "myrtle10_gaussian_estimate", "boosting") in solves
    assert ("full", "myrtle7_analytic", "boosting") not in solves
    for entry, message in [
        ({"nope": ["flow"]}, "sets kernel_solvers for 'nope', which is not in its kernels"),
        ({"k": ["nope"]}, "lists solver 'nope' for kernel 'k', which is not defined"),
    ]:
        bad = {
            "datasets": {"d": {"source": "digits", "kernels": ["k"], "kernel_solvers": entry}},
            "kernels": {"k": {"arch": "myrtle5", "method": "analytic"}},
        }
        with pytest.raises(NeuralKernelsError, match=message):
            plan_of(bad)


def test_default_run_prepares_and_whitens_digits(workdir):
    result = snakemake(workdir)
    assert result.returncode == 0, result.stderr
    meta = load_meta(workdir / "results/data/digits")
    assert meta["num_classes"] == 10 and meta["splits"]["test"]["size"] == 360
    for seed in (0, 1, 2):
        sub = workdir / f"results/data/digits/subsets/n200-seed{seed}"
        assert load_meta(sub)["splits"]["train"]["class_counts"] == [20] * 10
        assert (workdir / f"results/logs/subset/digits/n200-seed{seed}.log").exists()
        assert (
            workdir / f"results/benchmarks/subset/data/digits/subsets/n200-seed{seed}.tsv"
        ).exists()
    assert (workdir / "results/benchmarks/prepare_dataset/data/digits.tsv").exists()
    zca = json.loads((workdir / "results/zca/digits/zca.json").read_text())
    assert zca["variant"] == "thesis" and zca["solver"] == "exact" and zca["device"] == "cpu"
    assert zca["n_samples"] == 1293 + 144  # fitted on train + val, the refit's training set
    for split, size in (("train", 1293), ("val", 144), ("test", 360)):
        white = np.load(workdir / f"results/zca/digits/{split}_images.npy", mmap_mode="r")
        assert white.shape == (size, 8, 8, 1) and white.dtype == np.float32
    assert (workdir / "results/benchmarks/zca_whiten/zca/digits.tsv").exists()
    kernels = workdir / "results/kernels/digits"
    # The full split's kernels hold train + val in one symmetric block (the refit); a
    # subset's fits its 200 images and scores val as an eval block. Flips and crops
    # double the fitted rows (T1, T4) or keep them (T5's one crop per image); a cropped
    # full split scores val's centre crops as an eval block (the selection).
    fitted = {"full": 1293 + 144, **{f"n200-seed{s}": 200 for s in (0, 1, 2)}}
    full = {
        "myrtle5_estimate": 1437, "myrtle7_estimate": 1437, "myrtle7_analytic": 1437,
        "myrtle10_estimate": 1437, "myrtle10_analytic": 1437,
        "myrtle10_gaussian_estimate": 1437, "myrtle10_gaussian_flips_estimate": 2 * 1437,
        "myrtle5_crop6_flips_estimate": 2 * 1437, "myrtle5_crop6_estimate": 1437,
    }  # fmt: skip
    subset = ["myrtle5_estimate_small"]
    subset += [f"myrtle{d}_{m}" for d in (5, 7, 10) for m in ("estimate", "analytic")]
    subsets = [view for view in fitted if view != "full"]
    kernel_rows = {"full": full, **{view: dict.fromkeys(subset, 200) for view in subsets}}
    seeds = {}
    for view, names in kernel_rows.items():
        for name, rows in names.items():
            cropped = "crop6" in name
            evals = [("val", 144), ("test", 360)]
            if view == "full" and not cropped:
                evals = [("test", 360)]
            record = json.loads((kernels / view / name / "kernel.json").read_text())
            k = np.load(kernels / view / name / "train.npy", mmap_mode="r")
            assert k.shape == (rows, rows) and k.dtype == np.float64, (view, name)
            np.testing.assert_allclose(np.diagonal(k), 1.0, atol=1e-6)
            for split, size in evals:
                assert np.load(kernels / view / name / f"{split}.npy").shape == (size, rows)
            assert record["method"] in ("estimate", "analytic")
            assert record["inputs"]["train"]["layout"][-1]["stop"] == rows
            assert record.get("crop") == (6 if cropped else None)
            assert not (kernels / view / name / "shards").exists()  # temp, merged
            if name == "myrtle5_estimate":
                seeds[view] = record["settings"]["seed"]
            # the memory model counts the same rows (from the inputs' headers)
            zca = workdir / "results/zca/digits"
            indices = workdir / f"results/data/digits/subsets/{view}/train_indices.npy"
            model = resources.kernel_rows(
                zca / "train_images.npy",
                {split: zca / f"{split}_images.npy" for split, _ in evals},
                from_config(KernelSpec, record),
                val=zca / "val_images.npy" if view == "full" else None,
                train_indices=indices if view != "full" else None,
            )
            assert model == (rows, sum(size for _, size in evals)), (view, name)
    # every subset draws its own random networks: seeds derived from the subset seed
    assert seeds["full"] == 0
    assert [seeds[f"n200-seed{s}"] for s in (0, 1, 2)] == [derived_seed(0, s) for s in (0, 1, 2)]
    assert len(set(seeds.values())) == 4
    assert (
        workdir / "results/benchmarks/kernel_merge/kernels/digits/full/myrtle5_estimate.tsv"
    ).exists()
    solved = workdir / "results/solve/digits"
    t1 = ("myrtle10_gaussian_estimate", "myrtle10_gaussian_flips_estimate")  # kernel_solvers
    runs = [("full", kernel, "flow") for kernel in full]
    runs += [("full", kernel, solver) for kernel in t1 for solver in ("ridge", "pcg", "boosting")]
    runs += [(view, kernel, "flow") for view in subsets for kernel in subset]
    for view, kernel, solver in runs:
        metrics = json.loads((solved / view / kernel / solver / "metrics.json").read_text())
        assert metrics["method"] == solver and metrics["device"] == "cpu"
        assert metrics["sizes"]["train"] == (1293 if view == "full" else 200)
        # the headline's training set: train + val after the refit (full split only)
        assert metrics["training_size"]["images"] == fitted[view]
        assert metrics["training_size"]["rows"] == kernel_rows[view][kernel]
        assert metrics["refit"] == (view == "full")
        # digits are easy: every kernel and solver is far above chance (10%)
        assert metrics["test_accuracy"] > (0.8 if view == "full" else 0.6), (view, kernel)
        assert (workdir / f"results/benchmarks/solve/solve/digits/{view}/{kernel}").is_dir()
    boosting = json.loads(
        (solved / "full/myrtle10_gaussian_estimate/boosting/metrics.json").read_text()
    )
    assert {point["step"] for point in boosting["grid"]} == set(range(1, 21))
    for kernel in t1:  # kernel ridge by conjugate gradients: the Cholesky's predictions
        check_pcg_equals_ridge(solved / "full" / kernel)
    networks = ["myrtle7_network", "myrtle10_network", "resnet18"]
    for network in [*networks, "resnet18_crop6_flip", "resnet18_crop6"]:
        path = workdir / f"results/networks/digits/{network}/metrics.json"
        metrics = json.loads(path.read_text())
        assert metrics["test_accuracy"] > 0.5 and metrics["device"] == "cpu"
        assert metrics["training_size"]["images"] == 1293 + 144
    html = (workdir / "report/report.html").read_text()
    markdown = (workdir / "report/report.md").read_text()
    for table in ("T1", "T2", "T3", "T4", "T5"):
        assert f'<table id="{table}"' in html and f"### {table}." in markdown
    # digits fills every thesis cell, labelled as digits, each naming the target that
    # runs the thesis's own: 26 of 27 (T3's time row has no wide-network cell)
    assert "**[digits]**" in markdown and "config/thesis.yaml solvers" in html
    statuses = re.findall(r'<td[^>]* data-status="([^"]+)"', html)
    assert len(statuses) == 27 and statuses.count("empty") == 1, statuses
    assert statuses.count("analogue") == 26, statuses  # none "not run" or "missing"
    assert "not run in this configuration" not in markdown
    assert "arch myrtle5 for the thesis's myrtle15" in markdown  # T5's analogue says so
    # what ours ran, generated per table; the reference's test-selected value beside ours
    assert 'id="T2-ours"' in html and "class-balanced random subsets of 200" in markdown
    assert "test-selected, as the reference did" in markdown
    # the two subset estimate sizes give the error-against-features figure a curve
    assert 'id="figure-kernel_error"' in html and 'id="figure-boosting"' in html
    small = workdir / "results/solve/digits/n200-seed0/myrtle5_estimate_small/flow/metrics.json"
    assert json.loads(small.read_text())["kernel"]["features"] == 512
    assert (workdir / "results/benchmarks/report/report.tsv").exists()
    again = snakemake(workdir, "-n")
    assert "Nothing to be done" in again.stdout + again.stderr
    check_memory_requests(workdir, result.stdout + result.stderr)


def check_pcg_equals_ridge(kernel_dir: Path) -> None:
    """pcg and ridge on one kernel: the same grid's accuracies, the same selection and
    the selected predictions equal to 1e-6 of their largest magnitude."""
    ridge, pcg = (
        json.loads((kernel_dir / m / "metrics.json").read_text()) for m in ("ridge", "pcg")
    )
    assert [p["lambda"] for p in pcg["grid"]] == [p["lambda"] for p in ridge["grid"]]
    for a, b in zip(ridge["grid"], pcg["grid"], strict=True):
        assert a.get("accuracy") == b["accuracy"], (kernel_dir, a, b)
        assert b["diagnostics"]["refit"]["converged"], (kernel_dir, b)
    assert pcg["selected"]["lambda"] == ridge["selected"]["lambda"]
    with (
        np.load(kernel_dir / "ridge/predictions.npz") as a,
        np.load(kernel_dir / "pcg/predictions.npz") as b,
    ):
        for key in ("val_scores", "test_scores"):
            scale = np.abs(a[key]).max()
            np.testing.assert_allclose(b[key], a[key], rtol=0, atol=1e-6 * scale, err_msg=key)


#: The solvers that stream their kernel: their requests follow what they hold, not the
#: kernel's size.
STREAMING_SOLVERS = ("boosting", "pcg")


def check_memory_requests(workdir: Path, log: str) -> None:
    """Every job of a run peaked (its benchmark's max_rss) below the memory it asked a
    cluster for (neural_kernels.resources, printed when the job started), and a
    streaming solve asked at most max(floor, 3 x its peak)."""
    asked = {}
    for block in re.split(r"\n(?=(?:local)?rule \w+:)", log):
        bench = re.search(r"^    benchmark: (\S+)", block, flags=re.M)
        mem = re.search(r"^    resources: .*\bmem_mb=(\d+)", block, flags=re.M)
        if bench and mem:
            asked[bench.group(1)] = int(mem.group(1))
    assert len(asked) > 90, len(asked)  # every job of the default run but 'all'
    streaming = 0
    for path, mem_mb in asked.items():
        peak = pd.read_csv(workdir / path, sep="\t")["max_rss"].max()
        assert mem_mb >= 2000 and peak <= mem_mb, (path, peak, mem_mb)
        if "/solve/" in path and Path(path).stem in STREAMING_SOLVERS:
            streaming += 1
            assert mem_mb <= max(2000, 3 * peak), (path, peak, mem_mb)
    assert streaming >= 4, streaming  # T1's two kernels, boosting and pcg each


def md5_of(path: Path) -> str:
    return "md5:" + hashlib.md5(path.read_bytes()).hexdigest()


def test_every_source_kind_end_to_end_over_loopback(workdir, archive_server):
    served = archive_server.root
    make_cifar10(served / "cifar-10-python.tar.gz")
    make_tiny_imagenet(served / "tiny-imagenet-200.zip")
    make_imagenet_r(served / "imagenet-r.tar")
    npz = workdir / "mine.npz"
    rng = np.random.default_rng(0)
    np.savez(npz, images=rng.integers(0, 256, (60, 6, 6, 3), np.uint8), labels=np.arange(60) % 3)

    def archive(source, name, **extra):
        return {
            "source": source,
            "url": archive_server.url(name),
            "checksum": md5_of(served / name),
            **extra,
        }

    config = {
        "datasets": {
            "cifar10": archive(
                "cifar10", "cifar-10-python.tar.gz", subsets={"sizes": [20], "seeds": [0]}
            ),
            "tiny_imagenet": archive("tiny_imagenet", "tiny-imagenet-200.zip", val_fraction=0.25),
            "imagenet_r": archive("imagenet_r", "imagenet-r.tar", image_size=24),
            "mine": {"source": "custom", "path": str(npz)},
            "shapes": {"source": "synthetic", "size": 50, "image_size": 12, "classes": 5},
        }
    }  # fmt: skip
    result = snakemake(
        workdir, "data", "--configfile", str(write_config(workdir / "mini.yaml", config))
    )
    assert result.returncode == 0, result.stderr
    assert load_meta(workdir / "results/data/cifar10")["splits"]["test"]["size"] == 30
    assert load_meta(workdir / "results/data/tiny_imagenet")["image_shape"] == [64, 64, 3]
    imagenet_r = load_meta(workdir / "results/data/imagenet_r")
    assert imagenet_r["image_shape"] == [24, 24, 3] and imagenet_r["test_fraction"] == 0.1
    assert load_meta(workdir / "results/data/mine")["splits"]["test"]["size"] == 12
    shapes = load_meta(workdir / "results/data/shapes")
    assert shapes["image_shape"] == [12, 12, 3] and shapes["splits"]["test"]["size"] == 10
    assert (
        load_meta(workdir / "results/data/cifar10/subsets/n20-seed0")["splits"]["train"]["size"]
        == 20
    )
    assert (workdir / "resources/cifar10/cifar-10-python.tar.gz").exists()
    assert (workdir / "results/logs/download_archive/cifar10/cifar-10-python.tar.gz.log").exists()


def test_checksum_mismatch_in_workflow_fails_cleanly(workdir, archive_server):
    make_cifar10(archive_server.root / "cifar-10-python.tar.gz")
    config = {
        "datasets": {
            "cifar10": {
                "source": "cifar10",
                "url": archive_server.url("cifar-10-python.tar.gz"),
                "checksum": "md5:" + "0" * 32,
            }
        },
        "download": {"retries": 0},
    }
    result = snakemake(
        workdir, "data", "--configfile", str(write_config(workdir / "bad.yaml", config))
    )
    assert result.returncode != 0
    log = (workdir / "results/logs/download_archive/cifar10/cifar-10-python.tar.gz.log").read_text()
    assert "error: checksum mismatch" in log and "cifar-10-python.tar.gz" in log
    assert [p for p in workdir.glob("resources/**/*") if p.is_file()] == []
    assert not (workdir / "results/data/cifar10").exists()
