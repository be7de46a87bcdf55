"""Adversarial weight perturbation (Wu et al., NeurIPS 2020, "Adversarial Weight Perturbation Helps
Robust Generalization") as a wrapper around any registered method: `X+awp` trains X's loss at the
weights w + v, where v ascends X's loss inside a ball of relative radius gamma around w.

Per batch, following the reference code (csdongxian/AWP):
1. `craft`: X crafts its adversarial input(s) against the model (unperturbed weights);
2. a proxy copy of the model takes one step of its own SGD (lr `awp_lr`, 0.01) on the NEGATED objective
   of X on those inputs; for every weight tensor with dim > 1, v = gamma * ||w|| * diff / ||diff||, with
   diff = w_proxy - w (the proxy keeps the model's BatchNorm statistics out of this);
3. `objective`: v is added to the model's weights and X's objective is computed there, on the inputs
   of step 1 (nothing is crafted or computed twice);
4. the trainer's backward and optimizer step run at w + v, then v is taken off again - in a `finally`
   of `step_context`, so also when the loss, the backward or the optimizer step raises.
Defaults per host follow the authors' code (HOST_DEFAULTS: AT-AWP gamma 1e-2 from the start, TRADES-AWP
gamma 5e-3 from the 10th of 200 epochs, the reference's `epoch >= 10` over epochs 1..200, i.e. awp_warmup
9/200 = 0.045 of training; the trainer calls `at_step`). X's options pass through:
`create_method("trades+awp", beta=6, gamma=5e-3)`.
AWP wraps X by composition (`AWP(inner=X)`); X must split `craft` from `objective` (gradalign cannot).
"""
from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any, ClassVar, Optional, get_type_hints

import torch
from torch import nn
from torch.func import functional_call

from ..attacks import PGD
from ..threat import ThreatModel
from ..values import check_bounds, setting
from .base import METHODS, OPTION, Crafted, Method, Metrics, method_class

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
        """The logits of the perturbed model."""
        params = dict(self.model.named_parameters())
        return functional_call(self.model, {n: params[n] + v for n, v in self.diff.items()}, (x,))


@dataclasses.dataclass(frozen=True)
class AWPOptions:
    """AWP's own options, beside those of the method X it wraps; None is the host's default (HOST_DEFAULTS)."""

    gamma: Optional[float] = setting(None, "relative size of the weight perturbation, ||v_l|| = gamma ||w_l||",
                                     bounds="[0, inf)")
    awp_lr: float = setting(0.01, "lr of the proxy's SGD step", bounds="(0, inf)")
    awp_warmup: Optional[float] = setting(None, "fraction of training done before the perturbation starts",
                                          bounds="[0, 1)")

    def __post_init__(self) -> None:
        check_bounds(self, OPTION)


class AWP(Method):
    """A method X with adversarial weight perturbation (Wu et al. 2020): X's objective at w + v.

    gamma: relative size of the weight perturbation, ||v_l|| = gamma ||w_l|| per layer (5e-3).
    awp_lr: lr of the proxy's SGD step (0.01 as in the reference; it cancels in the normalisation).
    awp_warmup: fraction of training before the perturbation starts (0). Ranges: `AWPOptions`.
    Every option of X passes through. `inner_class` is X's class; each registered `X+awp` sets it.
    """

    inner_class: ClassVar[type[Method]] = Method
    default_gamma: ClassVar[float] = 5e-3     # per host, set by register_awp (HOST_DEFAULTS)
    default_warmup: ClassVar[float] = 0.0
    AWP_OPTIONS: ClassVar[dict[str, Any]] = get_type_hints(AWPOptions)

    def __init__(self, inner: Method, gamma: Optional[float] = None, awp_lr: float = 0.01,
                 awp_warmup: Optional[float] = None) -> None:
        AWPOptions(gamma, awp_lr, awp_warmup)  # checks the ranges, as every method's options are checked
        self.inner, self.awp_lr = inner, awp_lr
        self.gamma = self.default_gamma if gamma is None else gamma
        self.awp_warmup = self.default_warmup if awp_warmup is None else awp_warmup
        self._fraction = 1.0  # of training done; at_step() sets it (without it, no warm-up)
        self._awp_active: Optional[tuple[nn.Module, ExitStack]] = None
        self._awp_proxy: Optional[tuple[nn.Module, nn.Module, torch.optim.Optimizer]] = None

    # the wrapped method's threat model and options are this method's
    @property
    def threat(self) -> ThreatModel:
        """X's threat model."""
        return self.inner.threat

    @threat.setter
    def threat(self, value: ThreatModel) -> None:
        self.inner.threat = value

    @property
    def bn_mode(self) -> str:
        """X's BatchNorm mode while crafting."""
        return self.inner.bn_mode

    @bn_mode.setter
    def bn_mode(self, value: str) -> None:
        self.inner.bn_mode = value

    @classmethod
    def option_types(cls) -> dict[str, Any]:
        """X's options and AWP's own."""
        return {**cls.inner_class.option_types(), **cls.AWP_OPTIONS}

    @classmethod
    def build(cls, threat: ThreatModel, **options: Any) -> AWP:
        """X built from its options, wrapped with AWP's own."""
        own = {k: options.pop(k) for k in cls.AWP_OPTIONS if k in options}
        return cls(cls.inner_class.build(threat, **options), **own)

    def options(self) -> dict[str, Any]:
        """X's options and AWP's, as resolved (the host's defaults filled in)."""
        return {**self.inner.options(), "gamma": self.gamma, "awp_lr": self.awp_lr, "awp_warmup": self.awp_warmup}

    def at_step(self, step: int, total: int) -> None:
        """The weight perturbation starts once `awp_warmup` of the training steps are done."""
        self._fraction = step / max(total, 1)
        self.inner.at_step(step, total)

    @property
    def perturbing(self) -> bool:
        """Whether this step perturbs the weights (gamma > 0 and the warm-up is over)."""
        return self.gamma > 0 and self._fraction >= self.awp_warmup

    def attack(self, **overrides: Any) -> PGD:
        """X's adversary."""
        return self.inner.attack(**overrides)

    def craft(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Crafted:
        """X's inputs, crafted against the unperturbed weights w."""
        return self.inner.craft(model, x, y)

    def objective(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                  crafted: Crafted) -> tuple[torch.Tensor, Metrics]:
        """X's objective at w + v, on the inputs crafted at w."""
        if not self.perturbing:
            return self.inner.objective(model, x, y, crafted)
        diff = self.weight_perturbation(model, x, y, crafted)
        active = self._awp_active
        # In the trainer's step_context the weights are perturbed in place until after the optimizer
        # step (as in the reference); a bare call (tests) has nobody to restore them, so uses a view.
        if active is not None and active[0] is model:
            active[1].enter_context(perturbed_weights(model, diff))
            return self.inner.objective(model, x, y, crafted)
        return self.inner.objective(PerturbedView(model, diff), x, y, crafted)

    @contextmanager
    def step_context(self, model: nn.Module) -> Iterator[None]:
        """Holds the weight perturbation that objective() applies, and always takes it off on exit."""
        with self.inner.step_context(model), ExitStack() as stack:
            self._awp_active = (model, stack)
            try:
                yield
            finally:
                self._awp_active = None

    def after_backward(self, model: nn.Module) -> None:
        """X's hook."""
        self.inner.after_backward(model)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """X's state (AWP keeps none across steps)."""
        return self.inner.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore X's state."""
        self.inner.load_state_dict(state)

    def weight_perturbation(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, crafted: Crafted) -> Diff:
        """v: one SGD step of the proxy on the negated objective, scaled per weight tensor to gamma * ||w||."""
        proxy, optimizer = self._proxy(model)
        loss, _ = self.inner.objective(proxy, x, y, crafted)
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
        held = self._awp_proxy
        if held is None or held[0] is not model:
            proxy = copy.deepcopy(model)
            held = (model, proxy, torch.optim.SGD(proxy.parameters(), lr=self.awp_lr))
            self._awp_proxy = held
        _, proxy, optimizer = held
        proxy.load_state_dict(model.state_dict())
        proxy.train(model.training)
        return proxy, optimizer

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(inner={self.inner!r}, gamma={self.gamma}, awp_lr={self.awp_lr}, "
                f"awp_warmup={self.awp_warmup})")


# (gamma, warm-up as a fraction of training) per host, from the authors' code: AT-AWP gamma 1e-2 from the
# first epoch; TRADES-AWP gamma 5e-3 from `epoch >= 10` in a loop over epochs 1..200, i.e. from the 10th
# epoch, after 9 of 200 are done (0.045; iat 0.1 waited for 10, one epoch late). MART has no AWP setting of
# its authors; its consistency term is TRADES', so it takes TRADES-AWP's.
TRADES_WARMUP = 9 / 200
HOST_DEFAULTS = {"pgd-at": (1e-2, 0.0), "iat": (1e-2, 0.0), "trades": (5e-3, TRADES_WARMUP),
                 "iat-trades": (5e-3, TRADES_WARMUP), "mart": (5e-3, TRADES_WARMUP), "iat-mart": (5e-3, TRADES_WARMUP)}


def register_awp(name: str) -> type[AWP]:
    """Register `name+awp` for an already registered method, with its host's defaults."""
    inner = method_class(name)
    gamma, warmup = HOST_DEFAULTS[name]

    class Recipe(AWP):
        __doc__ = f"{inner.__name__} + adversarial weight perturbation (Wu et al. 2020). {AWP.__doc__}"
        inner_class, default_gamma, default_warmup = inner, gamma, warmup

    Recipe.__name__ = Recipe.__qualname__ = f"{inner.__name__}AWP"
    text = f"{name} with adversarial weight perturbation, gamma {gamma:g}" + (
        f" after {warmup:.1%} of training" if warmup else "") + " (Wu et al. 2020)"
    METHODS.register(f"{name}+awp", help=text)(Recipe)
    return Recipe


for _name in HOST_DEFAULTS:
    register_awp(_name)
