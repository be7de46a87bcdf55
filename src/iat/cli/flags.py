"""Command-line flags generated from config dataclasses: one flag per field, with the field's help line,
its default and its choices (from the registries), so `--help` and the config can never drift apart.

A flag's value stays a string until the config's one coercer (values.coerce) converts it, so a flag, a
TOML file and a JSON file accept the same spellings ("8/255", "true").
"""
from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Iterator
from typing import Any, Optional

from ..config import set_path
from ..reporting.render import fmt_eps


def choices_text(choices: Any, lead: str = "; ") -> str:
    """"; one of: a, b" for a registry's name or a list of choices; "" for None."""
    if choices is None:
        return ""
    from ..training.setup import registries  # lazily: the registries import every component

    names = registries()[choices].names() if isinstance(choices, str) else list(choices)
    return f"{lead}one of: {', '.join(names)}"


def _default_text(value: Any) -> str:
    if isinstance(value, float):  # 8/255 where that is what a long decimal means, else 0.4 as 0.4
        return fmt_eps(value) if len(repr(value)) > 8 else f"{value:g}"
    if isinstance(value, tuple):
        return ",".join(_default_text(v) for v in value)
    if value is None or value == []:
        return "none"
    return str(value).lower() if isinstance(value, bool) else str(value)


def help_line(f: dataclasses.Field, default: Any) -> str:
    """A flag's help: the field's help text, its default and its choices."""
    text = f.metadata.get("help") or f.name.replace("_", " ")
    choices = f.metadata.get("choices")
    if "default" in text:  # the help says what the default means ("default: the training eps")
        return text + (f" ({choices_text(choices, lead='')})" if choices else "")
    return f"{text} (default: {_default_text(default)}{choices_text(choices)})"


def leaves(cls: type, prefix: str = "") -> Iterator[tuple[str, dataclasses.Field, Any]]:
    """(dotted key, field, default) of every leaf field of a config dataclass."""
    instance = cls()
    for f in dataclasses.fields(cls):
        value = getattr(instance, f.name)
        if dataclasses.is_dataclass(value):
            yield from leaves(type(value), f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", f, value


def flag_name(key: str, f: dataclasses.Field) -> str:
    """The flag of a dotted config key: --optim-lr for optim.lr, unless the field names its own."""
    return "--" + (f.metadata.get("flag") or key.replace(".", "-").replace("_", "-"))


def add_flags(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = (),
              positional: tuple[str, ...] = ()) -> dict[str, str]:
    """Add one flag per leaf field of `cls` (not those in `skip`); returns dest -> dotted key.

    Booleans get --x / --no-x. Every flag defaults to None, so only what was typed overrides a config file.
    """
    dests = {}
    for key, f, default in leaves(cls):
        if key in skip:
            continue
        dest = key.replace(".", "__")
        text = help_line(f, default)
        if key in positional:
            nargs = "*" if isinstance(default, list) else "?"
            parser.add_argument(dest, nargs=nargs, default=None, metavar=key.upper(), help=text)
        elif isinstance(default, bool):
            parser.add_argument(flag_name(key, f), dest=dest, default=None, action=argparse.BooleanOptionalAction,
                                help=text)
        else:
            metavar = key.split(".")[-1].upper()
            parser.add_argument(flag_name(key, f), dest=dest, default=None, metavar=metavar, help=text)
        dests[dest] = key
    return dests


def given(args: argparse.Namespace, dests: dict[str, str]) -> dict[str, Any]:
    """Dotted key -> value of the flags the user typed."""
    out = {}
    for dest, key in dests.items():
        value = getattr(args, dest, None)
        if value is not None and value != []:
            out[key] = value
    return out


def build(cls: type, args: argparse.Namespace, dests: dict[str, str], base: Optional[Any] = None) -> Any:
    """An instance of `cls` (or `base`, updated): defaults <- what the flags say, coerced and checked."""
    cfg = base if base is not None else cls()
    for key, value in given(args, dests).items():
        cfg = set_path(cfg, key, value)
    return cfg


TRAIN_SKIP = ("method_options", "progress")
