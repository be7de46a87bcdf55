"""Evaluation core on hand-made cases: per-example worst case, counting over examples, verification,
the sanity checks, and the AutoAttack adapter on a tiny model."""
import importlib.util

import pytest
import torch
from torch import nn

from iat.attacks import PGD, Natural, create_attack
from iat.evaluation.accuracy import (Accuracy, AttackVerificationError, aggregate, pack_flags, robust_accuracy, unpack_flags,
                          verify_adversarial)
from iat.errors import UsageError
from iat.evaluation.sanity import check_more_effort, check_randomised, check_robust_vs_natural, check_zero_gradients
from iat.evaluation.sweep import check_eps_sweep, default_sweep

# ------------------------------------------------------------------ a model whose answers we know by hand


class MeanThreshold(nn.Module):
    """Predicts class 1 when the mean pixel is above 0.5; logits are linear in the mean."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(10.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = x.flatten(1).mean(1)
        return self.scale * torch.stack([0.5 - m, m - 0.5], dim=1)


class ShiftDown:
    """Subtracts eps from every pixel: breaks class-1 examples within eps of the boundary."""

    norm = "linf"

    def __init__(self, eps: float) -> None:
        self.eps = eps

    def __call__(self, model, x, y, **_):
        return (x - self.eps).clamp(0, 1)


class Broken:
    """Leaves its ball: what the verification must refuse to count."""

    norm, eps = "linf", 0.1

    def __call__(self, model, x, y, **_):
        return (x + 3 * self.eps).clamp(0, 1)


VALUES = [0.05, 0.2, 0.45, 0.55, 0.9, 0.95, 0.58, 0.3, 0.7, 0.8]


@pytest.fixture
def known():
    v = torch.tensor(VALUES)
    x = v.view(-1, 1, 1, 1).expand(-1, 1, 2, 2).contiguous()
    y = (v > 0.5).long()
    y[4] = 0  # mislabelled: naturally wrong, so never robust
    return MeanThreshold(), x, y


def test_aggregate_is_per_example_and_count_weighted():
    # batches of 3 and 1 examples: averaging batch accuracies would give other numbers
    natural = [torch.tensor([1, 1, 0]), torch.tensor([1])]
    outcomes = [{"pgd": torch.tensor([1, 0, 0]), "cw": torch.tensor([0, 1, 0])},
                {"pgd": torch.tensor([1]), "cw": torch.tensor([1])}]
    acc = aggregate(natural, outcomes)
    assert acc.total == 4 and acc.natural == 3
    assert acc.correct == {"pgd": 2, "cw": 2}
    assert acc.worst_case == 1  # only the last example survives both; batch means would say (0/3 + 1/1) / 2
    assert acc.rates()["worst_case"] == 0.25
    assert acc.per_example["worst_case"].tolist() == [False, False, False, True]


def test_aggregate_rejects_mismatched_outcomes():
    with pytest.raises(ValueError):
        aggregate([torch.tensor([1, 1])], [{"pgd": torch.tensor([1])}])


def test_robust_accuracy_unequal_batches_by_hand(known):
    model, x, y = known
    attacks = {"natural": Natural(), "fgsm": create_attack("fgsm", eps=0.1), "shift": ShiftDown(0.35)}
    acc = robust_accuracy(model, x, y, attacks, batch_size=4)  # batches of 4, 4 and 2
    # natural: all but the mislabelled 0.9. fgsm (eps 0.1) breaks 0.45, 0.55, 0.58; shift (0.35) breaks
    # every class-1 example below 0.85: 0.55, 0.58, 0.7, 0.8. Worst case: all but those five and 0.9.
    assert acc.natural == 9 and acc.correct == {"natural": 9, "fgsm": 6, "shift": 5}
    assert acc.worst_case == 4 and acc.total == 10
    assert acc.rates()["fgsm"] == pytest.approx(0.6)  # batch means would give (2/4 + 2/4 + 2/2) / 3
    assert acc.attacked == {"natural": 0, "fgsm": 9, "shift": 9}
    assert acc.mode == "each"


def test_worst_case_only_attacks_only_survivors(known):
    model, x, y = known
    attacks = {"natural": Natural(), "fgsm": create_attack("fgsm", eps=0.1), "shift": ShiftDown(0.35)}
    each = robust_accuracy(model, x, y, attacks, batch_size=3)
    cum = robust_accuracy(model, x, y, attacks, batch_size=3, worst_case_only=True)
    assert cum.mode == "cumulative" and cum.worst_case == each.worst_case == 4
    assert cum.correct == {"natural": 9, "fgsm": 6, "shift": 4}  # columns are cumulative
    assert cum.attacked["shift"] == 6 < each.attacked["shift"]  # shift only ran on fgsm's survivors
    assert torch.equal(cum.per_example["worst_case"], each.per_example["worst_case"])


def test_verification_rejects_an_attack_that_leaves_the_ball(known):
    model, x, y = known
    with pytest.raises(AttackVerificationError, match="left its linf ball"):
        robust_accuracy(model, x, y, {"natural": Natural(), "broken": Broken()}, batch_size=4)


def test_verification_box_finite_and_l2():
    x = torch.full((2, 1, 2, 2), 0.5)
    pgd = PGD(eps=0.1)
    verify_adversarial("ok", pgd, x, x + 0.1)
    with pytest.raises(AttackVerificationError, match=r"\[0, 1\]"):
        verify_adversarial("box", PGD(eps=1.0), x, x + 0.6)
    with pytest.raises(AttackVerificationError, match="non-finite"):
        verify_adversarial("nan", pgd, x, x.clone().fill_(float("nan")))
    with pytest.raises(AttackVerificationError, match="shape"):
        verify_adversarial("shape", pgd, x, x[:1])
    l2 = PGD(eps=0.15, norm="l2")
    verify_adversarial("l2 ok", l2, x, x + 0.07)  # l2 norm of 0.07 * ones(4) = 0.14
    with pytest.raises(AttackVerificationError, match="l2 ball"):
        verify_adversarial("l2", l2, x, x + 0.1)  # 0.2 > 0.15 although each pixel moved only 0.1


def test_pack_flags_round_trip():
    flags = torch.rand(37) > 0.5
    assert torch.equal(unpack_flags(pack_flags(flags), 37), flags)


# ------------------------------------------------------------------ sanity checks


class Quantised(nn.Module):
    """Rounds its input first: the input gradient is exactly zero (the textbook masked model)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc((x * 4).round().flatten(1))


class Noisy(MeanThreshold):
    """Random even in eval mode."""

    def forward(self, x):
        return super().forward(x) + torch.randn(len(x), 2)


def test_zero_gradient_check(known):
    model, x, y = known
    nat = model(x).argmax(1) == y
    assert check_zero_gradients(model, x, y, nat).status == "pass"
    masked = check_zero_gradients(Quantised(), x, y, torch.ones(len(x), dtype=torch.bool))
    assert masked.status == "warn" and "gradient masking" in masked.message
    assert masked.details["zero_gradient"] == len(x)


def test_randomised_output_check(known):
    model, x, _ = known
    assert check_randomised(model, x).status == "pass"
    noisy = check_randomised(Noisy(), x)
    assert noisy.status == "warn" and "random" in noisy.message


def _acc(correct, natural=90, total=100, mode="each"):
    return Accuracy(correct, min(correct.values()), total, natural, mode=mode)


def test_more_effort_check():
    attacks = {"pgd20": create_attack("pgd20"), "pgd100": create_attack("pgd100"),
               "pgd20x5": create_attack("pgd20", restarts=5), "cw": create_attack("cw")}
    ok = check_more_effort(attacks, _acc({"pgd20": 50, "pgd100": 48, "pgd20x5": 49, "cw": 60}))
    assert ok.status == "pass" and ["pgd20", "pgd100"] in ok.details["pairs"]
    assert ["pgd20", "cw"] not in ok.details["pairs"]  # another loss: not comparable
    bad = check_more_effort(attacks, _acc({"pgd20": 40, "pgd100": 55, "pgd20x5": 40, "cw": 40}))
    assert bad.status == "warn" and "pgd100" in bad.message and "gradient masking" in bad.message
    assert check_more_effort({"cw": create_attack("cw")}, _acc({"cw": 1})).status == "skip"
    assert check_more_effort(attacks, _acc({"pgd20": 5, "pgd100": 5, "pgd20x5": 5, "cw": 5},
                                           mode="cumulative")).status == "skip"


def test_robust_vs_natural_check():
    assert check_robust_vs_natural(_acc({"pgd20": 50})).status == "pass"
    assert check_robust_vs_natural(_acc({"pgd20": 95})).status == "warn"


def _points(counts, eps):
    return [{"eps": e, "correct": c, "total": 100, "accuracy": c / 100} for e, c in zip(eps, counts)]


def test_eps_sweep_checks():
    eps = default_sweep(8 / 255, "linf", 3072)
    assert eps[0] == 0 and eps[-1] == 1.0 and 0.5 in eps and 8 / 255 in eps
    good = check_eps_sweep(_points([90, 80, 60, 40, 10, 2, 0, 0], eps), 90, "linf", 3072)
    assert [c.status for c in good] == ["pass", "pass"]
    bad = check_eps_sweep(_points([90, 80, 60, 70, 10, 2, 30, 30], eps), 90, "linf", 3072)
    assert [c.status for c in bad] == ["warn", "warn"]
    short = check_eps_sweep(_points([90, 50], [0, 8 / 255]), 90, "linf", 3072)
    assert short[1].status == "skip"


# ------------------------------------------------------------------ AutoAttack adapter

HAVE_AA = importlib.util.find_spec("pyautoattack") is not None


def test_autoattack_is_registered():
    from iat.attacks import ATTACKS

    assert "autoattack" in ATTACKS and "autoattack" in ATTACKS.describe()["autoattack"].lower()


def test_autoattack_missing_package_says_how_to_install(monkeypatch):
    from iat.attacks import autoattack as adapter

    monkeypatch.setattr(adapter.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UsageError, match=r'pip install "iat\[autoattack\]"'):
        create_attack("autoattack", eps=8 / 255)


NEEDS_AA = pytest.mark.skipif(not HAVE_AA, reason='pyautoattack is not installed (pip install "iat[autoattack]"; '
                              "CI installs it)")


@pytest.fixture(autouse=True)
def one_thread(request):
    """AutoAttack's thousands of tiny steps (Square: 5000 queries) run many times slower with several
    threads on a busy CPU; one thread keeps these tests to seconds."""
    if "autoattack" not in request.node.name:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class NearestCentre(nn.Module):
    """4 classes by the mean pixel (centres 1/8, 3/8, 5/8, 7/8): an l-inf attack of radius eps can change the
    prediction exactly when the mean lies within eps of a class boundary (0.25, 0.5, 0.75)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(50.0))
        self.register_buffer("centres", torch.tensor([0.125, 0.375, 0.625, 0.875]))

    def forward(self, x):
        return -self.scale * (x.flatten(1).mean(1, keepdim=True) - self.centres) ** 2


@NEEDS_AA
def test_autoattack_adapter_finds_exactly_the_breakable_points():
    v = torch.tensor([0.05, 0.2, 0.3, 0.375, 0.45, 0.62, 0.74, 0.9, 0.97, 0.55])
    x = v.view(-1, 1, 1, 1).expand(-1, 1, 8, 8).contiguous()
    y = (v * 4).floor().long()
    model, before, rng = NearestCentre().train(), x.clone(), torch.get_rng_state()
    aa = create_attack("autoattack", eps=0.1, norm="linf")
    acc = robust_accuracy(model, x, y, {"natural": Natural(), "autoattack": aa}, batch_size=10,
                          generator=torch.Generator().manual_seed(0))
    robust = [abs(float(m) - b) > 0.1 for m in v for b in [min((0.25, 0.5, 0.75), key=lambda b: abs(float(m) - b))]]
    assert acc.per_example["autoattack"].tolist() == robust  # 0.05, 0.375, 0.62, 0.9, 0.97 survive
    assert torch.equal(x, before) and model.training  # input untouched, mode restored
    assert torch.equal(torch.get_rng_state(), rng)  # AutoAttack reseeds torch; the caller's RNG is restored
    diag = aa.diagnostics()
    assert set(diag["broken_by"]) == {"apgd-ce", "apgd-t", "fab-t", "square"}  # every component ran
    assert sum(diag["broken_by"].values()) == 5 and diag["flags"] == [] and len(diag["seeds"]) == 1
    assert aa.describe()["components"] == ["apgd-ce", "apgd-t", "fab-t", "square"]


@NEEDS_AA
@pytest.mark.parametrize("norm, eps", [("linf", 0.5), ("l2", 8.0)])
def test_autoattack_adapter_tiny_cnn_seeded_and_verified(tiny_model, batch, norm, eps):
    x, y = batch

    def run():
        attacks = {"natural": Natural(), "autoattack": create_attack("autoattack", eps=eps, norm=norm)}
        return robust_accuracy(tiny_model, x, y, attacks, batch_size=5, generator=torch.Generator().manual_seed(0))

    acc = run()  # robust_accuracy verifies every returned example (ball, box, finite)
    assert acc.correct["autoattack"] <= acc.natural
    assert torch.equal(run().per_example["autoattack"], acc.per_example["autoattack"])  # same seed, same answer


@NEEDS_AA
def test_autoattack_needs_four_classes(batch):
    from iat.models import create_model

    model = create_model("cnn", num_classes=3, in_channels=1, input_size=16, mean=[0.5], std=[0.25])
    x, y = batch
    with pytest.raises(UsageError, match="at least 4 classes"):
        create_attack("autoattack")(model, x, y % 3)
