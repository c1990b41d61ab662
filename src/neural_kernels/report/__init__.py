"""The report: every thesis table and timing beside ours (see :func:`render_report`)."""

from neural_kernels.report.render import render_report

__all__ = ["render_report"]
