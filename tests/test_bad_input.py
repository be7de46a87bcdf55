"""Bad input: a one-line error, exit status 2, and nothing that existed is touched.

Each train case runs with --overwrite on a run directory that already holds a run, so a check made
after the old run was cleared would show up as lost files.
"""
import os
import pickle
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from iat.runtime.checkpoint import load_checkpoint, save_checkpoint
from iat.cli import main
from iat.data import load_dataset
from iat.data import mnist as mnist_mod
from iat.data.idx import write_idx
from iat.models import create_model
from iat.errors import UsageError
from iat.evaluation.loading import load_model_file

SRC = str(Path(__file__).resolve().parents[1] / "src")
FAST = ["--method", "standard", "--dataset", "synthetic", "--model", "cnn", "--epochs", "1", "--batch-size", "64",
        "--val-size", "128", "--val-examples", "64", "--val-steps", "1", "--no-progress"]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def old_run(tmp_path) -> Path:
    """A run directory that already holds a run (contents need not be real for these tests)."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.json").write_text('{"config": {}}\n')
    (run / "metrics.jsonl").write_text('{"epoch": 1}\n')
    save_checkpoint(run / "checkpoints" / "last.safetensors", {"kind": "train-state", "w": torch.ones(3)})
    return run


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("IAT_CACHE_DIR", str(tmp_path / "cache"))


# ----------------------------------------------------------------- data on disk, damaged in one way each

def idx_folder(root: Path, train_x: np.ndarray, train_y: np.ndarray) -> Path:
    folder = root / "mnist"
    rng = np.random.default_rng(0)
    write_idx(folder / "train-images-idx3-ubyte", train_x)
    write_idx(folder / "train-labels-idx1-ubyte", train_y)
    write_idx(folder / "t10k-images-idx3-ubyte", rng.integers(0, 256, (8, 8, 8), dtype=np.uint8))
    write_idx(folder / "t10k-labels-idx1-ubyte", np.arange(8, dtype=np.uint8))
    return root


def unchecked_mnist(monkeypatch) -> None:
    """Generated IDX files have no official md5: skip that check to reach the next one."""
    monkeypatch.setitem(mnist_mod.MD5, "mnist", {stem: (None, None) for stem in mnist_mod.STEMS})


def image_tree(root: Path, sizes=((8, 8), (8, 8))) -> Path:
    for split in ("train", "test"):
        for c, name in enumerate(("ant", "bee")):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i, size in enumerate(sizes):
                Image.new("RGB", size, (40 * c, 10 * i, 99)).save(folder / f"{i}.png")
    return root


def wrong_checksum(tmp, mp):
    rng = np.random.default_rng(1)
    root = idx_folder(tmp / "data", rng.integers(0, 256, (20, 8, 8), dtype=np.uint8), np.arange(20, dtype=np.uint8) % 10)
    return ["--dataset", "mnist", "--data-dir", str(root)]


def labels_out_of_range(tmp, mp):
    unchecked_mnist(mp)
    rng = np.random.default_rng(1)
    root = idx_folder(tmp / "data", rng.integers(0, 256, (20, 8, 8), dtype=np.uint8), np.full(20, 12, dtype=np.uint8))
    return ["--dataset", "mnist", "--data-dir", str(root)]


def empty_data_set(tmp, mp):
    unchecked_mnist(mp)
    root = idx_folder(tmp / "data", np.zeros((0, 8, 8), dtype=np.uint8), np.zeros(0, dtype=np.uint8))
    return ["--dataset", "mnist", "--data-dir", str(root)]


def truncated_archive(tmp, mp):
    tree = image_tree(tmp / "tree")
    archive = tmp / "images.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tree / "train", arcname="train")
        tar.add(tree / "test", arcname="test")
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    return ["--dataset", "imagefolder", "--data-dir", str(archive)]


def images_of_mixed_shapes(tmp, mp):
    return ["--dataset", "imagefolder", "--data-dir", str(image_tree(tmp / "tree", sizes=((8, 8), (9, 7))))]


def malformed_config(tmp, mp):
    (tmp / "bad.toml").write_text("[optim\nlr = ")
    return ["--config", str(tmp / "bad.toml")]


def unknown_config_key(tmp, mp):
    (tmp / "typo.toml").write_text("[optim]\nlearning_rate = 0.1\n")
    return ["--config", str(tmp / "typo.toml")]


CASES = {
    "unknown method": (lambda t, m: ["--method", "nope"], "unknown method 'nope'"),
    "unknown model": (lambda t, m: ["--model", "nope"], "unknown model 'nope'"),
    "unknown data set": (lambda t, m: ["--dataset", "nope"], "unknown data set 'nope'"),
    "unknown attack": (lambda t, m: ["--set", "val.attack=nope"], "unknown attack 'nope'"),
    "eps negative": (lambda t, m: ["--eps=-8/255"], "eps must be in [0, 1]"),
    "eps above 1": (lambda t, m: ["--eps", "1.5"], "eps must be in [0, 1]"),
    "step size 0": (lambda t, m: ["--step-size", "0"], "step size must be positive"),
    "steps 0": (lambda t, m: ["--steps", "0"], "steps must be at least 1"),
    "malformed config file": (malformed_config, "is malformed"),
    "config key that does not exist": (unknown_config_key, "unknown config key 'optim.learning_rate'"),
    "--set key that does not exist": (lambda t, m: ["--set", "optim.nonsense=1"], "unknown config key"),
    "missing data folder": (lambda t, m: ["--dataset", "mnist", "--data-dir", str(t / "nowhere")], "not found"),
    "wrong checksum": (wrong_checksum, "md5 is"),
    "truncated archive": (truncated_archive, "truncated or corrupt"),
    "images of mixed shapes": (images_of_mixed_shapes, "all images must have the same size"),
    "labels out of range": (labels_out_of_range, "must lie in [0, 10)"),
    "empty data set": (empty_data_set, "is empty"),
    "batch size above data set": (lambda t, m: ["--batch-size", "100000"], "larger than the training split"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_train_input(case, old_run, tmp_path, monkeypatch, capsys):
    make_args, message = CASES[case]
    args = make_args(tmp_path, monkeypatch)
    before = snapshot(tmp_path)
    assert main(["train", *FAST, "--out", str(old_run), "--overwrite", *args]) == 2
    # Progress notes of the data loaders ("[iat.data] decoding ...") may come first; the error is one line.
    lines = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("[iat.data]")]
    assert len(lines) == 1 and lines[0].startswith("iat: error: ") and message in lines[0], lines
    assert snapshot(tmp_path) == before


def test_output_folder_under_a_file_is_refused(tmp_path, capsys):
    blocker = tmp_path / "somefile"
    blocker.write_text("not a folder")
    assert main(["train", *FAST, "--out", str(blocker / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is a file, not a folder" in err
    assert blocker.read_text() == "not a folder"


def test_read_only_output_folder_is_refused(capsys):
    target = Path("/sys/iat-test-run")  # read-only even for root in containers and on hosts
    if not Path("/sys").is_dir() or not _write_fails("/sys"):
        pytest.skip("no read-only folder to test against")
    assert main(["train", *FAST, "--out", str(target)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot write to /sys" in err


def _write_fails(folder: str) -> bool:
    try:
        Path(folder, ".iat-probe").write_text("")
    except OSError:
        return True
    Path(folder, ".iat-probe").unlink()
    return False


# ----------------------------------------------------------------- checkpoints: damaged, foreign, malicious

@pytest.fixture(scope="module")
def real_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("real") / "run"
    assert main(["train", *FAST, "--out", str(run)]) == 0
    return run


def copy_run(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_truncated_checkpoint_on_resume(real_run, tmp_path, capsys):
    run = copy_run(real_run, tmp_path / "run")
    last = run / "checkpoints" / "last.safetensors"
    last.write_bytes(last.read_bytes()[:-100])
    before = snapshot(run)
    assert main(["train", "--resume", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "truncated" in err
    assert snapshot(run) == before


def test_truncated_checkpoint_on_eval(real_run, tmp_path, capsys):
    path = tmp_path / "cut.safetensors"
    path.write_bytes((real_run / "checkpoints" / "best.safetensors").read_bytes()[:5000])
    assert main(["eval", str(path), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "truncated" in err
    assert not path.with_suffix(".eval.json").exists()


def test_checkpoint_of_another_architecture_on_resume(real_run, tmp_path, capsys):
    run = copy_run(real_run, tmp_path / "run")
    state = load_checkpoint(run / "checkpoints" / "last.safetensors")
    state["resolved"]["config"]["model"] = state["resolved"]["model"]["name"] = "cnn4"
    state["model"] = create_model("cnn4", num_classes=4, in_channels=1, input_size=16, mean=[0.5],
                                  std=[0.25]).state_dict()
    save_checkpoint(run / "checkpoints" / "last.safetensors", state)
    before = snapshot(run)
    assert main(["train", "--resume", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "config.model would be 'cnn' but" in err and "'cnn4'" in err
    assert snapshot(run) == before


def test_checkpoint_weights_that_do_not_fit_their_spec(real_run, tmp_path, capsys):
    path = tmp_path / "odd.safetensors"
    state = load_checkpoint(real_run / "checkpoints" / "best.safetensors")
    state["model_spec"]["num_classes"] = 10  # the weights are for 4 classes
    save_checkpoint(path, state)
    assert main(["eval", str(path), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "does not fit model cnn" in err


def test_malformed_run_config_on_resume(real_run, tmp_path, capsys):
    run = copy_run(real_run, tmp_path / "run")
    (run / "config.json").write_text('{"config": {"optim": ')
    before = snapshot(run)
    assert main(["train", "--resume", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is damaged" in err
    assert snapshot(run) == before


def test_unknown_attack_on_eval(real_run, capsys):
    before = snapshot(real_run)
    assert main(["eval", str(real_run), "--attacks", "natural,nope", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "unknown attack 'nope'" in err
    assert snapshot(real_run) == before


class Payload:
    """Unpickling this runs code: it writes the file `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


def malicious_pt(path: Path, marker: Path) -> Path:
    torch.save({"normalize.mean": torch.zeros(1), "net.weight": Payload(marker)}, path)
    return path


def test_the_payload_is_real(tmp_path):
    """Control: plain unpickling does run it, so the refusals below mean something."""
    marker = tmp_path / "ran"
    torch.load(malicious_pt(tmp_path / "evil.pt", marker), weights_only=False)
    assert marker.exists()


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    bundle = load_dataset("synthetic")
    with pytest.raises(UsageError, match=r"refusing to load .*evil\.pt.*could run code"):
        load_model_file(malicious_pt(tmp_path / "evil.pt", marker), model="cnn", bundle=bundle)
    assert not marker.exists()


def test_malicious_pickle_on_the_command_line(tmp_path):
    marker = tmp_path / "pwned"
    evil = malicious_pt(tmp_path / "evil.pt", marker)
    done = subprocess.run([sys.executable, "-m", "iat", "eval", str(evil), "--model", "cnn", "--dataset", "synthetic",
                           "--no-progress"], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": SRC})
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1 and "refusing to load" in done.stderr
    assert not marker.exists() and not evil.with_suffix(".eval.json").exists()


def test_plain_state_dict_pt_loads_weights_only(tmp_path):
    bundle = load_dataset("synthetic")
    torch.manual_seed(0)
    net = create_model("cnn", num_classes=4, in_channels=1, input_size=16, mean=bundle.mean, std=bundle.std)
    torch.save({"state_dict": net.state_dict()}, tmp_path / "net.pt")
    loaded, state = load_model_file(tmp_path / "net.pt", model="cnn", bundle=bundle)
    x = torch.rand(2, 1, 16, 16)
    assert torch.equal(loaded(x), net.eval()(x)) and state["kind"] == "state-dict"
    with pytest.raises(UsageError, match="--model NAME and --dataset NAME"):
        load_model_file(tmp_path / "net.pt")
    other = load_dataset("synthetic", num_classes=10)
    with pytest.raises(UsageError, match="another architecture or class count"):
        load_model_file(tmp_path / "net.pt", model="cnn", bundle=other)
    with pytest.raises(UsageError, match="does not fit model cnn4"):
        load_model_file(tmp_path / "net.pt", model="cnn4", bundle=bundle)
    cut = tmp_path / "cut.pt"
    cut.write_bytes((tmp_path / "net.pt").read_bytes()[:300])
    with pytest.raises(UsageError, match="unreadable or truncated"):
        load_model_file(cut, model="cnn", bundle=bundle)


# ----------------------------------------------------------------- a real process: exit status and stderr

@pytest.mark.parametrize("args", [["train", "--method", "nope", "--out", "{tmp}/run"],
                                  ["train", "--resume", "{tmp}/nowhere"]])
def test_real_process_exit_2_one_line_no_traceback(tmp_path, args):
    argv = [a.format(tmp=tmp_path) for a in args]
    env = {**os.environ, "PYTHONPATH": SRC}
    done = subprocess.run([sys.executable, "-m", "iat", *argv], capture_output=True, text=True, env=env)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and done.stderr.startswith("iat: error: ")
    assert not (tmp_path / "run").exists()
    debug = subprocess.run([sys.executable, "-m", "iat", "--debug", *argv], capture_output=True, text=True, env=env)
    assert debug.returncode != 0 and "Traceback" in debug.stderr


# ----------------------------------------------------------------- run folders: created only after every check

@pytest.mark.parametrize("bad, message", [
    (["-O", "beta=-1"], "method option beta must be in [0, inf)"),                 # method build
    (["--batch-size", "100000"], "larger than the training split"),                 # sizes
    (["--dataset", "mnist", "--data-dir", "{tmp}/nowhere"], "not found"),           # data set present
    (["--model", "resnet18", "--set", "data.val_size=-1"], "val_size"),             # config value
])
@pytest.mark.parametrize("existed", [False, True])
def test_a_failing_check_leaves_nothing_so_the_corrected_command_runs(bad, message, existed, tmp_path, capsys):
    """iat 0.1 left config.json behind, so the corrected command was refused ("already holds a run")."""
    out = tmp_path / "run"
    if existed:
        out.mkdir()
    args = ["train", *FAST, "--method", "trades", "--out", str(out)]
    assert main([*args, *(a.format(tmp=tmp_path) for a in bad)]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("[iat.data]")]
    assert len(lines) == 1 and message in lines[0], lines
    assert out.exists() == existed and (not existed or list(out.iterdir()) == [])
    assert main(args) == 0  # no --overwrite needed
    assert (out / "config.json").is_file()


def test_a_folder_of_other_files_is_neither_appended_to_nor_replaced(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    before = snapshot(out)
    for extra in ([], ["--overwrite"]):
        assert main(["train", *FAST, "--out", str(out), *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "holds files that are not an iat run" in err
        assert snapshot(out) == before and sorted(p.name for p in out.iterdir()) == ["notes.txt"]


# ----------------------------------------------------------------- iat eval: one writer per results file

def _hold_lock_in_a_child(path: Path) -> subprocess.Popen:
    code = ("import sys, time; from pathlib import Path; from iat.training.run_dir import run_lock\n"
            "with run_lock(Path(sys.argv[1])):\n    print('locked', flush=True); time.sleep(120)")
    child = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": SRC})
    assert child.stdout.readline().strip() == "locked"
    return child


def test_a_second_eval_writing_the_same_results_is_refused_and_a_dead_holder_is_taken_over(real_run, tmp_path,
                                                                                            capsys):
    from iat.training.run_dir import lock_path

    results = tmp_path / "res.json"
    args = ["eval", str(real_run), "--attacks", "natural", "--n-examples", "16", "--no-progress", "--out", str(results)]
    holder = _hold_lock_in_a_child(results)
    try:
        assert main(args) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"pid {holder.pid}" in err and not results.exists()
    finally:
        holder.kill()  # SIGKILL: no cleanup runs, the lock file stays with a dead pid in it
        holder.wait()
    assert lock_path(results).read_text() == str(holder.pid)
    assert main(args) == 0 and results.is_file()  # the kernel released the dead holder's lock
    assert not lock_path(results).exists()


def test_sigterm_during_eval_says_nothing_was_written(real_run, tmp_path):
    import signal
    import time

    from iat.training.run_dir import lock_path

    results = tmp_path / "res.json"
    proc = subprocess.Popen([sys.executable, "-m", "iat", "eval", str(real_run), "--attacks", "pgd100",
                             "--restarts", "20", "--no-progress", "--out", str(results)],
                            env={**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not lock_path(results).exists():  # taken just before the evaluation starts
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == "iat: interrupted; no results were written (they are written when the " \
                                           "evaluation ends)"
    assert not results.exists() and not lock_path(results).exists()


@pytest.mark.parametrize("args, message", [
    (["eval", "{run}", "--attacks", "pgd20:steps=x"], "attack pgd20: steps must be a number"),
    (["eval", "{run}", "--attacks", "pgd20:restarts=2.5"], "attack pgd20: restarts must be an integer"),
    (["report", "{run}", "--out", "{run}/config.json", "--eval-missing"], "is a file, not a folder"),
])
def test_eval_and_report_name_the_bad_value(args, message, real_run, capsys):
    before = snapshot(real_run)
    assert main([a.format(run=real_run) for a in args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert snapshot(real_run) == before
