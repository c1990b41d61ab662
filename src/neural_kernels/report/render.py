"""Render ``report.html`` (self-contained: inline CSS and SVG) and ``report.md``.

``render_report`` reads only existing results (see :mod:`.collect`), so re-rendering
after copying ``results/`` from a cluster is one command that recomputes nothing:
``neural-kernels report``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import platform
import subprocess
from pathlib import Path

import jinja2

from neural_kernels.outputs import staged_directory
from neural_kernels.report.collect import Results, collect, read_json
from neural_kernels.report.figures import FIGURES, cost_growth
from neural_kernels.report.provenance import SHAPING, environment, write_provenance
from neural_kernels.report.scaling import SCALING_FIGURES, scaling
from neural_kernels.report.tables import fill_tables, kernel_seconds, load_thesis


def _git(*args: str, cwd: Path) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args], cwd=cwd, capture_output=True, text=True, check=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def provenance(results: Results, config: dict | None, repo: Path) -> dict:
    """Git commit, config and its hash, the run's environment
    (:func:`~neural_kernels.report.provenance.environment`: every distribution, the
    lock's hash, Python, OS, CPU, GPUs), the packages that shape results, devices, date."""
    canonical = json.dumps(config, sort_keys=True) if config is not None else None
    commit = _git("rev-parse", "HEAD", cwd=repo)
    dirty = _git("status", "--porcelain", "--untracked-files=no", cwd=repo)
    env = environment(repo)
    return {
        "commit": (commit or "unknown (not a git checkout)") + (" (modified)" if dirty else ""),
        "config": canonical,
        "config_sha256": hashlib.sha256(canonical.encode()).hexdigest()[:16]
        if canonical
        else "no config given (rendered with neural-kernels report alone)",
        "packages": {name: env["distributions"].get(name, "not installed") for name in SHAPING},
        "environment": env,
        "python": env["python"],
        "host": platform.node(),
        "devices": results.devices() or ["none recorded"],
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def timings(results: Results) -> list[dict]:
    """Every job's wall time and peak memory, with the device its stage's record (found
    by :func:`~neural_kernels.report.collect.collect`) reports."""
    rows = []
    for bench in results.benchmarks:
        device, extra = "cpu", ""
        if bench["record"] is not None:
            record = read_json(Path(bench["record"]))
            device = ", ".join(record.get("devices") or [record.get("device", "cpu")])
            gpu_peak = record.get("device_peak_allocated_mb")
            extra = f"{gpu_peak:.0f} MiB on the GPU" if gpu_peak else ""
        rows.append(
            {"rule": bench["rule"], "job": bench["job"], "seconds": bench["seconds"],
             "max_rss_mb": bench["max_rss_mb"], "device": device, "gpu_memory": extra}
        )  # fmt: skip
    return rows


def stage_totals(rows: list[dict]) -> list[dict]:
    totals: dict[str, dict] = {}
    for row in rows:
        total = totals.setdefault(row["rule"], {"rule": row["rule"], "jobs": 0, "seconds": 0.0})
        total["jobs"] += 1
        total["seconds"] += row["seconds"]
    return sorted(totals.values(), key=lambda t: -t["seconds"])


def kernel_times(results: Results) -> list[dict]:
    """Compute time of every kernel, for comparison with the thesis's 9 h and 200 h."""
    return [
        {"dataset": k["dataset"], "view": k["view"], "name": k["name"], "method": k["method"],
         "arch": k["arch"], "hours": kernel_seconds(k) / 3600,
         "devices": ", ".join(k.get("devices") or [k.get("device", "?")])}
        for k in results.kernels
    ]  # fmt: skip


def build_context(results_dir: Path, thesis_path: Path, config: dict | None, repo: Path) -> dict:
    """Everything the templates show."""
    results = collect(results_dir)
    figures, missing_figures = [], []
    for make in FIGURES:
        figure = make(results)
        if figure is None:
            missing_figures.append(make.__name__.removeprefix("figure_"))
        else:
            figures.append(figure)
    rows = timings(results)
    scaling_section = scaling(results)
    if scaling_section is not None:
        scaling_section["figures"] = [make(results) for make in SCALING_FIGURES]
    return {
        "tables": fill_tables(load_thesis(thesis_path), results),
        "timings": rows,
        "stage_totals": stage_totals(rows),
        "kernel_times": kernel_times(results),
        "cost_growth": cost_growth(results),
        "scaling": scaling_section,
        "figures": figures,
        "missing_figures": missing_figures,
        "datasets": results.datasets,
        "provenance": provenance(results, config, repo),
        "counts": {
            "kernels": len(results.kernels),
            "solves": len(results.solves),
            "networks": len(results.networks),
            "benchmarks": len(results.benchmarks),
        },
    }


def render_report(
    results_dir: Path,
    out_dir: Path,
    *,
    thesis_path: Path,
    templates: Path,
    config: dict | None = None,
    repo: Path = Path("."),
) -> dict:
    """Write ``out_dir/report.html``, ``report.md`` and ``figures/*.svg``."""
    context = build_context(results_dir, thesis_path, config, repo)
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(templates),
        autoescape=jinja2.select_autoescape(["html", "html.j2"]),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    html = env.get_template("report.html.j2").render(**context)
    markdown = env.get_template("report.md.j2").render(**context)
    out_dir = Path(out_dir)
    with staged_directory(out_dir / "figures") as stage:
        for figure in context["figures"] + (context["scaling"] or {}).get("figures", []):
            (stage / f"{figure.name}.svg").write_text(figure.svg)
    with staged_directory(out_dir) as stage:
        (stage / "report.md").write_text(markdown)
        (stage / "report.html").write_text(html)
    record = {key: value for key, value in context["provenance"].items() if key != "config"}
    write_provenance(results_dir, record)
    return {
        "html": str(out_dir / "report.html"),
        "markdown": str(out_dir / "report.md"),
        "figures": [f.name for f in context["figures"]],
        **context["counts"],
    }
