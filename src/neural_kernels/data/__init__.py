"""Datasets: download with checksums, convert to memory-mappable splits, subsets.

See :mod:`neural_kernels.data.prepared` for the on-disk format. The functions below are
imported on first use, so that reading the sources' names (as the command line does)
does not import numpy.
"""

from __future__ import annotations

from neural_kernels.registry import lazy_attributes

_EXPORTS = {
    "neural_kernels.data.sources": ("ARCHIVES", "SOURCES"),
    "neural_kernels.data.download": ("download_file", "verify_checksum"),
    "neural_kernels.data.prepared": ("load_meta", "load_split", "prepare_dataset", "write_subset"),
}
__all__ = sorted(name for names in _EXPORTS.values() for name in names)


__getattr__ = lazy_attributes(__name__, _EXPORTS)
