"""Models: shapes, Normalize in front, gradients everywhere, double backward, clear errors."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from iat.models import MODELS, Normalize, create_model, model_info
from iat.errors import UsageError

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
