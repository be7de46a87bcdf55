"""Checkpoints round-trip without pickle and refuse torn files; configs reject unknown keys."""
import json

import pytest
import torch

from iat import config as C
from iat.runtime.checkpoint import load_checkpoint, save_checkpoint
from iat.errors import UsageError


def test_round_trip_keeps_types(tmp_path):
    state = {"a": torch.arange(5.0), "opt": {0: {"momentum_buffer": torch.ones(2)}, "lr": 0.1},
             "list": [1, "x", None, True], "rng": torch.get_rng_state()}
    save_checkpoint(tmp_path / "c.safetensors", state)
    back = load_checkpoint(tmp_path / "c.safetensors")
    assert torch.equal(back["a"], state["a"]) and torch.equal(back["rng"], state["rng"])
    assert list(back["opt"]) == [0, "lr"] and torch.equal(back["opt"][0]["momentum_buffer"], torch.ones(2))
    assert back["list"] == [1, "x", None, True]


def test_truncated_checkpoint_is_one_line_error(tmp_path):
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, {"w": torch.randn(100)})
    path.write_bytes(path.read_bytes()[:-50])
    with pytest.raises(UsageError, match="truncated"):
        load_checkpoint(path)


def test_overwrite_is_atomic_no_temp_left(tmp_path):
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, {"w": torch.zeros(3)})
    save_checkpoint(path, {"w": torch.ones(3)})
    assert torch.equal(load_checkpoint(path)["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["c.safetensors"]


def test_config_update_and_errors(tmp_path):
    cfg = C.TrainConfig()
    C.update(cfg, {"threat": {"eps": "8/255", "steps": 7}, "optim": {"milestones": [0.3, 0.6]}})
    assert cfg.threat.eps == pytest.approx(8 / 255) and cfg.threat.steps == 7
    assert cfg.optim.milestones == (0.3, 0.6)
    with pytest.raises(UsageError, match="unknown config key 'threat.epsilon'"):
        C.update(cfg, {"threat": {"epsilon": 1}})
    with pytest.raises(UsageError, match="integer"):
        C.set_path(cfg, "threat.steps", "2.5")
    bad = tmp_path / "bad.toml"
    bad.write_text("[optim\nlr = ")
    with pytest.raises(UsageError, match="malformed"):
        C.read_config_file(bad)
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"model": "resnet18"}))
    assert C.from_dict(C.read_config_file(good)).model == "resnet18"


def test_schedules():
    from iat.training.trainer import lr_factor

    o = C.OptimConfig(schedule="piecewise", milestones=(0.5, 0.75))
    f = lr_factor(o, 100)
    assert f(0) == 1 and f(50) == pytest.approx(0.1) and f(99) == pytest.approx(0.01)
    f = lr_factor(C.OptimConfig(schedule="cyclic", peak=0.4), 100)
    assert f(0) == 0 and f(40) == pytest.approx(1) and f(100) == pytest.approx(0)
    f = lr_factor(C.OptimConfig(schedule="cosine"), 100)
    assert f(0) == 1 and f(100) == pytest.approx(0)
    with pytest.raises(UsageError):
        lr_factor(C.OptimConfig(schedule="step"), 10)


def test_no_safetensors_checkpoint_is_mistaken_for_a_pickle(tmp_path):
    """A safetensors file starts with its header length; one whose low byte is 0x80 (a pickle's first byte)
    must still load as a checkpoint (iat 0.1 misread about 1 file in 32 as a plain state_dict)."""
    from iat.evaluation.loading import is_pickle

    low_bytes = set()
    for pad in range(0, 300, 3):
        path = tmp_path / f"c{pad}.safetensors"
        save_checkpoint(path, {"w": torch.zeros(2), "note": "x" * pad})
        low_bytes.add(path.read_bytes()[0])
        assert not is_pickle(path), pad
        assert load_checkpoint(path)["note"] == "x" * pad
    assert 0x80 in low_bytes  # the case that broke is among them
    torch.save({"w": torch.zeros(2)}, tmp_path / "plain.pt")
    assert is_pickle(tmp_path / "plain.pt")
