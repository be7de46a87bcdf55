"""`iat reproduce --executor slurm`: the job's parameters, the ledger and the cells' states (unit tests on fakes, no
SLURM needed), the dry run's plan, and, marked `slurm`, tables on a real SLURM (bash scripts/slurm-local.sh starts
a one-node one): the local runner's numbers, no cell submitted twice, a failed cell reported with its log while
the other finishes, and a job requeued mid-training that resumes to the weights of an uninterrupted run."""
import json
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from iat.cli import main
from iat.errors import UsageError
from iat.reproduce import slurm
from iat.reproduce import spec as specs
from iat.reproduce.runner import plan_steps

from slurm_helpers import slurm_node_or_skip

SRC = str(Path(__file__).resolve().parents[1] / "src")


def spec_text(cells: str, evals: str, epochs: int = 1, batch: int = 64, steps: int = 1, top: str = "") -> str:
    """A synthetic table on the CPU whose timing choices are pinned (the same arithmetic here and in a job)."""
    return f"""title = "slurm table"
seeds = [0]
{top}
[config]
method = "pgd-at"
model = "cnn"
device = "cpu"
[config.data]
name = "synthetic"
val_size = 64
[config.optim]
epochs = {epochs}
batch_size = {batch}
lr = 0.05
[config.threat]
eps = "48/255"
step_size = "16/255"
steps = {steps}
[config.val]
steps = 1
n_examples = 32
[config.speed]
layout = "nchw"
compile = false
{cells}
{evals}"""


TWO_CELLS = """
[[cells]]
name = "pgd-at"
method = "pgd-at"

[[cells]]
name = "iat"
method = "iat"
method_options = { steps_inv = 1 }
"""
EVALS = """
[[evals]]
attacks = "natural,pgd20"
n_examples = 48

[[evals]]
name = "late"
attacks = "natural,cw"
n_examples = 32
late = true
"""
NATURAL = """
[[evals]]
attacks = "natural"
n_examples = 16
"""


@pytest.fixture
def env(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", SRC)  # the jobs' and the runner's `iat` processes import this checkout
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setattr(slurm, "POLL_SECONDS", 1.0)


def write_spec(tmp_path: Path, text: str, name: str = "t") -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(text)
    return path


# ----------------------------------------------------------------- the job's parameters

def test_resources_are_what_submitit_writes_as_sbatch_lines(tmp_path):
    from submitit.slurm.slurm import _make_sbatch_string  # what SlurmExecutor writes, without any SLURM

    res = slurm.Resources(partition="gpu", gpus=2, cpus=8, mem_gb=32, time_min=90, account="lab",
                          extra=slurm.parse_extra("qos=high, constraint=a100,exclusive"))
    params = res.parameters("iat-t-a-seed0")  # 2 GPUs: a DDP cell of 2 processes with 4 CPUs each
    assert params == {"job_name": "iat-t-a-seed0", "nodes": 1, "ntasks_per_node": 2, "cpus_per_task": 4, "time": 90,
                      "gpus_per_node": 2, "partition": "gpu", "account": "lab", "mem": "32768MB",
                      "srun_args": ["--kill-on-bad-exit=1"],
                      "additional_parameters": {"requeue": True, "qos": "high", "constraint": "a100",
                                                "exclusive": True}}
    text = _make_sbatch_string(command="true", folder=tmp_path, **params)
    flags = res.sbatch_flags("iat-t-a-seed0")
    assert "--gpus-per-node=2" in flags and "--requeue" in flags and "--signal=USR2@90" in flags
    assert all(f"#SBATCH {flag}" in text.splitlines() for flag in flags), text
    assert "srun --unbuffered" in text and "--kill-on-bad-exit=1" in text  # one failed task ends every task
    cpu = slurm.Resources(gpus=0, cpus=1).parameters("x")  # no GPU asked for, nor an empty partition
    assert "gpus_per_node" not in cpu and "partition" not in cpu and "mem" not in cpu and "account" not in cpu
    assert cpu["ntasks_per_node"] == 1 and "srun_args" not in cpu


@pytest.mark.parametrize("nodes, gpus, tasks, cpus, world, threads", [
    (1, 1, None, 4, 1, 4), (1, 4, None, 16, 4, 4), (2, 4, None, 16, 8, 4), (2, 0, None, 8, 2, 8),
    (1, 0, 2, 2, 2, 1), (3, 2, 1, 6, 3, 6)])
def test_a_cells_processes_are_one_per_gpu_on_every_node(nodes, gpus, tasks, cpus, world, threads):
    res = slurm.Resources(gpus=gpus, cpus=cpus, nodes=nodes, tasks_per_node=tasks)
    res.check()
    p = res.parameters("x")
    assert (res.world, res.threads, p["nodes"], p["ntasks_per_node"] * p["nodes"]) == (world, threads, nodes, world)
    assert ("srun_args" in p) == (world > 1)
    late = res.single()  # the late phase (evaluations) is one process on one node, with at most one GPU
    assert (late.world, late.gpus, late.cpus) == (1, min(gpus, 1), cpus)


def test_a_ddp_jobs_other_tasks_run_the_training_task_0_planned(tmp_path, monkeypatch, env):
    """Task 0 plans (and writes the cell config); task 1 runs only the training steps it published, logged apart,
    from this start's plan file, never a previous start's."""
    spec = specs.load_spec(str(write_spec(tmp_path, spec_text(TWO_CELLS, EVALS))))
    out = tmp_path / "out"
    (out / "slurm").mkdir(parents=True)
    ran: list[tuple[int, list[str]]] = []

    def fake_run_cell(out_, ident, run, steps, threads, children, gpus=None):
        ran.append((int(os.environ["SLURM_PROCID"]), [s.log for s in steps]))
        return ident, 0.0, ""

    monkeypatch.setattr(slurm, "_run_cell", fake_run_cell)
    monkeypatch.setattr(slurm, "PLAN_WAIT_SECONDS", 0.5)
    job = slurm.CellJob(spec, str(out), "iat", 0, False, 1, 5.0)
    base = {"SLURM_JOB_ID": "77", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "2", "SLURM_RESTART_COUNT": "1",
            "SLURM_STEP_NODELIST": "localhost"}  # a task of a 2-task step, as srun starts it
    monkeypatch.setattr(os, "environ", {**os.environ, **base, "SLURM_PROCID": "1"})
    with pytest.raises(slurm.CellFailed, match="task 0 published no plan"):
        job()  # task 0 has not planned this start yet
    (out / "slurm" / "77_0_plan.json").write_text('{"train": [["train", "--old"]]}')  # the previous start's
    with pytest.raises(slurm.CellFailed, match="published no plan"):
        job()
    monkeypatch.setattr(os, "environ", {**os.environ, **base, "SLURM_PROCID": "0"})
    job()
    plan = json.loads((out / "slurm" / "77_1_plan.json").read_text())
    assert plan["train"][0][:2] == ["train", "--config"] and plan["train"][0][-1] == "5"
    assert (out / "configs" / "iat-seed0.json").is_file()
    monkeypatch.setattr(os, "environ", {**os.environ, **base, "SLURM_PROCID": "1"})
    job()
    assert ran == [(0, ["train", "eval-last", "eval-best"]), (1, ["train-task1"])]


@pytest.mark.parametrize("gpus, tasks, cpus, says", [
    (2, 4, 8, "each training process needs a GPU of its own"), (4, None, 2, "give each at least one CPU")])
def test_resources_no_sbatch_could_run_as_meant_are_refused(gpus, tasks, cpus, says):
    with pytest.raises(UsageError, match=says):
        slurm.Resources(gpus=gpus, cpus=cpus, tasks_per_node=tasks).check()


@pytest.mark.parametrize("text", ["=high", "qos=", "qos high=1", "qos=high,,nodes=1", ","])
def test_a_malformed_sbatch_extra_is_a_one_line_error(text):
    with pytest.raises(UsageError, match="--sbatch-extra takes KEY=VALUE"):
        slurm.parse_extra(text)


def test_only_training_steps_get_the_checkpoint_interval(tmp_path):
    spec = specs.load_spec(str(write_spec(tmp_path, spec_text(TWO_CELLS, EVALS))))
    steps = plan_steps(spec, tmp_path / "out", spec.cells[0], 0, "new", False)
    argv = [s.argv for s in slurm.with_checkpoints(steps, 5)]
    assert argv[0][0] == "train" and argv[0][-2:] == ["--checkpoint-every-minutes", "5"]
    assert all("--checkpoint-every-minutes" not in a for a in argv[1:])
    resumed = slurm.with_checkpoints(plan_steps(spec, tmp_path / "out", spec.cells[0], 0, "partial", False), 0.25)
    assert resumed[0].argv[:2] == ["train", "--resume"] and resumed[0].argv[-1] == "0.25"
    assert all("--checkpoint-every-minutes" not in s.argv
               for s in slurm.with_checkpoints(plan_steps(spec, tmp_path / "out", spec.cells[0], 0, "new", False), 0))


# ----------------------------------------------------------------- ledger, squeue and results

def test_the_ledger_round_trips_and_a_foreign_file_is_one_line(tmp_path):
    ledger = {"a/seed0": slurm.JobRecord("12", "early", "2026-01-01T00:00:00+00:00", ["x.out", "x.err"])}
    slurm.write_ledger(tmp_path, ledger)
    assert slurm.read_ledger(tmp_path) == ledger
    assert json.loads((tmp_path / "slurm" / "ledger.json").read_text())["version"] == 1
    assert slurm.read_ledger(tmp_path / "none") == {}
    (tmp_path / "slurm" / "ledger.json").write_text('{"cells": {"a/seed0": {"id": 3}}}')
    with pytest.raises(UsageError, match="is not a ledger of iat reproduce"):
        slurm.read_ledger(tmp_path)


def test_a_ledger_of_another_version_is_refused(tmp_path):
    (tmp_path / "slurm").mkdir()
    (tmp_path / "slurm" / "ledger.json").write_text('{"version": 2, "cells": {}}')
    with pytest.raises(UsageError, match="version 2, not 1"):
        slurm.read_ledger(tmp_path)


def test_a_refused_submissions_temporary_files_are_removed_and_submitted_jobs_kept(tmp_path):
    hexname = "0123456789abcdef0123456789abcdef"
    kept = [tmp_path / "12_submitted.pkl", tmp_path / "12_0_result.pkl", tmp_path / "12_submission.sh"]
    for path in [*kept, tmp_path / f"{hexname}.pkl", tmp_path / f".submission_file_{hexname}.sh"]:
        path.write_text("x")
    (tmp_path / f".submission_file_{'f' * 32}.sh").symlink_to(tmp_path / "12_submission.sh")  # a submitted job's
    slurm._discard_unsubmitted(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f".submission_file_{'f' * 32}.sh",
                                                                  *(p.name for p in kept)])


def fake_squeue(tmp_path: Path, monkeypatch, stdout: str, stderr: str = "", code: int = 0) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    script = bin_dir / "squeue"
    script.write_text(f"#!/bin/sh\necho \"$@\" > {bin_dir}/args\nprintf '{stdout}'\nprintf '{stderr}' >&2\n"
                      f"exit {code}\n")
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return bin_dir / "args"


def test_squeue_states_map_to_queued_and_running_and_ended_jobs_drop_out(tmp_path, monkeypatch):
    args = fake_squeue(tmp_path, monkeypatch, "12 PENDING\\n13 RUNNING\\n14 COMPLETING\\n15 CONFIGURING\\n"
                                              "16 COMPLETED\\n17 REQUEUED\\n18 FAILED\\n")
    ids = [str(i) for i in range(12, 20)]
    assert slurm.squeue(ids) == {"12": "queued", "13": "running", "14": "running", "15": "queued", "17": "queued"}
    assert args.read_text().split() == ["-h", "-j", ",".join(ids), "-o", "%i", "%T"]
    assert slurm.squeue([]) == {}
    fake_squeue(tmp_path, monkeypatch, "", "slurm_load_jobs error: Invalid job id specified", 1)
    assert slurm.squeue(["99"]) == {}  # a job SLURM forgot
    fake_squeue(tmp_path, monkeypatch, "", "slurm_load_jobs error: Unable to contact slurm controller", 1)
    with pytest.raises(UsageError, match="squeue failed .*Unable to contact.*; nothing was submitted"):
        slurm.squeue(["12"])


def test_an_ended_jobs_failure_is_its_last_error_line(tmp_path):
    def result(job_id, value):
        (tmp_path / f"{job_id}_0_result.pkl").write_bytes(pickle.dumps(value))

    result("7", ("error", "Traceback (most recent call last):\n  ...\niat.reproduce.slurm.CellFailed: `iat train` "
                          "exited 2: iat: error: bad (log: L)\n"))
    assert slurm.job_failure(tmp_path, "7") == f"`iat train` exited 2: iat: error: bad (log: L) (job log: {tmp_path}/7_0_log.err)"
    result("8", ("success", {"cell": "a/seed0"}))
    assert slurm.job_failure(tmp_path, "8") is None
    (tmp_path / "9_0_log.err").write_text("srun: x\nslurmstepd: error: *** JOB 9 ON vm CANCELLED ***\n\n")
    assert slurm.job_failure(tmp_path, "9").startswith("ended without a result: slurmstepd: error: *** JOB 9 ON")
    assert slurm.job_failure(tmp_path, "10").startswith("ended without a result: no log")
    result("11", ("error", Path("not a plain value")))  # a result file naming a class is never unpickled
    assert slurm.job_failure(tmp_path, "11").startswith("unreadable result")


def fake_plan(monkeypatch, early: dict, late: dict) -> None:
    """The runner's _plan as seen by slurm.survey: ident -> training state, per phase."""
    def plan(spec, out, is_late, notes=True):
        return [(ident, None, None, state, []) for ident, state in (late if is_late else early).items()]
    monkeypatch.setattr(slurm, "_plan", plan)


TABLE = specs.TableSpec(name="t", title="t", seeds=[0], config={},
                        cells=[specs.Cell("a", {}), specs.Cell("b", {}), specs.Cell("c", {})])


def states(cells):
    return {c.ident.split("/")[0]: (c.state, c.phase) for c in cells}


def test_survey_never_gives_a_cell_a_second_job_and_the_late_phase_waits_for_training(tmp_path, monkeypatch):
    fake_plan(monkeypatch, {"a/seed0": "new", "b/seed0": "partial", "c/seed0": "new"}, {})
    assert states(slurm.survey(TABLE, tmp_path, {}, {})) == {"a": ("new", "early"), "b": ("partial", "early"),
                                                             "c": ("new", "early")}
    record = {i: slurm.JobRecord(str(n), "early", "t", ["o", "e"]) for n, i in enumerate(["a/seed0", "b/seed0"], 1)}
    (tmp_path / "slurm").mkdir()
    (tmp_path / "slurm" / "2_0_result.pkl").write_bytes(pickle.dumps(("error", "x\nValueError: boom")))
    fake_plan(monkeypatch, {"a/seed0": "partial", "b/seed0": "new"}, {"c/seed0": "done"})
    got = slurm.survey(TABLE, tmp_path, record, {"1": "running"})
    assert states(got) == {"a": ("running", None), "b": ("failed", "early"), "c": ("trained", None)}
    assert "ValueError: boom" in got[1].detail and "waits until every cell has trained" in got[2].detail
    assert states(slurm.survey(TABLE, tmp_path, record, {"1": "running"}, resubmit_failed=False))["b"] == \
        ("failed", None)
    # no training queued or running: a failed cell does not hold up the late phase of the others
    fake_plan(monkeypatch, {"b/seed0": "new"}, {"a/seed0": "done", "c/seed0": "done"})
    assert states(slurm.survey(TABLE, tmp_path, record, {})) == {"a": ("trained", "late"), "b": ("failed", "early"),
                                                                 "c": ("trained", "late")}
    fake_plan(monkeypatch, {}, {})
    assert states(slurm.survey(TABLE, tmp_path, record, {})) == {k: ("done", None) for k in "abc"}


def test_a_cell_job_checkpoints_as_itself_and_fails_on_its_own_error(tmp_path, env):
    import cloudpickle
    from submitit.helpers import DelayedSubmission

    bad = TWO_CELLS.replace("steps_inv = 1", "steps_inv = -1")  # out of range: `iat train` exits 2
    spec = specs.load_spec(str(write_spec(tmp_path, spec_text(bad, NATURAL))))
    job = slurm.CellJob(spec, str(tmp_path / "out"), "iat", 0, False, 1, 5.0)
    again = job.checkpoint()
    assert isinstance(again, DelayedSubmission) and again.function is job
    assert cloudpickle.loads(cloudpickle.dumps(job)) == job
    with pytest.raises(slurm.CellFailed, match="`iat train` exited 2: .*steps_inv.*log: .*iat-seed0-train.log"):
        job()
    log = (tmp_path / "out" / "logs" / "iat-seed0-train.log").read_text()
    assert "--checkpoint-every-minutes 5" in log and "steps_inv" in log
    assert (tmp_path / "out" / "configs" / "iat-seed0.json").is_file()


def test_the_local_runner_refuses_to_run_beside_the_tables_slurm_jobs(tmp_path, monkeypatch, capsys):
    spec = write_spec(tmp_path, spec_text(TWO_CELLS, EVALS))
    out = tmp_path / "out"
    slurm.write_ledger(out, {"pgd-at/seed0": slurm.JobRecord("41", "early", "t", ["o", "e"]),
                             "iat/seed0": slurm.JobRecord("42", "early", "t", ["o", "e"])})
    fake_squeue(tmp_path, monkeypatch, "41 RUNNING\\n")
    assert main(["reproduce", str(spec), "--out", str(out), "--no-plots"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "1 SLURM job(s) of this table are queued or running (41;" in err[0]
    fake_squeue(tmp_path, monkeypatch, "", "slurm_load_jobs error: Unable to contact slurm controller", 1)
    assert slurm.live_jobs(out) == {}  # a guard at best effort: a broken SLURM does not stop local runs


def test_submitting_without_slurm_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))
    spec = write_spec(tmp_path, spec_text(TWO_CELLS, EVALS))
    assert main(["reproduce", str(spec), "--out", str(tmp_path / "out"), "--no-plots", "--executor", "slurm"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == ("iat: error: --executor slurm: no sbatch on this machine (submit from a SLURM login node; "
                       "--dry-run plans anywhere)")
    assert not (tmp_path / "out" / "slurm" / "ledger.json").exists()


# ----------------------------------------------------------------- flags and the dry run

@pytest.mark.parametrize("argv, says", [
    (["--partition", "gpu"], "--partition is for --executor slurm"),
    (["--wait"], "--wait is for --executor slurm"),
    (["--executor", "pbs"], "--executor must be one of local, slurm"),
    (["--executor", "slurm", "--jobs", "2"], "--jobs and --gpus are for --executor local"),
    (["--executor", "slurm", "--time-min", "0"], "--time-min must be in"),
    (["--executor", "slurm", "--sbatch-extra", "=x"], "--sbatch-extra takes KEY=VALUE"),
])
def test_flags_of_the_other_executor_are_refused_in_one_line(tmp_path, capsys, argv, says):
    spec = write_spec(tmp_path, spec_text(TWO_CELLS, EVALS))
    assert main(["reproduce", str(spec), "--out", str(tmp_path / "out"), "--no-plots", "--dry-run", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and says in err[0]


def test_the_dry_run_prints_each_cells_job_the_jobs_and_the_gpu_hours(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))  # no SLURM (nor anything else) on the PATH: nothing is submitted
    spec = write_spec(tmp_path, spec_text(TWO_CELLS, EVALS, epochs=2))
    out = tmp_path / "out"
    argv = ["reproduce", str(spec), "--out", str(out), "--no-plots", "--dry-run", "--executor", "slurm"]
    assert main([*argv, "--partition", "gpu", "--gpus-per-cell", "2", "--sbatch-extra", "qos=high",
                 "--images-per-second", "1"]) == 0
    err = capsys.readouterr().err
    assert ("  pgd-at/seed0: sbatch --job-name=iat-t-pgd-at-seed0 --nodes=1 --ntasks-per-node=2 --cpus-per-task=2 "
            "--time=720 --gpus-per-node=2 --partition=gpu --signal=USR2@90 --requeue --qos=high\n") in err
    assert f"    iat train --config {out}/configs/iat-seed0.json --out {out}/iat/seed0 --no-progress " \
           "--checkpoint-every-minutes 5\n" in err
    assert "    (DDP: each of the job's 2 tasks runs the training, its rank from SLURM; the evaluations run on task 0)" \
           in err
    assert ("its late-phase job (one process: --nodes=1 --ntasks-per-node=1 --cpus-per-task=4 --time=720 "
            "--gpus-per-node=1 --partition=gpu --signal=USR2@90 --requeue --qos=high):") in err
    assert f"--requeue --qos=high):\n    iat eval {out}/iat/seed0 --checkpoint last --attacks natural,cw" in err
    assert "jobs: 2 now, 2 of the late phase (AutoAttack) later; those are not dependent jobs" in err
    # 512 synthetic training images less 64 held out, 2 epochs, at 1 image/s: 896 s = 0.25 h per cell, 2 GPUs
    assert "  iat: 448 images x 2 epochs x 1 seed(s) at 1 images/s = 0.25 h\n" in err
    assert "  in all: 0.50 h of jobs = 1.00 GPU-hours" in err
    assert not out.exists()
    assert main([*argv, "--no-estimate"]) == 0
    assert "GPU-hours: unknown (give --images-per-second N" in capsys.readouterr().err
    assert main(argv) == 0  # timed here, as --estimate does for the local runner
    err = capsys.readouterr().err
    assert "images/s timed on this machine" in err and "at 0 GPU(s) per job" in err and "--gpus-per-node" not in err


# ----------------------------------------------------------------- a real SLURM

@pytest.fixture
def cluster(tmp_path, env):
    """Runs `iat reproduce --executor slurm` on a folder; cancels the jobs it submitted when the test ends."""
    slurm_node_or_skip()
    outs: list[Path] = []

    def run(spec: Path, out: Path, *extra: str) -> int:
        outs.append(out)
        return main(["reproduce", str(spec), "--out", str(out), "--executor", "slurm", "--no-plots",
                     "--cpus-per-cell", "1", "--time-min", "10", *extra])

    yield run
    ids = {r.job_id for out in outs for r in slurm.read_ledger(out).values()}
    if ids:  # ours only, by id; a no-op for jobs that ended
        subprocess.run(["scancel", *sorted(ids)], capture_output=True, timeout=60)


def local_run(spec: Path, out: Path, log: Path) -> subprocess.Popen:
    """The same table through the local runner, in the background (it fills the scheduler's idle seconds)."""
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "iat", "reproduce", str(spec), "--out", str(out), "--no-plots",
                             "--threads", "1"], stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)


def job_ids(out: Path) -> dict[str, str]:
    return {ident: rec.job_id for ident, rec in slurm.read_ledger(out).items()}


def weights(run: Path) -> dict[str, torch.Tensor]:
    from iat.runtime.checkpoint import load_checkpoint

    return load_checkpoint(run / "checkpoints" / "last.safetensors")["model"]


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def numbers(out: Path) -> dict:
    table = json.loads((out / "table.json").read_text())
    rows = [{k: v for k, v in row.items() if k != "epoch_seconds"} for row in table["rows"]]
    return {"rows": rows, "claims": table["claims"], "complete": table["complete"]}


@pytest.mark.slurm
def test_a_slurm_table_has_the_local_numbers_and_a_rerun_submits_no_cell_twice(tmp_path, cluster, capsys):
    spec = write_spec(tmp_path, spec_text(TWO_CELLS, EVALS))
    local = local_run(spec, tmp_path / "local", tmp_path / "local.log")
    out = tmp_path / "slurm"
    assert cluster(spec, out) == 0  # submits and returns
    first = job_ids(out)
    err = capsys.readouterr().err
    assert sorted(first) == ["iat/seed0", "pgd-at/seed0"] and err.count("-> submitted job") == 2
    assert "the late phase (AutoAttack) is not submitted as dependent jobs" in err
    assert cluster(spec, out) == 0  # at once again: both are queued or running, nothing new is submitted
    err = capsys.readouterr().err
    assert "-> submitted" not in err and job_ids(out) == first
    assert all(f"{ident}: queued (job {jid}" in err or f"{ident}: running (job {jid}" in err
               for ident, jid in first.items()), err
    listed = subprocess.run(["squeue", "-h", "-j", ",".join(first.values()), "-o", "%i"], capture_output=True,
                            text=True, timeout=60).stdout.split()
    assert sorted(listed) == sorted(first.values())
    assert cluster(spec, out, "--wait") == 0  # waits, submits the late phase, waits, writes the table
    err = capsys.readouterr().err
    assert err.count("(late phase)") == 2 and "table in" in err
    ledger = slurm.read_ledger(out)
    assert {r.phase for r in ledger.values()} == {"late"} and not {r.job_id for r in ledger.values()} & set(first.values())
    assert local.wait(timeout=300) == 0, (tmp_path / "local.log").read_text()[-3000:]
    assert numbers(out) == numbers(tmp_path / "local") and numbers(out)["complete"]
    for cell in ("pgd-at", "iat"):
        assert same_weights(out / cell / "seed0", tmp_path / "local" / cell / "seed0")
    assert "--checkpoint-every-minutes 5" in (out / "logs" / "iat-seed0-train.log").read_text()


@pytest.mark.slurm
def test_a_cell_that_fails_is_reported_with_its_log_while_the_other_finishes(tmp_path, cluster, capsys):
    bad = TWO_CELLS.replace("steps_inv = 1", "steps_inv = -1")  # out of range: `iat train` exits 2
    spec = write_spec(tmp_path, spec_text(bad, NATURAL, top='checkpoints = ["last"]'))
    out = tmp_path / "slurm"
    assert cluster(spec, out, "--wait") == 1
    err = capsys.readouterr().err
    log = out.resolve() / "logs" / "iat-seed0-train.log"
    failed = [line for line in err.splitlines() if line.startswith("  iat/seed0: failed (job")]
    assert len(failed) == 1 and "`iat train` exited 2" in failed[0] and f"(log: {log})" in failed[0], err
    assert "steps_inv" in log.read_text() and "iat: error: iat/seed0: job" in err
    assert "  pgd-at/seed0: done" in err and (out / "pgd-at" / "seed0" / "eval-last.json").is_file()
    table = json.loads((out / "table.json").read_text())
    assert not table["complete"] and [r["cell"] for r in table["rows"] if r["seeds"]] == ["pgd-at"]
    assert err.count("-> submitted job") == 2  # its own failure is not requeued nor resubmitted while waiting


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """A 12-epoch one-cell table (a few seconds of training), and its uninterrupted local run, started at once in
    the background for the requeue tests to compare with."""
    slurm_node_or_skip()
    folder = tmp_path_factory.mktemp("uninterrupted")
    spec = write_spec(folder, spec_text('\n[[cells]]\nname = "pgd-at"\n', NATURAL, epochs=12, batch=32, steps=2,
                                        top='checkpoints = ["last"]'))
    proc = local_run(spec, folder / "local", folder / "local.log")
    yield spec, folder / "local", proc
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def interrupt_mid_training(cluster, spec: Path, out: Path, how: list[str]) -> str:
    """Submit the table's job (saving after every batch), wait for its first checkpoint, then run `how JOBID`."""
    assert cluster(spec, out, "--checkpoint-minutes", "1e-5") == 0
    job = job_ids(out)["pgd-at/seed0"]
    run = out / "pgd-at" / "seed0"
    deadline = time.monotonic() + 120
    while not (run / "checkpoints" / "last.safetensors").is_file():
        assert time.monotonic() < deadline, "no checkpoint within 2 minutes"
        time.sleep(0.1)
    assert not (run / "metrics.jsonl").is_file() or (run / "metrics.jsonl").read_text().count("\n") < 12
    done = subprocess.run([*how, job], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return job


def check_resumed(cluster, capsys, spec: Path, out: Path, job: str, uninterrupted) -> str:
    """Wait for the cell: its own job (requeued) finishes it, resumed, with the uninterrupted run's weights."""
    capsys.readouterr()
    assert cluster(spec, out, "--wait") == 0  # the requeued job is still the cell's: nothing else is submitted
    err = capsys.readouterr().err
    assert "-> submitted" not in err and job_ids(out) == {"pgd-at/seed0": job}
    log = (out / "logs" / "pgd-at-seed0-train.log").read_text()
    assert log.count("$ iat train") == 2 and "$ iat train --resume" in log, log
    _, local, proc = uninterrupted
    assert proc.wait(timeout=300) == 0, (local.parent / "local.log").read_text()[-3000:]
    assert same_weights(out / "pgd-at" / "seed0", local / "pgd-at" / "seed0")
    assert numbers(out) == numbers(local)
    return log


@pytest.mark.slurm
def test_a_job_requeued_mid_training_resumes_to_the_uninterrupted_weights(tmp_path, cluster, capsys, uninterrupted):
    spec, out = uninterrupted[0], tmp_path / "slurm"
    job = interrupt_mid_training(cluster, spec, out, ["scontrol", "requeue"])
    assert "iat: interrupted" in check_resumed(cluster, capsys, spec, out, job, uninterrupted)  # SLURM's SIGTERM


@pytest.mark.slurm
def test_a_job_warned_of_its_time_limit_checkpoints_itself_and_requeues(tmp_path, cluster, capsys, uninterrupted):
    """SLURM's --signal=USR2@90 (what submitit asks for) sent at once: submitit calls CellJob.checkpoint, dumps the
    job it returns and requeues it; the job starts again and resumes."""
    spec, out = uninterrupted[0], tmp_path / "slurm"
    job = interrupt_mid_training(cluster, spec, out, ["scancel", "--signal=USR2"])
    check_resumed(cluster, capsys, spec, out, job, uninterrupted)
    submitit_log = (out / "slurm" / f"{job}_0_log.out").read_text()
    assert "Calling checkpoint method" in submitit_log and f"Requeued job {job}" in submitit_log


@pytest.mark.slurm
def test_a_cell_of_two_processes_trains_ddp_as_torchrun_does_and_evaluates_once(tmp_path, cluster, capsys):
    """--tasks-per-node 2 (on the CPU, gloo): the cell's job starts its training as a 2-task srun step, whose
    weights are a 2-process torchrun run's of the same cell config; its evaluation runs once, in the job itself."""
    spec = write_spec(tmp_path, spec_text('\n[[cells]]\nname = "pgd-at"\n', NATURAL, epochs=2, batch=32, steps=2,
                                          top='checkpoints = ["last"]'))
    out = tmp_path / "slurm"
    assert cluster(spec, out, "--wait", "--tasks-per-node", "2", "--cpus-per-cell", "2") == 0
    err = capsys.readouterr().err
    assert "  pgd-at/seed0: done" in err and "table in" in err
    log = (out / "logs" / "pgd-at-seed0-train.log").read_text()
    other = (out / "logs" / "pgd-at-seed0-train-task1.log").read_text()
    assert log.count('{"run"') == 1 and '{"run"' not in other, (log, other)  # rank 0 alone prints the summary
    assert log.splitlines()[0] == other.splitlines()[0].replace("train-task1", "train")  # one command
    assert not (out / "logs" / "pgd-at-seed0-eval-last-task1.log").exists()
    evals = (out / "logs" / "pgd-at-seed0-eval-last.log").read_text()
    assert evals.startswith("$ iat eval ") and evals.count("natural") >= 1
    config = out / "configs" / "pgd-at-seed0.json"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "iat"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    done = subprocess.run([*torchrun, "train", "--config", str(config), "--out", str(tmp_path / "torchrun"),
                           "--no-progress"], env={**env, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = weights(out / "pgd-at" / "seed0"), weights(tmp_path / "torchrun")
    assert a.keys() == b.keys()
    for key in a:  # the tolerance of tests/test_ddp.py
        assert torch.allclose(a[key], b[key], rtol=1e-4, atol=1e-5), key


def test_a_slurm_config_file_sets_the_resources_and_typed_flags_win(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))
    spec = write_spec(tmp_path, spec_text(TWO_CELLS, NATURAL))
    res = tmp_path / "cluster.toml"
    res.write_text('partition = "gpu"\ngpus_per_cell = 4\nnodes_per_cell = 2\ncpus_per_cell = 32\n'
                   'time_min = 240\nsbatch_extra = { qos = "high", exclusive = true }\n')
    argv = ["reproduce", str(spec), "--out", str(tmp_path / "out"), "--no-plots", "--dry-run", "--executor", "slurm",
            "--slurm-config", str(res), "--images-per-second", "1"]
    assert main([*argv, "--time-min", "60"]) == 0
    err = capsys.readouterr().err
    assert ("sbatch --job-name=iat-t-pgd-at-seed0 --nodes=2 --ntasks-per-node=4 --cpus-per-task=8 --time=60 "
            "--gpus-per-node=4 --partition=gpu --signal=USR2@90 --requeue --qos=high --exclusive\n") in err
    assert "(DDP: each of the job's 8 tasks runs the training" in err
    assert "at 8 GPU(s) per job" in err
    res.write_text('partition = "gpu"\nepochs = 3\n')
    assert main(argv) == 2
    assert "unknown key 'epochs'" in capsys.readouterr().err
    res.write_text('gpus_per_cell = 2\ntasks_per_node = 3\n')
    assert main(argv) == 2
    assert "needs a GPU of its own" in capsys.readouterr().err
    assert main([a for a in argv if a != "slurm" and a != "--executor"]) == 2
    assert "--slurm-config is for --executor slurm" in capsys.readouterr().err
    example = Path(__file__).resolve().parents[1] / "scripts" / "slurm" / "a100.toml"  # docs/cluster.md's file
    argv[argv.index(str(res))] = str(example)
    assert main(argv) == 0
    assert ("--nodes=1 --ntasks-per-node=1 --cpus-per-task=8 --time=720 --gpus-per-node=1 --partition=gpu "
            "--mem=65536MB --signal=USR2@90 --requeue --constraint=a100\n") in capsys.readouterr().err
