"""Image folders: train/ and test/, one sub-folder per class (sorted names are the labels), or a tar of that.

An archive is read in one streaming pass, never extracted: nothing is written beside it (its folder may be
read-only), 60k small files need not be written and read back, and each member is still checked as a safe
extraction would check it. The decoded uint8 arrays are cached in the cache dir ($IAT_CACHE_DIR or
~/.cache/iat), keyed by an archive's content hash (a folder's names, sizes and mtimes), so only the first load pays for
decoding.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..errors import UsageError
from .core import DATASETS, DataBundle, Split, make_bundle
from .files import cache_dir, iter_tar, log, read_member, reading_archive, sha256_file

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".ppm", ".pgm", ".webp", ".tif", ".tiff"}
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")
CACHE_VERSION = 2  # bump when the cached arrays' layout changes (2: fixed shuffled order, not class order)
ORDER_SEED = 0  # the fixed order of an image folder's examples (part of the data set's definition)


def is_archive(path: Path) -> bool:
    """True for a file whose name ends like a tar archive (.tar, .tar.gz, ...)."""
    return path.is_file() and path.name.endswith(ARCHIVE_SUFFIXES)


def _subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def has_tree(folder: Path) -> bool:
    """True if `folder` holds train/ and test/, directly or under one top-level folder."""
    if (folder / "train").is_dir() and (folder / "test").is_dir():
        return True
    subs = _subdirs(folder) if folder.is_dir() else []
    return len(subs) == 1 and (subs[0] / "train").is_dir() and (subs[0] / "test").is_dir()


def find_tree(folder: Path) -> Path:
    """The folder that holds train/ and test/: `folder` itself or its single top-level sub-folder."""
    if not has_tree(folder):
        raise UsageError(
            f"{folder} does not hold train/ and test/ folders (each with one sub-folder of images per class)"
        )
    return folder if (folder / "train").is_dir() else _subdirs(folder)[0]


def _is_image(name: str) -> bool:
    base = name.rsplit("/", 1)[-1]
    return not base.startswith(".") and Path(base).suffix.lower() in IMAGE_EXTS


def label_files(files: list[str], where: str) -> tuple[list[str], dict[str, list[tuple[str, int]]]]:
    """Classes (sorted names of train/'s sub-folders holding images) and each split's (file, label) pairs.

    `files` are paths 'split/class/name' relative to the tree. Folders have no order across classes, so each
    split is put in one fixed shuffled order (class, then file name, then permuted by a generator seeded with
    ORDER_SEED): the first N examples are then a sample of all classes, as in CIFAR-10's official files, and
    `iat eval --n-examples N` or a validation subset does not see a single class.
    """
    by_split: dict[str, list[str]] = {"train": [], "test": []}
    for f in files:
        parts = f.split("/")
        if len(parts) == 3 and parts[0] in by_split and not parts[1].startswith(".") and _is_image(parts[2]):
            by_split[parts[0]].append(f)
    classes = sorted({f.split("/")[1] for f in by_split["train"]})
    index = {c: i for i, c in enumerate(classes)}
    labelled = {}
    for split, names in by_split.items():
        if not names:
            raise UsageError(f"no images found in {where}/{split}; expected {where}/{split}/<class>/<image>.png")
        stray = next((n for n in names if n.split("/")[1] not in index), None)
        if stray is not None:
            raise UsageError(f"{where}/{stray}: its class has no images in train/; both splits need the same classes")
        ordered = sorted(names, key=lambda n: n.split("/"))
        order = np.random.default_rng(ORDER_SEED).permutation(len(ordered))
        labelled[split] = [(ordered[i], index[ordered[i].split("/")[1]]) for i in order]
    return classes, labelled


def _decode_one(source: Path | io.BytesIO, mode: str, name: str) -> np.ndarray:
    try:
        with Image.open(source) as im:
            return np.asarray(im.convert(mode))
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise UsageError(f"cannot read image {name}: {e}") from e


def decode_images(files: list[str], read: Callable[[str], Path | io.BytesIO], channels: int, where: str) -> np.ndarray:
    """Decode images into uint8 [N, C, H, W]; every image must have the size of the first."""
    mode = "L" if channels == 1 else "RGB"
    first = _decode_one(read(files[0]), mode, f"{where}/{files[0]}")
    out = np.empty((len(files), *first.shape), dtype=np.uint8)
    out[0] = first
    for i, f in enumerate(files[1:], start=1):
        a = _decode_one(read(f), mode, f"{where}/{f}")
        if a.shape != first.shape:
            raise UsageError(
                f"{where}/{f} is {a.shape[1]}x{a.shape[0]} but {files[0]} is {first.shape[1]}x{first.shape[0]}; "
                "all images must have the same size"
            )
        out[i] = a
    return out[:, None] if channels == 1 else out.transpose(0, 3, 1, 2).copy()


def decode_listing(files: list[str], read: Callable[[str], Path | io.BytesIO], channels: int,
                   where: str) -> dict[str, np.ndarray]:
    """Label and decode a tree's files (one pass over both splits, so a bad test image is named too)."""
    classes, labelled = label_files(files, where)
    names = [n for split in ("train", "test") for n, _ in labelled[split]]
    log(f"decoding {len(names)} images from {where} (cached afterwards)")
    x = decode_images(names, read, channels, where)
    n = len(labelled["train"])
    return {
        "classes": np.array(classes, dtype=str),
        "train_x": x[:n], "train_y": np.array([label for _, label in labelled["train"]], dtype=np.int64),
        "test_x": x[n:], "test_y": np.array([label for _, label in labelled["test"]], dtype=np.int64),
    }


def _walk(tree: Path) -> tuple[list[str], list[tuple[str, int, int]]]:
    """Files two levels under train/ and test/ as 'split/class/name', with (name, size, mtime) stamps."""
    files, stamps = [], []
    for split in ("train", "test"):
        for class_dir in _subdirs(tree / split):
            for f in class_dir.iterdir():
                if _is_image(f.name) and f.is_file():
                    st = f.stat()
                    files.append(f"{split}/{class_dir.name}/{f.name}")
                    stamps.append((files[-1], st.st_size, st.st_mtime_ns))
    return files, sorted(stamps)


def _tree_prefix(names: list[str], where: Path) -> str:
    """'' if an archive holds train/ and test/ at its top, 'top/' if under one top-level folder."""
    tops = {n.split("/", 1)[0] for n in names}
    if {"train", "test"} <= tops:
        return ""
    if len(tops) == 1 and {"train", "test"} <= {n.split("/")[1] for n in names if n.count("/") >= 2}:
        return f"{tops.pop()}/"
    raise UsageError(f"{where} does not hold train/ and test/ folders (each with one sub-folder of images per class)")


def read_archive(archive: Path) -> dict[str, bytes]:
    """The archive's images by path relative to its train/test tree, read in one pass with members checked."""
    blobs: dict[str, bytes] = {}
    with reading_archive(archive):
        for member, tar in iter_tar(archive):
            if member.isfile() and _is_image(member.name):
                blobs[member.name.removeprefix("./")] = read_member(tar, member, archive)
    prefix = _tree_prefix(list(blobs), archive)
    return {name[len(prefix):]: data for name, data in blobs.items() if name.startswith(prefix)}


def _load_cached(folder: Path) -> dict[str, np.ndarray] | None:
    names = ("classes", "train_x", "train_y", "test_x", "test_y")
    try:
        return {n: np.load(folder / f"{n}.npy", allow_pickle=False) for n in names}
    except (OSError, ValueError):
        return None  # absent or damaged: decode again


def _save_cached(folder: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write the arrays into a temporary folder renamed into place, so readers never see half a cache."""
    tmp = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
    try:
        tmp.mkdir(parents=True, exist_ok=True)
        for name, array in arrays.items():
            np.save(tmp / f"{name}.npy", array, allow_pickle=False)
        os.replace(tmp, folder)
    except OSError as e:  # a full or read-only cache only costs decoding again next time
        if not folder.is_dir():  # (a folder there means another process cached the same data first)
            log(f"could not cache decoded images in {folder}: {e}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)[:60]


def _read_arrays(path: Path, channels: int) -> dict[str, np.ndarray]:
    """Decoded arrays for a folder or archive, from the cache when the source is unchanged."""
    base = cache_dir() / "imagefolder"
    if path.is_file():  # keyed by content: two archives of one name, size and mtime are still told apart
        arrays_dir = base / f"{_slug(path.name)}-{sha256_file(path)[:20]}-c{channels}-v{CACHE_VERSION}"
        cached = _load_cached(arrays_dir)
        if cached is not None:
            return cached
        blobs = read_archive(path)
        arrays = decode_listing(list(blobs), lambda f: io.BytesIO(blobs[f]), channels, str(path))
    else:
        tree = find_tree(path)
        files, stamps = _walk(tree)
        stamp = hashlib.sha1(json.dumps([str(tree.resolve()), stamps]).encode()).hexdigest()[:16]
        arrays_dir = base / f"{_slug(tree.name)}-{stamp}-c{channels}-v{CACHE_VERSION}"
        cached = _load_cached(arrays_dir)
        if cached is not None:
            return cached
        arrays = decode_listing(files, lambda f: tree / f, channels, str(tree))
    _save_cached(arrays_dir, arrays)
    return arrays


def load_imagefolder(
    path: Path, channels: int = 3, name: str = "imagefolder", title: str = "image folder"
) -> DataBundle:
    """Read an image-folder tree (or a .tar.gz/.tgz/.tar of one) into a DataBundle."""
    if channels not in (1, 3):
        raise UsageError(f"channels must be 1 (grey) or 3 (RGB), got {channels!r}")
    path = Path(path).expanduser()
    if not path.exists():
        raise UsageError(
            f"image folder {path} does not exist; give a folder holding train/ and test/ "
            "(one sub-folder per class) or a .tar.gz of one"
        )
    if path.is_file() and not is_archive(path):
        raise UsageError(f"{path} is neither a folder nor a {'/'.join(ARCHIVE_SUFFIXES)} archive")
    arrays = _read_arrays(path, channels)
    train = Split(torch.from_numpy(arrays["train_x"]), torch.from_numpy(arrays["train_y"]))
    test = Split(torch.from_numpy(arrays["test_x"]), torch.from_numpy(arrays["test_y"]))
    classes = [str(c) for c in arrays["classes"]]
    return make_bundle(name, train, test, classes, f"{title}, imagefolder {path.resolve()}")


@DATASETS.register("imagefolder", help="your own images: DIR/{train,test}/<class>/*.png (or a .tar.gz of it)")
def imagefolder(root: Path, download: bool = False, path: str | Path | None = None, channels: int = 3) -> DataBundle:
    """Images from `path` (default: root itself) laid out as train/<class>/* and test/<class>/*.

    `download` is accepted for a uniform signature and ignored: these are the user's own images.
    """
    return load_imagefolder(Path(path) if path is not None else root, channels)
