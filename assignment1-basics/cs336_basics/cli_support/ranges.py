"""Declared valid ranges on config dataclass fields, checked when the config is built.

    @dataclass
    class Config:
        grad_clip: float = bounded(1.0, gt=0)
        def __post_init__(self):
            check_ranges(self)

A value outside its range (or NaN/inf, unless `finite=False`) raises a `UserError` naming the CLI flag.
"""

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from cs336_basics.cli_support.errors import UserError


@dataclass(frozen=True)
class Range:
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    finite: bool = True
    allow: tuple = ()  # special values accepted as they are (e.g. 0 meaning "off")

    def describe(self) -> str:
        parts = [f">= {self.ge:g}" if self.ge is not None else "", f"> {self.gt:g}" if self.gt is not None else "",
                 f"<= {self.le:g}" if self.le is not None else "", f"< {self.lt:g}" if self.lt is not None else ""]
        text = " and ".join(p for p in parts if p) or ("finite" if self.finite else "a number")
        return text + "".join(f" (or {a!r})" for a in self.allow)

    def holds(self, value: float) -> bool:
        if value in self.allow:
            return True
        if isinstance(value, float) and (math.isnan(value) or (self.finite and math.isinf(value))):
            return False
        return ((self.ge is None or value >= self.ge) and (self.gt is None or value > self.gt)
                and (self.le is None or value <= self.le) and (self.lt is None or value < self.lt))


def bounded(default: Any, *, ge: float | None = None, gt: float | None = None, le: float | None = None,
            lt: float | None = None, finite: bool = True, allow: tuple = ()) -> Any:
    """A dataclass field with a default and a valid range (see `check_ranges`)."""
    return dataclasses.field(default=default,
                             metadata={"range": Range(ge=ge, gt=gt, le=le, lt=lt, finite=finite, allow=allow)})


def range_help(field: dataclasses.Field) -> str:
    """"; must be > 0" for a field with a declared range (empty otherwise), for a flag's --help text."""
    declared = field.metadata.get("range")
    return "" if declared is None else f"; must be {declared.describe()}"


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def check_ranges(config: Any) -> None:
    """Every field of `config` with a declared range (and every float field, for NaN) must hold its value."""
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if value is None or isinstance(value, bool) or not isinstance(value, int | float):
            continue
        declared = field.metadata.get("range")
        rule = declared if declared is not None else Range(finite=False)
        if not rule.holds(value):
            need = rule.describe() if declared is not None else "a number, not NaN"
            raise UserError(f"{flag_name(field.name)} must be {need}, got {value}")
