"""benchmarks/gpu.py runs (on the CPU, at tiny shapes) and projects every thesis job.

The GPU run is one command for a lent GPU (README, "Measuring a GPU"); this keeps its
code working where no GPU is, and ties its cost model to the one README and
config/thesis.yaml quote (1.6/2.0/3.5/14.2/175 MFLOP per image-feature; Myrtle10's
CIFAR-10 estimate 1.2 GPU-hours at 40 TFLOP/s).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gpu_script():
    spec = importlib.util.spec_from_file_location("gpu_benchmark", REPO / "benchmarks/gpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_conv_flops_match_the_cost_model_of_the_thesis_config(gpu_script):
    mflops = {
        (arch, side): gpu_script.conv_flops_per_image_feature(arch, side, 64) / 1e6
        for arch, side in (
            ("myrtle5", 32), ("myrtle7", 32), ("myrtle10", 32), ("myrtle11", 64),
            ("myrtle15", 224),
        )
    }  # fmt: skip
    assert [round(v, 1) for v in mflops.values()] == [1.6, 2.0, 3.5, 14.2, 174.8]
    # the first layer reads 3 channels: a width-1 network is not width 64's / 64
    assert gpu_script.conv_flops_per_image_feature("myrtle5", 32, 1) < mflops["myrtle5", 32] * 1e6


def test_quick_cpu_run_measures_every_path_and_projects_every_thesis_job(gpu_script, tmp_path):
    out = tmp_path / "gpu.json"
    report = gpu_script.main(["--device", "cpu", "--quick", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    info = report["device"]
    assert info["device"] == "cpu" and info["torch"] and "cuda" in info
    assert report["cuda_tests"] is None  # pytest -m cuda runs on a GPU only
    rates = report["rates"]
    assert set(rates["seconds"]) == {
        "matmul_flops", "estimate", "analytic", "zca", "eigh", "boosting", "training",
    }  # fmt: skip
    assert all(v > 0 for v in rates["matmul_flops"].values())
    assert {(r["arch"], r["side"]) for r in rates["estimate"]} == {
        ("myrtle10", 32),
        ("myrtle11", 64),
    }
    assert all(
        r["image_features_per_second"] > 0 and r["gram_flops"] > 0 for r in rates["estimate"]
    )
    assert {r["arch"] for r in rates["analytic"]} == {"myrtle5", "myrtle7", "myrtle10"}
    assert [r["features"] for r in rates["zca"]] == [192, 12288, 150528]
    assert {r["model"] for r in rates["training"]} == {"resnet18", "myrtle7", "myrtle10"}

    config = yaml.safe_load((REPO / "config/thesis.yaml").read_text())
    jobs = {job["job"]: job for job in report["thesis_jobs"]}
    for dataset, cfg in config["datasets"].items():
        assert f"{dataset}/zca" in jobs
        for kernel in cfg["kernels"]:
            assert f"{dataset}/full/{kernel}" in jobs
        for network in cfg["networks"]:
            assert f"{dataset}/{network}" in jobs
        for kernel in cfg.get("subsets", {}).get("kernels", []):
            assert f"{dataset}/subset x{len(cfg['subsets']['seeds'])}/{kernel}" in jobs
    estimate = jobs["cifar10/full/myrtle10_estimate"]
    assert round(estimate["model_hours"], 1) == 1.2  # README's and the config's number
    assert estimate["measured_hours"] > 0 and estimate["passes"] == 1
    assert jobs["tiny_imagenet/full/myrtle11_crop56_flips_estimate"]["passes"] == 4
    assert jobs["cifar10/full/myrtle10_analytic"]["measured_hours"] > 0
    assert jobs["cifar10/full/*/flow_cpu"]["measured_hours"] is None  # a CPU job
