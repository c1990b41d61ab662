"""Kernel storage precision: what storing the final kernel in float32 changes.

At scale a streaming solve is bound by reading the kernel: one pass per boosting step
or pcg iteration, so float32 files halve its I/O. The kernel stages compute and sum in
float64 and, with ``storage: float32``, write the result rounded once (the merge and the
analytic stage; ``tests/test_kernels.py`` checks it is exactly the float64 kernel cast).
For each kernel directory this writes that float32 copy and runs the ``solve`` stage
(flow, ridge, pcg, boosting) on both, reporting:

* the largest entry difference ``max |K32 - K64|`` (and relative to ``max |K64|``);
* each solver's test accuracy of the val-selected point on both, and the largest move
  of any grid point's validation or test accuracy (points);
* each solve's seconds on both.

Kernels: the default workflow's digits kernels (``results/kernels/digits/full/*``, run
``snakemake --cores 2`` first) and a synthetic Myrtle5 kernel of ``--rows`` fitted rows
(32x32x3, made by the real stages). The decision rule of ``config/thesis.yaml``: float32
for its large kernels only if every selected accuracy moves by less than
:data:`THRESHOLD_POINTS`. Writes ``results/benchmarks/storage.json``. Usage:
``python benchmarks/storage.py`` (about 20 minutes on 2 cores; ``--quick``: a smoke run).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from neural_kernels import layout
from neural_kernels.data.prepared import split_files
from neural_kernels.solvers.stage import SolverSettings, solve_files

REPO = Path(__file__).resolve().parents[1]
METHODS = ("flow", "ridge", "pcg", "boosting")
THRESHOLD_POINTS = 0.1
SPLITS = ("train", "val", "test")


def synthetic_kernel(root: Path, rows: int, image_size: int, features: int) -> tuple[Path, dict]:
    """A Myrtle5 estimate of ``rows`` synthetic fitted rows through the real stages."""
    data, zca, shard, kernel = (root / name for name in ("data", "zca", "shard", "kernel"))

    def nk(*args: object) -> None:
        command = [sys.executable, "-m", "neural_kernels", "-q", *map(str, args)]
        subprocess.run(command, check=True, capture_output=True)

    nk("prepare", "--source", "synthetic", "--size", rows, "--image-size", image_size,
       "--out", data)  # fmt: skip
    nk("zca", *(data / f"{s}_images.npy" for s in SPLITS), "--fit-on", 2, "--out-dir", zca)
    nk("kernel-shard", "--train", zca / "train_images.npy", "--val", zca / "val_images.npy",
       "--eval", f"test={zca / 'test_images.npy'}", "--arch", "myrtle5", "--networks",
       features // 64, "--chunk-networks", 1, "--device", "cpu", "--out-dir", shard)  # fmt: skip
    nk("kernel-merge", shard, "--out-dir", kernel)
    return kernel, {s: data / f"{s}_labels.npy" for s in SPLITS}


def float32_copy(kernel_dir: Path, out: Path) -> dict:
    """``kernel_dir`` with every block rounded to float32, as ``storage: float32`` writes
    it; returns the largest entry difference, absolute and relative."""
    out.mkdir(parents=True)
    worst, scale = 0.0, 0.0
    for block in sorted(kernel_dir.glob("*.npy")):
        wide = np.load(block, mmap_mode="r")
        narrow = np.lib.format.open_memmap(out / block.name, "w+", np.float32, wide.shape)
        for start in range(0, len(wide), 2048):
            part = np.asarray(wide[start : start + 2048])
            narrow[start : start + 2048] = part
            worst = max(worst, float(np.abs(narrow[start : start + 2048] - part).max()))
            scale = max(scale, float(np.abs(part).max()))
        narrow.flush()
    record = json.loads((kernel_dir / "kernel.json").read_text())
    record.setdefault("settings", {})["storage"] = "float32"
    (out / "kernel.json").write_text(json.dumps(record))
    return {"max_abs_difference": worst, "max_relative_difference": worst / scale}


def _settings(method: str, quick: bool) -> SolverSettings:
    if method == "boosting":
        return SolverSettings(method, batch_size=64 if quick else 256, steps=4 if quick else 20)
    if method == "pcg":
        return SolverSettings(method, rank=64 if quick else 500, max_iterations=100)
    return SolverSettings(method)


def _accuracies(record: dict) -> dict[str, float]:
    """Every grid point's val and test accuracy, keyed by the point."""
    out = {}
    for point in record["grid"]:
        key = json.dumps(
            {k: v for k, v in point.items() if k not in ("accuracy", "seconds", "diagnostics")}
        )
        for split in ("val", "test"):  # a point that failed (ridge: not PD) has none
            if split in point.get("accuracy", {}):
                out[f"{key} {split}"] = point["accuracy"][split]
    return out


def compare(name: str, kernel_dir: Path, labels: dict, scratch: Path, quick: bool) -> dict:
    """Every solver on the float64 kernel and on its float32 copy."""
    narrow = scratch / f"{name}-float32"
    row = {"kernel": name, **float32_copy(kernel_dir, narrow), "solves": []}
    for method in METHODS:
        records = {}
        for storage, directory in (("float64", kernel_dir), ("float32", narrow)):
            records[storage] = solve_files(
                directory, labels, scratch / f"{name}-{method}-{storage}",
                _settings(method, quick), device="cpu", progress=False,
            )  # fmt: skip
        wide, thin = (_accuracies(records[s]) for s in ("float64", "float32"))
        moves = [abs(wide[k] - thin[k]) for k in wide if k in thin]
        row["solves"].append(
            {"method": method,
             "test_float64": records["float64"]["test_accuracy"],
             "test_float32": records["float32"]["test_accuracy"],
             "selected_move_points": 100 * abs(records["float64"]["test_accuracy"]
                                               - records["float32"]["test_accuracy"]),
             "grid_max_move_points": 100 * max(moves, default=0.0),
             "seconds_float64": records["float64"]["seconds"]["solve"],
             "seconds_float32": records["float32"]["seconds"]["solve"]}
        )  # fmt: skip
    shutil.rmtree(narrow)
    return row


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=3000, help="synthetic fitted rows")
    default = REPO / layout.kernel_dir("digits", layout.FULL_VIEW, "")
    parser.add_argument("--digits", type=Path, default=default, help="kernel directories under")
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    parser.add_argument("--out", type=Path, default=REPO / layout.script_benchmark("storage"))
    args = parser.parse_args(argv)
    rows = 300 if args.quick else args.rows
    report: dict = {"threshold_points": THRESHOLD_POINTS, "kernels": []}
    with tempfile.TemporaryDirectory(prefix="nk-storage-") as tmp:
        scratch = Path(tmp)
        digits = REPO / layout.data_dir("digits")
        digits_labels = {s: digits / split_files(s)[1] for s in SPLITS}
        for kernel_json in sorted(args.digits.glob("*/kernel.json"))[: 1 if args.quick else None]:
            name = f"digits/{kernel_json.parent.name}"
            report["kernels"].append(
                compare(name.replace("/", "-"), kernel_json.parent, digits_labels, scratch,
                        args.quick) | {"kernel": name}
            )  # fmt: skip
        kernel, labels = synthetic_kernel(scratch / "synthetic", rows, 8 if args.quick else 32,
                                          64 if args.quick else 256)  # fmt: skip
        report["kernels"].append(
            compare("synthetic", kernel, labels, scratch, args.quick)
            | {"kernel": f"synthetic {rows} rows"}
        )
    moves = [s["selected_move_points"] for k in report["kernels"] for s in k["solves"]]
    report["largest_selected_move_points"] = max(moves)
    report["float32_within_threshold"] = max(moves) < THRESHOLD_POINTS
    print_report(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return report


def print_report(report: dict) -> None:
    print(f"{'kernel':<40}{'max|dK|':>10}{'method':>10}{'test f64':>10}{'test f32':>10}"
          f"{'move pt':>9}{'grid pt':>9}{'s f64':>8}{'s f32':>8}")  # fmt: skip
    for k in report["kernels"]:
        for s in k["solves"]:
            print(f"{k['kernel']:<40}{k['max_abs_difference']:>10.1e}{s['method']:>10}"
                  f"{s['test_float64']:>10.4f}{s['test_float32']:>10.4f}"
                  f"{s['selected_move_points']:>9.2f}{s['grid_max_move_points']:>9.2f}"
                  f"{s['seconds_float64']:>8.2f}{s['seconds_float32']:>8.2f}")  # fmt: skip
    verdict = "within" if report["float32_within_threshold"] else "NOT within"
    print(f"\nlargest move of a selected accuracy: {report['largest_selected_move_points']:.2f} "
          f"points: {verdict} {report['threshold_points']} points")  # fmt: skip


if __name__ == "__main__":
    main()
