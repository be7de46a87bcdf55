"""--tensorboard: event files in RUN/tensorboard/, read back with TensorBoard's own reader, hold the numbers
of metrics.jsonl per epoch and the training loss every N batches; a resumed run shows each step once; without
the package the flag is a one-line error naming the install command."""
import sys

import pytest

from iat.cli import main
from iat.records import read_metrics
from iat.training.trainer import Trainer

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

TRAIN = ["train", "--method", "pgd-at", "--dataset", "synthetic", "--model", "cnn", "--steps", "1", "--val-steps",
         "1", "--val-examples", "32", "--batch-size", "64", "--no-progress", "--tensorboard", "--tensorboard-every", "3",
         "--epochs", "2"]


def scalars(run) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def expected(run, steps_per_epoch: int) -> dict[str, list[tuple[int, float]]]:
    want: dict[str, list] = {}
    for line in read_metrics(run / "metrics.jsonl"):
        step = line.epoch * steps_per_epoch
        values = {"val/natural": line.val_natural, "val/robust": line.val_robust, "lr": line.lr,
                  **{f"train/{k}": v for k, v in line.train.items()}}
        if line.val_fgsm is not None:
            values["val/fgsm"] = line.val_fgsm
        for tag, value in values.items():
            want.setdefault(tag, []).append((step, value))
    return want


def check(run, epochs: int) -> None:
    got = scalars(run)
    steps_per_epoch = (512 - 51) // 64  # synthetic: 512 training images, a tenth held out, whole batches
    want = expected(run, steps_per_epoch)
    assert len(want["val/robust"]) == epochs
    for tag, points in want.items():
        assert [s for s, _ in got[tag]] == [s for s, _ in points], tag
        assert [v for _, v in got[tag]] == pytest.approx([v for _, v in points], rel=1e-6, abs=1e-7), tag
    loss_steps = [s for s, _ in got["train_step/loss"]]
    assert loss_steps == list(range(3, epochs * steps_per_epoch + 1, 3))
    assert all(v > 0 for _, v in got["train_step/loss"])


def test_events_hold_the_metrics_and_a_resumed_run_shows_each_step_once(tmp_path, monkeypatch):
    run = tmp_path / "run"
    save = Trainer.save

    def killed_after_the_epoch_2_metric_line(trainer):
        if trainer.progress.epoch == 2:
            raise Killed  # metrics.jsonl and the events have epoch 2; the checkpoint is epoch 1's
        save(trainer)

    monkeypatch.setattr(Trainer, "save", killed_after_the_epoch_2_metric_line)
    with pytest.raises(Killed):
        main(TRAIN + ["--out", str(run)])
    monkeypatch.setattr(Trainer, "save", save)
    assert len(scalars(run)["val/robust"]) == 2
    assert main(TRAIN + ["--out", str(run), "--resume"]) == 0  # epoch 2 again, logged again
    check(run, epochs=2)  # ... and TensorBoard shows it once, and the other steps too
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 2  # append-only: one file per start


class Killed(Exception):
    pass


def test_without_the_package_the_flag_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # `import tensorboard` now raises ImportError
    assert main(TRAIN + ["--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and 'pip install "iat[tensorboard]"' in err
    assert not (tmp_path / "run").exists()
