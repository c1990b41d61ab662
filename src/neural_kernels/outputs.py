"""Writing outputs so that a failed or killed run never leaves a plausible-looking file."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def staged_directory(out_dir: Path, last: str | None = None) -> Iterator[Path]:
    """Yield a scratch directory beside ``out_dir``; on success move its files in.

    Files are moved with ``os.replace`` (atomic per file), the file named ``last``
    after all others, so a reader that sees ``last`` sees a complete directory (an old
    ``last`` is removed first). On any error the scratch directory is removed and the
    files already in ``out_dir`` are left as they were.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
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
