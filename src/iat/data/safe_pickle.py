"""A restricted unpickler for the official data pickles (CIFAR batches, the MNIST pickle).

Plain pickle.load runs whatever a file names (os.system included), and these files come off the network.
The official pickles only ever name numpy's array reconstruction, so that is all this unpickler allows.
"""
from __future__ import annotations

import importlib
import io
import pickle
import struct
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UsageError


def _reconstruct() -> Any:
    try:  # numpy >= 2 moved the module; files written by numpy 1 (or Python 2) still name numpy.core
        return importlib.import_module("numpy._core.multiarray")._reconstruct
    except ImportError:  # pragma: no cover - numpy 1.x
        return importlib.import_module("numpy.core.multiarray")._reconstruct


# (module, name) -> the object it may resolve to; found by pickletools on the official files.
_ALLOWED = {
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only numpy ndarray, dtype and _reconstruct; anything else is refused."""

    def __init__(self, file: Any, source: str, **kw: Any) -> None:
        super().__init__(file, **kw)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        """The allowed numpy object for (module, name); anything else is a UsageError."""
        resolve = _ALLOWED.get((module, name))
        if resolve is None:
            raise UsageError(
                f"refusing to unpickle {module}.{name} from {self.source}: a data file may only hold numpy "
                "arrays; the file is not the official one, delete it and fetch again"
            )
        return resolve()


def safe_loads(data: bytes, source: str | Path, encoding: str = "ASCII") -> Any:
    """Unpickle `data` with RestrictedUnpickler; a damaged pickle becomes a UsageError naming `source`."""
    try:
        return RestrictedUnpickler(io.BytesIO(data), str(source), encoding=encoding).load()
    except UsageError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError,
            AttributeError, struct.error, MemoryError) as e:
        raise UsageError(f"{source} is not a readable data pickle ({e!r}); delete it and fetch again") from e
