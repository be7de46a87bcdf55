"""Properties of the one PGD engine and its presets."""
import pytest
import torch
import torch.nn.functional as F

from iat.attacks import ATTACKS, PGD, create_attack
from iat.errors import UsageError

PGD_PRESETS = [n for n in ATTACKS.names() if n != "natural"]


@pytest.mark.parametrize("name", PGD_PRESETS)
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_inside_ball_and_box(tiny_model, batch, name, norm):
    x, y = batch
    eps = 8 / 255 if norm == "linf" else 0.5
    attack = create_attack(name, eps=eps, norm=norm)
    x_adv = attack(tiny_model, x, y)
    delta = (x_adv - x).flatten(1)
    size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
    assert (size <= eps + 1e-6).all()
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert torch.isfinite(x_adv).all()


def test_inputs_untouched_and_mode_restored(tiny_model, batch):
    x, y = batch
    x0, y0 = x.clone(), y.clone()
    tiny_model.train()
    tiny_model.net[1].eval()  # a mixed state must come back exactly
    modes = [m.training for m in tiny_model.modules()]
    tiny_model.net[0].weight.requires_grad_(False)
    flags = [p.requires_grad for p in tiny_model.parameters()]
    for bn_mode in ("train", "eval", "keep"):
        PGD(steps=3, bn_mode=bn_mode)(tiny_model, x, y)
        assert [m.training for m in tiny_model.modules()] == modes
        assert [p.requires_grad for p in tiny_model.parameters()] == flags
    assert torch.equal(x, x0) and torch.equal(y, y0)
    assert all(p.grad is None for p in tiny_model.parameters())


def test_mode_restored_when_attack_raises(tiny_model, batch):
    x, y = batch
    tiny_model.train()

    def broken(logits, y, ref=None):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        PGD(steps=2, loss=broken, bn_mode="eval")(tiny_model, x, y)
    assert all(m.training for m in tiny_model.modules())
    assert all(p.requires_grad for p in tiny_model.parameters())


def test_same_seed_same_result(tiny_model, batch):
    x, y = batch
    tiny_model.eval()
    attack = PGD(steps=3)
    a = attack(tiny_model, x, y, generator=torch.Generator().manual_seed(5))
    b = attack(tiny_model, x, y, generator=torch.Generator().manual_seed(5))
    c = attack(tiny_model, x, y, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_eps_zero_returns_input(tiny_model, batch, norm):
    x, y = batch
    assert torch.equal(PGD(eps=0.0, steps=3, norm=norm)(tiny_model, x, y), x)


def test_adversary_raises_and_inverse_lowers_loss(tiny_model, batch):
    x, y = batch
    tiny_model.eval()
    with torch.no_grad():
        base = F.cross_entropy(tiny_model(x), y, reduction="none")
    x_adv = PGD(eps=8 / 255, steps=10)(tiny_model, x, y)
    x_inv = PGD(eps=8 / 255, steps=10, descent=True)(tiny_model, x, y)
    with torch.no_grad():
        adv = F.cross_entropy(tiny_model(x_adv), y, reduction="none")
        inv = F.cross_entropy(tiny_model(x_inv), y, reduction="none")
    assert (adv > base).all()
    assert (inv < base).all()


def test_restarts_never_worse(tiny_model, batch):
    x, y = batch
    tiny_model.eval()
    torch.manual_seed(0)
    one = PGD(steps=2, restarts=1)
    many = PGD(steps=2, restarts=4)
    torch.manual_seed(3)
    x1 = one(tiny_model, x, y)
    torch.manual_seed(3)  # the first restart of `many` equals `one`, later ones can only improve
    x4 = many(tiny_model, x, y)
    s1, s4 = many._score(tiny_model, x1, y, None), many._score(tiny_model, x4, y, None)
    assert (s4 >= s1 - 1e-5).all()


def test_cw_and_kl_losses(tiny_model, batch):
    x, y = batch
    tiny_model.eval()
    with torch.no_grad():
        ref = tiny_model(x)
    x_kl = PGD(steps=3, loss="kl")(tiny_model, x, y, reference=ref)
    x_cw = create_attack("cw", eps=8 / 255)(tiny_model, x, y)
    assert x_kl.shape == x.shape and x_cw.shape == x.shape
    with pytest.raises(ValueError):
        PGD(steps=1, loss="kl")(tiny_model, x, y)


@pytest.mark.parametrize("kw", [dict(eps=-0.1), dict(eps=1.5), dict(step_size=0.0), dict(steps=0),
                                dict(norm="l1"), dict(bn_mode="frozen"), dict(restarts=0)])
def test_bad_arguments(kw):
    with pytest.raises(UsageError):
        PGD(**kw)


def test_unknown_attack_lists_choices():
    with pytest.raises(UsageError, match="pgd20"):
        create_attack("pgd7")
