"""The threat model: one object, defined once per run, handed to the method, the validation attack and
the evaluator.

`ThreatModel(norm, eps, step_size, steps)` names the ball the adversary may move in (pixel units, images
in [0, 1]) and the default PGD effort inside it. The ball's geometry (random start, step, projection,
size) is an object chosen once from the norm (`BALLS`), in the style of MadryLab's LinfStep / L2Step,
rather than a norm string branched on in every function.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Optional

import torch

from .errors import UsageError
from .registry import Registry

Noise = Callable[[Callable, torch.Size], torch.Tensor]  # draw(torch.rand | torch.randn, shape) -> fp32 noise


def _per_example(v: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """values [N] shaped to broadcast against v [N, ...]."""
    return values.view(-1, *([1] * (v.dim() - 1)))


def l2_norm(v: torch.Tensor) -> torch.Tensor:
    """Per-example l2 norm (at least 1e-12), shaped to broadcast against v."""
    return _per_example(v, v.flatten(1).norm(dim=1).clamp_min(1e-12))


@dataclasses.dataclass(frozen=True)
class Ball:
    """A norm ball of radius eps around each example. Subclasses give the norm's geometry."""

    eps: float
    norm = "?"

    def size(self, delta: torch.Tensor) -> torch.Tensor:
        """Per-example norm of delta [N, ...] -> [N]."""
        raise NotImplementedError

    def random(self, shape: torch.Size, radius: float, draw: Noise) -> torch.Tensor:
        """A random point of the ball of `radius` (uniform per coordinate for l-inf, uniform radius for l2)."""
        raise NotImplementedError

    def ascent(self, grad: torch.Tensor) -> torch.Tensor:
        """The direction of one unit step that increases the loss fastest for this norm."""
        raise NotImplementedError

    def project(self, delta: torch.Tensor) -> torch.Tensor:
        """The nearest point of the ball."""
        raise NotImplementedError

    def full_range(self, input_numel: int) -> float:
        """The radius from which every image in [0, 1]^d is reachable: an attack there must reach 0%."""
        raise NotImplementedError


BALLS: Registry[Ball] = Registry("norm")


@BALLS.register("linf", help="l-infinity ball: every pixel moves by at most eps")
@dataclasses.dataclass(frozen=True)
class LinfBall(Ball):
    """The l-infinity ball: every pixel moves by at most eps (sign steps, clamping)."""

    norm = "linf"

    def size(self, delta: torch.Tensor) -> torch.Tensor:
        """max_i |delta_i| per example."""
        return delta.flatten(1).abs().amax(1)

    def random(self, shape: torch.Size, radius: float, draw: Noise) -> torch.Tensor:
        """Uniform in [-radius, radius] per coordinate."""
        return (2 * draw(torch.rand, shape) - 1) * radius

    def ascent(self, grad: torch.Tensor) -> torch.Tensor:
        """sign(grad)."""
        return grad.sign()

    def project(self, delta: torch.Tensor) -> torch.Tensor:
        """Clamp every coordinate to [-eps, eps]."""
        return delta.clamp(-self.eps, self.eps)

    def full_range(self, input_numel: int) -> float:
        """1: every pixel can reach 0 and 1."""
        return 1.0


@BALLS.register("l2", help="l2 ball: the perturbation's Euclidean norm is at most eps")
@dataclasses.dataclass(frozen=True)
class L2Ball(Ball):
    """The l2 ball: the perturbation's Euclidean norm is at most eps (normalised steps, rescaling)."""

    norm = "l2"

    def size(self, delta: torch.Tensor) -> torch.Tensor:
        """||delta||_2 per example."""
        return delta.flatten(1).norm(dim=1)

    def random(self, shape: torch.Size, radius: float, draw: Noise) -> torch.Tensor:
        """A uniform direction times a radius uniform in [0, radius]."""
        direction = draw(torch.randn, shape)
        r = _per_example(direction, draw(torch.rand, shape[:1]))
        return direction / l2_norm(direction) * r * radius

    def ascent(self, grad: torch.Tensor) -> torch.Tensor:
        """grad / ||grad||_2 per example."""
        return grad / l2_norm(grad)

    def project(self, delta: torch.Tensor) -> torch.Tensor:
        """Rescale each example outside the ball onto its surface."""
        norm = delta.flatten(1).norm(dim=1)
        factor = torch.where(norm > self.eps, self.eps / norm, torch.ones_like(norm))  # inside: unchanged
        return delta * _per_example(delta, factor)

    def full_range(self, input_numel: int) -> float:
        """sqrt(d): the diagonal of [0, 1]^d."""
        return math.sqrt(input_numel)


def make_ball(norm: str, eps: float) -> Ball:
    """The ball of `norm` with radius eps; eps must be >= 0 (and at most 1 for l-inf on [0, 1] images)."""
    cls = BALLS.get(norm)
    if not (isinstance(eps, (int, float)) and eps >= 0) or (norm == "linf" and eps > 1):
        raise UsageError(f"eps must be in [0, 1] for images in [0, 1], got {eps}")
    return cls(eps=float(eps))


@dataclasses.dataclass(frozen=True)
class ThreatModel:
    """What the adversary may do: move each example inside the `norm` ball of radius `eps` (pixel units),
    found by PGD with `steps` steps of `step_size` (the training adversary and the default effort).

    Defaults: l-inf, eps 8/255, step 2/255, 10 steps (PGD-10 of Madry et al. 2018 on CIFAR-10); `iat train`
    without an eps takes the data set's standard instead (data.standards). This is the one place that checks
    these four values: `PGD` builds its threat model from its own, so an attack and a run agree on them.

    Args:
        eps: radius of the ball, pixel units; in [0, 1] for l-inf (images in [0, 1]), >= 0 for l2.
        step_size: PGD step, pixel units (> 0).
        steps: PGD iterations (>= 1).
        norm: "linf" or "l2" (`BALLS`).

    Raises:
        UsageError: a value out of its range, as one line naming it.

    >>> threat = ThreatModel(eps=8/255, step_size=2/255, steps=10, norm="linf")
    >>> threat.ball.norm, threat.scaled(0.5).eps == 4/255
    ('linf', True)
    >>> ThreatModel(steps=0)
    Traceback (most recent call last):
    iat.errors.UsageError: attack steps must be at least 1, got 0
    """

    eps: float = dataclasses.field(default=8 / 255, metadata={
        "help": "radius of the threat ball, pixel units (default: the data set's standard, e.g. MNIST 0.3, "
                "Fashion-MNIST 0.1, CIFAR and SVHN 8/255; else 8/255)", "flag": "eps"})
    step_size: float = dataclasses.field(default=2 / 255, metadata={
        "help": "PGD step size of the training adversary (default: the data set's standard if eps is not given, "
                "else 2/255)", "flag": "step-size"})
    steps: int = dataclasses.field(default=10, metadata={
        "help": "PGD steps of the training adversary (default: the data set's standard if eps is not given, "
                "else 10)",
        "flag": "steps"})
    norm: str = dataclasses.field(default="linf", metadata={"help": "threat ball", "choices": "norms", "flag": "norm"})

    def __post_init__(self) -> None:
        make_ball(self.norm, self.eps)
        if not self.step_size > 0:
            raise UsageError(f"attack step size must be positive, got {self.step_size}")
        if self.steps < 1:
            raise UsageError(f"attack steps must be at least 1, got {self.steps}")

    @property
    def ball(self) -> Ball:
        """The geometry of this threat model's ball (random start, step, projection)."""
        return make_ball(self.norm, self.eps)

    def scaled(self, factor: float) -> ThreatModel:
        """eps and step size times `factor` (eps warm-up); norm and steps unchanged."""
        return dataclasses.replace(self, eps=self.eps * factor, step_size=self.step_size * factor)

    def with_eps(self, eps: Optional[float] = None, norm: Optional[str] = None) -> ThreatModel:
        """The same threat model at another radius or norm (evaluation overrides); step size keeps its ratio."""
        eps = self.eps if eps is None else eps
        ratio = self.step_size / self.eps if self.eps > 0 else 0.25
        step_size = ratio * eps if eps > 0 else self.step_size
        return dataclasses.replace(self, eps=eps, norm=norm or self.norm, step_size=step_size)

    def describe(self) -> dict:
        """The threat model as a plain dict, for results files."""
        return dataclasses.asdict(self)
