"""Drawing helpers of the report's figures: matplotlib (headless) to inline SVG text."""

from __future__ import annotations

import io
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

plt.rcParams.update({"svg.fonttype": "none", "font.size": 9, "figure.dpi": 100})


@dataclass
class Figure:
    """A drawn figure: its file name (without ``.svg``), title, caption and SVG text."""

    name: str
    title: str
    caption: str
    svg: str


def svg(fig: plt.Figure) -> str:
    """The figure as SVG text to inline in HTML (no XML prologue, no date); closes it."""
    buffer = io.StringIO()
    fig.savefig(buffer, format="svg", bbox_inches="tight", metadata={"Date": None})
    plt.close(fig)
    text = buffer.getvalue()
    return text[text.index("<svg") :]


def axes(xlabel: str, ylabel: str, logx: bool = False) -> tuple[plt.Figure, plt.Axes]:
    """One figure of the report's size with labelled, gridded axes."""
    fig, ax = plt.subplots(figsize=(5.2, 3.2))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if logx:
        ax.set_xscale("log")
    ax.grid(alpha=0.3)
    return fig, ax
