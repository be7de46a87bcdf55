"""Training methods (loss objects). Importing a module registers its recipes."""
from . import iat, iat_trades_mart, mart, pgd_at, single_step, trades, uiat  # noqa: F401  (registration)

# isort: split
from . import awp  # noqa: F401  (registers X+awp: after the methods it wraps)
from .base import METHODS, Method, Metrics, create_method

__all__ = ["METHODS", "Method", "Metrics", "create_method"]
