"""Table specs of `iat reproduce`: cells (method x settings), seeds, one shared training config, the
evaluations and the claims to check, read from TOML and validated before anything runs."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any, Optional, Union

from .. import config as C
from ..data.standards import resolve_threat
from ..errors import UsageError
from ..values import parse_bool, parse_int

SPEC_DIR = Path(__file__).parents[1] / "experiments"
KINDS = ("best", "last")


@dataclasses.dataclass
class Cell:
    """One cell of a table: a name and its config settings over the table's config."""

    name: str
    settings: dict[str, Any]  # dotted config keys -> values, applied over the table's config


@dataclasses.dataclass
class Compare:
    """A claim checked by the table: cell `ours` against cell `base`, paired by seed."""

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
        """The group's attacks, in order."""
        return [a for a in self.attacks.split(",") if a]


@dataclasses.dataclass
class Sweep:
    """A plot of test accuracy against one numeric setting across cells (e.g. iat's eps_inv), mean over seeds with
    each seed as a dot; an optional reference cell (e.g. pgd-at) drawn as a horizontal line with its seed range."""
    option: str  # dotted config key that differs between the cells, e.g. "method_options.eps_inv"
    cells: list[str]
    columns: list[str] = dataclasses.field(default_factory=lambda: ["natural", "worst case"])
    reference: Optional[str] = None

    @property
    def name(self) -> str:
        """The option's last part (eps_inv for method_options.eps_inv), used in file names."""
        return self.option.rsplit(".", 1)[-1]


@dataclasses.dataclass
class TableSpec:
    """A validated table spec: the cells x seeds to train, their evaluations, claims and sweeps."""

    name: str
    title: str
    seeds: list[int]
    config: dict[str, Any]
    cells: list[Cell]
    evals: list[EvalGroup] = dataclasses.field(default_factory=lambda: [EvalGroup("natural,pgd20,cw")])
    checkpoints: tuple[str, ...] = KINDS
    compare: list[Compare] = dataclasses.field(default_factory=list)
    sweeps: list[Sweep] = dataclasses.field(default_factory=list)
    notes: str = ""
    source: str = ""

    def cell(self, name: str) -> Cell:
        """The cell named `name`."""
        return next(c for c in self.cells if c.name == name)

    def train_config(self, cell: Cell, seed: int) -> C.TrainConfig:
        """The resolved training config of `cell` with `seed` (the data set's standard threat model unless set)."""
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
    """The built-in table specs (iat/experiments/*.toml) by name."""
    return {p.stem: p for p in sorted(SPEC_DIR.glob("*.toml"))}


def spec_path(name: str, relative_to: Optional[Path] = None) -> Path:
    """A spec file by path (relative to `relative_to`'s folder if given and the file is there), else a
    built-in table by name."""
    for path in ([relative_to.parent / name] if relative_to is not None else []) + [Path(name)]:
        if path.is_file():
            return path
    tables = builtin_tables()
    if name not in tables:
        raise UsageError(f"no table {name!r}: give a spec file or one of {', '.join(tables)} (iat reproduce --list)")
    return tables[name]


KNOWN_KEYS = {"title", "seeds", "config", "cells", "evals", "checkpoints", "compare", "sweeps", "notes"}
EXTENDING_KEYS = {"extends", "drop_cells"}


def read_raw_spec(path: Path, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A spec file's tables with its `extends` chain merged in (see `extend_spec`); keys checked per file."""
    raw = C.read_config_file(path)
    unknown = set(raw) - KNOWN_KEYS - EXTENDING_KEYS
    if unknown:
        raise UsageError(f"{path}: unknown keys {sorted(unknown)}; a table spec has "
                         f"{sorted(KNOWN_KEYS | EXTENDING_KEYS)}")
    if "extends" not in raw:
        if "drop_cells" in raw:
            raise UsageError(f"{path}: drop_cells needs extends = \"<base table>\" (cells of which spec?)")
        return raw
    base_name = raw.pop("extends")
    if not isinstance(base_name, str) or not base_name:
        raise UsageError(f"{path}: extends must name a table or spec file, got {base_name!r}")
    base_path = spec_path(base_name, relative_to=path)
    here = path.resolve()
    if base_path.resolve() in chain + (here,):
        names = " -> ".join(p.name for p in chain + (here, base_path.resolve()))
        raise UsageError(f"{path}: extends makes a loop ({names}); a spec cannot extend itself")
    try:
        return extend_spec(read_raw_spec(base_path, chain + (here,)), raw)
    except UsageError as err:
        raise UsageError(f"{path}: {err}") from None


def _merge_tables(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Nested tables merged key by key; any other value of `over` replaces the base's."""
    out = dict(base)
    for key, value in over.items():
        out[key] = (_merge_tables(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict)
                    else value)
    return out


def _by_name(base: list[Any], over: list[Any], key: str, what: str) -> list[Any]:
    """Arrays of tables merged by a key: an entry of `over` replaces the base's entry with the same key
    (in its place), others are appended in order."""
    for item in (*base, *over):
        if not isinstance(item, dict):
            raise UsageError(f"{what} must be a list of tables ([[{what}]]), got {item!r}")
    out = [dict(item) for item in base]
    for item in over:
        at = next((i for i, old in enumerate(out) if old.get(key, "") == item.get(key, "")), None)
        if at is None:
            out.append(dict(item))
        else:
            out[at] = dict(item)
    return out


def extend_spec(base: dict[str, Any], child: dict[str, Any]) -> dict[str, Any]:
    """The spec that `child` (a spec with `extends = base`) describes.

    title, seeds, checkpoints, notes: the child's if given. [config]: tables merged key by key (the child's
    values win). drop_cells: base cells left out, with the compares that name them and their place in the
    sweeps (a sweep left with no cell goes too). [[cells]] and [[evals]]: merged by name (a child entry
    replaces the base's of that name, new names are appended). [[compare]]: the child's are appended (an
    identical one is kept once). [[sweeps]]: merged by option.
    """
    drop = child.pop("drop_cells", [])
    if not isinstance(drop, list) or not all(isinstance(d, str) for d in drop):
        raise UsageError(f"drop_cells must be a list of cell names, got {drop!r}")
    names = [c.get("name") for c in _by_name(base.get("cells", []), [], "name", "cells")]
    unknown = sorted(set(drop) - set(names))
    if unknown:
        raise UsageError(f"drop_cells names {unknown}, which the base spec does not have (its cells: {names})")
    out = {k: v for k, v in base.items()}
    for key in ("title", "seeds", "checkpoints", "notes"):
        if key in child:
            out[key] = child[key]
    if "config" in child:
        if not isinstance(child["config"], dict):
            raise UsageError(f"config must be a table, got {child['config']!r}")
        out["config"] = _merge_tables(base.get("config", {}), child["config"])
    cells = [c for c in _by_name(base.get("cells", []), [], "name", "cells") if c.get("name") not in drop]
    out["cells"] = _by_name(cells, child.get("cells", []), "name", "cells")
    out["evals"] = _by_name(base.get("evals", []), child.get("evals", []), "name", "evals")
    compare = [c for c in _by_name(base.get("compare", []), [], "claim", "compare")
               if not {c.get("base"), c.get("ours")} & set(drop)]
    for item in _typed(child, "compare", list, []):
        if not isinstance(item, dict):
            raise UsageError(f"compare must be a list of tables ([[compare]]), got {item!r}")
        if item not in compare:
            compare.append(dict(item))
    out["compare"] = compare
    sweeps = []
    for sweep in _by_name(base.get("sweeps", []), [], "option", "sweeps"):
        kept = dict(sweep, cells=[c for c in sweep.get("cells", []) if c not in drop])
        if kept.get("reference") in drop:
            kept.pop("reference")
        if kept["cells"]:  # a sweep whose every cell was dropped is dropped too
            sweeps.append(kept)
    out["sweeps"] = _by_name(sweeps, child.get("sweeps", []), "option", "sweeps")
    return {k: v for k, v in out.items() if v != [] or k in base or k in child}


def load_spec(name: str) -> TableSpec:
    """A built-in table by name, or a TOML spec file by path; every field, cell config and eval attack is
    checked here, so a bad value fails at once, not an hour into the run. A spec may `extends` another
    (`extend_spec`)."""
    path = spec_path(name)
    raw = read_raw_spec(path)
    try:
        spec = _parse(raw, path)
    except UsageError as err:
        raise UsageError(f"{path}: {err}") from None
    except (KeyError, TypeError, ValueError) as err:
        raise UsageError(f"{path}: malformed table spec ({type(err).__name__}: {err})") from None
    _check(spec)
    return spec


Kind = Union[type, tuple[type, ...]]  # what isinstance takes


def _typed(raw: dict, key: str, kind: Kind, default: Any) -> Any:
    value = raw.get(key, default)
    if not isinstance(value, kind):
        raise UsageError(f"{key} must be a {_KIND_NAMES.get(kind, 'list or string')}, got {value!r}")
    return value


_KIND_NAMES: dict[Kind, str] = {list: "list", dict: "table", str: "string"}


def _tables(raw: dict, key: str, default: Any) -> list[dict]:
    items = _typed(raw, key, list, default)
    if not all(isinstance(item, dict) for item in items):
        raise UsageError(f"{key} must be a list of tables ([[{key}]]), got {items!r}")
    return [dict(item) for item in items]


def _parse(raw: dict, path: Path) -> TableSpec:
    if "cells" not in raw or "config" not in raw:
        raise UsageError("a table spec needs [config] and at least one [[cells]]")
    seeds = [parse_int(s, "seeds") for s in _typed(raw, "seeds", list, [0])]
    if not seeds or len(set(seeds)) != len(seeds):
        raise UsageError(f"seeds must be a non-empty list of distinct integers, got {seeds}")
    cells = []
    for c in _tables(raw, "cells", None):
        if not isinstance(c.get("name"), str) or not NAME_RE.fullmatch(c["name"]):
            raise UsageError(f"every cell needs a name of letters, digits, '.', '_' or '-', got {c.get('name')!r}")
        cells.append(Cell(c.pop("name"), c))
    evals = [_eval_group(e) for e in _tables(raw, "evals", [{"attacks": "natural,pgd20,cw"}])]
    checkpoints = _typed(raw, "checkpoints", (list, str), list(KINDS))
    return TableSpec(
        name=path.stem, title=_typed(raw, "title", str, path.stem), seeds=seeds,
        config=_typed(raw, "config", dict, None), cells=cells, evals=evals,
        checkpoints=tuple([checkpoints] if isinstance(checkpoints, str) else checkpoints),
        compare=[Compare(**c) for c in _tables(raw, "compare", [])],
        sweeps=[Sweep(**s) for s in _tables(raw, "sweeps", [])], notes=_typed(raw, "notes", str, ""),
        source=str(path))


NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def _eval_group(raw: dict) -> EvalGroup:
    group = EvalGroup(**raw)
    if not isinstance(group.attacks, str) or not group.columns():
        raise UsageError(f"evals: attacks must be a string like \"natural,pgd20\", got {group.attacks!r}")
    if group.n_examples is not None:
        group.n_examples = parse_int(group.n_examples, "evals: n_examples")
        if group.n_examples < 1:
            raise UsageError(f"evals: n_examples must be at least 1, got {group.n_examples}")
    if not isinstance(group.name, str) or not (group.name == "" or NAME_RE.fullmatch(group.name)):
        raise UsageError(f"evals: name must be letters, digits, '.', '_' or '-', got {group.name!r}")
    group.late = parse_bool(group.late, "evals: late")
    return group


def _check(spec: TableSpec) -> None:
    """What one field alone cannot say: distinct names, known cells and attacks, every cell's config valid."""
    path = spec.source
    names = [c.name for c in spec.cells]
    if len(set(names)) != len(names) or not names:
        raise UsageError(f"{path}: cells need distinct names, got {names}")
    groups = [g.name for g in spec.evals]
    if len(set(groups)) != len(groups) or not groups or spec.evals[0].late:
        raise UsageError(f"{path}: evals need distinct names and a first group that is not late, got {groups}")
    if not set(spec.checkpoints) <= set(KINDS) or not spec.checkpoints:
        raise UsageError(f"{path}: checkpoints must be among {KINDS}, got {list(spec.checkpoints)}")
    for cmp in spec.compare:
        if {cmp.base, cmp.ours} - set(names) or cmp.kind not in ("robust", "overfitting"):
            raise UsageError(f"{path}: compare {cmp} names an unknown cell or kind (robust|overfitting)")
    for sweep in spec.sweeps:
        check_sweep(spec, sweep, path)
    for cell in spec.cells:  # unknown keys and bad values fail now, not an hour into the run
        try:
            cfg = spec.train_config(cell, spec.seeds[0])
            for group in spec.evals:
                check_attacks(group.attacks, cfg)
        except UsageError as err:
            raise UsageError(f"{path}: cell {cell.name!r}: {err}") from None


def check_attacks(attacks: str, cfg: C.TrainConfig) -> None:
    """The attacks of an eval group, built in the cell's threat model (AutoAttack by name only: its package
    is an optional extra that `iat reproduce --list` must not need)."""
    from ..evaluation.attack_spec import build_attacks, parse_attack_spec

    specs = [a for a in attacks.split(",") if a.strip()]
    build_attacks(",".join(a for a in specs if parse_attack_spec(a)[0] != "autoattack") or "natural", cfg.threat)
    if len(set(specs)) != len(specs):
        raise UsageError(f"attacks names an attack twice: {attacks}")


def option_value(spec: TableSpec, cell: Cell, option: str) -> float:
    """The value of a dotted config key in a cell's resolved config, as a number."""
    value: Any = C.to_dict(spec.train_config(cell, spec.seeds[0]))
    for part in option.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UsageError(f"sweep option {option!r} is not a number in cell {cell.name!r} (got {value!r}); "
                         "set it in every swept cell")
    return float(value)


def check_sweep(spec: TableSpec, sweep: Sweep, path: str) -> None:
    """A sweep names known cells and columns, and its option is a number in every swept cell; `path` (the
    spec's source) leads the error."""
    names = {c.name for c in spec.cells}
    unknown = set(sweep.cells) - names | ({sweep.reference} - names if sweep.reference else set())
    columns = {c for g in spec.evals for c in g.columns()} | {"worst case"}
    if unknown or not sweep.cells or set(sweep.columns) - columns:
        raise UsageError(f"{path}: sweep over {sweep.option} names unknown cells {sorted(unknown)} or columns "
                         f"{sorted(set(sweep.columns) - columns)}; columns come from {sorted(columns)}")
    for cell in sweep.cells:
        try:
            option_value(spec, spec.cell(cell), sweep.option)
        except UsageError as err:
            raise UsageError(f"{path}: {err}") from None
