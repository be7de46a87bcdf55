import os

import pytest
import torch

# One thread per test process, and per `iat` process a test starts (they inherit the environment): on 2 shared
# cores 2 threads made the suite ~4x slower; pytest-xdist (scripts/test.sh) runs one worker per core instead.
torch.set_num_threads(1)
os.environ["OMP_NUM_THREADS"] = "1"


@pytest.fixture
def tiny_model():
    """A tiny CNN with BatchNorm (so mode handling matters), deterministic weights."""
    from iat.models import create_model

    torch.manual_seed(0)
    return create_model("cnn4", num_classes=4, in_channels=1, input_size=16, mean=[0.5], std=[0.25])


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(8, 1, 16, 16, generator=g)
    y = torch.randint(0, 4, (8,), generator=g)
    return x, y


def slow_enabled() -> bool:
    return os.environ.get("IAT_SLOW") == "1"
