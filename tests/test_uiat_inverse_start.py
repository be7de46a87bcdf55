"""uiat-fgsm with start=inverse: the host's single step begins at x~ = clip(x + U[y]), and its one crafting
pass gives the FGSM direction, U's (negative) gradient and the detached teacher p(x~)."""
import json

import pytest
import torch
import torch.nn.functional as F

from iat.attacks import kl_div
from iat.cli import main
from iat.errors import UsageError
from iat.methods import create_method

EPS = 8 / 255
HOST_STEP = {"fgsm-rs": 1.25 * EPS, "fgsm-at": EPS, "n-fgsm": EPS}  # alpha = the host's step_scale * eps


def step(method, model, x, y, n=1):
    for _ in range(n):
        loss, metrics = method.loss(model, x, y)
        model.zero_grad()
        loss.backward()
        method.after_backward(model)
    return loss, metrics


def with_u(model, x, y, host="fgsm-rs", **options):
    """A start=inverse method whose U is nonzero (three training steps on the fixed model)."""
    model.eval()  # BatchNorm fixed, so the references below see the same network as the method
    method = create_method("uiat-fgsm", eps=EPS, bn_mode="keep", start="inverse", host=host, **options)
    step(method, model, x, y, n=3)
    assert method.universal.delta.abs().max() > 0
    return method


@pytest.mark.parametrize("host", ["fgsm-rs", "fgsm-at"])
def test_x_adv_is_the_host_step_from_x_inv_inside_the_ball_and_input_untouched(tiny_model, batch, host):
    x, y = batch
    method = with_u(tiny_model, x, y, host)
    x0, u = x.clone(), method.universal.delta.clone()
    x_adv = method.craft(tiny_model, x, y)["x_adv"]
    assert torch.equal(x, x0)
    assert (x_adv - x).abs().max() <= EPS + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    x_inv = (x + u[y]).clamp(0, 1).requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(tiny_model(x_inv), y, reduction="sum"), x_inv)
    expected = (x + (x_inv.detach() - x + HOST_STEP[host] * g.sign()).clamp(-EPS, EPS)).clamp(0, 1)
    assert torch.allclose(x_adv, expected, atol=1e-6)
    assert not torch.equal(x_adv, method.attack(random_start=False)(tiny_model, x, y))  # not the start at x


def test_n_fgsm_host_keeps_its_no_projection_rule(tiny_model, batch):
    x, y = batch
    method = with_u(tiny_model, x, y, "n-fgsm")
    x_adv = method.craft(tiny_model, x, y)["x_adv"]
    assert (x_adv - x).abs().max() <= 2 * EPS + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1  # eps_inv + eps


def test_same_seed_same_result(batch):
    from iat.models import create_model

    x, y = batch
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        model = create_model("cnn4", num_classes=4, in_channels=1, input_size=16, mean=[0.5], std=[0.25])
        method = create_method("uiat-fgsm", eps=EPS, start="inverse")
        loss, _ = step(method, model, x, y, n=3)
        runs.append((loss.detach(), method.universal.delta.clone(), method.universal.momentum.clone()))
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_u_descends_the_crafting_gradient(tiny_model, batch):
    """First step: U = 0, so x~ = x, the momentum is g_c / ||g_c||_1 and U[c] = -eta sign(g_c) for each present
    class c, with g_c the sum of its examples' gradients of CE at x~; absent classes stay 0."""
    x, y = batch
    tiny_model.eval()
    method = create_method("uiat-fgsm", eps=EPS, bn_mode="keep", start="inverse")
    x_inv = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(tiny_model(x_inv), y, reduction="sum"), x_inv)
    step(method, tiny_model, x, y)
    u = method.universal.delta
    for c in range(4):
        if (y == c).any():
            expected = -(EPS / 4) * g[y == c].sum(0).sign()
            assert torch.equal(u[c], expected) and u[c].abs().max() > 0
        else:
            assert torch.equal(u[c], torch.zeros_like(u[c]))
    ce_before = F.cross_entropy(tiny_model(x), y)
    ce_after = F.cross_entropy(tiny_model(method.universal.inverse_example(x, y)), y)
    assert ce_after < ce_before  # the inverse direction: more confident in y


def test_the_teacher_is_detached(tiny_model, batch):
    """The weight gradient of the loss equals that of CE(f(x'), y) + beta KL(p(x') || T), T = f(x~) a constant."""
    x, y = batch
    method = with_u(tiny_model, x, y, beta=2.0)
    u = method.universal.delta.clone()
    crafted = method.craft(tiny_model, x, y)
    assert not crafted["logits_inv"].requires_grad
    loss, _ = method.objective(tiny_model, x, y, crafted)
    params = [p for p in tiny_model.parameters()]
    got = torch.autograd.grad(loss, params)
    logits_adv = tiny_model(crafted["x_adv"])
    teacher = tiny_model((x + u[y]).clamp(0, 1)).detach()
    assert torch.allclose(crafted["logits_inv"], teacher, atol=1e-6)
    ref = F.cross_entropy(logits_adv, y) + 2.0 * kl_div(logits_adv, teacher).mean()
    want = torch.autograd.grad(ref, params, retain_graph=True)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(got, want))
    through_teacher = F.cross_entropy(logits_adv, y) + 2.0 * kl_div(logits_adv, tiny_model((x + u[y]).clamp(0, 1))).mean()
    other = torch.autograd.grad(through_teacher, params)
    assert not all(torch.allclose(a, b, atol=1e-6) for a, b in zip(got, other))  # the test can tell the two apart


def test_as_many_forwards_per_loss_as_fgsm_rs(tiny_model, batch):
    """One forward+backward at x~ for crafting, one on x' for the loss: the host's own passes, no more."""
    x, y = batch
    calls = []
    tiny_model.register_forward_hook(lambda *_: calls.append(1))
    counts = {}
    for name, options in (("fgsm-rs", {}), ("uiat-fgsm", {"start": "inverse"}), ("uiat-fgsm", {"start": "random"})):
        method = create_method(name, eps=EPS, **options)
        step(method, tiny_model, x, y)  # U exists from here on
        calls.clear()
        method.loss(tiny_model, x, y)
        counts[f"{name}{options}"] = len(calls)
    assert counts["uiat-fgsm{'start': 'inverse'}"] == counts["fgsm-rs{}"] == 2
    assert counts["uiat-fgsm{'start': 'random'}"] == 3


def test_bad_start_and_contradicting_options():
    with pytest.raises(UsageError, match="random.*inverse"):
        create_method("uiat-fgsm", start="x_inv")
    with pytest.raises(UsageError, match="inverse_grad"):
        create_method("uiat-fgsm", start="inverse", inverse_grad="kl")
    with pytest.raises(UsageError, match="detach"):
        create_method("uiat-fgsm", start="inverse", detach_inverse="false")
    options = create_method("uiat-fgsm", start="inverse").options()
    assert options["start"] == "inverse" and options["detach_inverse"] is True  # recorded as it runs
    assert create_method("uiat-fgsm").options()["start"] == "random"


def test_one_epoch_through_the_cli(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--method", "uiat-fgsm", "-O", "start=inverse", "-O", "host=fgsm-at", "--dataset",
                 "synthetic", "--model", "cnn", "--epochs", "1", "--batch-size", "64", "--val-size", "128",
                 "--val-steps", "1", "--out", str(out), "--no-progress"]) == 0
    record = json.loads((out / "config.json").read_text())
    assert record["method"]["start"] == "inverse" and record["method"]["host"] == "fgsm-at"
    assert record["config"]["method_options"]["start"] == "inverse"
    line = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert 0 <= line["val_robust"] <= 1
    assert main(["train", "--method", "uiat-fgsm", "-O", "start=middle", "--dataset", "synthetic",
                 "--out", str(tmp_path / "bad"), "--no-progress"]) == 2
    assert "start must be one of" in capsys.readouterr().err


def test_a_run_recorded_before_the_start_option_is_the_same_run_as_start_random():
    from iat.records import RunRecord
    from iat.same_run import first_difference

    def record(**method):
        return RunRecord(config={"method": "uiat-fgsm"}, method={"name": "uiat-fgsm", "beta": 3.5, **method})

    old = record()  # a config.json written before `start` existed
    assert first_difference(old, record(start="random")) is None
    assert "method.start" in first_difference(old, record(start="inverse"))
    assert "method.start" in first_difference(record(start="random"), record(start="inverse"))
