"""benchmarks/scale.py: the cost curve of every stage, and the report's Scaling section.

The quick run executes the real stages (each its own process) at two tiny sizes; its
JSON is then rendered by the report and read back from headless Chromium's DOM.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from neural_kernels.report.collect import collect
from neural_kernels.report.render import render_report
from neural_kernels.report.scaling import ASSUMED_GPU_FLOPS, duration, scaling

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks/scale.py"
CHROMIUM = shutil.which("chromium-headless-shell") or shutil.which("chromium")


@pytest.fixture(scope="module")
def scale_script():
    sys.path.insert(0, str(SCRIPT.parent))  # the script imports its sibling measure.py
    try:
        spec = importlib.util.spec_from_file_location("scale_benchmark", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # its dataclasses look their module up
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(SCRIPT.parent))
        sys.modules.pop("scale_benchmark", None)


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> Path:
    """``python benchmarks/scale.py --quick`` as README runs it; its JSON's path."""
    root = tmp_path_factory.mktemp("scale")
    out = root / "results/benchmarks/scale.json"
    subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--out", str(out), "--work", str(root)],
        check=True, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    return out


def test_quick_run_measures_every_stage_with_an_exponent(quick, scale_script):
    report = json.loads(quick.read_text())
    assert [s["stage"] for s in report["stages"]] == list(scale_script.STAGES)
    plan = report["plan"]
    for stage in report["stages"]:
        rows = plan["analytic_sizes"] if stage["stage"] == "analytic" else plan["sizes"]
        assert [p["rows"] for p in stage["points"]] == rows, stage["stage"]
        assert all(p["ok"] and p["seconds"] >= 0 for p in stage["points"]), stage
        assert all(p["anon_peak_mb"] > 50 for p in stage["points"]), stage  # python at least
        assert stage["exponent"] is not None and np.isfinite(stage["exponent"])
        assert stage["predicted"] is not None
        assert set(stage["projection"]) == {"50000", "100000", "200000"}
    by_stage = {s["stage"]: s for s in report["stages"]}
    assert by_stage["flow"]["predicted"] == pytest.approx(3.0)
    assert by_stage["estimate_gram"]["predicted"] == pytest.approx(2.0, abs=0.01)
    solves = [p for p in report["points"] if p["stage"] in ("flow", "boosting", "pcg")]
    assert all(0.0 <= p["test_accuracy"] <= 1.0 for p in solves)
    assert {(s["dataset"], s["rows"]) for s in report["thesis_sizes"]} >= {
        ("cifar10", 50000), ("cifar10", 100000), ("tiny_imagenet", 200000),
    }  # fmt: skip
    assert report["rates"]["float64"] > 0 and report["rates"]["float32"] > 0


def test_exponents_and_projections_follow_a_power_law(scale_script):
    plan = scale_script.Plan()
    points = [
        {"stage": "flow", "rows": n, "ok": True, "seconds": 2e-9 * n**3}
        for n in (1000, 2000, 4000, 8000)
    ]
    fit = scale_script.fit_stage("flow", points, plan)
    assert fit["fitted_rows"] == [2000, 4000, 8000]  # the largest three
    assert fit["exponent"] == pytest.approx(3.0) and fit["predicted"] == pytest.approx(3.0)
    assert fit["within"]
    assert fit["projection"]["50000"] == pytest.approx(2e-9 * 50000**3)
    assert fit["projection_model"]["200000"] == pytest.approx(2e-9 * 200000**3)
    # a failed size is kept (with its error) but not fitted
    failed = {"stage": "flow", "rows": 16000, "ok": False, "seconds": None}
    assert scale_script.fit_stage("flow", [*points, failed], plan)["fitted_rows"][-1] == 8000
    # one size: no exponent, no projection
    lonely = scale_script.fit_stage("flow", points[:1], plan)
    assert lonely["exponent"] is None and lonely["projection"] == {}


def test_measured_process_reports_its_memory_and_its_error(tmp_path, scale_script):
    import measure
    from measure import run_measured

    hold = "import numpy as np, time; a = np.ones(200 * 2**20 // 8); time.sleep(0.3)"
    run = run_measured([sys.executable, "-c", hold], tmp_path / "hold.log")
    assert run.returncode == 0 and run.error is None
    assert 200 <= run.anon_peak_mb < 400
    fail = "import sys; print('error: the disk is full; free 3 GB'); sys.exit(1)"
    run = run_measured([sys.executable, "-c", fail], tmp_path / "fail.log")
    assert run.returncode == 1 and run.error == "error: the disk is full; free 3 GB"
    if measure.can_make_cgroups():  # a cap the process outgrows: killed, and said why
        run = run_measured([sys.executable, "-c", hold], tmp_path / "cap.log", 100 << 20)
        assert run.returncode == -9 and "out of memory under the 0.1 GiB cap" in run.error
        assert run.cache_source == "cgroup" and run.cgroup_peak_mb <= 100
        assert not list(measure.MEMORY_CGROUP.glob(f"nk-measure-{os.getpid()}-*"))


def test_the_report_renders_the_scaling_section(quick, tmp_path):
    results = quick.parents[1]
    section = scaling(collect(results))
    assert [row["stage"] for row in section["rows"]][:2] == ["prepare", "zca"]
    assert section["gpu_source"].startswith("FLOP model")  # no gpu.json here
    flow = next(row for row in section["rows"] if row["stage"] == "flow")
    float64 = json.loads(quick.read_text())["rates"]["float64"] / ASSUMED_GPU_FLOPS["float64"]
    assert flow["gpu_hours"][50000] == pytest.approx(flow["machine_hours"][50000] * float64)
    # with a GPU's measured rates, those are used, and said
    gpu = {"device": {"device": "cuda:0", "name": "NVIDIA H100"},
           "rates": {"matmul_flops": {"float64": 5e13, "float32": 5e13}}}  # fmt: skip
    (results / "benchmarks/gpu.json").write_text(json.dumps(gpu))
    assert "NVIDIA H100" in scaling(collect(results))["gpu_source"]
    (results / "benchmarks/gpu.json").unlink()

    out = tmp_path / "report"
    rendered = render_report(
        results, out, thesis_path=REPO / "report/thesis.yaml", templates=REPO / "report/templates"
    )  # fmt: skip
    assert (out / "figures/scaling_time.svg").exists()
    assert (out / "figures/scaling_memory.svg").exists()
    assert "## Scaling" in (out / "report.md").read_text()
    assert rendered["html"]
    if CHROMIUM is None:
        pytest.skip("headless Chromium is not installed (.ci/run installs it)")
    dom = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom",
         (out / "report.html").as_uri()],
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout  # fmt: skip
    scaling_part = dom[dom.index('id="scaling"') : dom.index('id="figures"')]
    for stage in ("prepare", "zca", "estimate_gram", "analytic", "flow", "pcg", "network"):
        assert f'data-stage="{stage}"' in scaling_part
    assert scaling_part.count("<svg") == 2 and "≤ 9 h" in scaling_part


def test_a_report_without_a_scale_run_says_how_to_make_one(tmp_path):
    (tmp_path / "results").mkdir()
    out = tmp_path / "report"
    render_report(
        tmp_path / "results", out, thesis_path=REPO / "report/thesis.yaml",
        templates=REPO / "report/templates",
    )  # fmt: skip
    assert "python benchmarks/scale.py" in (out / "report.html").read_text()


def test_durations_read_as_a_person_compares_them():
    assert [duration(s) for s in (0.2, 40, 720, 3600 * 3.4, 3600 * 210)] == [
        "<1 s", "40 s", "12 min", "3.4 h", "210 h",
    ]  # fmt: skip
