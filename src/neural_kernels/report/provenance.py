"""What a run was made with: every installed distribution and its version, the lock
file's hash and where the environment departs from it, Python, the operating system,
the CPU, and the GPUs and driver where present. Each report writes it to
``results/provenance.json``; the report shows the packages that shape results
(:data:`SHAPING`) and points to the file for the rest.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import platform
import re
from pathlib import Path

from neural_kernels import host
from neural_kernels.lockfile import (
    LOCK,
    environment_differences,
    project_requirements,
    read_lock,
    runtime_pins,
)
from neural_kernels.outputs import write_json

#: The distributions whose versions shape the results and figures (the report lists them).
SHAPING = (
    "neural-kernels", "torch", "torchvision", "numpy", "scipy", "scikit-learn", "pandas",
    "matplotlib", "jinja2", "snakemake",
)  # fmt: skip
PROVENANCE = "provenance.json"


def distributions() -> dict[str, str]:
    """Every installed distribution (lower-case name) and its version, sorted by name."""
    found = {
        dist.metadata["Name"].lower(): dist.version
        for dist in importlib.metadata.distributions()
        if dist.metadata["Name"]
    }
    return dict(sorted(found.items()))


def torch_cuda() -> str | None:
    """The CUDA version the installed torch wheel was built for, read from its
    ``version.py`` without importing torch (6 s); ``None`` for a CPU-only build or
    without torch."""
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return None
    try:
        text = (Path(spec.submodule_search_locations[0]) / "version.py").read_text()
    except OSError:
        return None
    found = re.search(r"^cuda\b.*=\s*['\"]([^'\"]+)['\"]", text, re.MULTILINE)
    return f"CUDA {found.group(1)}" if found else None


def lock_record(repo: Path, installed: dict[str, str]) -> dict:
    """The lock's file name and sha256, and how the environment (``installed``) departs
    from the lock's runtime part (the test extra is not needed to run, and need not
    match): a runtime distribution missing or at another version. ``sha256`` and
    ``differences`` are ``None`` where ``repo`` has no lock."""
    lock = Path(repo) / LOCK
    if not lock.is_file():
        return {"file": LOCK, "sha256": None, "differences": None}
    pins = read_lock(lock)
    pyproject = Path(repo) / "pyproject.toml"
    roots = project_requirements(pyproject, extras=()) if pyproject.is_file() else []
    runtime = {pin.name for pin in runtime_pins(pins, roots)}
    return {
        "file": LOCK,
        "sha256": hashlib.sha256(lock.read_bytes()).hexdigest(),
        "differences": environment_differences(pins, installed, runtime),
    }


def environment(repo: Path) -> dict:
    """The run's environment (see the module docstring)."""
    installed = distributions()
    return {
        "python": platform.python_version(),
        "os": platform.platform(),
        "cpu": host.cpu_model(),
        "lock": lock_record(repo, installed),
        "cuda": {
            "torch_built_for": torch_cuda(),
            "gpus": host.nvidia_smi_gpus(),
        },
        "distributions": installed,
    }


def write_provenance(results_dir: Path, record: dict) -> Path:
    """Write ``record`` as ``results_dir/provenance.json``; returns its path."""
    path = Path(results_dir) / PROVENANCE
    write_json(path, record)
    return path
