"""uiat-fgsm with start=inverse-noise: the host's single step begins at x + U[y] plus the host's uniform
noise, projected into the eps-ball around x, so the random start of FGSM-RS is kept at start=inverse's cost."""
import pytest
import torch
import torch.nn.functional as F

from iat.attacks import PGD
from iat.methods import create_method
from test_uiat_inverse_start import EPS, HOST_STEP, step


def with_u(model, x, y, host):
    model.eval()
    method = create_method("uiat-fgsm", eps=EPS, bn_mode="keep", start="inverse-noise", host=host)
    step(method, model, x, y, n=3)
    assert method.universal.delta.abs().max() > 0
    return method


@pytest.mark.parametrize("host", ["fgsm-rs", "fgsm-at"])
def test_x_adv_is_the_host_step_from_the_noisy_inverse_start(tiny_model, batch, host):
    """Re-typed: start = clip(x + clip(U[y] + noise, -eps, eps)), noise ~ U(-eps, eps) (fgsm-at, which has
    no noise of its own, takes fgsm-rs's); x' = clip(x + clip(start - x + alpha sign(g), -eps, eps)), g at start."""
    x, y = batch
    method = with_u(tiny_model, x, y, host)
    u = method.universal.delta.clone()
    torch.manual_seed(11)
    crafted = method.craft(tiny_model, x, y)
    torch.manual_seed(11)
    noise = PGD(eps=EPS).init_delta(x)  # the same draw: uniform in the eps-ball, kept in [0, 1]
    start = (x + ((x + u[y]).clamp(0, 1) - x + noise).clamp(-EPS, EPS)).clamp(0, 1).requires_grad_(True)
    logits = tiny_model(start)
    (g,) = torch.autograd.grad(F.cross_entropy(logits, y, reduction="sum"), start)
    expected = (x + (start.detach() - x + HOST_STEP[host] * g.sign()).clamp(-EPS, EPS)).clamp(0, 1)
    assert torch.allclose(crafted["x_adv"], expected, atol=1e-6)
    assert torch.allclose(crafted["logits_inv"], logits.detach(), atol=1e-6)  # the teacher is the noisy start's
    assert (crafted["x_adv"] - x).abs().max() <= EPS + 1e-6


def test_the_start_is_random_where_start_inverse_is_not(tiny_model, batch):
    x, y = batch
    noisy = with_u(tiny_model, x, y, "fgsm-rs")
    a, b = (noisy.craft(tiny_model, x, y)["x_adv"] for _ in range(2))
    assert not torch.equal(a, b)
    fixed = create_method("uiat-fgsm", eps=EPS, bn_mode="keep", start="inverse")
    fixed.universal.load_state_dict(noisy.universal.state_dict())
    assert torch.equal(*(fixed.craft(tiny_model, x, y)["x_adv"] for _ in range(2)))


def test_n_fgsm_keeps_its_noise_ball(tiny_model, batch):
    x, y = batch
    method = with_u(tiny_model, x, y, "n-fgsm")
    x_adv = method.craft(tiny_model, x, y)["x_adv"]
    assert (x_adv - x).abs().max() <= 3 * EPS + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1


def test_it_trains_recorded_with_a_detached_teacher(tiny_model, batch):
    x, y = batch
    method = with_u(tiny_model, x, y, "fgsm-rs")
    loss, metrics = step(method, tiny_model, x, y)
    assert torch.isfinite(loss) and method.options()["detach_inverse"] is True
    assert method.options()["start"] == "inverse-noise"
