"""The one coercer of values users write, in TOML, JSON or on the command line: "8/255", "0.3", "true".

Every typed setting (run config fields, method options, attack overrides) goes through `coerce`, so a
value means the same wherever it is written, and a bad one is the same one-line UsageError. A setting is a
dataclass field declared with `setting(default, help, bounds="[0, 1)")`; `check_bounds` checks every such
field of a config section or a method's options against its declared range.
"""
from __future__ import annotations

import dataclasses
import math
import types
from fractions import Fraction
from typing import Any, Literal, Optional, Union, get_args, get_origin

from .errors import UsageError

TRUE, FALSE = ("true", "1", "yes"), ("false", "0", "no")
# A setting resolved when a run starts: "auto" until then, a plain bool after (what ran; speed.compile).
AutoBool = Union[Literal["auto"], bool]


def setting(default: Any = dataclasses.MISSING, help: str = "", *, choices: Any = None, flag: Optional[str] = None,
            factory: Any = dataclasses.MISSING, bounds: Optional[str] = None) -> Any:
    """A dataclass field with its help line, its choices (a tuple, or the name of a registry: "methods", ...),
    the short command-line flag it gets (default: --section-name) and its range (`check_range`).

    >>> import dataclasses
    >>> @dataclasses.dataclass
    ... class Options:
    ...     beta: float = setting(6.0, "weight of the KL term", bounds="[0, inf)")
    >>> check_bounds(Options(beta=-1.0), "method option ")
    Traceback (most recent call last):
    iat.errors.UsageError: method option beta must be in [0, inf), got -1.0
    """
    meta = {"help": help, "choices": choices, "flag": flag, "bounds": bounds}
    if factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def check_bounds(obj: Any, prefix: str = "") -> None:
    """Every field of the dataclass instance `obj` declared with `setting(bounds=...)` lies in its range; the
    error names the field as `prefix` + its name (None, the "use the default" of optional fields, passes)."""
    for f in dataclasses.fields(obj):
        if f.metadata.get("bounds"):
            check_range(getattr(obj, f.name), f.metadata["bounds"], f"{prefix}{f.name}")


def parse_number(value: object, name: str = "value") -> float:
    """Accept a float, an int or a string such as "8/255" and return a finite float."""
    if isinstance(value, bool):
        raise UsageError(f"{name} must be a number, got {value!r}")
    number = None
    if isinstance(value, (int, float)):
        try:
            number = float(value)
        except OverflowError:
            number = math.inf
    elif isinstance(value, str):
        try:
            number = float(Fraction(value.strip()))
        except (ValueError, ZeroDivisionError):
            pass
        except OverflowError:
            number = math.inf
    if number is None:
        raise UsageError(f"{name} must be a number such as 0.03 or 8/255, got {value!r}")
    if not math.isfinite(number):
        raise UsageError(f"{name} must be a finite number, got {value!r}")
    return number


def parse_int(value: object, name: str = "value") -> int:
    """An integer from an int, or from a number or string with no fractional part ("5", 5.0, "1e3")."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    number = parse_number(value, name)
    if number != int(number):
        raise UsageError(f"{name} must be an integer, got {value!r}")
    return int(number)


def parse_bool(value: object, name: str = "value") -> bool:
    """True or false from a bool or a spelling such as "true", "1", "no" (any case)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in TRUE + FALSE:
        return text in TRUE
    raise UsageError(f"{name} must be true or false, got {value!r}")


def parse_auto_bool(value: object, name: str = "value") -> Union[str, bool]:
    """"auto", or a bool from any spelling parse_bool accepts (old records hold true / false)."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    try:
        return parse_bool(value, name)
    except UsageError:
        raise UsageError(f"{name} must be auto, true or false, got {value!r}") from None


def coerce(value: Any, kind: Any, name: str = "value") -> Any:
    """Convert `value` to the declared type `kind` (bool, int, float, str, AutoBool, Optional[...],
    tuple[float, ...], dict); "none"/"null" is None for optional fields."""
    origin, args = get_origin(kind), get_args(kind)
    if kind is Any:
        return value
    if kind == AutoBool:
        return parse_auto_bool(value, name)
    if origin in (Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null")):
            if type(None) in args:
                return None
        options = [a for a in args if a is not type(None)]
        return coerce(value, options[0] if len(options) == 1 else Union[tuple(options)], name)
    if kind is dict or origin is dict:
        if not isinstance(value, dict):
            raise UsageError(f"{name} must be a table of key = value, got {value!r}")
        return dict(value)
    if origin is list:
        items = [v for v in value.split(",") if v.strip()] if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise UsageError(f"{name} must be a list, got {value!r}")
        return [coerce(v, args[0] if args else Any, name) for v in items]
    if origin is tuple:
        items = [v for v in value.split(",") if v.strip()] if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise UsageError(f"{name} must be a list of numbers, e.g. [0.5, 0.75], got {value!r}")
        return tuple(parse_number(v, name) for v in items)
    if kind is bool:
        return parse_bool(value, name)
    if kind is int:
        return parse_int(value, name)
    if kind is float:
        return parse_number(value, name)
    if value is None or isinstance(value, (dict, list)):
        raise UsageError(f"{name} must be a string, got {value!r}")
    return str(value)


def parse_literal(text: str) -> Any:
    """An untyped command-line value (attack overrides, NAME:KEY=VALUE): int, else number, else bool, else text."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return parse_number(text)
    except UsageError:
        pass
    if text.lower() in TRUE[:1] + FALSE[:1]:
        return text.lower() == "true"
    return text


def check_range(value: Any, bounds: str, name: str = "value") -> None:
    """`bounds` like "[0, 1)", "(0, inf)" or "[0, 2**63)": a UsageError naming the range unless value lies in it
    (every element of a tuple of numbers)."""
    if isinstance(value, tuple):
        for item in value:
            check_range(item, bounds, f"every value of {name}")
        return
    if value is None or isinstance(value, (bool, str)) or not isinstance(value, (int, float)):
        return
    lo_text, hi_text = (t.strip() for t in bounds[1:-1].split(","))
    lo, hi = (math.inf if t == "inf" else 2**63 if t == "2**63" else float(t) for t in (lo_text, hi_text))
    low_ok = value >= lo if bounds[0] == "[" else value > lo
    high_ok = value <= hi if bounds[-1] == "]" else value < hi
    if not (low_ok and high_ok):
        raise UsageError(f"{name} must be in {bounds}, got {value!r}")
