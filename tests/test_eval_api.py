"""`iat.evaluate`: any nn.Module on tensors, a Dataset or a DataLoader, through the evaluation of `iat eval`."""
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import iat
from iat.data import load_dataset
from iat.errors import UsageError
from iat.evaluation.accuracy import unpack_flags
from iat.evaluation.loading import model_spec_for
from iat.evaluation.pipeline import EvalConfig, evaluate_checkpoint
from iat.models import create_model
from iat.records import read_eval

ATTACKS = "natural,fgsm,pgd20"


@pytest.fixture(scope="module")
def data():
    test = load_dataset("synthetic").test
    return test.x[:40].float() / 255, test.y[:40]


@pytest.fixture(scope="module")
def trained():
    """A tiny linear classifier trained naturally on the synthetic data (most examples correct)."""
    torch.manual_seed(0)
    train = load_dataset("synthetic").train
    model = nn.Sequential(nn.Flatten(), nn.Linear(16 * 16, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    x = train.x.float() / 255
    for _ in range(60):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), train.y).backward()
        optimizer.step()
    return model


def test_tensors_dataset_and_loader_give_the_same_evaluation(trained, data):
    x, y = data
    runs = [iat.evaluate(trained, d, attacks=ATTACKS, eps="8/255", progress=False)
            for d in ((x, y), TensorDataset(x, y), DataLoader(TensorDataset(x, y), batch_size=7))]
    first = runs[0].record
    assert [r["attack"] for r in first.results] == ["natural", "fgsm", "pgd20", "worst case"]
    for other in runs[1:]:
        assert other.record.results == first.results and other.record.per_example == first.per_example
    assert abs(first.threat["eps"] - 8 / 255) < 1e-12 and first.threat["norm"] == "linf"


def test_accuracy_is_counted_per_example_by_hand(trained, data):
    x, y = data
    result = iat.evaluate(trained, (x, y), attacks=ATTACKS, eps=0.1, batch_size=16, progress=False)
    with torch.no_grad():
        natural = trained(x).argmax(1) == y
    assert result.accuracy["natural"] == natural.float().mean().item()
    assert 0 < result.accuracy["natural"]  # the model learned something, so the attacks had work to do
    flags = {k: unpack_flags(v, len(x)) for k, v in result.record.per_example.items()}
    assert torch.equal(flags["natural"], natural)
    worst = natural & flags["fgsm"] & flags["pgd20"]
    assert torch.equal(flags["worst_case"], worst) and result.worst_case == worst.float().mean().item()
    assert result.checks["robust_le_natural"] == "pass" and "class_coverage" in result.checks
    assert "worst case" in str(result) and "PASS" in str(result)


def test_the_model_and_the_data_are_left_as_they_were(trained, data):
    x, y = data
    x_before, weights = x.clone(), [p.detach().clone() for p in trained.parameters()]
    trained.train()
    iat.evaluate(trained, (x, y), attacks="natural,pgd20", eps=0.1, progress=False)
    assert trained.training and torch.equal(x, x_before)
    assert all(torch.equal(a, b) for a, b in zip(weights, trained.parameters(), strict=True))
    assert all(p.requires_grad for p in trained.parameters())


def test_same_numbers_and_files_as_iat_eval_of_the_same_weights(tmp_path):
    """A plain state_dict through `iat eval`'s path and the same model through iat.evaluate: one core."""
    bundle = load_dataset("synthetic")
    torch.manual_seed(0)
    spec = model_spec_for("cnn", bundle)
    model = create_model("cnn", **{k: v for k, v in spec.items() if k != "name"})
    torch.save(model.state_dict(), tmp_path / "model.pt")
    cfg = EvalConfig(attacks="natural,pgd20:steps=5", eps=0.2, n_examples=24, batch_size=10, dataset="synthetic",
                     model="cnn", device="cpu", progress=False)
    expected = evaluate_checkpoint(str(tmp_path / "model.pt"), cfg)
    got = iat.evaluate(model, (bundle.test.x, bundle.test.y), attacks="natural,pgd20:steps=5", eps=0.2,
                       n_examples=24, batch_size=10, progress=False, out=tmp_path / "own" / "eval.json")
    assert got.record.results == expected.results and got.record.per_example == expected.per_example
    assert [c["name"] for c in got.record.sanity] == [c["name"] for c in expected.sanity]
    assert [p.name for p in got.files] == ["eval.json", "eval.csv", "eval.md"]
    assert read_eval(got.files[0]).results == got.record.results
    assert "| pgd20:steps=5 |" in got.files[2].read_text()
    assert got.files[1].read_text().splitlines()[0].startswith("attack,accuracy,correct,total")


def test_uint8_images_are_read_as_pixels_over_255(trained, data):
    x, y = data
    as_bytes = (x * 255).round().to(torch.uint8)
    a = iat.evaluate(trained, (as_bytes, y), attacks="natural", eps=0.1, progress=False)
    b = iat.evaluate(trained, (as_bytes.float() / 255, y), attacks="natural", eps=0.1, progress=False)
    assert a.record.results == b.record.results


def _bad(trained, examples, message, **kw):
    args = {"data": examples, "eps": 0.1, "attacks": "natural", "progress": False, **kw}
    with pytest.raises(UsageError, match=message) as err:
        iat.evaluate(trained, **args)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("what, message", [
    ("labels_out_of_range", r"class indices in \[0, 4\).*\[1, 9\]"),
    ("negative_label", r"class indices in \[0, 4\)"),
    ("float_labels", "integer class indices"),
    ("outside_box", r"in \[0, 1\].*normalisation belongs inside the model"),
    ("nan_images", r"in \[0, 1\]"),
    ("three_dims", r"4-D tensor \[N, C, H, W\], got shape \[40, 16, 16\]"),
    ("too_few_labels", "40 images but 39 labels"),
    ("three_items", r"pair \(x, y\)"),
    ("not_data", "a torch Dataset or a DataLoader"),
])
def test_bad_data_is_a_one_line_usage_error(trained, data, what, message):
    x, y = data
    bad = {"labels_out_of_range": (x, torch.where(y == 0, 9, y)), "negative_label": (x, y - 1),
           "float_labels": (x, y.float()), "outside_box": (x * 2 - 0.5, y),
           "nan_images": (torch.where(x > 0.5, float("nan"), x), y), "three_dims": (x[:, 0], y),
           "too_few_labels": (x, y[:-1]), "three_items": (x, y, y), "not_data": 3}[what]
    _bad(trained, bad, message)


@pytest.mark.parametrize("kw, message", [
    ({"eps": None}, "needs eps="),
    ({"eps": "eight"}, "eps"),
    ({"n_examples": 41}, "n_examples is 41 but the data hold 40"),
    ({"n_examples": 0}, "positive integer"),
    ({"out": "results.csv"}, r"out= must name a .json file"),
    ({"attacks": "natural,pgd2O"}, "pgd2O"),
    ({"norm": "l3"}, "l3"),
])
def test_bad_options_are_one_line_usage_errors(trained, data, kw, message):
    _bad(trained, data, message, **kw)


def test_a_model_that_does_not_return_logits_is_refused(data):
    _bad(nn.Sequential(nn.Flatten(), nn.Linear(256, 1)), data, r"logits \[N, num_classes\]")
    _bad(nn.Sequential(nn.Flatten(), nn.Linear(256, 4), nn.Flatten(0)), data, r"logits \[N, num_classes\]")


class ImagesOnly(torch.utils.data.Dataset):
    def __init__(self, x):
        self.x = x

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i]


def test_dataset_items_must_be_image_label_pairs(trained, data):
    _bad(trained, ImagesOnly(data[0]), r"each Dataset item must be an \(image, label\) pair")


def test_import_iat_stays_light():
    code = "import sys, iat; print('torch' in sys.modules); iat.evaluate; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "True"]


def test_an_eps_sweep_is_recorded_and_drawn(trained, data, tmp_path):
    result = iat.evaluate(trained, data, attacks="natural", eps=0.1, n_examples=16, eps_sweep=[0, 0.1, 1],
                          progress=False, out=tmp_path / "eval.json")
    points = result.record.eps_sweep["points"]
    assert [p["eps"] for p in points] == [0.0, 0.1, 1.0] and points[-1]["correct"] == 0
    assert points[0]["correct"] == round(result.accuracy["natural"] * 16)
    assert result.checks["eps_sweep_reaches_zero"] == "pass"
    assert [p.name for p in result.files] == ["eval.json", "eval.csv", "eval.md", "eval-eps-sweep.png"]


def test_the_evaluate_example_runs():
    """The >>> example in iat.evaluate's docstring is correct."""
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module("iat.api"))
    assert result.attempted > 0 and result.failed == 0
