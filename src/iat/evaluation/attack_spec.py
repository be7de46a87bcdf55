"""What `--attacks` says: "natural,pgd20:restarts=5,cw" parsed into the attacks of one threat model, with their
overrides typed as the attack's fields declare them. `iat eval`, `iat.evaluate` and the table specs of
`iat reproduce` read attack lists through here."""
from __future__ import annotations

import dataclasses
import typing
from typing import Any

from ..attacks import PGD, Attack, Natural, create_attack
from ..errors import UsageError
from ..threat import ThreatModel
from ..values import coerce, parse_literal


def parse_attack_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """'pgd20:restarts=5:steps=50' -> ('pgd20', {'restarts': 5, 'steps': 50})."""
    name, *parts = spec.split(":")
    overrides = {}
    for part in parts:
        key, sep, value = part.partition("=")
        if not sep or not key:
            raise UsageError(f"attack overrides look like NAME:KEY=VALUE (e.g. pgd20:restarts=5), got {spec!r}")
        overrides[key.strip()] = parse_literal(value.strip())
    return name.strip(), overrides


def typed_overrides(name: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """NAME:KEY=VALUE values as the attack's fields declare them (pgd20:steps=x is named, not a TypeError)."""
    hints = typing.get_type_hints(PGD)
    return {k: coerce(v, hints[k], f"attack {name}: {k}") if hints.get(k) in (int, float, bool) else v
            for k, v in overrides.items()}


def build_attacks(names: str, threat: ThreatModel, restarts: int = 1) -> dict[str, Attack]:
    """Comma-separated specs -> {spec: attack} in `threat`'s ball; 'natural' comes first even when not asked for."""
    specs = [n.strip() for n in names.split(",") if n.strip()]
    if not specs:
        raise UsageError("--attacks is empty; e.g. --attacks natural,pgd20")
    if len(set(specs)) != len(specs):
        raise UsageError(f"--attacks names an attack twice: {names}")
    if restarts < 1:
        raise UsageError(f"--restarts must be at least 1, got {restarts}")
    attacks: dict[str, Attack] = {"natural": Natural()}
    for spec in specs:
        name, overrides = parse_attack_spec(spec)
        if name == "natural":
            continue
        try:
            attack = create_attack(name, **{"eps": threat.eps, "norm": threat.norm, **typed_overrides(name, overrides)})
        except TypeError as err:
            raise UsageError(f"attack {name!r} does not accept {sorted(overrides)}: {err}") from None
        if isinstance(attack, PGD) and attack.random_start and restarts > 1 and "restarts" not in overrides:
            attack = dataclasses.replace(attack, restarts=restarts)
        attacks[spec] = attack
    return attacks
