"""Writing outputs so that a failed or killed run never leaves a plausible-looking file."""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import logging
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)


def _remove_stale_stages(out_dir: Path) -> None:
    """Remove the scratch directories for ``out_dir`` whose process, on this host, is
    gone (named ``.<out_dir name>.partial-<host>-<pid>-<random>``)."""
    host, prefix = socket.gethostname(), f".{out_dir.name}.partial-"
    for stale in out_dir.parent.glob(glob.escape(prefix) + "*"):
        # <host>-<pid>-<random>: mkdtemp's random part has no '-', a host name may
        parts = stale.name.removeprefix(prefix).rsplit("-", 2)
        if len(parts) != 3 or parts[0] != host or not parts[1].isdigit():
            continue
        if not _alive(int(parts[1])):
            log.info("removing %s, left by an interrupted run", stale)
            shutil.rmtree(stale, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


@contextlib.contextmanager
def staged_directory(out_dir: Path, last: str | None = None) -> Iterator[Path]:
    """Yield a scratch directory beside ``out_dir``; on success move its files in.

    Files are moved with ``os.replace`` (atomic per file), the file named ``last``
    after all others, so a reader that sees ``last`` sees a complete directory (an old
    ``last`` is removed first). On any error the scratch directory is removed and the
    files already in ``out_dir`` are left as they were. The scratch directories that
    killed runs (``kill -9``) on this host left for ``out_dir`` are removed first.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale_stages(out_dir)
    prefix = f".{out_dir.name}.partial-{socket.gethostname()}-{os.getpid()}-"
    stage = Path(tempfile.mkdtemp(prefix=prefix, dir=out_dir.parent))
    try:
        yield stage
        if last is not None:
            (out_dir / last).unlink(missing_ok=True)
        names = sorted(p.name for p in stage.iterdir() if p.is_file())
        for name in sorted(names, key=lambda n: n == last):
            os.replace(stage / name, out_dir / name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def write_json(path: Path, record: dict) -> None:
    """Write ``record`` as indented JSON with a trailing newline."""
    path.write_text(json.dumps(record, indent=2) + "\n")


def resume_key(record: dict) -> str:
    """A short hash of ``record`` (settings and inputs) that keys a resume directory."""
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]


def resume_dir(out_dir: Path, key: str) -> tuple[Path, bool]:
    """``.<out_dir name>.resume/`` beside ``out_dir``, and whether it starts afresh.

    The directory is emptied unless it holds ``key`` (a run with other settings or
    inputs never resumes from it), then marked with ``key``.
    """
    scratch = out_dir.parent / f".{out_dir.name}.resume"
    key_file = scratch / "key"
    if scratch.exists() and (not key_file.exists() or key_file.read_text() != key):
        log.info("settings or inputs changed: discarding the partial results in %s", scratch)
        shutil.rmtree(scratch)
    fresh = not scratch.exists()
    scratch.mkdir(parents=True, exist_ok=True)
    key_file.write_text(key)
    return scratch, fresh
