"""Time-based checkpoints (--checkpoint-every-minutes): a requeued job loses at most that much training, and the
saves never change the arithmetic, in one run or across a kill and --resume."""
import json
import signal

import pytest

from iat import config as C
from iat.cli import main
from iat.runtime.checkpoint import load_checkpoint
from iat.training.trainer import Trainer
from test_resume import assert_same_run, run_iat, wait_for_mid_epoch_checkpoint

TINY_MINUTES = "1e-5"  # 0.6 ms: a save after (nearly) every batch, whatever the machine's speed
# 12 batches an epoch, no step-based checkpoints: every mid-epoch save is a timed one
RUN = ["--method", "pgd-at", "--dataset", "synthetic", "--model", "cnn", "--epochs", "2", "--batch-size", "32",
       "--val-size", "128", "--steps", "1", "--val-steps", "1", "--val-examples", "64", "--seed", "4",
       "--device", "cpu", "--speed-layout", "nchw", "--speed-compile", "false", "--no-progress"]


def cfg(minutes: float = 0.0) -> C.TrainConfig:
    out = C.TrainConfig(method="pgd-at", model="cnn", seed=2, device="cpu", progress=False,
                        checkpoint_every_minutes=minutes)
    C.update(out, {"data": {"name": "synthetic", "val_size": 128}, "optim": {"epochs": 2, "batch_size": 64},
                   "threat": {"steps": 1}, "val": {"steps": 1, "n_examples": 64},
                   "speed": {"layout": "nchw", "compile": False}})
    return out


def mid_epoch_saves(trainer: Trainer, monkeypatch) -> list[tuple[int, int]]:
    """(epoch, step) of each training-state save the trainer makes mid-epoch, filled in as it trains."""
    saves, save = [], trainer.save

    def counting_save():
        if trainer.progress.step:
            saves.append((trainer.progress.epoch, trainer.progress.step))
        save()

    monkeypatch.setattr(trainer, "save", counting_save)
    return saves


def test_timed_saves_happen_mid_epoch_and_change_no_bit(tmp_path, monkeypatch):
    plain, timed = tmp_path / "plain", tmp_path / "timed"
    reference = Trainer(cfg(), plain)
    untimed = mid_epoch_saves(reference, monkeypatch)
    reference.fit()
    assert untimed == []  # off by default
    trainer = Trainer(cfg(float(TINY_MINUTES)), timed)
    saves = mid_epoch_saves(trainer, monkeypatch)
    trainer.fit()
    assert len(saves) >= 4 and {e for e, _ in saves} == {0, 1}, saves  # both epochs, mid-way (6 batches each)
    assert all(0 < s < 6 for _, s in saves)
    assert_same_run(plain, timed)
    # not part of the run's identity: resuming the finished run with another value is accepted (a no-op)
    assert main(["train", "--resume", str(timed), "--checkpoint-every-minutes", "30"]) == 0


def test_sigkill_after_a_timed_save_then_resume_is_bitwise_equal(tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    reference = run_iat("train", *RUN, "--out", str(whole))
    proc = run_iat("train", *RUN, "--checkpoint-every-minutes", TINY_MINUTES, "--out", str(killed))
    at_kill = wait_for_mid_epoch_checkpoint(killed, proc)  # a timed save in epoch 2
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert 0 < at_kill["step"] < 12
    assert load_checkpoint(killed / "checkpoints" / "last.safetensors")["progress"]["epoch"] < 2, \
        "the run finished before it could be killed"
    resumed = run_iat("train", "--resume", str(killed))  # config.json supplies every setting
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert json.loads(out.strip().splitlines()[-1])["epochs"] == 2
    out, err = reference.communicate(timeout=300)
    assert reference.returncode == 0, err
    assert_same_run(whole, killed)


@pytest.mark.parametrize("value, message", [("-1", "checkpoint_every_minutes must be in [0, inf)"),
                                            ("soon", "checkpoint")])
def test_bad_minutes_are_one_line_errors(tmp_path, capsys, value, message):
    assert main(["train", *RUN, f"--checkpoint-every-minutes={value}", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()
