"""Benchmark: exact vs randomized ZCA against the number of features P.

For each P (image side s, P = s*s*3) it times ``zca_fit`` with the exact solver
(P x P covariance + eigendecomposition) and the randomized one (HMT range finder,
streamed, never P x P), records peak memory, and the top-k subspace error
``||V_e V_e^T - V_r V_r^T||_2`` where both ran. Every measurement runs in its own
subprocess so that peak RSS belongs to it alone. The exact solver is skipped where
its covariance and eigendecomposition workspace would not fit ``--memory-limit-gb``.

    python benchmarks/zca.py                       # P in 3072, 12288, 49152, 150528
    python benchmarks/zca.py --sizes 32 64 --n 1024 --out /tmp/zca.json

Prints a table and writes JSON (default results/benchmarks/zca.json).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from neural_kernels.layout import script_benchmark

#: Bytes of float64 P x P matrices the exact solver holds at its peak (covariance,
#: eigenvectors, LAPACK workspace).
EXACT_MATRICES = 3


def synthetic_images(n: int, side: int, rank: int, seed: int) -> np.ndarray:
    """Images ``(n, side, side, 3)`` float32 with a decaying spectrum plus a noise floor.

    ``X = G diag(0.99**i) B + 1e-3 Z`` with ``B`` a random ``rank x P`` Gaussian
    matrix (rows of norm ~1): a clear spectral gap after ``rank`` components, and
    cheap to make at P = 150528.
    """
    rng = np.random.default_rng(seed)
    p = side * side * 3
    coefficients = rng.standard_normal((n, rank), dtype=np.float32) * (0.99 ** np.arange(rank))
    basis = rng.standard_normal((rank, p), dtype=np.float32) / np.sqrt(p)
    rows = coefficients.astype(np.float32) @ basis
    rows += 1e-3 * rng.standard_normal((n, p), dtype=np.float32) / np.sqrt(p)
    return rows.reshape(n, side, side, 3)


def measure(args: argparse.Namespace) -> dict:
    """Child process: fit once, report time, peak memory and the components."""
    import resource

    import torch

    from neural_kernels.device import device_name, peak_memory_mb, reset_peak_memory
    from neural_kernels.settings import ZcaSettings
    from neural_kernels.zca import zca_fit

    images = np.load(args.data, mmap_mode="r")
    device = torch.device(args.device)
    settings = ZcaSettings(
        solver=args.solver, rank=args.rank, oversample=args.oversample, power_iters=args.power_iters
    )
    reset_peak_memory(device)
    before_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    transform = zca_fit(images, settings, device=device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    np.save(args.components, transform.components)
    return {
        "seconds": seconds,
        "rss_before_fit_mb": before_mb,
        **peak_memory_mb(device),
        "device": device_name(device),
    }


def run_child(data: Path, solver: str, rank: int, device: str, args, components: Path) -> dict:
    command = [
        sys.executable, __file__, "--child", "--data", str(data), "--solver", solver,
        "--rank", str(rank), "--device", device, "--components", str(components),
        "--oversample", str(args.oversample), "--power-iters", str(args.power_iters),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        return {"error": result.stderr.strip().splitlines()[-1] if result.stderr else "failed"}
    return json.loads(result.stdout.strip().splitlines()[-1])


def subspace_error(a: np.ndarray, b: np.ndarray) -> float:
    """``||A A^T - B B^T||_2`` for orthonormal ``A``, ``B``: the sine of the largest
    principal angle, ``sqrt(1 - s_min(A^T B)^2)`` (no P x P matrix is formed)."""
    s_min = np.linalg.svd(a.T.astype(np.float64) @ b.astype(np.float64), compute_uv=False).min()
    return float(np.sqrt(max(0.0, 1.0 - s_min**2)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sizes",
        type=int,
        nargs="+",
        default=[32, 64, 128, 224],
        help="image sides s (P = 3 s^2); default 32 64 128 224",
    )
    parser.add_argument("--n", type=int, default=2048, help="number of images")
    parser.add_argument("--rank", type=int, default=256)
    parser.add_argument("--oversample", type=int, default=10)
    parser.add_argument("--power-iters", type=int, default=4)
    parser.add_argument("--devices", nargs="+", default=None, help="default: cpu (+ cuda)")
    parser.add_argument("--memory-limit-gb", type=float, default=16.0)
    parser.add_argument("--out", type=Path, default=Path(script_benchmark("zca")))
    # child-process options
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--solver", help=argparse.SUPPRESS)
    parser.add_argument("--device", help=argparse.SUPPRESS)
    parser.add_argument("--components", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()  # fmt: skip
    if args.child:
        print(json.dumps(measure(args)))
        return

    import torch

    devices = args.devices or ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for side in args.sizes:
            p = 3 * side * side
            data = Path(scratch) / f"images_{side}.npy"
            np.save(data, synthetic_images(args.n, side, args.rank, seed=side))
            for device in devices:
                found: dict[str, np.ndarray] = {}
                for solver in ("exact", "randomized"):
                    row = {"P": p, "image_side": side, "N": args.n, "rank": args.rank,
                           "solver": solver, "device_arg": device}  # fmt: skip
                    need_gb = EXACT_MATRICES * p * p * 8 / 1e9
                    if solver == "exact" and need_gb > args.memory_limit_gb:
                        row["skipped"] = (
                            f"needs ~{need_gb:.0f} GB for P x P float64 matrices "
                            f"(limit {args.memory_limit_gb:.0f} GB)"
                        )
                    else:
                        components = Path(scratch) / f"v_{side}_{device}_{solver}.npy"
                        row.update(run_child(data, solver, args.rank, device, args, components))
                        if "error" not in row:
                            found[solver] = np.load(components)
                    rows.append(row)
                    print(f"done P={p} {solver} {device}: {row.get('seconds', row.get('skipped'))}",
                          file=sys.stderr)  # fmt: skip
                if len(found) == 2:
                    error = subspace_error(found["exact"], found["randomized"])
                    exact_row, rand_row = rows[-2], rows[-1]
                    rand_row["subspace_error"] = error
                    rand_row["speedup_vs_exact"] = exact_row["seconds"] / rand_row["seconds"]

    record = {
        "benchmark": "zca",
        "host": platform.node(),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")

    header = f"{'P':>7} {'device':>14} {'solver':>10} {'time s':>9} {'peak RSS MB':>12} " \
             f"{'GPU MB':>8} {'subspace err':>12} {'speedup':>8}"  # fmt: skip
    print(header)
    print("-" * len(header))
    for row in rows:
        if "skipped" in row or "error" in row:
            print(f"{row['P']:>7} {row['device_arg']:>14} {row['solver']:>10}   "
                  f"{row.get('skipped') or row.get('error')}")  # fmt: skip
            continue
        print(
            f"{row['P']:>7} {row['device']:>14.14} {row['solver']:>10} {row['seconds']:>9.2f} "
            f"{row['host_peak_rss_mb']:>12.0f} {row.get('device_peak_allocated_mb', 0):>8.0f} "
            f"{row.get('subspace_error', float('nan')):>12.2e} "
            f"{row.get('speedup_vs_exact', float('nan')):>8.1f}"
        )
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
