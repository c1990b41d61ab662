"""What each table's experiments of ours ran, in plain words, from the results' metadata.

Every statement is generated from the files our stages wrote (a solve's
``metrics.json``, its kernel's ``kernel.json``, the dataset's ``zca.json`` and subset
``meta.json``, a network's ``metrics.json``), never written by hand for a cell, and
set beside what the thesis did (the table's ``thesis_experiment`` in
``report/thesis.yaml``) where the two differ: the training-set size and protocol,
the kernel (estimated or analytic, and what the analytic one would cost), the ZCA,
the solvers, the architectures that are our reconstruction, the subsets' sampling,
and the cells whose thesis value is Shankar et al.'s test-selected number.
"""

from __future__ import annotations

from collections.abc import Iterable

from neural_kernels.catalog import MYRTLE_STAGES, RECONSTRUCTED
from neural_kernels.report.collect import Results
from neural_kernels.report.model import Entry, Table

SOLVERS = {
    "flow": "gradient flow, eta t chosen on val",
    "ridge": "kernel ridge regression, lambda chosen on val",
    "pcg": "kernel ridge regression by preconditioned conjugate gradients (streamed from "
    "disk), lambda chosen on val",
    "boosting": "batched boosting, the step and eta t chosen on val",
}
ZCA = {
    "thesis": "the thesis's (feature-centred, singular values + eps)",
    "shankar": "Shankar et al.'s (per-image centring and unit norm, eigenvalue bias eps)",
}


#: The first line of a table all of whose runs are digits analogues.
ALL_ANALOGUES = "All digits analogues (the table's own dataset was not run):"


def _unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))


def _scope(entry: Entry) -> str:
    return "" if entry.same_dataset else "digits analogue: "


def _kernel_record(results: Results, solve: dict) -> dict:
    """The ``kernel.json`` of the kernel a solve ran on (empty if it is not there)."""
    key = (solve["dataset"], solve["view"], solve["kernel_name"])
    return next((k for k in results.kernels if (k["dataset"], k["view"], k["name"]) == key), {})


def _training(entry: Entry, results: Results, thesis: dict) -> str | None:
    """The training set and protocol of one entry."""
    record = entry.records[0]
    size = record.get("training_size")
    if size is None:
        return None
    images, rows = size["images"], size.get("rows", size["images"])
    mirrors = _augmentation(record.get("kernel", {}), images, rows)
    thesis_size = thesis.get("train_images") if entry.same_dataset else None
    versus = f" (the thesis: {thesis_size:,})" if thesis_size and thesis_size != images else ""
    if entry.kind == "network":
        settings = record["settings"]
        return (
            f"network {record['name']}: trained on train + val, {images:,} images{versus}, "
            f"for {settings['epochs']} epochs{_network_augmentation(settings)}; the final "
            "epoch is reported"
        )
    if not record.get("refit"):
        views = sorted({r["view"] for r in entry.records})
        sampling = {
            results.subsets.get((r["dataset"], r["view"]), {}).get("sampling", "random")
            for r in entry.records
        }
        plural = "s" if len(views) != 1 else ""
        return (
            f"{len(views)} {' / '.join(sorted(sampling))} subset{plural} of {images:,} "
            f"training images{mirrors}{versus} ({', '.join(views)}); hyperparameters chosen "
            "on the parent's val split, not refit"
        )
    return (
        f"hyperparameters chosen on val after fitting on train, then refit on train + val: "
        f"{images:,} training images{mirrors}{versus}"
    )


def _network_augmentation(settings: dict) -> str:
    """How a network's training images were augmented (empty when they were not)."""
    crop, flip = settings.get("crop"), settings.get("flip")
    if not crop and not flip:
        return ""
    what = [f"a random {crop}x{crop} crop" if crop else "", "a random mirror" if flip else ""]
    test = f" (test: centre {crop}x{crop} crops)" if crop else ""
    return f" with {' and '.join(w for w in what if w)} of every image each epoch{test}"


def _augmentation(kernel: dict, images: int, rows: int) -> str:
    """How a kernel's fitted rows augment its images (empty when they do not)."""
    if kernel.get("crop"):
        copies, size = kernel.get("copies") or 1, kernel["crop"]
        crops = f"{copies} seeded random {size}x{size} crop{'s' if copies > 1 else ''}"
        mirrors = " and their horizontal mirrors" if kernel.get("flips") else ""
        return (
            f", {rows:,} rows: {crops} of every image{mirrors}, drawn once (the thesis "
            f"draws new crops every epoch of its networks); val and test are scored on "
            f"their centre {size}x{size} crops"
        )
    if rows != images:
        return f", {rows:,} rows with their horizontal mirrors (no crops)"
    return ""


def _kernel(entry: Entry, results: Results, thesis: dict) -> str | None:
    """What the kernel of a solve entry is, and the thesis's where it differs."""
    solve = entry.records[0]
    k = solve["kernel"]
    name = f"{k['arch'].capitalize()} ({k['activation']})"
    record = _kernel_record(results, solve)
    settings = record.get("settings", {})
    if k["method"] == "estimate":
        networks, width = settings.get("networks"), settings.get("width")
        detail = f" ({networks:,} networks of width {width})" if networks and width else ""
        how = f"estimated from {k.get('features') or 0:,} random features{detail}"
    else:
        precision = settings.get("precision")
        how = "computed exactly (the analytic recursion" + (f", {precision})" if precision else ")")
    text = f"the {name} kernel, {how}"
    wanted = thesis.get("kernel_method")
    if wanted and wanted != k["method"] and entry.same_dataset:
        text += f"; the thesis used the {wanted} kernel here"
        if thesis.get("analytic_cost"):
            text += f" (ours: method: {wanted} in the config, {thesis['analytic_cost']})"
    return text


def _zca(dataset: str, results: Results) -> str | None:
    record = results.zca.get(dataset)
    if record is None:
        return None
    options = record.get("options", {})
    fitted = record.get("fitted_on", [])
    fitted = fitted if isinstance(fitted, list) else [fitted]
    splits = " + ".join(path.rsplit("/", 1)[-1].removesuffix("_images.npy") for path in fitted)
    mirrors = " and their mirrors" if options.get("flips") else ""
    return (
        f"ZCA of {dataset}: {ZCA.get(record['variant'], record['variant'])}, eps "
        f"{record['eps']:g}, {record['solver']} solver of rank {record['rank']}, fitted on "
        f"{splits or '?'}{mirrors}"
    )


def _runs(entries: list[Entry], results: Results, thesis: dict) -> list[str]:
    """One line per run: a network, or a kernel with the solvers that ran on it (its
    kernel, training set and protocol said once). "digits analogue" prefixes a run
    where the table's own dataset was not run, and a training set and protocol that
    every kernel shares is said once after them, as is a table all of analogues."""
    every_analogue = bool(entries) and all(not entry.same_dataset for entry in entries)
    solves = [entry for entry in entries if entry.kind == "solve"]
    trainings = {_training(entry, results, thesis) or "" for entry in solves}
    shared = trainings.pop() if len(solves) > 1 and len(trainings) == 1 else None
    runs: dict[tuple[str, str], list[str]] = {}  # (name, statement) -> solvers
    for entry in entries:
        scope = "" if every_analogue else _scope(entry)
        training = _training(entry, results, thesis) or ""
        if entry.kind == "network":
            runs.setdefault((f"{scope}{training}", ""), [])
            continue
        solve = entry.records[0]
        statement = _kernel(entry, results, thesis) or ""
        statement += f"; {training}" if shared is None else ""
        runs.setdefault((f"{scope}{solve['kernel_name']}", statement), []).append(solve["method"])
    lines = [ALL_ANALOGUES] if every_analogue else []
    for (name, statement), solvers in runs.items():
        lines.append(f"{name} ({', '.join(_unique(solvers))}): {statement}" if solvers else name)
    return lines + ([f"Every kernel above: {shared}"] if shared else [])


def what_ours_ran(table: Table, thesis: dict, results: Results) -> list[str]:
    """The table's plain-words statements of what our experiments are (see the module):
    one line per run, then what the runs share (the solvers, the ZCA, reconstructed
    architectures, the test-selected cells), each fact once."""
    entries = [entry for entry in table.entries() if entry.kind in ("solve", "network")]
    lines = _runs(entries, results, thesis)
    methods = _unique(
        f"{e.records[0]['method']}: {SOLVERS.get(e.records[0]['method'], '')}"
        for e in entries
        if e.kind == "solve"
    )
    if methods:
        lines.append("Solvers: " + "; ".join(methods))
    datasets = _unique(r["dataset"] for e in entries if e.kind == "solve" for r in e.records)
    lines += [_zca(dataset, results) or "" for dataset in datasets]
    lines += _reconstructed(table.entries())
    if any(entry.test_selected for entry in entries):
        lines.append(
            "Cells whose thesis value is Shankar et al.'s chose their regulariser on the "
            "test set; beside our validation-selected value they show ours chosen the same "
            "way, on the test split (of the refit grid where there is a refit): "
            "'test-selected, as the reference did'"
        )
    return _unique(line for line in lines if line)


def _reconstructed(entries: list[Entry]) -> list[str]:
    """A line for each architecture of the entries that is this project's reconstruction."""
    kernels = [e.records[0]["kernel"] if e.kind == "solve" else e.records[0] for e in entries]
    archs = _unique(
        (k["arch"], k["activation"])
        for e, k in zip(entries, kernels, strict=True)
        if e.kind != "network"
    )
    return [
        f"{arch.capitalize()} is this project's reconstruction (the thesis names it without "
        f"defining it): stages of ({', '.join(map(str, MYRTLE_STAGES[arch]))}) 3x3 "
        f"convolutions with {activation}, 2x2 average pools between them"
        for arch, activation in archs
        if arch in RECONSTRUCTED
    ]
