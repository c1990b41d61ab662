"""Named tables of implementations, and names resolved on first use.

The ground floor of the package: it imports nothing of it. Architectures, activations,
solvers and data sources are :class:`Registry` tables; an entry may name its
implementation as ``"module:NAME"`` (:func:`resolve`), so that reading a table's names
never imports torch, and :class:`LazyChoices` offers a table's names to argparse and
the settings' checks without importing its module until they are asked for.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from neural_kernels.errors import NeuralKernelsError


class Registry(dict):
    """A table of named implementations (architectures, activations, solvers, sources).

    Adding one is one entry (:meth:`register`); the CLI's choices, the schema check and
    the report read the names from here.
    """

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def register(self, name: str, value: Any) -> Any:
        """Add ``value`` under ``name`` (an error if the name is taken); returns it."""
        if name in self:
            raise NeuralKernelsError(f"{self.kind} {name!r} is already registered")
        self[name] = value
        return value

    def lookup(self, name: str) -> Any:
        """The entry ``name``, or an error that lists the registered names."""
        if name not in self:
            raise NeuralKernelsError(f"unknown {self.kind} {name!r}; choose one of {names(self)}")
        return self[name]


def names(registry: Sequence[str] | dict) -> str:
    """``'a, b, c'``: the names a registry (or tuple of choices) accepts."""
    return ", ".join(registry)


class LazyChoices:
    """The names of a registry in a module imported on first use (``"module:NAME"``).

    argparse only tests membership when the option is given and lists the names in
    help, so building a parser does not import the module (nor torch).
    """

    def __init__(self, where: str, *, first: tuple[str, ...] = ()):
        self.where, self.first = where, first

    def _names(self) -> list[str]:
        return [*self.first, *resolve(self.where)]

    def __contains__(self, name: object) -> bool:
        return name in self._names()

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __len__(self) -> int:
        return len(self._names())


def resolve(target: Any) -> Any:
    """``"package.module:NAME"`` -> that object (imported now); anything else as is.

    Registries name implementations that import torch this way, so that reading a
    registry's names stays cheap.
    """
    if not isinstance(target, str):
        return target
    module, _, attribute = target.partition(":")
    return getattr(importlib.import_module(module), attribute)


def lazy_attributes(module: str, exports: dict[str, tuple[str, ...]]) -> Callable[[str], Any]:
    """A package's module ``__getattr__`` that imports the names of ``exports`` (module ->
    the names it defines) on first use, so that importing the package stays light."""
    where = {name: source for source, names in exports.items() for name in names}

    def attribute(name: str) -> Any:
        if name not in where:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        return getattr(importlib.import_module(where[name]), name)

    return attribute
