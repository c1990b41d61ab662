"""The cost curve: every stage's seconds and peak memory against fitted rows N.

Runs the real stages (``python -m neural_kernels <stage>``, each in a process of its own,
its inputs first evicted from the page cache) on seeded synthetic images at the real
shapes (source ``synthetic``: 32 x 32 x 3, 10 classes) at a ladder of fitted rows N
(train + val; test N / 5): prepare, ZCA, the estimated Myrtle5 kernel (its random
features and its Gram products, timed apart by the stage), the merge that writes the
float64 kernel, the solves (flow where it fits, boosting, pcg), one epoch of a finite
Myrtle5 network, and the analytic kernel on a ladder of its own (small sizes only: its
pairs cost a CPU about 7 ms each at 32 x 32).

For each stage: seconds (the stage's own record where it keeps one, else the process's
wall time) and peak memory (anonymous, and page cache: the cgroup's where one can be
made, else the mapped file pages) at every size; the log-log exponent ``a`` of
``seconds ~ N^a`` fitted over the largest :data:`FIT_POINTS` sizes, beside the exponent
its cost model predicts over the same sizes; and the projection to 50k, 100k and 200k
rows. ``--mem-cap-gb`` runs the solves at the largest size in a cgroup of that size, so
that they stream a kernel larger than their memory (the flow refuses).

Writes JSON (default ``results/benchmarks/scale.json``) after every size; ``--resume``
keeps the sizes an earlier run of the same settings measured. Usage:
``python benchmarks/scale.py`` (to 32k rows: README "How the cost grows"),
``--quick`` (a smoke run, under a minute), ``--device cuda`` on a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from gpu import matmul_rates
from measure import MEMORY_CGROUP, can_make_cgroups, evict_page_cache, run_measured
from tqdm import tqdm

from neural_kernels.catalog import SOLVERS
from neural_kernels.data.synthetic import test_images
from neural_kernels.device import device_name, resolve_device
from neural_kernels.layout import script_benchmark
from neural_kernels.settings import SolverSettings
from neural_kernels.sizing import EIGH_MATMUL_UNITS, load_config, planned_solves

REPO = Path(__file__).resolve().parents[1]
PROJECT_TO = (50_000, 100_000, 200_000)
#: The exponent is fitted over the largest sizes: small ones are fixed-cost bound.
FIT_POINTS = 3
#: A measured exponent within this of the model's counts as what the algorithm predicts.
TOLERANCE = 0.25


@dataclass(frozen=True)
class Plan:
    """What a run measures (a resumed run must have the same)."""

    sizes: tuple[int, ...] = (1000, 2000, 4000, 8000, 16000, 32000)
    analytic_sizes: tuple[int, ...] = (100, 150, 200)
    flow_max: int = 8000  # the flow's 12 N^3 at 16k rows: 17 min of 2 cores
    image_size: int = 32
    channels: int = 3
    classes: int = 10
    width: int = 64
    networks: int = 2  # 128 random features
    batch_size: int = 256  # boosting M
    steps: int = 10
    rank: int = 500  # pcg
    max_iterations: int = 30
    tolerance: float = 1e-6
    network_width: int = 64
    device: str = "cpu"
    mem_cap_gb: float | None = None


QUICK = dict(
    sizes=(200, 400), analytic_sizes=(100, 200), flow_max=400, image_size=8, width=16,
    batch_size=16, steps=2, rank=16, max_iterations=10, network_width=16,
)  # fmt: skip
GPU = dict(analytic_sizes=(256, 512, 1024), flow_max=10**9)


@dataclass(frozen=True)
class Stage:
    """A measured stage: its label, its cost model ``model(N, plan)`` (multiply-adds,
    an eigendecomposition of ``n x n`` counted as ``12 n^3``: sizing.EIGH_MATMUL_UNITS;
    or items, up to a constant) and the dtype of the arithmetic that bounds it on a GPU
    (``None``: bound by reading and writing files, which a GPU does not speed up)."""

    label: str
    model: Callable[[int, Plan], float]
    dtype: str | None
    formula: str


def _evals(n: int, plan: Plan) -> int:
    return test_images(n, None, plan.classes)


def _pixels(plan: Plan) -> int:
    return plan.image_size**2 * plan.channels


def _grid(method: str) -> int:
    """The size of a solver's default grid: the columns a pass over the kernel
    multiplies per class (boosting's eta t, pcg's lambdas)."""
    solver = SOLVERS.lookup(method)
    return len(solver.default_eta_t if solver.grid == "eta_t" else solver.default_lambdas)


STAGES = {
    "prepare": Stage("prepare", lambda n, p: n + _evals(n, p), None, "N"),
    "zca": Stage(  # the covariance of the N fitted rows, then whitening all N + N/5
        "ZCA (exact)",
        lambda n, p: (2 * n + _evals(n, p)) * _pixels(p) ** 2 + EIGH_MATMUL_UNITS * _pixels(p) ** 3,
        "float64",
        "(2N + E) P^2 + 12 P^3",
    ),
    "estimate_features": Stage(
        "estimate: random features", lambda n, p: n + _evals(n, p), "float32", "N"
    ),
    "estimate_gram": Stage(
        "estimate: Gram products", lambda n, p: (n + _evals(n, p)) * n, "float32", "N^2 F"
    ),
    "merge": Stage("merge (writes the kernel)", lambda n, p: (n + _evals(n, p)) * n, None, "N^2"),
    "analytic": Stage(
        "analytic kernel (mixed)",
        lambda n, p: n * (n + 1) / 2 + _evals(n, p) * n,
        "float32",
        "N^2",
    ),
    "flow": Stage("solve: flow", lambda n, p: EIGH_MATMUL_UNITS * n**3, "float64", "12 N^3"),
    "boosting": Stage(  # per step: N / M batch eighs, and two passes over the kernel
        "solve: boosting",
        lambda n, p: (
            p.steps
            * (EIGH_MATMUL_UNITS * n * p.batch_size**2 + n * n * p.classes * _grid("boosting"))
        ),
        None,
        "steps (12 N M^2 + N^2 C)",
    ),
    "pcg": Stage(  # the rank-r preconditioner, then one pass over the kernel an iteration
        "solve: pcg",
        lambda n, p: n * p.rank**2 + p.max_iterations * n * n * p.classes * _grid("pcg"),
        None,
        "N r^2 + iterations N^2 C",
    ),
    "network": Stage("network: one epoch", lambda n, p: n, "float32", "N"),
}


def _nk(*args: object) -> list[str]:
    return [sys.executable, "-m", "neural_kernels", *map(str, args)]


def _read(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def _point(
    stage: str, n: int, measured, seconds: float | None, record: dict | None = None, **extra
) -> dict:
    """One measurement: the stage's own seconds (else the process's), its memory, and
    the GPU memory its ``record`` (the stage's JSON) gives."""
    extra["device_peak_mb"] = (record or {}).get("device_peak_allocated_mb")
    run = measured.as_dict()
    run["process_seconds"] = run.pop("seconds")
    ok = measured.returncode == 0
    return {"stage": stage, "rows": n, "ok": ok,
            "seconds": (seconds if seconds is not None else measured.seconds) if ok else None,
            **run, **extra}  # fmt: skip


def _prepared(n: int, plan: Plan, work: Path) -> tuple[list, Path, Path]:
    """prepare and zca of ``n`` fitted rows into ``work``; their points."""
    data, zca = work / "data", work / "zca"
    run = run_measured(
        _nk("prepare", "--source", "synthetic", "--size", n, "--image-size", plan.image_size,
            "--channels", plan.channels, "--classes", plan.classes, "--out", data),
        work / "logs/prepare.log",
    )  # fmt: skip
    points = [_point("prepare", n, run, None)]
    if run.returncode:
        return points, data, zca
    evict_page_cache(data)
    images = [data / f"{split}_images.npy" for split in ("train", "val", "test")]
    run = run_measured(
        _nk("zca", *images, "--fit-on", 2, "--out-dir", zca, "--device", plan.device),
        work / "logs/zca.log",
    )
    record = _read(zca / "zca.json")
    seconds = record.get("fit_seconds", 0) + sum(record.get("apply_seconds", {}).values())
    points.append(_point("zca", n, run, seconds, record))
    return points, data, zca


def _kernel_inputs(zca: Path) -> list[str]:
    return ["--train", str(zca / "train_images.npy"), "--val", str(zca / "val_images.npy"),
            "--eval", f"test={zca / 'test_images.npy'}", "--arch", "myrtle5"]  # fmt: skip


def _solve(method: str, n: int, plan: Plan, work: Path, cap: int | None) -> dict:
    options = {
        "flow": [],
        "boosting": ["--batch-size", plan.batch_size, "--steps", plan.steps],
        "pcg": ["--rank", plan.rank, "--max-iterations", plan.max_iterations,
                "--tolerance", plan.tolerance],
    }[method]  # fmt: skip
    labels = [f"{s}={work / 'data' / f'{s}_labels.npy'}" for s in ("train", "val", "test")]
    out = work / f"solve_{method}"
    evict_page_cache(work / "kernel")
    run = run_measured(
        _nk("solve", "--kernel-dir", work / "kernel", "--labels", *labels, "--method", method,
            *options, "--device", plan.device, "--out-dir", out),
        work / f"logs/solve_{method}.log", cap,
    )  # fmt: skip
    record = _read(out / "metrics.json")
    return _point(method, n, run, record.get("seconds", {}).get("total"), record,
                  test_accuracy=record.get("test_accuracy"))  # fmt: skip


def measure_size(n: int, plan: Plan, work: Path, largest: bool) -> list[dict]:
    """Every stage but the analytic kernel at ``n`` fitted rows."""
    points, data, zca = _prepared(n, plan, work)
    if not all(p["ok"] for p in points):
        return points
    evict_page_cache(zca)
    shard = work / "shard"
    run = run_measured(
        _nk("kernel-shard", *_kernel_inputs(zca), "--width", plan.width, "--networks",
            plan.networks, "--chunk-networks", plan.networks, "--shard", 0, "--shards", 1,
            "--device", plan.device, "--out-dir", shard),
        work / "logs/estimate.log",
    )  # fmt: skip
    record = _read(shard / "shard.json")
    for part in ("features", "gram"):
        points.append(_point(f"estimate_{part}", n, run, record.get("seconds", {}).get(part),
                             record))  # fmt: skip
    if run.returncode == 0:
        evict_page_cache(shard)
        run = run_measured(
            _nk("kernel-merge", shard, "--out-dir", work / "kernel"), work / "logs/merge.log"
        )
        points.append(_point("merge", n, run, _read(work / "kernel/kernel.json")
                             .get("seconds", {}).get("merge")))  # fmt: skip
        shutil.rmtree(shard)
    if run.returncode == 0:
        cap = int(plan.mem_cap_gb * 2**30) if largest and plan.mem_cap_gb else None
        methods = ["boosting", "pcg"]
        if n <= plan.flow_max or cap:  # under the cap: what it says when it cannot fit
            methods.insert(0, "flow")
        points += [_solve(method, n, plan, work, cap) for method in methods]
    evict_page_cache(data)
    run = run_measured(
        _nk("train", "--data", data, "--model", "myrtle5", "--width", plan.network_width,
            "--epochs", 1, "--device", plan.device, "--no-progress", "--out-dir",
            work / "network"),
        work / "logs/train.log",
    )  # fmt: skip
    record = _read(work / "network/metrics.json")
    points.append(_point("network", n, run, record.get("seconds", {}).get("train"), record))
    return points


def measure_analytic(n: int, plan: Plan, work: Path) -> list[dict]:
    """The analytic kernel at ``n`` fitted rows (its inputs prepared unmeasured)."""
    inputs, _, zca = _prepared(n, plan, work)
    if not all(p["ok"] for p in inputs):
        return [{**p, "stage": "analytic", "ok": False, "seconds": None} for p in inputs[-1:]]
    evict_page_cache(zca)
    run = run_measured(
        _nk("kernel-analytic", *_kernel_inputs(zca), "--precision", "mixed", "--device",
            plan.device, "--out-dir", work / "analytic"),
        work / "logs/analytic.log",
    )  # fmt: skip
    record = _read(work / "analytic/kernel.json")
    return [_point("analytic", n, run, record.get("seconds", {}).get("total"), record)]


def _slope(rows: list[float], values: list[float]) -> float:
    return float(np.polyfit(np.log(rows), np.log(values), 1)[0])


def holds_gb(method: str, n: int, plan: Plan) -> float:
    """What a solve at ``n`` fitted rows holds (the registry's footprint), in GB."""
    settings = SolverSettings.using(method, batch_size=plan.batch_size, steps=plan.steps,
                                    rank=plan.rank, max_iterations=plan.max_iterations)  # fmt: skip
    return SOLVERS.lookup(method).holds_bytes(settings, n, _evals(n, plan), plan.classes) / 1e9


def fit_stage(name: str, points: list[dict], plan: Plan) -> dict:
    """``log seconds = a log N + b``, least squares over the largest :data:`FIT_POINTS`
    sizes measured without a cap; the model's exponent over the same sizes; and the
    projections to :data:`PROJECT_TO`: ``t(N) = t_last (N / N_last)^a`` (from the fit)
    and ``t_last model(N) / model(N_last)`` (from the model)."""
    stage = STAGES[name]
    done = sorted(
        (p for p in points if p["ok"] and p["seconds"] > 0 and not p.get("cap_mb")),
        key=lambda p: p["rows"],
    )
    fitted = done[-FIT_POINTS:]
    result = {"stage": name, "label": stage.label, "model": stage.formula,
              "dtype": stage.dtype, "points": sorted(points, key=lambda p: p["rows"]),
              "exponent": None, "predicted": None, "within": None, "fitted_rows": [],
              "projection": {}, "projection_model": {}}  # fmt: skip
    if name in SOLVERS:
        result["holds_gb"] = {str(n): holds_gb(name, n, plan) for n in PROJECT_TO}
    if len(fitted) < 2:
        return result
    rows, seconds = [p["rows"] for p in fitted], [p["seconds"] for p in fitted]
    exponent = _slope(rows, seconds)
    predicted = _slope(rows, [stage.model(n, plan) for n in rows])
    last_n, last_s = rows[-1], seconds[-1]
    result |= {
        "exponent": exponent,
        "predicted": predicted,
        "within": abs(exponent - predicted) <= TOLERANCE,
        "fitted_rows": rows,
        "projection": {str(n): last_s * (n / last_n) ** exponent for n in PROJECT_TO},
        "projection_model": {
            str(n): last_s * stage.model(n, plan) / stage.model(last_n, plan) for n in PROJECT_TO
        },
    }
    return result


def thesis_sizes() -> list[dict]:
    """The fitted rows of every thesis kernel solve (config/thesis.yaml), one per size."""
    seen, sizes = set(), []
    for solve in planned_solves(load_config(REPO / "config/thesis.yaml")):
        if (solve.dataset, solve.sizes.rows) not in seen:
            seen.add((solve.dataset, solve.sizes.rows))
            sizes.append({"dataset": solve.dataset, "kernel": solve.kernel,
                          "rows": solve.sizes.rows})  # fmt: skip
    return sizes


def summarise(report: dict, plan: Plan) -> None:
    """Fill ``report["stages"]`` from its points."""
    report["stages"] = [
        fit_stage(name, [p for p in report["points"] if p["stage"] == name], plan)
        for name in STAGES
    ]


def print_report(report: dict) -> None:
    print(f"device: {report['device']} ({report['threads']} threads); "
          f"wall time {report['wall_seconds'] / 60:.1f} min")  # fmt: skip
    for stage in report["stages"]:
        a, b = stage["exponent"], stage["predicted"]
        fit = "-" if a is None else f"{a:.2f} (model {stage['model']}: {b:.2f})"
        print(f"\n{stage['label']}: exponent {fit}")
        print(f"{'N':>8}{'seconds':>10}{'process s':>10}{'anon MB':>9}{'cache MB':>9}  note"
              " (cache: the cgroup's page cache, else mapped file pages)")  # fmt: skip
        for p in stage["points"]:
            note = p["error"] or (f"test {p['test_accuracy']:.3f}" if p.get("test_accuracy")
                                  is not None else "")  # fmt: skip
            if p.get("cap_mb"):
                note = f"capped {p['cap_mb'] / 1024:.1f} GiB; {note}"
            secs = "-" if p["seconds"] is None else f"{p['seconds']:.2f}"
            print(
                f"{p['rows']:>8}{secs:>10}{p['process_seconds']:>10.2f}"
                f"{p['anon_peak_mb']:>9.0f}{p['cache_peak_mb']:>9.0f}  {note[:70]}"
            )
        if stage["projection"]:
            hours = "  ".join(f"{int(n) // 1000}k {s / 3600:.2f} h"
                              for n, s in stage["projection"].items())  # fmt: skip
            print(f"projected: {hours}")


def _write(report: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_suffix(".json.part")
    partial.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(partial, out)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--sizes", type=int, nargs="+", help="fitted rows (default 1k..32k)")
    parser.add_argument("--analytic-sizes", type=int, nargs="+")
    parser.add_argument("--mem-cap-gb", type=float, help="cap the largest size's solves")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run)")
    parser.add_argument("--resume", action="store_true", help="keep sizes already measured")
    parser.add_argument("--work", type=Path, help="scratch directory (default: system temp)")
    parser.add_argument("--out", type=Path, default=REPO / script_benchmark("scale"))
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    plan = replace(Plan(), **(QUICK if args.quick else GPU if device.type == "cuda" else {}))
    plan = replace(plan, device=str(device), mem_cap_gb=args.mem_cap_gb,
                   sizes=tuple(args.sizes or plan.sizes),
                   analytic_sizes=tuple(args.analytic_sizes or plan.analytic_sizes))  # fmt: skip
    previous = _read(args.out) if args.resume else {}
    keep = previous.get("plan") == json.loads(json.dumps(asdict(plan)))
    if args.resume and not keep:
        print(f"--resume: {args.out} has other settings (or none); measuring every size")
    if plan.mem_cap_gb and not can_make_cgroups():
        print(f"--mem-cap-gb: no cgroup v1 memory controller is writable here "
              f"({MEMORY_CGROUP}); the solves run uncapped, and the JSON says so")  # fmt: skip
    report = {
        "benchmark": "scale", "plan": asdict(plan), "device": device_name(device),
        "threads": torch.get_num_threads(), "cgroups": can_make_cgroups(),
        # this machine's matmul FLOP/s per precision: the report's GPU projections
        "rates": previous["rates"] if keep else matmul_rates(device, 256 if args.quick else 2048),
        "thesis_sizes": thesis_sizes(), "tolerance": TOLERANCE,
        "points": previous.get("points", []) if keep else [],
        "done": previous.get("done", []) if keep else [],
        "wall_seconds": previous.get("wall_seconds", 0.0) if keep else 0.0,
    }  # fmt: skip
    jobs = [("analytic", n) for n in plan.analytic_sizes] + [("ladder", n) for n in plan.sizes]
    todo = [job for job in jobs if list(job) not in report["done"]]
    with tempfile.TemporaryDirectory(dir=args.work, prefix="nk-scale-") as scratch:
        for kind, n in tqdm(todo, desc="scale", unit="size"):
            started = time.perf_counter()
            work = Path(scratch) / f"{kind}-{n}"
            if kind == "analytic":
                report["points"] += measure_analytic(n, plan, work)
            else:
                report["points"] += measure_size(n, plan, work, n == max(plan.sizes))
            shutil.rmtree(work, ignore_errors=True)
            report["done"].append([kind, n])
            report["wall_seconds"] += time.perf_counter() - started
            summarise(report, plan)
            _write(report, args.out)
    summarise(report, plan)
    _write(report, args.out)
    print_report(report)
    print(f"\nwrote {args.out}")
    return report


if __name__ == "__main__":
    main()
