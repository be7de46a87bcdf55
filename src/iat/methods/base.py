"""Training methods compute losses only, in two parts: `craft` the inputs, then the `objective` on them.

    crafted = method.craft(model, x, y)                     # x', x~, ... (detached inputs)
    loss, metrics = method.objective(model, x, y, crafted)  # differentiable in the weights
    loss, metrics = method.loss(model, x, y)                # the two in one call

Only the training loop touches the optimizer, scheduler, scaler and checkpoints; `train_step` is that
loop's one step, for the trainer and for a user's own loop, so no hook is forgotten. A method is a typed
dataclass whose fields are its options; `create_method` checks option names and types so a typo in a
config fails loudly, and `options()` is what results files record. The threat model (eps, step size,
steps, norm) is not an option: it is the run's one `ThreatModel`, handed in as `threat` and read by
every attack the method builds, so the method, the validation attack and the evaluator cannot disagree.
Splitting crafting from the objective lets AWP evaluate the objective at perturbed weights on inputs
crafted at the model's own weights.
"""
from __future__ import annotations

import dataclasses
from contextlib import contextmanager, nullcontext
from typing import Any, Callable, ContextManager, Iterator, Optional, get_type_hints

import torch
from torch import nn

from ..attacks import PGD
from ..errors import UsageError
from ..registry import Registry, did_you_mean
from ..threat import ThreatModel
from ..values import check_range, coerce

Metrics = dict[str, torch.Tensor]
Crafted = dict[str, torch.Tensor]   # the method's crafted inputs, by name: "x_adv", "x_inv", ...
THREAT_KEYS = tuple(f.name for f in dataclasses.fields(ThreatModel))
# The range of every numeric option some method has, checked by create_method (values.check_range).
OPTION_BOUNDS = {"beta": "[0, inf)", "align_lambda": "[0, inf)", "eps_inv": "[0, 1]", "step_size_inv": "(0, inf)",
                 "steps_inv": "[1, 1e6]", "init_radius": "[0, 1]", "gamma": "[0, inf)", "awp_lr": "(0, inf)",
                 "awp_warmup": "[0, 1)", "mu": "[0, 1)", "step_scale": "(0, inf)", "init_scale": "[0, inf)",
                 "num_classes": "[2, 1e9]"}


@dataclasses.dataclass
class Method:
    """Base of every recipe. threat: the run's threat model (l-inf eps 8/255, PGD-10, step 2/255).
    bn_mode: BatchNorm mode while crafting ("train" | "eval" | "keep")."""

    threat: ThreatModel = dataclasses.field(default_factory=ThreatModel, repr=False, metadata={"option": False})
    bn_mode: str = "train"

    def craft(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Crafted:
        """The inputs the objective needs, crafted against `model` (detached; no weight gradients)."""
        return {}

    def objective(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                  crafted: Crafted) -> tuple[torch.Tensor, Metrics]:
        """The training loss on the crafted inputs (its graph reaches the weights) and detached metrics."""
        raise NotImplementedError

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, Metrics]:
        return self.objective(model, x, y, self.craft(model, x, y))

    def attack(self, **overrides: Any) -> PGD:
        """The method's adversary: PGD ascent on CE in its threat model; overrides change presets."""
        t = self.threat
        kw = dict(eps=t.eps, step_size=t.step_size, steps=t.steps, norm=t.norm, bn_mode=self.bn_mode)
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
                   forward_context: Optional[Callable[[], ContextManager]] = None) -> Metrics:
        """One training step with every hook in the trainer's order; returns the metrics ("loss": the loss
        that was backpropagated, detached).

        `at_step(step, total_steps)` if given (AWP's warm-up needs it), then inside `step_context`: `loss`
        (under `forward_context()`, e.g. autocast), zero_grad, backward (through `scaler` if given),
        `after_backward`, gradient clipping to norm `grad_clip` (> 0), and one optimizer step.
        """
        if (step is None) != (total_steps is None):
            raise UsageError("train_step needs step and total_steps together (for at_step), or neither")
        if step is not None:
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
        if state:
            raise UsageError(f"method {type(self).__name__} has no state, but the checkpoint holds {sorted(state)}")

    @classmethod
    def option_types(cls) -> dict[str, Any]:
        """Option name -> declared type (every init field but the threat model)."""
        hints = get_type_hints(cls)
        return {f.name: hints[f.name] for f in dataclasses.fields(cls)
                if f.init and f.metadata.get("option", True)}

    @classmethod
    def build(cls, threat: ThreatModel, **options: Any) -> "Method":
        """An instance from already coerced options."""
        return cls(threat=threat, **options)

    def options(self) -> dict[str, Any]:
        """What results files record: every option as resolved (the threat model is recorded once, by the run)."""
        return {name: getattr(self, name) for name in self.option_types()}


METHODS: Registry[type[Method]] = Registry("method")


def create_method(name: str, threat: Optional[ThreatModel] = None, **options: Any) -> Method:
    """Build a registered method, checking option names and converting values to their types.

    The threat model comes as `threat`, or (for a quick start in Python) as eps / step_size / steps / norm
    keywords, which build one; giving both is an error, so the two can never disagree.
    """
    cls = METHODS.get(name)
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
    kw = {k: coerce(v, types[k], f"method option {k}") for k, v in options.items()}
    for k, v in kw.items():
        if k in OPTION_BOUNDS:
            check_range(v, OPTION_BOUNDS[k], f"method option {k}")
    return cls.build(threat, **kw)


def mean_acc(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Batch accuracy as a detached tensor (no host sync)."""
    return (logits.detach().argmax(1) == y).float().mean()


def resolve(value: Optional[float], default: float) -> float:
    return default if value is None else value
