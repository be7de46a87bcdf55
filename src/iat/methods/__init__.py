"""Training methods (loss objects). Importing a module registers its recipes."""
from .base import METHODS, Method, Metrics, create_method
from . import pgd_at, iat  # noqa: F401  (registration)
from . import single_step, uiat  # noqa: F401  (registration: fgsm-at, fgsm-rs, n-fgsm, gradalign, uiat-fgsm)
from . import trades, mart, iat_trades_mart  # noqa: F401  (registration)
from . import awp  # noqa: F401  (registers X+awp; after the methods it wraps)

__all__ = ["METHODS", "Method", "Metrics", "create_method"]
