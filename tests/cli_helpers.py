"""Shared by the CLI tests: the flags of a tiny training run on synthetic data (seconds on a CPU core)."""
from pathlib import Path

from iat.cli import main

FAST = ["--dataset", "synthetic", "--model", "cnn", "--epochs", "1", "--batch-size", "64", "--val-size", "128",
        "--steps", "2", "--eps", "8/255", "--step-size", "2/255", "--no-progress"]


def train_tiny(out: Path, method: str = "standard", flags: list[str] = FAST, *extra: str) -> Path:
    """Train `method` with `flags` (FAST by default) into `out`; returns `out`."""
    assert main(["train", "--method", method, *flags, "--out", str(out), *extra]) == 0
    return out
