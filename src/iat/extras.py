"""Optional extras: a check, before any work starts, that names the pip command when one is missing."""
from __future__ import annotations

from .errors import UsageError

PLOTS_HINT = 'pip install "iat[plots]"'


def require_matplotlib() -> None:
    """Raise a one-line UsageError before any work when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UsageError(f"plots need matplotlib: {PLOTS_HINT}") from None
