"""iat: inverse adversarial training (Dong et al., CVPR 2023) and robust evaluation in PyTorch.

Models take images in [0, 1] (NCHW) and return logits; normalisation lives inside the model.
`iat.evaluate(model, (x, y), eps=8/255)` evaluates any such nn.Module as `iat eval` does (see iat.api).
"""
from typing import Any

__version__ = "0.1.0"
__all__ = ["Evaluation", "evaluate", "__version__"]


def __getattr__(name: str) -> Any:
    """`iat.evaluate` and `iat.Evaluation`, imported on first use so that `import iat` stays light."""
    if name in ("evaluate", "Evaluation"):
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'iat' has no attribute {name!r}")
