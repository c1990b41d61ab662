"""A real one-node SLURM cluster for the tests, from Debian's packages (slurm-wlm, munge).

``.ci/run`` installs the packages; :func:`single_node_cluster` writes a one-node
``slurm.conf`` (no accounting, ``MinJobAge`` of 10 minutes so that ``squeue`` still
shows finished jobs) and a ``cgroup.conf`` that enforces every job's memory as a
production cluster does (``TaskPlugin=task/cgroup``, ``ConstrainRAMSpace=yes``, cgroup
v1: a job past its ``--mem`` is killed), starts ``munged``, ``slurmctld`` and
``slurmd`` as plain background daemons (no systemd) and stops them by PID. The
configuration goes to ``/etc/slurm/``, where the commands inside a job find it (the
slurm executor's job step drops ``SLURM_CONF`` from the environment): never over a
configuration that this module did not write.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

CONF = Path("/etc/slurm/slurm.conf")
CGROUP_CONF = CONF.with_name("cgroup.conf")
#: The cgroup v1 memory controller that task/cgroup limits jobs with.
MEMORY_CGROUP = Path("/sys/fs/cgroup/memory")
MARKER = "# written by tests/slurm_cluster.py"
DAEMONS = ("munged", "slurmctld", "slurmd")
COMMANDS = (*DAEMONS, "sbatch", "squeue", "sinfo", "srun")


class ClusterUnavailable(RuntimeError):
    """The daemons did not start here (the message holds their logs)."""


def unavailable() -> str | None:
    """Why a cluster cannot be started here (None: it can)."""
    if os.geteuid() != 0:
        return "the SLURM daemons run as root here (not root)"
    missing = [name for name in COMMANDS if shutil.which(name) is None]
    if missing:
        return (
            f"SLURM is not installed ({', '.join(missing)} missing): "
            "apt-get install slurmctld slurmd slurm-client munge (.ci/run does)"
        )
    for conf in (CONF, CGROUP_CONF):
        if conf.exists() and MARKER not in conf.read_text():
            return f"{conf} exists (a real cluster's?); not replacing it"
    if not os.access(MEMORY_CGROUP / "memory.limit_in_bytes", os.W_OK) and not os.access(
        MEMORY_CGROUP, os.W_OK
    ):
        return f"the cgroup v1 memory controller ({MEMORY_CGROUP}) is not writable here"
    if not Path("/etc/munge/munge.key").exists():
        return "no munge key (/etc/munge/munge.key; the munge package creates it)"
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def machine_mem_mb() -> int:
    """This machine's memory in MB (slurmd drains a node that claims more than it has)."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    raise RuntimeError("no MemTotal in /proc/meminfo")


def slurm_conf(root: Path, cpus: int, mem_mb: int) -> str:
    """One node (this host) with ``cpus`` cores and ``mem_mb`` of memory (at most the
    machine's, less 256 MB), one partition."""
    mem_mb = min(mem_mb, machine_mem_mb() - 256)
    host = socket.gethostname()
    ctld_port, node_port = _free_port(), _free_port()
    return f"""{MARKER}
ClusterName=nktest
SlurmctldHost={host}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={root}/munge.socket
CryptoType=crypto/munge
MpiDefault=none
SlurmctldPort={ctld_port}
SlurmdPort={node_port}
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
ProctrackType=proctrack/cgroup
TaskPlugin=task/cgroup
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MinJobAge=600
ReturnToService=2
SchedulerType=sched/backfill
NodeName={host} CPUs={cpus} RealMemory={mem_mb} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


#: Every job's memory enforced: its cgroup's limit is its --mem (no swap here).
CGROUP = f"""{MARKER}
CgroupPlugin=cgroup/v1
CgroupMountpoint=/sys/fs/cgroup
CgroupAutomount=no
ConstrainCores=no
ConstrainDevices=no
ConstrainRAMSpace=yes
ConstrainSwapSpace=no
"""


def _pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _stop(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    for pid in pids:
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _wait_idle(root: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    state = ""
    while time.monotonic() < deadline:
        result = subprocess.run(
            ["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, check=False
        )
        state = result.stdout.strip()
        if state == "idle":
            return
        time.sleep(0.5)
    logs = "\n".join(
        (root / name).read_text()[-2000:] for name in ("slurmctld.log", "slurmd.log")
        if (root / name).exists()
    )  # fmt: skip
    raise ClusterUnavailable(f"the SLURM node did not become idle (state {state!r}):\n{logs}")


@contextlib.contextmanager
def single_node_cluster(root: Path, cpus: int = 2, mem_mb: int = 16000) -> Iterator[Path]:
    """Run a one-node cluster with its state in ``root`` until the block ends."""
    for name in ("state", "spool"):
        (root / name).mkdir(parents=True, exist_ok=True)
    CONF.parent.mkdir(parents=True, exist_ok=True)
    CONF.write_text(slurm_conf(root, cpus, mem_mb))
    CGROUP_CONF.write_text(CGROUP)
    pid_files = [root / "munged.pid", root / "slurmctld.pid", root / "slurmd.pid"]
    try:
        munged = [
            "munged", "--force", f"--socket={root}/munge.socket",
            f"--pid-file={root}/munged.pid", f"--log-file={root}/munged.log",
            f"--seed-file={root}/munged.seed",
        ]  # fmt: skip
        for command in (munged, ["slurmctld", "-c"], ["slurmd"]):
            started = subprocess.run(command, capture_output=True, text=True, check=False)
            if started.returncode != 0:
                raise ClusterUnavailable(f"{command[0]} did not start: {started.stderr[-2000:]}")
        _wait_idle(root)
        yield root
    finally:
        subprocess.run(["scancel", "--user", "root"], capture_output=True, check=False)
        _stop([pid for path in reversed(pid_files) if (pid := _pid(path)) is not None])
        for conf in (CONF, CGROUP_CONF):
            if conf.exists() and MARKER in conf.read_text():
                conf.unlink()
