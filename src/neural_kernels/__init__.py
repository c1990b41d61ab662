"""Scalable neural-network kernels for image classification.

The science lives in small, typed functions grouped by stage:

* :mod:`neural_kernels.data` -- downloading, checking and converting datasets into
  memory-mappable ``.npy`` splits, and class-balanced subsets.

Every stage is also reachable from the command line, ``python -m neural_kernels``.
"""

__version__ = "0.1.0"
