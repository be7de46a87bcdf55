"""The one rule for "is this the same run?", used by `iat train --resume` and `iat reproduce`: two run
records are the same run when everything that decides the arithmetic is equal."""
from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:
    from .records import RunRecord

# What a resumed run may change: where it runs and what it prints, never its arithmetic.
MAY_CHANGE = ("config.device", "config.progress", "config.data.root", "config.data.download",
              "config.checkpoint_every_steps", "config.checkpoint_every_minutes", "config.tensorboard",
              "config.tensorboard_every", "device", "torch")
# Settings added after runs were recorded, with the value those runs had, so that a record without the
# setting is the same run as one with this value: dotted key -> (the methods the key belongs to, or None
# for every run, value).
ABSENT_MEANS: dict[str, tuple[Optional[tuple[str, ...]], Any]] = {
    "config.distributed.sync_bn": (None, False),
    "config.optim.ema_decay": (None, 0.0),
    "method.start": (("uiat-fgsm",), "random"),
    "method.mart_weight": (("iat-mart", "iat-mart+awp"), "inverse"),  # iat 0.1 weighed by 1 - p_y(x~)
}


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict) and tree:
        return {k: v for key, sub in tree.items() for k, v in _flat(sub, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): tree}


def identity(record: RunRecord) -> dict[str, Any]:
    """Dotted key -> value of everything that must stay the same for two runs to be the same run: the
    config (method options as the method resolved them), the method, the model spec and the data's split
    sizes, as far as the record holds them."""
    tree: dict[str, Any] = {"config": record.config}
    if record.method is not None:
        tree["method"] = record.method
    if record.model is not None:
        tree["model"] = record.model
    if record.data is not None:
        tree["data"] = {k: record.data.get(k) for k in ("name", "train", "val", "test")}
    name = (record.method or {}).get("name")
    absent = {k: v for k, (methods, v) in ABSENT_MEANS.items() if methods is None or name in methods}
    flat = {**absent, **_flat(json.loads(json.dumps(tree)))}  # tuples become lists, as in the saved file
    return {k: v for k, v in flat.items() if k not in MAY_CHANGE}


# Settings a run resolves when it starts: "auto" on one side matches what the other side resolved it to.
RESOLVED_AT_START = ("config.speed.layout", "config.speed.compile")


def first_difference(old: RunRecord, new: RunRecord) -> Optional[str]:
    """The one rule for "is this the same run?": None, or 'KEY would be NEW but was OLD (and N more)'.
    Sections only one of the records holds (a table spec has no resolved method yet) are not compared."""
    a, b = identity(old), identity(new)
    for key in RESOLVED_AT_START:
        if "auto" in (a.get(key), b.get(key)):
            a.pop(key, None), b.pop(key, None)
    sections = {k.split(".")[0] for k in a} & {k.split(".")[0] for k in b}
    # with both methods resolved, their options are compared as resolved, not as typed (-O beta=6 vs 6.0)
    typed = "method" not in sections
    keys = sorted(k for k in a.keys() | b.keys() if k.split(".")[0] in sections and a.get(k) != b.get(k)
                  and (typed or not k.startswith("config.method_options")))
    if not keys:
        return None
    more = f" (and {len(keys) - 1} more differences)" if len(keys) > 1 else ""
    return f"{keys[0]} would be {b.get(keys[0])!r} but was {a.get(keys[0])!r}{more}"
