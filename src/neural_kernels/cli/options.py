"""What every subcommand shares: option helpers and the parser types."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from neural_kernels.errors import NeuralKernelsError
from neural_kernels.settings import DEVICE_HELP

Handler = Callable[[argparse.Namespace], object]
Subparsers = argparse._SubParsersAction


def named_path(item: str, option: str) -> tuple[str, Path]:
    """``NAME=PATH`` -> ``(NAME, Path(PATH))``, or a clear error."""
    name, sep, path = item.partition("=")
    if not sep or not name.isidentifier() or not path:
        raise NeuralKernelsError(f"{option} takes NAME=PATH, got {item!r}")
    return name, Path(path)


def add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help=DEVICE_HELP)


def pick(record: dict, *keys: str) -> dict:
    return {key: record[key] for key in keys}
