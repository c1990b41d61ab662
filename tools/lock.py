"""Regenerate the lock of the full dependency set and the files made from it.

    pip install uv==0.13.9 && python tools/lock.py    # keep the locked versions
    python tools/lock.py --upgrade                    # move every pin to its newest release

1. ``requirements.lock``: ``uv pip compile`` of ``pyproject.toml`` and its test extra, one
   resolution for Linux and macOS (``[tool.uv] environments``) and every Python that
   ``requires-python`` admits, with as few version forks as possible. An existing lock's
   versions are kept unless ``--upgrade`` (or ``--upgrade-package NAME``) is given.
2. ``workflow/envs/neural_kernels.yaml``: the rules' conda environment, the runtime part
   of the lock (``neural_kernels.lockfile.workflow_environment``).

``tests/test_lock.py`` checks that both match ``pyproject.toml`` and each other, and that
the running environment matches the lock.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))  # runs in a checkout before `pip install -e .` too

from neural_kernels.lockfile import LOCK, lowest_python, workflow_environment  # noqa: E402

#: The uv that wrote requirements.lock (another may format or resolve it differently).
UV = "0.13.9"
COMPILE = [
    "uv", "pip", "compile", "pyproject.toml", "--extra", "test", "--universal",
    "--fork-strategy", "fewest", "--python-version", lowest_python(REPO / "pyproject.toml"),
    "--quiet", "--custom-compile-command", "python tools/lock.py", "--output-file", LOCK,
]  # fmt: skip
WORKFLOW_ENV = REPO / "workflow" / "envs" / "neural_kernels.yaml"


def main(extra: list[str]) -> None:
    if shutil.which("uv") is None:
        sys.exit(f"error: tools/lock.py runs uv; install it with `pip install uv=={UV}`")
    found = subprocess.run(["uv", "--version"], capture_output=True, text=True).stdout.split()
    if found[1:2] != [UV]:
        print(f"warning: the lock was written by uv {UV}, this is {' '.join(found)}; "
              f"`pip install uv=={UV}` to reproduce it exactly", file=sys.stderr)  # fmt: skip
    if subprocess.run(COMPILE + extra, cwd=REPO).returncode != 0:
        sys.exit(f"error: uv could not lock pyproject.toml (above); {LOCK} is unchanged")
    WORKFLOW_ENV.write_text(workflow_environment(REPO))
    print(f"wrote {LOCK} and {WORKFLOW_ENV.relative_to(REPO)}")


if __name__ == "__main__":
    main(sys.argv[1:])
