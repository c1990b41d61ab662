"""The memory this process may still allocate, and which limit says so.

A job's memory is bounded by the tightest of: the memory cgroups it runs in (a SLURM
job under ``task/cgroup``, a container, a capped process), cgroup v1 or v2, through
every ancestor up to the hierarchy's mount; SLURM's request (``SLURM_MEM_PER_NODE``, or
``SLURM_MEM_PER_CPU`` times ``SLURM_CPUS_ON_NODE``), enforced or not; and the machine's
``MemAvailable``. A cgroup's limit counts its anonymous memory as used, not its page
cache, which the kernel reclaims under the limit. The solve stage compares what a
solver will hold with this before it reads a kernel
(:func:`neural_kernels.solvers.kernel_dir.check_memory`).

Ground floor: imports nothing of the package. The ``/proc`` paths are module
constants, so that a test can point them at a cgroup tree of its own.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

PROC_SELF_CGROUP = Path("/proc/self/cgroup")
PROC_SELF_MOUNTINFO = Path("/proc/self/mountinfo")
PROC_SELF_STATUS = Path("/proc/self/status")
PROC_MEMINFO = Path("/proc/meminfo")
#: Above this a cgroup v1 memory limit means "none" (the kernel's page-rounded LONG_MAX).
UNLIMITED = 1 << 62
MIB, GIB = 1 << 20, 1 << 30
#: Each cgroup version's memory files: the limit, and the ``memory.stat`` key of its
#: anonymous memory (v1: the hierarchy's total).
CGROUP_FILES = {"v1": ("memory.limit_in_bytes", "total_rss"), "v2": ("memory.max", "anon")}


@dataclass(frozen=True)
class MemoryAvailable:
    """What this process may still allocate (``bytes``) and which limit says so."""

    bytes: int
    source: str


def _read_int(path: Path) -> int | None:
    """A cgroup file's number (``None``: absent, unreadable or ``max``)."""
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _stat(path: Path, key: str) -> int:
    """The number after ``key`` in a ``key value [unit]`` file (0 if absent)."""
    try:
        for line in path.read_text().splitlines():
            fields = line.split()
            if len(fields) >= 2 and fields[0] == key:
                return int(fields[1])
    except (OSError, ValueError):
        pass
    return 0


def _memory_mounts() -> dict[str, tuple[Path, str]]:
    """``{"v1": ..., "v2": ...}``: each memory hierarchy's mount point and the path,
    within the hierarchy, of its root there (a container sees its own cgroup as
    ``/``), from ``/proc/self/mountinfo``."""
    mounts: dict[str, tuple[Path, str]] = {}
    try:
        lines = PROC_SELF_MOUNTINFO.read_text().splitlines()
    except OSError:
        return mounts
    for line in lines:
        fields = line.split()
        if "-" not in fields:
            continue
        tail = fields[fields.index("-") + 1 :]
        root, point = fields[3], Path(fields[4])
        if tail[0] == "cgroup2":
            mounts.setdefault("v2", (point, root))
        elif tail[0] == "cgroup" and "memory" in tail[-1].split(","):
            mounts.setdefault("v1", (point, root))
    return mounts


def _cgroup_directories() -> list[tuple[str, Path, Path]]:
    """``(version, directory, mount point)`` of each memory cgroup of this process."""
    mounts, found = _memory_mounts(), []
    try:
        lines = PROC_SELF_CGROUP.read_text().splitlines()
    except OSError:
        return found
    for line in lines:
        _, controllers, path = line.split(":", 2)
        version = "v2" if controllers == "" else "v1"
        if version == "v1" and "memory" not in controllers.split(","):
            continue
        if version not in mounts:
            continue
        point, root = mounts[version]
        relative = path[len(root) :] if root != "/" and path.startswith(root) else path
        found.append((version, point / relative.lstrip("/"), point))
    return found


def cgroup_limits() -> list[MemoryAvailable]:
    """For each memory cgroup of this process and its ancestors up to the mount that has
    a limit: the limit less the anonymous memory its processes hold."""
    found = []
    for version, directory, point in _cgroup_directories():
        limit_file, anon_key = CGROUP_FILES[version]
        while True:
            limit = _read_int(directory / limit_file)
            if limit is not None and limit < UNLIMITED:
                used = _stat(directory / "memory.stat", anon_key)
                source = (
                    f"the cgroup memory limit {limit / GIB:.2f} GiB of {directory}, "
                    f"{used / GIB:.2f} GiB of it in use"
                )
                found.append(MemoryAvailable(limit - used, source))
            if directory == point or point not in directory.parents:
                break
            directory = directory.parent
    return found


def slurm_limit() -> MemoryAvailable | None:
    """SLURM's memory for this job (``--mem``, or ``--mem-per-cpu`` times its CPUs) less
    this process's anonymous memory; ``None`` outside SLURM or with ``--mem=0`` (the
    whole node)."""
    per_node = os.environ.get("SLURM_MEM_PER_NODE", "")
    per_cpu, cpus = os.environ.get("SLURM_MEM_PER_CPU", ""), os.environ.get("SLURM_CPUS_ON_NODE")
    if per_node.isdigit():
        mb, what = int(per_node), f"the SLURM job's --mem {per_node} MB"
    elif per_cpu.isdigit() and (cpus or "").isdigit():
        mb = int(per_cpu) * int(cpus)
        what = f"the SLURM job's --mem-per-cpu {per_cpu} MB x {cpus} CPUs"
    else:
        return None
    if mb == 0:
        return None
    return MemoryAvailable(mb * MIB - _stat(PROC_SELF_STATUS, "RssAnon:") * 1024, what)


def memory_available() -> MemoryAvailable:
    """The tightest of :func:`cgroup_limits`, :func:`slurm_limit` and the machine's
    ``MemAvailable``."""
    candidates = cgroup_limits()
    slurm = slurm_limit()
    if slurm is not None:
        candidates.append(slurm)
    available = _stat(PROC_MEMINFO, "MemAvailable:") * 1024
    candidates.append(MemoryAvailable(available, "the machine's available memory"))
    return min(candidates, key=lambda c: c.bytes)
