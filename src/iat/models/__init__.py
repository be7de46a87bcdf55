"""Image classifiers that take [0, 1] NCHW images and return logits; each starts with Normalize.

Importing this package registers every architecture in MODELS; build one with create_model.
"""
from __future__ import annotations

from . import cnn, preact_resnet, resnet, wideresnet  # noqa: F401  (imported to register)
from .base import MODELS, Normalize, create_model, model_info

__all__ = ["MODELS", "Normalize", "create_model", "model_info"]
