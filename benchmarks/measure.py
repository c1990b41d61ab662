"""Run a command in its own process and measure it: wall seconds, peak anonymous memory,
peak page cache, and (where a cgroup can be made) the cgroup's peak under an optional cap.

Shared by the benchmark scripts (``benchmarks/scale.py``, ``benchmarks/solvers.py``).
Memory is sampled every :data:`SAMPLE_SECONDS` from ``/proc/<pid>/status`` (``RssAnon``:
the process's own heap and tensors; ``RssFile``: the file pages it maps, such as a
memory-mapped kernel) and, inside a cgroup v1 memory group, from its ``memory.stat``
(``cache``: every page-cache page the process brought in, read or written, mapped or not)
and ``memory.max_usage_in_bytes`` (the kernel's own peak of both).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

MEMORY_CGROUP = Path("/sys/fs/cgroup/memory")
SAMPLE_SECONDS = 0.05
MB = 1 << 20


@dataclass
class Measured:
    """One command's run. ``cache_peak_mb`` is the cgroup's page cache where a cgroup was
    made (``cache_source`` "cgroup"), else the mapped file pages (``"mapped"``)."""

    returncode: int
    seconds: float
    anon_peak_mb: float
    cache_peak_mb: float
    cache_source: str
    cgroup_peak_mb: float | None
    cap_mb: float | None
    error: str | None

    def as_dict(self) -> dict:
        return asdict(self)


def can_make_cgroups() -> bool:
    """Whether a cgroup v1 memory group can be made here (root on a v1 host)."""
    return os.access(MEMORY_CGROUP, os.W_OK)


def evict_page_cache(root: Path) -> None:
    """Drop every file under ``root`` from the page cache, so the next stage reads its
    inputs from disk, as a fresh job on a cluster node would."""
    for path in [root] if root.is_file() else root.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def _status_kb(pid: int) -> dict[str, int]:
    values = {}
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                key, _, rest = line.partition(":")
                if key in ("RssAnon", "RssFile"):
                    values[key] = int(rest.split()[0])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return values


def _cgroup_cache_bytes(group: Path) -> int:
    for line in (group / "memory.stat").read_text().splitlines():
        key, _, value = line.partition(" ")
        if key == "cache":
            return int(value)
    return 0


def _last_error(log: Path) -> str | None:
    """The last ``error: ...`` line of a stage's log (its one-line failure), or its last
    line."""
    lines = log.read_text(errors="replace").splitlines() if log.exists() else []
    errors = [line for line in lines if line.startswith("error:")]
    return errors[-1] if errors else (lines[-1] if lines else None)


def run_measured(command: list[str], log: Path, cap_bytes: int | None = None) -> Measured:
    """Run ``command`` (its output to ``log``) in a fresh process, in a cgroup of its own
    (capped at ``cap_bytes`` if given) where one can be made, and measure it."""
    group = None
    if can_make_cgroups():
        group = MEMORY_CGROUP / f"nk-measure-{os.getpid()}-{time.monotonic_ns()}"
        group.mkdir()
        if cap_bytes:
            (group / "memory.limit_in_bytes").write_text(str(cap_bytes))
        command = ["sh", "-c", f'echo $$ > {group}/cgroup.procs && exec "$@"', "sh", *command]
    anon = mapped = cache = 0
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    process = None
    try:
        with open(log, "w") as out:
            process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
            while process.poll() is None:
                status = _status_kb(process.pid)
                anon = max(anon, status.get("RssAnon", 0) * 1024)
                mapped = max(mapped, status.get("RssFile", 0) * 1024)
                if group:
                    cache = max(cache, _cgroup_cache_bytes(group))
                time.sleep(SAMPLE_SECONDS)
        seconds = time.perf_counter() - started
        cgroup_peak = None
        if group:
            cgroup_peak = int((group / "memory.max_usage_in_bytes").read_text()) / MB
    finally:
        if process is not None and process.poll() is None:  # interrupted: stop the stage
            process.kill()
            process.wait()
        if group:
            _remove_group(group)
    return Measured(
        returncode=process.returncode,
        seconds=seconds,
        anon_peak_mb=anon / MB,
        cache_peak_mb=(cache if group else mapped) / MB,
        cache_source="cgroup" if group else "mapped",
        cgroup_peak_mb=cgroup_peak,
        cap_mb=cap_bytes / MB if cap_bytes and group else None,
        error=_error(process.returncode, log, cap_bytes if group else None),
    )


def _remove_group(group: Path) -> None:
    for _ in range(50):  # the exited process leaves the group a moment later
        try:
            group.rmdir()
            return
        except OSError:
            time.sleep(0.1)
    print(f"warning: could not remove the cgroup {group}; rmdir it by hand", file=sys.stderr)


def _error(returncode: int, log: Path, cap: int | None) -> str | None:
    """What went wrong: the stage's own one-line error, or the signal that killed it."""
    if returncode == 0:
        return None
    if returncode < 0:
        why = f"killed by signal {-returncode}"
        if cap:
            why += f" (out of memory under the {cap / 2**30:.1f} GiB cap?)"
        return why
    return _last_error(log)
