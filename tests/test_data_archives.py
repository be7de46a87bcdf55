"""CIFAR python archives (read, download from a local server, damaged, unsafe) and image folders."""
from __future__ import annotations

import functools
import hashlib
import http.server
import io
import pickle
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from iat.data import cifar as cifar_mod
from iat.data import cifar10_jpeg as jpeg_mod
from iat.data import fetch_dataset, load_dataset
from iat.data import imagefolder as imagefolder_mod
from iat.data.files import safe_extract
from iat.errors import UsageError

CLASSES = cifar_mod.CIFAR10_CLASSES


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def py2_pickle(obj: object) -> bytes:
    """Pickle with the globals the official (Python 2, numpy 1) files use."""
    return pickle.dumps(obj, protocol=3).replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def cifar10_members(n: int = 4, seed: int = 0) -> dict[str, bytes]:
    """The official layout with n images per batch; bytes keys as Python 2 str keys load."""
    rng = np.random.default_rng(seed)
    members = {}
    for name in (*[f"data_batch_{i}" for i in range(1, 6)], "test_batch"):
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        members[name] = py2_pickle({b"batch_label": name.encode(), b"data": data,
                                    b"labels": [int(v) for v in rng.integers(0, 10, n)],
                                    b"filenames": [f"{i}.png".encode() for i in range(n)]})
    members["batches.meta"] = py2_pickle({b"label_names": [c.encode() for c in CLASSES], b"num_vis": 3072})
    return members


def write_tar(path: Path, members: dict[str, bytes], folder: str = "cifar-10-batches-py") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            add_member(tar, f"{folder}/{name}" if folder else name, data)
    return path


@pytest.fixture
def cifar_archive(tmp_path, monkeypatch) -> Path:
    archive = write_tar(tmp_path / "data" / "cifar10" / "cifar-10-python.tar.gz", cifar10_members())
    monkeypatch.setitem(cifar_mod.MD5, "cifar-10-python.tar.gz", md5(archive))
    return archive


def test_cifar10_reads_the_official_archive(cifar_archive):
    bundle = load_dataset("cifar10", cifar_archive.parent.parent)
    assert bundle.train.x.shape == (20, 3, 32, 32) and bundle.test.x.shape == (4, 3, 32, 32)
    assert bundle.classes == CLASSES and bundle.source.startswith("CIFAR-10, official python archive")
    first = pickle.loads(cifar10_members()["data_batch_1"], encoding="bytes")
    assert np.array_equal(bundle.train.x[:4].reshape(4, -1).numpy(), first[b"data"])
    assert bundle.train.y[:4].tolist() == first[b"labels"]


def test_cifar10_reads_the_extracted_folder(tmp_path, monkeypatch):
    folder = tmp_path / "cifar10" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name, data in cifar10_members().items():
        (folder / name).write_bytes(data)
        monkeypatch.setitem(cifar_mod.MD5, f"cifar-10-batches-py/{name}", md5(folder / name))
    assert len(load_dataset("cifar10", tmp_path).train) == 20
    monkeypatch.setitem(cifar_mod.MD5, "cifar-10-batches-py/test_batch", "1" * 32)
    with pytest.raises(UsageError, match="md5"):
        load_dataset("cifar10", tmp_path)


def test_cifar100_uses_fine_labels(tmp_path, monkeypatch):
    rng = np.random.default_rng(1)
    members = {
        split: py2_pickle({b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                           b"fine_labels": list(range(n)), b"coarse_labels": [0] * n})
        for split, n in (("train", 6), ("test", 3))
    }
    members["meta"] = py2_pickle({b"fine_label_names": [f"c{i}".encode() for i in range(100)]})
    archive = write_tar(tmp_path / "cifar100" / "cifar-100-python.tar.gz", members, "cifar-100-python")
    monkeypatch.setitem(cifar_mod.MD5, "cifar-100-python.tar.gz", md5(archive))
    bundle = load_dataset("cifar100", tmp_path)
    assert bundle.num_classes == 100 and bundle.train.y.tolist() == list(range(6)) and len(bundle.test) == 3


@pytest.fixture
def http_server(tmp_path):
    """A local static file server on 127.0.0.1, serving tmp_path/www."""
    www = tmp_path / "www"
    www.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(www))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield www, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join()


def test_cifar10_downloads_from_a_server(http_server, tmp_path, monkeypatch):
    www, base = http_server
    archive = write_tar(www / "cifar-10-python.tar.gz", cifar10_members())
    monkeypatch.setitem(cifar_mod.MD5, "cifar-10-python.tar.gz", md5(archive))
    url = f"{base}/cifar-10-python.tar.gz"
    folder = fetch_dataset("cifar10", tmp_path / "d1", url=url)
    assert md5(folder / "cifar-10-python.tar.gz") == md5(archive)
    assert len(load_dataset("cifar10", tmp_path / "d1").train) == 20
    assert len(load_dataset("cifar10", tmp_path / "d2", download=True, url=url).test) == 4
    with pytest.raises(UsageError, match="could not download"):
        fetch_dataset("cifar10", tmp_path / "d3", url=f"{base}/missing.tar.gz")
    assert not (tmp_path / "d3" / "cifar10" / "cifar-10-python.tar.gz").exists()
    monkeypatch.setitem(cifar_mod.MD5, "cifar-10-python.tar.gz", "2" * 32)
    with pytest.raises(UsageError, match="md5"):
        fetch_dataset("cifar10", tmp_path / "d4", url=url)
    assert not (tmp_path / "d4" / "cifar10" / "cifar-10-python.tar.gz").exists()


def test_truncated_archive_is_a_usage_error(cifar_archive, monkeypatch):
    root = cifar_archive.parent.parent
    data = cifar_archive.read_bytes()
    cifar_archive.write_bytes(data[: len(data) // 2])
    with pytest.raises(UsageError, match="md5"):
        load_dataset("cifar10", root)
    monkeypatch.setitem(cifar_mod.MD5, "cifar-10-python.tar.gz", None)  # reach the reader itself
    with pytest.raises(UsageError, match="truncated or corrupt"):
        load_dataset("cifar10", root)


def test_missing_cifar_says_how_to_fetch(tmp_path):
    with pytest.raises(UsageError, match=f"iat data fetch cifar10 --root {tmp_path}"):
        load_dataset("cifar10", tmp_path)


def test_unsafe_members_are_refused(tmp_path, monkeypatch):
    members = cifar10_members(n=1)
    members["../evil"] = b"x"
    archive = write_tar(tmp_path / "cifar10" / "cifar-10-python.tar.gz", members, folder="")
    monkeypatch.setitem(cifar_mod.MD5, "cifar-10-python.tar.gz", None)
    with pytest.raises(UsageError, match=r"member '\.\./evil'"):
        load_dataset("cifar10", tmp_path)
    with pytest.raises(UsageError, match=r"member '\.\./evil'"):
        load_dataset("imagefolder", path=archive)
    with pytest.raises(UsageError, match=r"member '\.\./evil'"):
        safe_extract(archive, tmp_path / "out")
    assert not (tmp_path / "evil").exists() and not (tmp_path / "out").exists()
    linked = tmp_path / "link.tar.gz"
    with tarfile.open(linked, "w:gz") as tar:
        info = tarfile.TarInfo("tree/passwd")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(info)
    with pytest.raises(UsageError, match="link or device"):
        safe_extract(linked, tmp_path / "out2")
    absolute = write_tar(tmp_path / "abs.tar.gz", {"/tmp/abs-evil": b"x"}, folder="")
    with pytest.raises(UsageError, match="outside"):
        safe_extract(absolute, tmp_path / "out3")


def image_tree(root: Path, size=(6, 5), classes=("cat", "ant", "bee"), per_class=3, seed=0) -> dict:
    """train/ and test/ PNG trees; returns {relative path: pixel array} to compare against."""
    rng = np.random.default_rng(seed)
    pixels = {}
    for split in ("train", "test"):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                a = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
                Image.fromarray(a).save(root / split / c / f"{i:02d}.png")
                pixels[f"{split}/{c}/{i:02d}.png"] = a
    return pixels


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("IAT_CACHE_DIR", str(tmp_path / "cache"))


def test_imagefolder_reads_a_tree_with_sorted_class_labels(tmp_path):
    pixels = image_tree(tmp_path / "tree")
    bundle = load_dataset("imagefolder", path=tmp_path / "tree")
    assert bundle.classes == ["ant", "bee", "cat"] and bundle.train.x.shape == (9, 3, 5, 6)
    # every image once, under its folder's label, in a fixed shuffled order rather than class by class
    found = []
    for x, y in zip(bundle.train.x.numpy(), bundle.train.y.tolist()):
        name = next(n for n, p in pixels.items() if n.startswith("train/") and np.array_equal(x, p.transpose(2, 0, 1)))
        assert name.split("/")[1] == bundle.classes[y]
        found.append(name)
    assert sorted(found) == sorted(n for n in pixels if n.startswith("train/"))
    assert found != sorted(found) and sorted(bundle.train.y.tolist()) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    again = load_dataset("imagefolder", tmp_path / "tree")  # root itself as the folder; from the cache
    assert np.array_equal(again.test.x.numpy(), bundle.test.x.numpy())
    grey = load_dataset("imagefolder", path=tmp_path / "tree", channels=1)
    assert grey.train.x.shape == (9, 1, 5, 6) and len(grey.mean) == 1


def test_imagefolder_reads_an_archive_without_writing_beside_it(tmp_path, monkeypatch):
    pixels = image_tree(tmp_path / "src" / "mini")
    archive = tmp_path / "ro" / "mini.tar.gz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "src" / "mini", arcname="mini")
    bundle = load_dataset("imagefolder", path=archive)
    assert sorted(p.name for p in archive.parent.iterdir()) == ["mini.tar.gz"]
    cat = pixels["test/cat/02.png"].transpose(2, 0, 1)
    assert [y for x, y in zip(bundle.test.x.numpy(), bundle.test.y.tolist()) if np.array_equal(x, cat)] == [2]
    # The second load comes from the decoded-array cache: nothing is decoded again.
    monkeypatch.setattr(imagefolder_mod, "decode_images", lambda *a: pytest.fail("decoded twice"))
    assert np.array_equal(load_dataset("imagefolder", path=archive).train.x.numpy(), bundle.train.x.numpy())
    archive.touch()  # the same bytes with a new mtime: still the cache (keyed by content)
    load_dataset("imagefolder", path=archive)
    Image.fromarray(255 - pixels["test/cat/02.png"]).save(tmp_path / "src" / "mini" / "test" / "cat" / "02.png")
    with tarfile.open(archive, "w:gz") as tar:  # other bytes: decoded afresh
        tar.add(tmp_path / "src" / "mini", arcname="mini")
    with pytest.raises(pytest.fail.Exception, match="decoded twice"):
        load_dataset("imagefolder", path=archive)


def test_imagefolder_bad_inputs(tmp_path):
    image_tree(tmp_path / "tree")
    Image.new("RGB", (7, 5)).save(tmp_path / "tree" / "test" / "bee" / "odd.png")
    with pytest.raises(UsageError, match=r"odd\.png is 7x5 .* same size"):
        load_dataset("imagefolder", path=tmp_path / "tree")
    (tmp_path / "empty" / "train" / "a").mkdir(parents=True)
    (tmp_path / "empty" / "test" / "a").mkdir(parents=True)
    with pytest.raises(UsageError, match="no images found"):
        load_dataset("imagefolder", path=tmp_path / "empty")
    (tmp_path / "flat").mkdir()
    with pytest.raises(UsageError, match="does not hold train/ and test/"):
        load_dataset("imagefolder", path=tmp_path / "flat")
    with pytest.raises(UsageError, match="does not exist"):
        load_dataset("imagefolder", path=tmp_path / "nowhere")
    (tmp_path / "tree" / "test" / "bee" / "odd.png").write_bytes(b"not a png")
    with pytest.raises(UsageError, match=r"cannot read image .*odd\.png"):
        load_dataset("imagefolder", path=tmp_path / "tree")


def test_imagefolder_archive_with_tree_at_top_and_damaged_archive(tmp_path):
    image_tree(tmp_path / "src")
    archive = tmp_path / "top.tgz"
    with tarfile.open(archive, "w:gz") as tar:
        for split in ("train", "test"):
            tar.add(tmp_path / "src" / split, arcname=split)
    assert load_dataset("imagefolder", path=archive).classes == ["ant", "bee", "cat"]
    data = archive.read_bytes()
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(UsageError, match="truncated or corrupt"):
        load_dataset("imagefolder", path=cut)
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(UsageError, match="neither a folder nor"):
        load_dataset("imagefolder", path=tmp_path / "notes.txt")


def test_cifar10_jpeg_reads_a_copy_and_says_what_it_is(tmp_path, monkeypatch):
    image_tree(tmp_path / "src" / "cifar10-jpeg", size=(32, 32), classes=CLASSES, per_class=1)
    (tmp_path / "data").mkdir()
    with tarfile.open(tmp_path / "data" / "cifar10-jpeg.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "src" / "cifar10-jpeg", arcname="cifar10-jpeg")
    bundle = load_dataset("cifar10-jpeg", tmp_path / "data")
    assert "CIFAR-10 (JPEG q75 copy" in bundle.source and "not comparable" in bundle.source
    assert bundle.classes == CLASSES and bundle.train.x.shape == (10, 3, 32, 32)
    monkeypatch.setattr(jpeg_mod, "SHARED_COPY", tmp_path / "absent.tar.gz")
    with pytest.raises(UsageError, match="cifar10-jpeg.tar.gz not found"):
        load_dataset("cifar10-jpeg", tmp_path / "elsewhere")


def test_two_archives_with_one_name_size_and_mtime_are_not_confused(tmp_path):
    """iat 0.1 keyed the decoded-array cache by archive name, size and mtime: the second of two such archives
    was read as the first one's images."""
    import os
    import tarfile

    archives = []
    for k in (0, 1):
        root = tmp_path / f"src{k}"
        for split in ("train", "test"):
            for c in ("ant", "bee"):
                (root / split / c).mkdir(parents=True)
                for i in range(2):  # uncompressed PPM: every archive has the same size
                    Image.new("RGB", (4, 4), (100 * k + 10 * i, 50, 50)).save(root / split / c / f"{i}.ppm")
        archive = tmp_path / f"copy{k}" / "data.tar"
        archive.parent.mkdir()
        with tarfile.open(archive, "w", format=tarfile.USTAR_FORMAT) as tar:
            for member in sorted(p for p in root.rglob("*")):
                info = tar.gettarinfo(member, arcname=str(member.relative_to(root)))
                info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
                with open(member, "rb") if member.is_file() else open(os.devnull, "rb") as f:
                    tar.addfile(info, f if member.is_file() else None)
        os.utime(archive, ns=(10**18, 10**18))
        archives.append(archive)
    assert archives[0].stat().st_size == archives[1].stat().st_size
    assert archives[0].read_bytes() != archives[1].read_bytes()
    first, second = (load_dataset("imagefolder", path=a) for a in archives)
    assert not np.array_equal(first.train.x.numpy(), second.train.x.numpy())
    assert int(second.train.x[..., 0].max()) >= 100  # the second archive's own pixels
