"""Robust accuracy, counted per example, in one of two modes.

- "each" (default): every attack runs on every naturally correct example, so each column is that
  attack's own accuracy, as papers report it, and `worst_case` is per example: correct only if the
  example survives every attack.
- "cumulative" (`worst_case_only=True`, AutoAttack's scheme): attacks run in the order given, each only
  on the examples that survived every attack before it, so column k is the accuracy under attacks 1..k
  and the last column is the worst case. The worst case is the same quantity as in "each" mode, found
  with less work; list cheap attacks first.

Either way an example counts as robust only if the model, re-run by us on the returned input, still
predicts its label, and every returned example is verified (inside the ball, inside [0, 1], finite)
before it counts: an attack that leaves its threat model is a bug, never a success. Accuracy is a count
over examples, never a mean over batches. Attacks are called as `attack(model, x, y, generator=g)`;
one that sets `reports_progress` also gets `progress=`, a callable taking a short text (AutoAttack
names the component it is running), shown next to the progress bar.

The progress bar counts (batch, attack) pairs, so it moves after every attack of every batch and its
ETA is for the whole evaluation.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from ..attacks import PGD, Natural
from ..errors import UsageError

MODES = ("each", "cumulative")


class AttackVerificationError(RuntimeError):
    """An attack returned an example outside its threat model: a bug, never a success."""


def verify_adversarial(name: str, attack: Any, x: torch.Tensor, x_adv: torch.Tensor) -> None:
    """Raise unless x_adv is finite, inside [0, 1] and inside the attack's eps-ball around x."""
    if not isinstance(x_adv, torch.Tensor) or x_adv.shape != x.shape:
        shape = tuple(x_adv.shape) if isinstance(x_adv, torch.Tensor) else type(x_adv).__name__
        raise AttackVerificationError(f"attack {name} changed the input shape {tuple(x.shape)} -> {shape}")
    bad = ~torch.isfinite(x_adv.flatten(1)).all(1)
    if bad.any():
        raise AttackVerificationError(f"attack {name} returned non-finite values for {int(bad.sum())} examples")
    bad = (x_adv.flatten(1) < 0).any(1) | (x_adv.flatten(1) > 1).any(1)
    if bad.any():
        raise AttackVerificationError(f"attack {name} left the [0, 1] image box for {int(bad.sum())} examples")
    eps = float(getattr(attack, "eps", 0.0))
    norm = getattr(attack, "norm", "linf")
    delta = (x_adv - x).flatten(1).double()
    size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
    tol = 1e-5 * max(1.0, eps)
    bad = size > eps + tol
    if bad.any():
        raise AttackVerificationError(
            f"attack {name} left its {norm} ball for {int(bad.sum())} of {len(x)} examples: "
            f"max perturbation {size.max().item():.6f} > eps {eps:.6f}"
        )


@dataclasses.dataclass
class Accuracy:
    """Counts over examples. `per_example` holds one bool tensor [total] per attack and 'worst_case'."""

    correct: dict[str, int]
    worst_case: int
    total: int
    natural: int = 0
    attacked: dict[str, int] = dataclasses.field(default_factory=dict)  # examples each attack ran on
    mode: str = "each"
    per_example: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict, repr=False)
    natural_ok: Optional[torch.Tensor] = dataclasses.field(default=None, repr=False)  # bool [total]

    def rates(self) -> dict[str, float]:
        """The counts as fractions of `total` (every evaluated example, not only those an attack ran on).

        Returns:
            {attack name: accuracy in [0, 1]} in the order of `correct` (in "cumulative" mode each is the
            accuracy under that attack and those before it), then "worst_case": the per-example worst case.
        """
        out = {k: v / self.total for k, v in self.correct.items()}
        out["worst_case"] = self.worst_case / self.total
        return out


def aggregate(natural: Sequence[torch.Tensor], outcomes: Sequence[Mapping[str, torch.Tensor]], *,
              attacked: Optional[Mapping[str, int]] = None, mode: str = "each") -> Accuracy:
    """Per-batch outcomes (bool per example) -> counts over all examples and the per-example worst case.

    An example is robust in the worst case if it is naturally correct and survives every attack.
    """
    if len(natural) != len(outcomes) or not natural:
        raise ValueError("need one natural-correctness tensor per batch of outcomes, and at least one batch")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    nat = torch.cat([t.bool().cpu() for t in natural])
    names = list(outcomes[0])
    flags = {n: torch.cat([o[n].bool().cpu() for o in outcomes]) for n in names}
    worst = nat.clone()
    for f in flags.values():
        if f.shape != nat.shape:
            raise ValueError("every attack needs one outcome per example")
        worst &= f
    return Accuracy({n: int(f.sum()) for n, f in flags.items()}, int(worst.sum()), len(nat), int(nat.sum()),
                    dict(attacked or {}), mode, {**flags, "worst_case": worst}, nat)


def robust_accuracy(
    model: nn.Module,
    x_all: torch.Tensor,
    y_all: torch.Tensor,
    attacks: Mapping[str, Any],
    *,
    batch_size: int = 256,
    progress: bool = False,
    desc: str = "eval",
    worst_case_only: bool = False,
    generator: Optional[torch.Generator] = None,
) -> Accuracy:
    """Count correct examples under each attack and in the per-example worst case (see the module doc).

    x_all is uint8 or float in [0, 1] (any device); batches move to the model's device. The model runs in
    eval mode and its mode is restored after. `generator` seeds the attacks' random starts.
    """
    if len(x_all) == 0:
        raise UsageError("nothing to evaluate: the split is empty")
    if not attacks:
        raise UsageError("no attacks to evaluate; e.g. natural,pgd20")
    if batch_size < 1:
        raise UsageError(f"batch size must be at least 1, got {batch_size}")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    natural, outcomes, attacked = [], [], {name: 0 for name in attacks}
    starts = range(0, len(x_all), batch_size)
    bar = tqdm(total=len(starts) * len(attacks), desc=desc, disable=not progress, leave=False, unit="attack")
    try:
        for b, start in enumerate(starts):
            x = _as_float(x_all[start : start + batch_size].to(device))
            y = y_all[start : start + batch_size].to(device)
            step = _Step(bar, f"batch {b + 1}/{len(starts)}")
            nat, out = _batch(model, x, y, attacks, attacked, worst_case_only, generator, step)
            natural.append(nat)
            outcomes.append(out)
    finally:
        bar.close()
        model.train(was_training)
    return aggregate(natural, outcomes, attacked=attacked, mode=MODES[int(worst_case_only)])


class _Step:
    """The progress bar's view of one batch: names the attack (and what it says of itself), then advances."""

    def __init__(self, bar: Any, batch: str) -> None:
        self.bar, self.batch, self.name = bar, batch, ""

    def start(self, name: str) -> None:
        self.name = name
        self.bar.set_postfix_str(f"{self.batch} {name}")

    def note(self, text: str) -> None:
        self.bar.set_postfix_str(f"{self.batch} {self.name}: {text}")

    def done(self) -> None:
        self.bar.update(1)


def _batch(model: nn.Module, x: torch.Tensor, y: torch.Tensor, attacks: Mapping[str, Any],
           attacked: dict[str, int], cumulative: bool, generator: Optional[torch.Generator],
           step: _Step) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    with torch.no_grad():
        natural_ok = model(x).argmax(1) == y
    alive = natural_ok.clone()
    out = {}
    for name, attack in attacks.items():
        step.start(name)
        ok = (natural_ok if not cumulative or isinstance(attack, Natural) else alive).clone()
        idx = ok.nonzero().squeeze(1)
        if len(idx) and not isinstance(attack, Natural):
            extra = {"progress": step.note} if getattr(attack, "reports_progress", False) else {}
            x_adv = attack(model, x[idx], y[idx], generator=generator, **extra)
            verify_adversarial(name, attack, x[idx], x_adv)
            with torch.no_grad():
                ok[idx] = model(x_adv).argmax(1) == y[idx]
            attacked[name] += len(idx)
        out[name] = ok.cpu()
        alive &= ok
        step.done()
    return natural_ok.cpu(), out


def _as_float(x: torch.Tensor) -> torch.Tensor:
    return x.float().div_(255) if x.dtype == torch.uint8 else x.float()


def protocol(attack: Any) -> dict[str, Any]:
    """What to write next to a number: the attack's parameters."""
    return attack.describe() if hasattr(attack, "describe") else {}


def pack_flags(flags: torch.Tensor) -> str:
    """Per-example bools -> a hex string (1 bit per example), so results files can carry them."""
    return np.packbits(flags.bool().cpu().numpy()).tobytes().hex()


def unpack_flags(text: str, n: int) -> torch.Tensor:
    """`pack_flags`' hex string -> a bool tensor [n]; a string that holds fewer than n examples is a ValueError."""
    bits = np.unpackbits(np.frombuffer(bytes.fromhex(text), dtype=np.uint8))[:n]
    if len(bits) != n:
        raise ValueError(f"packed flags hold {len(bits)} examples, expected {n}")
    return torch.from_numpy(bits.astype(bool))


__all__ = ["Accuracy", "AttackVerificationError", "MODES", "aggregate", "robust_accuracy", "verify_adversarial",
           "protocol", "pack_flags", "unpack_flags", "PGD"]
