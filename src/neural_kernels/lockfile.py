"""The lock of the full dependency set (``requirements.lock``), read and compared.

``requirements.lock`` is ``uv pip compile``'s output for ``pyproject.toml`` and its
test extra (``python tools/lock.py`` writes it): one ``name==version ; marker`` line per
distribution, each followed by ``# via`` comments naming what requires it. This module
reads it (:func:`read_lock`), checks it against ``pyproject.toml``
(:func:`uncovered_requirements`), compares it with the running environment
(:func:`environment_differences`), and derives the runtime part of it, the distributions
that ``pyproject.toml``'s runtime dependencies pull in (:func:`runtime_pins`), from
which the rules' conda environment is written (:func:`conda_environment`).
Torch-free and numpy-free: the report's provenance and the tests both use it.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

from neural_kernels.errors import NeuralKernelsError

#: The lock's file name, at the repository root.
LOCK = "requirements.lock"
#: The name under which the lock's ``# via`` comments cite ``pyproject.toml`` itself.
PROJECT = "neural-kernels"
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;]+)\s*(?:;\s*(.+))?$")
_VIA = re.compile(r"^\s+#\s+(?:via\s+)?([A-Za-z0-9][A-Za-z0-9._-]*)(?:\s|$)")


@dataclass(frozen=True)
class Pin:
    """One locked distribution: its canonical name, exact version, environment marker
    (``None``: every environment) and the canonical names of what requires it
    (:data:`PROJECT` for ``pyproject.toml``)."""

    name: str
    version: str
    marker: str | None
    via: tuple[str, ...]

    def applies(self, environment: dict[str, str] | None = None) -> bool:
        """Whether the pin is for ``environment`` (default: the running interpreter)."""
        return self.marker is None or Marker(self.marker).evaluate(environment)

    def line(self) -> str:
        """The pin as a requirement line, ``name==version ; marker``."""
        return f"{self.name}=={self.version}" + (f" ; {self.marker}" if self.marker else "")


def read_lock(path: Path) -> list[Pin]:
    """Every pin of the lock at ``path``, in file order; a line that is neither a pin, a
    comment nor blank is an error naming it."""
    pins: list[Pin] = []
    name = version = marker = None
    via: list[str] = []
    for number, raw in enumerate(Path(path).read_text().splitlines(), start=1):
        pin = _PIN.match(raw)
        if pin:
            if name:
                pins.append(Pin(name, version, marker, tuple(via)))
            name, version, marker = canonicalize_name(pin[1]), pin[2], pin[3]
            via = []
        elif name and (cited := _VIA.match(raw)) and raw.strip() != "# via":
            via.append(canonicalize_name(cited[1]))
        elif raw.strip() and not raw.lstrip().startswith("#"):
            raise NeuralKernelsError(
                f"{path}:{number} is not a pinned requirement ({raw.strip()!r}); regenerate "
                "the lock with `python tools/lock.py`"
            )
    if name:
        pins.append(Pin(name, version, marker, tuple(via)))
    return pins


def project_requirements(pyproject: Path, extras: tuple[str, ...] = ("test",)) -> list[Requirement]:
    """``pyproject.toml``'s runtime dependencies, then those of ``extras``."""
    project = tomllib.loads(Path(pyproject).read_text())["project"]
    lines = list(project["dependencies"])
    for extra in extras:
        lines += project["optional-dependencies"][extra]
    return [Requirement(line) for line in lines]


def uncovered_requirements(pins: list[Pin], requirements: list[Requirement]) -> list[str]:
    """One sentence per requirement the lock does not pin, or pins to a version outside
    its specifier; empty when the lock covers them all."""
    problems = []
    for requirement in requirements:
        name = canonicalize_name(requirement.name)
        versions = [pin.version for pin in pins if pin.name == name]
        if not versions:
            problems.append(f"{requirement} is not in the lock")
        problems += [
            f"{requirement} is locked at {version}"
            for version in versions
            if not requirement.specifier.contains(version, prereleases=True)
        ]
    return problems


def environment_differences(
    pins: list[Pin], installed: dict[str, str], required: set[str] | None = None
) -> list[str]:
    """One sentence per way the environment (``installed``: name -> version) departs
    from the pins that apply to it: an installed distribution at another version, or a
    ``required`` one (default: every pin that applies) that is missing. Distributions
    the lock does not name (pip, uv, a tool of one's own) are no difference."""
    installed = {canonicalize_name(name): version for name, version in installed.items()}
    problems = []
    for pin in pins:
        if not pin.applies():
            continue
        have = installed.get(pin.name)
        if have is None and (required is None or pin.name in required):
            problems.append(f"{pin.name} {pin.version} is locked but not installed")
        elif have is not None and not _same_version(have, pin.version):
            problems.append(f"{pin.name} is locked at {pin.version} but {have} is installed")
    return problems


def _same_version(a: str, b: str) -> bool:
    """Whether two version strings name one release (``1.0`` and ``1.0.0`` do); a string
    that is no PEP 440 version is compared as text."""
    try:
        return Version(a) == Version(b)
    except InvalidVersion:
        return a == b


def runtime_pins(pins: list[Pin], roots: list[Requirement]) -> list[Pin]:
    """The pins that ``roots`` (the runtime dependencies) pull in: a root itself, or a
    pin that some runtime pin requires (its ``# via`` comments), closed under that."""
    runtime = {canonicalize_name(root.name) for root in roots}
    grew = True
    while grew:
        grew = False
        for pin in pins:
            if pin.name not in runtime and runtime.intersection(pin.via):
                runtime.add(pin.name)
                grew = True
    return [pin for pin in pins if pin.name in runtime]


def conda_environment(pins: list[Pin], python: str) -> str:
    """The text of the rules' conda environment file: Python ``python`` and ``pins``
    through pip, quoted (a marker holds quotes and spaces)."""
    lines = [
        "# Generated by `python tools/lock.py` from requirements.lock: the runtime",
        "# dependencies of pyproject.toml at their locked versions. Do not edit by hand;",
        "# tests/test_lock.py checks that it matches the lock.",
        "channels:",
        "  - conda-forge",
        "  - nodefaults",
        "dependencies:",
        f"  - python={python}",
        "  - pip",
        "  - pip:",
    ]
    lines += [f'      - "{pin.line()}"' for pin in pins]
    return "\n".join(lines) + "\n"


def workflow_environment(repo: Path) -> str:
    """The rules' conda environment (``workflow/envs/neural_kernels.yaml``) as
    :func:`conda_environment` writes it from ``repo``'s lock and ``pyproject.toml``:
    the runtime pins, on the lowest Python that ``requires-python`` admits."""
    pyproject = Path(repo) / "pyproject.toml"
    requires = tomllib.loads(pyproject.read_text())["project"]["requires-python"]
    python = re.fullmatch(r">=\s*(\d+\.\d+)", requires.strip())
    if not python:
        raise NeuralKernelsError(f"requires-python {requires!r} is not of the form '>=X.Y'")
    roots = project_requirements(pyproject, extras=())
    return conda_environment(runtime_pins(read_lock(Path(repo) / LOCK), roots), python[1])
