"""The training loop: the only code that touches the optimizer, scheduler and checkpoints.

A run directory holds config.json (the resolved config), metrics.jsonl (one line per epoch) and
checkpoints/{last,best}.safetensors. `last` is the full training state (resumable); `best` holds the
weights with the highest robust accuracy on the held-out validation split.
"""
from __future__ import annotations

import json
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn
from tqdm import tqdm

from .. import config as C
from . import distributed, speed
from ..attacks import create_attack
from .checkpoint import atomic_write_text, load_checkpoint, save_checkpoint
from ..data import BatchLoader, DataBundle, load_dataset, train_val_split
from ..evaluation.accuracy import robust_accuracy
from ..methods import Method, create_method
from ..models import create_model
from ..errors import UsageError
from ..evaluation.loading import model_spec_for
from .device import resolve_device, rng_state, seed_everything, set_rng_state
from ..evaluation.sanity import check_class_coverage

SCHEDULES = ("piecewise", "cosine", "cyclic", "constant")


def lr_factor(cfg: C.OptimConfig, total_steps: int) -> Callable[[int], float]:
    """Multiplier of the base lr at optimizer step t (schedules are per step, not per epoch)."""
    if cfg.schedule not in SCHEDULES:
        raise UsageError(f"unknown lr schedule {cfg.schedule!r}; choose one of: {', '.join(SCHEDULES)}")
    total = max(total_steps, 1)

    def factor(t: int) -> float:
        frac = t / total
        if cfg.schedule == "piecewise":
            return cfg.gamma ** sum(frac >= m for m in cfg.milestones)
        if cfg.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))
        if cfg.schedule == "cyclic":
            return frac / cfg.peak if frac < cfg.peak else max(0.0, (1 - frac) / (1 - cfg.peak))
        return 1.0

    return factor


def make_optimizer(o: C.OptimConfig, model: nn.Module) -> torch.optim.Optimizer:
    if o.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=o.lr, momentum=o.momentum,
                               weight_decay=o.weight_decay, nesterov=o.nesterov)
    if o.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=o.lr, weight_decay=o.weight_decay)
    raise UsageError(f"unknown optimizer {o.optimizer!r}; choose sgd or adam")


def model_spec(cfg: C.TrainConfig, bundle: DataBundle) -> dict[str, Any]:
    """Everything needed to rebuild the model from a checkpoint."""
    return model_spec_for(cfg.model, bundle)


def build_method(cfg: C.TrainConfig) -> Method:
    t = cfg.threat
    threat = dict(eps=t.eps, step_size=t.step_size, steps=t.steps, norm=t.norm)
    if t.bn_mode is not None:  # else the method's own default (train for PGD-AT/IAT, eval for TRADES/MART)
        threat["bn_mode"] = t.bn_mode
    return create_method(cfg.method, **{**threat, **cfg.method_options})


def validate_config(cfg: C.TrainConfig) -> None:
    """Check the values no component checks for itself, before any work starts."""
    o = cfg.optim
    if o.epochs < 1:
        raise UsageError(f"epochs must be at least 1, got {o.epochs}")
    if o.batch_size < 1:
        raise UsageError(f"batch size must be at least 1, got {o.batch_size}")
    if not o.lr > 0:
        raise UsageError(f"learning rate must be positive, got {o.lr}")
    if not 0 <= cfg.threat.eps_warmup < 1:
        raise UsageError(f"threat.eps_warmup is a fraction of training in [0, 1), got {cfg.threat.eps_warmup}")
    if cfg.data.augment not in ("auto", "none", "crop-flip", "crop"):
        raise UsageError(f"data.augment must be auto, none, crop-flip or crop, got {cfg.data.augment!r}")
    lr_factor(o, 1)
    speed.validate(cfg.speed)


# What a resumed run may change: where it runs and what it prints, never its arithmetic.
RESUME_MAY_CHANGE = ("config.device", "config.progress", "config.data.root", "config.data.download",
                     "config.checkpoint_every_steps")


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _flat(sub, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): tree}


def run_identity(resolved: dict[str, Any]) -> dict[str, Any]:
    """Dotted key -> value of everything that must stay the same when a run resumes.

    The config (method options as the method resolved them), the model spec and the split sizes;
    compared after a JSON round trip, the form in which config.json and checkpoints keep them.
    """
    data = resolved.get("data") or {}
    tree = {"config": resolved.get("config"), "method": resolved.get("method"), "model": resolved.get("model"),
            "data": {k: data.get(k) for k in ("name", "train", "val", "test")}}
    flat = _flat(json.loads(json.dumps(tree)))
    return {k: v for k, v in flat.items()
            if k not in RESUME_MAY_CHANGE and not k.startswith("config.method_options.")}


@dataclass
class Progress:
    epoch: int = 0              # epochs completed
    step: int = 0               # batches completed within the current epoch
    global_step: int = 0
    best_robust: float = -1.0
    best_epoch: int = -1
    elapsed: float = 0.0        # training seconds so far, across resumes
    history: list = field(default_factory=list)
    epoch_sums: dict = field(default_factory=dict)  # metric sums over the current epoch's batches so far


class Trainer:
    """Builds everything from a TrainConfig and runs (or resumes) training into `out`."""

    def __init__(self, cfg: C.TrainConfig, out: Path, bundle: Optional[DataBundle] = None) -> None:
        validate_config(cfg)
        self.cfg, self.out = cfg, Path(out)
        self.dist, self.device = distributed.setup(resolve_device(cfg.device))  # torchrun: join the group
        seed_everything(cfg.seed)
        self.bundle = bundle or load_dataset(cfg.data.name, cfg.data.root, download=cfg.data.download)
        self.train_split, self.val_split = train_val_split(self.bundle.train, cfg.data.val_size, cfg.seed)
        n_val = min(cfg.val.n_examples, len(self.val_split))
        if n_val and self.dist.is_main:  # validation scores the first n_val held-out examples: every class?
            coverage = check_class_coverage(self.val_split.y[:n_val], self.bundle.train.y, "validation")
            if coverage.status == "warn":
                warnings.warn(coverage.message, stacklevel=2)
        self.loader = self._loader()
        self.spec = model_spec(cfg, self.bundle)
        self.model = create_model(cfg.model, **{k: v for k, v in self.spec.items() if k != "name"}).to(self.device)
        self.method = build_method(cfg)
        self.method.attack()  # checks eps, step size and steps now rather than at the first step
        o = cfg.optim
        speed.prepare_model(self.model, cfg.speed)
        self.optimizer = make_optimizer(o, self.model)
        # self.model is what checkpoints and validation use; the training forward goes through the
        # DDP wrapper (and torch.compile) when asked for.
        self.train_model = speed.maybe_compile(distributed.wrap(self.model, self.device), cfg.speed)
        self.scaler = speed.grad_scaler(self.device, cfg.speed.amp)
        total = o.epochs * len(self.loader)
        self.warmup_steps = int(cfg.threat.eps_warmup * total)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_factor(o, total))
        self.val_attacks = {"natural": create_attack("natural"), "robust": self._val_attack()}
        self.progress = Progress()

    def _loader(self) -> BatchLoader:
        c, n, batch = self.bundle.train.x.shape[1], len(self.train_split), self.cfg.optim.batch_size
        if batch > n:
            raise UsageError(f"batch size {batch} is larger than the training split ({n} examples after holding "
                             f"out {len(self.val_split)} for validation); lower the batch size or val_size")
        augment = self.cfg.data.augment
        if augment == "auto":
            augment = "crop-flip" if c == 3 else "none"
        world = self.dist.world_size  # optim.batch_size is the global batch, split evenly over the ranks
        if batch % world:
            raise UsageError(f"batch size {batch} (the global batch) must be divisible by the {world} processes")
        return BatchLoader(self.train_split, batch // world, shuffle=True, seed=self.cfg.seed,
                           augment=augment != "none", flip=augment == "crop-flip", device=self.device,
                           drop_last=True, rank=self.dist.rank, world_size=world)

    def _val_attack(self):
        t, v = self.cfg.threat, self.cfg.val
        return create_attack(v.attack, eps=t.eps, steps=v.steps, norm=t.norm)

    def resolved(self) -> dict[str, Any]:
        """The config as run: every default filled in, the method's resolved options, the data copy."""
        return {"config": C.to_dict(self.cfg), "method": {"name": self.cfg.method, **self.method.options()},
                "model": self.spec, "data": {"name": self.bundle.name, "source": self.bundle.source,
                "train": len(self.train_split), "val": len(self.val_split), "test": len(self.bundle.test)},
                "val_attack": self.val_attacks["robust"].describe(), "device": str(self.device),
                "torch": torch.__version__}

    # ----------------------------------------------------------------- checkpoints
    def state(self) -> dict[str, Any]:
        p = self.progress
        return {"kind": "train-state", "resolved": self.resolved(), "model_spec": self.spec,
                "model": self.model.state_dict(), "method_state": self.method.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(), "rng": rng_state(),
                "progress": {**vars(p), "epoch_sums": distributed.rank_mean(p.epoch_sums)}}

    def save(self) -> None:
        """Every rank calls this (the epoch sums are averaged over ranks); rank 0 writes, the others wait."""
        self._check_weights()
        state = self.state()
        if self.dist.is_main:
            save_checkpoint(self.out / "checkpoints" / "last.safetensors", state)
        distributed.barrier()

    def save_best(self) -> None:
        self._check_weights()
        if self.dist.is_main:
            save_checkpoint(self.out / "checkpoints" / "best.safetensors", {
                "kind": "model", "resolved": self.resolved(), "model_spec": self.spec,
                "model": self.model.state_dict(), "method_state": self.method.state_dict(),
                "progress": vars(self.progress).copy()})
        distributed.barrier()

    def resume(self) -> None:
        """Restore everything from checkpoints/last.safetensors: the run continues bit for bit.

        Nothing is written until the checkpoint has loaded and matches this run's settings.
        """
        path = self.out / "checkpoints" / "last.safetensors"
        state = load_checkpoint(path)
        if state.get("kind") != "train-state":
            raise UsageError(f"{path} is not a training state (kind {state.get('kind')!r}), so it cannot be resumed")
        self.check_same_run(state.get("resolved") or {}, path)
        try:
            self.model.load_state_dict(state["model"])
            self.method.load_state_dict(state["method_state"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            if state.get("scaler"):
                self.scaler.load_state_dict(state["scaler"])
            progress = Progress(**state["progress"])
            set_rng_state(state["rng"])
        except UsageError:
            raise
        except (KeyError, RuntimeError, ValueError, TypeError) as err:
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise UsageError(f"checkpoint {path} cannot be resumed ({first}); it is damaged or from "
                             "another version of iat") from None
        progress.epoch_sums = {k: v.to(self.device) for k, v in progress.epoch_sums.items()}
        self.progress = progress
        if self.dist.is_main:
            self._trim_metrics()
        distributed.barrier()

    def check_same_run(self, saved: dict[str, Any], source: Path) -> None:
        """Refuse to continue a run with settings other than those it was trained with."""
        old, new = run_identity(saved), run_identity(self.resolved())
        diff = [k for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k)]
        if diff:
            k, more = diff[0], f" (and {len(diff) - 1} more differences)" if len(diff) > 1 else ""
            raise UsageError(f"cannot resume {self.out}: {k} would be {new.get(k)!r} but {source} was trained "
                             f"with {old.get(k)!r}{more}; drop what changes it, or start a new run elsewhere")

    def _trim_metrics(self) -> None:
        """Keep the metric lines of epochs the checkpoint includes: later ones, and a line torn by a kill, go."""
        metrics = self.out / "metrics.jsonl"
        if not metrics.exists():
            return
        keep = []
        for line in metrics.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            epoch = record.get("epoch") if isinstance(record, dict) else None
            if isinstance(epoch, int) and epoch <= self.progress.epoch:
                keep.append(line)
        atomic_write_text(metrics, "".join(line + "\n" for line in keep))

    # ----------------------------------------------------------------- training
    def fit(self) -> dict[str, Any]:
        cfg = self.cfg
        if self.dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.out / "config.json", json.dumps(self.resolved(), indent=2) + "\n")
        distributed.barrier()
        while self.progress.epoch < cfg.optim.epochs:
            epoch = self.progress.epoch
            t0 = time.perf_counter()
            train_metrics = self.train_epoch(epoch)
            train_time = time.perf_counter() - t0
            self.progress.elapsed += train_time
            record = self.end_epoch(epoch, train_metrics, train_time)
            if self.dist.is_main:
                tqdm.write(self.summary_line(record))
        return {"best_epoch": self.progress.best_epoch, "best_val_robust": self.progress.best_robust,
                "epochs": self.progress.epoch, "train_seconds": self.progress.elapsed}

    def train_epoch(self, epoch: int) -> dict[str, float]:
        p, cfg = self.progress, self.cfg
        self.model.train()
        if p.step == 0:
            p.epoch_sums = {}
        sums = p.epoch_sums  # kept in the progress, so an epoch resumed mid-way reports the whole epoch's means
        bad_step = torch.full((), -1, dtype=torch.long, device=self.device)
        bar = tqdm(total=len(self.loader), initial=p.step, desc=f"epoch {epoch + 1}/{cfg.optim.epochs}",
                   disable=not (cfg.progress and self.dist.is_main), leave=False, unit="batch")
        for x, y in self.loader.batches(epoch, start=p.step):
            loss, metrics = self.train_step(x, y)
            bad_step = torch.where((bad_step < 0) & ~torch.isfinite(loss.detach()),
                                   torch.tensor(p.step, device=self.device), bad_step)
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0) + v.float()
            p.step += 1
            p.global_step += 1
            bar.update(1)
            if p.step % 20 == 0 or p.step == len(self.loader):
                self._check_finite(bad_step, epoch)
                bar.set_postfix({k: f"{float(v) / p.step:.3f}" for k, v in sums.items()})
            if cfg.checkpoint_every_steps and p.step % cfg.checkpoint_every_steps == 0 and p.step < len(self.loader):
                self._check_finite(bad_step, epoch)
                self.save()
        bar.close()
        self._check_finite(bad_step, epoch)
        return {k: float(v) / max(p.step, 1) for k, v in distributed.rank_mean(sums).items()}

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if self.warmup_steps:
            self.ramp_eps(self.progress.global_step)
        model, amp = self.train_model, self.cfg.speed.amp
        x = speed.prepare_input(x, self.cfg.speed)
        with self.method.step_context(model):
            with speed.autocast(self.device, amp), distributed.sharded_noise():
                loss, metrics = self.method.loss(model, x, y)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()  # DDP averages the gradients over ranks here
            self.method.after_backward(model)
            if self.cfg.optim.grad_clip > 0:
                self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        self.scheduler.step()
        return loss, metrics

    def ramp_eps(self, step: int) -> None:
        """eps warm-up: eps and step size grow linearly to their targets (a recorded option, off by default)."""
        t = self.cfg.threat
        f = min(1.0, (step + 1) / self.warmup_steps)
        self.method.eps, self.method.step_size = t.eps * f, t.step_size * f

    def _check_weights(self) -> None:
        """A step with a finite loss can still leave inf/NaN weights (a huge lr); never checkpoint those."""
        tensors = [w for w in self.model.state_dict().values() if w.is_floating_point()]
        if bool(torch.stack([torch.isfinite(w).all() for w in tensors]).all()):
            return
        p = self.progress
        where = f"epoch {p.epoch + 1}, step {p.step}" if p.step else f"the end of epoch {p.epoch}"
        raise UsageError(f"non-finite weights at {where}; training stopped, the last good checkpoint is kept in "
                         f"{self.out / 'checkpoints'} (try a lower learning rate)")

    def _check_finite(self, bad_step: torch.Tensor, epoch: int) -> None:
        if self.dist.enabled:  # the first bad step of any rank, so that every rank stops together
            never = torch.iinfo(torch.long).max
            first = distributed.all_reduce_(torch.where(bad_step < 0, never, bad_step), "min")
            bad_step = torch.where(first == never, -1, first)
        step = int(bad_step)
        if step >= 0:
            raise UsageError(f"non-finite loss at epoch {epoch + 1}, step {step + 1}; training stopped, the last "
                             f"good checkpoint is kept in {self.out / 'checkpoints'} (try a lower learning rate)")

    def end_epoch(self, epoch: int, train_metrics: dict[str, float], train_time: float) -> dict[str, Any]:
        p = self.progress
        n_val = min(self.cfg.val.n_examples, len(self.val_split))
        acc = robust_accuracy(self.model, self.val_split.x[:n_val], self.val_split.y[:n_val], self.val_attacks,
                              batch_size=self.cfg.val.batch_size).rates()
        acc = distributed.from_main(acc, self.device)  # every rank validates; rank 0's numbers decide
        p.epoch, p.step = epoch + 1, 0
        record = {"epoch": epoch + 1, "lr": self.optimizer.param_groups[0]["lr"],
                  "train": train_metrics, "val_natural": acc["natural"], "val_robust": acc["robust"],
                  "val_examples": n_val, "epoch_seconds": train_time,
                  "images_per_second": len(self.loader) * self.cfg.optim.batch_size / max(train_time, 1e-9)}
        from .monitor import check_overfitting  # catastrophic-overfitting monitor: val_fgsm, co_detected
        record.update(check_overfitting(self, acc["robust"]))  # before best_robust counts this epoch
        if acc["robust"] > p.best_robust:
            p.best_robust, p.best_epoch = acc["robust"], epoch + 1
            self.save_best()
        record["best_epoch"] = p.best_epoch
        p.history.append({"epoch": epoch + 1, "val_natural": acc["natural"], "val_robust": acc["robust"],
                          "val_fgsm": record["val_fgsm"]})
        if self.dist.is_main:
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
                f.flush()
                os.fsync(f.fileno())  # on disk before the checkpoint that counts this epoch as done
        self.save()
        return record

    def summary_line(self, r: dict[str, Any]) -> str:
        train = " ".join(f"{k} {v:.3f}" for k, v in r["train"].items())
        return (f"epoch {r['epoch']}/{self.cfg.optim.epochs}  {train}  val natural {r['val_natural']:.2%}  "
                f"val {self.cfg.val.attack}-{self.cfg.val.steps} {r['val_robust']:.2%}  "
                f"({r['epoch_seconds']:.0f}s, {r['images_per_second']:.0f} img/s)")
