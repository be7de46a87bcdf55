"""Models: shapes, Normalize in front, gradients everywhere, double backward, clear errors."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from iat.errors import UsageError
from iat.models import MODELS, Normalize, create_model, model_info

# The wide ResNets (36M-46M parameters) are built once, at batch 1, to keep the suite fast on CPU;
# their 1-channel variant only differs in the stem conv and runs when IAT_SLOW=1.
HEAVY = {name for name in MODELS.names() if name.startswith("wrn-")}
RUN_SLOW = os.environ.get("IAT_SLOW") == "1"


def build(name: str, in_channels: int, num_classes: int = 10) -> nn.Module:
    size = 28 if in_channels == 1 else 32  # MNIST-like and CIFAR-like
    return create_model(name, num_classes=num_classes, in_channels=in_channels, input_size=size,
                        mean=[0.5] * in_channels, std=[0.25] * in_channels)


def cases() -> list:
    out = []
    for name in MODELS.names():
        for c in (1, 3):
            skip = name in HEAVY and c == 1 and not RUN_SLOW
            marks = [pytest.mark.skip(reason="slow; set IAT_SLOW=1")] if skip else []
            out.append(pytest.param(name, c, marks=marks, id=f"{name}-c{c}"))
    return out


@pytest.mark.parametrize("name,in_channels", cases())
def test_model_shape_normalize_and_gradients(name: str, in_channels: int) -> None:
    torch.manual_seed(0)
    model = build(name, in_channels, num_classes=7).train()
    assert isinstance(model[0], Normalize) and isinstance(model.normalize, Normalize)
    # In-place activations can break GradAlign's double backward.
    assert not any(getattr(m, "inplace", False) for m in model.modules())
    n = 1 if name in HEAVY else 2
    size = 28 if in_channels == 1 else 32
    x = torch.rand(n, in_channels, size, size)
    logits = model(x)
    assert logits.shape == (n, 7)
    assert torch.isfinite(logits).all()
    F.cross_entropy(logits, torch.arange(n) % 7).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{pname} got no gradient"
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, pname
    info = model_info(model)
    assert info["params"] == sum(p.numel() for p in model.parameters()) > 0


@pytest.mark.parametrize("name", ["cnn", "resnet18"])
def test_double_backward(name: str) -> None:
    # GradAlign's regulariser differentiates a function of the input gradient w.r.t. the weights.
    torch.manual_seed(0)
    model = build(name, 3).train()
    x = torch.rand(2, 3, 32, 32, requires_grad=True)
    loss = F.cross_entropy(model(x), torch.tensor([0, 1]))
    (grad_x,) = torch.autograd.grad(loss, x, create_graph=True)
    (grad_x.pow(2).sum() + loss).backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_normalize_matches_by_hand() -> None:
    mean, std = [0.1, 0.2, 0.3], [0.5, 0.25, 2.0]
    norm = Normalize(mean, std)
    x = torch.rand(4, 3, 5, 5)
    expected = torch.stack([(x[:, c] - mean[c]) / std[c] for c in range(3)], dim=1)
    torch.testing.assert_close(norm(x), expected)
    assert {"mean", "std"} <= set(norm.state_dict())  # checkpoints carry the normalisation
    assert not list(norm.parameters())  # the optimizer never moves them


def test_normalize_buffers_move_with_to() -> None:
    norm = Normalize([0.5], [0.25]).to(torch.float64)
    assert norm.mean.dtype == norm.std.dtype == torch.float64
    if torch.cuda.is_available():
        norm = norm.to("cuda")
        assert norm.mean.is_cuda and norm.std.is_cuda


@pytest.mark.parametrize("mean,std", [([0.5, 0.5], [0.2]), ([], []), ([0.5], [0.0]), ([0.5], [-1.0])])
def test_normalize_rejects_bad_stats(mean: list, std: list) -> None:
    with pytest.raises(UsageError):
        Normalize(mean, std)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(mean=[0.5], std=[0.25, 0.25, 0.25]), "mean and std need 3"),
        (dict(mean=[0.5] * 2, std=[0.25] * 2), "mean and std need 3"),
        (dict(std=[0.25, 0.0, 0.25]), "std must be positive"),
        (dict(num_classes=1), "num_classes"),
        (dict(input_size=4), "input_size >= 8"),
        (dict(name="resnet18", input_size=8), "input_size >= 16"),
        (dict(name="no-such-net"), "choose one of"),
    ],
)
def test_create_model_rejects_bad_input(kwargs: dict, match: str) -> None:
    args = dict(name="cnn", num_classes=10, in_channels=3, input_size=32,
                mean=[0.5] * 3, std=[0.25] * 3)
    args.update(kwargs)
    with pytest.raises(UsageError, match=match):
        create_model(args.pop("name"), **args)


def test_model_info_reports_batchnorm() -> None:
    assert model_info(build("cnn", 1))["batchnorm"] is False
    assert model_info(build("cnn4", 3))["batchnorm"] is True


def test_registry_lists_expected_models() -> None:
    assert {"cnn", "cnn4", "resnet18", "preact-resnet18", "wrn-34-10", "wrn-28-10"} <= set(MODELS.names())


# ------------------------------------------------------------------ normalisation without mean/std
def test_create_model_without_statistics_does_not_normalise_and_says_so() -> None:
    torch.manual_seed(0)
    model = create_model("cnn", num_classes=10, in_channels=3, input_size=32)
    assert model.spec["mean"] == [0.0] * 3 and model.spec["std"] == [1.0] * 3
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(model.normalize(x), x)  # mean 0, std 1: the identity
    rebuilt = create_model(**model.spec)  # the spec, as checkpoints record it, rebuilds the same model
    assert torch.equal(rebuilt.normalize.std, model.normalize.std)


def test_create_model_takes_a_data_sets_standard_statistics(tmp_path) -> None:
    from iat.data import standard_stats
    from iat.evaluation.loading import load_model
    from iat.runtime.checkpoint import save_checkpoint

    model = create_model("cnn", num_classes=10, in_channels=1, input_size=28, dataset="mnist")
    mean, std = standard_stats("mnist")
    assert model.spec["mean"] == list(mean) and model.spec["std"] == list(std) and mean != (0.0,)
    x = torch.rand(2, 1, 28, 28)
    assert torch.allclose(model.normalize(x), (x - mean[0]) / std[0])
    # written to a checkpoint as its model_spec, it comes back with the same normalisation and weights
    save_checkpoint(tmp_path / "m.safetensors", {"kind": "model", "model_spec": model.spec,
                                                 "model": model.state_dict()})
    loaded, state = load_model(tmp_path / "m.safetensors")
    assert state["model_spec"]["mean"] == list(mean)
    assert torch.equal(loaded.normalize.mean, model.normalize.mean)
    assert torch.allclose(loaded(x), model.eval()(x))


@pytest.mark.parametrize("kwargs,match", [
    (dict(dataset="synthetic"), "no standard mean/std"),
    (dict(mean=[0.5]), "give both mean and std"),
    (dict(mean=[0.5], std=[0.2], dataset="mnist"), "not both"),
])
def test_create_model_normalisation_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(UsageError, match=match):
        create_model("cnn", num_classes=10, in_channels=1, input_size=28, **kwargs)


# ------------------------------------------------------------------ user models: package.module:factory
FACTORIES = '''
from torch import nn

CALLS = []
CONST = 3


def make(num_classes, in_channels, input_size):
    CALLS.append((num_classes, in_channels, input_size))
    return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * input_size * input_size, num_classes))


def broken(num_classes, in_channels, input_size):
    raise ValueError("width must be even")


def not_a_module(num_classes, in_channels, input_size):
    return "a string"
'''


@pytest.fixture
def factory_module(tmp_path, monkeypatch, request):
    """A module of model factories in tmp_path, importable under a name unique to the test."""
    name = f"usermodels_{request.node.name.split('[')[0]}_{abs(hash(request.node.name)) % 10**6}"
    (tmp_path / f"{name}.py").write_text(FACTORIES)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    import sys

    sys.modules.pop(name, None)


def test_an_import_path_builds_the_users_model_behind_normalize(factory_module) -> None:
    import importlib

    model = create_model(f"{factory_module}:make", num_classes=5, in_channels=1, input_size=8)
    assert importlib.import_module(factory_module).CALLS == [(5, 1, 8)]  # the registered models' arguments
    assert isinstance(model.normalize, Normalize) and isinstance(model.net[1], nn.Linear)
    assert model(torch.rand(3, 1, 8, 8)).shape == (3, 5)
    assert model.spec["name"] == f"{factory_module}:make"


@pytest.mark.parametrize("attr,match", [
    ("nothere", "has no attribute 'nothere'"),
    ("CONST", "not callable"),
    ("broken", "the factory raised ValueError: width must be even"),
    ("not_a_module", "returned a str"),
])
def test_a_bad_factory_is_a_one_line_error_naming_the_path(factory_module, attr: str, match: str) -> None:
    with pytest.raises(UsageError, match=match) as err:
        create_model(f"{factory_module}:{attr}", num_classes=5, in_channels=1, input_size=8)
    assert f"--model {factory_module}:{attr}" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("path,match", [
    ("no_such_module_xyz:make", "cannot import 'no_such_module_xyz'; put the folder .* on PYTHONPATH"),
    ("mod:", "looks like package.module:factory"),
    ("a-b:make", "looks like package.module:factory"),
])
def test_an_unimportable_path_says_what_to_do(path: str, match: str) -> None:
    with pytest.raises(UsageError, match=match):
        MODELS.get(path)


def test_an_unknown_name_points_to_the_import_path_form() -> None:
    with pytest.raises(UsageError, match="package.module:factory"):
        MODELS.get("my-python-registered-net")


def test_a_module_that_fails_on_import_is_named_with_its_cause(tmp_path, monkeypatch) -> None:
    (tmp_path / "needs_dep_xyz.py").write_text("import not_installed_dep_xyz\n")
    (tmp_path / "syntax_err_xyz.py").write_text("def make(:\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(UsageError, match="needs_dep_xyz imports 'not_installed_dep_xyz', which is not installed"):
        MODELS.get("needs_dep_xyz:make")
    with pytest.raises(UsageError, match=r"importing syntax_err_xyz failed \(SyntaxError"):
        MODELS.get("syntax_err_xyz:make")


def test_the_create_model_example_runs():
    """The >>> example in create_model's docstring is correct."""
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module("iat.models.base"))
    assert result.attempted > 0 and result.failed == 0
