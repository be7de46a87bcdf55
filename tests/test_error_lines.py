"""Errors that name the problem: a duplicated JSON key, an empty or non-gzip archive, each one line, exit status 2."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from iat.config import read_config_file
from iat.data import load_dataset
from iat.data.idx import read_idx
from iat.errors import UsageError

ROOT = Path(__file__).resolve().parents[1]
SRC = str(ROOT / "src")
DEMO = str(ROOT / "configs" / "mnist-demo.toml")
MNIST_STEMS = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def iat(tmp_path: Path, *argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": SRC, "IAT_CACHE_DIR": str(tmp_path / "cache"),
           "IAT_DATA_DIR": str(tmp_path / "data")}
    return subprocess.run([sys.executable, "-m", "iat", *argv], capture_output=True, text=True, env=env, timeout=300)


def one_error_line(done: subprocess.CompletedProcess) -> str:
    """The stderr of a refused command: exit 2 and exactly one line, `iat: error: ...`."""
    lines = done.stderr.splitlines()
    assert done.returncode == 2, done.stderr
    assert len(lines) == 1 and lines[0].startswith("iat: error: "), done.stderr
    return lines[0]


# --- a JSON config with a key given twice is refused, as the same TOML is --------------------------------------

def test_duplicated_json_key_is_refused_by_the_loader(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"optim": {"lr": 0.1,\n "lr": 0.2}}')
    with pytest.raises(UsageError) as err:
        read_config_file(path)
    message = str(err.value)
    assert "\n" not in message
    assert str(path) in message and "'lr'" in message and "appears twice" in message
    path.write_text('{"optim": {"lr": 0.1}, "val": {"lr": 0.1}}')  # one key name in two tables is fine
    assert read_config_file(path) == {"optim": {"lr": 0.1}, "val": {"lr": 0.1}}


def test_duplicated_json_key_at_top_level_is_refused(tmp_path):
    path = tmp_path / "top.json"
    path.write_text('{"seed": 1, "seed": 2}')
    with pytest.raises(UsageError, match="'seed' appears twice"):
        read_config_file(path)


def test_duplicated_json_key_through_the_cli(tmp_path):
    path = tmp_path / "dup.json"
    path.write_text('{"optim": {"lr": 0.1, "lr": 0.2}}')
    line = one_error_line(iat(tmp_path, "train", "--config", str(path), "--out", str(tmp_path / "run")))
    assert str(path) in line and "'lr' appears twice" in line
    assert not (tmp_path / "run").exists()


def test_malformed_json_names_file_line_and_column(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{"optim":\n {"lr": 0.1,,}}')
    with pytest.raises(UsageError) as err:
        read_config_file(path)
    message = str(err.value)
    assert "\n" not in message and str(path) in message and "line 2, column 13" in message


# --- archives: empty, not gzip -----------------------------------------------------------------------------------

def test_empty_image_archive_is_one_line(tmp_path):
    archive = tmp_path / "images.tar.gz"
    archive.write_bytes(b"")
    with pytest.raises(UsageError) as err:
        load_dataset("imagefolder", path=archive)
    message = str(err.value)
    assert "\n" not in message and "ReadError" not in message
    assert str(archive) in message and "is empty (0 bytes)" in message and "fetch it again" in message


def test_non_gzip_image_archive_is_one_line(tmp_path):
    archive = tmp_path / "images.tar.gz"
    archive.write_bytes(b"this is a text file, not a gzip stream\n" * 20)
    with pytest.raises(UsageError) as err:
        load_dataset("imagefolder", path=archive)
    message = str(err.value)
    assert "\n" not in message and "ReadError" not in message
    assert str(archive) in message and "is not a gzip file" in message


def test_empty_and_non_gzip_image_archive_through_the_cli(tmp_path):
    archive = tmp_path / "images.tar.gz"
    for content, problem in ((b"", "is empty (0 bytes)"), (b"plain text\n" * 50, "is not a gzip file")):
        archive.write_bytes(content)
        done = iat(tmp_path, "train", "--config", DEMO, "--out", str(tmp_path / "run"),
                   "--dataset", "imagefolder", "--data-dir", str(archive), "--no-data-download")
        line = one_error_line(done)
        assert str(archive) in line and problem in line


def test_empty_cifar10_jpeg_archive_through_the_cli(tmp_path):
    archive = tmp_path / "data" / "cifar10-jpeg" / "cifar10-jpeg.tar.gz"
    archive.parent.mkdir(parents=True)
    archive.write_bytes(b"")
    done = iat(tmp_path, "train", "--config", DEMO, "--out", str(tmp_path / "run"),
               "--dataset", "cifar10-jpeg", "--no-data-download")
    line = one_error_line(done)
    assert str(archive) in line and "is empty (0 bytes)" in line
    # `iat data fetch` does not call an empty archive ready either
    line = one_error_line(iat(tmp_path, "data", "fetch", "cifar10-jpeg"))
    assert str(archive) in line and "is empty (0 bytes)" in line


def test_empty_and_non_gzip_cifar10_tarball_names_the_problem(tmp_path):
    archive = tmp_path / "data" / "cifar10" / "cifar-10-python.tar.gz"
    archive.parent.mkdir(parents=True)
    for content, problem in ((b"", "is empty (0 bytes)"), (b"<html>not found</html>\n", "is not a gzip file")):
        archive.write_bytes(content)
        with pytest.raises(UsageError) as err:
            load_dataset("cifar10", tmp_path / "data")
        message = str(err.value)
        assert "\n" not in message and str(archive) in message and problem in message
        assert "iat data fetch cifar10" in message


def test_empty_and_non_gzip_mnist_files_name_the_problem(tmp_path):
    folder = tmp_path / "data" / "mnist"
    folder.mkdir(parents=True)
    for content, problem in ((b"", "is empty (0 bytes)"), (b"junk, not gzip\n", "is not a gzip file")):
        for stem in MNIST_STEMS:
            (folder / f"{stem}.gz").write_bytes(content)
        done = iat(tmp_path, "train", "--config", DEMO, "--out", str(tmp_path / "run"),
                   "--no-data-download")
        line = one_error_line(done)
        assert str(folder / f"{MNIST_STEMS[0]}.gz") in line and problem in line


def test_idx_reader_says_not_gzip(tmp_path):
    path = tmp_path / "x.gz"
    path.write_bytes(b"PK\x03\x04 a zip, not a gzip")
    with pytest.raises(UsageError, match="is not a gzip file"):
        read_idx(path)
    path.write_bytes(b"")
    with pytest.raises(UsageError, match=r"is empty \(0 bytes\)"):
        read_idx(path)
