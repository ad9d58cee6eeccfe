"""Config dataclasses as command-line flags: every field becomes `--field-name`, typed from its annotation."""

import argparse
import dataclasses
import types
import typing
from typing import Any, TypeVar

from cs336_basics.cli_support import range_help

T = TypeVar("T")


def _base_type(annotation: Any) -> tuple[Any, bool]:
    """(underlying type, optional?) of `int`, `float | None`, `tuple[str, ...]`, ..."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0], True
    return annotation, False


def _parse_optional(kind: type):
    def parse(text: str):
        return None if text.lower() in ("none", "null", "") else kind(text)

    parse.__name__ = kind.__name__
    return parse


def add_config_arguments(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """One flag per dataclass field; bools get `--x/--no-x`, tuples take several values, optionals accept None."""
    hints = typing.get_type_hints(cls)
    group = parser.add_argument_group(f"{cls.__name__} (defaults shown)")
    for field in dataclasses.fields(cls):
        if field.name in skip:
            continue
        flag = "--" + field.name.replace("_", "-")
        kind, optional = _base_type(hints[field.name])
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        help_text = f"default {default!r}{range_help(field)}"
        if kind is bool:
            group.add_argument(flag, dest=field.name, action=argparse.BooleanOptionalAction, default=default,
                               help=help_text)
        elif typing.get_origin(kind) is tuple:
            group.add_argument(flag, dest=field.name, nargs="*", default=default, help=help_text)
        else:
            parse = _parse_optional(kind) if optional else kind
            group.add_argument(flag, dest=field.name, type=parse, default=default, help=help_text)


def config_from_args(cls: type[T], args: argparse.Namespace) -> T:
    """The dataclass built from parsed flags (tuple fields converted back from lists); validated if it can be."""
    hints = typing.get_type_hints(cls)
    values = {}
    for field in dataclasses.fields(cls):
        if hasattr(args, field.name):
            value = getattr(args, field.name)
            if typing.get_origin(_base_type(hints[field.name])[0]) is tuple and value is not None:
                value = tuple(value)
            values[field.name] = value
    config = cls(**values)
    if hasattr(config, "validate"):
        config.validate()
    return config
