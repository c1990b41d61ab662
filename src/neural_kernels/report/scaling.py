"""The report's Scaling section, from ``benchmarks/scale.py``'s JSON (``scale.json``).

Per stage: the log-log exponent ``a`` of ``seconds ~ N^a`` measured on synthetic data at
the real shapes, the exponent its cost model predicts, and the projected hours at 50k,
100k and 200k fitted rows, on the measuring machine and on one GPU. The GPU hours scale
the machine's by the ratio of matmul rates in the stage's precision: the GPU's as
``benchmarks/gpu.py`` measured it (``gpu.json``) when that exists, else
:data:`ASSUMED_GPU_FLOPS` (the FLOP model); disk-bound stages (prepare, the merge that
writes the kernel) keep the machine's hours. The thesis's CIFAR-10 Myrtle10 times
(T3: estimate <= 9 h, analytic ~ 200 h, on its GPU) stand beside the kernel stages.
"""

from __future__ import annotations

import numpy as np

from neural_kernels.report.collect import Results
from neural_kernels.report.drawing import Figure, axes, svg
from neural_kernels.sizing import GPU_FLOPS

#: The FLOP model's GPU (one 80 GB A100/H100-class card): config/thesis.yaml's 40 TFLOP/s
#: for the estimate's float32 (TF32) convolutions, and the solve table's float64 matmul
#: rate (:data:`neural_kernels.sizing.GPU_FLOPS`).
ASSUMED_GPU_FLOPS = {"float32": 40e12, "float64": GPU_FLOPS}
#: T3 (full CIFAR-10, Myrtle10): the thesis's kernel compute times.
THESIS_HOURS = {
    "estimate_features": "≤ 9 h (the whole estimate)",
    "estimate_gram": "≤ 9 h (the whole estimate)",
    "analytic": "~ 200 h",
}


def _gpu_rates(results: Results) -> tuple[dict[str, float], str]:
    """The GPU's matmul FLOP/s per precision and where they come from."""
    gpu = results.scripts.get("gpu") or {}
    info, measured = gpu.get("device") or {}, (gpu.get("rates") or {}).get("matmul_flops") or {}
    if info.get("name") and all(measured.get(dtype) for dtype in ASSUMED_GPU_FLOPS):
        return measured, f"measured by benchmarks/gpu.py ({info['name']})"
    model = ", ".join(f"{v / 1e12:.0f} TFLOP/s {k}" for k, v in ASSUMED_GPU_FLOPS.items())
    return ASSUMED_GPU_FLOPS, f"FLOP model ({model}, assumed; no GPU run of benchmarks/gpu.py)"


def duration(seconds: float) -> str:
    """``seconds`` as a reader compares them: "<1 s", "40 s", "12 min", "3.4 h", "210 h"."""
    if seconds < 1:
        return "<1 s"
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    hours = seconds / 3600
    return f"{hours:.1f} h" if hours < 48 else f"{hours:.0f} h"


def _hours(projection: dict[str, float], factor: float = 1.0) -> dict[int, float]:
    return {int(n): seconds * factor / 3600 for n, seconds in projection.items()}


def scaling(results: Results) -> dict | None:
    """The section's rows and facts, or ``None`` when no ``scale.json`` exists."""
    scale = results.scripts.get("scale")
    if not scale:
        return None
    gpu_rates, gpu_source = _gpu_rates(results)
    rows = []
    for stage in scale["stages"]:
        measured = [p for p in stage["points"] if p["ok"]]
        failed = [p for p in stage["points"] if not p["ok"]]
        dtype, holds = stage["dtype"], stage.get("holds_gb", {})
        factor = 1.0 if dtype is None else scale["rates"][dtype] / gpu_rates[dtype]
        rows.append(
            {
                "stage": stage["stage"],
                "label": stage["label"],
                "model": stage["model"],
                "rows": [p["rows"] for p in measured],
                "largest": max(measured, key=lambda p: p["rows"]) if measured else None,
                "failed": [f"{p['rows']}: {p['error']}" for p in failed],
                "exponent": stage["exponent"],
                "predicted": stage["predicted"],
                "within": stage["within"],
                "machine_hours": _hours(stage["projection"]),
                "gpu_hours": _hours(stage["projection"], factor),
                "gpu_scaled": dtype is not None,
                "cells": {
                    int(n): f"{duration(sec)} / {duration(sec * factor)}"
                    + ("" if dtype else " (I/O)")
                    + (f"; holds {holds[n]:.3g} GB" if n in holds else "")
                    for n, sec in stage["projection"].items()
                },
                "thesis": THESIS_HOURS.get(stage["stage"], ""),
            }
        )
    plan = scale["plan"]
    return {
        "rows": rows,
        "device": scale["device"],
        "threads": scale["threads"],
        "wall_minutes": scale["wall_seconds"] / 60,
        "sizes": plan["sizes"],
        "shape": f"{plan['image_size']}x{plan['image_size']}x{plan['channels']}",
        "features": plan["width"] * plan["networks"],
        "mem_cap_gb": plan.get("mem_cap_gb"),
        "tolerance": scale["tolerance"],
        "projected_to": sorted({n for row in rows for n in row["machine_hours"]}),
        "gpu_source": gpu_source,
        "thesis_sizes": scale["thesis_sizes"],
    }


def _thesis_lines(ax, scale: dict) -> None:
    for rows in sorted({s["rows"] for s in scale["thesis_sizes"]}):
        names = sorted({s["dataset"] for s in scale["thesis_sizes"] if s["rows"] == rows})
        ax.axvline(rows, color="0.6", ls=":", lw=1)
        label = f" {rows // 1000}k: {', '.join(names)}"
        ax.text(rows, 0.98, label, rotation=90, va="top", ha="right", fontsize=6,
                color="0.4", transform=ax.get_xaxis_transform())  # fmt: skip


def _loglog(results: Results, ylabel: str) -> tuple[dict, object, object] | None:
    """The scale run, and log-log axes against fitted rows (``None``: no run)."""
    scale = results.scripts.get("scale")
    if not scale:
        return None
    fig, ax = axes("fitted rows N", ylabel, logx=True)
    ax.set_yscale("log")
    return scale, fig, ax


def _finished(scale: dict, fig, ax, name: str, title: str, caption: str) -> Figure:
    """The thesis's sizes marked, the legend beside the axes, drawn."""
    _thesis_lines(ax, scale)
    ax.legend(fontsize=5.5, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return Figure(name, title, caption, svg(fig))


def figure_scaling_time(results: Results) -> Figure | None:
    """Seconds against fitted rows per stage (log-log): points, fitted lines to 200k."""
    if (drawn := _loglog(results, "seconds")) is None:
        return None
    scale, fig, ax = drawn
    for stage in scale["stages"]:
        points = [p for p in stage["points"] if p["ok"] and p["seconds"]]
        if not points:
            continue
        xs, ys = [p["rows"] for p in points], [p["seconds"] for p in points]
        label = stage["label"]
        if stage["exponent"] is not None:
            label += f" (a = {stage['exponent']:.2f})"
        (line,) = ax.plot(xs, ys, "o", ms=3, label=label)
        if stage["exponent"] is not None:
            ends = np.array([stage["fitted_rows"][0], max(map(int, stage["projection"]))])
            last = next(p for p in points if p["rows"] == stage["fitted_rows"][-1])
            fitted = last["seconds"] * (ends / last["rows"]) ** stage["exponent"]
            ax.plot(ends, fitted, "--", lw=1, color=line.get_color())
    return _finished(
        scale, fig, ax, "scaling_time", "Seconds against fitted rows",
        "Each stage of benchmarks/scale.py on synthetic images at the real shapes (points), "
        "its log-log fit over the largest uncapped sizes extended to 200k rows (dashed), "
        "and the thesis's fitted rows (dotted).",
    )  # fmt: skip


def figure_scaling_memory(results: Results) -> Figure | None:
    """Peak anonymous memory against fitted rows per stage (log-log)."""
    if (drawn := _loglog(results, "peak anonymous memory (MB)")) is None:
        return None
    scale, fig, ax = drawn
    for stage in scale["stages"]:
        points = [p for p in stage["points"] if p["ok"]]
        if points:
            ax.plot([p["rows"] for p in points], [p["anon_peak_mb"] for p in points], "o-",
                    ms=3, label=stage["label"])  # fmt: skip
    return _finished(
        scale, fig, ax, "scaling_memory", "Peak memory against fitted rows",
        "The largest anonymous memory (heap and tensors, not the page cache) of each "
        "stage's process. The kernel grows as N^2; the streaming solvers hold what grows "
        "as N (pcg's N x r factor, boosting's scores) and a row block.",
    )  # fmt: skip


SCALING_FIGURES = (figure_scaling_time, figure_scaling_memory)
