"""Datasets: download with checksums, convert to memory-mappable splits, subsets.

See :mod:`neural_kernels.data.prepared` for the on-disk format.
"""

from neural_kernels.data.download import download_file, verify_checksum
from neural_kernels.data.prepared import (
    load_meta,
    load_split,
    prepare_dataset,
    write_subset,
)
from neural_kernels.data.sources import ARCHIVES, SOURCES

__all__ = [
    "ARCHIVES",
    "SOURCES",
    "download_file",
    "load_meta",
    "load_split",
    "prepare_dataset",
    "verify_checksum",
    "write_subset",
]
