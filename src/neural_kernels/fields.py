"""Settings fields and what is built from them: the command line's options, a config
entry's options, and the checks of their values.

A stage's settings are a frozen dataclass (:mod:`neural_kernels.settings`); each field
is a :func:`setting` whose metadata carries its help text, its choices (a tuple, or a
:class:`~neural_kernels.registry.Registry`'s names, read lazily) and its minimum. The
command-line interface derives its options from these fields (:func:`add_arguments`,
:func:`from_arguments`) and the workflow its command lines from a config entry
(:func:`command_line`, :func:`from_config`).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import shlex
from collections.abc import Callable, Sequence
from typing import Any

from neural_kernels.errors import NeuralKernelsError
from neural_kernels.registry import LazyChoices, names

Choices = tuple[str, ...] | LazyChoices


def setting(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    choices: Choices | None = None,
    parse: Callable[[str], Any] | None = None,
    minimum: float | None = None,
    many: bool = False,
) -> Any:
    """A settings field: its default, help text, allowed values and command-line parse.

    ``minimum``: the smallest allowed value (checked by :func:`check`); ``many``: the
    option takes one or more values (a tuple). A field without a default is required.
    """
    metadata = {"help": help, "choices": choices, "parse": parse, "minimum": minimum}
    metadata["many"] = many
    return dataclasses.field(default=default, metadata=metadata)


def check(settings: object) -> None:
    """Check every field against its choices and minimum; one clear error otherwise."""
    kind = type(settings).__name__
    for field in dataclasses.fields(settings):
        value, meta = getattr(settings, field.name), field.metadata
        values = value if meta.get("many") else (value,)
        choices = meta.get("choices")
        if choices is not None and value is not None and value not in choices:
            raise NeuralKernelsError(
                f"{kind}: unknown {field.name} {value!r}; choose one of {names(choices)}"
            )
        minimum = meta.get("minimum")
        for item in values:
            if minimum is None or item is None:
                continue
            if not (isinstance(item, int | float) and math.isfinite(item) and item >= minimum):
                raise NeuralKernelsError(
                    f"{kind}: {field.name} must be at least {minimum} (and finite), got {item!r}"
                )


class Checked:
    """A settings class whose fields are checked (:func:`check`) when it is made."""

    def __post_init__(self) -> None:
        check(self)


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return value


def fraction(text: str) -> float:
    """argparse type: a number strictly between 0 and 1."""
    value = float(text)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"{value} is not strictly between 0 and 1")
    return value


def add_arguments(
    parser: argparse.ArgumentParser,
    cls: type,
    *,
    skip: Sequence[str] = (),
) -> None:
    """Add one ``--option`` per field of the settings class ``cls`` (but ``skip``).

    Booleans become flags; a field without a default is required; the option's default
    is the field's, shown in its help.
    """
    for field in dataclasses.fields(cls):
        if field.name in skip:
            continue
        meta, flag = field.metadata, "--" + field.name.replace("_", "-")
        required = field.default is dataclasses.MISSING
        default = None if required else field.default
        hidden = required or default is None or default is False or default == ()
        shown = "" if hidden else f" (default {default})"
        help_text = meta.get("help", "") + shown
        if isinstance(default, bool):
            parser.add_argument(flag, action="store_true", help=help_text)
            continue
        parse = meta.get("parse") or (type(default) if default not in (None, ()) else str)
        choices, metavar = meta.get("choices"), None
        if isinstance(choices, LazyChoices):
            # argparse lists choices in the metavar when it builds the parser; a named
            # metavar and %(choices)s (expanded when help is shown) keep that lazy
            metavar, help_text = field.name.upper(), f"{help_text}: %(choices)s"
        parser.add_argument(
            flag,
            type=parse,
            default=default,
            required=required,
            choices=choices,
            metavar=metavar,
            nargs="+" if meta.get("many") else None,
            help=help_text,
        )


def command_line(cls: type, values: dict) -> str:
    """The options :func:`add_arguments` declares for ``cls``, for the ``values`` of
    its fields that are given and not ``None`` (a config entry): how the workflow
    passes a config's settings to the CLI."""
    options = []
    for field in dataclasses.fields(cls):
        value = values.get(field.name)
        flag = "--" + field.name.replace("_", "-")
        if value is None or value is False or (field.metadata.get("many") and not value):
            continue
        if value is True:
            options.append(flag)
        elif field.metadata.get("many"):
            options.append(f"{flag} {' '.join(shlex.quote(str(v)) for v in value)}")
        else:
            options.append(f"{flag} {shlex.quote(str(value))}")
    return " ".join(options)


def from_config(cls: type, values: dict) -> Any:
    """An instance of ``cls`` from a config entry's values of its fields (other keys,
    such as ``device``, are ignored; a missing or ``None`` field takes its default)."""
    fields = dataclasses.fields(cls)
    given = {f.name: values[f.name] for f in fields if values.get(f.name) is not None}
    for field in fields:
        if field.metadata.get("many") and field.name in given:
            given[field.name] = tuple(given[field.name])
    return cls(**given)


def from_arguments(cls: type, args: argparse.Namespace, **given: Any) -> Any:
    """An instance of ``cls`` from the parsed options (``given`` fields override)."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if f.name not in given}
    for field in dataclasses.fields(cls):
        if field.metadata.get("many") and values.get(field.name) is not None:
            values[field.name] = tuple(values[field.name])
    return cls(**values, **given)


def changed_fields(values: Any, cls: type | None = None, keep: Sequence[str] = ()) -> list[str]:
    """The fields of the settings class ``cls`` (default: ``values``'s own), but
    ``keep``, whose value in ``values`` (settings or parsed options) is not their
    default: the options a user gave (a default given explicitly is indistinguishable,
    and harmless)."""
    return [
        field.name
        for field in dataclasses.fields(cls or values)
        if field.name not in keep
        and field.default is not dataclasses.MISSING
        and getattr(values, field.name) != field.default
    ]


def refuse_unused(owner: str, names: Sequence[str], users: str) -> None:
    """Raise for options given to ``owner`` that it does not use (``users`` do)."""
    if names:
        flags = ", ".join("--" + name.replace("_", "-") for name in names)
        raise NeuralKernelsError(
            f"{owner} does not use {flags} (used by {users}); drop "
            f"{'it' if len(names) == 1 else 'them'}"
        )


def replace_none(settings: Any, **defaults: Any) -> Any:
    """``settings`` with each named field that is ``None`` set to its default."""
    missing = {k: v for k, v in defaults.items() if getattr(settings, k) is None}
    return dataclasses.replace(settings, **missing) if missing else settings
