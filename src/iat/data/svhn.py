"""SVHN cropped digits (Netzer et al. 2011) from the official train_32x32.mat / test_32x32.mat.

The .mat files need scipy to read; scipy stays optional because no other part of iat needs it.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import UsageError
from .core import DATASETS, DataBundle, Split, make_bundle, register_fetcher
from .files import check_md5, download, log

BASE_URL = "http://ufldl.stanford.edu/housenumbers/"
FILES = ("train_32x32.mat", "test_32x32.mat")
# Official md5 sums; tests replace them with sums of the files they generate.
MD5: dict[str, str | None] = {
    "train_32x32.mat": "e26dedcc434d2e4c54c9b2d4a06d8373",
    "test_32x32.mat": "eb5a983be6a315427106f1b164d9cef3",
}


def _loadmat(path: Path) -> dict:
    try:
        from scipy.io import loadmat  # type: ignore[import-untyped]  # an optional extra without type information
    except ImportError:
        raise UsageError("reading SVHN's .mat files needs scipy: pip install scipy") from None
    try:
        return loadmat(path)
    except (ValueError, OSError, TypeError) as e:
        raise UsageError(f"{path} is not a readable .mat file ({e}); delete it and fetch again") from e


def _read_split(path: Path) -> Split:
    mat = _loadmat(path)
    x, y = mat.get("X"), mat.get("y")
    if not isinstance(x, np.ndarray) or not isinstance(y, np.ndarray):
        raise UsageError(f"{path} lacks the arrays X and y of the official SVHN files")
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[2] != 3 or y.size != x.shape[3]:
        raise UsageError(
            f"{path} holds X {x.dtype}{list(x.shape)} and y {list(y.shape)}; expected uint8 [32, 32, 3, N], [N, 1]"
        )
    # The files store [H, W, C, N] and write digit 0 as label 10.
    images = np.ascontiguousarray(x.transpose(3, 2, 0, 1))
    labels = y.reshape(-1).astype(np.int64) % 10
    return Split(torch.from_numpy(images), torch.from_numpy(labels))


@DATASETS.register("svhn", help="SVHN cropped digits, 73k/26k 32x32 colour, official .mat files (needs scipy)")
def svhn(root: Path, download: bool = False, url: str | None = None) -> DataBundle:
    """SVHN from root/svhn/{train,test}_32x32.mat (the 'extra' split is not used)."""
    folder = root / "svhn"
    hint = f"`iat data fetch svhn --root {root}`"
    if not all((folder / f).is_file() for f in FILES):
        if not download:
            missing = next(f for f in FILES if not (folder / f).is_file())
            raise UsageError(f"SVHN not found: {folder} lacks {missing}; run {hint} or pass --data-download")
        fetch_svhn(root, url)
    for f in FILES:
        check_md5(folder / f, MD5.get(f), hint)
    train, test = _read_split(folder / FILES[0]), _read_split(folder / FILES[1])
    classes = [str(d) for d in range(10)]
    return make_bundle("svhn", train, test, classes, "SVHN (cropped digits), official .mat files (md5-verified)")


@register_fetcher("svhn")
def fetch_svhn(root: Path, url: str | None = None, timeout: float = 30.0) -> Path:
    """Download the two official .mat files into root/svhn (`url` replaces the base URL, e.g. a mirror)."""
    folder = root / "svhn"
    base = url or BASE_URL
    base = base if base.endswith("/") else base + "/"
    for f in FILES:
        if (folder / f).is_file():
            check_md5(folder / f, MD5.get(f), f"`iat data fetch svhn --root {root}`")
            log(f"{folder / f} is already there")
        else:
            download(base + f, folder / f, MD5.get(f), timeout)
    return folder
