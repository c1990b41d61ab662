"""Choosing where torch code runs: CUDA when present, else the CPU."""

from __future__ import annotations

import ctypes
import logging
import os
import sys

import torch

from neural_kernels.errors import NeuralKernelsError
from neural_kernels.host import nvidia_smi

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float64": torch.float64}


#: Variables SLURM sets in a job that was given GPUs (``--gpus``, ``--gres=gpu``).
SLURM_GPU_VARIABLES = ("SLURM_JOB_GPUS", "SLURM_STEP_GPUS", "SLURM_GPUS_ON_NODE")
#: Why this process's ``device: auto`` runs on the CPU although the host lists a GPU
#: (set by :func:`resolve_device`; :func:`device_name` records it).
_fallback: str | None = None


def cuda_diagnosis(listed: str | None = None) -> str:
    """The likely cause of a GPU torch does not see: the wheel's CUDA beside what
    ``nvidia-smi`` lists (``listed``, when the caller has asked it already)."""
    host = listed or nvidia_smi() or "nvidia-smi lists no GPU here"
    return f"torch {torch.__version__} is built for CUDA {torch.version.cuda}; {host}"


def slurm_gpus() -> str | None:
    """``NAME=value`` of the SLURM variable saying this job was given GPUs, if any."""
    for name in SLURM_GPU_VARIABLES:
        value = os.environ.get(name, "").strip()
        if value and value not in ("0", "(null)"):
            return f"{name}={value}"
    return None


def resolve_device(name: str = "auto", stage: str | None = None) -> torch.device:
    """``"auto"`` -> the first CUDA device if there is one, else the CPU.

    A job that asked for a GPU and sees none fails with one line naming the likely
    cause (:func:`cuda_diagnosis`): ``"cuda"``, or ``"auto"`` inside a SLURM job that
    was given GPUs. ``"auto"`` falling back to the CPU on a host whose ``nvidia-smi``
    lists a GPU logs a WARNING, and :func:`device_name` records it in the stage's
    JSON. With ``stage`` (a stage's name), one log line says which device it runs on.
    """
    global _fallback
    if name == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        given = slurm_gpus() if device.type == "cpu" else None
        if given is not None:
            raise NeuralKernelsError(
                f"this SLURM job was given GPUs ({given}) but torch sees no CUDA GPU "
                f"({cuda_diagnosis()}); install a torch wheel for the node's driver, or "
                "run with device: cpu"
            )
    else:
        device = torch.device(name)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise NeuralKernelsError(
                f"device {name!r} was requested but torch sees no CUDA GPU "
                f"({cuda_diagnosis()}); use 'auto' or 'cpu'"
            )
    listed = nvidia_smi() if name == "auto" and device.type == "cpu" else None
    if listed is not None:
        _fallback = f"device auto fell back: {listed} but torch sees none"
        log.warning(
            "%s runs on the CPU: %s (%s)", stage or "this stage", _fallback, cuda_diagnosis(listed)
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
    """A human-readable name of ``device`` (the GPU model for CUDA); the CPU of a
    ``device: auto`` that fell back on a host with a GPU says so."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu" if _fallback is None else f"cpu ({_fallback})"


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


#: glibc ``mallopt`` parameters (``<malloc.h>``) and the values
#: :func:`keep_freed_cpu_memory` sets: allocations up to 32 MiB (glibc's largest
#: threshold) come from the heap, and up to 1 GiB of freed heap is kept for reuse.
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_MALLOPT = ((_M_MMAP_THRESHOLD, 2**25), (_M_TRIM_THRESHOLD, 2**30), (_M_TOP_PAD, 2**26))
#: What :func:`return_freed_cpu_memory` sets: allocations from 1 MiB up are mapped on
#: their own and unmapped when freed, and a freed heap top above 1 MiB is trimmed.
_MALLOPT_RETURN = ((_M_MMAP_THRESHOLD, 2**20), (_M_TRIM_THRESHOLD, 2**20), (_M_TOP_PAD, 0))


def _mallopt(settings: tuple[tuple[int, int], ...]) -> bool:
    """Apply glibc ``mallopt`` settings (each one); ``True`` if all took. A no-op
    (``False``) off Linux or off glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl or another libc
        return False
    applied = [mallopt(param, value) == 1 for param, value in settings]  # each one
    log.debug("glibc mallopt %s: %s", settings, applied)
    return all(applied)


def keep_freed_cpu_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse in this process; ``True`` if set.

    torch allocates every CPU tensor with ``malloc``. By default glibc hands large
    blocks (above a dynamic threshold) straight back to the kernel when they are freed
    and trims the heap's free top, so a loop that allocates and frees megabyte tensors
    pays page faults (zeroed pages) on every allocation, and worker threads contend on
    the process's memory map. Measured on 2 cores, the analytic Myrtle5 kernel of 128
    digits in 8x8 blocks on 2 block workers: 1.33 s by default, 0.79 s with these
    settings (system time 4.5 s down to 1.1 s). What is kept is about what the loop
    held at its peak, once per worker thread (each has its own malloc arena). The
    settings stay until :func:`return_freed_cpu_memory` (a solve in the same process)
    replaces them. A no-op (``False``) off glibc.
    """
    return _mallopt(_MALLOPT)


def return_freed_cpu_memory() -> bool:
    """Make glibc's malloc give freed memory back to the kernel at once; ``True`` if set.

    The opposite trade of :func:`keep_freed_cpu_memory`, for a job that must stay
    within a memory limit (the solvers): by default glibc raises its mmap threshold
    each time a mapped block is freed (up to 32 MiB), after which blocks of that size
    come from the heap and freed ones stay with the process. Measured on a boosting
    solve (2000-row batches of a 14000-row kernel), the process's anonymous memory
    crept from 0.32 to 0.53 GiB over the batches by default. A fixed 1 MiB threshold
    keeps it at what the solver holds. The settings stay until
    :func:`keep_freed_cpu_memory` (an analytic kernel in the same process) replaces them.
    """
    return _mallopt(_MALLOPT_RETURN)
