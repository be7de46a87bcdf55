"""Parsing of numbers users write in configs: "8/255", "0.3", 2e-3."""
from __future__ import annotations

from fractions import Fraction

from .registry import UsageError


def parse_number(value: object, name: str = "value") -> float:
    """Accept a float, an int or a string such as "8/255" and return a float."""
    if isinstance(value, bool):
        raise UsageError(f"{name} must be a number, got {value!r}")
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(Fraction(value.strip()))
        except (ValueError, ZeroDivisionError):
            pass
    raise UsageError(f"{name} must be a number such as 0.03 or 8/255, got {value!r}")
