"""CIFAR-10 and CIFAR-100 (Krizhevsky 2009) from the official python archives or their extracted folders.

The archive is read in place (no extraction, so a read-only data folder works); its members are checked
like an extraction would check them, and each batch is unpickled with the restricted unpickler.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import UsageError
from .core import DATASETS, DataBundle, Split, make_bundle, register_fetcher
from .files import check_md5, download, iter_tar, log, read_member, reading_archive
from .safe_pickle import safe_loads

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@dataclass(frozen=True)
class CifarSpec:
    """Where a CIFAR archive comes from and which of its files and keys hold the splits."""

    name: str
    title: str
    url: str
    folder: str  # the archive's top-level folder
    train: tuple[str, ...]
    test: tuple[str, ...]
    meta: str
    label_key: str
    names_key: str

    @property
    def archive(self) -> str:
        """The archive's file name (the last part of its URL)."""
        return self.url.rsplit("/", 1)[-1]


SPECS = {
    "cifar10": CifarSpec(
        "cifar10", "CIFAR-10", "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "cifar-10-batches-py",
        tuple(f"data_batch_{i}" for i in range(1, 6)), ("test_batch",), "batches.meta", "labels", "label_names",
    ),
    "cifar100": CifarSpec(
        "cifar100", "CIFAR-100", "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz", "cifar-100-python",
        ("train",), ("test",), "meta", "fine_labels", "fine_label_names",
    ),
}
# Official md5 sums, by path inside the data set's folder (the same values torchvision checks).
# Tests replace entries with sums of the files they generate; None skips a check.
MD5: dict[str, str | None] = {
    "cifar-10-python.tar.gz": "c58f30108f718f92721af3b95e74349a",
    "cifar-10-batches-py/data_batch_1": "c99cafc152244af753f735de768cd75f",
    "cifar-10-batches-py/data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "cifar-10-batches-py/data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "cifar-10-batches-py/data_batch_4": "634d18415352ddfa80567beed471001a",
    "cifar-10-batches-py/data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "cifar-10-batches-py/test_batch": "40351d587109b95175f43aff81a1287e",
    "cifar-10-batches-py/batches.meta": "5ff9c542aee3614f3951f8cda6e48888",
    "cifar-100-python.tar.gz": "eb9058c3a382ffc7106e4002c42a8d85",
    "cifar-100-python/train": "16019d7e3df5f24257cddd939b257f8d",
    "cifar-100-python/test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
    "cifar-100-python/meta": "7973b15100ade9c7d40fb424638fde48",
}


def _hint(spec: CifarSpec, root: Path) -> str:
    return f"`iat data fetch {spec.name} --root {root}`"


def _read_archive(spec: CifarSpec, archive: Path) -> dict[str, bytes]:
    """The batch and meta files of the archive, by name, in one streaming pass."""
    wanted = {f"{spec.folder}/{m}" for m in (*spec.train, *spec.test, spec.meta)}
    blobs: dict[str, bytes] = {}
    with reading_archive(archive):
        for member, tar in iter_tar(archive):
            name = member.name.removeprefix("./")  # some tar tools prefix every member with ./
            if name in wanted:
                blobs[name.rsplit("/", 1)[-1]] = read_member(tar, member, archive)
    missing = sorted(w for w in wanted if w.rsplit("/", 1)[-1] not in blobs)
    if missing:
        raise UsageError(f"archive {archive} lacks {missing[0]}; it is not the official {spec.title} archive")
    return blobs


def _read_folder(spec: CifarSpec, folder: Path, root: Path) -> dict[str, bytes]:
    blobs = {}
    for member in (*spec.train, *spec.test, spec.meta):
        path = folder / spec.folder / member
        if not path.is_file():
            raise UsageError(f"{path} is missing; run {_hint(spec, root)} to get the official archive")
        check_md5(path, MD5.get(f"{spec.folder}/{member}"), _hint(spec, root))
        blobs[member] = path.read_bytes()
    return blobs


def _as_str_keys(obj: object, source: str) -> dict[str, object]:
    if not isinstance(obj, dict):
        raise UsageError(f"{source} holds a {type(obj).__name__}, not the dict of a CIFAR batch")
    # Python 2 wrote the keys as str, which encoding="bytes" returns as bytes.
    return {k.decode("latin1") if isinstance(k, bytes) else str(k): v for k, v in obj.items()}


def _decode_batch(spec: CifarSpec, blob: bytes, source: str) -> tuple[np.ndarray, np.ndarray]:
    batch = _as_str_keys(safe_loads(blob, source, encoding="bytes"), source)
    if "data" not in batch or spec.label_key not in batch:
        raise UsageError(f"{source} lacks the 'data' or '{spec.label_key}' entry of a CIFAR batch")
    x = np.asarray(batch["data"])
    y = np.asarray(batch[spec.label_key], dtype=np.int64)
    if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3 * 32 * 32 or len(x) != len(y):
        raise UsageError(
            f"{source} holds images {x.dtype}{list(x.shape)} and {len(y)} labels; "
            "expected uint8 [N, 3072] with one label each"
        )
    return x.reshape(-1, 3, 32, 32), y


def _split(spec: CifarSpec, blobs: dict[str, bytes], members: tuple[str, ...], where: Path) -> Split:
    parts = [_decode_batch(spec, blobs[m], f"{where}:{m}") for m in members]
    x = np.concatenate([p[0] for p in parts])
    y = np.concatenate([p[1] for p in parts])
    return Split(torch.from_numpy(x), torch.from_numpy(y))


def _class_names(spec: CifarSpec, blob: bytes, where: Path) -> list[str]:
    meta = _as_str_keys(safe_loads(blob, f"{where}:{spec.meta}", encoding="bytes"), f"{where}:{spec.meta}")
    names = meta.get(spec.names_key)
    if not isinstance(names, list):
        raise UsageError(f"{where}:{spec.meta} lacks the class names ('{spec.names_key}')")
    return [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in names]


def load_cifar(spec: CifarSpec, root: Path, download: bool = False, url: str | None = None) -> DataBundle:
    """Read root/<name>/ holding the official archive or its extracted folder; fetch first if asked."""
    folder = root / spec.name
    archive = folder / spec.archive
    if not archive.is_file() and not (folder / spec.folder).is_dir():
        if not download:
            raise UsageError(
                f"{spec.title} not found: expected {archive} or {folder / spec.folder}/; "
                f"run {_hint(spec, root)} or pass --data-download"
            )
        fetch_cifar(spec, root, url)
    if archive.is_file():
        check_md5(archive, MD5.get(spec.archive), _hint(spec, root))
        blobs, where, kind = _read_archive(spec, archive), archive, "official python archive"
    else:
        where = folder / spec.folder
        blobs, kind = _read_folder(spec, folder, root), "official python batches"
    train = _split(spec, blobs, spec.train, where)
    test = _split(spec, blobs, spec.test, where)
    classes = _class_names(spec, blobs[spec.meta], where)
    return make_bundle(spec.name, train, test, classes, f"{spec.title}, {kind} (md5-verified)")


def fetch_cifar(spec: CifarSpec, root: Path, url: str | None = None, timeout: float = 30.0) -> Path:
    """Download the official archive into root/<name>/ (or `url`, e.g. a local mirror) unless present."""
    folder = root / spec.name
    archive = folder / spec.archive
    if archive.is_file():
        check_md5(archive, MD5.get(spec.archive), _hint(spec, root))
        log(f"{spec.title} is already in {folder}")
    elif (folder / spec.folder).is_dir():
        log(f"{spec.title} is already extracted in {folder / spec.folder}")
    else:
        download(url or spec.url, archive, MD5.get(spec.archive), timeout)
    return folder


@DATASETS.register("cifar10", help="CIFAR-10, 50k/10k 32x32 colour, official python archive")
def cifar10(root: Path, download: bool = False, url: str | None = None) -> DataBundle:
    """CIFAR-10 from root/cifar10 (cifar-10-python.tar.gz or cifar-10-batches-py/)."""
    return load_cifar(SPECS["cifar10"], root, download, url)


@DATASETS.register("cifar100", help="CIFAR-100 (fine labels), 50k/10k 32x32 colour, official python archive")
def cifar100(root: Path, download: bool = False, url: str | None = None) -> DataBundle:
    """CIFAR-100 with its 100 fine labels from root/cifar100 (cifar-100-python.tar.gz or cifar-100-python/)."""
    return load_cifar(SPECS["cifar100"], root, download, url)


@register_fetcher("cifar10")
def fetch_cifar10(root: Path, url: str | None = None, timeout: float = 30.0) -> Path:
    """The official CIFAR-10 python archive in root/cifar10 (or from `url`), downloaded unless present."""
    return fetch_cifar(SPECS["cifar10"], root, url, timeout)


@register_fetcher("cifar100")
def fetch_cifar100(root: Path, url: str | None = None, timeout: float = 30.0) -> Path:
    """The official CIFAR-100 python archive in root/cifar100 (or from `url`), downloaded unless present."""
    return fetch_cifar(SPECS["cifar100"], root, url, timeout)
