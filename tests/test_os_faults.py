"""Operating-system errors on the paths a user gives end like any other bad input: one line that names the path
and says what to do, exit status 2, nothing written. One table of real faults (a file where a folder must be, a
name too long for the file system, a symbolic-link loop, an immutable file) across every command that takes a
path, and the one mapping (`errors.os_error_line`) that `iat`'s main applies to every command."""
import errno
import os
import subprocess
from pathlib import Path

import pytest
from cli_helpers import FAST, train_tiny

from iat.cli import main
from iat.errors import OS_ERRORS, os_error_line

LONG = "n" * 300  # longer than the 255 bytes a name may have on ext4, xfs, btrfs, tmpfs

SPEC = """
title = "one cell"
seeds = [0]
[config]
method = "standard"
model = "cnn"
[config.data]
name = "synthetic"
val_size = 64
[config.optim]
epochs = 1
batch_size = 64
[config.val]
n_examples = 16
[[cells]]
name = "standard"
[[evals]]
attacks = "natural"
n_examples = 16
"""


@pytest.fixture(scope="module")
def place(tmp_path_factory):
    """A folder with a file in it, a symlink loop, a finished run and a table spec."""
    root = tmp_path_factory.mktemp("faults")
    (root / "afile").write_text("not a folder")
    (root / "loop").symlink_to(root / "loop")
    train_tiny(root / "run")
    (root / "spec.toml").write_text(SPEC)
    return root


# (command with {root} for the folder above, the path the message must name)
FAULTS = {
    "train: --out under a file": (["train", *FAST, "--out", "{root}/afile/run"], "afile"),
    "train: --out name too long": (["train", *FAST, "--out", "{root}/" + LONG], LONG),
    "train: --out a symlink loop": (["train", *FAST, "--out", "{root}/loop"], "loop"),
    "train: --out through a symlink loop": (["train", *FAST, "--out", "{root}/loop/run"], "loop"),
    "eval: --out under a file": (["eval", "{root}/run", "--attacks", "natural", "--n-examples", "8",
                                  "--out", "{root}/afile/e.json"], "afile"),
    "eval: --out name too long": (["eval", "{root}/run", "--attacks", "natural", "--n-examples", "8",
                                   "--out", "{root}/" + LONG + ".json"], LONG),
    "eval: --out a symlink loop": (["eval", "{root}/run", "--attacks", "natural", "--n-examples", "8",
                                    "--out", "{root}/loop"], "loop"),
    "report: --out under a file": (["report", "{root}/run", "--out", "{root}/afile/r"], "afile"),
    "report: --out name too long": (["report", "{root}/run", "--out", "{root}/" + LONG], LONG),
    "reproduce: --out under a file": (["reproduce", "{root}/spec.toml", "--out", "{root}/afile/t"], "afile"),
    "reproduce: --out name too long": (["reproduce", "{root}/spec.toml", "--out", "{root}/" + LONG], LONG),
    "data fetch: --root under a file": (["data", "fetch", "mnist", "--root", "{root}/afile/d"], "afile"),
    "data fetch: --root name too long": (["data", "fetch", "mnist", "--root", "{root}/" + LONG], LONG),
}


def _snapshot(root: Path) -> dict[str, float]:
    return {str(p): p.lstat().st_mtime for p in root.rglob("*")}


@pytest.mark.parametrize("argv,named", FAULTS.values(), ids=FAULTS.keys())
def test_a_path_fault_is_one_line_with_exit_2_and_writes_nothing(place, argv, named, capsys):
    before = _snapshot(place)
    code = main([a.format(root=place) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("iat: error:") and named in err[0], err
    assert "Errno" not in err[0]  # the reading, not Python's repr
    assert _snapshot(place) == before


def test_the_data_root_from_the_environment_is_checked_before_any_download(place, capsys, monkeypatch):
    monkeypatch.setenv("IAT_DATA_DIR", str(place / "afile"))
    assert main(["data", "fetch", "mnist"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "afile is a file, not a folder" in err[0] and "IAT_DATA_DIR" in err[0], err


def test_an_immutable_file_in_a_run_folder_is_named(place, tmp_path, capsys):
    """`chattr +i` on the eval file that `iat eval --overwrite` must replace: EPERM, named, exit 2."""
    from test_overwrite_safety import _chattr_location

    folder = _chattr_location(tmp_path)
    run = train_tiny(folder / "run")
    out = run / "eval-best.json"
    assert main(["eval", str(run), "--attacks", "natural", "--n-examples", "8", "--no-progress"]) == 0
    capsys.readouterr()
    subprocess.run(["chattr", "+i", str(out)], check=True)
    try:
        content = out.read_bytes()
        code = main(["eval", str(run), "--attacks", "natural", "--n-examples", "16", "--overwrite", "--no-progress"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and "eval-best" in err[0], err
        assert out.read_bytes() == content
    finally:
        subprocess.run(["chattr", "-i", str(out)], check=True)


@pytest.mark.parametrize("code", sorted(OS_ERRORS), ids=[errno.errorcode[c] for c in sorted(OS_ERRORS)])
def test_every_mapped_error_names_its_path_and_what_to_do(code):
    message, status = os_error_line(OSError(code, os.strerror(code), "/some/path"))
    what, todo = OS_ERRORS[code]
    assert status == 2 and message.startswith("/some/path: ") and what in message and message.endswith(todo)
    assert "\n" not in message


def test_other_os_errors_keep_status_1_and_the_systems_words():
    message, status = os_error_line(OSError(errno.EIO, os.strerror(errno.EIO), "/dev/sdz"))
    assert status == 1 and "/dev/sdz" in message and os.strerror(errno.EIO) in message
    message, status = os_error_line(OSError(errno.EXDEV, os.strerror(errno.EXDEV), "/a", None, "/b"))
    assert status == 2 and message.startswith("/a -> /b: ")


def test_main_maps_an_os_error_that_escapes_a_command(monkeypatch, capsys):
    """The mapping sits in main, so a command that lets an OSError through still ends with one line, exit 2."""
    import iat.cli as cli

    def fails(args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/full/disk/run")

    monkeypatch.setitem(cli.COMMANDS, "list", (cli.COMMANDS["list"][0], fails))
    assert main(["list", "methods"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"iat: error: /full/disk/run: {OS_ERRORS[errno.ENOSPC][0]} (No space left on device); " \
                  f"{OS_ERRORS[errno.ENOSPC][1]}"


@pytest.mark.parametrize("env", [{"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"},
                                 {"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_STEP_ID": "0", "SLURM_LOCALID": "1",
                                  "SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "localhost"}],
                         ids=["torchrun", "srun"])
def test_an_error_every_rank_meets_is_printed_by_rank_0_alone(env, monkeypatch, capsys):
    """Under torchrun or srun every rank reads the same bad config: one line from rank 0, none from the others,
    and every rank exits with status 2."""
    bad = ["train", *FAST, "--epochs", "0", "--out", "unused"]
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert main(bad) == 2
    assert capsys.readouterr().err == ""
    rank0 = {k: "0" for k in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "SLURM_LOCALID") if k in env}
    for key, value in rank0.items():
        monkeypatch.setenv(key, value)
    assert main(bad) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "epochs" in err[0]


@pytest.mark.parametrize("env", [{"RANK": "2", "WORLD_SIZE": "4", "LOCAL_RANK": "0"},
                                 {"SLURM_PROCID": "2", "SLURM_NTASKS": "4", "SLURM_STEP_ID": "0", "SLURM_LOCALID": "0",
                                  "SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "localhost"}],
                         ids=["torchrun", "srun"])
def test_the_first_rank_of_another_node_names_itself_in_its_error(env, monkeypatch, capsys):
    """A node of its own may lack what rank 0's has (its copy of the data): its first rank says so, naming its
    rank and host, so a multi-node run does not fail in silence there."""
    import socket

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert main(["train", *FAST, "--epochs", "0", "--out", "unused"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"iat: error (rank 2, {socket.gethostname()}): ") and "epochs" in err[0]
