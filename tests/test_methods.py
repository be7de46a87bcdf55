"""Every registered training method: a finite loss whose gradients reach every parameter."""
import pytest
import torch
import torch.nn.functional as F

from iat.attacks import kl_div
from iat.methods import METHODS, create_method
from iat.errors import UsageError
from iat.threat import ThreatModel

FAST = dict(eps=8 / 255, step_size=2 / 255, steps=2)


@pytest.mark.parametrize("name", METHODS.names())
def test_finite_loss_reaches_every_parameter(tiny_model, batch, name):
    x, y = batch
    tiny_model.train()
    method = create_method(name, **FAST)
    loss, metrics = method.loss(tiny_model, x, y)
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert all(torch.isfinite(v) for v in metrics.values())
    loss.backward()
    for pname, p in tiny_model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, pname
    assert all(m.training for m in tiny_model.modules())


@pytest.mark.parametrize("name", METHODS.names())
def test_options_are_recorded(name):
    """Options are the method's own; the threat model is held once, as method.threat, and never an option."""
    method = create_method(name, **FAST)
    opts = method.options()
    assert method.threat == ThreatModel(**FAST)
    assert not set(opts) & {"eps", "step_size", "steps", "norm", "threat"}
    assert create_method(name, **opts).options() == opts   # options() is a complete, valid description


@pytest.mark.parametrize("key", ["eps", "step_size", "steps", "norm"])
def test_a_threat_key_is_not_a_method_option(key):
    """With the run's threat model given, eps & co. as method options are refused (they would disagree)."""
    with pytest.raises(UsageError, match=f"--{key.replace('_', '-')}"):
        create_method("iat", threat=ThreatModel(), **{key: FAST.get(key, "linf")})


def test_iat_loss_matches_definition(tiny_model, batch):
    """L = CE(f(x'), y) + beta KL(p(x') || p(x~)), recomputed from the same random state."""
    x, y = batch
    tiny_model.eval()  # BN in eval so the recomputation sees the same network
    method = create_method("iat", bn_mode="keep", beta=2.0, **FAST)
    torch.manual_seed(0)
    loss, m = method.loss(tiny_model, x, y)
    torch.manual_seed(0)
    x_adv = method.attack()(tiny_model, x, y)
    x_inv = method.inverse_example(tiny_model, x, y)
    la, li = tiny_model(x_adv), tiny_model(x_inv)
    expected = F.cross_entropy(la, y) + 2.0 * kl_div(la, li).mean()
    assert torch.allclose(loss, expected, atol=1e-6)
    # the other direction gives another value
    other = create_method("iat", bn_mode="keep", beta=2.0, kl_direction="inv||adv", **FAST)
    torch.manual_seed(0)
    loss2, _ = other.loss(tiny_model, x, y)
    assert torch.allclose(loss2, F.cross_entropy(la, y) + 2.0 * kl_div(li, la).mean(), atol=1e-6)


def test_kl_div_hand_computed():
    p = torch.tensor([[0.0, 0.0]])          # p = (0.5, 0.5)
    q = torch.log(torch.tensor([[0.25, 0.75]]))
    expected = 0.5 * (torch.log(torch.tensor(0.5 / 0.25)) + torch.log(torch.tensor(0.5 / 0.75)))
    assert torch.allclose(kl_div(p, q), expected.view(1), atol=1e-6)


def test_iat_detach_inverse_blocks_its_gradient(tiny_model, batch):
    """With detach_inverse, the weight gradient is that of CE(x') + beta KL(p(x') || const p(x~)), and it
    differs from the one that also flows through p(x~)."""
    x, y = batch
    tiny_model.eval()
    params = list(tiny_model.parameters())
    crafted = create_method("iat", bn_mode="keep", **FAST).craft(tiny_model, x, y)
    grads = {}
    for detach in (True, False):
        method = create_method("iat", bn_mode="keep", beta=3.5, detach_inverse=detach, **FAST)
        loss, _ = method.objective(tiny_model, x, y, crafted)
        grads[detach] = torch.autograd.grad(loss, params)
    la, li = tiny_model(crafted["x_adv"]), tiny_model(crafted["x_inv"]).detach()
    by_hand = torch.autograd.grad(F.cross_entropy(la, y) + 3.5 * kl_div(la, li).mean(), params)
    for a, b in zip(grads[True], by_hand):
        assert torch.allclose(a, b, atol=1e-6)
    assert any(not torch.allclose(a, b, atol=1e-6) for a, b in zip(grads[True], grads[False]))


def test_iat_ce_kl_inverse_loss(tiny_model, batch):
    """inverse_loss "ce+kl" descends CE(x~) + KL(p(x) || p(x~)) - KL(p(x') || p(x~)) inside the ball, and
    the training loss is the iat objective on that x~."""
    x, y = batch
    tiny_model.eval()
    method = create_method("iat", bn_mode="keep", inverse_loss="ce+kl", **FAST)
    torch.manual_seed(0)
    crafted = method.craft(tiny_model, x, y)
    x_adv, x_inv = crafted["x_adv"], crafted["x_inv"]
    with torch.no_grad():
        nat, adv = tiny_model(x), tiny_model(x_adv)

        def inverse_objective(z):
            logits = tiny_model(z)
            return F.cross_entropy(logits, y) + kl_div(nat, logits).mean() - kl_div(adv, logits).mean()

        assert inverse_objective(x_inv) < inverse_objective(x) - 1e-4
    plain = create_method("iat", bn_mode="keep", **FAST)
    torch.manual_seed(0)   # the same random starts as above: only the inverse loss differs
    assert torch.equal(plain.attack()(tiny_model, x, y), x_adv)
    assert not torch.equal(plain.inverse_example(tiny_model, x, y), x_inv)   # the KL terms move the descent
    assert (x_inv - x).abs().max() <= FAST["eps"] + 1e-6
    loss, _ = method.objective(tiny_model, x, y, crafted)
    la, li = tiny_model(x_adv), tiny_model(x_inv)
    assert torch.allclose(loss, F.cross_entropy(la, y) + 3.5 * kl_div(la, li).mean(), atol=1e-6)
    with pytest.raises(ValueError, match="adversarial example"):
        method.inverse_example(tiny_model, x, y)


@pytest.mark.parametrize("options", [dict(kl_direction="both"), dict(inverse_loss="mse"), dict(gamma=1.0),
                                     dict(steps="ten"), dict(detach_inverse="maybe")])
def test_bad_options(options):
    with pytest.raises(UsageError):
        create_method("iat", **options)


def test_options_from_strings():
    method = create_method("iat", eps="8/255", steps="5", beta="6", detach_inverse="true")
    assert method.threat.eps == pytest.approx(8 / 255) and method.threat.steps == 5 and method.beta == 6.0
    assert method.detach_inverse is True


def test_eps_inv_zero_is_the_natural_anchor_and_runs_no_inverse_attack(tiny_model, batch, monkeypatch):
    """iat with eps_inv = 0: x~ = x, so L = CE(x') + beta KL(p(x') || p(x)); only the adversary is crafted,
    and it is the same adversary (same random numbers) as with any other eps_inv."""
    from iat.attacks import PGD

    x, y = batch
    tiny_model.eval()
    calls, original = [], PGD.__call__
    monkeypatch.setattr(PGD, "__call__", lambda self, *a, **k: calls.append(self.descent) or original(self, *a, **k))
    method = create_method("iat", bn_mode="keep", eps_inv=0.0, **FAST)
    torch.manual_seed(0)
    crafted = method.craft(tiny_model, x, y)
    assert calls == [False] and torch.equal(crafted["x_inv"], x)
    loss, _ = method.objective(tiny_model, x, y, crafted)
    la = tiny_model(crafted["x_adv"])
    assert torch.allclose(loss, F.cross_entropy(la, y) + 3.5 * kl_div(la, tiny_model(x)).mean(), atol=1e-6)
    torch.manual_seed(0)
    assert torch.equal(create_method("iat", bn_mode="keep", **FAST).craft(tiny_model, x, y)["x_adv"], crafted["x_adv"])
