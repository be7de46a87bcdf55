"""Single-step (fast) adversarial training: FGSM-AT, FGSM-RS, N-FGSM and GradAlign.

Each adversary is the one `PGD` engine with steps=1 and a few arguments fixed, l-inf (or l2) in
pixel units on images in [0, 1]. The step is `step_scale * eps`, so the threat's PGD `step_size`
and `steps` (recorded, shared with the multi-step methods) are not used by these recipes.

    fgsm-at   Goodfellow et al. 2015: zero start, one step of eps.
    fgsm-rs   Wong et al. 2020 ("Fast is better than free"): uniform start in the eps-ball,
              one step of 1.25 eps, projected back to the eps-ball.
    n-fgsm    de Jorge et al. 2022 ("Make some noise"): uniform noise in the 2 eps-ball, one step
              of eps, NO projection to the eps-ball (only to [0, 1]): perturbations up to 3 eps.
    gradalign Andriushchenko & Flammarion 2020 ("Understanding and improving fast adversarial
              training"): FGSM-AT plus lambda * (1 - cos(grad_x CE(x), grad_x CE(x + eta))).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..attacks import PGD
from ..errors import UsageError
from ..values import setting
from .base import METHODS, Crafted, Metrics, mean_acc
from .pgd_at import PGDAT

# Recipes whose adversary can host the universal inverse perturbation (uiat-fgsm).
HOSTS = ("fgsm-at", "fgsm-rs", "n-fgsm")


@dataclasses.dataclass
class SingleStep(PGDAT):
    """Base of the single-step recipes: CE(f(x'), y) with x' from one step of the engine.

    random_start: start from uniform noise in the init_scale * eps ball. init_scale: radius of the
    start in units of eps. step_scale: the step in units of eps. project: project the step back to
    the eps-ball (False: N-FGSM, only [0, 1] clipping).
    """

    random_start: bool = True
    init_scale: float = setting(1.0, bounds="[0, inf)")
    step_scale: float = setting(1.25, bounds="(0, inf)")
    project: bool = True

    def attack(self, **overrides: Any) -> PGD:
        """The one-step adversary; the step is step_scale * eps (eps may be ramped by the trainer)."""
        kw: dict[str, Any] = dict(steps=1, step_size=self.step_scale * self.threat.eps, random_start=self.random_start,
                  init_scale=self.init_scale, project=self.project)
        kw.update(overrides)
        return super().attack(**kw)


@METHODS.register("fgsm-at", help="FGSM adversarial training: zero start, one step of eps (Goodfellow et al. 2015)")
@dataclasses.dataclass
class FGSMAT(SingleStep):
    """Goodfellow et al. 2015, "Explaining and Harnessing Adversarial Examples". L = CE(f(x'), y),
    x' = clip(x + eps * sign(grad_x CE(f(x), y))). Defaults: no random start, step_scale 1.0.
    Known to overfit catastrophically at eps 8/255 on CIFAR-10 (Wong et al. 2020)."""

    random_start: bool = False
    step_scale: float = setting(1.0, bounds="(0, inf)")


@METHODS.register("fgsm-rs", help="FGSM with random start, step 1.25 eps, projected (Wong et al. 2020)")
@dataclasses.dataclass
class FGSMRS(SingleStep):
    """Wong, Rice & Kolter 2020, "Fast is better than free". Uniform start in the eps-ball, one step
    of 1.25 eps (step_scale), projection to the eps-ball and [0, 1]. L = CE(f(x'), y)."""


@METHODS.register("n-fgsm", help="N-FGSM: noise in 2 eps, step eps, no projection (de Jorge et al. 2022)")
@dataclasses.dataclass
class NFGSM(SingleStep):
    """de Jorge et al. 2022, "Make Some Noise: Reliable and Efficient Single-Step Adversarial Training".
    Uniform noise in the init_scale * eps ball (2.0), one step of step_scale * eps (1.0), no projection
    to the eps-ball (clipped to [0, 1] only), so ||x' - x||inf <= 3 eps. L = CE(f(x'), y)."""

    init_scale: float = setting(2.0, bounds="[0, inf)")
    step_scale: float = setting(1.0, bounds="(0, inf)")
    project: bool = False


def input_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor, create_graph: bool) -> torch.Tensor:
    """grad_x CE(f(x), y) (batch mean); with create_graph the result is differentiable in the weights."""
    x = x.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(F.cross_entropy(model(x), y), x, create_graph=create_graph)
    return grad


def alignment_penalty(g1: torch.Tensor, g2: torch.Tensor) -> torch.Tensor:
    """1 - mean_i cos(g1_i, g2_i) over the examples whose two gradients are both nonzero (as the
    authors' code, which drops examples with a zero gradient); 0 when there are none."""
    a, b = (g.flatten(1).to(torch.promote_types(g.dtype, torch.float32)) for g in (g1, g2))  # fp16 -> fp32
    na = a.pow(2).sum(1).clamp_min(1e-30).sqrt()  # clamp: a finite derivative at zero gradients
    nb = b.pow(2).sum(1).clamp_min(1e-30).sqrt()
    cos = (a * b).sum(1) / (na * nb)
    valid = ((a != 0).any(1) & (b != 0).any(1)).float()
    return (1 - cos).mul(valid).sum() / valid.sum().clamp_min(1)


FIRST_GRADS = ("detached", "graph")


def default_align_lambda(eps: float) -> float:
    """The authors' rule for GradAlign's weight: 0.02 * 10^(eps * 255 / 8), i.e. 0.2 at 8/255 and 2.0 at
    16/255 (their scripts for other radii); rounded to 12 significant digits so that 8/255 gives 0.2 exactly."""
    return float(f"{0.02 * 10 ** (eps * 255 / 8):.12g}")


@METHODS.register("gradalign", help="FGSM + gradient-alignment regulariser, lambda 0.02*10^(eps*255/8) "
                  "(Andriushchenko & Flammarion 2020)")
@dataclasses.dataclass
class GradAlign(SingleStep):
    """Andriushchenko & Flammarion 2020, "Understanding and Improving Fast Adversarial Training".

        L = CE(f(x'), y) + align_lambda * (1 - cos(g1, g2)),  g1 = grad_x CE(f(x), y), g2 = grad_x CE(f(x + eta), y)

    x' is FGSM with zero start and step eps (their CIFAR-10 command: --attack=fgsm --attack_init=zero), from
    g1; eta is uniform in the eps-ball (clipped so that x + eta stays in [0, 1]). The cosine is averaged over
    the examples whose two gradients are nonzero.
    first_grad: "detached" (default, the authors' code: g1 is a constant, only g2 is double-backpropagated)
      or "graph" (iat 0.1: g1 is differentiated too, which roughly doubles the regulariser's weight gradient).
    align_lambda: the regulariser's weight; default (None) the authors' rule 0.02 * 10^(eps*255/8) from the run's
    eps (0.2 at 8/255, 2.0 at 16/255; fitted to CIFAR-10), resolved once when the method is built, so results
    files record the value used; an explicit value wins. The gradients are computed in the model's current
    (train) mode.
    """

    random_start: bool = False
    step_scale: float = setting(1.0, bounds="(0, inf)")
    align_lambda: Optional[float] = setting(None, bounds="[0, inf)")
    first_grad: str = "detached"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.align_lambda is None:  # from the run's eps (not the warm-up's ramped one: built before it)
            self.align_lambda = default_align_lambda(self.threat.eps)
        if self.first_grad not in FIRST_GRADS:
            raise UsageError(f"first_grad must be one of {FIRST_GRADS}, got {self.first_grad!r}")

    def craft(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Crafted:
        """x' (FGSM from g1), g1 itself (a constant of the regulariser) and x + eta."""
        if self.first_grad == "graph":
            raise NotImplementedError("with first_grad 'graph' the regulariser differentiates through the gradient "
                                      "that crafts x', so crafting and objective are one step: call loss()")
        fgsm = self.attack()
        delta0 = fgsm.init_delta(x)
        g1 = input_gradient(model, x + delta0, y, create_graph=False)
        x_adv = (x + fgsm.step(x, delta0, g1)).detach()  # the engine's step, from the same gradient
        eta = self.attack(random_start=True, init_scale=1.0).init_delta(x)
        return {"x_adv": x_adv, "g1": g1, "x_eta": (x + eta).detach()}

    def objective(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                  crafted: Crafted) -> tuple[torch.Tensor, Metrics]:
        """CE(f(x'), y) + align_lambda * (1 - cos(g1, g2)), g2 differentiable in the weights."""
        g2 = input_gradient(model, crafted["x_eta"], y, create_graph=True)
        return self._total(model, crafted["x_adv"], y, alignment_penalty(crafted["g1"], g2))

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, Metrics]:
        """As Method.loss; first_grad "graph" crafts and differentiates g1 in one pass."""
        if self.first_grad == "detached":
            return super().loss(model, x, y)
        fgsm = self.attack()  # "graph": g1 keeps its graph, so it is crafted and differentiated in one pass
        delta0 = fgsm.init_delta(x)
        g1 = input_gradient(model, x + delta0, y, create_graph=True)
        x_adv = (x + fgsm.step(x, delta0, g1.detach())).detach()
        eta = self.attack(random_start=True, init_scale=1.0).init_delta(x)
        g2 = input_gradient(model, x + eta, y, create_graph=True)
        return self._total(model, x_adv, y, alignment_penalty(g1, g2))

    def _total(self, model: nn.Module, x_adv: torch.Tensor, y: torch.Tensor,
               reg: torch.Tensor) -> tuple[torch.Tensor, Metrics]:
        assert self.align_lambda is not None, "resolved from eps in __post_init__"
        logits = model(x_adv)
        ce = F.cross_entropy(logits, y)
        loss = ce + self.align_lambda * reg
        return loss, {"loss": loss.detach(), "ce": ce.detach(), "cos": 1 - reg.detach(),
                      "acc_adv": mean_acc(logits, y)}
