"""The training loop: the only code that touches the optimizer, scheduler and checkpoints.

A run directory holds config.json (the resolved config, a RunRecord), metrics.jsonl (one MetricLine per
epoch) and checkpoints/{last,best}.safetensors. `last` is the full training state (resumable); `best` holds the
weights with the highest robust accuracy on the held-out validation split. With optim.ema_decay > 0, best-ema and
last-ema hold EMA weights (training/ema.py).
"""
from __future__ import annotations

import dataclasses
import time
import warnings
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn
from tqdm import tqdm

from .. import config as C
from ..attacks import create_attack
from ..data import DataBundle, load_dataset, train_val_split
from ..errors import UsageError
from ..evaluation.accuracy import robust_accuracy
from ..evaluation.loading import model_spec_for
from ..evaluation.sanity import check_class_coverage
from ..models import create_model
from ..records import MetricLine, RunRecord, append_metric, read_metrics, write_metrics, write_run
from ..runtime import distributed
from ..runtime.checkpoint import load_checkpoint, save_checkpoint
from ..runtime.device import resolve_device, rng_state, seed_everything, set_rng_state
from ..same_run import first_difference
from . import ema, guards, layout, speed
from .board import Board
from .monitor import check_overfitting
from .optim import lr_factor, make_optimizer
from .progress import Progress
from .setup import build_method, make_loader, validate_config
from .step import StepParts, optimizer_step


class Trainer:
    """Builds everything from a TrainConfig and runs (or resumes) training into `out`."""

    def __init__(self, cfg: C.TrainConfig, out: Path, bundle: Optional[DataBundle] = None) -> None:
        validate_config(cfg, own_data=bundle is not None)
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
        self.loader = make_loader(cfg, self.train_split, len(self.val_split), self.dist.rank, self.dist.world_size,
                                  self.device)
        self.spec = model_spec_for(cfg.model, self.bundle)
        self.model = create_model(cfg.model, **{k: v for k, v in self.spec.items() if k != "name"}).to(self.device)
        self.threat = cfg.threat  # the run's one threat model: method, validation and monitor use it
        self.method = build_method(cfg)
        o = cfg.optim
        self.optimizer = make_optimizer(o, self.model)
        self.ema = ema.WeightEMA(self.model, o.ema_decay) if o.ema_decay else None
        self.scaler = speed.grad_scaler(self.device, cfg.speed.amp)
        total = self.total_steps = o.epochs * len(self.loader)
        self.warmup_steps = int(o.eps_warmup * total)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_factor(o, total))
        self.val_attacks = {"natural": create_attack("natural"), "robust": self._val_attack()}
        self.progress = Progress()
        self.board = Board(cfg, self.out, self.dist.is_main)  # TensorBoard events (--tensorboard), else a no-op
        self.train_model: Optional[nn.Module] = None  # set once the layout and compile are known
        self.speed_auto: Optional[dict[str, Any]] = None
        self.saved_at = time.monotonic()  # checkpoint_every_minutes counts from here and from each save
        if "auto" not in (cfg.speed.layout, cfg.speed.compile):
            self.use_speed(cfg.speed.layout, cfg.speed.compile is True)

    def use_speed(self, layout_name: str, compiled: bool, about: Optional[dict[str, Any]] = None) -> None:
        """Put the model in layout `layout_name` (its parameters stay the same objects, so the optimizer keeps
        them) and build the training forward: self.model is what checkpoints and validation use; the training
        forward goes through the DDP wrapper (and torch.compile if `compiled`)."""
        chosen = dataclasses.replace(self.cfg.speed, layout=layout_name, compile=compiled)
        self.cfg = dataclasses.replace(self.cfg, speed=chosen)
        self.speed_auto = about
        speed.prepare_model(self.model, self.cfg.speed)
        # BN layers converted first
        ddp = distributed.wrap(self.model, self.device, sync_bn=self.cfg.distributed.sync_bn)
        self.train_model = speed.maybe_compile(ddp, self.cfg.speed)

    def _val_attack(self):
        return create_attack(self.cfg.val.attack, eps=self.threat.eps, steps=self.cfg.val.steps, norm=self.threat.norm)

    def record(self) -> RunRecord:
        """The config as run: every default filled in, the method's resolved options, the data copy."""
        return RunRecord(config=C.to_dict(self.cfg), method={"name": self.cfg.method, **self.method.options()},
                         model=self.spec, data={"name": self.bundle.name, "source": self.bundle.source,
                         "train": len(self.train_split), "val": len(self.val_split), "test": len(self.bundle.test)},
                         val_attack=self.val_attacks["robust"].describe(), device=str(self.device),
                         torch=torch.__version__, speed_auto=self.speed_auto)

    # ----------------------------------------------------------------- checkpoints
    def state(self) -> dict[str, Any]:
        """The full training state (what last.safetensors holds and `resume` restores); the epoch sums are
        averaged over ranks, so every rank calls it."""
        p = self.progress
        return {"kind": "train-state", "resolved": self.record().to_dict(), "model_spec": self.spec,
                "model": self.model.state_dict(), "method_state": self.method.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(), "rng": rng_state(), "ema": self.ema and self.ema.state_dict(),
                "progress": {**vars(p), "epoch_sums": distributed.rank_mean(p.epoch_sums)}}

    def save(self) -> None:
        """Every rank calls this (the epoch sums are averaged over ranks); rank 0 writes, the others wait."""
        guards.check_weights(self.model, self.progress, self.out)
        state = self.state()
        if self.dist.is_main:
            save_checkpoint(self.out / "checkpoints" / "last.safetensors", state)
        distributed.barrier()
        if self.ema:
            self.save_best("last-ema", self.ema.module.state_dict())
        self.saved_at = time.monotonic()

    def save_best(self, name: str = "best", weights: Optional[dict[str, torch.Tensor]] = None) -> None:
        """Weights only (the model's, or `weights`: the EMA's) as checkpoints/NAME.safetensors."""
        guards.check_weights(self.model, self.progress, self.out)
        if self.dist.is_main:
            save_checkpoint(self.out / "checkpoints" / f"{name}.safetensors", {
                "kind": "model", "resolved": self.record().to_dict(), "model_spec": self.spec,
                "model": self.model.state_dict() if weights is None else weights,
                "method_state": self.method.state_dict(), "progress": vars(self.progress).copy()})
        distributed.barrier()

    def resume(self) -> None:
        """Restore everything from checkpoints/last.safetensors: the run continues bit for bit.

        Nothing is written until the checkpoint has loaded and matches this run's settings.
        """
        path = self.out / "checkpoints" / "last.safetensors"
        state = load_checkpoint(path)
        if state.get("kind") != "train-state":
            raise UsageError(f"{path} is not a training state (kind {state.get('kind')!r}), so it cannot be resumed")
        self.check_same_run(RunRecord.from_dict(state.get("resolved"), str(path)), path)
        try:
            self.model.load_state_dict(state["model"])
            self.method.load_state_dict(state["method_state"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            if state.get("scaler"):
                self.scaler.load_state_dict(state["scaler"])
            if self.ema:
                self.ema.load_state_dict(state["ema"])
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

    def check_same_run(self, saved: RunRecord, source: Path) -> None:
        """Refuse to continue a run with settings other than those it was trained with; a run asking for
        layout or compile "auto" takes what the saved run chose (no timing on resume)."""
        saved_speed = saved.config.get("speed") or {}
        chosen = layout.from_record(self.cfg.speed, saved_speed)
        if self.train_model is None and chosen:
            self.use_speed(*chosen)
        ran = (saved_speed.get("layout"), saved_speed.get("compile", False))
        if (self.cfg.speed.layout, self.cfg.speed.compile) == ran:
            self.speed_auto = saved.speed_auto  # how the run chose its speed settings stays in its record
        diff = first_difference(saved, self.record())
        if diff:
            raise UsageError(f"cannot resume {self.out}: {diff} in {source}; drop what changes it, or start a new "
                             "run elsewhere")

    def _trim_metrics(self) -> None:
        """Keep the metric lines of epochs the checkpoint includes: later ones, and a line torn by a kill, go."""
        metrics = self.out / "metrics.jsonl"
        if metrics.exists():
            write_metrics(metrics, [m for m in read_metrics(metrics) if m.epoch <= self.progress.epoch])

    # ----------------------------------------------------------------- training
    def fit(self) -> dict[str, Any]:
        """Train from the current epoch (0, or where `resume` left off) to optim.epochs, into `out`.

        Resolves layout and compile "auto" first and writes config.json; then each epoch trains, validates,
        appends its metrics line, saves the checkpoints and prints its summary line. Every rank of a
        distributed run calls it; rank 0 writes the files and prints.

        Returns:
            {"best_epoch", "best_val_robust": its validation robust accuracy, "epochs": epochs trained,
            "train_seconds": training time over all epochs, validation excluded}.
        """
        if self.dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        self._start_notes()
        if self.dist.is_main:
            write_run(self.out / "config.json", self.record())
        distributed.barrier()
        cfg = self.cfg
        self.board.open(resumed_at=self.progress.global_step)
        while self.progress.epoch < cfg.optim.epochs:
            epoch = self.progress.epoch
            t0 = time.perf_counter()
            train_metrics = self.train_epoch(epoch)
            train_time = time.perf_counter() - t0
            self.progress.elapsed += train_time
            record = self.end_epoch(epoch, train_metrics, train_time)
            if self.dist.is_main:
                tqdm.write(self.summary_line(record))
        self.board.close()
        return {"best_epoch": self.progress.best_epoch, "best_val_robust": self.progress.best_robust,
                "epochs": self.progress.epoch, "train_seconds": self.progress.elapsed}

    def _start_notes(self) -> None:
        """Resolve layout and compile "auto" (a new run times them) and say what the run chose and what it could
        opt into."""
        if self.train_model is None:
            self.use_speed(*layout.resolve(self))
            if self.dist.is_main and self.speed_auto is not None:
                tqdm.write(layout.describe(self.speed_auto))  # stdout, with the epoch lines
        hint = speed.bf16_hint(self.device, self.cfg.speed)
        if hint and self.dist.is_main:
            tqdm.write(hint)

    def train_epoch(self, epoch: int) -> dict[str, float]:
        """Train the batches of `epoch` left (all, unless resumed mid-epoch); the epoch's metric means over ranks."""
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
            self.board.step(p.global_step, metrics)
            bar.update(1)
            if p.step % 20 == 0 or p.step == len(self.loader):
                guards.check_finite(bad_step, epoch, self.out, self.dist)
                bar.set_postfix({k: f"{float(v) / p.step:.3f}" for k, v in sums.items()})
            if p.step < len(self.loader) and self._mid_epoch_save_due():  # the epoch's end saves anyway
                guards.check_finite(bad_step, epoch, self.out, self.dist)
                self.save()
        bar.close()
        guards.check_finite(bad_step, epoch, self.out, self.dist)
        return {k: float(v) / max(p.step, 1) for k, v in distributed.rank_mean(sums).items()}

    def _mid_epoch_save_due(self) -> bool:
        """Every checkpoint_every_steps batches, and once checkpoint_every_minutes have passed since the last save:
        rank 0's clock decides for every rank, so all save together."""
        cfg = self.cfg
        if cfg.checkpoint_every_steps and self.progress.step % cfg.checkpoint_every_steps == 0:
            return True
        if not cfg.checkpoint_every_minutes:
            return False
        waited = distributed.from_main({"s": time.monotonic() - self.saved_at}, self.device)["s"]
        return waited >= 60 * cfg.checkpoint_every_minutes

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One optimizer step of the method on a batch, then the lr schedule's step and the EMA's update.

        The eps warm-up scales the threat model for this step; the progress counters are not advanced here
        (`train_epoch` does that). Needs the training forward, which `fit` (or `use_speed`) builds.

        Args:
            x: this rank's images, float in [0, 1], NCHW.
            y: their class indices.

        Returns:
            The loss that was backpropagated, and the method's metrics (detached, "loss" among them).
        """
        if self.warmup_steps:  # eps warm-up: a per-step scale of the one threat model, never a change of the run
            f = min(1.0, (self.progress.global_step + 1) / self.warmup_steps)
            self.method.threat = self.threat.scaled(f)
        self.method.at_step(self.progress.global_step, self.total_steps)
        assert self.train_model is not None, "fit() sets the layout before the first step"
        loss, metrics = optimizer_step(StepParts(self.method, self.model, self.train_model, self.optimizer, self.scaler,
                                                 self.cfg.speed, self.cfg.optim.grad_clip, self.device), x, y)
        self.scheduler.step()
        if self.ema:
            self.ema.update(self.model)
        return loss, metrics

    def end_epoch(self, epoch: int, train_metrics: dict[str, float], train_time: float) -> MetricLine:
        """Validate, run the overfitting monitor, save best (and best-ema) on a better robust accuracy, append the
        epoch's metrics line and save the training state; returns that line."""
        p = self.progress
        n_val = min(self.cfg.val.n_examples, len(self.val_split))
        x_val, y_val = self.val_split.x[:n_val], self.val_split.y[:n_val]
        acc = robust_accuracy(self.model, x_val, y_val, self.val_attacks, batch_size=self.cfg.val.batch_size).rates()
        acc = distributed.from_main(acc, self.device)  # every rank validates; rank 0's numbers decide
        p.epoch, p.step = epoch + 1, 0
        # before best_robust counts this epoch
        co = check_overfitting(self.model, x_val, y_val, self.threat, p, acc["robust"], self.cfg.val.batch_size)
        if acc["robust"] > p.best_robust:
            p.best_robust, p.best_epoch = acc["robust"], epoch + 1
            self.save_best()
        ema_fields = ema.end_epoch(self.ema, p, x_val, y_val, self.val_attacks, batch_size=self.cfg.val.batch_size,
                                   device=self.device, save_best=self.save_best)
        line = MetricLine(epoch=epoch + 1, lr=self.optimizer.param_groups[0]["lr"], train=train_metrics,
                          val_natural=acc["natural"], val_robust=acc["robust"], val_examples=n_val,
                          epoch_seconds=train_time, best_epoch=p.best_epoch, **co, **ema_fields,
                          images_per_second=len(self.loader) * self.cfg.optim.batch_size / max(train_time, 1e-9))
        p.history.append({"epoch": epoch + 1, "val_natural": acc["natural"], "val_robust": acc["robust"],
                          "val_fgsm": line.val_fgsm})
        if self.dist.is_main:
            append_metric(self.out / "metrics.jsonl", line)  # on disk before the checkpoint that counts the epoch
        self.board.epoch(p.global_step, line)
        self.save()
        return line

    def summary_line(self, r: MetricLine) -> str:
        """The line printed after an epoch: training means, validation accuracies (and the EMA's), timing."""
        train = " ".join(f"{k} {v:.3f}" for k, v in r.train.items())
        return (f"epoch {r.epoch}/{self.cfg.optim.epochs}  {train}  val natural {r.val_natural:.2%}  "
                f"val {self.cfg.val.attack}-{self.cfg.val.steps} {r.val_robust:.2%}  {ema.summary(r)}"
                f"({r.epoch_seconds:.0f}s, {r.images_per_second:.0f} img/s)")
