"""Choosing where torch code runs: CUDA when present, else the CPU."""

from __future__ import annotations

import torch

from neural_kernels.errors import NeuralKernelsError

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def resolve_device(name: str = "auto") -> torch.device:
    """``"auto"`` -> the first CUDA device if there is one, else the CPU.

    ``"cuda"`` without a GPU is an error rather than a silent fallback, so a cluster
    job that asked for a GPU and did not get one fails loudly.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise NeuralKernelsError(
            f"device {name!r} was requested but torch sees no CUDA GPU; use 'auto' or 'cpu'"
        )
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
