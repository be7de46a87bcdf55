"""`iat eval --extend`: grow an evaluation to more examples without attacking again the ones it holds.

AutoAttack on a CPU costs minutes per hundred robust examples, so a table evaluated on the first 200 test
examples should not pay for them again to reach 500. Every attack decides each example on its own (only the
random starts depend on the batch), so the first K outcomes of a results file and fresh outcomes of
examples K..N-1 together are an evaluation of the first N examples under the same protocol. It is allowed
only when the file holds the same evaluation on fewer examples: the same attacks in the same order, threat
model, mode, checkpoint epoch, checkpoint file and seed. The second part draws its random starts from a
generator seeded by (seed, K), so its starts are not the first part's again; `EvalRecord.parts` says which
examples each part attacked, with which generator seed and in how many seconds. The sanity checks run
again on all N examples; AutoAttack's flags and per-component counts add up over both parts.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

import torch

from ..errors import UsageError
from ..records import EvalRecord, read_eval
from .accuracy import Accuracy, aggregate, unpack_flags
from .replace import attack_names, differences


def part_seed(seed: int, start: int) -> int:
    """Generator seed of the part that starts at example `start` (the first part keeps `seed` itself)."""
    return seed if start == 0 else seed * 1_000_003 + start


def extendable(out: Path, new: dict[str, Any], seed: int, checkpoint: str) -> Optional[EvalRecord]:
    """The record in `out` if this evaluation (described by `new`, as for replace.check_replace) extends it to
    more examples; None if `out` is absent or holds something else (then the usual replace rule decides)."""
    if not out.exists():
        return None
    try:
        old = read_eval(out)
    except (UsageError, OSError):
        return None
    n_old = old.data.get("n_examples")
    attacks = attack_names(old)
    if (differences(old, {**new, "n_examples": n_old}) or not isinstance(n_old, int)
            or not 0 < n_old < new["n_examples"] or attacks != new["attacks"] or old.seed != seed
            or Path(old.checkpoint).resolve() != Path(checkpoint).resolve()
            or old.eps_sweep is not None or set(old.per_example) != {*attacks, "worst_case"}):
        return None
    try:
        prior_accuracy(old)  # outcomes that do not unpack to n_old examples: not extended, replaced or refused
    except ValueError:
        return None
    return old


def prior_accuracy(prior: EvalRecord) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]], dict[str, int]]:
    """The record's per-example outcomes as one batch for `aggregate`: ([natural], [{attack: flags}], attacked)."""
    n = prior.data["n_examples"]
    flags = {k: unpack_flags(v, n) for k, v in prior.per_example.items() if k != "worst_case"}
    names = attack_names(prior)
    attacked = {r["attack"]: int(r.get("attacked", 0)) for r in prior.results if r["attack"] in names}
    return [flags["natural"]], [flags], attacked


def merge(prior: EvalRecord, new: Accuracy) -> Accuracy:
    """The first part's outcomes (from the record) followed by the new part's, counted as one evaluation."""
    natural, outcomes, attacked = prior_accuracy(prior)
    fresh = {k: v for k, v in new.per_example.items() if k != "worst_case"}
    if set(fresh) != set(outcomes[0]):
        raise UsageError(f"cannot extend: the results file has attacks {sorted(outcomes[0])}, this evaluation "
                         f"{sorted(fresh)}")
    total = {k: attacked.get(k, 0) + new.attacked.get(k, 0) for k in fresh}
    assert new.natural_ok is not None, "merge needs the per-example outcomes of robust_accuracy"
    return aggregate(natural + [new.natural_ok], outcomes + [fresh], attacked=total, mode=new.mode)


def restore_attack_state(attacks: Mapping[str, Any], prior: EvalRecord) -> None:
    """Give each attack that keeps diagnostics (AutoAttack) what it recorded in the first part, so that its
    flags, per-component counts and seeds cover both parts."""
    for name, attack in attacks.items():
        if name in prior.diagnostics and hasattr(attack, "restore"):
            attack.restore(prior.diagnostics[name])


def parts(prior: Optional[EvalRecord], start: int, n: int, seed: int, seconds: float) -> list[dict[str, Any]]:
    """`EvalRecord.parts`: the examples each part attacked, its generator seed and its seconds."""
    this = {"examples": [start, n], "generator_seed": part_seed(seed, start), "seconds": seconds}
    if prior is None:
        return []
    before = prior.parts or [{"examples": [0, start], "generator_seed": prior.seed, "seconds": prior.seconds}]
    return [*before, this]
