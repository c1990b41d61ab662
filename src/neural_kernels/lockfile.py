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
from itertools import product
from pathlib import Path

from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.specifiers import InvalidSpecifier, SpecifierSet
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


#: The platforms (``sys_platform``, ``platform_system``, ``platform_machine``) and
#: Pythons a lock may be for; :func:`lock_targets` keeps those ``pyproject.toml`` names.
PLATFORMS = (
    ("linux", "Linux", "x86_64"), ("linux", "Linux", "aarch64"),
    ("darwin", "Darwin", "arm64"), ("win32", "Windows", "AMD64"),
)  # fmt: skip
PYTHONS = ("3.11", "3.12", "3.13", "3.14")


def lock_targets(pyproject: Path) -> tuple[dict[str, str], ...]:
    """The environments the lock is for, as marker variables: each of :data:`PLATFORMS`
    that one of ``[tool.uv] environments`` admits (all where none is set), on each of
    :data:`PYTHONS` from :func:`lowest_python` on."""
    config = tomllib.loads(Path(pyproject).read_text())
    markers = [Marker(m) for m in config.get("tool", {}).get("uv", {}).get("environments", [])]
    lowest = Version(lowest_python(pyproject))
    targets = []
    for (sys_platform, system, machine), python in product(PLATFORMS, PYTHONS):
        target = {"sys_platform": sys_platform, "platform_system": system,
                  "platform_machine": machine, "python_version": python,
                  "python_full_version": f"{python}.0"}  # fmt: skip
        if Version(python) >= lowest and (not markers or any(m.evaluate(target) for m in markers)):
            targets.append(target)
    return tuple(targets)


def _target_name(target: dict[str, str]) -> str:
    return (
        f"{target['sys_platform']} {target['platform_machine']} Python {target['python_version']}"
    )


def uncovered_requirements(
    pins: list[Pin], requirements: list[Requirement], targets: tuple[dict[str, str], ...]
) -> list[str]:
    """One sentence per requirement the lock leaves open in one of ``targets`` (see
    :func:`lock_targets`): no pin that applies there, or one at a version outside the
    requirement's specifier. A requirement is checked only where its own marker holds.
    Empty when the lock covers them all."""
    problems = []
    for requirement in requirements:
        name = canonicalize_name(requirement.name)
        for target in targets:
            if requirement.marker and not requirement.marker.evaluate({**target, "extra": ""}):
                continue
            versions = [pin.version for pin in pins if pin.name == name and pin.applies(target)]
            where = _target_name(target)
            if not versions:
                problems.append(f"{requirement} has no pin for {where}")
            problems += [
                f"{requirement} is locked at {version} for {where}"
                for version in versions
                if not requirement.specifier.contains(version, prereleases=True)
            ]
    return list(dict.fromkeys(problems))


def environment_differences(
    pins: list[Pin], installed: dict[str, str], counted: set[str] | None = None
) -> list[str]:
    """One sentence per way the environment (``installed``: name -> version) departs
    from the pins that apply to it and are ``counted`` (default: all of them): one
    missing, or installed at a version that ``==`` the pin does not admit (pip's rule:
    a local build such as ``2.14.1+cu130`` is ``2.14.1``). Distributions the lock does
    not name (pip, uv, a tool of one's own) are no difference."""
    installed = {canonicalize_name(name): version for name, version in installed.items()}
    problems = []
    for pin in pins:
        if not pin.applies() or (counted is not None and pin.name not in counted):
            continue
        have = installed.get(pin.name)
        if have is None:
            problems.append(f"{pin.name} {pin.version} is locked but not installed")
        elif not _admits(pin.version, have):
            problems.append(f"{pin.name} is locked at {pin.version} but {have} is installed")
    return problems


def _admits(pinned: str, have: str) -> bool:
    """Whether ``==pinned`` admits version ``have``, as pip decides; a string that is no
    PEP 440 version is compared as text."""
    try:
        return SpecifierSet(f"=={pinned}").contains(Version(have), prereleases=True)
    except (InvalidVersion, InvalidSpecifier):
        return pinned == have


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


def lowest_python(pyproject: Path) -> str:
    """The lowest Python (``X.Y``) that ``pyproject.toml``'s ``requires-python`` admits:
    the one the lock is resolved from and the conda environments install."""
    requires = tomllib.loads(Path(pyproject).read_text())["project"]["requires-python"]
    python = re.fullmatch(r">=\s*(\d+\.\d+)", requires.strip())
    if not python:
        raise NeuralKernelsError(f"requires-python {requires!r} is not of the form '>=X.Y'")
    return python[1]


def workflow_environment(repo: Path) -> str:
    """The rules' conda environment (``workflow/envs/neural_kernels.yaml``) as
    :func:`conda_environment` writes it from ``repo``'s lock and ``pyproject.toml``:
    the runtime pins, on the lowest Python that ``requires-python`` admits."""
    pyproject = Path(repo) / "pyproject.toml"
    roots = project_requirements(pyproject, extras=())
    pins = runtime_pins(read_lock(Path(repo) / LOCK), roots)
    return conda_environment(pins, lowest_python(pyproject))
