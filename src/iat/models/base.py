"""The model registry, the Normalize front module, and create_model.

Normalisation lives inside the model (as in RobustBench and MadryLab's robustness library), so every
attack works on images in [0, 1] and eps is in pixel units whatever the data set's mean and std.
"""
from __future__ import annotations

import importlib
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any, Optional

import torch
from torch import nn

from ..errors import UsageError
from ..registry import Registry

# factory(num_classes: int, in_channels: int, input_size: int) -> nn.Module, the body after Normalize.
FACTORY_ARGS = "factory(num_classes=, in_channels=, input_size=) returning an nn.Module"


class ModelRegistry(Registry[nn.Module]):
    """The model registry; a name "package.module:factory" is also a model, imported (never unpickled)."""

    def get(self, name: str) -> Callable[..., nn.Module]:
        """The factory of a registered model, or the one a "package.module:factory" path names."""
        if isinstance(name, str) and ":" in name:
            return import_factory(name)
        if name not in self:
            raise UsageError(f"unknown model {name!r}{self.suggest(name)}; choose one of: {', '.join(self.names())}, "
                             "or give package.module:factory (a model registered from Python is unknown to a "
                             "new process such as `iat eval RUN`)")
        return super().get(name)


MODELS = ModelRegistry("model")


def import_factory(path: str) -> Callable[..., nn.Module]:
    """"package.module:factory" -> the callable it names, imported with importlib (the module's folder must
    be on sys.path, e.g. through PYTHONPATH)."""
    module_name, _, attr = path.partition(":")
    what = f"--model {path}"
    if not module_name or not attr or not all(p.isidentifier() for p in module_name.split(".") + attr.split(".")):
        raise UsageError(f"{what}: a model import path looks like package.module:factory")
    try:
        obj: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        missing = err.name or module_name
        if module_name == missing or module_name.startswith(f"{missing}."):  # the user's module itself
            raise UsageError(f"{what}: cannot import {missing!r}; put the folder holding "
                             f"{module_name.split('.')[0]} on PYTHONPATH or install it") from None
        raise UsageError(f"{what}: {module_name} imports {missing!r}, which is not installed; install it") from None
    except Exception as err:  # noqa: BLE001 - the user's module may fail in any way while it is imported
        first = (str(err).strip().splitlines() or [""])[0][:200]
        raise UsageError(f"{what}: importing {module_name} failed ({type(err).__name__}: {first}); fix the "
                         "module") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UsageError(f"{what}: {module_name} has no attribute {attr!r}; name a factory defined in it")
        obj = getattr(obj, part)
    if not callable(obj):
        raise UsageError(f"{what}: {attr} is a {type(obj).__name__}, not callable; it must be a {FACTORY_ARGS}")
    return obj


class Normalize(nn.Module):
    """(x - mean) / std per channel, for NCHW images in [0, 1]."""

    mean: torch.Tensor  # [1, C, 1, 1] buffers, registered in __init__
    std: torch.Tensor

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        mean, std = [float(m) for m in mean], [float(s) for s in std]
        if len(mean) != len(std) or not mean:
            raise UsageError(f"mean and std need one value per channel, got {len(mean)} and {len(std)}")
        if not all(s > 0 for s in std):
            raise UsageError(f"std must be positive in every channel, got {std}")
        # Buffers (not parameters): they move with .to() and are saved in the state dict, so a
        # checkpoint carries its own normalisation, but the optimizer never touches them.
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The normalised images."""
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        """The mean and std, for print(model)."""
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


def check_input_size(model: str, input_size: int, min_size: int) -> None:
    """Raise UsageError unless the architecture can take input_size x input_size images."""
    if input_size < min_size:
        raise UsageError(
            f"model {model!r} needs input_size >= {min_size} (e.g. 28 or 32), got {input_size}"
        )


def create_model(
    name: str,
    *,
    num_classes: int,
    in_channels: int,
    input_size: int,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
    dataset: Optional[str] = None,
) -> nn.Module:
    """Build Sequential(normalize=Normalize(mean, std), net=<registered body>) returning logits.

    Args:
        name: a registered model (`iat list models`) or "package.module:factory", a callable taking
            num_classes, in_channels and input_size like the registered factories (its module goes after
            Normalize).
        num_classes: number of logits, at least 2.
        in_channels: image channels, at least 1 (1 for MNIST, 3 for CIFAR).
        input_size: image height and width in pixels (an architecture may ask for a minimum).
        mean, std: per-channel statistics in [0, 1] units, both or neither (default: none).
        dataset: without mean and std, take this data set's standard statistics (data.standards); with
            neither, no normalisation (mean 0, std 1).

    Returns:
        The model, taking NCHW images in [0, 1]. `model.spec` holds the arguments with the resolved mean
        and std: what checkpoints record as model_spec, and what rebuilds the model.

    >>> model = create_model("cnn", num_classes=10, in_channels=1, input_size=28, dataset="fashion-mnist")
    >>> model(torch.rand(2, 1, 28, 28)).shape
    torch.Size([2, 10])
    >>> model.spec["mean"], model.spec["std"]
    ([0.286], [0.353])
    """
    factory = MODELS.get(name)  # unknown names fail first, with the list of choices
    for arg, value in (("num_classes", num_classes), ("in_channels", in_channels),
                       ("input_size", input_size)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise UsageError(f"{arg} must be an integer, got {value!r}")
    if num_classes < 2:
        raise UsageError(f"num_classes must be at least 2, got {num_classes}")
    if in_channels < 1:
        raise UsageError(f"in_channels must be at least 1, got {in_channels}")
    mean, std = _normalisation(mean, std, dataset, in_channels)
    normalize = Normalize(mean, std)
    net = _call_factory(name, factory, num_classes=num_classes, in_channels=in_channels, input_size=input_size)
    model = nn.Sequential(OrderedDict(normalize=normalize, net=net))
    spec = {"name": name, "num_classes": num_classes, "in_channels": in_channels, "input_size": input_size,
            "mean": [float(m) for m in mean], "std": [float(s) for s in std]}
    # torch annotates Module.__setattr__'s value as Tensor | Module; a plain attribute is what it does at runtime
    model.spec = spec  # type: ignore[assignment]
    return model


def _normalisation(mean: Optional[Sequence[float]], std: Optional[Sequence[float]], dataset: Optional[str],
                   in_channels: int) -> tuple[Sequence[float], Sequence[float]]:
    if (mean is None) != (std is None):
        raise UsageError("give both mean and std (or neither: dataset=NAME takes its statistics, else none)")
    if mean is not None and std is not None:
        if dataset is not None:
            raise UsageError("give mean and std or dataset, not both")
    elif dataset is not None:
        from ..data.standards import standard_stats  # the one table of per-data-set standards

        mean, std = standard_stats(dataset)
    else:
        mean, std = [0.0] * in_channels, [1.0] * in_channels
    if len(mean) != in_channels or len(std) != in_channels:
        raise UsageError(
            f"mean and std need {in_channels} values (one per input channel), "
            f"got {len(mean)} and {len(std)}"
        )
    return mean, std


def _call_factory(name: str, factory: Callable[..., Any], **kwargs: int) -> nn.Module:
    """A registered body, or a user's factory (whose failures become one line naming the import path)."""
    if ":" not in name:
        return factory(**kwargs)
    try:
        net = factory(**kwargs)
    except UsageError:
        raise
    except Exception as err:  # noqa: BLE001 - the user's code may fail in any way
        first = (str(err).strip().splitlines() or [""])[0][:200]
        raise UsageError(f"--model {name}: the factory raised {type(err).__name__}: {first}; it is called as "
                         f"{FACTORY_ARGS}") from None
    if not isinstance(net, nn.Module):
        raise UsageError(f"--model {name} returned a {type(net).__name__}; it must be a {FACTORY_ARGS}")
    return net


def model_info(model: nn.Module) -> dict[str, Any]:
    """Parameter counts and whether BatchNorm is present (it decides whether BN mode matters)."""
    params = list(model.parameters())
    return {
        "params": sum(p.numel() for p in params),
        "trainable_params": sum(p.numel() for p in params if p.requires_grad),
        "batchnorm": any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()),
    }
