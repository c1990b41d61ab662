"""Exceptions whose message names the problem and the fix.

The command-line interface prints these without a traceback; anything else is a bug
and keeps its traceback.
"""


class NeuralKernelsError(Exception):
    """Base class of the errors a user can fix (bad input, bad config, bad download)."""


class DownloadError(NeuralKernelsError):
    """A file could not be fetched (HTTP error, network failure, truncated transfer)."""


class ChecksumError(DownloadError):
    """A file's digest differs from the published one."""


class DataError(NeuralKernelsError):
    """An archive, ``.npz`` file or prepared dataset is malformed or inconsistent."""


class SettingError(NeuralKernelsError, ValueError):
    """An option or config value is malformed (a ``ValueError`` too, for callers that
    parse values)."""
