"""The one projected-gradient engine. Every attack and inverse attack in iat is a preset of `PGD`.

Adversary (Madry et al. 2018): x' = argmax_{||d|| <= eps} loss(f(x + d), y), sign-gradient ASCENT.
Inverse adversary (Dong et al. 2023): x~ = argmin_{||d|| <= eps} CE(f(x + d), y), DEScent - the same
loop with `descent=True`. Inputs are images in [0, 1]; eps and step sizes are in pixel units.
"""
from __future__ import annotations

import contextvars
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Optional, Union

import torch
from torch import nn

from ..errors import UsageError
from ..threat import BALLS, Ball, ThreatModel
from .losses import ATTACK_LOSSES, LossFn

NORMS = tuple(BALLS.names())
BN_MODES = ("train", "eval", "keep")

# (rank, world_size) while the trainer of a multi-process run crafts (see training/step.py: sharded_noise)
_NOISE_SHARD: contextvars.ContextVar[Optional[tuple[int, int]]] = contextvars.ContextVar("iat_noise_shard",
                                                                                          default=None)


@contextmanager
def noise_of_global_batch(rank: int, world_size: int) -> Iterator[None]:
    """Inside, random starts are drawn for the whole global batch and this rank's slice is kept, so W ranks
    of batch B draw what one process of batch W*B draws (a no-op for world_size 1)."""
    token = _NOISE_SHARD.set((rank, world_size) if world_size > 1 else None)
    try:
        yield
    finally:
        _NOISE_SHARD.reset(token)


@contextmanager
def crafting_mode(model: nn.Module, bn_mode: str = "keep") -> Iterator[nn.Module]:
    """Parameter gradients off and BatchNorm mode set while crafting; both restored exactly after.

    bn_mode: "train" (BatchNorm uses batch statistics and updates its running averages, as in
    Madry's and Rice's code), "eval" (running statistics, as in TRADES' code) or "keep".
    """
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        if bn_mode != "keep":
            model.train(bn_mode == "train")
        yield model
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        for m, training in modes:
            m.training = training


def _draw(fn: Callable[..., torch.Tensor], shape: torch.Size, generator: Optional[torch.Generator],
          like: torch.Tensor) -> torch.Tensor:
    """fp32 noise from `generator` on its own device, moved next to `like`.

    Under `noise_of_global_batch` the noise of the whole global batch (world_size x this rank's) is
    drawn and this rank's rows kept, so W ranks of batch B draw what one process of batch W*B draws.
    """
    device = generator.device if generator is not None else like.device
    shard = _NOISE_SHARD.get()
    if shard is None:
        return fn(shape, generator=generator, device=device, dtype=torch.float32).to(like.device)
    rank, world = shard
    full = fn((world * shape[0], *shape[1:]), generator=generator, device=device, dtype=torch.float32)
    return full[rank * shape[0]:(rank + 1) * shape[0]].to(like.device)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel: crafting needs no gradient sync or buffer broadcast."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


@dataclass(frozen=True)
class PGD:
    """Projected gradient attack (Madry et al. 2018), ascent or descent, l-inf or l2.

    Args:
        eps: radius of the threat ball (pixel units; 8/255).
        step_size: per step, pixel units (2/255).
        steps: iterations (10).
        norm: "linf" | "l2" ("linf").
        loss: "ce" | "cw" | "kl" (`ATTACK_LOSSES`) or a callable (logits, y, reference) -> per-example loss
            ("ce").
        descent: False for the adversary (ascent), True for the inverse adversary (False).
        random_start: start uniformly inside init_scale * eps (True).
        init_scale: radius of the random start in units of eps (1.0).
        project: project each step onto the eps-ball; False only clips to [0, 1] (N-FGSM) (True).
        restarts: runs, keeping the worst case per example (1).
        bn_mode: BatchNorm mode while crafting, "train" | "eval" | "keep" ("keep").

    eps, step_size, steps and norm are checked by `ThreatModel` (one place for the four); a bad value is a
    one-line UsageError.

    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10))
    >>> x, y = torch.rand(4, 3, 8, 8), torch.randint(0, 10, (4,))
    >>> attack = PGD(eps=8/255, step_size=2/255, steps=10)
    >>> x_adv = attack(model, x, y, generator=torch.Generator().manual_seed(0))
    >>> x_adv.shape, bool((x_adv - x).abs().max() <= 8/255 + 1e-6)
    (torch.Size([4, 3, 8, 8]), True)
    """

    eps: float = 8 / 255
    step_size: float = 2 / 255
    steps: int = 10
    norm: str = "linf"
    loss: Union[str, LossFn] = "ce"
    descent: bool = False
    random_start: bool = True
    init_scale: float = 1.0
    project: bool = True
    restarts: int = 1
    bn_mode: str = "keep"
    loss_fn: LossFn = field(init=False, repr=False, compare=False)
    ball: Ball = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        threat = ThreatModel(eps=self.eps, step_size=self.step_size, steps=self.steps, norm=self.norm)  # checks
        object.__setattr__(self, "ball", threat.ball)
        if self.restarts < 1:
            raise UsageError(f"restarts must be at least 1, got {self.restarts}")
        if self.bn_mode not in BN_MODES:
            raise UsageError(f"bn_mode must be one of {BN_MODES}, got {self.bn_mode!r}")
        loss_fn = ATTACK_LOSSES.get(self.loss) if isinstance(self.loss, str) else self.loss
        object.__setattr__(self, "loss_fn", loss_fn)

    def __call__(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        *,
        reference: Optional[torch.Tensor] = None,
        generator: Optional[torch.Generator] = None,
    ) -> torch.Tensor:
        """The perturbed batch, detached; never modifies x, y or the model's state (mode, gradient flags).

        Args:
            model: returns logits for images in [0, 1] (NCHW); a DistributedDataParallel is unwrapped.
            x: the clean batch, in [0, 1].
            y: its labels, class indices.
            reference: detached anchor logits for the "kl" loss (TRADES' p(x)); ignored by the others.
            generator: the seed of the random start (default: torch's global generator).

        Returns:
            x_adv of x's shape and dtype: inside the eps-ball around x (unless project is False) and [0, 1].
        """
        x, model = x.detach(), unwrap(model)
        ref = reference.detach() if reference is not None else None
        with crafting_mode(model, self.bn_mode):
            best = self._run(model, x, y, ref, generator)
            if self.restarts == 1:
                return best
            best_score = self._score(model, best, y, ref)
            for _ in range(self.restarts - 1):
                cand = self._run(model, x, y, ref, generator)
                score = self._score(model, cand, y, ref)
                better = score > best_score
                best = torch.where(better.view(-1, *([1] * (x.dim() - 1))), cand, best)
                best_score = torch.maximum(score, best_score)
            return best

    def _run(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
             ref: Optional[torch.Tensor], generator: Optional[torch.Generator]) -> torch.Tensor:
        delta = self.init_delta(x, generator)
        for _ in range(self.steps):
            delta.requires_grad_(True)
            loss = self.loss_fn(model(x + delta), y, ref)
            (grad,) = torch.autograd.grad(loss.sum(), delta)
            delta = self.step(x, delta.detach(), grad)
        return (x + delta).detach()

    def init_delta(self, x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Random start inside init_scale * eps (zeros without random start), kept inside [0, 1]."""
        radius = self.eps * self.init_scale
        if not self.random_start or radius == 0:
            return torch.zeros_like(x)
        delta = self.ball.random(x.shape, radius, lambda fn, shape: _draw(fn, shape, generator, x))
        return (x + delta.to(x.dtype)).clamp(0, 1) - x

    def step(self, x: torch.Tensor, delta: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """One signed (l-inf) or normalised (l2) step, projected to the ball and to [0, 1]."""
        sign = -1.0 if self.descent else 1.0
        delta = delta + sign * self.step_size * self.ball.ascent(grad.float())
        if self.project:
            delta = self.ball.project(delta)
        return (x + delta).clamp(0, 1) - x

    @torch.no_grad()
    def _score(self, model: nn.Module, x_adv: torch.Tensor, y: torch.Tensor,
               ref: Optional[torch.Tensor]) -> torch.Tensor:
        """Higher is a better result: misclassified first, then the loss (its negative for descent)."""
        logits = model(x_adv)
        loss = self.loss_fn(logits, y, ref).float()
        if self.descent:
            return -loss
        return loss + 1e6 * (logits.argmax(1) != y).float()

    def describe(self) -> dict:
        """The protocol, for results files."""
        loss = self.loss if isinstance(self.loss, str) else getattr(self.loss, "__name__", "custom")
        return {"eps": self.eps, "step_size": self.step_size, "steps": self.steps, "norm": self.norm,
                "loss": loss, "descent": self.descent, "random_start": self.random_start,
                "init_scale": self.init_scale, "project": self.project, "restarts": self.restarts,
                "bn_mode": self.bn_mode}
