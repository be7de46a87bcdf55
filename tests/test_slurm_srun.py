"""`iat train` under SLURM's srun without torchrun: the environment reading (unit tests), and, marked `slurm`, a
2-task srun run on a real SLURM (scripts/slurm-local.sh starts one) that trains what a 2-process torchrun run trains."""
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from iat.errors import UsageError
from iat.runtime import distributed
from iat.runtime.distributed import expand_hostlist, slurm_env

from slurm_helpers import slurm_node_or_skip

SRC = str(Path(__file__).resolve().parents[1] / "src")
LAUNCH = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
# what srun sets in task 1 of a 2-task step of job 123456 on node[03-05] (a batch script lacks SLURM_STEP_ID)
TASK = {"SLURM_JOB_ID": "123456", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "2", "SLURM_PROCID": "1",
        "SLURM_LOCALID": "1", "SLURM_STEP_NODELIST": "node[03-05]", "SLURM_JOB_NODELIST": "node[01-05]"}


@pytest.fixture
def no_scontrol(monkeypatch):
    """The host list is read by expand_hostlist, as on a machine without SLURM's commands."""
    monkeypatch.setattr(distributed.shutil, "which", lambda name: None)


# ----------------------------------------------------------------- the host list

@pytest.mark.parametrize("nodelist, hosts", [
    ("vm", ["vm"]),
    ("a,b", ["a", "b"]),
    ("node[01-03,07]", ["node01", "node02", "node03", "node07"]),
    ("node[8-10]", ["node8", "node9", "node10"]),
    ("gpu[098-101],cpu-7", ["gpu098", "gpu099", "gpu100", "gpu101", "cpu-7"]),
    ("rack[1-2]-n[1,3]", ["rack1-n1", "rack1-n3", "rack2-n1", "rack2-n3"]),
    ("x[5]", ["x5"]),
])
def test_expand_hostlist(nodelist, hosts):
    assert expand_hostlist(nodelist) == hosts


@pytest.mark.parametrize("nodelist", ["", "a,,b", ",a", "a[1-3", "a]", "a[[1]]", "a[]", "a[3-1]", "a[1-]", "a[x]",
                                      "a[1-2,]"])
def test_a_malformed_hostlist_is_a_one_line_error(nodelist):
    with pytest.raises(UsageError, match="cannot read the SLURM host list") as err:
        expand_hostlist(nodelist)
    assert len(str(err.value).splitlines()) == 1


@pytest.mark.skipif(shutil.which("scontrol") is None, reason="scontrol is not on PATH")
@pytest.mark.parametrize("nodelist", ["vm", "a,b", "node[01-03,07]", "gpu[098-101],cpu-7", "r[1-2]n[1,3]"])
def test_expand_hostlist_agrees_with_scontrol(nodelist):
    done = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert expand_hostlist(nodelist) == done.stdout.split()


# ----------------------------------------------------------------- the environment

def test_a_task_of_a_multi_task_step_gets_torchruns_variables(no_scontrol):
    assert slurm_env(TASK) == {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "node03",
                               "MASTER_PORT": str(20000 + 123456 % 20000)}
    # the job's node list when the step's is missing; the user's MASTER_ADDR and MASTER_PORT win
    job_only = {k: v for k, v in TASK.items() if k != "SLURM_STEP_NODELIST"}
    assert slurm_env(job_only)["MASTER_ADDR"] == "node01"
    assert slurm_env({**TASK, "MASTER_ADDR": "10.0.0.9", "MASTER_PORT": "29600"})["MASTER_PORT"] == "29600"
    assert slurm_env({**TASK, "MASTER_ADDR": "10.0.0.9"})["MASTER_ADDR"] == "10.0.0.9"
    assert slurm_env({**TASK, "SLURM_JOB_ID": "7"})["MASTER_PORT"] == "20007"  # every task of job 7 agrees


@pytest.mark.skipif(shutil.which("scontrol") is None, reason="scontrol is not on PATH")
def test_the_first_host_comes_from_scontrol_when_it_is_there():
    assert slurm_env({**TASK, "SLURM_STEP_NODELIST": "gpu[098-101],cpu-7"})["MASTER_ADDR"] == "gpu098"


@pytest.mark.parametrize("change", [
    {"RANK": "0", "WORLD_SIZE": "2"},      # torchrun's variables win (torchrun started inside srun)
    {"LOCAL_RANK": "0"},
    {"SLURM_NTASKS": "1"},                 # a single-task srun stays single-process
    {"SLURM_STEP_ID": None},               # a batch script sees its allocation's SLURM_NTASKS but runs once
    {"SLURM_PROCID": None},
])
def test_what_stays_as_it_was(change):
    env = {**TASK, **change}
    assert slurm_env({k: v for k, v in env.items() if v is not None}) == {}
    assert slurm_env({}) == {}


@pytest.mark.parametrize("change, message", [
    ({"SLURM_PROCID": "one"}, "SLURM_PROCID must be an integer, got 'one'"),
    ({"SLURM_NTASKS": "0"}, "SLURM_NTASKS must be an integer >= 1"),
    ({"SLURM_PROCID": "2"}, "SLURM_PROCID=2 must be below SLURM_NTASKS=2"),
    ({"SLURM_LOCALID": "-1"}, "SLURM_LOCALID must be an integer >= 0"),
    ({"SLURM_JOB_ID": None}, "set MASTER_PORT"),
    ({"SLURM_JOB_ID": "12x"}, "SLURM_JOB_ID must be an integer"),
    ({"MASTER_PORT": "70000"}, "MASTER_PORT must be a TCP port"),
    ({"MASTER_PORT": "http"}, "MASTER_PORT must be an integer"),
    ({"SLURM_STEP_NODELIST": None, "SLURM_JOB_NODELIST": None}, "set MASTER_ADDR"),
    ({"SLURM_STEP_NODELIST": "node[1-"}, "cannot read the SLURM host list 'node[1-'"),
])
def test_bad_values_are_one_line_errors(no_scontrol, change, message):
    env = {k: v for k, v in {**TASK, **change}.items() if v is not None}
    with pytest.raises(UsageError, match=re.escape(message)) as err:
        slurm_env(env)
    assert len(str(err.value).splitlines()) == 1


def test_setup_writes_the_variables_into_the_environment(monkeypatch, no_scontrol):
    """So that every reader of RANK / WORLD_SIZE / LOCAL_RANK (and torch's env:// rendezvous) sees one place."""
    for name in LAUNCH:  # set then deleted, so monkeypatch restores their absence afterwards
        monkeypatch.setenv(name, "0")
        monkeypatch.delenv(name)
    for name, value in {**TASK, "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}.items():
        monkeypatch.setenv(name, value)
    joined = []
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda backend: joined.append(backend))
    monkeypatch.setattr(distributed.atexit, "register", lambda fn: None)
    distributed.setup(torch.device("cpu"))
    assert joined == ["gloo"]
    assert {k: os.environ[k] for k in LAUNCH} == {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0",
                                                  "MASTER_ADDR": "node03", "MASTER_PORT": "23456"}


def test_a_single_task_srun_stays_single_process(monkeypatch):
    for name in LAUNCH:
        monkeypatch.setenv(name, "0")
        monkeypatch.delenv(name)
    for name, value in {**TASK, "SLURM_NTASKS": "1", "SLURM_PROCID": "0"}.items():
        monkeypatch.setenv(name, value)
    me, device = distributed.setup(torch.device("cpu"))
    assert (me.enabled, device.type) == (False, "cpu")
    assert not any(name in os.environ for name in LAUNCH)


@pytest.mark.parametrize("gpus, local_rank, index", [(1, 3, 0), (4, 3, 3), (2, 3, 1), (0, 1, 0)])
def test_a_task_that_sees_only_its_own_gpu_uses_cuda_0(monkeypatch, gpus, local_rank, index):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    assert distributed.cuda_index(local_rank) == index


# ----------------------------------------------------------------- a real srun

# 12 batches of 32 an epoch (16 per rank), 2 epochs: a few seconds; timed checkpoints make rank 0's clock decide
# for both ranks once per batch (distributed.from_main)
TRAIN = ["train", "--method", "pgd-at", "--dataset", "synthetic", "--model", "cnn", "--epochs", "2",
         "--batch-size", "32", "--val-size", "128", "--steps", "2", "--val-steps", "1", "--val-examples", "64",
         "--seed", "5", "--device", "cpu", "--speed-layout", "nchw", "--speed-compile", "false",
         "--checkpoint-every-minutes", "1e-5", "--no-progress"]
TIMING = ("epoch_seconds", "images_per_second")


def launch_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH}
    return {**env, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def run_lines(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if '{"run"' in line]


def metric_lines(run: Path) -> list[dict]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in line.items() if k not in TIMING} for line in lines]


@pytest.mark.slurm
def test_srun_two_tasks_train_what_torchrun_two_processes_train(tmp_path):
    from iat.runtime.checkpoint import load_checkpoint

    slurm_node_or_skip()
    iat = Path(sys.executable).with_name("iat")  # the venv's entry point, by full path
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "iat"]
    t0 = time.monotonic()
    done = subprocess.run([*torchrun, *TRAIN, "--out", str(tmp_path / "torchrun")], env=launch_env(), cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    t1 = time.monotonic()
    name = f"iat-test-srun-{os.getpid()}"
    srun = ["srun", "--ntasks", "2", "--cpus-per-task", "1", "--time", "5", "--kill-on-bad-exit=1", "--label",
            "--job-name", name]
    try:
        job = subprocess.run([*srun, str(iat), *TRAIN, "--out", str(tmp_path / "srun")], env=launch_env(),
                             cwd=tmp_path, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        subprocess.run(["scancel", "--name", name], timeout=30)
        raise
    t2 = time.monotonic()
    print(f"torchrun {t1 - t0:.1f}s, srun {t2 - t1:.1f}s")
    assert job.returncode == 0, f"srun exit {job.returncode}:\n{job.stdout[-2000:]}\n{job.stderr[-3000:]}"
    # srun --label prefixes each task's lines with its rank: rank 0 alone printed the summary, as under torchrun
    assert [line.split(":")[0].strip() for line in run_lines(job.stdout)] == ["0"], job.stdout
    assert len(run_lines(done.stdout)) == 1
    a, b = (load_checkpoint(tmp_path / r / "checkpoints" / "last.safetensors") for r in ("torchrun", "srun"))
    assert a["model"].keys() == b["model"].keys()
    diffs = {key: float((a["model"][key] - b["model"][key]).abs().max()) for key in a["model"]}
    print(f"largest weight difference srun vs torchrun: {max(diffs.values()):.3g}")
    for key in a["model"]:  # the tolerance of tests/test_ddp.py
        assert torch.allclose(a["model"][key], b["model"][key], rtol=1e-4, atol=1e-5), f"{key}: {diffs[key]}"
    assert (a["progress"]["epoch"], b["progress"]["epoch"]) == (2, 2)
    ma, mb = (metric_lines(tmp_path / r) for r in ("torchrun", "srun"))
    assert len(ma) == len(mb) == 2
    for la, lb in zip(ma, mb, strict=True):
        assert la.keys() == lb.keys()
        for key in la:  # numbers to the same tolerance, everything else (flags, epochs, None) exactly
            close = isinstance(la[key], (float, dict)) and la[key] is not None
            assert la[key] == (pytest.approx(lb[key], rel=1e-4, abs=1e-5) if close else lb[key]), key


# ----------------------------------------------------------------- the sbatch example of docs/cluster.md

SBATCH = Path(__file__).resolve().parents[1] / "scripts" / "slurm" / "train-resnet18.sbatch"
TINY_CONFIG = """
method = "pgd-at"
model = "cnn"
device = "cpu"
[data]
name = "synthetic"
val_size = 64
[optim]
epochs = 12
batch_size = 64
[threat]
eps = "8/255"
step_size = "4/255"
steps = 1
[val]
steps = 1
n_examples = 32
"""


def _job_state(job: str) -> str:
    done = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True, timeout=30)
    return done.stdout.strip() or "GONE"


def _wait_gone(job: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while _job_state(job) != "GONE":
        if time.monotonic() > deadline:
            subprocess.run(["scancel", job], timeout=30)
            pytest.fail(f"job {job} still {_job_state(job)} after {timeout:.0f} s")
        time.sleep(0.5)


@pytest.mark.slurm
def test_the_sbatch_example_trains_requeues_on_its_signal_and_resumes(tmp_path):
    """scripts/slurm/train-resnet18.sbatch as docs/cluster.md shows it, on this one-node SLURM: its #SBATCH lines
    stand, but for the GPUs this machine lacks and a size that fits it (overridden on the command line). The
    signal it asks for before the time limit is sent early (scancel --signal=USR1 --batch): the script requeues
    its own job, which runs again from the top and resumes the run; it ends with every epoch trained once."""
    slurm_node_or_skip()
    script = tmp_path / "train.sbatch"
    script.write_text("".join(line for line in SBATCH.read_text().splitlines(keepends=True)
                              if not line.startswith("#SBATCH --gpus")))
    (tmp_path / "tiny.toml").write_text(TINY_CONFIG)
    env = {**launch_env(), "CONFIG": str(tmp_path / "tiny.toml"), "OUT": str(tmp_path / "run"),
           "IAT": str(Path(sys.executable).with_name("iat"))}
    submit = subprocess.run(["sbatch", "--parsable", "--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1",
                             "--time=5", f"--output={tmp_path}/job-%j.out", f"--chdir={tmp_path}", str(script)],
                            env=env, capture_output=True, text=True, timeout=60)
    assert submit.returncode == 0, submit.stderr
    job = submit.stdout.strip().split(";")[0]
    run = tmp_path / "run"
    deadline = time.monotonic() + 180
    while not (run / "checkpoints" / "last.safetensors").exists():  # the first epoch is saved: signal now
        assert time.monotonic() < deadline and _job_state(job) != "GONE", (tmp_path / f"job-{job}.out").read_text()
        time.sleep(0.2)
    assert subprocess.run(["scancel", "--signal=USR1", "--batch", job], timeout=30).returncode == 0
    _wait_gone(job, 240)
    log = (tmp_path / f"job-{job}.out").read_text()
    assert f"requeueing job {job}" in log, log
    shown = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True, timeout=30).stdout
    assert "Restarts=1" in shown and "JobState=COMPLETED" in shown, shown + log
    epochs = [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert epochs == list(range(1, 13)), log  # resumed, not restarted, and no epoch twice
