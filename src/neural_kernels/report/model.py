"""The report's record types: our results in a thesis cell, and the tables they fill.

:mod:`.tables` fills them, :mod:`.notes` describes what their runs did, the templates
render them; this module imports none of those.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


def mean_std(values: list[float]) -> tuple[float, float | None]:
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else None


def percent(value: float, std: float | None) -> str:
    return f"{value:.1f}" + (f" ± {std:.1f}" if std is not None else "")


@dataclass
class Entry:
    """One of our results in a cell: a mean over seeds/subsets where there are several."""

    value: float
    std: float | None
    count: int
    label: str  # the dataset, view, config names that produced it
    same_dataset: bool  # False: a digits run filling the shape of a thesis table
    thesis: float | None
    unit: str = "%"
    kind: str = "solve"  # solve | network | kernel_time: what ``records`` hold
    records: list[dict] = field(default_factory=list)  # the result files behind it
    test_selected: str | None = None  # chosen on test, as the reference did

    @property
    def text(self) -> str:
        if self.unit == "hours":
            return f"{self.value:.3g} h"
        return percent(self.value, self.std)

    @property
    def difference(self) -> str:
        if not self.same_dataset or self.thesis is None:
            return "—"
        delta = self.value - self.thesis
        return f"{delta:+.3g} h" if self.unit == "hours" else f"{delta:+.1f}"


@dataclass
class Cell:
    """A thesis value and what we have for it."""

    column: str
    thesis_text: str
    entries: list[Entry] = field(default_factory=list)
    status: str = "ok"  # ok | analogue | not run | missing | empty
    message: str = ""
    reference: str | None = None  # whose number the thesis value is (shankar)
    changes: str = ""  # what a digits analogue changes from the thesis's experiment


@dataclass
class Row:
    label: str
    cells: list[Cell]


@dataclass
class Table:
    id: str
    title: str
    dataset: str
    row_header: str
    columns: list[str]
    note: str
    rows: list[Row]
    ours: list[str] = field(default_factory=list)  # what our experiments ran (generated)

    def entries(self) -> list[Entry]:
        return [entry for row in self.rows for cell in row.cells for entry in cell.entries]
