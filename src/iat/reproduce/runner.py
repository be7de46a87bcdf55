"""Cells on disk and the `iat train` / `iat eval` subprocesses that advance them: skip what is done, resume
what was interrupted, refuse a run made with other settings, evaluate AutoAttack-like groups last."""
from __future__ import annotations

import concurrent.futures as futures
import dataclasses
import json
import os
import queue
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Optional

from .. import config as C
from ..attacks.autoattack import require_autoattack
from ..data import load_dataset
from ..errors import UsageError
from ..records import (
    MetricLine,
    RunRecord,
    atomic_write_text,
    read_eval,
    read_metrics,
    read_run,
    try_read_eval,
    write_eval,
)
from ..same_run import first_difference
from .spec import KINDS, Cell, EvalGroup, TableSpec


def run_dir(out: Path, cell: Cell, seed: int) -> Path:
    """The run directory of a cell's seed: OUT/<cell>/seed<k>."""
    return out / cell.name / f"seed{seed}"


def read_records(run: Path) -> list[MetricLine]:
    """The run's metrics.jsonl lines ([] before its first epoch)."""
    return read_metrics(run / "metrics.jsonl")


def train_state(run: Path, cfg: C.TrainConfig) -> str:
    """'new', 'partial' (resume it) or 'done'; a run made with other settings is an error (the same rule
    as --resume: same_run.first_difference)."""
    saved_path = run / "config.json"
    if not saved_path.is_file():
        return "partial" if (run / "checkpoints" / "last.safetensors").is_file() else "new"
    diff = first_difference(read_run(saved_path), RunRecord(config=C.to_dict(cfg)))
    if diff:
        raise UsageError(f"{run} was trained with other settings than the table asks: {diff}; "
                         "move it away (or use another --out) to train the table's cell")
    records = read_records(run)
    done = records and records[-1].epoch == cfg.optim.epochs and (run / "checkpoints" / "last.safetensors").is_file()
    return "done" if done else "partial"


def eval_path(run: Path, kind: str, group: EvalGroup) -> Path:
    """The eval JSON of a checkpoint kind and eval group: eval-<kind>[-<group>].json."""
    return run / f"eval-{kind}{'-' + group.name if group.name else ''}.json"


def checkpoint_epochs(run: Path) -> dict[str, Optional[int]]:
    """The epochs of the run's best and last checkpoints ({} before its first epoch; best None if unrecorded)."""
    records = read_records(run)
    return {"best": records[-1].best_epoch, "last": records[-1].epoch} if records else {}


def eval_done(run: Path, kind: str, group: EvalGroup, more: bool = False) -> bool:
    """An eval of the checkpoint as it is now, with every attack and the number of examples the group asks
    (with `more`: on more examples than it asks, which the runner keeps rather than replace by fewer)."""
    result = try_read_eval(eval_path(run, kind, group))
    epoch = checkpoint_epochs(run).get(kind)
    if result is None or epoch is None:
        return False
    attacks = {r["attack"] for r in result.results}
    n, held = group.n_examples, result.data.get("n_examples")
    return (result.checkpoint_epoch == epoch and set(group.columns()) <= attacks
            and (n is None or (held > n if more and isinstance(held, int) else held == n)))


@dataclasses.dataclass
class Step:
    """One `iat` subprocess of a cell, logged to OUT/logs/<cell>-<log>.log."""

    log: str
    argv: list[str]  # after `iat`
    copy_to: Optional[Path] = None  # also save the eval as this (the best checkpoint is the last one)
    done: Optional[tuple[str, EvalGroup]] = None  # (checkpoint, group): skip the step if that eval exists by then

    def command(self) -> str:
        """The step as a shell line."""
        return f"iat {shlex.join(self.argv)}"


def plan_steps(spec: TableSpec, out: Path, cell: Cell, seed: int, state: str, late: bool,
               notes: bool = True) -> list[Step]:
    """What this cell still needs: training (early phase), then its evals of the early or the late phase.
    `notes`: print a line for each longer evaluation that is kept and not counted."""
    run = run_dir(out, cell, seed)
    steps = []
    if not late and state == "new":
        cfg_file = out / "configs" / f"{cell.name}-seed{seed}.json"
        steps.append(Step("train", ["train", "--config", str(cfg_file), "--out", str(run), "--no-progress"]))
    elif not late and state == "partial":
        steps.append(Step("train", ["train", "--resume", str(run), "--no-progress"]))
    for group in (g for g in spec.evals if g.late == late):
        # the last checkpoint first: when the best one is the same epoch (same weights), its eval is copied
        kinds = [k for k in sorted(spec.checkpoints, key=KINDS[::-1].index)
                 if state != "done" or not eval_done(run, k, group)]
        for kind in [k for k in kinds if eval_done(run, k, group, more=True)]:
            kinds.remove(kind)  # a longer evaluation is never replaced by a shorter one; the table leaves it out
            if notes:
                print(f"iat: {eval_path(run, kind, group)} holds this evaluation on more than the table's "
                      f"{group.n_examples} examples; kept and not counted (raise the spec's n_examples to use it)",
                      file=sys.stderr)
        for kind in kinds:
            argv = ["eval", str(run), "--checkpoint", kind, "--attacks", group.attacks, "--no-progress",
                    "--out", str(eval_path(run, kind, group)), "--overwrite",  # eval_done found it stale
                    "--extend"]  # ... or on fewer examples: only the new ones are attacked
            if group.n_examples is not None:
                argv += ["--n-examples", str(group.n_examples)]
            copy = eval_path(run, "best", group) if kind == "last" and "best" in spec.checkpoints else None
            steps.append(Step(f"eval-{kind}{'-' + group.name if group.name else ''}", argv, copy, (kind, group)))
    return steps


def _copy_if_same(run: Path, step: Step) -> None:
    """After the last checkpoint's eval: if the best checkpoint is the same epoch, its eval is this one."""
    epochs = checkpoint_epochs(run)
    if step.copy_to is None or epochs.get("best") != epochs.get("last"):
        return
    src = Path(step.argv[step.argv.index("--out") + 1])
    result = dataclasses.replace(read_eval(src), checkpoint_kind="best", same_weights_as=src.name,
                                 checkpoint=str(run / "checkpoints" / "best.safetensors"))
    write_eval(step.copy_to, result)


class Children:
    """The `iat` subprocesses running now. Interrupting the runner (Ctrl-C, or SIGTERM from a scheduler)
    stops them all and starts no more, so no orphaned training keeps writing into a cell."""

    def __init__(self) -> None:
        self.live: set[subprocess.Popen] = set()
        self.lock = threading.Lock()
        self.stopping = threading.Event()

    def run(self, argv: list[str], log: Any, env: dict[str, str]) -> int:
        """Run `iat ARGV` with output to `log`; its exit status (-SIGTERM if stopping)."""
        with self.lock:
            if self.stopping.is_set():
                return -signal.SIGTERM
            proc = subprocess.Popen([sys.executable, "-m", "iat", *argv], stdout=log, stderr=subprocess.STDOUT,
                                    env=env)
            self.live.add(proc)
        try:
            return proc.wait()
        finally:
            with self.lock:
                self.live.discard(proc)

    def stop(self) -> None:
        """Terminate the running children and start no more."""
        with self.lock:
            self.stopping.set()
            for proc in self.live:
                proc.terminate()


def step_log(out: Path, ident: str, step: Step) -> Path:
    """Where a cell's step logs: OUT/logs/<cell>-seed<k>-<step>.log."""
    return out / "logs" / f"{ident.replace('/', '-')}-{step.log}.log"


def _run_cell(out: Path, ident: str, run: Path, steps: list[Step], threads: int, children: Children,
              gpus: Optional[queue.Queue] = None) -> tuple[str, float, str]:
    """Run a cell's steps, each logged to OUT/logs; returns (cell id, seconds, error or '').
    With `gpus`, the cell takes one GPU id from the queue for all its steps and gives it back."""
    gpu = gpus.get() if gpus is not None else None
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    t0 = time.perf_counter()
    try:
        for step in steps:
            if step.done and eval_done(run, *step.done):
                continue  # the best checkpoint is the last one, whose eval was just copied
            log = step_log(out, ident, step)
            with log.open("a") as f:
                f.write(f"$ {step.command()}\n")
                f.flush()
                code = children.run(step.argv, f, env)
            if code != 0:
                tail = [line for line in log.read_text().splitlines() if line.strip()][-1:]
                failure = f"`iat {step.argv[0]}` exited {code}: {' '.join(tail)} (log: {log})"
                return ident, time.perf_counter() - t0, failure
            _copy_if_same(run, step)
        return ident, time.perf_counter() - t0, ""
    finally:
        if gpus is not None:
            gpus.put(gpu)


def _plan(spec: TableSpec, out: Path, late: bool,
          notes: bool = True) -> list[tuple[str, Path, C.TrainConfig, str, list[Step]]]:
    plan = []
    for cell in spec.cells:
        for seed in spec.seeds:
            cfg = spec.train_config(cell, seed)
            run = run_dir(out, cell, seed)
            state = train_state(run, cfg)
            if late and state != "done":
                continue  # its training failed in the early phase (reported there)
            steps = plan_steps(spec, out, cell, seed, state, late, notes)
            if steps:
                plan.append((f"{cell.name}/seed{seed}", run, cfg, state, steps))
    return plan


def _execute(plan: list, out: Path, phase: str, jobs: int, threads: int, gpus: Optional[list[str]]) -> list[str]:
    """Run the planned cells, `jobs` at a time; on Ctrl-C or SIGTERM stop every child and re-raise."""
    from tqdm import tqdm

    children, failures = Children(), []
    free: Optional[queue.Queue] = None
    if gpus:
        free = queue.Queue()
        for gpu in gpus:
            free.put(gpu)
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _interrupt) if in_main else None
    try:
        with futures.ThreadPoolExecutor(max_workers=jobs) as pool, \
                tqdm(total=len(plan), desc=phase, unit="cell") as bar:
            try:
                pending = [pool.submit(_run_cell, out, ident, run, steps, threads, children, free)
                           for ident, run, _, _, steps in plan]
                for job in futures.as_completed(pending):
                    ident, seconds, error = job.result()
                    bar.update()
                    bar.write(f"{ident}: {'FAILED ' + error if error else 'done'} ({seconds / 60:.1f} min)")
                    if error:
                        failures.append(f"{ident}: {error}")
            except BaseException:
                children.stop()
                raise
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous)
    return failures


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def preflight(spec: TableSpec, out: Path) -> None:
    """What the cells with work need, checked once before the first of them starts (so a missing data set or
    extra is one line, not one failure per cell): every data set loads, and pyautoattack is installed when an
    evaluation group runs AutoAttack."""
    plans = [_plan(spec, out, late, notes=False) for late in (False, True)]
    cells = {ident: cfg for plan in plans for ident, _, cfg, _, _ in plan}
    if not cells:
        return
    data: dict[tuple[str, Optional[str], bool], list[str]] = {}
    for ident, cfg in cells.items():
        data.setdefault((cfg.data.name, cfg.data.root, cfg.data.download), []).append(ident)
    for (name, root, download), idents in data.items():
        try:
            load_dataset(name, root, download=download)
        except UsageError as err:
            raise UsageError(f"{len(idents)} of the cells with work (e.g. {idents[0]}) train on {name}, which does "
                             f"not load: {err}; nothing was started") from None
    if any("autoattack" in group.columns() for group in spec.evals):
        try:
            require_autoattack()
        except UsageError as err:
            raise UsageError(f"the table's evaluations run AutoAttack: {err}; nothing was started") from None


def run_table(spec: TableSpec, out: Path, jobs: int = 1, threads: Optional[int] = None,
              dry_run: bool = False, gpus: Optional[list[str]] = None) -> list[str]:
    """Advance every cell: first training and the early evals of all cells, then the late evals.
    Returns the failures (one line each). Before anything runs, `preflight` checks what the cells need."""
    failures: list[str] = []
    threads = threads or max(1, (os.cpu_count() or 1) // jobs)
    if not dry_run:
        preflight(spec, out)
    for late in (False, True):
        plan = _plan(spec, out, late)
        phase = "late evaluations" if late else "training and evaluation"
        print(f"iat reproduce {spec.name} ({phase}): {len(plan)} of {len(spec.cells) * len(spec.seeds)} cells "
              f"have work in {out}", file=sys.stderr)
        for _, _, _, _, steps in plan:
            for step in steps:
                print(f"  iat {shlex.join(step.argv)}", file=sys.stderr)
        if dry_run or not plan:
            continue
        (out / "configs").mkdir(parents=True, exist_ok=True)
        (out / "logs").mkdir(exist_ok=True)
        for ident, _run, cfg, state, _ in plan:
            if state == "new":
                write_cell_config(out, ident, cfg)
        failures += _execute(plan, out, phase, jobs, threads, gpus)
    return failures


def write_cell_config(out: Path, ident: str, cfg: C.TrainConfig) -> None:
    """The config file a new cell's `iat train --config` reads: OUT/configs/<cell>-seed<k>.json."""
    (out / "configs").mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "configs" / f"{ident.replace('/', '-')}.json", json.dumps(C.to_dict(cfg), indent=1))
