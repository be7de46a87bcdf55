"""Catastrophic-overfitting (CO) monitor, run by the trainer at the end of every epoch.

Catastrophic overfitting of single-step training (Wong et al. 2020; Andriushchenko & Flammarion
2020): within an epoch or two, PGD accuracy collapses to about 0 while FGSM accuracy stays high or
soars, because the model has become locally non-linear and FGSM no longer finds its adversarial
examples. The monitor measures FGSM accuracy (zero start, step eps: the training adversary's
weakest form) on the same held-out validation examples the trainer already attacks with PGD, and
flags an epoch when (`co_rule`)

  (a) PGD accuracy < ratio (0.3) x FGSM accuracy: healthy training keeps PGD within a few points of
      FGSM (ratio about 0.8-0.95 for PGD-AT on CIFAR-10 and MNIST), or
  (b) PGD accuracy fell more than `drop` (0.20) below its best earlier epoch while FGSM accuracy is
      still at least that best PGD accuracy (a gap opening, not the whole model degrading),

each only once FGSM accuracy is at least `min_fgsm` (0.2), so an untrained model is never flagged; or

  (c) PGD accuracy fell below `collapse` (0.25) x its best earlier value (which was at least
      `min_best` = 0.05) while FGSM accuracy kept at least half of its own best earlier value: the
      same collapse in relative terms, for hard settings where every accuracy is low (eps 16/255 on
      CIFAR-10 with a small CNN: PGD 12% -> 1% while FGSM stays at 11-13%, which (a) and (b) miss).

It runs for every method: FGSM costs about a tenth of the PGD-10 validation, and a flag from a
multi-step method (possible at large eps) is worth seeing too. The records get `val_fgsm`,
`co_detected` and `co_reason`; a flagged epoch also prints one warning line.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn
from tqdm import tqdm

from ..attacks import create_attack
from ..evaluation.accuracy import robust_accuracy
from ..records import MetricLine
from ..threat import ThreatModel
from .progress import Progress

RATIO = 0.3
DROP = 0.20
MIN_FGSM = 0.2
COLLAPSE = 0.25
MIN_BEST = 0.05


def co_rule(fgsm: float, pgd: float, best_pgd: float, best_fgsm: float = -1.0, *, ratio: float = RATIO,
            drop: float = DROP, min_fgsm: float = MIN_FGSM, collapse: float = COLLAPSE,
            min_best: float = MIN_BEST) -> Optional[str]:
    """Why this epoch looks like catastrophic overfitting, or None.

    fgsm, pgd: this epoch's validation accuracies in [0, 1]. best_pgd, best_fgsm: the best accuracies of
    the EARLIER epochs (negative when there are none).
    """
    if fgsm >= min_fgsm and pgd < ratio * fgsm:
        return f"PGD accuracy {pgd:.1%} is below {ratio:g} x FGSM accuracy {fgsm:.1%}"
    if fgsm >= min_fgsm and best_pgd >= 0 and best_pgd - pgd > drop and fgsm >= best_pgd:
        return (f"PGD accuracy fell from its best {best_pgd:.1%} to {pgd:.1%} while FGSM accuracy "
                f"stays at {fgsm:.1%}")
    if best_pgd >= min_best and pgd < collapse * best_pgd and best_fgsm >= 0 and fgsm >= 0.5 * best_fgsm:
        return (f"PGD accuracy collapsed from its best {best_pgd:.1%} to {pgd:.1%} while FGSM accuracy "
                f"is {fgsm:.1%} (best {best_fgsm:.1%})")
    return None


def co_epochs(records: list[MetricLine]) -> list[tuple[int, str]]:
    """The rule applied afresh to a run's metrics.jsonl lines (val_fgsm and val_robust per epoch), so a
    table judges every run by the same, current rule whatever the monitor printed when it trained."""
    flagged, best_pgd, best_fgsm = [], -1.0, -1.0
    for r in records:
        if r.val_fgsm is None or r.val_robust is None:
            continue
        reason = co_rule(r.val_fgsm, r.val_robust, best_pgd, best_fgsm)
        if reason:
            flagged.append((r.epoch, reason))
        best_pgd, best_fgsm = max(best_pgd, r.val_robust), max(best_fgsm, r.val_fgsm)
    return flagged


def check_overfitting(model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel, p: Progress,
                      pgd: float, batch_size: int) -> dict[str, Any]:
    """FGSM accuracy on the validation examples (x, y) and the CO verdict for this epoch, whose validation
    PGD accuracy is `pgd`.

    Called from Trainer.end_epoch before the best-checkpoint bookkeeping, so p.best_robust is still the best
    of the earlier epochs (it is saved in checkpoints, so the rule survives resume).
    FGSM has no random start: it draws no random numbers and leaves the training RNG stream alone.
    """
    fgsm = create_attack("fgsm", eps=threat.eps, norm=threat.norm)
    acc = robust_accuracy(model, x, y, {"fgsm": fgsm}, batch_size=batch_size).rates()["fgsm"]
    best_fgsm = max([-1.0] + [h["val_fgsm"] for h in p.history if h.get("val_fgsm") is not None])
    reason = co_rule(acc, pgd, p.best_robust, best_fgsm)
    if reason:
        tqdm.write(f"WARNING: catastrophic overfitting suspected at epoch {p.epoch}: {reason}")
    return {"val_fgsm": acc, "co_detected": reason is not None, "co_reason": reason}
