"""The files a run leaves behind, as typed and versioned records, each with one reader and one writer.

    RUN_DIR/config.json        RunRecord    the resolved settings of a run (what "same run" compares)
    RUN_DIR/metrics.jsonl      MetricLine   one line per finished epoch
    RUN_DIR/eval-*.json        EvalRecord   one evaluation: every number with its protocol

Every file is written atomically (temporary file, fsync, rename, fsync of the folder), so a crash leaves
the old file or the new one; metric lines are appended and fsynced, and the reader drops a last line
torn by a kill. Readers accept the unversioned files of iat 0.1 and upgrade them.
"""
from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Optional, Union

from .errors import UsageError

PathLike = Union[str, Path]
# mkstemp makes files private (0600); give ours the permissions an ordinary open() would.
_UMASK = os.umask(0o022)
os.umask(_UMASK)


# ------------------------------------------------------------------------------------------ atomic files
def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the new one, never a mix."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name[:100]}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_folder(path.parent)


def atomic_write_text(path: PathLike, text: str) -> None:
    """`atomic_write_bytes` of `text`, encoded as UTF-8."""
    atomic_write_bytes(path, text.encode())


def _fsync_folder(folder: Path) -> None:
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except IsADirectoryError:
        raise UsageError(f"{path} is a folder, not {what}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UsageError(f"{path} is damaged ({type(err).__name__}: {err}); it is not {what}") from None


def _known(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in values.items() if k in names}


# ------------------------------------------------------------------------------------------ config.json
@dataclasses.dataclass
class RunRecord:
    """A run's resolved settings: the config with every default, the method's resolved options, the model
    spec, the data copy and split sizes, the validation attack, and where it ran."""

    config: dict[str, Any]
    method: Optional[dict[str, Any]] = None
    model: Optional[dict[str, Any]] = None
    data: Optional[dict[str, Any]] = None
    val_attack: Optional[dict[str, Any]] = None
    device: Optional[str] = None
    torch: Optional[str] = None
    speed_auto: Optional[dict[str, Any]] = None  # how layout / compile "auto" were resolved (training.layout)
    kind: str = "iat-run"
    version: int = 2

    def to_dict(self) -> dict[str, Any]:
        """The record as plain dicts (what config.json holds)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Any, source: str = "run record") -> RunRecord:
        """Upgrade and check: version 0 (iat 0.1) kept threat.bn_mode / threat.eps_warmup and the threat model
        among the method's options; version 1 had speed.channels_last (a bool) where speed.layout is now. Records
        of version 2 written before speed.compile could be "auto" call speed_auto layout_auto."""
        if not isinstance(values, dict) or not isinstance(values.get("config"), dict):
            raise UsageError(f"{source} is not an iat run record (no 'config' table)")
        values = json.loads(json.dumps(values))  # a deep copy in JSON's own types
        if values.get("version", 0) == 0:
            _upgrade_v0(values)
        if values.get("version") == 1:
            _upgrade_v1(values)
        if values.get("kind", "iat-run") != "iat-run" or values.get("version") != 2:
            raise UsageError(f"{source} is a {values.get('kind')} record of version {values.get('version')}, "
                             "which this iat cannot read")
        if "layout_auto" in values:
            values.setdefault("speed_auto", values.pop("layout_auto"))
        return cls(**_known(cls, values))


def _upgrade_v0(values: dict[str, Any]) -> None:
    config = values["config"]
    threat = config.get("threat") or {}
    bn_mode = threat.pop("bn_mode", None)
    if bn_mode is not None:
        config.setdefault("method_options", {}).setdefault("bn_mode", bn_mode)
    if "eps_warmup" in threat:
        config.setdefault("optim", {})["eps_warmup"] = threat.pop("eps_warmup")
    for key in ("eps", "step_size", "steps", "norm"):
        (values.get("method") or {}).pop(key, None)
        (config.get("method_options") or {}).pop(key, None)
    values["kind"], values["version"] = "iat-run", 1


def _upgrade_v1(values: dict[str, Any]) -> None:
    """speed.channels_last = false / true ran in the layouts now called "nchw" / "channels_last"."""
    speed = values["config"].get("speed")
    if isinstance(speed, dict) and "channels_last" in speed:
        speed["layout"] = "channels_last" if speed.pop("channels_last") else "nchw"
    values["version"] = 2


def read_run(path: PathLike) -> RunRecord:
    """Read a run's config.json, upgrading the records of older versions of iat.

    Args:
        path: the config.json of a run directory.

    Returns:
        The run record, in the current version.

    Raises:
        UsageError: the file is missing, damaged, or not an iat run record this version can read.
    """
    path = Path(path)
    if not path.exists():
        raise UsageError(f"{path} does not exist; is {path.parent} an iat run directory?")
    return RunRecord.from_dict(_read_json(path, "an iat run's config.json"), str(path))


def write_run(path: PathLike, record: RunRecord) -> None:
    """Write `record` to `path` (a run's config.json) as indented JSON, atomically; missing folders are made.

    Args:
        path: where to write; an existing file is replaced.
        record: the run's resolved settings.
    """
    atomic_write_text(path, json.dumps(record.to_dict(), indent=2) + "\n")


# ------------------------------------------------------------------------------------------ metrics.jsonl
@dataclasses.dataclass
class MetricLine:
    """One finished epoch: training means, validation accuracies, timing, the overfitting monitor."""

    epoch: int
    lr: float = 0.0
    train: dict[str, float] = dataclasses.field(default_factory=dict)
    val_natural: Optional[float] = None
    val_robust: Optional[float] = None
    val_examples: Optional[int] = None
    epoch_seconds: Optional[float] = None
    images_per_second: Optional[float] = None
    val_fgsm: Optional[float] = None
    co_detected: bool = False
    co_reason: Optional[str] = None
    best_epoch: Optional[int] = None
    val_natural_ema: Optional[float] = None  # the EMA weights' (optim.ema_decay > 0), else None
    val_robust_ema: Optional[float] = None
    best_ema_epoch: Optional[int] = None
    version: int = 1

    def to_dict(self) -> dict[str, Any]:
        """The line as a plain dict (one line of metrics.jsonl)."""
        return dataclasses.asdict(self)


def read_metrics(path: PathLike) -> list[MetricLine]:
    """Every epoch's line; a last line torn by a kill is dropped, a damaged earlier one is an error."""
    path = Path(path)
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8", errors="replace").split("\n")
    out = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            out.append(MetricLine(**_known(MetricLine, json.loads(line))))
        except (json.JSONDecodeError, TypeError):
            if not any(rest.strip() for rest in lines[i + 1:]):
                break  # the torn last line of an interrupted write
            raise UsageError(f"{path} line {i + 1} is damaged; it is not an iat metrics line") from None
    return out


def append_metric(path: PathLike, line: MetricLine) -> None:
    """Append one line and fsync it (on disk before the checkpoint that counts this epoch as done)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(line.to_dict()) + "\n")
        f.flush()
        os.fsync(f.fileno())


def write_metrics(path: PathLike, lines: list[MetricLine]) -> None:
    """Replace the file with `lines`, one JSON line each, atomically (a resume trims metrics.jsonl so)."""
    atomic_write_text(path, "".join(json.dumps(line.to_dict()) + "\n" for line in lines))


# ------------------------------------------------------------------------------------------ eval-*.json
@dataclasses.dataclass
class EvalRecord:
    """One evaluation of one checkpoint on the first n test examples: each attack's accuracy with its
    protocol, the per-example worst case, the sanity checks, per-example outcomes (packed bits)."""

    checkpoint: str
    data: dict[str, Any]
    threat: dict[str, Any]
    results: list[dict[str, Any]]
    run: Optional[str] = None
    checkpoint_kind: Optional[str] = None
    checkpoint_epoch: Optional[int] = None
    model: dict[str, Any] = dataclasses.field(default_factory=dict)
    method: dict[str, Any] = dataclasses.field(default_factory=dict)
    train_threat: Optional[dict[str, Any]] = None
    config: dict[str, Any] = dataclasses.field(default_factory=dict)
    seed: int = 0
    mode: str = "each"
    device: str = ""
    torch: str = ""
    seconds: float = 0.0
    sanity: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    eps_sweep: Optional[dict[str, Any]] = None
    diagnostics: dict[str, Any] = dataclasses.field(default_factory=dict)
    per_example: dict[str, str] = dataclasses.field(default_factory=dict)
    same_weights_as: Optional[str] = None
    parts: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # iat eval --extend: examples per part
    kind: str = "iat-eval"
    version: int = 2

    def to_dict(self) -> dict[str, Any]:
        """The record as plain dicts (what an eval-*.json holds)."""
        return dataclasses.asdict(self)

    def row(self, attack: str) -> Optional[dict[str, Any]]:
        """The results row of `attack` (as named in the evaluation, e.g. "pgd20" or "worst case"), or None."""
        return next((r for r in self.results if r["attack"] == attack), None)

    @classmethod
    def from_dict(cls, values: Any, source: str = "evaluation") -> EvalRecord:
        """Version 1 (iat 0.1) marked itself with "iat_eval": 1 and has the same fields."""
        if not isinstance(values, dict) or not ("iat_eval" in values or values.get("kind") == "iat-eval"):
            raise UsageError(f"{source} is not an iat evaluation record")
        if values.get("kind", "iat-eval") != "iat-eval" or values.get("version", 2) > 2:
            raise UsageError(f"{source} is an evaluation record of version {values.get('version')}, which this "
                             "iat cannot read")
        try:
            return cls(**{**_known(cls, values), "kind": "iat-eval", "version": 2})
        except TypeError as err:
            raise UsageError(f"{source} is an incomplete evaluation record ({err})") from None


def read_eval(path: PathLike) -> EvalRecord:
    """Read a results file written by `iat eval`, upgrading those of iat 0.1.

    Args:
        path: an eval-*.json (or another --out) file.

    Returns:
        The evaluation record, in the current version.

    Raises:
        UsageError: the file is missing, damaged, incomplete, or not an evaluation this version can read.
    """
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"evaluation {path} does not exist")
    return EvalRecord.from_dict(_read_json(path, "an iat evaluation"), str(path))


def try_read_eval(path: PathLike) -> Optional[EvalRecord]:
    """The record, or None for a missing or unreadable file (readers that skip what is not there yet)."""
    try:
        return read_eval(path)
    except (UsageError, OSError):
        return None


def write_eval(path: PathLike, record: EvalRecord) -> None:
    """Write `record` to `path` as indented JSON, atomically; missing folders are made.

    Args:
        path: the results file; an existing file is replaced.
        record: the evaluation to write.
    """
    atomic_write_text(path, json.dumps(record.to_dict(), indent=2) + "\n")

