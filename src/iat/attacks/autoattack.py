"""AutoAttack (Croce & Hein, ICML 2020) through the official algorithm, packaged on PyPI as `pyautoattack`.

Version "standard": APGD-CE (100 steps, no restart), APGD-T (targeted DLR, 9 target classes), FAB-T
(9 target classes) and Square (5000 queries), each run only on the points the ones before it did not
break. Threat models l-inf and l2; eps in pixel units (images in [0, 1]). With fewer than 10 classes the
targeted attacks use every other class (num_classes - 1 targets); AutoAttack's targeted DLR loss needs
at least 4 classes.

The package is an optional extra, imported on first use: pip install "iat[autoattack]".
Its own checks (randomised or dynamic defence, probabilities instead of logits, Square succeeding where
the gradient attacks failed, zero gradients) are logged as warnings; the adapter keeps them, and how
many points each component broke, in `diagnostics()` for the results file.
"""
from __future__ import annotations

import importlib
import importlib.util
import logging
import re
from collections import Counter
from contextlib import contextmanager
from typing import Any, Iterator, Optional

import torch
from torch import nn

from ..errors import UsageError
from . import ATTACKS
from .engine import NORMS, crafting_mode

INSTALL_HINT = 'pip install "iat[autoattack]"'
PACKAGE = "pyautoattack"
VERSIONS = ("standard", "plus")
_AA_NORM = {"linf": "Linf", "l2": "L2"}
_PERTURBED = re.compile(r"^([\w-]+) - \d+/\d+ - (\d+) out of (\d+) successfully perturbed")


def require_autoattack() -> Any:
    """Import pyautoattack, or raise a one-line UsageError saying how to install it."""
    if importlib.util.find_spec(PACKAGE) is None:
        raise UsageError(f"the autoattack attack needs the {PACKAGE} package: {INSTALL_HINT}")
    return importlib.import_module(PACKAGE)


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextmanager
def _captured_log() -> Iterator[_Collect]:
    """Route the 'auto-attack' logger into a list for the duration (not to stderr), then restore it."""
    logger = logging.getLogger("auto-attack")
    handler, level, propagate = _Collect(), logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


class AutoAttack:
    """AutoAttack, official algorithm (Croce & Hein 2020, "Reliable evaluation of adversarial robustness
    with an ensemble of diverse parameter-free attacks").

    eps: radius in pixel units (8/255). norm: "linf" | "l2". version: "standard" (APGD-CE, APGD-T,
    FAB-T, Square) | "plus". seed: used when no generator is passed; with a generator the seed is drawn
    from it, so one evaluation seed fixes every attack. The caller's global RNG state is restored after.
    """

    def __init__(self, eps: float = 8 / 255, norm: str = "linf", version: str = "standard", seed: int = 0) -> None:
        if norm not in NORMS:
            raise UsageError(f"norm must be one of {NORMS}, got {norm!r}")
        if not eps > 0 or (norm == "linf" and eps > 1):
            raise UsageError(f"autoattack eps must be in (0, 1] for images in [0, 1], got {eps}")
        if version not in VERSIONS:
            raise UsageError(f"autoattack version must be one of {VERSIONS}, got {version!r}")
        self.eps, self.norm, self.version, self.seed = float(eps), norm, version, int(seed)
        self.flags: list[str] = []
        self.broken_by: Counter[str] = Counter()
        self.seeds: list[int] = []

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Return x_adv (x itself where no attack succeeded); never modifies x, y or the model's state."""
        package = require_autoattack()
        seed = self.seed if generator is None else int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
        self.seeds.append(seed)
        devices = [x.device] if x.device.type == "cuda" else []
        with crafting_mode(model, "keep"), _captured_log() as log, torch.random.fork_rng(devices=devices):
            num_classes = int(model(x[:1]).shape[1])
            if num_classes < 4:
                raise UsageError(f"autoattack needs at least 4 classes (targeted DLR loss), the model has {num_classes}")
            aa = package.AutoAttack(model, eps=self.eps, norm=_AA_NORM[self.norm], seed=seed,
                                    version=self.version, device=x.device)
            aa.apgd_targeted.n_target_classes = min(9, num_classes - 1)
            aa.fab.n_target_classes = min(9, num_classes - 1)
            x_adv, _ = aa.run_standard_evaluation(x.detach().clone(), y.detach().clone(), batch_size=len(x))
        self._record(log.records)
        return x_adv.detach()

    def _record(self, records: list[logging.LogRecord]) -> None:
        for record in records:
            text = record.getMessage()
            if record.levelno >= logging.WARNING and text not in self.flags:
                self.flags.append(text)
            match = _PERTURBED.match(text)
            if match:
                self.broken_by[match.group(1)] += int(match.group(2))

    def components(self) -> list[str]:
        return {"standard": ["apgd-ce", "apgd-t", "fab-t", "square"],
                "plus": ["apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t"]}[self.version]

    def describe(self) -> dict:
        """The protocol, for results files."""
        return {"eps": self.eps, "norm": self.norm, "attack": "autoattack", "version": self.version,
                "components": self.components(), "package": f"{PACKAGE} {_package_version()}",
                "seed": f"drawn per batch from the evaluation generator ({self.seed} without one)"}

    def diagnostics(self) -> dict:
        """AutoAttack's own warnings and how many points each component broke, over all calls so far."""
        return {"flags": list(self.flags), "broken_by": dict(self.broken_by), "seeds": list(self.seeds)}


def _package_version() -> str:
    try:
        from importlib.metadata import version

        return version(PACKAGE)
    except Exception:  # not installed, or installed without metadata
        return "unknown"


@ATTACKS.register("autoattack", help="AutoAttack standard: APGD-CE, APGD-T, FAB-T, Square (Croce & Hein 2020); "
                                     'needs pip install "iat[autoattack]"')
def autoattack(eps: float = 8 / 255, norm: str = "linf", version: str = "standard", seed: int = 0) -> AutoAttack:
    require_autoattack()  # fail before any data is loaded
    return AutoAttack(eps=eps, norm=norm, version=version, seed=seed)
