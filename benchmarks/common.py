"""Shared by the benchmark scripts: environment record, medians, JSON output, a Trainer on synthetic data."""
from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch

RESULTS = Path(__file__).parent / "results"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def environment(device: torch.device) -> dict[str, Any]:
    env = {"torch": torch.__version__, "python": platform.python_version(), "cpu": cpu_name(),
           "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(), "device": str(device),
           "load_average": os.getloadavg(), "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device, n: int = 1) -> float:
    """Seconds per call of fn, over n calls."""
    sync(device)
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / n


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def write(name: str, result: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path


def make_trainer(method: str, model: str, batch_size: int, out: Path, device: str = "cpu",
                 classes: int = 10, steps: int = 10, **speed: Any):
    """A real Trainer (the code path `iat train` runs) on synthetic 3x32x32 data, in layout nchw without
    compile unless `speed` names them (so train_step runs at once, without the timing of "auto")."""
    from iat import config as C
    from iat.data import load_dataset
    from iat.training.trainer import Trainer

    cfg = C.TrainConfig(method=method, model=model, device=device, progress=False)
    cfg.data = C.DataConfig(name="synthetic", val_size=batch_size)
    cfg.optim = C.OptimConfig(epochs=1, batch_size=batch_size, schedule="constant", lr=0.01)
    cfg.threat = C.ThreatModel(steps=steps)
    C.update(cfg, {"speed": {"layout": "nchw", "compile": False, **speed}})
    bundle = load_dataset("synthetic", n_train=3 * batch_size, n_test=batch_size, num_classes=classes,
                          channels=3, size=32)
    return Trainer(cfg, out, bundle), cfg
