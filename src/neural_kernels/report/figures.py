"""The report's figures, drawn with matplotlib as inline SVG text.

Each ``figure_*`` function takes the collected :class:`Results` and returns a
:class:`Figure` or ``None`` when the run has nothing to draw (the report then says
which experiment would provide it).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from neural_kernels.kernels.compare import centred_relative_error
from neural_kernels.layout import FULL_VIEW, subset_of
from neural_kernels.report.collect import Results
from neural_kernels.report.drawing import Figure, axes, svg

#: Kernels above this many train rows are not re-read for the error figure.
MAX_ERROR_ROWS = 20_000


def _kind(view: str) -> str:
    """``full``, or ``n<size>`` for every subset of that size."""
    subset = subset_of(view)
    return FULL_VIEW if subset is None else f"n{subset[0]}"


def kernel_errors(results: Results) -> list[dict]:
    """Relative error of every estimated kernel against the analytic one of the same
    dataset, view, architecture, activation and flips (when both exist)."""
    analytic = {
        (k["dataset"], k["view"], k["arch"], k["activation"], k["flips"]): k
        for k in results.kernels
        if k["method"] == "analytic"
    }
    rows = []
    for k in results.kernels:
        key = (k["dataset"], k["view"], k["arch"], k["activation"], k["flips"])
        reference = analytic.get(key)
        if k["method"] != "estimate" or reference is None:
            continue
        train = Path(k["path"]).with_name("train.npy")
        if np.load(train, mmap_mode="r").shape[0] > MAX_ERROR_ROWS:
            continue
        error = centred_relative_error(
            np.load(train, mmap_mode="r"),
            np.load(Path(reference["path"]).with_name("train.npy"), mmap_mode="r"),
        )
        rows.append(
            {"dataset": k["dataset"], "view": k["view"], "arch": k["arch"],
             "features": k.get("features"), "width": k["settings"].get("width"),
             "error": error}
        )  # fmt: skip
    return rows


def figure_kernel_error(results: Results) -> Figure | None:
    rows = kernel_errors(results)
    if not rows:
        return None
    fig, ax = axes("random features F", "centred relative Frobenius error", logx=True)
    ax.set_yscale("log")
    groups: dict[str, list[dict]] = {}
    for row in rows:
        label = f"{row['dataset']} {_kind(row['view'])} {row['arch']} (width {row['width']})"
        groups.setdefault(label, []).append(row)
    for label, group in sorted(groups.items()):
        xs = sorted({r["features"] for r in group})
        ys = [np.mean([r["error"] for r in group if r["features"] == x]) for x in xs]
        ax.plot(xs, ys, "o-", label=label)
    if len(rows) > 1:
        f = np.array(sorted({r["features"] for r in rows}), dtype=float)
        top = max(r["error"] for r in rows)
        ax.plot(f, top * np.sqrt(f[0] / f), "k:", lw=1, label="∝ 1/√F")
    ax.legend(fontsize=7)
    return Figure(
        "kernel_error",
        "Estimated vs analytic kernel",
        "Relative Frobenius error of the doubly centred train kernel against the analytic "
        "kernel of the same images (subsets averaged over seeds). Narrow networks level "
        "off at their finite-width bias.",
        svg(fig),
    )


def figure_accuracy_vs_features(results: Results) -> Figure | None:
    points = [s for s in results.solves if s["kernel"].get("method") == "estimate"]
    if not points:
        return None
    fig, ax = axes("random features F", "test accuracy (%)", logx=True)
    groups: dict[tuple, list[tuple[float, float]]] = {}
    for s in points:
        key = (s["dataset"], _kind(s["view"]), s["kernel"]["arch"], s["solver"])
        groups.setdefault(key, []).append((s["kernel"]["features"], 100 * s["test_accuracy"]))
    for (dataset, view, arch, solver), group in sorted(groups.items()):
        xs = sorted({x for x, _ in group})
        ys = [np.mean([y for x2, y in group if x2 == x]) for x in xs]
        (line,) = ax.plot(xs, ys, "o-", label=f"{dataset} {view} {arch} {solver}")
        exact = [
            100 * s["test_accuracy"]
            for s in results.solves
            if s["kernel"].get("method") == "analytic"
            and (s["dataset"], _kind(s["view"]), s["kernel"]["arch"], s["solver"])
            == (dataset, view, arch, solver)
        ]
        if exact:
            ax.axhline(np.mean(exact), color=line.get_color(), ls="--", lw=1)
    ax.legend(fontsize=7)
    return Figure(
        "accuracy_vs_features",
        "Accuracy against the number of random features",
        "Test accuracy of estimated kernels (validation-selected); dashed: the analytic "
        "kernel with the same solver.",
        svg(fig),
    )


def figure_boosting(results: Results) -> Figure | None:
    runs = [s for s in results.solves if s["method"] == "boosting"]
    if not runs:
        return None
    fig, ax = axes("boosting step", "accuracy (%)")
    for s in runs:
        eta_t = s["selected"]["eta_t"]
        curve = sorted((p["step"], p["accuracy"]) for p in s["grid"] if p.get("eta_t") == eta_t)
        steps = [step for step, _ in curve]
        label = f"{s['dataset']} {s['view']} {s['kernel_name']}"
        (line,) = ax.plot(steps, [100 * a["test"] for _, a in curve], "-", label=f"{label} test")
        ax.plot(steps, [100 * a["val"] for _, a in curve], ":", color=line.get_color())
        full = [
            f for f in results.solves
            if f["method"] == "flow" and (f["dataset"], f["view"], f["kernel_name"])
            == (s["dataset"], s["view"], s["kernel_name"])
        ]  # fmt: skip
        if full:
            ax.axhline(100 * full[0]["test_accuracy"], color=line.get_color(), ls="--", lw=1)
    ax.legend(fontsize=7)
    return Figure(
        "boosting",
        "Boosting accuracy against steps",
        "Solid: test, dotted: validation accuracy after each boosting step (the selected "
        "eta t); dashed: the full gradient-flow solve of the same kernel.",
        svg(fig),
    )


def figure_flow_vs_ridge(results: Results) -> Figure | None:
    ridge = ("ridge", "pcg")  # kernel ridge regression, by Cholesky or conjugate gradients
    runs = [s for s in results.solves if s["method"] in ("flow", *ridge) and s["view"] == "full"]
    if not runs:
        return None
    fig, ax = axes("eta t  (ridge: 1 / lambda)", "validation accuracy (%)", logx=True)
    colors: dict[tuple, str] = {}
    for s in sorted(runs, key=lambda r: (r["dataset"], r["kernel_name"], r["method"])):
        points = [p for p in s["grid"] if "accuracy" in p]
        if s["method"] == "flow":
            xs = [p["eta_t"] for p in points]
        else:
            xs = [1.0 / p["lambda"] for p in points]
        key = (s["dataset"], s["kernel_name"])
        (line,) = ax.plot(
            xs, [100 * p["accuracy"]["val"] for p in points],
            {"flow": "-", "ridge": "--"}.get(s["method"], ":"), color=colors.get(key),
            label=f"{s['dataset']} {s['kernel_name']} {s['method']}",
        )  # fmt: skip
        colors.setdefault(key, line.get_color())
    ax.legend(fontsize=7)
    return Figure(
        "flow_vs_ridge",
        "Gradient flow against kernel ridge",
        "Validation accuracy along the flow's eta t (solid) and kernel ridge's 1 / lambda "
        "(dashed: Cholesky; dotted: conjugate gradients): the thesis preferred the flow "
        "for being less sensitive to eta.",
        svg(fig),
    )


def _loglog_slope(xs: list[float], ys: list[float]) -> float | None:
    if len(xs) < 2:
        return None
    return float(np.polyfit(np.log(xs), np.log(ys), 1)[0])


def cost_growth(results: Results) -> list[dict]:
    """Measured time against size from the benchmark scripts, with log-log slopes."""
    series = []
    zca = results.scripts.get("zca", {}).get("rows", [])
    for solver in ("exact", "randomized"):
        rows = [r for r in zca if r.get("solver") == solver and "seconds" in r]
        if rows:
            xs, ys = [r["P"] for r in rows], [r["seconds"] for r in rows]
            series.append({"stage": f"ZCA {solver}", "size": "P", "x": xs, "y": ys})
    scaling = results.scripts.get("solvers", {}).get("scaling", [])
    for method in ("flow", "ridge", "boosting", "pcg"):
        rows = [r for r in scaling if r["method"] == method]
        if rows:
            xs, ys = [r["n"] for r in rows], [r["seconds"] for r in rows]
            series.append({"stage": f"solver {method}", "size": "N", "x": xs, "y": ys})
    for s in series:
        s["slope"] = _loglog_slope(s["x"], s["y"])
    return series


def figure_cost_growth(results: Results) -> Figure | None:
    series = cost_growth(results)
    if not series:
        return None
    fig, ax = axes("size (ZCA: pixels x channels P; solvers: train points N)", "seconds", True)
    ax.set_yscale("log")
    for s in series:
        slope = f" (slope {s['slope']:.2f})" if s["slope"] is not None else ""
        ax.plot(s["x"], s["y"], "o-", label=f"{s['stage']}{slope}")
    ax.legend(fontsize=7)
    return Figure(
        "cost_growth",
        "Cost growth",
        "Wall time against size from benchmarks/zca.py and benchmarks/solvers.py, with "
        "log-log slopes (3 for a cubic cost).",
        svg(fig),
    )


FIGURES = (
    figure_kernel_error,
    figure_accuracy_vs_features,
    figure_boosting,
    figure_flow_vs_ridge,
    figure_cost_growth,
)
