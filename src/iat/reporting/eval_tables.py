"""One evaluation record (what `iat eval` writes as JSON) as a terminal table, Markdown and CSV, with the
protocol written next to every number, and the files written side by side."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..records import EvalRecord, atomic_write_text, write_eval
from .render import csv_text, fmt_eps, markdown_table, text_table

LOSS_NAMES = {"ce": "cross-entropy", "cw": "CW margin", "kl": "KL"}
CSV_FIELDS = ["attack", "accuracy", "correct", "total", "attacked", "counted", "eps", "norm", "steps", "step_size",
              "restarts", "loss", "random_start", "protocol", "checkpoint", "checkpoint_kind", "checkpoint_epoch",
              "dataset", "split", "seed", "mode"]


def protocol_text(p: Mapping[str, Any]) -> str:
    """One readable line for an attack's describe() dict (or a worst-case row's protocol)."""
    if "per_example_worst_case_of" in p:
        how = ", attacks only on still-robust points" if p.get("mode") == "cumulative" else ""
        return f"per example, worst of {', '.join(p['per_example_worst_case_of'])}{how}"
    if p.get("attack") == "autoattack":
        return (f"{p['norm']} eps {fmt_eps(p['eps'])}, AutoAttack {p['version']} ({', '.join(p['components'])}), "
                f"{p.get('package', '')}")
    if not p.get("eps") and not p.get("steps"):
        return "clean input, no attack"
    steps = f"{p['steps']} step{'s' * (p['steps'] != 1)} of {fmt_eps(p['step_size'])}"
    start = "random start" if p.get("random_start") else "no random start"
    restarts = f", {p['restarts']} restarts" if p.get("restarts", 1) > 1 else ""
    extra = (", no projection" if not p.get("project", True) else "") + (", DEScent" if p.get("descent") else "")
    loss = p.get("loss")
    loss = LOSS_NAMES.get(loss, loss) if isinstance(loss, str) else loss
    return f"{p['norm']} eps {fmt_eps(p['eps'])}, {steps}, {start}{restarts}, {loss} loss{extra}"


def format_table(rows: list[dict[str, Any]]) -> str:
    """Terminal table: attack, accuracy, correct/n, protocol."""
    width = max(12, *(len(r["attack"]) + 2 for r in rows))
    cells = [[r["attack"], f"{r['accuracy']:.2%}", f"{r['correct']}/{r['total']}", protocol_text(r["protocol"])]
             for r in rows]
    return text_table(["attack", "accuracy", "correct", "protocol"], cells, widths=[width, 9, 11, 0], align="lrrl",
                      sep=["", "  ", "  "], rule_extra=40)


def format_sweep(sweep: Mapping[str, Any]) -> str:
    """Terminal table of an eps sweep: eps, accuracy, correct/n."""
    points = sweep["points"]
    head = (f"accuracy against eps ({sweep['attack']}, {sweep['norm']}, first {points[0]['total']} "
            "test examples):")
    cells = [[fmt_eps(p["eps"]), f"{p['accuracy']:.2%}", f"{p['correct']}/{p['total']}"] for p in points]
    return head + "\n" + text_table(["eps", "accuracy", "correct"], cells, widths=[8, 9, 11], align="rrr")


def format_checks(checks: Sequence[Mapping[str, Any]]) -> str:
    """One line per sanity check: STATUS name: message."""
    return "\n".join(f"{c['status'].upper():<5} {c['name']}: {c['message']}" for c in checks)


def _header(result: EvalRecord) -> list[str]:
    d, t = result.data, result.threat
    return [f"- checkpoint: `{result.checkpoint}` ({result.checkpoint_kind or 'file'}, "
            f"epoch {result.checkpoint_epoch})",
            f"- model: {result.model.get('name')}; training method: {result.method.get('name')}",
            f"- data: {d['source']}, {d['split']} split, first {d['n_examples']} examples",
            f"- threat model: {t['norm']}, eps {fmt_eps(t['eps'])}; images in [0, 1]",
            f"- mode: {result.mode} ({MODE_TEXT[result.mode]})",
            f"- seed {result.seed}, device {result.device}, torch {result.torch}, "
            f"{result.seconds:.0f} s"]


MODE_TEXT = {"each": "every attack runs on every naturally correct example; worst case per example",
             "cumulative": "each attack runs only on examples every earlier attack failed on; columns are cumulative"}


def to_markdown(result: EvalRecord) -> str:
    """The evaluation as a Markdown document: header, accuracies, sanity checks, eps sweep."""
    rows = [[r["attack"], f"{r['accuracy']:.2%}", f"{r['correct']} / {r['total']}", protocol_text(r["protocol"])]
            for r in result.results]
    lines = ["# Robustness evaluation", "", *_header(result), "",
             *markdown_table(["attack", "accuracy", "correct / n", "protocol"], rows, align="lrrl")]
    for name, diag in (result.diagnostics or {}).items():
        broken = ", ".join(f"{k} {v}" for k, v in diag.get("broken_by", {}).items())
        lines += ["", f"{name}: examples broken by each component (each runs on the survivors of the ones "
                  f"before it): {broken or 'none'}."]
    lines += ["", "Every adversarial example was verified (inside the eps-ball, inside [0, 1], finite) before it "
              "counted; accuracy is counted over examples.", "", "## Sanity checks", "",
              *markdown_table(["check", "status", "what it means"],
                              [[c["name"], c["status"], c["message"]] for c in result.sanity])]
    sweep = result.eps_sweep
    if sweep:
        points = [[fmt_eps(p["eps"]), f"{p['accuracy']:.2%}", f"{p['correct']} / {p['total']}"]
                  for p in sweep["points"]]
        lines += ["", f"## Accuracy against eps ({sweep['attack']}, {sweep['norm']}, first "
                  f"{sweep['points'][0]['total']} examples)", "",
                  *markdown_table(["eps", "accuracy", "correct / n"], points, align="rrr")]
        if sweep.get("plot"):
            lines += ["", f"![accuracy against eps]({sweep['plot_name']})"]
    return "\n".join(lines) + "\n"


def _csv_row(result: EvalRecord, r: Mapping[str, Any]) -> dict[str, Any]:
    p = r["protocol"]
    return {
        "attack": r["attack"], "accuracy": f"{r['accuracy']:.6f}", "correct": r["correct"], "total": r["total"],
        "attacked": r.get("attacked", ""), "counted": r.get("counted", ""), "eps": p.get("eps", ""),
        "norm": p.get("norm", ""), "steps": p.get("steps", ""), "step_size": p.get("step_size", ""),
        "restarts": p.get("restarts", ""), "loss": p.get("loss", ""), "random_start": p.get("random_start", ""),
        "protocol": protocol_text(p), "checkpoint": result.checkpoint,
        "checkpoint_kind": result.checkpoint_kind or "", "checkpoint_epoch": result.checkpoint_epoch,
        "dataset": result.data["name"], "split": result.data["split"], "seed": result.seed,
        "mode": result.mode,
    }


def to_csv(result: EvalRecord) -> str:
    """One CSV line per attack, with its protocol and the checkpoint, data and seed."""
    rows = [_csv_row(result, r) for r in result.results]
    return csv_text(CSV_FIELDS, [[row[f] for f in CSV_FIELDS] for row in rows])


def output_paths(out: Path) -> dict[str, Path]:
    """The JSON, CSV, Markdown and eps-sweep PNG paths of results file `out`."""
    stem = out.with_suffix("")
    return {"json": out, "csv": out.with_suffix(".csv"), "md": out.with_suffix(".md"),
            "png": stem.with_name(stem.name + "-eps-sweep.png")}


def write_eval_files(result: EvalRecord, out: Path) -> list[Path]:
    """JSON, CSV and Markdown (and the eps-sweep PNG) side by side; returns the paths written."""
    paths = output_paths(out)
    written = []
    if result.eps_sweep:
        from .plots import plot_eps_sweep

        sweep, t = result.eps_sweep, result.threat
        title = (f"{sweep['attack']} ({sweep['norm']}) on {result.data['name']}, "
                 f"{sweep['points'][0]['total']} test examples, seed {result.seed}")
        written.append(plot_eps_sweep(sweep["points"], paths["png"], title=title, train_eps=t["eps"]))
        sweep["plot"], sweep["plot_name"] = str(paths["png"]), paths["png"].name
    write_eval(paths["json"], result)
    atomic_write_text(paths["csv"], to_csv(result))
    atomic_write_text(paths["md"], to_markdown(result))
    return [paths["json"], paths["csv"], paths["md"], *written]
