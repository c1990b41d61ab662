"""Datasets: download with checksums, convert to memory-mappable splits, subsets.

See :mod:`neural_kernels.data.prepared` for the on-disk format. The functions below are
imported on first use, so that reading the sources' names (as the command line does)
does not import numpy.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "ARCHIVES": "neural_kernels.data.sources",
    "SOURCES": "neural_kernels.data.sources",
    "download_file": "neural_kernels.data.download",
    "verify_checksum": "neural_kernels.data.download",
    "load_meta": "neural_kernels.data.prepared",
    "load_split": "neural_kernels.data.prepared",
    "prepare_dataset": "neural_kernels.data.prepared",
    "write_subset": "neural_kernels.data.prepared",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> object:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
