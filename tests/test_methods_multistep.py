"""TRADES, MART, their inverse variants and AWP: objectives against hand-computed values, AWP's
weight restoration (also on errors), and that no method touches an optimizer of the model."""
import math

import pytest
import torch

from iat.attacks import PGD
from iat.methods import METHODS, create_method
from iat.methods.awp import perturbed_weights
from iat.methods.iat_trades_mart import iat_mart_objective, iat_trades_objective
from iat.methods.mart import boosted_ce, mart_objective
from iat.methods.pgd_at import PGDAT
from iat.methods.trades import trades_objective
from iat.errors import UsageError

FAST = dict(eps=8 / 255, step_size=2 / 255, steps=2)
AWP_NAMES = [n for n in METHODS.names() if n.endswith("+awp")]


def logits_of(*probs):
    """Logits whose softmax is exactly the given probability rows."""
    return torch.log(torch.tensor(probs, dtype=torch.float32))


def kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q))


# ----------------------------------------------------------------- objectives, by hand
P, Q = (0.5, 0.5), (0.25, 0.75)          # KL(P || Q) = 0.1438, KL(Q || P) = 0.1308


def test_kl_is_asymmetric_on_the_test_points():
    assert abs(kl(P, Q) - kl(Q, P)) > 1e-3


def test_trades_objective_by_hand():
    y = torch.tensor([0])
    loss, terms = trades_objective(logits_of(P), logits_of(Q), y, beta=6.0)
    expected = -math.log(0.5) + 6.0 * kl(P, Q)      # CE on the NATURAL input, KL(p(x) || p(x'))
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert terms["kl"].item() == pytest.approx(kl(P, Q), abs=1e-6)


def test_mart_objective_by_hand():
    nat = [(0.5, 0.3, 0.2), (0.1, 0.6, 0.3)]
    adv = [(0.2, 0.5, 0.3), (0.4, 0.35, 0.25)]
    y = torch.tensor([0, 1])
    loss, _ = mart_objective(logits_of(*nat), logits_of(*adv), y, beta=5.0)
    per = [-math.log(0.2) - math.log(1 - 0.5) + 5.0 * kl(nat[0], adv[0]) * (1 - 0.5),
           -math.log(0.35) - math.log(1 - 0.4) + 5.0 * kl(nat[1], adv[1]) * (1 - 0.6)]
    assert loss.item() == pytest.approx(sum(per) / 2, abs=1e-5)   # per example, then the mean


def test_boosted_ce_stays_finite_when_the_rival_takes_all_mass():
    logits = torch.tensor([[0.0, 100.0, 0.0]], requires_grad=True)
    value = boosted_ce(logits, torch.tensor([0]))
    value.sum().backward()
    assert torch.isfinite(value).all() and value.item() == pytest.approx(200 - math.log(2), abs=1e-3)  # 100 + (100 - log 2)
    assert torch.isfinite(logits.grad).all()


def test_iat_trades_objective_by_hand():
    nat, adv, inv = (0.6, 0.4), Q, P
    y = torch.tensor([0])
    args = (logits_of(nat), logits_of(adv), logits_of(inv), y, 6.0)
    loss, _ = iat_trades_objective(*args)                            # default: KL(p(x~) || p(x'))
    assert loss.item() == pytest.approx(-math.log(0.6) + 6.0 * kl(inv, adv), abs=1e-6)
    loss2, _ = iat_trades_objective(*args, kl_direction="adv||inv")
    assert loss2.item() == pytest.approx(-math.log(0.6) + 6.0 * kl(adv, inv), abs=1e-6)


def test_iat_mart_objective_by_hand():
    adv, inv = (0.2, 0.5, 0.3), (0.7, 0.2, 0.1)
    y = torch.tensor([0])
    loss, _ = iat_mart_objective(logits_of(adv), logits_of(inv), y, beta=5.0)
    bce = -math.log(0.2) - math.log(1 - 0.5)
    assert loss.item() == pytest.approx(bce + 5.0 * kl(inv, adv) * (1 - 0.7), abs=1e-5)
    loss2, _ = iat_mart_objective(logits_of(adv), logits_of(inv), y, beta=5.0, kl_direction="adv||inv")
    assert loss2.item() == pytest.approx(bce + 5.0 * kl(adv, inv) * (1 - 0.7), abs=1e-5)


# ----------------------------------------------------------------- the methods use those objectives
@pytest.mark.parametrize("name", ["trades", "mart", "iat-trades", "iat-mart"])
def test_method_loss_matches_objective(tiny_model, batch, name):
    x, y = batch
    tiny_model.eval()  # BN in eval so the recomputation sees the same network
    method = create_method(name, bn_mode="keep", beta=2.0, **FAST)
    torch.manual_seed(0)
    loss, _ = method.loss(tiny_model, x, y)
    torch.manual_seed(0)
    x_adv = method.trades_example(tiny_model, x, y) if "trades" in name else method.small_start()(tiny_model, x, y)
    ln, la = tiny_model(x), tiny_model(x_adv)
    if name.startswith("iat"):
        li = tiny_model(method.inverse_example(tiny_model, x, y, x_adv))
        expected = (iat_trades_objective(ln, la, li, y, 2.0) if name == "iat-trades"
                    else iat_mart_objective(la, li, y, 2.0, logits_weight=ln))[0]
    else:
        expected = (trades_objective if name == "trades" else mart_objective)(ln, la, y, 2.0)[0]
    assert torch.allclose(loss, expected, atol=1e-6)
    assert (x_adv - x).abs().max() <= 8 / 255 + 1e-6 and not torch.equal(x_adv, x)


def test_trades_and_mart_defaults_follow_their_reference_code():
    for name, beta in [("trades", 6.0), ("mart", 5.0), ("iat-trades", 6.0), ("iat-mart", 5.0)]:
        m = create_method(name)
        assert m.beta == beta and m.bn_mode == "eval" and m.init_radius == 0.001
        start = m.small_start()
        assert start.random_start and start.eps * start.init_scale == pytest.approx(0.001)
    assert create_method("iat-trades").kl_direction == "inv||adv"


@pytest.mark.parametrize("name", ["iat-trades", "iat-mart"])
@pytest.mark.parametrize("options", [dict(detach_inverse=True), dict(inverse_loss="ce+kl", eps_inv="4/255")])
def test_variant_options(tiny_model, batch, name, options):
    loss, _ = create_method(name, **options, **FAST).loss(tiny_model, *batch)
    assert torch.isfinite(loss)


@pytest.mark.parametrize("name", ["iat-trades", "iat-mart", "trades", "trades+awp"])
@pytest.mark.parametrize("options", [dict(kl_direction="both"), dict(init_radius=-1.0),
                                     dict(inverse_loss="mse"), dict(gamma=-1.0)])
def test_bad_options(name, options):
    with pytest.raises(UsageError):
        create_method(name, **options)


# ----------------------------------------------------------------- AWP
def test_awp_passes_options_through_and_records_them():
    m = create_method("trades+awp", beta=6, gamma=5e-3, eps="4/255")
    opts = m.options()
    assert opts["beta"] == 6.0 and opts["gamma"] == 5e-3 and m.threat.eps == pytest.approx(4 / 255)
    assert opts["init_radius"] == 0.001 and opts["awp_lr"] == 0.01
    assert set(AWP_NAMES) >= {"pgd-at+awp", "trades+awp", "iat+awp"}


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _assert_same(model, snap):
    for n, p in model.named_parameters():
        assert torch.equal(p, snap[n]), n


@pytest.mark.parametrize("name", AWP_NAMES)
def test_awp_step_changes_weights_only_by_the_optimizer_step(tiny_model, batch, name):
    x, y = batch
    method = create_method(name, gamma=0.05, **FAST)
    opt = torch.optim.SGD(tiny_model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    w0 = _snapshot(tiny_model)
    with method.step_context(tiny_model):
        loss, _ = method.loss(tiny_model, x, y)
        w_pert = _snapshot(tiny_model)
        opt.zero_grad()
        loss.backward()
        opt.step()
        w_stepped = _snapshot(tiny_model)
    for n, p in tiny_model.named_parameters():
        v = w_pert[n] - w0[n]
        if p.dim() > 1:   # each weight tensor moved by gamma * ||w||; biases and BN are left alone
            assert v.norm().item() == pytest.approx(0.05 * w0[n].norm().item(), rel=1e-3), n
        else:
            assert torch.equal(v, torch.zeros_like(v)), n
        assert torch.allclose(p, w_stepped[n] - v, atol=1e-6), n   # the step at w + v, minus v
        assert not torch.equal(p, w0[n]), n


@pytest.mark.parametrize("where", ["loss", "after_loss", "optimizer"])
def test_awp_restores_weights_exactly_when_something_raises(tiny_model, batch, monkeypatch, where):
    x, y = batch
    method = create_method("pgd-at+awp", gamma=0.05, **FAST)
    opt = torch.optim.SGD(tiny_model.parameters(), lr=0.1)
    w0 = _snapshot(tiny_model)
    if where == "loss":   # the wrapped objective raises in its second call, at the perturbed weights
        calls, inner = [], PGDAT.objective

        def exploding(self, model, x, y, crafted):
            calls.append(1)
            if len(calls) == 2:
                assert not torch.equal(dict(model.named_parameters())["net.0.weight"], w0["net.0.weight"])
                raise RuntimeError("boom")
            return inner(self, model, x, y, crafted)

        monkeypatch.setattr(PGDAT, "objective", exploding)
    if where == "optimizer":
        monkeypatch.setattr(opt, "step", lambda: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        with method.step_context(tiny_model):
            loss, _ = method.loss(tiny_model, x, y)
            opt.zero_grad()
            loss.backward()
            if where == "after_loss":
                raise RuntimeError("boom")
            opt.step()
    _assert_same(tiny_model, w0)


def test_perturbed_weights_is_exact_without_a_step(tiny_model):
    w0 = _snapshot(tiny_model)
    diff = {n: torch.randn_like(p) * 1e-2 for n, p in tiny_model.named_parameters() if p.dim() > 1}
    with perturbed_weights(tiny_model, diff):
        assert not torch.equal(tiny_model.net[0].weight, w0["net.0.weight"])
    _assert_same(tiny_model, w0)


@pytest.mark.parametrize("name", ["pgd-at+awp", "iat+awp"])
def test_awp_outside_step_context_leaves_model_untouched_and_agrees(tiny_model, batch, name):
    """loss() called bare (as in tests) computes the same loss and gradients through a functional view."""
    x, y = batch
    tiny_model.eval()
    method = create_method(name, bn_mode="keep", gamma=0.05, **FAST)
    w0 = _snapshot(tiny_model)
    torch.manual_seed(0)
    bare, _ = method.loss(tiny_model, x, y)
    bare.backward()
    grads = {n: p.grad.clone() for n, p in tiny_model.named_parameters()}
    _assert_same(tiny_model, w0)
    tiny_model.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    with method.step_context(tiny_model):
        inside, _ = method.loss(tiny_model, x, y)
        inside.backward()
    assert torch.allclose(bare, inside, atol=1e-6)
    for n, p in tiny_model.named_parameters():
        assert torch.allclose(p.grad, grads[n], atol=1e-5), n


def test_awp_crafts_once_and_reuses_the_inputs(tiny_model, batch, monkeypatch):
    calls = []
    original = PGD.__call__
    monkeypatch.setattr(PGD, "__call__", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    method = create_method("iat+awp", **FAST)
    with method.step_context(tiny_model):
        method.loss(tiny_model, *batch)
    assert len(calls) == 2    # x' and x~, crafted against the unperturbed model only


def test_awp_gamma_zero_is_the_wrapped_method(tiny_model, batch):
    tiny_model.eval()
    torch.manual_seed(0)
    plain, _ = create_method("trades", bn_mode="keep", **FAST).loss(tiny_model, *batch)
    torch.manual_seed(0)
    wrapped, _ = create_method("trades+awp", bn_mode="keep", gamma=0.0, **FAST).loss(tiny_model, *batch)
    assert torch.equal(plain, wrapped)


# ----------------------------------------------------------------- only the trainer touches the optimizer
@pytest.mark.parametrize("name", METHODS.names())
def test_methods_never_touch_the_models_gradients_or_an_optimizer_of_it(tiny_model, batch, name):
    method = create_method(name, **FAST)
    with method.step_context(tiny_model):
        method.loss(tiny_model, *batch)
        assert all(p.grad is None for p in tiny_model.parameters())
    own = {id(p) for p in tiny_model.parameters()}
    for value in vars(method).values():
        for item in value if isinstance(value, tuple) else (value,):
            if isinstance(item, torch.optim.Optimizer):
                params = [p for g in item.param_groups for p in g["params"]]
                assert not own & {id(p) for p in params}, name


# ----------------------------------------------------------------- AWP defaults per host, warm-up
@pytest.mark.parametrize("name, gamma, warmup", [("pgd-at+awp", 1e-2, 0.0), ("iat+awp", 1e-2, 0.0),
                                                 ("trades+awp", 5e-3, 0.045), ("iat-trades+awp", 5e-3, 0.045),
                                                 ("mart+awp", 5e-3, 0.045), ("iat-mart+awp", 5e-3, 0.045)])
def test_awp_is_registered_on_every_multistep_recipe_with_its_hosts_defaults(name, gamma, warmup):
    """The authors' code: AT-AWP gamma 1e-2 from the start; TRADES-AWP gamma 5e-3 from the 10th of 200 epochs."""
    opts = create_method(name).options()
    assert (opts["gamma"], opts["awp_warmup"]) == (gamma, warmup)
    assert create_method(name, gamma=0.02, awp_warmup=0.1).options()["gamma"] == 0.02


def test_awp_waits_for_its_warmup(tiny_model, batch):
    x, y = batch
    tiny_model.eval()
    method = create_method("trades+awp", bn_mode="keep", **FAST)
    crafted = method.craft(tiny_model, x, y)
    plain, _ = method.inner.objective(tiny_model, x, y, crafted)
    method.at_step(4, 100)  # 4% of training: before the 4.5% warm-up, the wrapped objective itself
    before, _ = method.objective(tiny_model, x, y, crafted)
    method.at_step(5, 100)
    after, _ = method.objective(tiny_model, x, y, crafted)
    assert torch.equal(before, plain) and not torch.allclose(after, plain)


def test_the_trainer_tells_the_method_where_training_is(tmp_path, monkeypatch):
    from iat import config as C
    from iat.training.trainer import Trainer

    cfg = C.update(C.TrainConfig(method="trades+awp", model="cnn", device="cpu", progress=False),
                   {"data": {"name": "synthetic", "val_size": 128}, "optim": {"epochs": 2, "batch_size": 128},
                    "threat": {"steps": 1}, "val": {"steps": 1, "n_examples": 32}})
    trainer = Trainer(cfg, tmp_path)
    seen = []
    inner = trainer.method.at_step
    monkeypatch.setattr(trainer.method, "at_step", lambda step, total: seen.append((step, total)) or inner(step, total))
    trainer.fit()
    assert seen == [(t, trainer.total_steps) for t in range(trainer.total_steps)] and trainer.total_steps == 6


def test_ce_kl_inverse_loss_takes_its_references_in_the_crafting_bn_mode(tiny_model, batch):
    """iat-trades crafts in BatchNorm eval mode; p(x) and p(x') of the "ce+kl" inverse loss must come from the
    same mode (iat 0.1 took them in the training mode while x~ was crafted in eval mode)."""
    from iat.attacks import ce_loss, kl_div

    x, y = batch
    tiny_model.train()
    method = create_method("iat-trades", inverse_loss="ce+kl", **FAST)
    x_adv = method.trades_example(tiny_model, x, y)
    torch.manual_seed(0)
    x_inv = method.inverse_example(tiny_model, x, y, x_adv)
    assert tiny_model.training
    tiny_model.eval()
    with torch.no_grad():
        nat, adv = tiny_model(x), tiny_model(x_adv)
    tiny_model.train()

    def by_hand(logits, y, _ref=None):
        return ce_loss(logits, y) + kl_div(nat, logits) - kl_div(adv, logits)

    torch.manual_seed(0)
    expected = PGD(eps=8 / 255, step_size=2 / 255, steps=2, descent=True, loss=by_hand, bn_mode="eval")(tiny_model, x, y)
    assert torch.equal(x_inv, expected)


def test_awp_warmup_starts_where_the_references_epoch_rule_starts():
    """The TRADES-AWP reference: `for epoch in range(1, epochs + 1)`, perturbing when `epoch >= awp_warmup`
    (10). Re-typed, per 0-based epoch index e of 200: active iff e + 1 >= 10; ours by the step fraction."""
    method, steps_per_epoch, epochs = create_method("trades+awp", **FAST), 7, 200
    for e in range(epochs):
        for t in (e * steps_per_epoch, (e + 1) * steps_per_epoch - 1):  # first and last step of the epoch
            method.at_step(t, epochs * steps_per_epoch)
            assert method.perturbing == (e + 1 >= 10), (e, t)


def test_iat_mart_weight_is_marts_own_by_default():
    """MART's weight 1 - p_y(x) of the natural x (re-typed from MART's code); "inverse" keeps 1 - p_y(x~)."""
    adv, inv, nat = (0.2, 0.5, 0.3), (0.7, 0.2, 0.1), (0.4, 0.35, 0.25)
    y = torch.tensor([0])
    bce = -math.log(0.2) - math.log(1 - 0.5)
    loss, _ = iat_mart_objective(logits_of(adv), logits_of(inv), y, beta=5.0, logits_weight=logits_of(nat))
    assert loss.item() == pytest.approx(bce + 5.0 * kl(inv, adv) * (1 - 0.4), abs=1e-5)
    assert create_method("iat-mart").options()["mart_weight"] == "natural"
    with pytest.raises(UsageError, match="mart_weight"):
        create_method("iat-mart", mart_weight="x~")


@pytest.mark.parametrize("weight", ["natural", "inverse"])
def test_iat_mart_method_uses_the_chosen_weight(tiny_model, batch, weight):
    x, y = batch
    tiny_model.eval()
    method = create_method("iat-mart", bn_mode="keep", beta=2.0, mart_weight=weight, **FAST)
    crafted = method.craft(tiny_model, x, y)
    loss, metrics = method.objective(tiny_model, x, y, crafted)
    la, li = tiny_model(crafted["x_adv"]), tiny_model(crafted["x_inv"])
    ln = tiny_model(x) if weight == "natural" else None
    want, terms = iat_mart_objective(la, li, y, 2.0, logits_weight=ln)
    assert torch.allclose(loss, want, atol=1e-6) and torch.allclose(metrics["kl"], terms["kl"], rtol=1e-5, atol=0)
    _, other = iat_mart_objective(la, li, y, 2.0, logits_weight=None if ln is not None else tiny_model(x))
    assert not torch.allclose(metrics["kl"], other["kl"], rtol=1e-3, atol=0)  # the two weights differ


def test_an_iat_mart_run_recorded_before_mart_weight_was_weighed_by_the_inverse_adversary():
    from iat.records import RunRecord
    from iat.same_run import first_difference

    def record(method):
        return RunRecord(config={"method": "iat-mart"}, method=method)

    old = record({"name": "iat-mart", "beta": 5.0})
    assert first_difference(old, record({"name": "iat-mart", "beta": 5.0, "mart_weight": "inverse"})) is None
    assert "mart_weight" in first_difference(old, record({"name": "iat-mart", "beta": 5.0, "mart_weight": "natural"}))
