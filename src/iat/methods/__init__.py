"""Training methods (loss objects). Importing a module registers its recipes."""
from .base import METHODS, Method, Metrics, create_method
from . import standard, iat  # noqa: F401  (registration)

__all__ = ["METHODS", "Method", "Metrics", "create_method"]
