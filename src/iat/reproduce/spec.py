"""Table specs of `iat reproduce`: cells (method x settings), seeds, one shared training config, the
evaluations and the claims to check, read from TOML and validated before anything runs."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Optional

from .. import config as C
from ..data.standards import resolve_threat
from ..errors import UsageError

SPEC_DIR = Path(__file__).parents[1] / "experiments"
KINDS = ("best", "last")


@dataclasses.dataclass
class Cell:
    name: str
    settings: dict[str, Any]  # dotted config keys -> values, applied over the table's config


@dataclasses.dataclass
class Compare:
    claim: str
    base: str
    ours: str
    kind: str = "robust"  # "robust": accuracy comparison; "overfitting": CO flags and last-epoch robustness


@dataclasses.dataclass
class EvalGroup:
    """One `iat eval` per checkpoint: its attacks on the first n test examples, saved as eval-<ckpt>[-name].json.
    `late` groups (AutoAttack) run after every cell has trained, so a partial run still yields whole tables."""
    attacks: str
    n_examples: Optional[int] = None
    name: str = ""
    late: bool = False

    def columns(self) -> list[str]:
        return [a for a in self.attacks.split(",") if a]


@dataclasses.dataclass
class TableSpec:
    name: str
    title: str
    seeds: list[int]
    config: dict[str, Any]
    cells: list[Cell]
    evals: list[EvalGroup] = dataclasses.field(default_factory=lambda: [EvalGroup("natural,pgd20,cw")])
    checkpoints: tuple[str, ...] = KINDS
    compare: list[Compare] = dataclasses.field(default_factory=list)
    notes: str = ""
    source: str = ""

    def cell(self, name: str) -> Cell:
        return next(c for c in self.cells if c.name == name)

    def train_config(self, cell: Cell, seed: int) -> C.TrainConfig:
        cfg = C.from_dict(self.config)
        for key, value in cell.settings.items():
            if key == "method_options":
                cfg.method_options = dict(cfg.method_options, **value)
            else:
                C.set_path(cfg, key, value)
        cfg.seed = seed
        cfg.progress = False
        typed = _threat_keys(self.config) | _threat_keys(cell.settings)
        cfg.threat = resolve_threat(cfg.data.name, cfg.threat, typed)[0]  # no eps: the data set's standard
        return cfg


def _threat_keys(values: dict[str, Any]) -> set[str]:
    """The threat keys a table's config or a cell's settings set ({"threat": {...}} or "threat.eps")."""
    keys = {k.split(".", 1)[1] for k in values if k.startswith("threat.")}
    return keys | set(values.get("threat") or {}) if isinstance(values.get("threat"), dict) else keys


def builtin_tables() -> dict[str, Path]:
    return {p.stem: p for p in sorted(SPEC_DIR.glob("*.toml"))}


def load_spec(name: str) -> TableSpec:
    """A built-in table by name, or a TOML spec file by path; every cell's config is checked here."""
    path = Path(name)
    if not path.is_file():
        tables = builtin_tables()
        if name not in tables:
            raise UsageError(f"no table {name!r}: give a spec file or one of {', '.join(tables)} (iat reproduce --list)")
        path = tables[name]
    raw = C.read_config_file(path)
    known = {"title", "seeds", "config", "cells", "evals", "checkpoints", "compare", "notes"}
    if set(raw) - known:
        raise UsageError(f"{path}: unknown keys {sorted(set(raw) - known)}; a table spec has {sorted(known)}")
    try:
        cells = [Cell(c.pop("name"), c) for c in (dict(c) for c in raw["cells"])]
        evals = [EvalGroup(**e) for e in raw.get("evals", [{"attacks": "natural,pgd20,cw"}])]
        spec = TableSpec(
            name=path.stem, title=raw.get("title", path.stem), seeds=[int(s) for s in raw.get("seeds", [0])],
            config=raw["config"], cells=cells, evals=evals, checkpoints=tuple(raw.get("checkpoints", KINDS)),
            compare=[Compare(**c) for c in raw.get("compare", [])], notes=raw.get("notes", ""), source=str(path))
    except (KeyError, TypeError, ValueError) as err:
        raise UsageError(f"{path}: malformed table spec ({type(err).__name__}: {err})") from None
    names = [c.name for c in spec.cells]
    if len(set(names)) != len(names) or not names:
        raise UsageError(f"{path}: cells need distinct names, got {names}")
    groups = [g.name for g in spec.evals]
    if len(set(groups)) != len(groups) or not groups or spec.evals[0].late:
        raise UsageError(f"{path}: evals need distinct names and a first group that is not late, got {groups}")
    if not set(spec.checkpoints) <= set(KINDS):
        raise UsageError(f"{path}: eval.checkpoints must be among {KINDS}, got {list(spec.checkpoints)}")
    for cmp in spec.compare:
        if {cmp.base, cmp.ours} - set(names) or cmp.kind not in ("robust", "overfitting"):
            raise UsageError(f"{path}: compare {cmp} names an unknown cell or kind (robust|overfitting)")
    for cell in spec.cells:  # unknown keys and bad values fail now, not an hour into the run
        try:
            spec.train_config(cell, spec.seeds[0])
        except UsageError as err:
            raise UsageError(f"{path}: cell {cell.name!r}: {err}") from None
    return spec

