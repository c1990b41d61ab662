"""Facts about the machine a stage runs on, read without torch: the GPUs ``nvidia-smi``
lists (names, driver) and the CPU model. The device choice
(:mod:`neural_kernels.device`) and the report's provenance read them.

Ground floor: imports nothing of the package.
"""

from __future__ import annotations

import platform
import shutil
import subprocess
from pathlib import Path

PROC_CPUINFO = Path("/proc/cpuinfo")


def nvidia_smi_gpus() -> list[dict[str, str]]:
    """Every GPU ``nvidia-smi`` lists, as ``{"name", "driver"}``; empty where it is
    missing, fails or lists none."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    query = ["--query-gpu=name,driver_version", "--format=csv,noheader"]
    try:
        out = subprocess.run([exe, *query], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return []
    if out.returncode != 0:
        return []
    rows = [[part.strip() for part in line.split(",")] for line in out.stdout.splitlines()]
    return [
        {"name": row[0], "driver": row[1] if len(row) > 1 else "unknown"} for row in rows if row[0]
    ]


def nvidia_smi() -> str | None:
    """What ``nvidia-smi`` lists, in words, or ``None`` where it lists no GPU."""
    gpus = nvidia_smi_gpus()
    if not gpus:
        return None
    names = ", ".join(dict.fromkeys(gpu["name"] for gpu in gpus))
    return f"nvidia-smi lists {len(gpus)} GPU(s) ({names}, driver {gpus[0]['driver']})"


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what :mod:`platform` says."""
    try:
        for line in PROC_CPUINFO.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
