"""A name -> factory registry per family (models, attacks, methods, data sets, optimizers, schedules, balls),
in the style of timm.

The CLI's choices and help, and the parametrised tests, enumerate these, so adding a component is one
decorator. An unknown name is a UsageError that lists the choices and suggests the nearest one.
"""
from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable
from typing import Any, Generic, TypeVar

from .errors import UsageError

T = TypeVar("T")


def did_you_mean(name: object, choices: Iterable[str]) -> str:
    """' (did you mean X?)' for the nearest of `choices`, or ''."""
    close = difflib.get_close_matches(str(name), list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


class Registry(Generic[T]):
    """Factories of one family (`family`: "model", "attack", ...) by name, each with a one-line help."""

    def __init__(self, family: str) -> None:
        self.family = family
        self._items: dict[str, Callable[..., T]] = {}
        self._help: dict[str, str] = {}

    def register(self, name: str, help: str = "") -> Callable[[Callable[..., T]], Callable[..., T]]:
        """A decorator that registers a factory under `name` and returns the factory unchanged.

        Args:
            name: the name users give (CLI flags, `create`); registering a name twice is a KeyError.
            help: the one line `describe` (and `iat list`) shows; empty: the first line of the factory's docstring.

        Returns:
            The decorator.
        """
        def deco(factory: Callable[..., T]) -> Callable[..., T]:
            if name in self._items:
                raise KeyError(f"{self.family} {name!r} is registered twice")
            self._items[name] = factory
            doc = (factory.__doc__ or "").strip().splitlines()
            self._help[name] = help or (doc[0] if doc else "")
            return factory

        return deco

    def get(self, name: str) -> Callable[..., T]:
        """The factory registered under `name`.

        Args:
            name: a registered name.

        Returns:
            The factory, uncalled.

        Raises:
            UsageError: an unknown name; the message lists the choices and suggests the nearest one.
        """
        if name not in self._items:
            raise UsageError(f"unknown {self.family} {name!r}{self.suggest(name)}; "
                             f"choose one of: {', '.join(self.names())}")
        return self._items[name]

    def suggest(self, name: object) -> str:
        """' (did you mean X?)' for the nearest registered name, or ''."""
        return did_you_mean(name, self.names())

    def create(self, name: str, **kwargs: Any) -> T:
        """Call the factory registered under `name`.

        Args:
            name: a registered name.
            **kwargs: the factory's keyword arguments.

        Returns:
            What the factory returns.

        Raises:
            UsageError: an unknown name (see `get`).
        """
        return self.get(name)(**kwargs)

    def names(self) -> list[str]:
        """The registered names, sorted."""
        return sorted(self._items)

    def describe(self) -> dict[str, str]:
        """{name: one-line help} for every registered name, sorted by name."""
        return {n: self._help[n] for n in self.names()}

    def __contains__(self, name: object) -> bool:
        return name in self._items
