"""Single-step recipes, GradAlign's double backward, the universal inverse perturbation, the CO monitor, configs."""
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from iat import config as C
from iat.attacks import PGD, kl_div
from iat.runtime.checkpoint import load_checkpoint, save_checkpoint
from iat.data import DATASETS
from iat.methods import create_method
from iat.methods.single_step import alignment_penalty, input_gradient
from iat.methods.uiat import UniversalPerturbation
from iat.models import MODELS
from iat.records import MetricLine
from iat.training.monitor import co_epochs, co_rule
from iat.errors import UsageError

EPS = 8 / 255
SINGLE = ["fgsm-at", "fgsm-rs", "n-fgsm", "gradalign", "uiat-fgsm"]
CONFIGS = sorted((Path(__file__).parent.parent / "configs").rglob("*.toml"))


@pytest.mark.parametrize("name", SINGLE)
def test_finite_loss_and_gradients_reach_every_parameter(tiny_model, batch, name):
    x, y = batch
    loss, metrics = create_method(name, eps=EPS).loss(tiny_model, x, y)
    assert torch.isfinite(loss) and all(torch.isfinite(v) for v in metrics.values())
    loss.backward()
    for pname, p in tiny_model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, pname


@pytest.mark.parametrize("name, step, start, project", [("fgsm-at", 1.0, False, True), ("fgsm-rs", 1.25, True, True),
                                                        ("n-fgsm", 1.0, True, False), ("gradalign", 1.0, False, True),
                                                        ("uiat-fgsm", 1.25, True, True)])
def test_presets_of_the_one_engine(name, step, start, project):
    attack = create_method(name, eps=EPS, steps=10, step_size=2 / 255).attack()  # the threat's PGD settings are unused
    assert isinstance(attack, PGD) and attack.steps == 1 and attack.step_size == pytest.approx(step * EPS)
    assert attack.random_start is start and attack.project is project
    assert create_method("uiat-fgsm", host="n-fgsm").attack().init_scale == 2.0


def test_fgsm_rs_stays_in_the_ball_and_n_fgsm_within_three_eps(tiny_model, batch):
    x, y = batch
    torch.manual_seed(0)
    x_rs = create_method("fgsm-rs", eps=EPS).attack()(tiny_model, x, y)
    x_n = create_method("n-fgsm", eps=EPS).attack()(tiny_model, x, y)
    assert (x_rs - x).abs().max() <= EPS + 1e-6
    assert EPS < (x_n - x).abs().max() <= 3 * EPS + 1e-6  # no projection: beyond eps, never beyond noise + step
    assert all(xa.min() >= 0 and xa.max() <= 1 for xa in (x_rs, x_n))


def test_fgsm_at_is_one_signed_step_of_eps(tiny_model, batch):
    x, y = batch
    tiny_model.eval()
    x_adv = create_method("fgsm-at", eps=EPS, bn_mode="keep").attack()(tiny_model, x, y)
    g = input_gradient(tiny_model, x, y, create_graph=False)
    assert torch.allclose(x_adv, (x + EPS * g.sign()).clamp(0, 1), atol=1e-6)


# ----------------------------------------------------------------- GradAlign
@pytest.mark.parametrize("eps255, want", [(8, 0.2), (16, 2.0), (4, 0.02 * 10 ** 0.5), (12, 0.02 * 10 ** 1.5)])
def test_gradalign_lambda_follows_the_authors_rule(eps255, want):
    """Their scripts: 0.2 at 8/255 and 2.0 at 16/255, the rule 0.02 * 10^(eps*255/8) (re-typed)."""
    method = create_method("gradalign", eps=eps255 / 255)
    assert method.align_lambda == pytest.approx(want, rel=1e-9) and method.options()["align_lambda"] == method.align_lambda
    assert create_method("gradalign", eps=eps255 / 255, align_lambda=0.5).options()["align_lambda"] == 0.5


def test_gradalign_lambda_at_8_and_16_is_exactly_the_authors_value():
    assert create_method("gradalign", eps=8 / 255).align_lambda == 0.2
    assert create_method("gradalign", eps=16 / 255).align_lambda == 2.0


def test_gradalign_loss_matches_definition(tiny_model, batch):
    """CE(f(FGSM(x)), y) + lambda (1 - cos(grad CE(x), grad CE(x + eta))), eta from the same random state."""
    x, y = batch
    tiny_model.eval()
    method = create_method("gradalign", eps=EPS, bn_mode="keep", align_lambda=0.7)
    torch.manual_seed(3)
    loss, m = method.loss(tiny_model, x, y)
    torch.manual_seed(3)
    eta = PGD(eps=EPS).init_delta(x)
    g1, g2 = (input_gradient(tiny_model, x_, y, create_graph=False) for x_ in (x, x + eta))
    x_adv = (x + EPS * g1.sign()).clamp(0, 1)
    cos = F.cosine_similarity(g1.flatten(1), g2.flatten(1), dim=1).mean()
    expected = F.cross_entropy(tiny_model(x_adv), y) + 0.7 * (1 - cos)
    assert torch.allclose(loss, expected, atol=1e-5) and torch.allclose(m["cos"], cos, atol=1e-5)


def test_alignment_penalty_drops_zero_gradients():
    g1 = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    g2 = torch.tensor([[1.0, 1.0], [3.0, 4.0]])
    assert alignment_penalty(g1, g2) == pytest.approx(1 - 2**-0.5)  # the second example does not count
    assert alignment_penalty(torch.zeros(2, 2), g2) == 0


def test_gradalign_regulariser_gradient_matches_finite_differences():
    """The double backward: d/dtheta of 1 - cos(grad_x CE(x), grad_x CE(x + eta)) against central differences."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x, eta = torch.rand(4, 6, dtype=torch.float64), 0.1 * torch.rand(4, 6, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 1])

    def reg() -> torch.Tensor:
        return alignment_penalty(*(input_gradient(model, x_, y, create_graph=True) for x_ in (x, x + eta))).double()

    grads = torch.autograd.grad(reg(), list(model.parameters()))
    assert all(g.abs().sum() > 0 for g in grads)  # reaches every parameter
    h = 1e-6
    for p, g in zip(model.parameters(), grads):
        flat = p.data.view(-1)  # .data: nudge the weights outside autograd
        for i in range(p.numel()):
            flat[i] += h
            up = reg().detach()
            flat[i] -= 2 * h
            down = reg().detach()
            flat[i] += h
            assert float(g.view(-1)[i]) == pytest.approx(float(up - down) / (2 * h), rel=1e-4, abs=1e-8)


# ----------------------------------------------------------------- universal inverse perturbation

def by_hand(u, m, grads, y, eta, mu, eps):
    """The rule with a Python loop over classes: the reference for the vectorised update."""
    u, m = u.clone(), m.clone()
    for c in y.unique():
        g = grads[y == c].mean(0)
        m[c] = mu * m[c] + g / g.abs().sum()
        u[c] = (u[c] - eta * m[c].sign()).clamp(-eps, eps)
    return u, m


def test_universal_update_matches_the_rule_by_hand():
    up = UniversalPerturbation()
    up.ensure(torch.zeros(3, 1, 1, 2), num_classes=2)
    y = torch.tensor([0, 0, 1])
    grads = torch.tensor([[1.0, -3.0], [3.0, 1.0], [0.0, 2.0]]).view(3, 1, 1, 2)
    up.apply(up.class_stats(grads, y), step_size=0.1, mu=0.9, eps=0.15)
    # class 0: mean (2, -1), / L1 3 -> m0 = (2/3, -1/3); class 1: (0, 2) / 2 -> m1 = (0, 1)
    assert torch.allclose(up.momentum.view(2, 2), torch.tensor([[2 / 3, -1 / 3], [0.0, 1.0]]))
    assert torch.allclose(up.delta.view(2, 2), torch.tensor([[-0.1, 0.1], [0.0, -0.1]]))
    # second batch holds class 1 only: m1 = 0.9 (0, 1) + (-1, 0); U1 = clip((0, -0.1) - 0.1 sign(m1), 0.15)
    up.apply(up.class_stats(torch.tensor([[-5.0, 0.0]]).view(1, 1, 1, 2), torch.tensor([1])), 0.1, 0.9, 0.15)
    assert torch.allclose(up.momentum.view(2, 2), torch.tensor([[2 / 3, -1 / 3], [-1.0, 0.9]]))
    assert torch.allclose(up.delta.view(2, 2), torch.tensor([[-0.1, 0.1], [0.1, -0.15]]))  # class 0 untouched


def test_universal_stays_inside_eps_inv_and_matches_the_loop_reference():
    g = torch.Generator().manual_seed(0)
    up = UniversalPerturbation()
    up.ensure(torch.zeros(1, 2, 3, 3), num_classes=5)
    for _ in range(200):
        y = torch.randint(0, 5, (7,), generator=g)
        grads = torch.randn(7, 2, 3, 3, generator=g)
        want = by_hand(up.delta, up.momentum, grads, y, 0.05, 0.9, 0.12)
        up.apply(up.class_stats(grads, y), 0.05, 0.9, 0.12)
        assert torch.allclose(up.delta, want[0], atol=1e-6) and torch.allclose(up.momentum, want[1], atol=1e-5)
    assert up.delta.abs().max() <= 0.12 + 1e-7 and up.delta.abs().max() > 0.1
    x_inv = up.inverse_example(torch.rand(4, 2, 3, 3), torch.tensor([0, 1, 2, 3]))
    assert x_inv.min() >= 0 and x_inv.max() <= 1


def train_steps(method, model, x, y, n=2):
    """Training steps as the trainer runs them: loss, backward, after_backward (no optimizer step)."""
    for _ in range(n):
        model.zero_grad()
        loss, _ = method.loss(model, x, y)
        loss.backward()
        method.after_backward(model)


@pytest.mark.parametrize("inverse_grad", ["ce", "kl"])
def test_uiat_step_applies_the_rule_to_the_gradient_at_x_inv(tiny_model, batch, inverse_grad):
    x, y = batch
    tiny_model.eval()  # BN fixed, so the reference below sees the same network
    method = create_method("uiat-fgsm", eps=EPS, bn_mode="keep", inverse_grad=inverse_grad, beta=2.0)
    train_steps(method, tiny_model, x, y)  # U is nonzero from here on
    u0, m0 = method.universal.delta.clone(), method.universal.momentum.clone()
    torch.manual_seed(5)
    train_steps(method, tiny_model, x, y, n=1)
    x_inv = (x + u0[y]).clamp(0, 1).requires_grad_(True)
    if inverse_grad == "ce":
        target = F.cross_entropy(tiny_model(x_inv), y)
    else:  # the gradient of the training loss at x~: beta * KL(p(x') || p(x~))
        torch.manual_seed(5)
        x_adv = method.attack()(tiny_model, x, y)
        target = 2.0 * kl_div(tiny_model(x_adv), tiny_model(x_inv)).mean()
    (g,) = torch.autograd.grad(target, x_inv)
    u, m = by_hand(u0, m0, g, y, EPS / 4, 0.9, EPS)
    assert torch.allclose(method.universal.delta, u, atol=1e-7) and torch.allclose(method.universal.momentum, m, atol=1e-5)


def test_uiat_lazy_state_shape_and_num_classes(tiny_model, batch):
    x, y = batch
    method = create_method("uiat-fgsm", eps=EPS)
    assert method.state_dict() == {}
    train_steps(method, tiny_model, x, y, n=1)
    assert method.universal.delta.shape == (4, 1, 16, 16)  # classes from the model's output width
    assert method.universal.delta[y.unique()].abs().max() == pytest.approx(EPS / 4)  # one step of eta
    with pytest.raises(UsageError, match="num_classes"):
        create_method("uiat-fgsm", num_classes=10).loss(tiny_model, x, y)


def test_uiat_makes_no_extra_forward(tiny_model, batch):
    """Host attack (1) + training forward on x' (1) + x~ (1): the same forwards as FGSM-RS plus the anchor."""
    x, y = batch
    calls = []
    tiny_model.register_forward_hook(lambda *_: calls.append(1))
    for name, expected in (("fgsm-rs", 2), ("uiat-fgsm", 3)):
        calls.clear()
        train_steps(create_method(name, eps=EPS), tiny_model, x, y, n=1)
        assert len(calls) == expected, name


def test_uiat_detached_anchor_still_updates_u(tiny_model, batch):
    x, y = batch
    method = create_method("uiat-fgsm", eps=EPS, detach_inverse=True)
    train_steps(method, tiny_model, x, y, n=1)
    assert method.universal.delta.abs().max() > 0
    with pytest.raises(UsageError):
        create_method("uiat-fgsm", detach_inverse=True, inverse_grad="kl")


def test_uiat_state_round_trips_through_checkpoints(tmp_path, tiny_model, batch):
    x, y = batch
    tiny_model.eval()
    method = create_method("uiat-fgsm", eps=EPS, bn_mode="keep")
    train_steps(method, tiny_model, x, y, n=3)
    save_checkpoint(tmp_path / "c.safetensors", {"method_state": method.state_dict()})
    restored = create_method("uiat-fgsm", eps=EPS, bn_mode="keep")
    restored.load_state_dict(load_checkpoint(tmp_path / "c.safetensors")["method_state"])
    assert torch.equal(restored.universal.delta, method.universal.delta)
    assert torch.equal(restored.universal.momentum, method.universal.momentum)
    for m in (method, restored):  # and both continue identically
        torch.manual_seed(9)
        train_steps(m, tiny_model, x, y, n=1)
    assert torch.equal(restored.universal.delta, method.universal.delta)
    with pytest.raises(UsageError):
        restored.load_state_dict({"universal": torch.zeros(2)})
    restored.load_state_dict({"universal": torch.zeros(3, 1, 16, 16), "momentum": torch.zeros(3, 1, 16, 16)})
    with pytest.raises(UsageError, match="shape"):
        restored.loss(tiny_model, x, y)


@pytest.mark.parametrize("name, options", [("fgsm-rs", dict(step_scale=0)), ("n-fgsm", dict(init_scale=-1.0)),
                                           *(("uiat-fgsm", o) for o in (dict(host="pgd-at"), dict(inverse_grad="adv"),
                                                                         dict(norm="l2"), dict(mu=1.0)))])
def test_bad_options(name, options):
    with pytest.raises(UsageError):
        create_method(name, **options)


# ----------------------------------------------------------------- catastrophic-overfitting monitor

def flags(curve):
    """co_rule over (fgsm, pgd) pairs per epoch, with the best earlier accuracies as the trainer keeps them."""
    best = [max([-1.0] + [pgd for _, pgd in curve[:i]]) for i in range(len(curve))]
    best_fgsm = [max([-1.0] + [fgsm for fgsm, _ in curve[:i]]) for i in range(len(curve))]
    out = [co_rule(fgsm, pgd, b, bf) is not None for (fgsm, pgd), b, bf in zip(curve, best, best_fgsm)]
    records = [MetricLine(epoch=i + 1, val_fgsm=f, val_robust=p) for i, (f, p) in enumerate(curve)]
    assert [e for e, _ in co_epochs(records)] == [i + 1 for i, flag in enumerate(out) if flag]  # same rule
    return out


def test_co_monitor_flags_a_collapse_and_not_a_healthy_curve():
    healthy = [(0.15, 0.10), (0.30, 0.25), (0.38, 0.33), (0.45, 0.40), (0.44, 0.37), (0.52, 0.47), (0.55, 0.49)]
    assert not any(flags(healthy))
    collapse = [(0.30, 0.25), (0.38, 0.33), (0.45, 0.40), (0.70, 0.02), (0.85, 0.00)]  # Wong et al.'s picture
    assert flags(collapse) == [False, False, False, True, True]
    widening = [(0.45, 0.40), (0.50, 0.42), (0.48, 0.20)]  # PGD down 22 points, FGSM still above the best PGD
    assert flags(widening) == [False, False, True]
    diverged = [(0.45, 0.40), (0.12, 0.05)]  # everything fell: not overfitting, and nothing to compare
    assert flags(diverged) == [False, False]
    # eps 16/255, small CNN on CIFAR-10 (FGSM-AT, a real run's validation curve): every accuracy is low,
    # PGD collapses from 12% to 1% while FGSM holds; the relative rule (c) flags it, (a) and (b) cannot
    hard = [(0.132, 0.108), (0.154, 0.122), (0.18, 0.118), (0.128, 0.036), (0.108, 0.008), (0.134, 0.01)]
    assert flags(hard) == [False, False, False, False, True, True]
    untrained = [(0.02, 0.01), (0.03, 0.0), (0.01, 0.0)]  # never learned: nothing collapsed
    assert not any(flags(untrained))
    weak_everywhere = [(0.20, 0.12), (0.08, 0.02)]  # FGSM fell too (to 40% of its best): degrading, not CO
    assert flags(weak_everywhere) == [False, False]


def test_trainer_records_val_fgsm_and_warns(tmp_path, monkeypatch, capsys):
    from iat.training import monitor
    from iat.training.trainer import Trainer

    cfg = C.TrainConfig(method="uiat-fgsm", model="cnn", seed=1, device="cpu", progress=False)
    C.update(cfg, {"data": {"name": "synthetic", "val_size": 128}, "optim": {"epochs": 1, "batch_size": 64},
                   "threat": {"steps": 1}, "val": {"steps": 1, "n_examples": 64}})
    monkeypatch.setattr(monitor, "co_rule", lambda *a, **k: "a hand-made collapse")
    trainer = Trainer(cfg, tmp_path)
    trainer.fit()
    record = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert 0 <= record["val_fgsm"] <= 1 and record["co_detected"] is True
    assert "catastrophic overfitting suspected at epoch 1: a hand-made collapse" in capsys.readouterr().out
    state = load_checkpoint(tmp_path / "checkpoints" / "last.safetensors")
    assert state["method_state"]["universal"].shape == (4, 1, 16, 16)


# ----------------------------------------------------------------- configs

@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_configs_resolve(path):
    from iat.training.trainer import build_method, validate_config

    cfg = C.from_dict(C.read_config_file(path))
    validate_config(cfg)
    build_method(cfg).attack()
    assert cfg.model in MODELS and cfg.data.name in DATASETS


def test_paper_schedule_decays_at_epochs_100_and_105():
    from iat.training.trainer import lr_factor

    cfg = C.from_dict(C.read_config_file(Path(__file__).parent.parent / "configs/cifar10-resnet18-iat.toml"))
    steps = 390  # 49000 / 128
    f = lr_factor(cfg.optim, 110 * steps)  # and the same for 100 and 105 of 110 epochs at any batch count
    assert [f(100 * steps - 1), f(100 * steps), f(105 * steps - 1), f(105 * steps)] == pytest.approx([1, 0.1, 0.1, 0.01])


def _reference_gradalign_grads(model, x, y, eps, lam, seed):
    """The authors' computation, re-typed: FGSM from grad1 at x; grad1 without graph (backprop=False),
    grad2 at x + eta with graph (backprop=True); cosine over examples with two nonzero gradients."""
    torch.manual_seed(seed)
    xg = x.clone().requires_grad_(True)
    grad1 = torch.autograd.grad(F.cross_entropy(model(xg), y), xg)[0].detach()
    eta = (torch.rand(x.shape) * 2 - 1) * eps
    eta = (x + eta).clamp(0, 1) - x
    xe = (x + eta).requires_grad_(True)
    grad2 = torch.autograd.grad(F.cross_entropy(model(xe), y), xe, create_graph=True)[0]
    keep = (grad1.flatten(1).norm(dim=1) != 0) & (grad2.flatten(1).norm(dim=1) != 0)
    g1, g2 = grad1[keep].flatten(1), grad2[keep].flatten(1)
    cos = ((g1 / g1.norm(dim=1, keepdim=True)) * (g2 / g2.norm(dim=1, keepdim=True))).sum(1)
    x_adv = (x + eps * grad1.sign()).clamp(0, 1)
    loss = F.cross_entropy(model(x_adv), y) + lam * (1.0 - cos.mean())
    return loss, torch.autograd.grad(loss, list(model.parameters()))


def test_gradalign_weight_gradient_is_the_authors(tiny_model, batch):
    """first_grad "detached" (the default) agrees with the authors' code to 1e-6 in every weight gradient;
    "graph" (iat 0.1) has the same loss but another gradient."""
    x, y = batch
    tiny_model.eval()
    params = list(tiny_model.parameters())
    ref_loss, ref = _reference_gradalign_grads(tiny_model, x, y, EPS, 0.7, seed=5)
    grads = {}
    for first in ("detached", "graph"):
        method = create_method("gradalign", eps=EPS, bn_mode="keep", align_lambda=0.7, first_grad=first)
        torch.manual_seed(5)
        loss, _ = method.loss(tiny_model, x, y)
        assert torch.allclose(loss, ref_loss, atol=1e-6)
        grads[first] = torch.autograd.grad(loss, params)
    for a, b in zip(grads["detached"], ref):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5)
    assert any(not torch.allclose(a, b, atol=1e-6, rtol=1e-5) for a, b in zip(grads["graph"], ref))
    with pytest.raises(UsageError):
        create_method("gradalign", first_grad="both")


def test_universal_perturbation_skips_non_finite_class_statistics(tiny_model, batch):
    """An fp16 overflow step gives inf gradients: iat 0.1 turned U's momentum NaN for good, freezing those rows
    silently. Now such a class keeps its U and momentum, the others update, and the skip is reported."""
    x, y = batch
    method = create_method("uiat-fgsm", eps=EPS, bn_mode="keep")
    loss, metrics = method.loss(tiny_model, x, y)
    assert metrics["u_skipped"] == 0
    grad, labels = method._pending
    bad = int(labels[0])
    method._pending = (torch.where((labels == bad).view(-1, 1, 1, 1), torch.full_like(grad, float("inf")), grad),
                       labels)
    before = {k: v.clone() for k, v in method.state_dict().items()}
    method.after_backward(tiny_model)
    after = method.state_dict()
    assert torch.equal(after["universal"][bad], before["universal"][bad])
    assert torch.equal(after["momentum"][bad], before["momentum"][bad])
    assert all(torch.isfinite(v).all() for v in after.values())
    others = [int(c) for c in labels.unique() if int(c) != bad]
    assert others and all(not torch.equal(after["momentum"][c], before["momentum"][c]) for c in others)
    _, metrics = method.loss(tiny_model, x, y)
    assert metrics["u_skipped"] == 1
