"""Whether `iat eval` may write its results over an existing file, decided before any attack runs.

A results file is replaced without a word only by the same evaluation again: the same attacks, number of
examples, threat model, mode and checkpoint epoch. Anything else would silently destroy a
result (a 10,000-example evaluation replaced by a 200-example one), so it is refused with the command to
run: `--out FILE` to keep both, or `--overwrite` to replace it.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ..errors import UsageError
from ..records import EvalRecord, read_eval


def attack_names(record: EvalRecord) -> list[str]:
    """The record's attacks in their order, natural first, without the worst-case row."""
    return [r["attack"] for r in record.results if r["attack"] != "worst case"]


def _threat(threat: dict[str, Any]) -> str:
    return f"{threat['norm']} eps {threat['eps']:.6g}"


def differences(old: EvalRecord, new: dict[str, Any]) -> list[str]:
    """What `old` holds that the evaluation described by `new` would not ("what it holds (this one: ...)")."""
    out = []
    if set(attack_names(old)) != set(new["attacks"]):
        out.append(f"attacks {','.join(attack_names(old))} (this one: {','.join(new['attacks'])})")
    if old.data.get("n_examples") != new["n_examples"]:
        out.append(f"{old.data.get('n_examples')} examples (this one: {new['n_examples']})")
    t, u = old.threat, new["threat"]
    if t.get("norm") != u["norm"] or not math.isclose(float(t.get("eps", -1)), u["eps"], rel_tol=1e-9):
        out.append(f"threat model {_threat(t)} (this one: {_threat(u)})")
    if old.mode != new["mode"]:
        out.append(f"mode {old.mode} (this one: {new['mode']})")
    if old.checkpoint_epoch != new["checkpoint_epoch"]:
        out.append(f"checkpoint epoch {old.checkpoint_epoch} (this one: {new['checkpoint_epoch']})")
    return out


def check_replace(out: Path, new: dict[str, Any], overwrite: bool) -> None:
    """Raise a one-line UsageError unless `out` is absent, `overwrite` is set, or `out` holds this very
    evaluation. `new` has attacks, n_examples, threat ({eps, norm}), mode and checkpoint_epoch."""
    if overwrite or not out.exists():
        return
    todo = "give --out FILE to keep both, or --overwrite to replace it"
    try:
        old = read_eval(out)
    except (UsageError, OSError) as err:
        raise UsageError(f"{out} exists and is not an evaluation iat can read ({err}); {todo}") from None
    found = differences(old, new)
    if found:
        raise UsageError(f"{out} already holds another evaluation: {'; '.join(found)}; {todo}")
