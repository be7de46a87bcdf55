"""One threat model per run: the method, the validation attack and the evaluator share it, and eps
warm-up scales it per step without changing what the run is (regressions of two defects of iat 0.1)."""
import json

import pytest

from iat import config as C
from iat.cli import main
from iat.records import read_run
from iat.threat import ThreatModel
from iat.training.trainer import Trainer

from test_resume import assert_same_run, crash_then_resume, die_at_step

FAST = ["--method", "iat", "--dataset", "synthetic", "--model", "cnn", "--epochs", "1", "--batch-size", "64",
        "--val-size", "128", "--val-examples", "64", "--steps", "2", "--val-steps", "2", "--no-progress"]


def test_a_threat_key_as_method_option_is_refused_before_anything_runs(tmp_path, capsys):
    """iat 0.1 trained at -O eps=4/255 but validated (and chose the best checkpoint) at the config's 8/255."""
    out = tmp_path / "run"
    assert main(["train", *FAST, "-O", "eps=4/255", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--eps" in err and "threat model" in err
    assert not out.exists()


def test_eps_reaches_method_validation_and_evaluation(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *FAST, "--eps", "4/255", "--step-size", "1/255", "--eps-warmup", "0.5",
                 "--out", str(out)]) == 0
    record = read_run(out / "config.json")
    assert record.config["threat"]["eps"] == pytest.approx(4 / 255)
    assert record.val_attack["eps"] == pytest.approx(4 / 255)
    assert not {"eps", "step_size", "steps", "norm"} & set(record.method)
    capsys.readouterr()
    assert main(["eval", str(out), "--attacks", "natural,pgd20", "--n-examples", "32", "--no-progress"]) == 0
    result = json.loads((out / "eval-best.json").read_text())
    assert result["threat"]["eps"] == pytest.approx(4 / 255)
    assert result["train_threat"] == ThreatModel(eps=4 / 255, step_size=1 / 255, steps=2).describe()
    assert next(r for r in result["results"] if r["attack"] == "pgd20")["protocol"]["eps"] == pytest.approx(4 / 255)


def warmup_cfg() -> C.TrainConfig:
    """2 epochs of 6 batches; eps ramps up over the first 9 steps, so the warm-up spans the epoch boundary."""
    cfg = C.TrainConfig(method="iat", model="cnn", seed=2, device="cpu", checkpoint_every_steps=2, progress=False)
    return C.update(cfg, {"data": {"name": "synthetic", "val_size": 128},
                          "optim": {"epochs": 2, "batch_size": 64, "eps_warmup": 0.75},
                          "threat": {"eps": "8/255", "step_size": "2/255", "steps": 2},
                          "method_options": {"steps_inv": 1}, "val": {"steps": 1, "n_examples": 64}})


def test_warmup_is_a_per_step_scale_of_the_one_threat_model(tmp_path):
    trainer = Trainer(warmup_cfg(), tmp_path)
    seen, step = [], trainer.train_step

    def watching(x, y):
        out = step(x, y)
        seen.append(trainer.method.threat)
        return out

    trainer.train_step = watching
    trainer.fit()
    assert trainer.warmup_steps == 9 and len(seen) == 12
    for t, threat in enumerate(seen):
        f = min(1.0, (t + 1) / 9)
        assert threat == ThreatModel(eps=8 / 255 * f, step_size=2 / 255 * f, steps=2)
    assert trainer.threat == ThreatModel(eps=8 / 255, step_size=2 / 255, steps=2)  # the run's own never changes


@pytest.mark.parametrize("where", ["end of epoch 1", "mid epoch 2"])
def test_resume_inside_the_warmup_is_bitwise_the_uninterrupted_run(tmp_path, monkeypatch, where):
    """iat 0.1 refused this resume: "method.eps would be 0.0314 but ... trained with 0.0119"."""
    reference = tmp_path / "whole"
    Trainer(warmup_cfg(), reference).fit()
    run = tmp_path / "killed"
    trainer = Trainer(warmup_cfg(), run)
    # dies at global step 7 or 9 of the 9 warm-up steps
    die_at_step(trainer, monkeypatch, 6 if where == "end of epoch 1" else 8)
    crash_then_resume(trainer, warmup_cfg, run)
    assert_same_run(reference, run)
