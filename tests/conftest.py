import os

import pytest
import torch

torch.set_num_threads(1)  # one thread per test process: on 2 shared cores 2 threads made the suite ~4x slower


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
