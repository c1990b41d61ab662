"""Choosing where torch code runs: CUDA when present, else the CPU."""

from __future__ import annotations

import logging

import torch

from neural_kernels.errors import NeuralKernelsError

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def resolve_device(name: str = "auto", stage: str | None = None) -> torch.device:
    """``"auto"`` -> the first CUDA device if there is one, else the CPU.

    ``"cuda"`` without a GPU is an error rather than a silent fallback, so a cluster
    job that asked for a GPU and did not get one fails loudly. With ``stage`` (a
    stage's name), one log line says which device the stage runs on, and why when
    ``"auto"`` fell back to the CPU.
    """
    if name == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(name)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise NeuralKernelsError(
                f"device {name!r} was requested but torch sees no CUDA GPU; use 'auto' or 'cpu'"
            )
    if stage is not None:
        fallback = name == "auto" and device.type == "cpu"
        why = " (device auto: torch sees no CUDA GPU)" if fallback else ""
        log.info("%s runs on %s%s", stage, device_name(device), why)
    return device


def resolve_dtype(name: str) -> torch.dtype:
    """``"float32"`` or ``"float64"`` as a torch dtype."""
    try:
        return DTYPES[name]
    except KeyError:
        raise NeuralKernelsError(
            f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}"
        ) from None


def device_name(device: torch.device) -> str:
    """A human-readable name of ``device`` (the GPU model for CUDA)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"


def reset_peak_memory(device: torch.device) -> None:
    """Start a fresh peak-memory window for :func:`peak_memory_mb` on a GPU."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> dict[str, float]:
    """Peak host RSS of this process and, on a GPU, peak allocated device memory (MiB)."""
    import resource

    peaks = {"host_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device.type == "cuda":
        peaks["device_peak_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return peaks
