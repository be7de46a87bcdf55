"""Every registered training method: a finite loss whose gradients reach every parameter."""
import pytest
import torch
import torch.nn.functional as F

from iat.attacks import kl_div
from iat.methods import METHODS, create_method
from iat.errors import UsageError

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
    method = create_method(name, **FAST)
    opts = method.options()
    assert opts["eps"] == FAST["eps"] and opts["steps"] == 2


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
    x, y = batch
    tiny_model.eval()
    method = create_method("iat", bn_mode="keep", detach_inverse=True, **FAST)
    loss, _ = method.loss(tiny_model, x, y)
    assert torch.isfinite(loss)


def test_iat_ce_kl_inverse_loss(tiny_model, batch):
    x, y = batch
    method = create_method("iat", inverse_loss="ce+kl", **FAST)
    loss, _ = method.loss(tiny_model, x, y)
    assert torch.isfinite(loss)


@pytest.mark.parametrize("options", [dict(kl_direction="both"), dict(inverse_loss="mse"), dict(gamma=1.0),
                                     dict(steps="ten"), dict(detach_inverse="maybe")])
def test_bad_options(options):
    with pytest.raises(UsageError):
        create_method("iat", **options)


def test_options_from_strings():
    method = create_method("iat", eps="8/255", steps="5", beta="6", detach_inverse="true")
    assert method.eps == pytest.approx(8 / 255) and method.steps == 5 and method.beta == 6.0
    assert method.detach_inverse is True
