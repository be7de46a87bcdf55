"""Robust accuracy, counted per example.

Each attack runs on every naturally correct example, so each column is that attack's own accuracy
(as papers report it); `worst_case` is per example: correct only if it survives every attack.
Every returned example is verified (inside the ball, inside [0, 1], finite) before it counts.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

import torch
from torch import nn
from tqdm import tqdm

from .attacks import Natural, PGD
from .registry import UsageError


class AttackVerificationError(RuntimeError):
    """An attack returned an example outside its threat model: a bug, never a success."""


def verify_adversarial(name: str, attack: Any, x: torch.Tensor, x_adv: torch.Tensor) -> None:
    """Raise unless x_adv is finite, inside [0, 1] and inside the attack's eps-ball."""
    if x_adv.shape != x.shape:
        raise AttackVerificationError(f"attack {name} changed the input shape {tuple(x.shape)} -> {tuple(x_adv.shape)}")
    if not torch.isfinite(x_adv).all():
        raise AttackVerificationError(f"attack {name} returned non-finite values")
    if x_adv.min() < 0 or x_adv.max() > 1:
        raise AttackVerificationError(f"attack {name} left the [0, 1] image box")
    eps = float(getattr(attack, "eps", 0.0))
    norm = getattr(attack, "norm", "linf")
    delta = (x_adv - x).flatten(1).float()
    size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
    tol = 1e-5 * max(1.0, eps)
    if (size > eps + tol).any():
        raise AttackVerificationError(
            f"attack {name} left its {norm} ball: max perturbation {size.max().item():.6f} > eps {eps:.6f}"
        )


@dataclasses.dataclass
class Accuracy:
    correct: dict[str, int]
    worst_case: int
    total: int

    def rates(self) -> dict[str, float]:
        out = {k: v / self.total for k, v in self.correct.items()}
        out["worst_case"] = self.worst_case / self.total
        return out


def robust_accuracy(
    model: nn.Module,
    x_all: torch.Tensor,
    y_all: torch.Tensor,
    attacks: Mapping[str, Any],
    *,
    batch_size: int = 256,
    progress: bool = False,
    desc: str = "eval",
) -> Accuracy:
    """Count correct examples under each attack and in the per-example worst case.

    x_all is uint8 or float in [0, 1] (any device); batches move to the model's device.
    """
    if len(x_all) == 0:
        raise UsageError("nothing to evaluate: the split is empty")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    correct = {name: torch.zeros((), dtype=torch.long, device=device) for name in attacks}
    worst = torch.zeros((), dtype=torch.long, device=device)
    try:
        for start in tqdm(range(0, len(x_all), batch_size), desc=desc, disable=not progress, leave=False):
            x = _as_float(x_all[start : start + batch_size].to(device))
            y = y_all[start : start + batch_size].to(device)
            alive = _batch(model, x, y, attacks, correct)
            worst += alive.sum()
    finally:
        model.train(was_training)
    return Accuracy({k: int(v) for k, v in correct.items()}, int(worst), len(x_all))


def _batch(model: nn.Module, x: torch.Tensor, y: torch.Tensor, attacks: Mapping[str, Any],
           correct: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        natural_ok = model(x).argmax(1) == y
    alive = natural_ok.clone()
    for name, attack in attacks.items():
        if isinstance(attack, Natural):
            ok = natural_ok
        else:
            ok = natural_ok.clone()
            idx = natural_ok.nonzero().squeeze(1)
            if len(idx):
                x_adv = attack(model, x[idx], y[idx])
                verify_adversarial(name, attack, x[idx], x_adv)
                with torch.no_grad():
                    ok[idx] = model(x_adv).argmax(1) == y[idx]
        correct[name] += ok.sum()
        alive &= ok
    return alive


def _as_float(x: torch.Tensor) -> torch.Tensor:
    return x.float().div_(255) if x.dtype == torch.uint8 else x.float()


def protocol(attack: Any) -> dict[str, Any]:
    """What to write next to a number: the attack's parameters."""
    return attack.describe() if hasattr(attack, "describe") else {}


__all__ = ["Accuracy", "AttackVerificationError", "robust_accuracy", "verify_adversarial", "protocol", "PGD"]
