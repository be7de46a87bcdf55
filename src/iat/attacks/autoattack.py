"""AutoAttack (Croce & Hein, ICML 2020) through the official algorithm, packaged on PyPI as `pyautoattack`.

Version "standard": APGD-CE (100 steps, no restart), APGD-T (targeted DLR, 9 target classes), FAB-T
(9 target classes) and Square (5000 queries), each run only on the points the ones before it did not
break. Threat models l-inf and l2; eps in pixel units (images in [0, 1]). With fewer than 10 classes the
targeted attacks use every other class (num_classes - 1 targets); AutoAttack's targeted DLR loss needs
at least 4 classes.

The package is an optional extra, imported on first use: pip install "iat[autoattack]".
Its own checks (randomised or dynamic defence, probabilities instead of logits, Square succeeding where
the gradient attacks failed, zero gradients) are logged as warnings; the adapter keeps them, and how
many points each component broke, in `diagnostics()` for the results file. The package's warnings end
with "See flags_doc.md for details.", a file that is not shipped with it; the adapter keeps each
warning's text and replaces that pointer with what the flag means (`explain_flag`). While it runs, the
component AutoAttack is on is passed to the evaluation's progress bar (`progress=`).
"""
from __future__ import annotations

import importlib
import importlib.util
import logging
import re
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Optional

import torch
from torch import nn

from ..errors import UsageError
from .engine import NORMS, crafting_mode
from .registry import ATTACKS

INSTALL_HINT = 'pip install "iat[autoattack]"'
PACKAGE = "pyautoattack"
VERSIONS = ("standard", "plus")
_AA_NORM = {"linf": "Linf", "l2": "L2"}
_PERTURBED = re.compile(r"^([\w-]+) - (\d+)/(\d+) - (\d+) out of (\d+) successfully perturbed")
_RUNNING = re.compile(r"^running ([\w-]+)$")
_DEAD_LINK = re.compile(r"\s*See \S*flags_doc\.md for details\.?")
_MEANING = (  # (words of the package's message, what it means here)
    ("randomized defense", "the model's outputs differ between identical calls in eval mode (dropout or noise at "
     "test time?); a randomised model needs AutoAttack's 'rand' version, so these numbers are not reliable"),
    ("probability distribution", "the model seems to return probabilities; every iat model must return logits"),
    ("zero gradient", "gradient attacks get nothing to follow at those points (gradient masking, e.g. a "
     "saturated softmax); see the zero_gradients sanity check"),
    ("Square Attack", "the gradient-free Square attack broke points the gradient attacks missed, a sign of "
     "gradient masking: report the AutoAttack worst case, not PGD"),
    ("dynamic defense", "the forward pass itself computes gradients (test-time optimisation); AutoAttack alone "
     "may not be an adequate evaluation"),
)


def require_autoattack() -> Any:
    """Import pyautoattack, or raise a one-line UsageError saying how to install it."""
    if importlib.util.find_spec(PACKAGE) is None:
        raise UsageError(f"the autoattack attack needs the {PACKAGE} package: {INSTALL_HINT}")
    return importlib.import_module(PACKAGE)


def explain_flag(text: str) -> str:
    """AutoAttack's warning with its pointer to the missing flags_doc.md replaced by what the flag means."""
    meaning = next((m for words, m in _MEANING if words.lower() in text.lower()), None)
    if not _DEAD_LINK.search(text) and meaning is None:
        return text
    text = _DEAD_LINK.sub("", text).rstrip()
    return f"{text} ({meaning or 'a check of AutoAttack itself, Croce & Hein 2020'})"


class _Collect(logging.Handler):
    """Keeps every record; tells `progress` (if any) which component runs and what each batch of it broke."""

    def __init__(self, progress: Optional[Callable[[str], None]] = None, components: tuple[str, ...] = ()) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self.progress, self.components = progress, components

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        if self.progress is None:
            return
        text = record.getMessage()
        running, done = _RUNNING.match(text), _PERTURBED.match(text)
        if running:
            name = running.group(1)
            at = self.components.index(name) + 1 if name in self.components else "?"
            self.progress(f"{name} ({at}/{len(self.components)})")
        elif done:
            name, b, nb, broke, of = done.groups()
            self.progress(f"{name} batch {b}/{nb} broke {broke} of {of}")


@contextmanager
def _captured_log(progress: Optional[Callable[[str], None]] = None,
                  components: tuple[str, ...] = ()) -> Iterator[_Collect]:
    """Route the 'auto-attack' logger into a list for the duration (not to stderr), then restore it."""
    logger = logging.getLogger("auto-attack")
    handler, level, propagate = _Collect(progress, components), logger.level, logger.propagate
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
    A call's `progress` (optional) is given a short text each time a component starts or ends a batch.
    """

    reports_progress = True  # the evaluation passes progress= (accuracy.robust_accuracy)

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
                 generator: Optional[torch.Generator] = None,
                 progress: Optional[Callable[[str], None]] = None) -> torch.Tensor:
        """Return x_adv (x itself where no attack succeeded); never modifies x, y or the model's state."""
        package = require_autoattack()
        seed = self.seed if generator is None else int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
        self.seeds.append(seed)
        devices = [x.device] if x.device.type == "cuda" else []
        log_to = _captured_log(progress, tuple(self.components()))
        with crafting_mode(model, "keep"), log_to as log, torch.random.fork_rng(devices=devices):
            num_classes = int(model(x[:1]).shape[1])
            if num_classes < 4:
                raise UsageError("autoattack needs at least 4 classes (targeted DLR loss), "
                                 f"the model has {num_classes}")
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
            if record.levelno >= logging.WARNING and explain_flag(text) not in self.flags:
                self.flags.append(explain_flag(text))
            match = _PERTURBED.match(text)
            if match:
                self.broken_by[match.group(1)] += int(match.group(4))

    def components(self) -> list[str]:
        """The attacks this version runs, in the order AutoAttack runs them."""
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

    def restore(self, diagnostics: dict) -> None:
        """Continue from an earlier evaluation's `diagnostics()` (iat eval --extend): later calls add to it."""
        self.flags = list(diagnostics.get("flags", []))
        self.broken_by = Counter({k: int(v) for k, v in diagnostics.get("broken_by", {}).items()})
        self.seeds = [int(s) for s in diagnostics.get("seeds", [])]


def _package_version() -> str:
    try:
        from importlib.metadata import version

        return version(PACKAGE)
    except Exception:  # not installed, or installed without metadata
        return "unknown"


@ATTACKS.register("autoattack", help="AutoAttack standard: APGD-CE, APGD-T, FAB-T, Square (Croce & Hein 2020); "
                                     'needs pip install "iat[autoattack]"')
def autoattack(eps: float = 8 / 255, norm: str = "linf", version: str = "standard", seed: int = 0) -> AutoAttack:
    """An `AutoAttack`; a missing autoattack package is an error here, before any data is loaded."""
    require_autoattack()  # fail before any data is loaded
    return AutoAttack(eps=eps, norm=norm, version=version, seed=seed)
