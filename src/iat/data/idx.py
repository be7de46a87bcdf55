"""The IDX file format of MNIST and Fashion-MNIST (http://yann.lecun.com/exdb/mnist/), gzipped or not.

Layout: two zero bytes, a type code, the number of dimensions, each dimension as a big-endian uint32,
then the values in C order, big-endian.
"""
from __future__ import annotations

import gzip
import math
import struct
import zlib
from pathlib import Path

import numpy as np

from ..errors import UsageError
from ..records import atomic_write_bytes
from .files import FETCH_AGAIN, damage, one_line

_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_CODES = {np.dtype(v).newbyteorder("="): k for k, v in _DTYPES.items()}


def _read_bytes(path: Path) -> bytes:
    problem = damage(path)  # an empty file, or a .gz that is no gzip, said as such
    if problem is not None:
        raise UsageError(f"{path} {problem}; {FETCH_AGAIN}")
    try:
        return gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:
        raise UsageError(f"{path} is truncated or not a valid gzip file ({one_line(e)}); {FETCH_AGAIN}") from e


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (or its .gz) into a writable numpy array in native byte order."""
    data = _read_bytes(path)
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] not in _DTYPES:
        raise UsageError(f"{path} is not an IDX file (bad header {data[:4]!r}); delete it and fetch again")
    dtype, ndim = np.dtype(_DTYPES[data[2]]), data[3]
    head = 4 + 4 * ndim
    if len(data) < head:
        raise UsageError(f"{path} is truncated inside its header; delete it and fetch again")
    dims = struct.unpack(f">{ndim}I", data[4:head])
    expected = math.prod(dims) * dtype.itemsize
    if len(data) - head != expected:
        raise UsageError(
            f"{path} is truncated or corrupt: its header says {list(dims)} ({expected} bytes of values) "
            f"but it holds {len(data) - head}; delete it and fetch again"
        )
    return np.frombuffer(data, dtype, offset=head).reshape(dims).astype(dtype.newbyteorder("="))


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write `array` as an uncompressed IDX file, atomically."""
    code = _CODES.get(array.dtype.newbyteorder("="))
    if code is None:
        raise ValueError(f"IDX cannot store dtype {array.dtype}")
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    atomic_write_bytes(path, header + np.ascontiguousarray(array, dtype=_DTYPES[code]).tobytes())
