"""CIFAR-10 (JPEG q75 copy): real CIFAR-10 images and official split, re-encoded as JPEG quality 75.

It exists for machines that cannot download the official archive. JPEG loss (mean abs error 5.8/255)
makes its numbers incomparable with published CIFAR-10 numbers, so its source string says so.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from ..errors import UsageError
from .cifar import CIFAR10_CLASSES
from .core import DATASETS, DataBundle, register_fetcher
from .files import atomic_path, damage, log
from .imagefolder import has_tree, load_imagefolder

ARCHIVE = "cifar10-jpeg.tar.gz"
SHARED_COPY = Path("..") / "shared" / "data" / ARCHIVE  # the developers' copy, relative to the repo checkout
TITLE = "CIFAR-10 (JPEG q75 copy; its numbers are not comparable with published CIFAR-10 numbers)"


def _in_root(root: Path) -> Path | None:
    for candidate in (root / ARCHIVE, root / "cifar10-jpeg" / ARCHIVE):
        if candidate.is_file():
            return candidate
    folder = root / "cifar10-jpeg"
    return folder if folder.is_dir() and has_tree(folder) else None


def locate(root: Path) -> Path:
    """The archive or folder to read: under root first, else the shared developer copy."""
    found = _in_root(root)
    if found is None and SHARED_COPY.is_file():
        found = SHARED_COPY
    if found is None:
        raise UsageError(
            f"{ARCHIVE} not found in {root}, {root / 'cifar10-jpeg'}/ or {SHARED_COPY}; it is a developer copy, "
            "elsewhere use the official data set `cifar10`"
        )
    return found


@DATASETS.register("cifar10-jpeg", help="CIFAR-10 (JPEG q75 copy) for offline machines; not comparable to published")
def cifar10_jpeg(root: Path, download: bool = False) -> DataBundle:
    """CIFAR-10 re-encoded as JPEG q75, from root/cifar10-jpeg.tar.gz, root/cifar10-jpeg/ or ../shared/data/."""
    if download and _in_root(root) is None:
        fetch_cifar10_jpeg(root)
    bundle = load_imagefolder(locate(root), channels=3, name="cifar10-jpeg", title=TITLE)
    if bundle.classes != CIFAR10_CLASSES:
        raise UsageError(f"{bundle.source} has classes {bundle.classes}, not the ten CIFAR-10 classes")
    return bundle


@register_fetcher("cifar10-jpeg")
def fetch_cifar10_jpeg(root: Path) -> Path:
    """Copy the shared developer archive into root/cifar10-jpeg/ (there is no public download)."""
    found = _in_root(root)
    if found is not None:
        problem = None if found.is_dir() else damage(found)
        if problem is not None:
            raise UsageError(f"{found} {problem}; delete it and run `iat data fetch cifar10-jpeg --root {root}` again")
        log(f"cifar10-jpeg is already at {found}")
        return found if found.is_dir() else found.parent
    if not SHARED_COPY.is_file():
        raise UsageError(f"{SHARED_COPY} not found (run from the repo checkout); elsewhere use `cifar10`")
    dest = root / "cifar10-jpeg" / ARCHIVE
    with atomic_path(dest) as tmp:
        shutil.copy2(SHARED_COPY, tmp)  # keeping the mtime lets the decoded-array cache recognise it
    log(f"copied {SHARED_COPY} to {dest}")
    return dest.parent
