"""`method.train_step`: the one training step of the trainer and of a user's own loop, every hook included."""
import copy

import pytest
import torch

from iat import config as C
from iat.errors import UsageError
from iat.methods import create_method
from iat.training.setup import build_method
from iat.training.trainer import Trainer

FAST = dict(eps=8 / 255, step_size=2 / 255, steps=2)


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _hand_written_step(method, model, x, y, optimizer, step, total):
    """The sequence the trainer ran before train_step existed (docs/library.md lists its hooks)."""
    method.at_step(step, total)
    with method.step_context(model):
        loss, metrics = method.loss(model, x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        method.after_backward(model)
        optimizer.step()
    return metrics


def test_uiat_fgsm_updates_its_universal_perturbation_only_through_after_backward(tiny_model, batch):
    x, y = batch
    plain_model = copy.deepcopy(tiny_model)
    method, plain = create_method("uiat-fgsm", eps=8 / 255), create_method("uiat-fgsm", eps=8 / 255)
    optimizer = torch.optim.SGD(tiny_model.parameters(), lr=0.1)
    plain_optimizer = torch.optim.SGD(plain_model.parameters(), lr=0.1)
    for _ in range(2):
        metrics = method.train_step(tiny_model, x, y, optimizer)
        loss, _ = plain.loss(plain_model, x, y)  # a loop that forgets after_backward
        plain_optimizer.zero_grad()
        loss.backward()
        plain_optimizer.step()
    assert method.universal.delta.abs().max() > 0 and torch.isfinite(metrics["loss"])
    assert method.universal.delta.abs().max() <= 8 / 255 + 1e-7
    assert plain.universal.delta.abs().max() == 0


@pytest.mark.parametrize("name", ["pgd-at+awp", "uiat-fgsm", "iat"])
def test_train_step_is_the_hand_written_sequence_bit_for_bit(tiny_model, batch, name):
    x, y = batch
    other = copy.deepcopy(tiny_model)
    a, b = create_method(name, **FAST), create_method(name, **FAST)
    opt_a = torch.optim.SGD(tiny_model.parameters(), lr=0.1, momentum=0.9)
    opt_b = torch.optim.SGD(other.parameters(), lr=0.1, momentum=0.9)
    w0 = _weights(tiny_model)
    for step in range(2):
        torch.manual_seed(step)
        got = a.train_step(tiny_model, x, y, opt_a, step=step, total_steps=10)
        torch.manual_seed(step)
        want = _hand_written_step(b, other, x, y, opt_b, step, 10)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    assert _same(_weights(tiny_model), _weights(other)) and not _same(_weights(tiny_model), w0)
    assert _same(a.state_dict(), b.state_dict())


def test_the_trainer_step_is_train_step_for_pgd_at_awp(tmp_path):
    cfg = C.update(C.TrainConfig(method="pgd-at+awp", model="cnn", device="cpu", progress=False, seed=3),
                   {"data": {"name": "synthetic", "val_size": 128}, "speed": {"layout": "nchw", "compile": False}, "optim": {"epochs": 1, "batch_size": 32},
                    "threat": {"steps": 1}, "val": {"steps": 1, "n_examples": 32}})
    trainer = Trainer(cfg, tmp_path)
    model, method = copy.deepcopy(trainer.model), build_method(cfg)
    optimizer = type(trainer.optimizer)(model.parameters(), **trainer.optimizer.defaults)
    optimizer.load_state_dict(trainer.optimizer.state_dict())  # the same lr (the schedule's first factor)
    x, y = next(iter(trainer.loader.batches(0)))
    w0 = _weights(model)
    trainer.model.train()
    model.train()
    torch.manual_seed(11)
    loss, metrics = trainer.train_step(x, y)
    torch.manual_seed(11)
    mine = method.train_step(model, x, y, optimizer, step=0, total_steps=trainer.total_steps)
    assert torch.equal(loss, mine["loss"]) and metrics.keys() == mine.keys()
    assert _same(_weights(trainer.model), _weights(model)) and not _same(_weights(model), w0)


@pytest.mark.parametrize("scaler", [False, True])
def test_the_optimizer_steps_exactly_once(tiny_model, batch, scaler):
    x, y = batch
    method = create_method("pgd-at+awp", gamma=0.05, **FAST)  # its proxy has an optimizer of its own
    optimizer = torch.optim.SGD(tiny_model.parameters(), lr=0.1)
    calls, step = [], optimizer.step
    optimizer.step = lambda *a, **k: calls.append(1) or step(*a, **k)
    grad_scaler = torch.amp.GradScaler("cpu", enabled=False) if scaler else None
    method.train_step(tiny_model, x, y, optimizer, grad_scaler)
    assert calls == [1]


def test_at_step_gets_the_step_and_needs_both_numbers(tiny_model, batch):
    x, y = batch
    method = create_method("trades+awp", **FAST)  # AWP starts after 5% of training
    optimizer = torch.optim.SGD(tiny_model.parameters(), lr=0.1)
    method.train_step(tiny_model, x, y, optimizer, step=0, total_steps=100)
    assert not method.perturbing
    method.train_step(tiny_model, x, y, optimizer, step=50, total_steps=100)
    assert method.perturbing
    with pytest.raises(UsageError, match="step and total_steps together"):
        method.train_step(tiny_model, x, y, optimizer, step=3)


@pytest.mark.parametrize("clip", [0.0, 1e-3])
def test_grad_clip_bounds_the_update(tiny_model, batch, clip):
    x, y = batch
    w0 = [p.detach().clone() for p in tiny_model.parameters()]
    optimizer = torch.optim.SGD(tiny_model.parameters(), lr=1.0)  # update = -gradient
    torch.manual_seed(0)
    create_method("pgd-at", **FAST).train_step(tiny_model, x, y, optimizer, grad_clip=clip)
    size = torch.cat([(p.detach() - w).flatten() for p, w in zip(tiny_model.parameters(), w0)]).norm()
    assert (0 < size <= 1e-3 * (1 + 1e-4)) if clip else size > 1e-2  # unclipped, the gradient is far larger
