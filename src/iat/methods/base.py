"""Training methods compute losses only, in two parts: `craft` the inputs, then the `objective` on them.

    crafted = method.craft(model, x, y)                     # x', x~, ... (detached inputs)
    loss, metrics = method.objective(model, x, y, crafted)  # differentiable in the weights
    loss, metrics = method.loss(model, x, y)                # the two in one call

Only the training loop touches the optimizer, scheduler, scaler and checkpoints; `train_step` is that
loop's one step, for the trainer and for a user's own loop, so no hook is forgotten. A method is a typed
dataclass whose fields are its options, a numeric one declared with its range as the run config's fields
are (`setting(default, bounds="[0, inf)")`, checked when the method is built); `create_method` checks option
names and types so a typo in a config fails loudly, and `options()` is what results files record. The threat
model (eps, step size, steps, norm) is not an option: it is the run's one `ThreatModel`, handed in as `threat`
and read by every attack the method builds, so the method, the validation attack and the evaluator cannot
disagree.
Splitting crafting from the objective lets AWP evaluate the objective at perturbed weights on inputs
crafted at the model's own weights.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any, Optional, get_type_hints

import torch
from torch import nn

from ..attacks import PGD
from ..errors import UsageError
from ..registry import Registry, did_you_mean
from ..threat import ThreatModel
from ..values import check_bounds, coerce

Metrics = dict[str, torch.Tensor]
Crafted = dict[str, torch.Tensor]   # the method's crafted inputs, by name: "x_adv", "x_inv", ...
THREAT_KEYS = tuple(f.name for f in dataclasses.fields(ThreatModel))
OPTION = "method option "  # how range errors name an option: "method option beta must be in [0, inf), got -1"


@dataclasses.dataclass
class Method:
    """Base of every recipe. threat: the run's threat model (l-inf eps 8/255, PGD-10, step 2/255).
    bn_mode: BatchNorm mode while crafting ("train" | "eval" | "keep").

    A subclass's options are its fields, with their ranges beside them (`setting(..., bounds=...)`); they
    are checked here, so a subclass's own `__post_init__` calls this one first."""

    threat: ThreatModel = dataclasses.field(default_factory=ThreatModel, repr=False, metadata={"option": False})
    bn_mode: str = "train"

    def __post_init__(self) -> None:
        check_bounds(self, OPTION)

    def craft(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Crafted:
        """The inputs the objective needs, crafted against `model` (detached; no weight gradients)."""
        return {}

    def objective(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                  crafted: Crafted) -> tuple[torch.Tensor, Metrics]:
        """The training loss on the crafted inputs (its graph reaches the weights) and detached metrics."""
        raise NotImplementedError

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, Metrics]:
        """`objective` on the inputs `craft` makes: the training loss and its metrics, in one call."""
        return self.objective(model, x, y, self.craft(model, x, y))

    def attack(self, **overrides: Any) -> PGD:
        """The method's adversary: PGD ascent on CE in its threat model; overrides change presets."""
        t = self.threat
        kw: dict[str, Any] = dict(eps=t.eps, step_size=t.step_size, steps=t.steps, norm=t.norm, bn_mode=self.bn_mode)
        kw.update(overrides)
        return PGD(**kw)

    @contextmanager
    def step_context(self, model: nn.Module) -> Iterator[None]:
        """Wraps forward, backward and optimizer step (AWP perturbs weights here and restores them)."""
        yield

    def at_step(self, step: int, total: int) -> None:
        """Called before each training step with the global step and the run's total (schedules inside a
        method, such as AWP's warm-up)."""

    def after_backward(self, model: nn.Module) -> None:
        """Called after loss.backward() and before the optimizer step (state updates from gradients)."""

    def train_step(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, optimizer: torch.optim.Optimizer,
                   scaler: Optional[torch.amp.GradScaler] = None, *, step: Optional[int] = None,
                   total_steps: Optional[int] = None, grad_clip: float = 0.0,
                   forward_context: Optional[Callable[[], AbstractContextManager]] = None) -> Metrics:
        """One training step with every hook in the trainer's order.

        `at_step(step, total_steps)` if given (AWP's warm-up needs it), then inside `step_context`: `loss`
        (under `forward_context()`, e.g. autocast), zero_grad, backward (through `scaler` if given),
        `after_backward`, gradient clipping to norm `grad_clip` (> 0), and one optimizer step.

        Args:
            model: the model being trained (logits for images in [0, 1]); its weights change.
            x, y: the batch, images in [0, 1] and class indices.
            optimizer: stepped once.
            scaler: an AMP GradScaler for fp16 (None: plain backward and step).
            step, total_steps: the global step and the run's total, together or neither (for `at_step`).
            grad_clip: clip the gradient norm to this before the step (0: off).
            forward_context: a factory of the context the forward runs in, e.g. autocast (None: none).

        Returns:
            The method's metrics, detached, with "loss" the loss that was backpropagated.

        >>> import torch
        >>> from torch import nn
        >>> from iat.methods import create_method
        >>> model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10))
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> x, y = torch.rand(4, 3, 8, 8), torch.randint(0, 10, (4,))
        >>> metrics = create_method("pgd-at", steps=2).train_step(model, x, y, optimizer)
        >>> sorted(metrics)
        ['acc_adv', 'loss']
        """
        if (step is None) != (total_steps is None):
            raise UsageError("train_step needs step and total_steps together (for at_step), or neither")
        if step is not None and total_steps is not None:
            self.at_step(step, total_steps)
        with self.step_context(model):
            with forward_context() if forward_context else nullcontext():
                loss, metrics = self.loss(model, x, y)
            optimizer.zero_grad(set_to_none=True)
            (loss if scaler is None else scaler.scale(loss)).backward()  # DDP averages gradients over ranks here
            self.after_backward(model)
            if grad_clip > 0:
                if scaler is not None:
                    scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
        return {**metrics, "loss": loss.detach()}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors to save in checkpoints (e.g. the universal inverse perturbation)."""
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what `state_dict` saved (a method without state accepts only an empty dict)."""
        if state:
            raise UsageError(f"method {type(self).__name__} has no state, but the checkpoint holds {sorted(state)}")

    @classmethod
    def option_types(cls) -> dict[str, Any]:
        """Option name -> declared type (every init field but the threat model)."""
        hints = get_type_hints(cls)
        return {f.name: hints[f.name] for f in dataclasses.fields(cls)
                if f.init and f.metadata.get("option", True)}

    @classmethod
    def build(cls, threat: ThreatModel, **options: Any) -> Method:
        """An instance from already coerced options."""
        return cls(threat=threat, **options)

    def options(self) -> dict[str, Any]:
        """What results files record: every option as resolved (the threat model is recorded once, by the run)."""
        return {name: getattr(self, name) for name in self.option_types()}


METHODS: Registry[Method] = Registry("method")


def method_class(name: str) -> type[Method]:
    """The class registered as `name` (every method is registered by its class, which `create_method` needs
    for its option types and `build`)."""
    cls = METHODS.get(name)
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise TypeError(f"method {name!r} is registered as {cls!r}, not a Method subclass")
    return cls


def create_method(name: str, threat: Optional[ThreatModel] = None, **options: Any) -> Method:
    """Build a registered method, checking option names, converting values to their types and checking
    their ranges.

    The threat model comes as `threat`, or (for a quick start in Python) as eps / step_size / steps / norm
    keywords, which build one; giving both is an error, so the two can never disagree.

    Args:
        name: a registered method (`METHODS.names()`: "iat", "pgd-at", "trades", "trades+awp", ...).
        threat: the run's threat model (default: built from the keywords below, else `ThreatModel()`).
        **options: the method's options (its dataclass fields), values as written by users ("8/255", "true"
            are converted); eps / step_size / steps / norm build the threat model when `threat` is None.

    Returns:
        The method, ready for `loss` / `train_step`.

    Raises:
        UsageError: an unknown name or option (with the nearest one), an ill-typed or out-of-range value.

    >>> method = create_method("iat", eps=8/255, beta=3.5)
    >>> method.options()["beta"], method.threat.eps == 8/255
    (3.5, True)
    >>> create_method("iat", beta=-1)
    Traceback (most recent call last):
    iat.errors.UsageError: method option beta must be in [0, inf), got -1.0
    """
    cls = method_class(name)
    given = {k: options.pop(k) for k in THREAT_KEYS if k in options}
    if given and threat is not None:
        key = next(iter(given))
        raise UsageError(f"{key} is part of the threat model, not an option of method {name!r}: set it once, "
                         f"with --{key.replace('_', '-')} (config key threat.{key})")
    if threat is None:
        hints = get_type_hints(ThreatModel)
        threat = ThreatModel(**{k: coerce(v, hints[k], k) for k, v in given.items()})
    types = cls.option_types()
    unknown = sorted(set(options) - set(types))
    if unknown:
        raise UsageError(f"method {name!r} has no option {', '.join(unknown)}"
                         f"{did_you_mean(unknown[0], types)}; its options are: {', '.join(sorted(types))}")
    kw = {k: coerce(v, types[k], f"{OPTION}{k}") for k, v in options.items()}
    return cls.build(threat, **kw)  # the method checks its options' ranges as it is built


def mean_acc(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Batch accuracy as a detached tensor (no host sync)."""
    return (logits.detach().argmax(1) == y).float().mean()


def resolve(value: Optional[float], default: float) -> float:
    """An optional option's value, or its default when None."""
    return default if value is None else value
