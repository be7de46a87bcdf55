"""Sanity checks on a robustness evaluation, after Carlini et al. 2019 ("On Evaluating Adversarial
Robustness") and AutoAttack's flags (Croce & Hein 2020).

Each check returns a `Check` with status "pass", "warn" (with what the failure suggests: usually
gradient masking, which makes robust accuracy look higher than it is) or "skip" (not enough to check).
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..attacks import PGD, crafting_mode
from .accuracy import Accuracy, _as_float

MASKING = "gradient masking (the attack, not the model, is failing)"


@dataclasses.dataclass
class Check:
    """One sanity check's verdict: its name, "pass" / "warn" / "skip", what it found, and the numbers behind it."""

    name: str
    status: str  # "pass" | "warn" | "skip"
    message: str
    details: dict = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict:
        """The check as a plain dict (what results files hold in `sanity`)."""
        return dataclasses.asdict(self)


def _slack(n: int) -> int:
    """How many examples an accuracy may rise by before a check warns: random starts differ."""
    return max(1, math.ceil(0.005 * n))


def check_robust_vs_natural(acc: Accuracy) -> Check:
    """No attack may score above natural accuracy, and the worst case may not score above any attack."""
    above = {k: v for k, v in acc.correct.items() if v > acc.natural}
    worst_above = {k: v for k, v in acc.correct.items() if acc.worst_case > v}
    details = {"natural": acc.natural, "correct": dict(acc.correct), "worst_case": acc.worst_case}
    if above or worst_above:
        return Check("robust_le_natural", "warn", f"accuracy under {sorted(above) or sorted(worst_above)} is above "
                     "natural accuracy or below the worst case: the evaluation is broken (a bug, not robustness)",
                     details)
    return Check("robust_le_natural", "pass", "every robust accuracy is at most the natural accuracy, "
                 "and the worst case at most every attack", details)


def check_class_coverage(y: torch.Tensor, y_split: torch.Tensor, what: str = "evaluated",
                         num_classes: Optional[int] = None) -> Check:
    """The first examples of a split must not miss classes the split holds: a split ordered by class gives a
    one-class subset, whose accuracy describes that class only. Warns only where a random subset of the
    same size would almost surely (p > 0.99) cover every class. With `num_classes` (the model's), a split
    that itself lacks some of the model's classes is a warning too."""
    name = "class_coverage"
    classes, counts = torch.unique(y_split, return_counts=True)
    absent = sorted(set(range(num_classes)) - set(classes.tolist())) if num_classes else []
    if absent:
        return Check(name, "warn", f"the {what} split holds only {len(classes)} of the model's {num_classes} "
                     f"classes (none of {absent[:5]}{' ...' if len(absent) > 5 else ''}): its accuracy says nothing "
                     "about those classes", {"n": len(y), "classes": len(classes), "absent_from_split": absent})
    seen = set(torch.unique(y).tolist())
    missing = [int(c) for c in classes.tolist() if c not in seen]
    details = {"n": len(y), "classes": len(classes), "missing": missing}
    if not missing:
        return Check(name, "pass", f"the {len(y)} {what} examples cover all {len(classes)} classes", details)
    # chance that a random subset of len(y) misses a class with share p: about (1 - p)^n; union bound
    shares = counts.double() / len(y_split)
    p_miss = float(((1 - shares) ** len(y)).sum())
    if p_miss > 0.01:
        return Check(name, "skip", f"the {len(y)} {what} examples miss {len(missing)} of {len(classes)} classes, "
                     "which a random subset of that size may also do", details)
    return Check(name, "warn", f"the {len(y)} {what} examples hold only {len(classes) - len(missing)} of the "
                 f"{len(classes)} classes of the split: the data are probably ordered by class, so their accuracy "
                 "describes a few classes; shuffle the data source or use more examples", details)


def _comparable(a: PGD) -> tuple:
    return (a.eps, a.norm, str(a.loss), a.step_size, a.descent, a.random_start, a.init_scale, a.project, a.bn_mode)


def check_more_effort(attacks: Mapping[str, Any], acc: Accuracy) -> Check:
    """More steps or restarts of the same PGD attack must not raise accuracy (beyond random-start noise)."""
    name = "more_effort_not_better"
    if acc.mode == "cumulative":
        return Check(name, "skip", "columns are cumulative (--worst-case-only), so attacks cannot be compared")
    pgd = {k: a for k, a in attacks.items() if isinstance(a, PGD) and not a.descent}
    pairs, bad, noise = [], [], []
    for weak, a in pgd.items():
        for strong, b in pgd.items():
            more = (b.steps, b.restarts) != (a.steps, a.restarts) and b.steps >= a.steps and b.restarts >= a.restarts
            if weak != strong and more and _comparable(a) == _comparable(b):
                pairs.append([weak, strong])
                rise = acc.correct[strong] - acc.correct[weak]
                text = f"{strong} {acc.correct[strong]}/{acc.total} > {weak} {acc.correct[weak]}/{acc.total}"
                if rise > _slack(acc.total):
                    bad.append(text)
                elif rise > 0:
                    noise.append(text)
    if not pairs:
        return Check(name, "skip", "no two requested attacks differ only in steps or restarts; request e.g. "
                     "pgd20 and pgd100, or pgd20 and pgd20:restarts=5")
    if bad:
        return Check(name, "warn", f"more steps or restarts RAISED accuracy ({'; '.join(bad)}): the loss surface "
                     f"misleads the attack, which suggests {MASKING}; trust only the worst case, and add "
                     "gradient-free or margin-based attacks (autoattack, cw)", {"pairs": pairs})
    within = (f"; rises within random-start noise (at most {_slack(acc.total)} examples): {'; '.join(noise)}"
              if noise else "")
    return Check(name, "pass", f"more steps or restarts did not raise accuracy beyond random-start noise "
                 f"({len(pairs)} pair{'s' * (len(pairs) != 1)} compared{within})", {"pairs": pairs, "noise": noise})


def check_zero_gradients(model: nn.Module, x_all: torch.Tensor, y_all: torch.Tensor,
                         natural_ok: torch.Tensor, batch_size: int = 256) -> Check:
    """Fraction of the attacked (naturally correct) examples whose input gradient of CE is exactly zero."""
    device = next(model.parameters()).device
    idx = natural_ok.nonzero().squeeze(1)
    zero = 0
    was_training = model.training
    model.eval()
    try:
        with crafting_mode(model, "keep"):
            for start in range(0, len(idx), batch_size):
                sel = idx[start : start + batch_size]
                x = _as_float(x_all[sel].to(device)).requires_grad_(True)
                loss = F.cross_entropy(model(x).float(), y_all[sel].to(device), reduction="sum")
                (grad,) = torch.autograd.grad(loss, x)
                zero += int((grad.flatten(1).abs().amax(1) == 0).sum())
    finally:
        model.train(was_training)
    details = {"zero_gradient": zero, "examples": len(idx), "fraction": zero / max(1, len(idx))}
    if zero:
        return Check("zero_gradients", "warn", f"{zero} of {len(idx)} attacked examples ({zero / len(idx):.1%}) have "
                     "an exactly zero input gradient of the cross-entropy loss: gradient attacks cannot move them "
                     f"(saturated softmax, non-differentiable or quantising layers), which suggests {MASKING}; "
                     "check that cw and autoattack (margin losses, gradient-free Square) agree", details)
    return Check("zero_gradients", "pass", f"no attacked example has a zero input gradient ({len(idx)} checked)",
                 details)


def check_randomised(model: nn.Module, x: torch.Tensor, threshold: float = 1e-4) -> Check:
    """Two forward passes in eval mode on the same inputs must agree (AutoAttack's threshold on the
    difference of L2-normalised logits)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            x = _as_float(x.to(device))
            a, b = model(x).float(), model(x).float()
    finally:
        model.train(was_training)
    diff = (F.normalize(a, dim=1) - F.normalize(b, dim=1)).norm(dim=1).max().item()
    flips = int((a.argmax(1) != b.argmax(1)).sum())
    details = {"max_normalised_logit_difference": diff, "prediction_flips": flips, "examples": len(x)}
    if diff > threshold or flips:
        return Check("randomised_outputs", "warn", f"two forward passes in eval mode disagree (difference {diff:.2e}, "
                     f"{flips} flipped predictions): a randomised model makes single-sample attacks look weak, "
                     "which suggests gradient masking by randomness; evaluate with expectation over "
                     "transformation (AutoAttack version 'rand')", details)
    return Check("randomised_outputs", "pass", f"outputs are deterministic in eval mode ({len(x)} examples)", details)


def check_autoattack_flags(attacks: Mapping[str, Any]) -> Optional[Check]:
    """AutoAttack's own warnings, as the adapter collected them (None when no AutoAttack ran)."""
    diags = {k: a.diagnostics() for k, a in attacks.items() if hasattr(a, "diagnostics")}
    if not diags:
        return None
    flags = sorted({f for d in diags.values() for f in d["flags"]})
    details = {k: {"flags": d["flags"], "broken_by": d["broken_by"]} for k, d in diags.items()}
    if flags:
        return Check("autoattack_flags", "warn", "AutoAttack flagged: " + " | ".join(flags), details)
    return Check("autoattack_flags", "pass", "AutoAttack raised no flag", details)


def run_checks(model: nn.Module, x: torch.Tensor, y: torch.Tensor, attacks: Mapping[str, Any], acc: Accuracy,
               *, batch_size: int = 256) -> list[Check]:
    """The checks that need no extra attack runs (the eps sweep is separate, see eps_sweep)."""
    assert acc.natural_ok is not None, "run_checks needs the per-example outcomes of robust_accuracy"
    checks = [check_robust_vs_natural(acc), check_more_effort(attacks, acc),
              check_zero_gradients(model, x, y, acc.natural_ok, batch_size),
              check_randomised(model, x[:batch_size])]
    aa = check_autoattack_flags(attacks)
    return checks + ([aa] if aa else [])

