"""The thesis's tables T1-T5 with our numbers beside every cell.

The thesis values live in one data file (``report/thesis.yaml``); each cell there says
which experiment of ours fills it (a kernel's properties and a solver, a trained
network, or a kernel's compute time). A cell is filled from runs on the thesis's own
dataset; when there are none, runs on the embedded digits data with the same kernel
and solver fill it, labelled as digits and without a difference to the thesis value
(different data). A cell nothing fills says "not run" and names the target.

A cell whose thesis value is Shankar et al.'s (``reference: shankar``: their kernel
ridge numbers, which the thesis copied) also shows ours chosen as they chose theirs,
on the test split ("test-selected, as the reference did"), beside our
validation-selected headline. What each table's experiments ran, where it differs
from the thesis, is generated from the results' metadata by :mod:`.notes`.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from neural_kernels.layout import FULL_VIEW, subset_of
from neural_kernels.report.collect import ReportError, Results
from neural_kernels.report.model import Cell, Entry, Row, Table, mean_std, percent
from neural_kernels.report.notes import what_ours_ran

#: How a missing experiment is run: the full-reproduction config and the target.
RUN_HINT = "snakemake --cores all --configfile config/thesis.yaml {target}"
ANALOGUE = "digits"


def load_thesis(path: Path) -> list[dict]:
    """The table definitions of ``report/thesis.yaml`` (checked for shape)."""
    try:
        tables = yaml.safe_load(Path(path).read_text())["tables"]
    except (OSError, yaml.YAMLError, KeyError, TypeError) as error:
        raise ReportError(f"{path}: cannot read the thesis tables ({error})") from None
    for table in tables:
        for row in table["rows"]:
            for cell in row["cells"]:
                if "analogue" in cell and not (
                    isinstance(cell["analogue"], dict) and set(SPEC_KEYS) & cell.keys()
                ):
                    raise ReportError(
                        f"{path}: table {table['id']} row {row['label']!r}: 'analogue' must "
                        "be a mapping of properties, in a cell with a kernel, network or "
                        "kernel_time"
                    )
            if len(row["cells"]) != len(table["columns"]):
                raise ReportError(
                    f"{path}: table {table['id']} row {row['label']!r} has "
                    f"{len(row['cells'])} cells for {len(table['columns'])} columns"
                )
    return tables


def _thesis_text(cell: dict, unit: str) -> str:
    if cell.get("thesis_text"):
        return cell["thesis_text"]
    if cell.get("thesis") is None:
        return "-"
    std = f" ± {cell['thesis_std']}" if cell.get("thesis_std") is not None else ""
    return f"{cell['thesis']}{std}" + (" h" if unit == "hours" else "")


def _view_matches(view: str, table: dict) -> bool:
    subset = subset_of(view)
    if table["view"] == FULL_VIEW:
        return subset is None
    size = table.get("subset_size")
    return subset is not None and (not size or subset[0] == size)


def _analogue_view(view: str, table: dict) -> bool:
    return (view == FULL_VIEW) == (table["view"] == FULL_VIEW)


def _subset(spec: dict, record: dict) -> bool:
    return all(record.get(key) == value for key, value in spec.items())


SPEC_KEYS = ("kernel", "network", "kernel_time")


def _thesis_spec(cell: dict) -> dict:
    """The properties of the cell's experiment (its kernel, network or kernel_time)."""
    return next((cell[key] for key in SPEC_KEYS if key in cell), {})


def _spec(cell: dict, exact: bool) -> dict:
    """What our result must have: the cell's spec, with its digits ``analogue`` over it."""
    return {**_thesis_spec(cell), **({} if exact else cell.get("analogue", {}))}


def analogue_text(cell: dict) -> str:
    """How a cell's digits analogue differs from its experiment (empty when it does not)."""
    spec = _thesis_spec(cell)
    changes = [
        f"{key} {value}" + (f" for the thesis's {spec[key]}" if key in spec else "")
        for key, value in cell.get("analogue", {}).items()
        if spec.get(key) != value
    ]
    why = cell.get("analogue_why", "the thesis's does not fit 8x8 digits")
    return f" ({', '.join(changes)}: {why})" if changes else ""


def cell_solvers(cell: dict) -> list[str]:
    """The solver methods that fill a cell: its ``solver``, one name or a list (kernel
    ridge: ``[ridge, pcg]``, the Cholesky and conjugate gradients)."""
    solver = cell["solver"]
    return [solver] if isinstance(solver, str) else list(solver)


def _find(results: Results, table: dict, cell: dict, source: str, exact: bool) -> list[Entry]:
    """Our entries for ``cell`` on datasets of kind ``source``."""
    view_ok = _view_matches if exact else _analogue_view
    spec = _spec(cell, exact)
    groups: dict[str, list[dict]] = {}
    if "kernel" in cell:
        kind, unit = "solve", "%"
        for s in results.solves:
            if (
                results.source(s["dataset"]) == source
                and view_ok(s["view"], table)
                and s["method"] in cell_solvers(cell)
                and _subset(spec, s["kernel"])
            ):
                views = "full" if s["view"] == "full" else "subsets"
                key = f"{s['dataset']} · {views} · {s['kernel_name']} · {s['solver']}"
                groups.setdefault(key, []).append(s)
    elif "network" in cell:
        kind, unit = "network", "%"
        for n in results.networks:
            settings = {"model": n["model"], **n["settings"]}
            if results.source(n["dataset"]) == source and _subset(spec, settings):
                groups.setdefault(f"{n['dataset']} · network {n['name']}", []).append(n)
    else:
        kind, unit = "kernel_time", "hours"
        for k in results.kernels:
            if (
                results.source(k["dataset"]) == source
                and view_ok(k["view"], table)
                and _subset(spec, k)
            ):
                key = f"{k['dataset']} · {k['view']} · {k['name']} on {kernel_devices(k)}"
                groups.setdefault(key, []).append(k)
    entries = []
    for label, records in groups.items():
        if kind == "kernel_time":
            values = [kernel_seconds(k) / 3600 for k in records]
        else:
            values = [100 * r["test_accuracy"] for r in records]
        value, std = mean_std(values)
        test_selected = None
        if cell.get("reference") and kind == "solve":
            best = [100 * r["best_on_test"]["accuracy"]["test"] for r in records]
            test_selected = percent(*mean_std(best))
        suffix = f" ({len(values)} runs)" if len(values) > 1 else ""
        entries.append(
            Entry(
                value=value,
                std=std,
                count=len(values),
                label=label + suffix,
                same_dataset=exact,
                thesis=cell.get("thesis"),
                unit=unit,
                kind=kind,
                records=records,
                test_selected=test_selected,
            )
        )
    return entries


def kernel_seconds(record: dict) -> float:
    """Compute time of a kernel: all shards plus the merge, or the analytic run."""
    seconds = record["seconds"]
    if "shards_total" in seconds:
        return seconds["shards_total"] + seconds.get("merge", 0.0)
    return seconds["total"]


def kernel_devices(record: dict) -> str:
    return ", ".join(record.get("devices") or [record.get("device", "?")])


def fill_cell(results: Results, table: dict, cell: dict, column: str, unit: str) -> Cell:
    """Our entries for one thesis cell, or the reason there are none."""
    out = Cell(column=column, thesis_text=_thesis_text(cell, unit), reference=cell.get("reference"))
    if "missing" in cell:
        out.status, out.message = "missing", cell["missing"]
        return out
    if not {"kernel", "network", "kernel_time"} & cell.keys():
        out.status = "empty"
        return out
    out.entries = _find(results, table, cell, table["dataset"], exact=True)
    if not out.entries and table["dataset"] != ANALOGUE:
        out.entries = _find(results, table, cell, ANALOGUE, exact=False)
        if out.entries:
            out.status, out.changes = "analogue", analogue_text(cell)
            out.message = (
                f"digits, not {table['dataset']}: the embedded run fills this cell's "
                f"experiment on other data{out.changes}; "
                f"{RUN_HINT.format(target=cell['target'])} "
                "runs the thesis's"
            )
    if not out.entries:
        out.status = "not run"
        out.message = f"not run in this configuration: {RUN_HINT.format(target=cell['target'])}"
    return out


def fill_tables(thesis: list[dict], results: Results) -> list[Table]:
    """Every thesis table with each cell filled from ``results``, and what ours ran."""
    tables = []
    for t in thesis:
        rows = [
            Row(
                label=row["label"],
                cells=[
                    fill_cell(results, t, cell, column, row.get("unit", "%"))
                    for cell, column in zip(row["cells"], t["columns"], strict=True)
                ],
            )
            for row in t["rows"]
        ]
        table = Table(
            id=t["id"],
            title=t["title"],
            dataset=t["dataset"],
            row_header=t.get("row_header", ""),
            columns=list(t["columns"]),
            note=t.get("note", ""),
            rows=rows,
        )
        table.ours = what_ours_ran(table, t.get("thesis_experiment", {}), results)
        tables.append(table)
    return tables
