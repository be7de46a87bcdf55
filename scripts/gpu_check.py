"""One command for whoever has a GPU: the CUDA tests, a throughput table, a short real training, one report.

    python scripts/gpu_check.py --data ../shared/data/cifar10-jpeg.tar.gz --out gpu-check   # ~9 min, one H100/H200
    python scripts/gpu_check.py --smoke --out /tmp/gpu-check     # every stage on CPU at toy size, under a minute

Stages: (1) the CUDA tests, `pytest -m gpu` (tests/test_gpu.py); (2) images/s of one training step of
pgd-at, iat and uiat-fgsm on ResNet-18, 3x32x32 input, batch 512, in fp32, bf16, bf16+channels_last and
bf16+channels_last+compile (interleaved rounds, medians); (3) pgd-at and iat with the paper's settings
(configs/cifar10-resnet18-*.toml) on the CIFAR-10 JPEG copy except the number of epochs, which is chosen
from the measured fp32 throughput so that both runs fit in the time left, then `iat eval` with PGD-20 and
CW on 1,000 test images; (4) OUT/gpu_check.json and OUT/gpu_check.md. Each stage runs on its own: one that
fails, raises, or needs a tool that is not installed (pytest: pip install -e '.[gpu-check]') is recorded in
both reports as failed or skipped with a one-line reason (`stages` in the JSON), the others still run, and
the exit status is nonzero unless every stage ran and passed. Training and evaluation go through
`iat train` / `iat eval` (in this process), so this checks the code a user runs. --smoke swaps in synthetic data, the small
CNN, tiny batches and the "eager" torch.compile backend (inductor would compile for minutes on a CPU).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "benchmarks")]

METHODS = ("pgd-at", "iat", "uiat-fgsm")
OPTIONS = {"fp32": {}, "bf16": {"amp": "bf16"}, "bf16+channels_last": {"amp": "bf16", "layout": "channels_last"},
           "bf16+channels_last+compile": {"amp": "bf16", "layout": "channels_last", "compile": True}}
TRAINED = ("pgd-at", "iat")
FULL = {"budget_s": 540, "device": "cuda", "model": "resnet18", "batch": 512, "steps": 10, "warmup": 3, "timed": 5,
        "eval_examples": 1000, "reserve_s": 30}
SMOKE = {"budget_s": 55, "device": "cpu", "model": "cnn", "batch": 4, "steps": 1, "warmup": 0, "timed": 1,
         "eval_examples": 16, "reserve_s": 0}
CIFAR_TRAIN = 49_000  # 50,000 minus the configs' 1,000 held out for validation
INSTALL = "pip install -e '.[gpu-check]'"


class StageSkipped(Exception):
    """A stage that cannot run here (a tool is missing); its message is the one-line reason."""


class StageFailed(Exception):
    """A stage that ran and found a failure; its message is the one-line reason, `result` what it measured."""

    def __init__(self, reason: str, result: Any = None):
        super().__init__(reason)
        self.result = result


def have(module: str) -> bool:
    """Whether `import module` works in this Python (the subprocesses run the same interpreter)."""
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or "(no message)"
    return f"{type(err).__name__}: {text[:300]}"


def run_stages(stages: list[tuple[str, Any]], result: dict[str, Any], budget_s: float) -> dict[str, dict[str, Any]]:
    """Run each (name, fn(left_seconds)) in turn; an exception in one is recorded and never stops the others.
    result[name] gets what the stage returned (None when it did not finish); the returned record says per stage
    status ("ok", "failed", "skipped"), the one-line reason and the seconds it took."""
    start, record = time.perf_counter(), {}
    for name, fn in stages:
        t0 = time.perf_counter()
        print(f"gpu_check: {name} ...", flush=True)
        entry: dict[str, Any] = {"status": "ok", "reason": None}
        try:
            result[name] = fn(budget_s - (t0 - start))
        except StageSkipped as err:
            result[name], entry = None, {"status": "skipped", "reason": str(err)}
        except StageFailed as err:
            result[name], entry = err.result, {"status": "failed", "reason": str(err)}
        except Exception as err:  # a crash in one stage is a finding, reported with the others
            traceback.print_exc()
            result[name], entry = None, {"status": "failed", "reason": one_line(err)}
        entry["seconds"] = time.perf_counter() - t0
        record[name] = entry
        if entry["status"] != "ok":
            print(f"gpu_check: {name} {entry['status']}: {entry['reason']}", flush=True)
    return record


def run(cmd: list[str], log: Path, timeout: float) -> subprocess.CompletedProcess:
    """A subprocess with this checkout's sources first on the path; its output is kept in `log`. One that runs
    past `timeout` (at least 120 s: a check that overruns its budget still reports) ends with returncode 124."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    try:
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=max(timeout, 120))
    except subprocess.TimeoutExpired as err:
        done = subprocess.CompletedProcess(cmd, 124, str(err.stdout or ""), f"{err.stderr or ''}\ntimed out: {err}")
    log.write_text(f"$ {' '.join(cmd)}\n{done.stdout}\n{done.stderr}")
    return done


def iat(argv: list[str], log: Path) -> int:
    """`iat ARGV` in this process (no second start of Python and torch); its output is kept in `log`."""
    from iat.cli import main as iat_main

    text = io.StringIO()
    with contextlib.redirect_stdout(text), contextlib.redirect_stderr(text):
        try:
            rc = iat_main(argv)
        except Exception:  # a crash is a finding of the check, reported with the others
            traceback.print_exc()
            rc = 1
    log.write_text(f"$ iat {' '.join(argv)}\n{text.getvalue()}")
    return rc


# ----------------------------------------------------------------- (1) CUDA tests
def stage_tests(out: Path, left: float) -> dict[str, Any]:
    if not have("pytest"):
        raise StageSkipped(f"pytest is not installed: {INSTALL}")
    xml = out / "gpu_tests.xml"
    xml.unlink(missing_ok=True)
    done = run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", "tests/test_gpu.py",
                f"--junitxml={xml}"], out / "gpu_tests.log", left)
    if not xml.is_file():
        last = (done.stderr.strip() or done.stdout.strip() or "no output").splitlines()[-1][:300]
        raise StageFailed(f"pytest exited {done.returncode} without a report ({last}); see gpu_tests.log")
    suite = ET.parse(xml).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    failed = [f"{c.get('name')}" for c in suite.iter("testcase") if c.find("failure") is not None
              or c.find("error") is not None]
    found = {"returncode": done.returncode, **counts, "passed": counts["tests"] - counts["failures"]
             - counts["errors"] - counts["skipped"], "failed": failed, "log": "gpu_tests.log"}
    if not have("pyautoattack"):
        found["note"] = f"pyautoattack is not installed, so test_autoattack_on_cuda skips: {INSTALL}"
    if failed or counts["failures"] + counts["errors"]:
        raise StageFailed(f"{len(failed)} of {counts['tests']} CUDA tests failed: {', '.join(failed)}", found)
    return found


# ----------------------------------------------------------------- (2) throughput
def stage_throughput(size: dict[str, Any], smoke: bool) -> list[dict[str, Any]]:
    import torch

    real_compile = torch.compile
    if smoke:  # dynamo still traces; inductor's code generation would take minutes on a CPU
        torch.compile = lambda model, **kw: real_compile(model, backend="eager", **kw)
    try:
        return _throughput(size)
    finally:
        torch.compile = real_compile


def _throughput(size: dict[str, Any]) -> list[dict[str, Any]]:
    import torch

    from common import make_trainer
    from iat.training.layout import interleaved_medians

    sync = torch.cuda.synchronize if size["device"] == "cuda" else (lambda: None)
    rows = []
    for method in METHODS:
        steps = {}
        for name, speed in OPTIONS.items():
            torch.manual_seed(0)
            trainer, _ = make_trainer(method, size["model"], size["batch"], Path(tempfile.mkdtemp()),
                                      device=size["device"], steps=size["steps"], **speed)
            x, y = next(trainer.loader.batches(0))
            steps[name] = lambda t=trainer, x=x, y=y: t.train_step(x, y)
        seconds = interleaved_medians(steps, size["warmup"], size["timed"], sync)
        for name, s in seconds.items():
            rows.append({"method": method, "option": name, "speed": OPTIONS[name], "median_s_per_step": s,
                         "images_per_second": size["batch"] / s, "speedup_vs_fp32": seconds["fp32"] / s})
            print(f"  {method:10s} {name:28s} {size['batch'] / s:9.1f} img/s", flush=True)
        del steps
        if size["device"] == "cuda":
            torch.cuda.empty_cache()
    return rows


# ----------------------------------------------------------------- (3) short real training
def choose_epochs(rows: list[dict[str, Any]], left: float, size: dict[str, Any], n_train: int) -> int:
    """The most epochs both runs fit in `left` seconds, from fp32 throughput at batch 512. The configs train at
    batch 128 (slower per image: x1.3), validate every epoch (+10%) and are evaluated after (PGD-20 + CW-30 on
    eval_examples), and each run reads and decodes the data (60 s)."""
    ips = {r["method"]: r["images_per_second"] for r in rows if r["option"] == "fp32"}
    epoch_s = sum(1.3 * 1.1 * n_train / ips[m] for m in TRAINED)
    eval_s = sum(size["eval_examples"] * 52 / (ips[m] * (size["steps"] + 1)) for m in TRAINED)
    fixed = 2 * 60 + eval_s
    return max(1, math.floor((left - fixed) / epoch_s))


def train_args(method: str, epochs: int, data: Path | None, out: Path, smoke: bool) -> list[str]:
    args = ["train", "--config", str(ROOT / "configs" / f"cifar10-resnet18-{method}.toml"), "--epochs", str(epochs),
            "--out", str(out), "--no-progress"]
    if smoke:
        return args + ["--dataset", "synthetic", "--model", "cnn", "--device", "cpu", "--batch-size", "64",
                       "--val-size", "64", "--val-examples", "16", "--val-steps", "1", "--steps", "1"]
    return args + ["--dataset", "cifar10-jpeg", "--data-dir", str(data)]


def stage_training(rows: list[dict[str, Any]] | None, left: float, size: dict[str, Any], data: Path | None,
                   out: Path) -> dict[str, Any]:
    smoke = data is None
    measured = {r["method"] for r in rows or [] if r["option"] == "fp32"} >= set(TRAINED)
    epochs = 1 if smoke or not measured else choose_epochs(rows, left, size, CIFAR_TRAIN)
    runs = []
    for method in TRAINED:
        folder, t0 = out / "train" / method, time.perf_counter()
        rc = iat(train_args(method, epochs, data, folder, smoke), out / f"train-{method}.log")
        runs.append({"method": method, "epochs": epochs, "returncode": rc, "train_wall_s": time.perf_counter() - t0,
                     "log": f"train-{method}.log"})
        if rc == 0:
            runs[-1].update(evaluate(folder, size, out / f"eval-{method}.log"))
    found = {"epochs": epochs, "data": "synthetic" if smoke else "cifar10-jpeg (CIFAR-10 JPEG q75 copy)", "runs": runs}
    if not smoke and not measured:
        found["note"] = "no fp32 throughput measured, so 1 epoch each"
    bad = [f"{r['method']} train (see {r['log']})" if r["returncode"] else f"{r['method']} eval (see eval-{r['method']}.log)"
           for r in runs if r["returncode"] != 0 or r.get("eval_returncode") != 0]
    if bad:
        raise StageFailed(f"failed: {', '.join(bad)}", found)
    return found


def evaluate(run_dir: Path, size: dict[str, Any], log: Path) -> dict[str, Any]:
    """`iat eval` of the best checkpoint: PGD-20 and CW on the first eval_examples test images."""
    target = run_dir / "eval-gpu-check.json"
    t0 = time.perf_counter()
    rc = iat(["eval", str(run_dir), "--attacks", "natural,pgd20,cw", "--n-examples", str(size["eval_examples"]),
              "--out", str(target), "--no-progress", "--device", size["device"]], log)
    about: dict[str, Any] = {"eval_returncode": rc, "eval_wall_s": time.perf_counter() - t0}
    if rc == 0:
        record = json.loads(target.read_text())
        about["accuracy"] = {r["attack"]: r["accuracy"] for r in record["results"]}
        about["eval_examples"] = record["data"]["n_examples"]
        metrics = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]
        about["train_seconds"] = sum(m["epoch_seconds"] for m in metrics)
        chosen = json.loads((run_dir / "config.json").read_text())["config"]["speed"]
        about["layout"] = chosen["layout"] + ("+compile" if chosen.get("compile") is True else "")
    return about


# ----------------------------------------------------------------- (4) report
STAGE_TITLES = {"tests": "CUDA tests (`pytest -m gpu`)", "throughput": "Throughput", "training": "Short training"}


def markdown(result: dict[str, Any]) -> str:
    env, stages = result["environment"], result.get("stages", {})
    lines = [f"# GPU check{' (smoke: CPU, toy size)' if result['smoke'] else ''}", "",
             f"{env.get('gpu', env['cpu'])}, torch {env['torch']}, {result['seconds']['total']:.0f} s in all.", "",
             "| stage | status | reason |", "|---|---|---|"]
    for name, st in stages.items():
        lines.append(f"| {name} | {st['status']} | {st['reason'] or ''} |")
    lines.append("")
    for name, section in (("tests", _md_tests), ("throughput", _md_throughput), ("training", _md_training)):
        st = stages.get(name, {"status": "ok"})
        if result.get(name) is None:
            lines += [f"{STAGE_TITLES[name]}: {st['status']}: {st.get('reason') or 'no result'}", ""]
            continue
        try:
            lines += section(result) + [""]
        except Exception as err:  # a partial result still leaves the rest of the report
            lines += [f"{STAGE_TITLES[name]}: (report not drawn: {one_line(err)})", ""]
    return "\n".join(lines).rstrip("\n") + "\n"


def _md_tests(result: dict[str, Any]) -> list[str]:
    t = result["tests"]
    line = (f"CUDA tests (`pytest -m gpu`): {t['passed']} passed, {t['failures'] + t['errors']} failed, "
            f"{t['skipped']} skipped" + (f" (failed: {', '.join(t['failed'])})" if t["failed"] else ""))
    return [line] + ([f"Note: {t['note']}"] if t.get("note") else [])


def _md_throughput(result: dict[str, Any]) -> list[str]:
    lines = [f"Throughput, one training step, {result['size']['model']}, batch {result['size']['batch']} (images/s):",
             "", "| method | " + " | ".join(OPTIONS) + " |", "|---|" + "---:|" * len(OPTIONS)]
    for method in METHODS:
        cells = {r["option"]: r for r in result["throughput"] if r["method"] == method}
        lines.append(f"| {method} | " + " | ".join(f"{cells[o]['images_per_second']:.0f} "
                                                   f"({cells[o]['speedup_vs_fp32']:.2f}x)" if o in cells else "-"
                                                   for o in OPTIONS) + " |")
    return lines


def _md_training(result: dict[str, Any]) -> list[str]:
    tr = result["training"]
    lines = [f"Short training on {tr['data']}, {tr['epochs']} epoch(s), then `iat eval` of the best checkpoint:", "",
             "| method | epochs | layout | train s | natural | PGD-20 | CW | examples |",
             "|---|---:|---|---:|---:|---:|---:|---:|"]
    for r in tr["runs"]:
        acc = r.get("accuracy", {})
        cells = [f"{acc[k]:.2%}" if k in acc else "failed" for k in ("natural", "pgd20", "cw")]
        lines.append(f"| {r['method']} | {r['epochs']} | {r.get('layout', '-')} | {r.get('train_seconds', 0):.0f} | "
                     + " | ".join(cells) + f" | {r.get('eval_examples', '-')} |")
    return lines + ([f"Note: {tr['note']}"] if tr.get("note") else [])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder for gpu_check.json, gpu_check.md, logs and runs")
    p.add_argument("--data", help="the CIFAR-10 JPEG copy: cifar10-jpeg.tar.gz, or a folder holding it (or "
                   "cifar10-jpeg/); required unless --smoke")
    p.add_argument("--smoke", action="store_true", help="every stage on CPU at toy size (synthetic data)")
    p.add_argument("--budget", type=float, default=None, help="seconds for all stages (default: 540; smoke 55)")
    args = p.parse_args(argv)
    size = dict(SMOKE if args.smoke else FULL)
    size["budget_s"] = args.budget or size["budget_s"]
    data = None if args.smoke else data_root(args.data, p)
    import torch

    if not args.smoke and not torch.cuda.is_available():
        p.error("no CUDA device here; run on a GPU, or pass --smoke")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from common import environment

    start = time.perf_counter()
    result: dict[str, Any] = {"kind": "iat-gpu-check", "smoke": args.smoke, "size": size,
                              "environment": environment(torch.device(size["device"]))}
    stages = [("tests", lambda left: stage_tests(out, left)),
              ("throughput", lambda left: stage_throughput(size, args.smoke)),
              ("training", lambda left: stage_training(result.get("throughput"), left - size["reserve_s"],
                                                       size, data, out))]
    result["stages"] = run_stages(stages, result, size["budget_s"])
    result["seconds"] = {**{k: v["seconds"] for k, v in result["stages"].items()},
                         "total": time.perf_counter() - start}
    result["ok"] = all(st["status"] == "ok" for st in result["stages"].values())
    (out / "gpu_check.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "gpu_check.md").write_text(markdown(result))
    print(markdown(result))
    return 0 if result["ok"] else 1


def data_root(given: str | None, p: argparse.ArgumentParser) -> Path:
    """The --data-dir for `iat train`: the folder that holds cifar10-jpeg.tar.gz or cifar10-jpeg/."""
    if not given:
        p.error("--data (the CIFAR-10 JPEG copy) is required unless --smoke")
    path = Path(given).resolve()
    if path.is_file() or (path.name == "cifar10-jpeg" and path.is_dir()):
        return path.parent
    if path.is_dir():
        return path
    p.error(f"--data {given} does not exist")
    raise AssertionError  # p.error exits


if __name__ == "__main__":
    sys.exit(main())
