"""`iat reproduce TABLE --executor slurm`: one SLURM job per cell (its training, then its early evaluations),
submitted with submitit into OUT/slurm/, and a ledger of them (OUT/slurm/ledger.json), so that running the same
command again reports every cell and submits only what is neither done nor queued nor running.

A job runs what the local runner runs for its cell (runner.plan_steps: the same `iat` subprocesses, the same
logs in OUT/logs/), its steps recomputed from the run folder when the job starts, so a job that SLURM requeues
(preemption, `scontrol requeue`, or submitit's requeue at the time limit's warning signal) resumes training
from its last checkpoint. A cell's state comes from squeue while SLURM holds its job, and from the run folder
and the job's submitit files once it does not: sacct, and with it submitit's job.state, needs an accounting
database that a cluster may not have. The late phase (AutoAttack) is not a dependent job: a run of the command
after every cell has trained submits it, one job per cell; `--wait` runs both phases and writes the table."""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

from ..errors import UsageError
from ..records import atomic_write_text
from ..runtime.distributed import slurm_env
from ..training.run_dir import run_lock
from .runner import (
    Children,
    Step,
    _plan,
    _run_cell,
    plan_steps,
    preflight,
    run_dir,
    step_log,
    train_state,
    write_cell_config,
)
from .spec import TableSpec

try:  # the `slurm` extra: without it --dry-run still plans, and submitting says what to install
    from submitit.helpers import Checkpointable, DelayedSubmission
except ImportError:  # pragma: no cover
    Checkpointable = object  # type: ignore[misc,assignment]

SLURM_HINT = 'pip install "iat[slurm]"'
PHASES = {False: "early", True: "late"}  # early: training, then the early evaluations; late: AutoAttack-like groups
RUNNING = ("RUNNING", "COMPLETING", "SIGNALING", "STAGE_OUT", "RESIZING")
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY", "BOOT_FAIL",
         "DEADLINE")  # anything else squeue shows (PENDING, CONFIGURING, REQUEUED, held, suspended) is queued
POLL_SECONDS = 15.0  # --wait's squeue interval
LEDGER_VERSION = 1
PLAN_WAIT_SECONDS = 600.0  # how long a DDP job's tasks > 0 wait for task 0's plan
MAX_TIMEOUTS = 10  # time limits a job may reach and be requeued by submitit (preemptions are not counted)


@dataclasses.dataclass
class Resources:
    """What each cell's job asks SLURM for (--partition, --gpus-per-cell, ..., --sbatch-extra). GPUs, CPUs and
    memory are per node; a job of more than one process in all (nodes x processes per node) trains DDP."""

    partition: Optional[str] = None
    gpus: int = 1
    cpus: int = 4
    mem_gb: Optional[float] = None
    time_min: int = 720
    account: Optional[str] = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    nodes: int = 1
    tasks_per_node: Optional[int] = None  # default: one per GPU, or 1

    @property
    def processes(self) -> int:
        """Training processes on each node: --tasks-per-node, else one per GPU (at least one)."""
        return self.tasks_per_node or max(self.gpus, 1)

    @property
    def world(self) -> int:
        """Training processes in all (DDP's world size)."""
        return self.nodes * self.processes

    @property
    def threads(self) -> int:
        """CPUs of each training process."""
        return max(1, self.cpus // self.processes)

    def single(self) -> Resources:
        """A one-process job on one node (at most one GPU, the node's CPUs and memory): what an evaluation uses,
        so the late phase (AutoAttack) of a DDP cell holds no GPU it leaves idle."""
        return dataclasses.replace(self, nodes=1, tasks_per_node=None, gpus=min(self.gpus, 1))

    def check(self) -> None:
        """Combinations no sbatch could run as meant: a GPU shared by two processes, a process without a CPU."""
        if self.gpus and self.processes > self.gpus:
            raise UsageError(f"--tasks-per-node {self.processes} is more than the {self.gpus} GPU(s) per node of "
                             "--gpus-per-cell: each training process needs a GPU of its own")
        if self.cpus < self.processes:
            raise UsageError(f"--cpus-per-cell {self.cpus} is fewer than the {self.processes} training processes "
                             "per node: give each at least one CPU")

    def parameters(self, name: str) -> dict[str, Any]:
        """submitit.SlurmExecutor's parameters of one cell's job: one task per training process (submitit's srun
        runs CellJob in each), requeueable whatever the cluster's default (JobRequeue), the free-form
        --sbatch-extra last. A DDP job's step ends as a whole when a task fails, so no rank waits on a dead one."""
        p: dict[str, Any] = {"job_name": name, "nodes": self.nodes, "ntasks_per_node": self.processes,
                             "cpus_per_task": self.threads, "time": self.time_min}
        optional = {"gpus_per_node": self.gpus or None, "partition": self.partition, "account": self.account,
                    "mem": None if self.mem_gb is None else f"{int(round(self.mem_gb * 1024))}MB",
                    "srun_args": ["--kill-on-bad-exit=1"] if self.world > 1 else None}
        return {**p, **{k: v for k, v in optional.items() if v is not None},
                "additional_parameters": {"requeue": True, **self.extra}}

    def sbatch_flags(self, name: str) -> list[str]:
        """The parameters as the sbatch flags submitit writes (it adds its log files and --signal=USR2@90: the
        time limit's warning, on which it requeues the job)."""
        p = self.parameters(name)
        flags = {**{k: v for k, v in p.items() if k not in ("additional_parameters", "srun_args")},
                 "signal": "USR2@90", **p["additional_parameters"]}
        return [f"--{k.replace('_', '-')}" + ("" if v is True else f"={v}") for k, v in flags.items()]


def parse_extra(text: Optional[str]) -> dict[str, Any]:
    """--sbatch-extra qos=high,constraint=a100,exclusive: sbatch parameters (a KEY alone is a flag)."""
    extra: dict[str, Any] = {}
    for item in text.split(",") if text else []:
        key, eq, value = item.strip().partition("=")
        if not key.strip() or (eq and not value.strip()) or not key.replace("-", "_").replace("_", "a").isalnum():
            raise UsageError(f"--sbatch-extra takes KEY=VALUE,... (sbatch's long options), got {item!r} in {text!r}")
        extra[key.strip()] = value.strip() if eq else True
    return extra


def job_name(spec: TableSpec, ident: str) -> str:
    """The SLURM job name of a cell: iat-TABLE-CELL-seedK."""
    return f"iat-{spec.name}-{ident.replace('/', '-')}"


def with_checkpoints(steps: list[Step], minutes: float) -> list[Step]:
    """Training steps save the training state every `minutes` too (0: only at the end of each epoch), so a
    preempted job loses at most that."""
    for step in steps:
        if step.argv[0] == "train" and minutes > 0:
            step.argv += ["--checkpoint-every-minutes", f"{minutes:g}"]
    return steps


def job_task() -> tuple[int, int]:
    """(rank, tasks) of this task of the job's step, as its `iat train` will read them (runtime.distributed's
    slurm_env); (0, 1) for a one-task step or outside SLURM."""
    place = slurm_env(os.environ)
    return int(place.get("RANK", 0)), int(place.get("WORLD_SIZE", 1))


def plan_file(out: Path) -> Path:
    """Where task 0 of a DDP job publishes its training step for the other tasks: one file per job and start
    (SLURM_RESTART_COUNT counts the requeues), so a requeued job never reads its last start's plan."""
    env = os.environ
    return out / "slurm" / f"{env.get('SLURM_JOB_ID', 'nojob')}_{env.get('SLURM_RESTART_COUNT', '0')}_plan.json"


class CellFailed(RuntimeError):
    """A cell's own failure (`iat train` exited 2, a diverged run): its job ends FAILED and is not requeued."""


class CellInterrupted(RuntimeError):
    """The job was stopped (preempted, requeued or cancelled) while its cell ran."""


@dataclasses.dataclass
class CellJob(Checkpointable):
    """What one SLURM job runs: a cell's steps of one phase, recomputed from its run folder when the job starts
    (new: train, partial: train --resume, then the evaluations still missing)."""

    spec: TableSpec
    out: str
    cell: str
    seed: int
    late: bool
    threads: int
    checkpoint_minutes: float

    @property
    def ident(self) -> str:
        return f"{self.cell}/seed{self.seed}"

    def __call__(self) -> dict[str, Any]:
        out, cell = Path(self.out), self.spec.cell(self.cell)
        run, (rank, tasks) = run_dir(out, cell, self.seed), job_task()
        if rank > 0:  # a DDP cell's other tasks: the training step task 0 planned, then nothing
            steps = self._follow(out, rank)
            state = "planned by task 0"
        else:
            cfg = self.spec.train_config(cell, self.seed)
            state = train_state(run, cfg)
            if self.late and state != "done":
                raise CellFailed(f"its late phase started before its training finished (training {state})")
            if state == "new":
                write_cell_config(out, self.ident, cfg)
            (out / "logs").mkdir(parents=True, exist_ok=True)
            steps = with_checkpoints(plan_steps(self.spec, out, cell, self.seed, state, self.late),
                                     self.checkpoint_minutes)
            if tasks > 1:
                atomic_write_text(plan_file(out), json.dumps({"train": [s.argv for s in steps if s.log == "train"]}))
        print(f"{self.ident} ({PHASES[self.late]} phase, task {rank} of {tasks}, training {state}): {len(steps)} "
              "step(s)", flush=True)
        children, stopped = Children(), []

        def stop(signum: int, frame: Any) -> None:  # SLURM signals every process of the job: start no next step
            stopped.append(signum)
            children.stopping.set()

        previous = signal.signal(signal.SIGTERM, stop)
        try:
            _, seconds, error = _run_cell(out, self.ident, run, steps, self.threads, children)
        finally:
            signal.signal(signal.SIGTERM, previous)
        if stopped:
            raise CellInterrupted(f"stopped by SLURM (preempted, requeued or cancelled); {error or 'between steps'}")
        if error:
            raise CellFailed(error)
        return {"cell": self.ident, "phase": PHASES[self.late], "seconds": seconds}

    def _follow(self, out: Path, rank: int) -> list[Step]:
        """Task `rank` > 0 of a DDP job: wait for task 0's plan, then run the same training (its `iat train` reads
        its rank from SLURM's variables: runtime.distributed.slurm_env), logged apart; the evaluations are task
        0's alone."""
        path, deadline = plan_file(out), time.monotonic() + PLAN_WAIT_SECONDS
        while not path.is_file():
            if time.monotonic() > deadline:
                raise CellFailed(f"task {rank}: task 0 published no plan ({path}) in {PLAN_WAIT_SECONDS:g} s")
            time.sleep(0.2)
        return [Step(f"train-task{rank}", argv) for argv in json.loads(path.read_text())["train"]]

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """submitit calls this on the time limit's warning signal, then requeues the job: the same job again,
        which resumes from the run folder's last checkpoint."""
        return DelayedSubmission(self, *args, **kwargs)


@dataclasses.dataclass
class JobRecord:
    """A cell's latest job in the ledger."""

    job_id: str
    phase: str
    submitted_at: str
    logs: list[str]


def ledger_path(out: Path) -> Path:
    return out / "slurm" / "ledger.json"


def read_ledger(out: Path) -> dict[str, JobRecord]:
    """The ledger: cell ident (cell/seedK) -> its latest job ({} before the first submission)."""
    path = ledger_path(out)
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
        if data.get("version") != LEDGER_VERSION:
            raise ValueError(f"version {data.get('version')!r}, not {LEDGER_VERSION}")
        return {ident: JobRecord(**rec) for ident, rec in data["cells"].items()}
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise UsageError(f"{path} is not a ledger of iat reproduce ({err}); move it away to start afresh") from None


def write_ledger(out: Path, ledger: dict[str, JobRecord]) -> None:
    cells = {ident: dataclasses.asdict(rec) for ident, rec in sorted(ledger.items())}
    atomic_write_text(ledger_path(out), json.dumps({"version": LEDGER_VERSION, "cells": cells}, indent=1) + "\n")


def live_jobs(out: Path) -> dict[str, str]:
    """The ledger's jobs that SLURM still holds (job id -> cell), for the local runner to refuse to run beside
    them; {} without a ledger, or where squeue is missing or fails (a guard at best effort)."""
    ledger = read_ledger(out)
    try:
        live = squeue([r.job_id for r in ledger.values()]) if ledger and shutil.which("squeue") else {}
    except UsageError:
        return {}
    return {r.job_id: ident for ident, r in ledger.items() if r.job_id in live}


def squeue(job_ids: list[str]) -> dict[str, str]:
    """Job id -> 'queued' or 'running' for those of `job_ids` that SLURM still holds (squeue, not sacct)."""
    if not job_ids:
        return {}
    if shutil.which("squeue") is None:
        raise UsageError("--executor slurm: no squeue on this machine to ask for the ledger's jobs")
    proc = subprocess.run(["squeue", "-h", "-j", ",".join(job_ids), "-o", "%i %T"], capture_output=True, text=True,
                          timeout=120)
    if proc.returncode != 0:
        if "Invalid job id" in proc.stderr:  # none of them is known any more
            return {}
        raise UsageError(f"squeue failed ({proc.stderr.strip() or proc.returncode}); nothing was submitted")
    states = dict(line.split()[:2] for line in proc.stdout.splitlines() if len(line.split()) >= 2)
    return {jid: "running" if s in RUNNING else "queued" for jid, s in states.items() if s not in ENDED}


class _Plain(pickle.Unpickler):
    """submitit's result file: ("success", our dict) or ("error", a traceback); nothing else is loaded."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"{module}.{name} is not a plain value")


def job_failure(folder: Path, job_id: str) -> Optional[str]:
    """Why a job that SLURM no longer holds did not finish its phase (the last line of its error), or None when
    it succeeded."""
    result, stderr = folder / f"{job_id}_0_result.pkl", folder / f"{job_id}_0_log.err"
    if result.is_file():
        try:
            with result.open("rb") as f:
                kind, value = _Plain(f).load()
        except Exception as err:  # noqa: BLE001 - any unreadable file is reported, never trusted
            return f"unreadable result {result} ({type(err).__name__})"
        if kind == "success":
            return None
        line = _last_line(str(value))
        for cls in (CellFailed, CellInterrupted):
            line = line.removeprefix(f"{cls.__module__}.{cls.__name__}: ")
        return f"{line} (job log: {stderr})"
    tail = _last_line(stderr.read_text(errors="replace")) if stderr.is_file() else "no log"
    return f"ended without a result: {tail} (job log: {stderr})"


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "(empty)"


@dataclasses.dataclass
class CellState:
    """Where a cell stands: queued, running, failed, done, trained (its late phase waits), new or partial; with
    `phase` set, a job of that phase is to be submitted for it (`steps`: what it will run, for the ledger)."""

    ident: str
    state: str
    detail: str = ""
    phase: Optional[str] = None
    steps: list[Step] = dataclasses.field(default_factory=list)


def survey(spec: TableSpec, out: Path, ledger: dict[str, JobRecord], live: dict[str, str],
           resubmit_failed: bool = True) -> list[CellState]:
    """Every cell's state from squeue (`live`: job id -> queued/running), else from its run folder (the runner's
    _plan: train_state and eval_done) and its last job's files. A cell with a job SLURM holds is never given a
    second one; a failed cell is resubmitted only with `resubmit_failed`; the late phase waits while any cell's
    training still has to run (a cell whose training failed does not hold it up)."""
    work: dict[str, tuple[str, str, list[Step]]] = {}
    for late in (False, True):
        for ident, _, _, state, steps in _plan(spec, out, late, notes=False):
            work.setdefault(ident, (PHASES[late], state, steps))
    cells, training = [], False
    for ident in (f"{c.name}/seed{s}" for c in spec.cells for s in spec.seeds):
        rec = ledger.get(ident)
        phase, state, steps = work.get(ident, (None, "done", []))
        if rec is not None and rec.job_id in live:
            cells.append(CellState(ident, live[rec.job_id], f"job {rec.job_id}, {rec.phase} phase; log {rec.logs[1]}"))
            training |= rec.phase == "early"
        elif phase is None:
            cells.append(CellState(ident, "done"))
        elif rec is not None and rec.phase == phase and (failure := job_failure(out / "slurm", rec.job_id)):
            cells.append(CellState(ident, "failed", f"job {rec.job_id}: {failure}", phase if resubmit_failed else None,
                                   steps))
        else:
            cells.append(CellState(ident, state if phase == "early" else "trained", "", phase, steps))
            training |= phase == "early"
    for cell in cells:
        if cell.phase == "late" and training:
            cell.phase, cell.detail = None, "its late phase (AutoAttack) waits until every cell has trained"
    return cells


def _executor(folder: Path) -> Any:
    try:
        import submitit
    except ImportError:
        raise UsageError(f"--executor slurm submits through submitit: {SLURM_HINT}") from None
    if shutil.which("sbatch") is None:
        raise UsageError("--executor slurm: no sbatch on this machine (submit from a SLURM login node; --dry-run "
                         "plans anywhere)")
    return submitit.SlurmExecutor(folder=folder, max_num_timeout=MAX_TIMEOUTS)


def submit(spec: TableSpec, out: Path, cells: list[CellState], res: Resources, threads: int,
           minutes: float) -> dict[str, str]:
    """One job per cell that has a phase to submit; each recorded in the ledger as soon as sbatch took it.
    Returns cell ident -> job id."""
    todo = [c for c in cells if c.phase]
    if not todo:
        return {}
    executor, ledger, ids = _executor(out / "slurm"), read_ledger(out), dict[str, str]()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    for c in todo:
        name, seed = c.ident.rsplit("/seed", 1)
        job = CellJob(spec, str(out), name, int(seed), c.phase == "late", threads, minutes)
        job_res = res.single() if c.phase == "late" else res
        executor.update_parameters(**job_res.parameters(job_name(spec, c.ident)))
        try:
            submitted = executor.submit(job)
        except Exception as err:  # noqa: BLE001 - sbatch's refusal (a bad partition, account, parameter)
            _discard_unsubmitted(out / "slurm")
            before = f"the {len(ids)} job(s) submitted before it are in {ledger_path(out)}" if ids else "none submitted"
            raise UsageError(f"sbatch refused the job of {c.ident}: {_last_line(str(err))}; {before}") from None
        logs = [str(submitted.paths.stdout), str(submitted.paths.stderr),
                *(str(step_log(out, c.ident, s)) for s in c.steps)]
        previous = ledger.get(c.ident)
        now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        ledger[c.ident] = JobRecord(str(submitted.job_id), str(c.phase), now, logs)
        write_ledger(out, ledger)
        ids[c.ident] = ledger[c.ident].job_id
        if previous is not None:
            c.detail += f"{'; ' if c.detail else ''}after job {previous.job_id}"
    return ids


def _discard_unsubmitted(folder: Path) -> None:
    """submitit's temporary files of a job that sbatch refused: <uuid>.pkl and .submission_file_<uuid>.sh (a
    submitted job's are renamed, or left as a link to its <id>_submission.sh)."""
    for path in [*folder.glob("*.pkl"), *folder.glob(".submission_file_*.sh")]:
        if re.fullmatch(r"(\.submission_file_)?[0-9a-f]{32}\.(pkl|sh)", path.name) and not path.is_symlink():
            path.unlink(missing_ok=True)


def advance(spec: TableSpec, out: Path, res: Resources, threads: int, minutes: float,
            resubmit_failed: bool) -> tuple[list[CellState], dict[str, str]]:
    """One round, under the table's lock: every cell's state printed, the jobs it calls for submitted.
    Returns the states and the jobs SLURM now holds (job id -> cell ident)."""
    with run_lock(out):
        ledger = read_ledger(out)
        cells = survey(spec, out, ledger, squeue([r.job_id for r in ledger.values()]), resubmit_failed)
        submitted = submit(spec, out, cells, res, threads, minutes)
    print(f"iat reproduce {spec.name} (slurm): {len(cells)} cells in {out}; jobs in {out / 'slurm'}", file=sys.stderr)
    for c in cells:
        job = f" -> submitted job {submitted[c.ident]} ({c.phase} phase)" if c.ident in submitted else ""
        print(f"  {c.ident}: {c.state}{f' ({c.detail})' if c.detail else ''}{job}", file=sys.stderr)
    ledger = read_ledger(out)
    live = {ledger[c.ident].job_id: c.ident for c in cells if c.state in ("queued", "running")}
    return cells, {**live, **{jid: ident for ident, jid in submitted.items()}}


def wait_for(jobs: dict[str, str]) -> None:
    """Poll squeue until SLURM holds none of `jobs` (job id -> cell ident), printing each change of state."""
    seen: dict[str, str] = {}
    errors = 0
    while True:
        try:
            live = squeue(list(jobs))
        except UsageError as err:  # slurmctld restarting, say: the jobs go on, and so does waiting for them
            errors += 1
            if errors > 10:
                raise
            print(f"  {err}; asking again in {POLL_SECONDS:g} s", file=sys.stderr)
            time.sleep(POLL_SECONDS)
            continue
        errors = 0
        for jid, ident in jobs.items():
            if seen.get(jid) != live.get(jid, "ended"):
                seen[jid] = live.get(jid, "ended")
                print(f"  {ident}: {seen[jid]} (job {jid})", file=sys.stderr)
        if not live:
            return
        time.sleep(POLL_SECONDS)


def run_slurm(spec: TableSpec, out: Path, res: Resources, threads: int, minutes: float,
              wait: bool) -> tuple[list[str], bool]:
    """Report every cell and submit what has work; with `wait`, wait for the jobs, then submit the next phase,
    until no job is left (a cell that fails while it waits is reported, not resubmitted).
    Returns (failures, one line each; whether no job is queued or running any more)."""
    out = out.resolve()  # the jobs run elsewhere, perhaps in another folder
    preflight(spec, out)
    resubmit = True
    while True:
        cells, live = advance(spec, out, res, threads, minutes, resubmit)
        if not wait or not live:
            break
        wait_for(live)
        resubmit = False
    if live:
        ids = " ".join(sorted(live, key=lambda j: (len(j), j)))
        print(f"iat reproduce {spec.name}: {len(live)} job(s) queued or running ({ids}); run this command again to "
              "see where the cells stand, or with --wait to wait for them", file=sys.stderr)
    if any(g.late for g in spec.evals) and any(c.state != "done" for c in cells):
        print("  the late phase (AutoAttack) is not submitted as dependent jobs: the first run of this command after "
              "every cell has trained submits it, one job per cell", file=sys.stderr)
    failures = [f"{c.ident}: {c.detail}" for c in cells if c.state == "failed" and c.ident not in live.values()]
    return failures, not live
