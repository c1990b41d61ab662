"""Every GPU path of the project, measured by one command, and the thesis's jobs projected.

On one CUDA GPU (about 5 minutes on an H100/H200 with 80+ GB, warm-up included):

1. the CUDA-only tests (``pytest -m cuda``: the GPU results against the CPU's);
2. at the thesis's shapes on random data: the dense matmul rate (float64, float32,
   TF32, bf16); the estimate's throughput (Myrtle10 at 32x32, Myrtle11 at 64x64, width
   64, TF32 and bf16 features accumulated in float64) as image x feature per second and
   as a fraction of the matmul rate of its precision; the analytic kernel's pairs per
   second (Myrtle5/7/10 at 32x32, float64 and mixed); ZCA (fit and apply) at P = 3072,
   12288 and 150528; the flow's eigendecomposition at N = 20000; a boosting step at
   M = 5000; ResNet18 training at 64x64 and 224x224 and the Myrtle networks at 32x32;
3. one table, and JSON with the device (name, memory, torch and CUDA versions), every
   rate, and the projected hours of every job of ``config/thesis.yaml`` from the
   measured rates beside the current model's assumption (40 TFLOP/s for the estimate).

``python benchmarks/gpu.py --device cpu --quick`` runs the same code at tiny shapes on
the CPU in seconds (the test suite does, so that the script cannot rot); its rates
say nothing about a GPU.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import yaml
from snakemake.utils import validate

from neural_kernels import sizing
from neural_kernels.architectures import myrtle
from neural_kernels.catalog import MYRTLE_STAGES
from neural_kernels.device import device_name, resolve_device
from neural_kernels.kernels.analytic import analytic_kernel
from neural_kernels.kernels.estimate import _passes, _row_tiles, estimate_sums
from neural_kernels.layout import script_benchmark
from neural_kernels.networks import Augmentation, Normalizer, Split, train_epoch
from neural_kernels.networks.stage import new_state
from neural_kernels.networks.training import amp_dtype
from neural_kernels.settings import EstimateSettings, TrainSettings, ZcaSettings
from neural_kernels.solvers.boosting import boosting_path
from neural_kernels.solvers.flow import kernel_eigh
from neural_kernels.zca import zca_apply, zca_fit

REPO = Path(__file__).resolve().parents[1]
THESIS = REPO / "config/thesis.yaml"
#: README's and config/thesis.yaml's assumption for the estimate: one 80 GB GPU
#: sustains this on the grouped TF32 convolutions.
ASSUMED_FLOPS = 40e12
#: Images per split of each thesis dataset: (fitted rows: train + val, test rows), the
#: image side, and a subset's fitted rows and eval rows (val + test).
DATASETS = {
    "cifar10": {"fit": 50_000, "test": 10_000, "side": 32, "val": 5_000},
    "tiny_imagenet": {"fit": 100_000, "test": 10_000, "side": 64, "val": 10_000},
    "imagenet_r": {"fit": 27_000, "test": 3_000, "side": 224, "val": 2_700},
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, work: Callable[[], object], repeats: int = 1) -> float:
    """Seconds per call of ``work`` after one warm-up call."""
    work()
    sync(device)
    started = time.perf_counter()
    for _ in range(repeats):
        work()
    sync(device)
    return (time.perf_counter() - started) / repeats


# ------------------------------------------------------------------------ the rates


def matmul_rates(device: torch.device, n: int) -> dict[str, float]:
    """Dense n x n matmul FLOP/s in float64, float32, TF32 and bf16."""
    rates = {}
    for name, dtype, tf32 in (
        ("float64", torch.float64, False),
        ("float32", torch.float32, False),
        ("tf32", torch.float32, True),
        ("bf16", torch.bfloat16, False),
    ):
        a = torch.randn(n, n, device=device).to(dtype)
        previous = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = tf32
        try:
            rates[name] = 2 * n**3 / timed(device, lambda a=a: a @ a, repeats=3)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = previous
    return rates


def conv_flops_per_image_feature(arch: str, side: int, width: int) -> float:
    """Convolution FLOPs per image and per feature (an output channel of the last
    layer) of a random Myrtle network of ``width`` channels on ``side x side`` images:
    ``sum 2 side^2 9 c_in width`` over its layers (``c_in`` 3, then ``width``; each
    stage after the first halves the side), divided by ``width``."""
    flops, channels = 0.0, 3
    for index, convs in enumerate(MYRTLE_STAGES[arch]):
        side //= 2 if index else 1
        for _ in range(convs):
            flops += 2 * side * side * 9 * channels * width
            channels = width
    return flops / width


def estimate_rate(
    arch: str, side: int, precision: str, device: torch.device, images: int, networks: int
) -> dict:
    """One chunk of random networks over ``images`` random images, through the
    estimate's own code (features in ``precision``, products summed in float64)."""
    settings = EstimateSettings(
        width=64, networks=networks, chunk_networks=networks, batch_size=128,
        precision=precision,
    )  # fmt: skip
    rng = np.random.default_rng(0)
    x = rng.normal(size=(images, side, side, 3)).astype(np.float32)
    net = myrtle(arch)
    estimate_sums(net, x[:8], {}, settings, device=device, progress=False)  # warm-up
    sync(device)
    sums = estimate_sums(net, x, {}, settings, device=device, progress=False)
    features = sums["features"]
    rate = images * features / sums["seconds"]["features"]
    flops = conv_flops_per_image_feature(arch, side, 64)
    return {
        "arch": arch,
        "side": side,
        "precision": precision,
        "images": images,
        "features": features,
        "image_features_per_second": rate,
        "flops_per_image_feature": flops,
        "conv_flops": rate * flops,
        # the symmetric Gram block: N^2 F multiply-adds (one triangle computed, twice
        # counted in the dense convention)
        "gram_flops": 2 * images * images * features / max(sums["seconds"]["gram"], 1e-9),
    }


def analytic_rate(
    arch: str, precision: str, device: torch.device, images: int, side: int = 32
) -> dict:
    x = np.random.default_rng(0).normal(size=(images, side, side, 3))
    started = time.perf_counter()
    analytic_kernel(myrtle(arch), x, precision=precision, device=str(device), progress=False)
    seconds = time.perf_counter() - started
    return {
        "arch": arch,
        "side": side,
        "precision": precision,
        "images": images,
        "pairs_per_second": images * (images + 1) / 2 / seconds,
    }


def zca_rate(side: int, device: torch.device, images: int, rank: int | None) -> dict:
    """Seconds per image of fitting and applying ZCA at P = 3 side^2 (fit and apply
    both stream the images, so their time is linear in the images)."""
    x = np.random.default_rng(0).integers(0, 256, (images, side, side, 3), dtype=np.uint8)
    solver = "exact" if rank is None else "randomized"
    settings = ZcaSettings(solver=solver, rank=rank)
    started = time.perf_counter()
    transform = zca_fit(x, settings, device=device)
    out = np.empty(x.shape, np.float32)
    zca_apply(transform, x, out=out, device=device)
    sync(device)
    seconds = time.perf_counter() - started
    p = 3 * side * side
    return {"features": p, "solver": solver, "rank": rank, "images": images,
            "seconds_per_image": seconds / images}  # fmt: skip


def eigh_seconds(n: int, device: torch.device) -> dict:
    a = torch.randn(n, n, dtype=torch.float64, device=device)
    kernel = a @ a.T / n
    return {"n": n, "seconds": timed(device, lambda: kernel_eigh(kernel))}


def boosting_step_seconds(m: int, n: int, device: torch.device) -> dict:
    """One boosting step over an N x N kernel in batches of M: seconds per batch."""
    a = torch.randn(n, 64, dtype=torch.float64, device=device)
    kernel = a @ a.T / 64 + torch.eye(n, dtype=torch.float64, device=device)
    targets = torch.randn(n, 10, dtype=torch.float64, device=device)

    def one_step() -> None:
        for _ in boosting_path(
            kernel, targets, {}, batch_size=m, steps=1, eta_ts=[100.0, 1000.0, 10000.0],
            progress=False,
        ):  # fmt: skip
            pass

    seconds = timed(device, one_step)
    return {
        "m": m,
        "n": n,
        "batches": math.ceil(n / m),
        "seconds_per_batch": seconds / math.ceil(n / m),
    }  # noqa: E501


def train_rate(model: str, side: int, width: int, device: torch.device, images: int) -> dict:
    """Training images per second of one epoch of the package's own SGD step (bf16
    autocast and channels_last on a GPU, as ``neural-kernels train`` runs it)."""
    settings = TrainSettings(model=model, width=width, epochs=1, batch_size=128)
    amp, channels_last = amp_dtype(device), device.type == "cuda"
    data = {"num_classes": 10, "input_shape": [side, side, 3]}
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (images, side, side, 3), dtype=torch.uint8, generator=gen)
    split = Split(x.to(device), torch.randint(0, 10, (images,), generator=gen).to(device))
    state = new_state(settings, data, images, device, amp, channels_last)
    normalize = Normalizer([0.5] * 3, [0.25] * 3, device, channels_last)

    def epoch() -> None:
        train_epoch(state, split, Augmentation(), normalize, 128, device, amp, progress=False)

    return {"model": model, "side": side, "width": width, "images": images,
            "images_per_second": images / timed(device, epoch)}  # fmt: skip


# ------------------------------------------------------------------ the projection


def _estimate_job(name: str, kernel: dict, sizes: dict, memory: float, rates: dict) -> dict:
    side = kernel["crop"] or sizes["side"]
    copies = kernel.get("copies", 1) if kernel["crop"] else 1
    n_train = sizes["fit"] * (2 if kernel["flips"] else 1) * copies
    n_eval = sizes["test"] + (sizes["val"] if kernel["crop"] else 0)
    chunk_features = kernel["chunk_networks"] * kernel["width"]
    budget = 0.75 * (memory - 3 * (n_train + n_eval) * chunk_features * 4)
    tiles = _row_tiles(n_train, n_eval, kernel.get("tile_rows", 2048))
    passes = len(_passes(tiles, n_train, int(budget)))
    features = kernel["networks"] * kernel["width"]
    flops = (
        (passes * n_train + n_eval)
        * features
        * conv_flops_per_image_feature(kernel["arch"], side, kernel["width"])
    )
    # the measured conv rate of the nearest measured network, in the kernel's precision
    measured = [r for r in rates["estimate"] if r["precision"] == kernel["precision"]]
    nearest = min(measured or rates["estimate"], key=lambda r: abs(r["side"] - side))
    gram = 2 * (n_train * (n_train + 1) / 2 + n_eval * n_train) * features
    seconds = flops / nearest["conv_flops"] + gram / nearest["gram_flops"]
    return {
        "job": name, "kind": "estimate", "passes": passes,
        "measured_hours": seconds / 3600, "model_hours": flops / ASSUMED_FLOPS / 3600,
        "from": f"{nearest['arch']} at {nearest['side']}x{nearest['side']}",
    }  # fmt: skip


def thesis_projection(config: dict, rates: dict, memory: float) -> list[dict]:
    """Projected hours of every job of ``config`` (config/thesis.yaml) on this device."""
    jobs = []
    analytic = {(r["arch"], r["precision"]): r["pairs_per_second"] for r in rates["analytic"]}
    for dataset, cfg in config["datasets"].items():
        sizes = DATASETS[cfg["source"]]
        views = [("full", cfg.get("kernels", []), sizes)]
        if subsets := cfg.get("subsets"):
            sub = {**sizes, "fit": subsets["sizes"][0], "test": sizes["val"] + sizes["test"]}
            views.append((f"subset x{len(subsets['seeds'])}", subsets["kernels"], sub))
        for view, kernels, view_sizes in views:
            for name in kernels:
                kernel = {
                    "crop": None,
                    "flips": False,
                    "tile_rows": 2048,
                    **config["kernels"][name],
                }
                job = f"{dataset}/{view}/{name}"
                if kernel["method"] == "estimate":
                    jobs.append(_estimate_job(job, kernel, view_sizes, memory, rates))
                    continue
                n, m = view_sizes["fit"], view_sizes["test"]
                pairs = n * (n + 1) / 2 + m * n
                rate = analytic.get((kernel["arch"], kernel.get("precision", "float64")))
                jobs.append({"job": job, "kind": "analytic",
                             "measured_hours": pairs / rate / 3600 if rate else None,
                             "model_hours": None})  # fmt: skip
        p = 3 * sizes["side"] ** 2
        zca = min(rates["zca"], key=lambda r: abs(r["features"] - p))
        total = sizes["fit"] + sizes["test"]
        jobs.append({"job": f"{dataset}/zca", "kind": "zca", "model_hours": None,
                     "measured_hours": zca["seconds_per_image"] * total / 3600})  # fmt: skip
        for network in cfg.get("networks", []):
            net = config["networks"][network]
            side = net.get("crop") or sizes["side"]
            measured = [r for r in rates["training"] if r["model"] == net["model"]]
            if not measured:
                continue
            nearest = min(measured, key=lambda r: abs(r["side"] - side))
            # convolutions scale with the pixels: from the nearest measured side
            per_image = (side / nearest["side"]) ** 2 / nearest["images_per_second"]
            hours = net["epochs"] * sizes["fit"] * per_image / 3600
            jobs.append({"job": f"{dataset}/{network}", "kind": "training",
                         "measured_hours": hours, "model_hours": None})  # fmt: skip
    return jobs + _solve_jobs(config, rates)


def _solve_jobs(config: dict, rates: dict) -> list[dict]:
    """Every full-split solve of ``config`` (:func:`neural_kernels.sizing.planned_solves`):
    on the GPU, the flow's eigendecomposition (N^3 from the measured N) or boosting's
    steps from the measured rates, pcg and ridge from the sizing model (pcg is bound by
    reading the kernel from disk); CPU solves (device cpu) are not projected here."""
    jobs: dict[str, dict] = {}
    for solve in sizing.planned_solves(sizing_config(config)):
        if not solve.on_gpu:
            jobs[f"{solve.dataset}/full/*/{solve.solver}"] = {
                "kind": "solve (CPU)", "measured_hours": None, "model_hours": solve.hours
            }  # fmt: skip
            continue
        n, settings = solve.sizes.rows, config["solvers"][solve.solver]
        measured = None
        if solve.method == "boosting":
            step = rates["boosting"]
            per_batch = step["seconds_per_batch"] * (n / step["n"])  # the M x N products
            measured = settings["steps"] * math.ceil(n / settings["batch_size"]) * per_batch
        elif solve.method == "flow":
            measured = rates["eigh"]["seconds"] * (n / rates["eigh"]["n"]) ** 3
        jobs[f"{solve.dataset}/full/{solve.kernel}/{solve.solver}"] = {
            "kind": "solve", "model_hours": solve.hours,
            "measured_hours": None if measured is None else 2 * measured / 3600,
        }  # fmt: skip
    return [{"job": name, **job} for name, job in jobs.items()]


def sizing_config(config: dict) -> dict:
    """``config`` with the schema's defaults filled in, as the workflow reads it."""
    filled = copy.deepcopy(config)
    validate(filled, str(sizing.SCHEMA))
    return filled


# ------------------------------------------------------------------------ the script


def cuda_tests() -> dict:
    """``pytest -m cuda`` in a subprocess: the GPU paths against the CPU's."""
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider"],
        cwd=REPO, capture_output=True, text=True, check=False,
    )  # fmt: skip
    counts = dict(
        (kind, int(n))
        for n, kind in re.findall(r"(\d+) (passed|failed|skipped|error)", done.stdout)
    )
    return {"returncode": done.returncode, "seconds": time.perf_counter() - started,
            **counts, "tail": done.stdout[-1500:]}  # fmt: skip


def device_info(device: torch.device) -> dict:
    info = {
        "device": device_name(device), "torch": torch.__version__,
        "cuda": torch.version.cuda, "host": platform.node(), "threads": torch.get_num_threads(),
    }  # fmt: skip
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info |= {"name": props.name, "memory_bytes": props.total_memory}
    return info


def measure(device: torch.device, quick: bool) -> dict:
    """Every rate, and the seconds each section took; ``quick``: tiny shapes (a smoke
    run of the same code, seconds on a CPU)."""
    q = quick
    precisions = ("tf32", "bf16") if device.type == "cuda" else ("float32", "bf16")
    sections: dict[str, Callable[[], object]] = {
        "matmul_flops": lambda: matmul_rates(device, 256 if q else 8192),
        "estimate": lambda: [
            estimate_rate(arch, side, p, device, 16 if q else 4096, 1 if q else 16)
            for arch, side in (("myrtle10", 32), ("myrtle11", 64))
            for p in precisions
        ],
        "analytic": lambda: [
            analytic_rate(
                arch, p, device, 2 if q else (64 if arch == "myrtle5" else 32), 8 if q else 32
            )
            for arch in ("myrtle5", "myrtle7", "myrtle10")
            for p in ("float64", "mixed")
        ],
        "zca": lambda: [
            zca_rate(8 if q else 32, device, 64 if q else 20_000, None),
            zca_rate(64, device, 16 if q else 20_000, 8 if q else 4096),
            zca_rate(224, device, 4 if q else 4_200, 2 if q else 4096),
        ],
        "eigh": lambda: eigh_seconds(200 if q else 20_000, device),
        "boosting": lambda: boosting_step_seconds(50 if q else 5000, 200 if q else 20_000, device),
        "training": lambda: (
            [
                train_rate("resnet18", side, 64, device, 16 if q else 4096)
                for side in ((8, 16) if q else (64, 224))
            ]
            + [
                train_rate(model, 8 if q else 32, 8 if q else 256, device, 16 if q else 8192)
                for model in ("myrtle7", "myrtle10")
            ]
        ),
    }
    rates: dict = {"seconds": {}}
    for name, section in sections.items():
        started = time.perf_counter()
        rates[name] = section()
        rates["seconds"][name] = time.perf_counter() - started
    return rates


def print_table(report: dict) -> None:
    info, rates = report["device"], report["rates"]
    print(f"device: {info['device']} (torch {info['torch']}, CUDA {info['cuda']})")
    tests = report["cuda_tests"]
    if tests:
        print(f"CUDA tests: {tests.get('passed', 0)} passed, {tests.get('failed', 0)} failed")
    mm = rates["matmul_flops"]
    print("matmul TFLOP/s: " + ", ".join(f"{k} {v / 1e12:.1f}" for k, v in mm.items()))
    print(f"\n{'estimate':<22}{'img*feat/s':>12}{'conv TFLOP/s':>14}{'of matmul':>11}")
    for r in rates["estimate"]:
        share = r["conv_flops"] / mm[r["precision"] if r["precision"] in mm else "float32"]
        label = f"{r['arch']} {r['side']}px {r['precision']}"
        print(f"{label:<22}{r['image_features_per_second']:>12.3g}"
              f"{r['conv_flops'] / 1e12:>14.2f}{share:>10.0%}")  # fmt: skip
    print(f"\n{'analytic (32x32)':<22}{'pairs/s':>12}")
    for r in rates["analytic"]:
        print(f"{r['arch'] + ' ' + r['precision']:<22}{r['pairs_per_second']:>12.3g}")
    print()
    for r in rates["zca"]:
        print(f"ZCA P={r['features']} ({r['solver']}): {r['seconds_per_image'] * 1e3:.3f} ms/image")
    e, b = rates["eigh"], rates["boosting"]
    print(f"flow eigh N={e['n']}: {e['seconds']:.2f} s; boosting M={b['m']}: "
          f"{b['seconds_per_batch']:.3f} s/batch (N={b['n']})")  # fmt: skip
    for r in rates["training"]:
        print(f"train {r['model']} {r['side']}px: {r['images_per_second']:.0f} img/s")
    print(f"\n{'config/thesis.yaml job':<52}{'measured h':>11}{'model h':>9}")
    for job in report["thesis_jobs"]:
        measured, model = job["measured_hours"], job["model_hours"]
        print(f"{job['job']:<52}{'-' if measured is None else f'{measured:.2f}':>11}"
              f"{'-' if model is None else f'{model:.2f}':>9}")  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default), cpu or auto")
    parser.add_argument("--quick", action="store_true", help="tiny shapes (a smoke run)")
    parser.add_argument("--skip-tests", action="store_true", help="do not run pytest -m cuda")
    parser.add_argument("--out", type=Path, default=Path(script_benchmark("gpu")))
    args = parser.parse_args(argv)
    os.environ["TQDM_DISABLE"] = "1"  # the stages' progress bars (tqdm reads it)
    device = resolve_device(args.device)
    torch.manual_seed(0)
    started = time.perf_counter()
    run_tests = device.type == "cuda" and not args.skip_tests
    report = {"device": device_info(device), "quick": args.quick,
              "cuda_tests": cuda_tests() if run_tests else None}  # fmt: skip
    report["rates"] = measure(device, args.quick)
    memory = report["device"].get("memory_bytes", 80e9)
    config = yaml.safe_load(THESIS.read_text())
    report["assumed_estimate_flops"] = ASSUMED_FLOPS
    report["thesis_jobs"] = thesis_projection(config, report["rates"], memory)
    report["seconds"] = time.perf_counter() - started
    print_table(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out} ({report['seconds']:.0f} s)")
    return report


if __name__ == "__main__":
    main()
