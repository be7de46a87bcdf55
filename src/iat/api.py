"""`iat.evaluate`: the evaluation of `iat eval` for any `nn.Module` that takes images in [0, 1].

    result = iat.evaluate(model, (x, y), attacks="natural,pgd20,cw", eps=8/255)
    result.accuracy     # {"natural": ..., "pgd20": ..., "cw": ..., "worst case": ...}
    print(result)       # the table `iat eval` prints, and the sanity checks

`data` is a pair of tensors (x, y), a torch `Dataset` of (image, label) items or a `DataLoader` of (x, y)
batches: images NCHW, float in [0, 1] (or uint8 0..255), labels integer class indices. Only the first
`n_examples` are read. The attacks, their verification, the per-example worst case and the sanity checks
are those of `iat eval` (evaluation.pipeline.evaluate_examples); `out=` writes the same JSON, CSV and Markdown.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional, Protocol, Union, runtime_checkable

import torch
from torch import nn

from .errors import UsageError
from .evaluation.pipeline import EvalConfig, evaluate_examples
from .records import EvalRecord
from .threat import ThreatModel
from .values import parse_number

# EvalConfig fields that only mean something for a checkpoint on disk
CHECKPOINT_ONLY = ("checkpoint", "dataset", "model", "data_dir", "device")


@runtime_checkable
class MapDataset(Protocol):
    """What `iat.evaluate` reads as a data set: a length and (image, label) items by index."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Any: ...


@dataclasses.dataclass
class Evaluation:
    """What `iat.evaluate` returns: the typed record `iat eval` writes, and the files written (with `out=`)."""

    record: EvalRecord
    files: list[Path] = dataclasses.field(default_factory=list)

    @property
    def accuracy(self) -> dict[str, float]:
        """Accuracy per attack (by the names asked for) and under "worst case" (per example, all attacks)."""
        return {r["attack"]: r["accuracy"] for r in self.record.results}

    @property
    def worst_case(self) -> float:
        """Accuracy under the per-example worst case over all the attacks."""
        return self.accuracy["worst case"]

    @property
    def checks(self) -> dict[str, str]:
        """Sanity check name -> "pass" | "warn" | "skip" (the messages are in record.sanity)."""
        return {c["name"]: c["status"] for c in self.record.sanity}

    def __str__(self) -> str:
        from .reporting.eval_tables import format_checks, format_table

        return format_table(self.record.results) + "\n\n" + format_checks(self.record.sanity)


def evaluate(model: nn.Module, data: Any, attacks: Union[str, Sequence[str]] = EvalConfig.attacks,
             eps: Union[float, str, None] = None, norm: str = "linf", n_examples: Optional[int] = None,
             batch_size: int = EvalConfig.batch_size, out: Union[str, Path, None] = None, *,
             restarts: int = 1, seed: int = 0, worst_case_only: bool = False,
             eps_sweep: Union[str, Sequence[float], None] = None, sweep_attack: str = EvalConfig.sweep_attack,
             progress: bool = True, name: Optional[str] = None) -> Evaluation:
    """Robust accuracy of `model` on `data` under `attacks` in the `norm` ball of radius `eps` (pixel units of
    [0, 1] images; "8/255" works), each attack verified and counted per example, with the sanity checks.

    The options are `iat eval`'s (EvalConfig). The model runs in eval mode on its own device; its mode is
    restored after.

    Args:
        model: an nn.Module with parameters that takes NCHW images in [0, 1] and returns logits.
        data: (x, y) tensors, a torch Dataset of (image, label) items or a DataLoader of (x, y) batches.
        attacks: NAME[:KEY=VALUE] specs, comma-separated or a sequence (`iat list attacks`).
        eps: the radius in pixel units of [0, 1] images, a number or a string such as "8/255"; required.
        norm: "linf" or "l2".
        n_examples: evaluate the first n examples only (default: all).
        batch_size: examples per attack batch.
        out: a .json path: also write the JSON, CSV and Markdown there (default: nothing written).
        restarts: restarts of every random-start PGD attack that sets none of its own (:restarts=).
        seed: seed of the random starts.
        worst_case_only: run each attack only on the examples still robust (the columns become cumulative).
        eps_sweep: also measure accuracy against eps: "auto" or eps values.
        sweep_attack: the attack of the eps sweep.
        progress: show progress bars.
        name: the data's name in the written files (default: from the data's type).

    Returns:
        The Evaluation: `accuracy` per attack and under "worst case", `checks`, the typed `record` and the
        `files` written.

    >>> import iat, torch
    >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 4))
    >>> x, y = torch.rand(16, 3, 8, 8), torch.randint(0, 4, (16,))
    >>> result = iat.evaluate(model, (x, y), attacks="natural,pgd20", eps="8/255", progress=False)
    >>> sorted(result.accuracy)
    ['natural', 'pgd20', 'worst case']
    >>> 0 <= result.worst_case <= result.accuracy["natural"] <= 1
    True
    """
    if eps is None:
        raise UsageError("iat.evaluate needs eps=, the radius of the threat ball in pixel units of [0, 1] images "
                         "(e.g. 8/255 for CIFAR-10, 0.3 for MNIST)")
    if not isinstance(model, nn.Module) or next(model.parameters(), None) is None:
        raise UsageError(f"iat.evaluate needs an nn.Module with parameters, got {type(model).__name__}")
    out_path = _check_out(out)
    x, y, y_all, source = read_examples(data, n_examples)
    num_classes = check_examples(model, x, y)
    radius = parse_number(eps, "eps")
    cfg = EvalConfig(attacks=attacks if isinstance(attacks, str) else ",".join(attacks),
                     eps=radius, norm=norm, restarts=restarts, n_examples=n_examples,
                     batch_size=batch_size, seed=seed, worst_case_only=worst_case_only,
                     eps_sweep=eps_sweep if eps_sweep is None or isinstance(eps_sweep, str)
                     else ",".join(map(str, eps_sweep)), sweep_attack=sweep_attack, progress=progress)
    cls = type(model)
    about = {"checkpoint": f"{cls.__module__}.{cls.__qualname__} (in memory)", "checkpoint_kind": "module",
             "data": {"name": name or source.split()[0], "source": source, "split": "given", "n_examples": len(x)},
             "model": {"name": cls.__name__, "num_classes": num_classes,
                       "parameters": sum(p.numel() for p in model.parameters())},
             "method": {"name": "unknown (an nn.Module given to iat.evaluate)"},
             "config": {k: v for k, v in dataclasses.asdict(cfg).items() if k not in CHECKPOINT_ONLY},
             "device": str(next(model.parameters()).device)}
    record = evaluate_examples(model, x, y, ThreatModel(eps=radius, norm=norm), cfg, about, y_split=y_all,
                               num_classes=num_classes)
    files = []
    if out_path is not None:
        from .reporting.eval_tables import write_eval_files

        files = write_eval_files(record, out_path)
    return Evaluation(record, files)


def _check_out(out: Union[str, Path, None]) -> Optional[Path]:
    """A writable .json path (checked before the evaluation, not after it), or None."""
    if out is None:
        return None
    path = Path(out)
    if path.suffix != ".json":
        raise UsageError(f"out= must name a .json file (CSV and Markdown go beside it), got {path}")
    from .training.run_dir import check_writable

    check_writable(path.parent)
    return path


def read_examples(data: Any, n: Optional[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, str]:
    """(x, y) of the first n examples of tensors, a Dataset or a DataLoader; the labels they were taken from
    (all of them for tensors, else the ones read); and a few words on the source."""
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise UsageError(f"n_examples must be a positive integer or None, got {n!r}")
    if isinstance(data, (tuple, list)):
        if len(data) != 2:
            raise UsageError(f"data as a sequence must be the pair (x, y), got {len(data)} items")
        x, y = (_tensor(v, what) for v, what in zip(data, ("images x", "labels y"), strict=True))
        if len(x) != len(y):
            raise UsageError(f"data has {len(x)} images but {len(y)} labels")
        _check_count(n, len(x))
        return x[:n], y[:n], y, f"tensors x {list(x.shape)}"
    if isinstance(data, torch.utils.data.DataLoader):
        return _from_loader(data, n)
    if isinstance(data, torch.utils.data.Dataset) or (hasattr(data, "__getitem__") and hasattr(data, "__len__")
                                                      and not isinstance(data, (torch.Tensor, dict, str))):
        if not isinstance(data, MapDataset):  # an IterableDataset: only a DataLoader reads it
            raise UsageError(f"data as a Dataset must have a length (wrap an IterableDataset in a DataLoader), "
                             f"got {type(data).__name__}")
        _check_count(n, len(data))
        items = [data[i] for i in range(len(data) if n is None else n)]
        x, y = _stack(items, "Dataset item")
        return x, y, y, f"{type(data).__name__} (torch Dataset)"
    raise UsageError(f"data must be (x, y) tensors, a torch Dataset or a DataLoader, got {type(data).__name__}")


def _from_loader(loader: torch.utils.data.DataLoader, n: Optional[int]
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, str]:
    xs, ys, count = [], [], 0
    for batch in loader:
        x, y = _pair(batch, "DataLoader batch")
        xs.append(_tensor(x, "images x"))
        ys.append(_tensor(y, "labels y"))
        count += len(xs[-1])
        if n is not None and count >= n:
            break
    _check_count(n, count)
    if not xs:
        raise UsageError("the DataLoader gave no batches: nothing to evaluate")
    x, y = torch.cat(xs)[:n], torch.cat(ys)[:n]
    return x, y, y, f"{type(loader.dataset).__name__} (DataLoader)"


def _check_count(n: Optional[int], available: int) -> None:
    if n is not None and n > available:
        raise UsageError(f"n_examples is {n} but the data hold {available} examples")


def _pair(item: Any, what: str) -> tuple[Any, Any]:
    if not isinstance(item, (tuple, list)) or len(item) != 2:
        raise UsageError(f"each {what} must be an (image, label) pair, got {type(item).__name__}")
    return item[0], item[1]


def _stack(items: list[Any], what: str) -> tuple[torch.Tensor, torch.Tensor]:
    pairs = [_pair(item, what) for item in items]
    try:
        return (torch.stack([torch.as_tensor(p[0]) for p in pairs]),
                torch.as_tensor([int(torch.as_tensor(p[1])) for p in pairs]))
    except (TypeError, ValueError, RuntimeError) as err:
        raise UsageError(f"each {what} must be (image tensor [C, H, W] in [0, 1], integer label): "
                         f"{str(err).splitlines()[0]}") from None


def _tensor(value: Any, what: str) -> torch.Tensor:
    try:
        return torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError):
        raise UsageError(f"{what} must be a tensor (or array), got {type(value).__name__}") from None


def check_examples(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    """Images NCHW in [0, 1], integer labels the model's classes hold; returns the model's number of classes."""
    if len(x) == 0:
        raise UsageError("the data hold no examples: nothing to evaluate")
    if x.dim() != 4:
        raise UsageError(f"images must be a 4-D tensor [N, C, H, W], got shape {list(x.shape)}")
    if x.dtype != torch.uint8:
        if not x.is_floating_point():
            raise UsageError(f"images must be float in [0, 1] or uint8, got dtype {x.dtype}")
        low, high = float(x.min()), float(x.max())
        if not (0 <= low and high <= 1):  # also catches NaN
            raise UsageError(f"images must be in [0, 1] (normalisation belongs inside the model), got values in "
                             f"[{low:.4g}, {high:.4g}]")
    if y.dim() != 1 or y.dtype in (torch.bool, torch.uint8) or y.is_floating_point() or y.is_complex():
        raise UsageError(f"labels must be a 1-D tensor of integer class indices, got {y.dtype} {list(y.shape)}")
    num_classes = _num_classes(model, x[:1])
    if int(y.min()) < 0 or int(y.max()) >= num_classes:
        raise UsageError(f"labels must be class indices in [0, {num_classes}) for a model with {num_classes} outputs, "
                         f"got labels in [{int(y.min())}, {int(y.max())}]")
    return num_classes


def _num_classes(model: nn.Module, x: torch.Tensor) -> int:
    """The model's number of outputs, from one forward pass in eval mode (its mode restored)."""
    param = next(model.parameters())
    x = x.to(param.device)
    x = x.float().div(255) if x.dtype == torch.uint8 else x.float()
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = model(x)
    finally:
        model.train(was_training)
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[1] < 2:
        shape = list(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise UsageError(f"the model must return logits [N, num_classes] (at least 2 classes), got {shape}")
    return int(logits.shape[1])
