"""Adversarial weight perturbation (Wu et al., NeurIPS 2020, "Adversarial Weight Perturbation Helps
Robust Generalization") as a wrapper around any registered method: `X+awp` trains X's loss at the
weights w + v, where v ascends X's loss inside a ball of relative radius gamma around w.

Per batch, following the reference code (csdongxian/AWP):
1. X crafts its adversarial input(s) against the model (unperturbed weights);
2. a proxy copy of the model takes one step of its own SGD (lr `awp_lr`, 0.01) on the NEGATED loss of X
   on those inputs; for every weight tensor with dim > 1, v = gamma * ||w|| * diff / ||diff||, with
   diff = w_proxy - w (the proxy keeps the model's BatchNorm statistics out of this);
3. v is added to the model's weights and X's loss is computed there (the crafted inputs are reused);
4. the trainer's backward and optimizer step run at w + v, then v is taken off again - in a `finally`
   of `step_context`, so also when the loss, the backward or the optimizer step raises.
The AWP paper starts the perturbation after 10 of 200 epochs; here it runs from the first step
(gamma = 0 turns it off). X's options pass through: `create_method("trades+awp", beta=6, gamma=5e-3)`.
X must craft through `self.attack()` (every method here does) so step 3 can reuse step 1's inputs.
"""
from __future__ import annotations

import copy
import dataclasses
from contextlib import ExitStack, contextmanager
from typing import Any, Iterator, Optional

import torch
from torch import nn
from torch.func import functional_call

from ..attacks import PGD
from ..errors import UsageError
from .base import METHODS, Metrics

Diff = dict[str, torch.Tensor]


@contextmanager
def perturbed_weights(model: nn.Module, diff: Diff) -> Iterator[None]:
    """Adds diff to the named parameters; on exit (always) takes it off again, keeping what happened meanwhile.

    Restoring computes w + (w_now - (w + diff)) rather than w_now - diff: the same in exact arithmetic,
    but bit-exact when nothing changed the weights (an error before the optimizer step), and otherwise
    the optimizer's update as it was applied at the perturbed point, added to the original weights.
    """
    params = dict(model.named_parameters())
    saved = {n: params[n].detach().clone() for n in diff}
    with torch.no_grad():
        for n, v in diff.items():
            params[n].add_(v)
    try:
        yield
    finally:
        with torch.no_grad():
            for n, v in diff.items():
                p = params[n]
                p.copy_(saved[n] + (p - (saved[n] + v)))


class PerturbedView(nn.Module):
    """The model at w + diff without touching it (torch.func), for loss() called outside step_context."""

    def __init__(self, model: nn.Module, diff: Diff) -> None:
        super().__init__()
        self.model, self.diff = model, diff
        self.training = model.training

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        params = dict(self.model.named_parameters())
        return functional_call(self.model, {n: params[n] + v for n, v in self.diff.items()}, (x,))


class _Tape:
    """The inputs crafted by one loss() call, crafted against `model` and handed back, in order, to the next."""

    def __init__(self, model: nn.Module) -> None:
        self.model, self.saved, self.replaying = model, [], False

    def wrap(self, attack: PGD) -> "_Taped":
        return _Taped(self, attack)


class _Taped:
    """A PGD whose call is recorded (first pass) or replayed (second pass); other attributes delegate."""

    def __init__(self, tape: _Tape, attack: PGD) -> None:
        self.tape, self.attack = tape, attack

    def __getattr__(self, name: str) -> Any:
        return getattr(self.attack, name)

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, **kw: Any) -> torch.Tensor:
        if self.tape.replaying:
            if not self.tape.saved:
                raise RuntimeError("AWP: the method crafted more inputs than in its first pass")
            return self.tape.saved.pop(0)
        out = self.attack(self.tape.model, x, y, **kw)
        self.tape.saved.append(out)
        return out


@dataclasses.dataclass
class AWPMixin:
    """AWP options, mixed in front of the wrapped method's class (see `with_awp`).

    gamma: relative size of the weight perturbation, ||v_l|| = gamma ||w_l|| per layer (5e-3).
    awp_lr: lr of the proxy's SGD step (0.01 as in the reference; it cancels in the normalisation).
    """

    gamma: float = 5e-3
    awp_lr: float = 0.01

    def __post_init__(self) -> None:
        if not self.gamma >= 0:
            raise UsageError(f"gamma must be >= 0, got {self.gamma}")
        if not self.awp_lr > 0:
            raise UsageError(f"awp_lr must be positive, got {self.awp_lr}")
        post = getattr(super(), "__post_init__", None)
        if post is not None:
            post()

    def attack(self, **overrides: Any) -> Any:
        """The wrapped method's attack, recorded or replayed while AWP runs its two passes."""
        attack = super().attack(**overrides)
        tape: Optional[_Tape] = getattr(self, "_awp_tape", None)
        return attack if tape is None else tape.wrap(attack)

    @contextmanager
    def step_context(self, model: nn.Module) -> Iterator[None]:
        """Holds the weight perturbation that loss() applies, and always takes it off on exit."""
        with super().step_context(model), ExitStack() as stack:
            self._awp_active = (model, stack)
            try:
                yield
            finally:
                self._awp_active = None

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, Metrics]:
        if self.gamma == 0:
            return super().loss(model, x, y)
        tape = _Tape(model)
        self._awp_tape = tape
        try:
            diff = self.weight_perturbation(model, x, y)
            tape.replaying = True
            active = getattr(self, "_awp_active", None)
            # In the trainer's step_context the weights are perturbed in place until after the optimizer
            # step (as in the reference); a bare call (tests) has nobody to restore them, so uses a view.
            if active is not None and active[0] is model:
                active[1].enter_context(perturbed_weights(model, diff))
                return super().loss(model, x, y)
            return super().loss(PerturbedView(model, diff), x, y)
        finally:
            self._awp_tape = None

    def weight_perturbation(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Diff:
        """v: one SGD step of the proxy on the negated loss, scaled per weight tensor to gamma * ||w||."""
        proxy, optimizer = self._proxy(model)
        loss, _ = super().loss(proxy, x, y)
        optimizer.zero_grad(set_to_none=True)
        (-loss).backward()
        optimizer.step()
        weights = dict(proxy.named_parameters())
        diff = {}
        with torch.no_grad():
            for name, w in model.named_parameters():
                if w.dim() > 1 and w.requires_grad:
                    d = weights[name] - w
                    diff[name] = self.gamma * w.norm() / (d.norm() + 1e-20) * d
        return diff

    def _proxy(self, model: nn.Module) -> tuple[nn.Module, torch.optim.Optimizer]:
        """A copy of the model with its own optimizer, made once and re-synced with the model every batch."""
        held = getattr(self, "_awp_proxy", None)
        if held is None or held[0] is not model:
            proxy = copy.deepcopy(model)
            held = (model, proxy, torch.optim.SGD(proxy.parameters(), lr=self.awp_lr))
            self._awp_proxy = held  # not a field: options() and asdict() skip it
        _, proxy, optimizer = held
        proxy.load_state_dict(model.state_dict())
        proxy.train(model.training)
        return proxy, optimizer


def with_awp(cls: type) -> type:
    """The class `cls` with AWP in front: all of cls's options plus gamma and awp_lr."""
    doc = f"{cls.__name__} + adversarial weight perturbation (Wu et al. 2020). {AWPMixin.__doc__}"
    new = type(f"{cls.__name__}AWP", (AWPMixin, cls), {"__doc__": doc, "__module__": __name__})
    return dataclasses.dataclass(new)


def register_awp(name: str) -> type:
    """Register `name+awp` for an already registered method."""
    cls = with_awp(METHODS.get(name))
    return METHODS.register(f"{name}+awp", help=f"{name} with adversarial weight perturbation, gamma 5e-3 (Wu et al. 2020)")(cls)


for _name in ("pgd-at", "trades", "iat"):
    register_awp(_name)
