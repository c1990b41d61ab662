"""Kernel throughput: the random-network estimate and the analytic recursion.

Prints a table and writes JSON (default ``results/benchmarks/kernels.json``):

* estimate: images x features per second of the feature pass and of the Gram
  accumulation (with the dense-matmul throughput of the same device beside it), for
  Myrtle5 and Myrtle10 on random CIFAR-shaped data, and the projected time of the
  thesis's largest run (CIFAR-10 Myrtle10, 800k features, train with flips + test);
* analytic: pairs per second for Myrtle5/10 on CIFAR-shaped data, and the time of the
  analytic Myrtle5 kernel of 1024 digits (8x8x1, float64; 59.7 s on this project's
  2-core AVX2 machine, where neural-tangents took 257.6 s in the same run) and, when
  neural-tangents is installed (not a dependency), its pooled NNGP kernel of
  the same digits timed in the same run (``tests/nt_reference.py``, float64 on the
  CPU): the ratio of the two is the speed-up over the reference library.

Runs on CUDA when present (``--device``). Usage: ``python benchmarks/kernels.py``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits

from neural_kernels.architectures import myrtle
from neural_kernels.device import device_name, resolve_device
from neural_kernels.kernels.analytic import analytic_kernel
from neural_kernels.kernels.estimate import (
    EstimateSettings,
    _matmul_precision,
    chunk_parameters,
    random_features,
)
from neural_kernels.layout import script_benchmark

CIFAR_TRAIN, CIFAR_TEST, THESIS_FEATURES = 50_000, 10_000, 800_000


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_flops(device: torch.device, n: int, precision: str) -> float:
    """Dense float32 (or TF32) matmul throughput, FLOP/s, of an n x n product."""
    a = torch.randn(n, n, device=device)
    with _matmul_precision(precision):
        a @ a
        sync(device)
        started = time.perf_counter()
        repeats = 5
        for _ in range(repeats):
            a @ a
        sync(device)
    return repeats * 2 * n**3 / (time.perf_counter() - started)


def bench_estimate(
    arch_name: str, device: torch.device, images: int, settings: EstimateSettings, rows: int
) -> dict:
    arch = myrtle(arch_name)
    data = np.random.default_rng(0).normal(size=(images, 32, 32, 3)).astype(np.float32)
    params = chunk_parameters(arch, settings, 0, 3)
    with _matmul_precision(settings.precision):
        random_features(
            arch, params, data[:8], batch_size=8, device=device, precision=settings.precision
        )
        sync(device)
        started = time.perf_counter()
        phi = random_features(
            arch,
            params,
            data,
            batch_size=settings.batch_size,
            device=device,
            precision=settings.precision,
        )
        sync(device)
        feature_seconds = time.perf_counter() - started
        # Gram accumulation: a (rows x f) by (f x rows) product added into float64.
        block = torch.randn(rows, phi.shape[1], device=device)
        acc = torch.zeros(rows, rows, dtype=torch.float64, device=device)
        acc.add_(block @ block.T)
        sync(device)
        started = time.perf_counter()
        for _ in range(3):
            acc.add_(block @ block.T)
        sync(device)
        gram_seconds = (time.perf_counter() - started) / 3
    features = phi.shape[1]
    gram_flops = 2 * rows * rows * features / gram_seconds
    feature_rate = images * features / feature_seconds
    # The thesis's largest estimate: features for 100k (train + flips) + 10k test images,
    # and the train triangle plus the test x train block of the Gram matrix.
    n_train, n_eval = 2 * CIFAR_TRAIN, CIFAR_TEST
    projected_features = (n_train + n_eval) * THESIS_FEATURES / feature_rate
    gram_entries = n_train * (n_train + 1) / 2 + n_eval * n_train
    projected_gram = 2 * gram_entries * THESIS_FEATURES / gram_flops
    return {
        "arch": arch_name,
        "width": settings.width,
        "networks": settings.chunk_networks,
        "precision": settings.precision,
        "images": images,
        "image_features_per_second": feature_rate,
        "gram_flops": gram_flops,
        "projected_cifar10_800k_seconds": {
            "features": projected_features,
            "gram": projected_gram,
            "total": projected_features + projected_gram,
        },
    }


def bench_analytic(
    arch_name: str, device: torch.device, shape: tuple[int, ...], n: int, precision: str
) -> dict:
    arch = myrtle(arch_name)
    data = np.random.default_rng(0).normal(size=(n, *shape))
    started = time.perf_counter()
    analytic_kernel(arch, data, precision=precision, device=str(device), progress=False)
    seconds = time.perf_counter() - started
    pairs = n * (n + 1) / 2
    return {
        "arch": arch_name,
        "shape": list(shape),
        "images": n,
        "precision": precision,
        "seconds": seconds,
        "pairs_per_second": pairs / seconds,
        "projected_cifar10_seconds": (
            CIFAR_TRAIN * (CIFAR_TRAIN + 1) / 2 + CIFAR_TEST * CIFAR_TRAIN
        )
        / (pairs / seconds),
    }


NT_REFERENCE = Path(__file__).resolve().parents[1] / "tests/nt_reference.py"


def digits_images(n: int) -> np.ndarray:
    """The first ``n`` digits, ``(n, 8, 8, 1)`` float64, standardised."""
    x = load_digits().images[:n, :, :, None].astype(np.float64) / 16.0
    return (x - x.mean(0)) / x.std()


def bench_neural_tangents(n: int) -> dict | None:
    """neural-tangents' Myrtle5 NNGP kernel of the same digits (seconds of the kernel
    alone, in its own interpreter), or ``None`` when it is not installed."""
    if importlib.util.find_spec("neural_tangents") is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        np.save(Path(tmp) / "images.npy", digits_images(n))
        done = subprocess.run(
            [sys.executable, str(NT_REFERENCE), tmp, str(Path(tmp) / "k.npy")],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"{NT_REFERENCE.name} failed on {n} digits:\n{done.stderr[-2000:]}")
    seconds = float(done.stdout.split("seconds=")[-1].split()[0])
    return {"images": n, "precision": "float64", "seconds": seconds}


def bench_digits(device: torch.device, n: int, precision: str) -> dict:
    x = digits_images(n)
    started = time.perf_counter()
    analytic_kernel(myrtle("myrtle5"), x, precision=precision, device=str(device), progress=False)
    return {"images": n, "precision": precision, "seconds": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=Path(script_benchmark("kernels")))
    parser.add_argument("--quick", action="store_true", help="smaller sizes (a smoke run)")
    args = parser.parse_args()
    device = resolve_device(args.device)
    gpu = device.type == "cuda"
    torch.manual_seed(0)
    report: dict = {"device": device_name(device), "threads": torch.get_num_threads()}

    precisions = ["float32", "tf32", "bf16"] if gpu else ["float32"]
    images = 4096 if gpu else (64 if args.quick else 256)
    rows = 16384 if gpu else 2048
    report["matmul_flops"] = {
        p: matmul_flops(device, 8192 if gpu else 1024, p) for p in precisions if p != "bf16"
    }
    report["estimate"] = []
    for arch_name in ("myrtle5", "myrtle10"):
        for precision in precisions:
            settings = EstimateSettings(
                width=64,
                networks=16 if gpu else 4,
                chunk_networks=16 if gpu else 4,
                batch_size=256 if gpu else 64,
                precision=precision,
            )
            report["estimate"].append(bench_estimate(arch_name, device, images, settings, rows))

    report["analytic"] = [
        bench_analytic("myrtle5", device, (32, 32, 3), 64 if gpu else 8, "float64"),
        bench_analytic("myrtle10", device, (32, 32, 3), 64 if gpu else 4, "float64"),
        bench_analytic("myrtle5", device, (32, 32, 3), 64 if gpu else 8, "mixed"),
    ]
    n_digits = 256 if args.quick else 1024
    report["digits_myrtle5_analytic"] = [
        bench_digits(device, n_digits, p) for p in ("float64", "mixed")
    ]
    report["digits_myrtle5_neural_tangents"] = bench_neural_tangents(n_digits)

    print(f"device: {report['device']} ({report['threads']} threads)")
    print("\nestimate (random CIFAR-shaped data, width 64)")
    print(
        f"{'arch':<9}{'precision':<10}{'img*feat/s':>12}{'gram TFLOP/s':>14}"
        f"{'matmul TFLOP/s':>16}{'CIFAR-10 800k (h)':>19}"
    )
    for row in report["estimate"]:
        peak = report["matmul_flops"].get(row["precision"], report["matmul_flops"]["float32"])
        print(
            f"{row['arch']:<9}{row['precision']:<10}{row['image_features_per_second']:>12.3g}"
            f"{row['gram_flops'] / 1e12:>14.3f}{peak / 1e12:>16.3f}"
            f"{row['projected_cifar10_800k_seconds']['total'] / 3600:>19.1f}"
        )
    print("\nanalytic (random CIFAR-shaped data)")
    print(f"{'arch':<9}{'precision':<10}{'pairs/s':>10}{'CIFAR-10 (h)':>14}")
    for row in report["analytic"]:
        print(
            f"{row['arch']:<9}{row['precision']:<10}{row['pairs_per_second']:>10.3g}"
            f"{row['projected_cifar10_seconds'] / 3600:>14.0f}"
        )
    for row in report["digits_myrtle5_analytic"]:
        print(
            f"\nanalytic Myrtle5, {row['images']} digits, {row['precision']}: "
            f"{row['seconds']:.1f} s"
        )
    reference = report["digits_myrtle5_neural_tangents"]
    if reference is not None:
        ours = report["digits_myrtle5_analytic"][0]["seconds"]
        print(
            f"neural-tangents, the same {reference['images']} digits, float64: "
            f"{reference['seconds']:.1f} s; ours is {reference['seconds'] / ours:.1f}x faster"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
