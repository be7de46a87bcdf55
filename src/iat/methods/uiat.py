"""Single-step inverse adversarial training with a universal inverse perturbation (Dong et al. 2023).

    L = CE(f(x'), y) + beta * KL( p(x') || p(x~) ),   x~ = clip_[0,1](x + U[y])

x' is a single-step adversary (FGSM-RS by default), begun at the host's own start (start="random") or at
x~ (start="inverse": one input-gradient pass at x~ gives the FGSM direction, U's gradient and the teacher).
U holds one l-inf perturbation per class, kept across batches and epochs and saved in checkpoints; after
each backward pass, for every class c present in the batch (docs/METHOD.md, "Single-step method"):

    g_c = mean of the examples' input gradients at x~,  m_c <- mu * m_c + g_c / ||g_c||_1,
    U[c] <- clip(U[c] - step_size_inv * sign(m_c), -eps_inv, eps_inv)       (descent: more confident in y)
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..attacks import PGD, crafting_mode, kl_div
from ..attacks.engine import unwrap
from ..errors import UsageError
from ..runtime.distributed import all_reduce_
from ..threat import ThreatModel
from ..values import setting
from .base import METHODS, Crafted, Method, Metrics, mean_acc, resolve
from .single_step import HOSTS

INVERSE_GRADS = ("ce", "kl")
STARTS = ("random", "inverse", "inverse-noise")
CRAFTED_STARTS = ("inverse", "inverse-noise")  # the starts whose one crafting pass also serves U and the teacher


class UniversalPerturbation:
    """Class-wise universal perturbation U (C x input shape) and its momentum, created lazily."""

    def __init__(self) -> None:
        self.delta: Optional[torch.Tensor] = None
        self.momentum: Optional[torch.Tensor] = None

    def ensure(self, x: torch.Tensor, num_classes: int) -> None:
        """Zeros on the first batch; after a checkpoint load, move next to x and check the shape."""
        shape = (num_classes, *x.shape[1:])
        if self.delta is None or self.momentum is None:
            self.delta = torch.zeros(shape, device=x.device)
            self.momentum = torch.zeros(shape, device=x.device)
        elif tuple(self.delta.shape) != shape:
            raise UsageError(f"the universal inverse perturbation has shape {tuple(self.delta.shape)}, "
                             f"but this model and data need {shape} (classes x input shape)")
        elif self.delta.device != x.device:
            self.delta, self.momentum = self.delta.to(x.device), self.momentum.to(x.device)

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """U and its momentum; they exist from the first batch on (`ensure`) or a checkpoint load."""
        if self.delta is None or self.momentum is None:
            raise RuntimeError("the universal inverse perturbation is used before ensure() created it")
        return self.delta, self.momentum

    def inverse_example(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x~ = clip(x + U[y], 0, 1), detached (a leaf)."""
        delta, _ = self.tensors()
        return (x.detach() + delta[y].to(x.dtype)).clamp(0, 1)

    def class_stats(self, grad: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-class gradient sums and counts in ONE (C, D + 1) tensor: all-reduce it under DDP."""
        delta, _ = self.tensors()
        rows = torch.cat([grad.detach().flatten(1).float(), grad.new_ones(len(y), 1, dtype=torch.float32)], 1)
        stats = torch.zeros(delta.shape[0], rows.shape[1], device=grad.device)
        return stats.index_add_(0, y, rows)

    @torch.no_grad()
    def apply(self, stats: torch.Tensor, step_size: float, mu: float, eps: float) -> torch.Tensor:
        """The momentum sign-descent step for the classes with at least one example (vectorised).

        A class whose statistics are not finite (an fp16 overflow step: the GradScaler skips that optimizer
        step too) keeps its U and momentum; returns whether any class was skipped (a tensor, no host sync).
        """
        delta, momentum = self.tensors()
        sums, counts = stats[:, :-1], stats[:, -1:]
        finite = torch.isfinite(stats).all(1, keepdim=True)
        g = torch.where(finite, sums, 0) / counts.clamp_min(1)
        g = g / g.abs().sum(1, keepdim=True).clamp_min(1e-12)
        present = ((counts > 0) & finite).view(-1, *([1] * (delta.dim() - 1)))
        m = torch.where(present, mu * momentum + g.view_as(momentum), momentum)
        u = (delta - step_size * m.sign()).clamp(-eps, eps)
        self.momentum, self.delta = m, torch.where(present, u, delta)
        return ((counts > 0) & ~finite).any()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """U and its momentum for a checkpoint ({} before the first batch)."""
        if self.delta is None or self.momentum is None:
            return {}
        return {"universal": self.delta, "momentum": self.momentum}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore U and its momentum from a checkpoint ({}: start again from zeros on the next batch)."""
        if not state:
            self.delta = self.momentum = None
            return
        if set(state) != {"universal", "momentum"} or state["universal"].shape != state["momentum"].shape:
            raise UsageError("uiat checkpoint state must hold universal and momentum of one shape, "
                             f"got {sorted(state)}")
        self.delta, self.momentum = state["universal"].float().clone(), state["momentum"].float().clone()


@METHODS.register("uiat-fgsm",
                  help="single-step IAT: FGSM-RS + beta KL(p(x') || p(x + U[y])), universal inverse perturbation")
@dataclasses.dataclass
class UIATFGSM(Method):
    """Universal inverse adversarial training on a single-step host (Dong et al. 2023), l-inf.

    host: the adversary, "fgsm-rs" (default), "fgsm-at" or "n-fgsm" with its recipe's defaults.
    beta: KL weight, 3.5 — the paper gives no value for the single-step method, so we keep the
      multi-step recipe's, which weighs the same KL(p(x') || p(x~)) term (an untuned choice).
    eps_inv: radius of U (default eps). step_size_inv: eta, U's step (default eps_inv / 4, i.e. 2/255
      at 8/255, the presets' step convention, so it scales with the data's eps). mu: momentum (0.9).
    num_classes: rows of U (default: the model's output width, read on the first batch).
    inverse_grad: the gradient at x~ that drives U.
      "ce" (default, METHOD.md): grad_x~ CE(f(x~), y), from the forward pass the loss already makes,
        with one extra input-only backward through the x~ branch (no weight gradients, no forward).
      "kl": x~.grad left by the training backward: beta * grad_x~ KL(p(x') || p(x~)). Free, but
        descending it moves p(x~) towards the adversary's prediction rather than towards y.
    detach_inverse: p(x~) is a fixed teacher (no weight gradient through the x~ branch; cheaper).
    start: where the host's single step begins. "random" (default): the host's own start (uniform noise for
      fgsm-rs and n-fgsm, x for fgsm-at), and x~ costs a training forward of its own. "inverse": at x~. ONE
      input-gradient pass g = grad_x~ CE(f(x~), y) (crafting mode, the host's bn_mode) serves three things:
      x' = the host's step from x~ (alpha = the host's step_scale * eps, +alpha sign(g), projected to the
      eps-ball around x unless the host does not project, as n-fgsm; then [0, 1]); U's update descends g
      (the rule above, inverse_grad "ce"); and its logits, detached, are the teacher p(x~), so detach_inverse
      is implied. Cost: the host's own two forward+backward passes plus element-wise work.
      "inverse-noise": as "inverse", begun at x + U[y] plus the host's uniform noise (fgsm-rs: in the eps-ball,
      n-fgsm: in 2 eps; fgsm-at, which has none, takes fgsm-rs's), projected into the eps-ball around x (n-fgsm:
      its noise ball) and [0, 1]. It keeps the random start that FGSM-RS relies on against catastrophic
      overfitting, at the same cost; the one pass is at that noisy start, so U's gradient and the teacher are
      taken there (the teacher is p(x + U[y] + noise), not p(x~)).
    Metric u_skipped: the fraction of steps whose U update (reported one step later) met a class with
    non-finite gradient statistics (an fp16 overflow step) and left that class's U and momentum as they were.
    """

    host: str = "fgsm-rs"
    beta: float = setting(3.5, bounds="[0, inf)")
    eps_inv: Optional[float] = setting(None, bounds="[0, 1]")
    step_size_inv: Optional[float] = setting(None, bounds="(0, inf)")
    mu: float = setting(0.9, bounds="[0, 1)")
    num_classes: Optional[int] = setting(None, bounds="[2, 1e9]")
    inverse_grad: str = "ce"
    detach_inverse: bool = False
    start: str = "random"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.host not in HOSTS:
            raise UsageError(f"host must be one of {HOSTS}, got {self.host!r}")
        if self.start not in STARTS:
            raise UsageError(f"start must be one of {STARTS}, got {self.start!r}")
        if self.start in CRAFTED_STARTS:
            if self.inverse_grad != "ce":
                raise UsageError("start 'inverse' drives U with the crafting gradient of CE at x~: "
                                 f"inverse_grad must be 'ce', got {self.inverse_grad!r}")
            self.detach_inverse = True  # the teacher p(x~) comes from the crafting pass (recorded as such)
        if self.inverse_grad not in INVERSE_GRADS:
            raise UsageError(f"inverse_grad must be one of {INVERSE_GRADS}, got {self.inverse_grad!r}")
        if self.inverse_grad == "kl" and self.detach_inverse:
            raise UsageError("inverse_grad 'kl' needs the gradient through p(x~); "
                             "it cannot be used with detach_inverse")
        if self.threat.norm != "linf":
            raise UsageError("uiat-fgsm's universal perturbation is l-inf only")
        self.universal = UniversalPerturbation()
        self._pending: Optional[tuple[torch.Tensor, torch.Tensor]] = None
        self._skipped = torch.zeros(())  # whether the previous step's U update skipped a non-finite class

    @classmethod
    def build(cls, threat: ThreatModel, **options: Any) -> Method:
        """As Method.build; an explicit detach_inverse=false contradicts start 'inverse' (refused, not overridden)."""
        if options.get("start") in CRAFTED_STARTS and options.get("detach_inverse") is False:
            raise UsageError(f"start {options['start']!r} takes the teacher p(x~) from the crafting pass, "
                             "so it is always detached: drop detach_inverse=false")
        return super().build(threat, **options)

    def attack(self, **overrides: Any) -> PGD:
        """The host recipe's single-step adversary with this method's threat model."""
        host = METHODS.get(self.host)(threat=self.threat, bn_mode=self.bn_mode)
        return host.attack(**overrides)

    def craft(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Crafted:
        """start "random": x' from the host; x~ = x + U[y] costs nothing to craft and is made in the objective
        (U needs the model's output width on the first batch). start "inverse"/"inverse-noise": see
        _craft_from_inverse."""
        if self.start in CRAFTED_STARTS:
            return self._craft_from_inverse(model, x, y)
        return {"x_adv": self.attack()(model, x, y)}

    def _craft_from_inverse(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Crafted:
        """The host's one step, begun at x~: one forward+backward at x~ (parameter gradients off, the host's
        BatchNorm mode) gives the FGSM direction, U's gradient (kept for after_backward) and the teacher."""
        fgsm, net, x = self.attack(), unwrap(model), x.detach()
        if self.universal.delta is None:
            x_inv = x.clone()  # U starts at 0, so x~ = x; its number of rows is known after this pass
        else:
            self.universal.ensure(x, self.universal.delta.shape[0])  # next to x, input shape checked
            x_inv = self.universal.inverse_example(x, y)
        if self.start == "inverse-noise":
            x_inv = self._noisy_start(fgsm, x, x_inv)
        with crafting_mode(net, fgsm.bn_mode):
            x_inv.requires_grad_(True)
            logits_inv = net(x_inv)
            (grad,) = torch.autograd.grad(fgsm.loss_fn(logits_inv, y, None).sum(), x_inv)
        self._ensure(x, logits_inv.shape[1])
        self._pending = (grad, y)
        x_adv = x + fgsm.step(x, x_inv.detach() - x, grad)  # the engine's step: +alpha sign(g), ball, [0, 1]
        return {"x_adv": x_adv.detach(), "logits_inv": logits_inv.detach()}

    def _noisy_start(self, fgsm: PGD, x: torch.Tensor, x_inv: torch.Tensor) -> torch.Tensor:
        """x + U[y] + the host's uniform noise (fgsm-rs's for a host without one), in the host's ball and [0, 1]."""
        noisy = fgsm if fgsm.random_start and fgsm.init_scale > 0 else self.attack(random_start=True, init_scale=1.0)
        radius = fgsm.eps * (1.0 if fgsm.project else max(noisy.init_scale, 1.0))
        delta = ((x_inv - x) + noisy.init_delta(x)).clamp(-radius, radius)
        return (x + delta).clamp(0, 1)

    def _ensure(self, x: torch.Tensor, width: int) -> None:
        """U for a model of `width` logits (created on the first batch, else checked)."""
        if self.num_classes is not None and self.num_classes != width:
            raise UsageError(f"num_classes is {self.num_classes} but the model outputs {width} logits")
        self.universal.ensure(x, width)

    def objective(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                  crafted: Crafted) -> tuple[torch.Tensor, Metrics]:
        """CE(f(x'), y) + beta * KL(p(x') || p(x~)), x~ = x + U[y] (or the crafting pass's teacher)."""
        logits_adv = model(crafted["x_adv"])
        self._ensure(x, logits_adv.shape[1])
        if self.start in CRAFTED_STARTS:
            logits_inv = crafted["logits_inv"]  # the teacher from the crafting pass, detached
        else:
            x_inv = self.universal.inverse_example(x, y).requires_grad_(True)
            logits_inv = self._inverse_logits(model, x_inv, y)
        ce = F.cross_entropy(logits_adv, y)
        kl = kl_div(logits_adv, logits_inv).mean()
        loss = ce + self.beta * kl
        return loss, {"loss": loss.detach(), "ce": ce.detach(), "kl": kl.detach(),
                      "acc_adv": mean_acc(logits_adv, y), "acc_inv": mean_acc(logits_inv, y),
                      "u_skipped": self._skipped.to(loss.device).float()}

    def _inverse_logits(self, model: nn.Module, x_inv: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """f(x~), and the gradient for U's update (kept until after_backward)."""
        if self.detach_inverse:
            with crafting_mode(model, "keep"):  # weights frozen: the graph reaches x~ only
                logits_inv = model(x_inv)
        else:
            logits_inv = model(x_inv)
        if self.inverse_grad == "ce":
            (grad,) = torch.autograd.grad(F.cross_entropy(logits_inv, y), x_inv, retain_graph=not self.detach_inverse)
            self._pending = (grad, y)
        else:
            self._pending = (x_inv, y)  # its .grad is filled by the training backward
        return logits_inv.detach() if self.detach_inverse else logits_inv

    def after_backward(self, model: nn.Module) -> None:
        """Update U from this step's gradient at x~ (no extra forward or backward)."""
        if self._pending is None:
            return
        grad, y = self._pending
        self._pending = None
        if self.inverse_grad == "kl":
            grad = grad.grad if grad.grad is not None else torch.zeros_like(grad)
        eps_inv = resolve(self.eps_inv, self.threat.eps)
        stats = all_reduce_(self.universal.class_stats(grad, y))  # DDP: every rank takes the same step on U
        self._skipped = self.universal.apply(stats, resolve(self.step_size_inv, eps_inv / 4), self.mu, eps_inv)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """U and its momentum (see UniversalPerturbation)."""
        return self.universal.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore U and its momentum from a checkpoint."""
        self.universal.load_state_dict(state)
