"""Training methods compute losses only: `method.loss(model, x, y) -> (loss, metrics)`.

Only the training loop touches the optimizer, scheduler, scaler and checkpoints. A method is a typed
dataclass whose fields are its options; `create_method` checks option names and types so a typo in a
config fails loudly, and `options()` is what results files record.
"""
from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from typing import Any, Iterator, Optional, get_type_hints

import torch
from torch import nn

from ..attacks import PGD
from ..errors import UsageError
from ..registry import Registry
from ..values import parse_number

Metrics = dict[str, torch.Tensor]


@dataclasses.dataclass
class Method:
    """Base: the threat model every method trains against (l-inf eps 8/255, PGD-10, step 2/255)."""

    eps: float = 8 / 255
    step_size: float = 2 / 255
    steps: int = 10
    norm: str = "linf"
    bn_mode: str = "train"

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, Metrics]:
        raise NotImplementedError

    def attack(self, **overrides: Any) -> PGD:
        """The method's adversary: PGD ascent on CE with its threat model; overrides change presets."""
        kw = dict(eps=self.eps, step_size=self.step_size, steps=self.steps, norm=self.norm,
                  bn_mode=self.bn_mode)
        kw.update(overrides)
        return PGD(**kw)

    @contextmanager
    def step_context(self, model: nn.Module) -> Iterator[None]:
        """Wraps forward, backward and optimizer step (AWP perturbs weights here and restores them)."""
        yield

    def after_backward(self, model: nn.Module) -> None:
        """Called after loss.backward() and before the optimizer step (state updates from gradients)."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors to save in checkpoints (e.g. the universal inverse perturbation)."""
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state:
            raise UsageError(f"method {type(self).__name__} has no state, but the checkpoint holds {sorted(state)}")

    def options(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


METHODS: Registry[Method] = Registry("method")


def _coerce(name: str, value: Any, kind: Any) -> Any:
    """Convert a config or command-line value to the option's declared type."""
    kinds = set(getattr(kind, "__args__", (kind,)))
    if value is None and type(None) in kinds:
        return None
    if bool in kinds:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("true", "1", "yes", "false", "0", "no"):
            return str(value).lower() in ("true", "1", "yes")
        raise UsageError(f"method option {name} must be true or false, got {value!r}")
    if int in kinds and float not in kinds:
        if isinstance(value, int) or (isinstance(value, str) and value.strip().lstrip("-").isdigit()):
            return int(value)
        raise UsageError(f"method option {name} must be an integer, got {value!r}")
    if float in kinds:
        return parse_number(value, f"method option {name}")
    return str(value)


def create_method(name: str, **options: Any) -> Method:
    """Build a registered method, checking option names and converting values to their types."""
    cls = METHODS.get(name)
    hints = get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise UsageError(
            f"method {name!r} has no option {', '.join(unknown)}; its options are: {', '.join(sorted(fields))}"
        )
    kw = {k: _coerce(k, v, hints[k]) for k, v in options.items()}
    return cls(**kw)


def mean_acc(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Batch accuracy as a detached tensor (no host sync)."""
    return (logits.detach().argmax(1) == y).float().mean()


def resolve(value: Optional[float], default: float) -> float:
    return default if value is None else value
