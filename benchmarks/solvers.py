"""Kernel solvers: time, peak memory and accuracy against N.

Prints a table and writes JSON (default ``results/benchmarks/solvers.json``):

* scaling: for N = 1024 ... 8192 training points of a 10-class synthetic problem
  (sklearn ``make_classification``, RBF kernel, 4000 validation and 4000 test
  points), the eigendecomposition gradient flow, kernel ridge regression (Cholesky),
  kernel ridge by preconditioned conjugate gradients (pcg) and batched boosting at
  fixed M, all on the same kernel: wall time, peak memory (host RSS of a fresh
  process; device memory on a GPU), and the test accuracy of the validation-selected
  hyperparameter; each measurement runs in its own process so that peaks do not mix;
* beyond memory: a kernel of ``--big`` rows (default 20000: a 3.2 GB train block)
  written to disk, and the ``solve`` stage's flow, boosting and pcg on it, each in a
  cgroup capped at half the train block (at least 1 GiB; ``--cap-gb``; uncapped where
  no cgroup can be made): flow refuses up front, boosting and pcg stream the kernel from disk;
* the target: once N >= 8 M, boosting within 0.5 points of the full solve (the flow)
  in a quarter of its time or less;
* digits: the accuracy each solver reaches on the default workflow's Myrtle5 kernels
  (``results/kernels/digits/full/*``) when they exist (run ``snakemake --cores 2``
  first), through the same ``solve`` stage as the workflow.

Runs on CUDA when present (``--device``). Usage: ``python benchmarks/solvers.py``
(about 15 minutes on 2 CPU cores; ``--quick`` for a smoke run).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import make_classification

from neural_kernels.device import device_name, peak_memory_mb, reset_peak_memory, resolve_device
from neural_kernels.layout import script_benchmark
from neural_kernels.solvers import boosting_path, flow_path, one_hot_targets, ridge_path
from neural_kernels.solvers.pcg import pcg_path
from neural_kernels.solvers.stage import SolverSettings, solve_files

EVAL = 4000  # validation and test points each (+-0.7 points of sampling noise)
ETA_T = [1.0, 10.0, 100.0, 1e3, 1e4, 1e6]
LAMBDAS = [1.0, 0.1, 1e-2, 1e-3, 1e-4, 1e-6]
#: pcg: the solver's defaults but the grid (ridge's above)
PCG = {"rank": 1000, "tolerance": 1e-8, "max_iterations": 500}
METHODS = ("flow", "ridge", "pcg", "boosting")
#: The solves beyond memory: what each runs (small boosting and pcg grids: each pass
#: over the kernel is read from disk under the cap)
BIG_SOLVES = {
    "flow": [],
    "boosting": ["--batch-size", "2000", "--steps", "3", "--eta-t", "1000"],
    "pcg": ["--rank", "500", "--lambdas", "1.0", "0.1", "--tolerance", "1e-6"],
}
MEMORY_CGROUP = Path("/sys/fs/cgroup/memory")
#: The smallest default cap: Python and torch alone take 0.53 GB (0.29 GB anonymous).
MIN_CAP = 1 << 30


def problem(n: int, device: torch.device) -> tuple[torch.Tensor, dict, dict]:
    """RBF kernel blocks of a 10-class synthetic problem with ``n`` training points."""
    x, y = make_classification(
        n_samples=n + 2 * EVAL, n_features=64, n_informative=24, n_redundant=8,
        n_classes=10, n_clusters_per_class=2, random_state=0,
    )  # fmt: skip
    x = torch.from_numpy((x - x.mean(0)) / x.std(0)).to(device)
    kernel = torch.exp(-(torch.cdist(x, x[:n]) ** 2) / (2 * x.shape[1]))
    blocks = {"val": kernel[n : n + EVAL], "test": kernel[n + EVAL :]}
    labels = {"train": y[:n], "val": y[n : n + EVAL], "test": y[n + EVAL :]}
    return kernel[:n].contiguous(), blocks, labels


def accuracy(scores: torch.Tensor, labels: np.ndarray) -> float:
    return float((scores.argmax(1).cpu().numpy() == labels).mean())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_one(method: str, n: int, batch_size: int, steps: int, device_arg: str) -> dict:
    """One (method, N) measurement; run in a fresh process by :func:`main`."""
    device = resolve_device(device_arg)
    kernel, evals, labels = problem(n, device)
    targets = torch.from_numpy(one_hot_targets(labels["train"], 10)).to(device)
    torch.linalg.eigh(torch.eye(4, dtype=torch.float64, device=device))  # load LAPACK
    sync(device)
    reset_peak_memory(device)
    started = time.perf_counter()
    points = []  # (seconds so far, val accuracy, test accuracy, hyperparameters)
    if method == "boosting":
        path = boosting_path(
            kernel, targets, evals, batch_size=batch_size, steps=steps, eta_ts=ETA_T[:4],
            progress=False,
        )  # fmt: skip
        for step, scores in path:
            sync(device)
            for eta_t, score in zip(ETA_T, scores, strict=False):
                points.append(
                    (time.perf_counter() - started, accuracy(score["val"], labels["val"]),
                     accuracy(score["test"], labels["test"]), {"step": step, "eta_t": eta_t})
                )  # fmt: skip
    elif method == "pcg":
        settings = SolverSettings("pcg", lambdas=tuple(LAMBDAS), **PCG)
        for value, scores, diagnostics in pcg_path(kernel, targets, evals, settings):
            sync(device)
            points.append(
                (time.perf_counter() - started, accuracy(scores["val"], labels["val"]),
                 accuracy(scores["test"], labels["test"]),
                 {"value": value, "iterations": diagnostics["iterations"]})
            )  # fmt: skip
    else:
        path = flow_path if method == "flow" else ridge_path
        grid = ETA_T if method == "flow" else LAMBDAS
        for value, scores in path(kernel, targets, evals, grid):
            sync(device)
            points.append(
                (time.perf_counter() - started, accuracy(scores["val"], labels["val"]),
                 accuracy(scores["test"], labels["test"]), {"value": value})
            )  # fmt: skip
    seconds = time.perf_counter() - started
    best = max(range(len(points)), key=lambda i: (points[i][1], -i))
    return {
        "method": method,
        "n": n,
        "batch_size": batch_size if method == "boosting" else None,
        "seconds": seconds,
        # boosting stops at the selected step; the full solvers need their whole grid
        "seconds_to_selected": points[best][0] if method == "boosting" else seconds,
        "selected": points[best][3],
        "val_accuracy": points[best][1],
        "test_accuracy": points[best][2],
        "device": device_name(device),
        **peak_memory_mb(device),
    }


def run_isolated(method: str, n: int, batch_size: int, steps: int, device: str) -> dict:
    command = [sys.executable, __file__, "--one", method, str(n), str(batch_size), str(steps)]
    result = subprocess.run(
        [*command, "--device", device], capture_output=True, text=True, check=True
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def digits_accuracy(kernels: Path, device: str) -> list[dict]:
    """The solve stage on the default workflow's digits kernels, if they exist."""
    data = Path("results/data/digits")
    labels = {split: data / f"{split}_labels.npy" for split in ("train", "val", "test")}
    rows = []
    for kernel_dir in sorted(kernels.glob("*/kernel.json")):
        for method in METHODS:
            settings = SolverSettings.using(method, batch_size=160, steps=20)
            with tempfile.TemporaryDirectory() as out:
                record = solve_files(
                    kernel_dir.parent, labels, Path(out), settings, device=device, progress=False
                )
            rows.append(
                {
                    "kernel": kernel_dir.parent.name,
                    "method": method,
                    "selected": {k: v for k, v in record["selected"].items() if k in
                                 ("eta_t", "lambda", "step")},
                    "val_accuracy": record["selected"]["accuracy"]["val"],
                    "test_accuracy": record["test_accuracy"],
                    "best_on_test": record["best_on_test"]["accuracy"]["test"],
                    "seconds": record["seconds"]["solve"],
                }
            )  # fmt: skip
    return rows


def write_rbf_kernel(root: Path, rows: int, eval_rows: int) -> tuple[Path, dict[str, Path]]:
    """A subset-layout kernel directory on disk: an RBF kernel of 10 seeded Gaussian
    classes (train ``rows x rows``, val and test ``eval_rows x rows``, float64), written
    in row blocks and evicted from the page cache, so that a capped solve reads it from
    disk. Returns the directory and the label files."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(10, 32))
    kernel_dir, labels, points = root / "kernel", {}, {}
    kernel_dir.mkdir(parents=True)
    for split, count in (("train", rows), ("val", eval_rows), ("test", eval_rows)):
        y = rng.integers(0, 10, count)
        points[split] = torch.from_numpy(centres[y] + 1.5 * rng.normal(size=(count, 32)))
        labels[split] = root / f"{split}_labels.npy"
        np.save(labels[split], y)
    for split, x in points.items():
        path = kernel_dir / f"{split}.npy"
        block = np.lib.format.open_memmap(path, "w+", np.float64, (len(x), rows))
        for start in range(0, len(x), 2048):
            distances = torch.cdist(x[start : start + 2048], points["train"]) ** 2
            block[start : start + 2048] = torch.exp(-distances / 256).numpy()
        block.flush()
        del block
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())
            os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    layout = [{"split": "train", "start": 0, "stop": rows, "mirrored": False}]
    record = {"method": "estimate", "flips": False, "inputs": {"train": {"rows": rows}}}
    record["inputs"]["train"]["layout"] = layout
    (kernel_dir / "kernel.json").write_text(json.dumps(record))
    return kernel_dir, labels


def capped_solve(kernel_dir: Path, labels: dict, method: str, cap: int | None, out: Path) -> dict:
    """``neural-kernels solve`` in a fresh process, in a cgroup of ``cap`` bytes if given:
    exit status, seconds, the cgroup's peak (page cache included) and the metrics."""
    command = [sys.executable, "-m", "neural_kernels", "solve", "--kernel-dir", str(kernel_dir),
               "--labels", *(f"{s}={p}" for s, p in labels.items()), "--method", method,
               *BIG_SOLVES[method], "--out-dir", str(out / method)]  # fmt: skip
    group = MEMORY_CGROUP / f"nk-bench-{os.getpid()}-{method}" if cap else None
    if group:
        group.mkdir()
        (group / "memory.limit_in_bytes").write_text(str(cap))
        command = ["sh", "-c", f'echo $$ > {group}/cgroup.procs && exec "$@"', "sh", *command]
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - started
    row = {"method": method, "returncode": result.returncode, "seconds": seconds}
    if group:
        row["cgroup_peak_mb"] = int((group / "memory.max_usage_in_bytes").read_text()) / 2**20
        group.rmdir()
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    row["error"] = errors[-1] if errors else None
    metrics = out / method / "metrics.json"
    if result.returncode == 0:
        record = json.loads(metrics.read_text())
        row |= {"test_accuracy": record["test_accuracy"], "selected": record["selected"]}
    return row


def beyond_memory(rows: int, cap_gb: float | None) -> dict:
    """flow, boosting and pcg on a kernel of ``rows`` rows under a memory cap (default:
    half its train block, but at least :data:`MIN_CAP`), in one run."""
    block = 8 * rows * rows
    cap = int(cap_gb * 2**30) if cap_gb else max(MIN_CAP, block // 2)
    if not os.access(MEMORY_CGROUP, os.W_OK):
        cap = None  # no cgroup here: uncapped, and said so
    with tempfile.TemporaryDirectory() as tmp:
        kernel_dir, labels = write_rbf_kernel(Path(tmp), rows, 1000)
        solves = [capped_solve(kernel_dir, labels, m, cap, Path(tmp)) for m in BIG_SOLVES]
    return {"rows": rows, "train_block_gb": block / 2**30,
            "cap_gb": cap / 2**30 if cap else None, "solves": solves}  # fmt: skip


def boosting_target(scaling: list[dict], batch_size: int) -> list[dict]:
    """The issue's target at every N >= 8 M: boosting within 0.5 points of the flow's test
    accuracy, reaching its selected step in at most a quarter of the flow's time."""
    rows = []
    for n in sorted({r["n"] for r in scaling if r["n"] >= 8 * batch_size}):
        by_method = {r["method"]: r for r in scaling if r["n"] == n}
        boost, full = by_method["boosting"], by_method["flow"]
        gap = round(100 * (full["test_accuracy"] - boost["test_accuracy"]), 6)
        ratio = boost["seconds_to_selected"] / full["seconds"]
        rows.append(
            {"n": n, "batch_size": batch_size, "accuracy_gap_points": gap,
             "time_ratio": ratio, "met": gap <= 0.5 and ratio <= 0.25}
        )  # fmt: skip
    return rows


def solver_table(report: dict) -> list[dict]:
    """One table of time and accuracy: every solver at every N in memory (the scaling
    runs, where flow fits), then pcg and boosting, and flow's refusal, beyond memory."""
    rows = [
        {"n": r["n"], "method": r["method"], "where": "in memory", "seconds": r["seconds"],
         "peak_mb": r.get("device_peak_allocated_mb", r["host_peak_rss_mb"]),
         "test_accuracy": r["test_accuracy"], "note": f"selected {r['selected']}"}
        for r in report["scaling"]
    ]  # fmt: skip
    big = report["beyond_memory"]
    where = f"capped {big['cap_gb']:.2f} GiB" if big["cap_gb"] else "uncapped (no cgroup)"
    for r in big["solves"]:
        chosen = {
            k: v for k, v in r.get("selected", {}).items() if k in ("eta_t", "lambda", "step")
        }
        note = r["error"] or f"selected {chosen}"
        rows.append(
            {"n": big["rows"], "method": r["method"], "where": where, "seconds": r["seconds"],
             "peak_mb": r.get("cgroup_peak_mb"), "test_accuracy": r.get("test_accuracy"),
             "note": note if r["returncode"] == 0 else f"exit {r['returncode']}: {note}"}
        )  # fmt: skip
    return rows


def print_report(report: dict) -> None:
    print(f"device: {report['device']} ({report['threads']} threads)")
    print("\nsolvers: synthetic 10-class RBF kernels, test accuracy of the val-selected point")
    print(f"{'N':>6} {'method':<9}{'where':<22}{'seconds':>9}{'peak MiB':>10}{'test acc':>9}  note")
    for r in report["table"]:
        peak = "-" if r["peak_mb"] is None else f"{r['peak_mb']:.0f}"
        acc = "-" if r["test_accuracy"] is None else f"{r['test_accuracy']:.3f}"
        print(f"{r['n']:>6} {r['method']:<9}{r['where']:<22}{r['seconds']:>9.2f}{peak:>10}"
              f"{acc:>9}  {r['note'][:90]}")  # fmt: skip
    print("\ntarget: boosting within 0.5 points of the flow in <= 1/4 of its time, N >= 8 M")
    for r in report["target"]:
        print(
            f"N = {r['n']}: gap {r['accuracy_gap_points']:+.2f} points, time ratio "
            f"{r['time_ratio']:.2f} -> {'met' if r['met'] else 'NOT met'}"
        )
    if not report["digits"]:
        print("\ndigits: no kernels under results/kernels/digits/full (run snakemake first)")
        return
    print("\ndigits, the default run's kernels (selected on val)")
    print(f"{'kernel':<34}{'method':<9}{'val':>7}{'test':>7}{'best-on-test':>13}  selected")
    for r in report["digits"]:
        print(
            f"{r['kernel']:<34}{r['method']:<9}{r['val_accuracy']:>7.3f}"
            f"{r['test_accuracy']:>7.3f}{r['best_on_test']:>13.3f}  {r['selected']}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=Path(script_benchmark("solvers")))
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    parser.add_argument("--batch-size", type=int, default=512, help="boosting M")
    parser.add_argument("--steps", type=int, default=24, help="boosting steps")
    parser.add_argument("--big", type=int, default=20_000, help="rows of the on-disk kernel")
    parser.add_argument("--cap-gb", type=float, help="its memory cap (half its train block)")
    parser.add_argument("--one", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        method, n, batch_size, steps = args.one
        print(json.dumps(measure_one(method, int(n), int(batch_size), int(steps), args.device)))
        return
    device = resolve_device(args.device)
    gpu = device.type == "cuda"
    sizes = [512, 1024] if args.quick else ([4096, 8192, 16384, 32768] if gpu else
                                            [1024, 2048, 4096, 8192])  # fmt: skip
    batch_size = 128 if args.quick else args.batch_size
    report: dict = {"device": device_name(device), "threads": torch.get_num_threads()}
    report["scaling"] = [
        run_isolated(method, n, batch_size, args.steps, args.device)
        for n in sizes
        for method in METHODS
    ]
    report["target"] = boosting_target(report["scaling"], batch_size)
    report["beyond_memory"] = beyond_memory(2000 if args.quick else args.big, args.cap_gb)
    report["table"] = solver_table(report)
    report["digits"] = digits_accuracy(Path("results/kernels/digits/full"), args.device)
    print_report(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
