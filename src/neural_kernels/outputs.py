"""Writing outputs so that a failed or killed run never leaves a plausible-looking file.

Scratch directories live inside the output directory (on its filesystem, so that moving
a finished file in is an atomic rename even when the output directory is a mount
point); resume state lives beside it. Large arrays are checked against the free space
of their filesystem before any work (:func:`require_space`) and allocated up front
(:func:`open_memmap`), so a full disk is one sentence, never a ``SIGBUS``.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import json
import logging
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
from numpy.typing import DTypeLike, NDArray

from neural_kernels.errors import DataError, NeuralKernelsError

log = logging.getLogger(__name__)

#: Resume directories made by this process (:func:`resume_dir`), for the message of an
#: interrupted run.
RESUMING: list[Path] = []


def _remove_stale_stages(out_dir: Path) -> None:
    """Remove the scratch directories for ``out_dir`` whose process, on this host, is
    gone (named ``.<out_dir name>.partial-<host>-<pid>-<random>``, inside ``out_dir``)."""
    host, prefix = socket.gethostname(), f".{out_dir.name}.partial-"
    for stale in out_dir.glob(glob.escape(prefix) + "*"):
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
    """Yield a scratch directory inside ``out_dir``; on success move its files in.

    Files are moved with ``os.replace`` (atomic per file), the file named ``last``
    after all others, so a reader that sees ``last`` sees a complete directory (an old
    ``last`` is removed first). On any error the scratch directory is removed and the
    files already in ``out_dir`` are left as they were. The scratch directories that
    killed runs (``kill -9``) on this host left for ``out_dir`` are removed first.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale_stages(out_dir)
    prefix = f".{out_dir.name}.partial-{socket.gethostname()}-{os.getpid()}-"
    stage = Path(tempfile.mkdtemp(prefix=prefix, dir=out_dir))
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
    RESUMING.append(scratch)
    return scratch, fresh


def move_file(source: Path, target: Path) -> None:
    """Move ``source`` to ``target``: a rename, or a copy where they lie on different
    filesystems (a resume directory beside an output directory that is a mount point)."""
    try:
        os.replace(source, target)
    except OSError as error:
        if error.errno != errno.EXDEV:
            raise
        shutil.move(source, target)


def _existing(path: Path) -> Path:
    """``path`` or its nearest existing ancestor (whose filesystem ``path`` will be on)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def free_bytes(path: Path) -> int:
    """Bytes an unprivileged writer may still use on the filesystem of ``path``."""
    return shutil.disk_usage(_existing(path)).free


def same_filesystem(a: Path, b: Path) -> bool:
    """Whether ``a`` and ``b`` (or their nearest existing ancestors) share a device."""
    return _existing(a).stat().st_dev == _existing(b).stat().st_dev


def _size(n_bytes: float) -> str:
    """``n_bytes`` in GB, MB or kB, three significant digits."""
    for unit, size in (("GB", 1e9), ("MB", 1e6)):
        if n_bytes >= size / 10:
            return f"{n_bytes / size:.3g} {unit}"
    return f"{n_bytes / 1e3:.3g} kB"


def require_space(directory: Path, files: Mapping[str, int], stage: str) -> None:
    """Refuse, before any work, to write ``files`` (name -> bytes) into ``directory``
    when its filesystem has less free space (one line with both sizes and the fix), or
    cannot be written at all (read-only, or not ours: the ``OSError`` that
    :func:`disk_error_message` words)."""
    existing = _existing(directory)
    if not os.access(existing, os.W_OK):
        code = errno.EROFS if os.statvfs(existing).f_flag & os.ST_RDONLY else errno.EACCES
        raise OSError(code, os.strerror(code), str(directory))
    needed = sum(files.values())
    free = free_bytes(directory)
    if needed > free:
        names = ", ".join(sorted(files)[:4]) + (", ..." if len(files) > 4 else "")
        raise NeuralKernelsError(
            f"{stage} would write {_size(needed)} ({names}) to {directory} but its filesystem "
            f"has {_size(free)} free; free space there or choose another output directory, "
            "then rerun. Nothing was computed"
        )


def array_bytes(shape: tuple[int, ...], dtype: DTypeLike) -> int:
    """Bytes of a ``.npy`` file of ``shape`` and ``dtype`` (its header is ignored)."""
    return int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize


def open_memmap(path: Path, dtype: DTypeLike, shape: tuple[int, ...]) -> np.memmap:
    """A new ``.npy`` memory map whose blocks are allocated on disk now
    (``posix_fallocate``), so that a disk that fills up raises ``ENOSPC`` here instead
    of killing a later write with ``SIGBUS``. Nothing is left at ``path`` on failure."""
    array = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
    try:
        with open(path, "rb+") as handle:
            os.posix_fallocate(handle.fileno(), 0, os.fstat(handle.fileno()).st_size)
    except OSError as error:
        del array
        Path(path).unlink(missing_ok=True)
        raise OSError(error.errno, error.strerror, str(path)) from None
    return array


def save_npy(path: Path, array: NDArray) -> None:
    """``np.save`` that reports a full disk as ``ENOSPC`` naming ``path`` (numpy's
    own write error names neither)."""
    try:
        np.save(path, array)
    except OSError as error:
        if error.errno is None and free_bytes(path) < array.nbytes:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from None
        raise


def read_json(path: Path, fix: str = "rerun the step that writes it") -> dict:
    """The JSON object in ``path``, or one clear :class:`DataError` naming the file."""
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise DataError(f"{path}: cannot read it as JSON ({error}); {fix}") from None
    if not isinstance(record, dict):
        raise DataError(f"{path}: expected a JSON object, got {type(record).__name__}; {fix}")
    return record


#: Errors of writing that a user fixes on the filesystem, and how.
DISK_ERRORS = {
    errno.ENOSPC: "no space left on its filesystem ({free} free); free space there or "
    "choose another output directory, then rerun",
    errno.EDQUOT: "the disk quota is exhausted ({free} free); free space or choose another "
    "output directory, then rerun",
    errno.EROFS: "its filesystem is mounted read-only; choose a writable output directory",
    errno.EACCES: "permission denied; choose an output directory you can write to",
    errno.EPERM: "operation not permitted; choose an output directory you can write to",
}


def disk_error_message(error: OSError) -> str | None:
    """One line for an ``OSError`` a user fixes on the filesystem (full, read-only, not
    writable), naming the path and the fix; ``None`` for any other error."""
    cause = DISK_ERRORS.get(error.errno)
    if cause is None:
        return None
    path = error.filename or "a file"
    try:
        free = _size(free_bytes(Path(path))) if error.filename else "little"
    except OSError:
        free = "little"
    resuming = _resuming()
    kept = f" (finished work is kept in {resuming})" if resuming else ""
    return f"cannot write {path}: {cause.format(free=free)}{kept}"


def _resuming() -> Path | None:
    """The resume directory of the stage that failed: the last one this process made
    that still exists (a finished stage removes its own)."""
    return next((path for path in reversed(RESUMING) if path.exists()), None)


def interrupted_message() -> str:
    """What an interrupted (Ctrl-C) stage says: where a rerun resumes from, if anywhere."""
    resuming = _resuming()
    if resuming is not None:
        return f"interrupted; rerunning resumes from {resuming}"
    return "interrupted; nothing was written: rerunning starts afresh"
