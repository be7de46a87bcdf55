"""Core data API: containers, registry entry points, synthetic data, train/val split and BatchLoader."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from iat.data import (
    DATASETS,
    BatchLoader,
    DataBundle,
    Split,
    default_root,
    fetch_dataset,
    load_dataset,
    train_val_split,
)
from iat.data.core import make_bundle
from iat.data.loader import crop_flip
from iat.errors import UsageError


def make_split(n: int = 40, channels: int = 3, size: int = 8, num_classes: int = 4) -> Split:
    x = (torch.arange(n * channels * size * size) * 7 % 256).to(torch.uint8).reshape(n, channels, size, size)
    return Split(x, torch.arange(n) % num_classes)


def test_registry_lists_every_data_set():
    expected = {"mnist", "fashion-mnist", "cifar10", "cifar100", "svhn", "imagefolder", "cifar10-jpeg", "synthetic"}
    assert expected <= set(DATASETS.names())


def test_synthetic_is_deterministic_and_well_formed():
    a = load_dataset("synthetic", channels=3, seed=1)
    b = load_dataset("synthetic", channels=3, seed=1)
    c = load_dataset("synthetic", channels=3, seed=2)
    assert torch.equal(a.train.x, b.train.x) and torch.equal(a.test.y, b.test.y)
    assert not torch.equal(a.train.x, c.train.x)
    assert a.train.x.shape == (512, 3, 16, 16) and a.train.x.dtype == torch.uint8
    assert a.test.y.dtype == torch.int64 and len(a.test) == 256
    assert a.num_classes == 4 and len(a.classes) == 4 and len(a.mean) == len(a.std) == 3
    assert all(0 < m < 1 for m in a.mean) and all(0 < s < 1 for s in a.std)
    assert torch.bincount(a.train.y).tolist() == [128] * 4


@pytest.fixture
def one_thread():
    # Tiny models run far faster on one thread, and much faster still on a busy machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_synthetic_is_learnable_in_one_epoch(one_thread):
    torch.manual_seed(0)
    data = load_dataset("synthetic")
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(),
                          nn.Linear(128, data.num_classes))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for x, y in BatchLoader(data.train, 32, shuffle=True):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    with torch.no_grad():
        accuracy = (model(data.test.x.float() / 255).argmax(1) == data.test.y).float().mean().item()
    assert accuracy > 0.8  # chance is 0.25


def test_bad_arguments_raise_usage_errors(monkeypatch):
    with pytest.raises(UsageError, match="unknown data set"):
        load_dataset("no-such-set")
    with pytest.raises(UsageError, match="does not accept"):
        load_dataset("synthetic", colour="blue")
    with pytest.raises(UsageError, match="nothing to fetch"):
        fetch_dataset("synthetic")
    with pytest.raises(UsageError, match="channels"):
        load_dataset("synthetic", channels=2)
    monkeypatch.setenv("IAT_DATA_DIR", "/some/where")
    assert str(default_root()) == "/some/where"
    monkeypatch.delenv("IAT_DATA_DIR")
    assert str(default_root()) == "data"


def test_split_and_bundle_validation():
    split = make_split()
    with pytest.raises(UsageError, match="uint8"):
        Split(split.x.float(), split.y)
    with pytest.raises(UsageError, match="int64"):
        Split(split.x, split.y.int())
    with pytest.raises(UsageError, match="40 images but 39 labels"):
        Split(split.x, split.y[:39])
    with pytest.raises(UsageError, match=r"must lie in \[0, 3\)"):
        make_bundle("t", split, split, ["a", "b", "c"], "test")
    empty = Split(split.x[:0], split.y[:0])
    with pytest.raises(UsageError, match="empty"):
        make_bundle("t", empty, split, list("abcd"), "test")
    bundle = make_bundle("t", split, split, list("abcd"), "test")
    assert isinstance(bundle, DataBundle) and bundle.num_classes == 4


def test_channel_statistics_match_float_computation():
    split = make_split()
    bundle = make_bundle("t", split, split, list("abcd"), "test")
    x = split.x.double() / 255
    assert torch.allclose(torch.tensor(bundle.mean, dtype=torch.float64), x.mean((0, 2, 3)))
    assert torch.allclose(torch.tensor(bundle.std, dtype=torch.float64), x.std((0, 2, 3), unbiased=False))


def test_train_val_split_is_deterministic_and_disjoint():
    split = Split(torch.zeros(50, 1, 2, 2, dtype=torch.uint8), torch.arange(50))
    train, val = train_val_split(split, 10, seed=3)
    train2, val2 = train_val_split(split, 10, seed=3)
    _, val3 = train_val_split(split, 10, seed=4)
    assert torch.equal(val.y, val2.y) and torch.equal(train.y, train2.y)
    assert not torch.equal(val.y, val3.y)
    assert len(train) == 40 and len(val) == 10
    assert sorted(train.y.tolist() + val.y.tolist()) == list(range(50))
    for bad in (-1, 50, 51, 2.5):
        with pytest.raises(UsageError, match="val_size"):
            train_val_split(split, bad, seed=0)


def collect(loader: BatchLoader, epoch: int, start: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(loader.batches(epoch, start))


def test_batch_loader_shapes_range_and_order():
    split = make_split(n=42)
    loader = BatchLoader(split, 8, shuffle=False)
    batches = collect(loader, 0)
    assert len(loader) == len(batches) == 6 and len(batches[-1][0]) == 2
    x, y = batches[0]
    assert x.shape == (8, 3, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert 0 <= x.min() and x.max() <= 1
    assert torch.equal(torch.cat([b[1] for b in batches]), split.y)  # no shuffle: original order
    assert torch.equal(x, split.x[:8].float() / 255)
    assert len(BatchLoader(split, 8, shuffle=False, drop_last=True)) == 5


def test_batch_loader_is_a_pure_function_of_seed_and_epoch():
    split = make_split(n=64)
    a = BatchLoader(split, 16, shuffle=True, seed=5, augment=True)
    b = BatchLoader(split, 16, shuffle=True, seed=5, augment=True)
    for (xa, ya), (xb, yb) in zip(collect(a, 2), collect(b, 2), strict=False):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(collect(a, 2)[0][1], collect(a, 3)[0][1])
    assert not torch.equal(collect(a, 2)[0][1], collect(BatchLoader(split, 16, shuffle=True, seed=6), 2)[0][1])
    # a resumed run restarting at batch k sees exactly the tail of the full epoch
    full, tail = collect(a, 4), collect(a, 4, start=2)
    assert len(tail) == 2
    for (xf, yf), (xt, yt) in zip(full[2:], tail, strict=False):
        assert torch.equal(xf, xt) and torch.equal(yf, yt)
    with pytest.raises(UsageError, match="start"):
        collect(a, 0, start=5)


def test_iteration_advances_the_epoch():
    loader = BatchLoader(make_split(n=32), 8, shuffle=True, seed=1)
    first = [y for _, y in loader]
    second = [y for _, y in loader]
    assert loader.epoch == 2
    assert torch.equal(torch.cat(first), torch.cat([y for _, y in loader.batches(0)]))
    assert torch.equal(torch.cat(second), torch.cat([y for _, y in loader.batches(1)]))


def test_augmentation_keeps_shape_and_changes_images():
    split = make_split(n=64)
    plain = collect(BatchLoader(split, 64, shuffle=False), 0)[0][0]
    flipped = collect(BatchLoader(split, 64, shuffle=False, augment=True, crop_padding=0), 0)[0][0]
    assert flipped.shape == plain.shape
    is_flipped = (flipped == plain.flip(3)).flatten(1).all(1)
    is_same = (flipped == plain).flatten(1).all(1)
    assert (is_flipped | is_same).all() and 10 < is_flipped.sum() < 54
    cropped = collect(BatchLoader(split, 64, shuffle=False, augment=True, flip=False), 0)[0][0]
    assert cropped.shape == plain.shape and not torch.equal(cropped, plain)
    assert (cropped == 0).sum() > (plain == 0).sum()  # zero padding shows at shifted borders


def test_crop_flip_matches_pad_slice_and_mirror():
    x = torch.randint(0, 256, (3, 2, 5, 6), dtype=torch.uint8)
    dy, dx = torch.tensor([0, 2, 4]), torch.tensor([4, 0, 1])
    flip = torch.tensor([False, True, True])
    out = crop_flip(x, dy, dx, flip, pad=2)
    padded = F.pad(x, (2, 2, 2, 2))
    for i in range(3):
        want = padded[i, :, dy[i]:dy[i] + 5, dx[i]:dx[i] + 6]
        assert torch.equal(out[i], want.flip(2) if flip[i] else want)


def test_two_ranks_see_what_one_rank_with_double_batch_sees():
    split = make_split(n=50)
    kw = dict(shuffle=True, seed=9, augment=True)
    single = collect(BatchLoader(split, 8, **kw), 1)
    ranks = [collect(BatchLoader(split, 4, rank=r, world_size=2, **kw), 1) for r in range(2)]
    assert len(single) == len(ranks[0]) == len(ranks[1]) == 7
    for i, (x, y) in enumerate(single):
        assert torch.equal(torch.cat([ranks[0][i][0], ranks[1][i][0]]), x)
        assert torch.equal(torch.cat([ranks[0][i][1], ranks[1][i][1]]), y)


def test_batch_loader_rejects_bad_sizes():
    split = make_split(n=10)
    with pytest.raises(UsageError, match=r"batch size 16 is larger than the data set \(10 examples\)"):
        BatchLoader(split, 16, shuffle=True, drop_last=True)
    with pytest.raises(UsageError, match="batch_size"):
        BatchLoader(split, 0, shuffle=True)
    with pytest.raises(UsageError, match="rank"):
        BatchLoader(split, 2, shuffle=True, rank=2, world_size=2)
    assert len(BatchLoader(split, 16, shuffle=True)) == 1  # one short batch is fine without drop_last


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_batches_equal_cpu_batches():
    split = make_split(n=64)
    kw = dict(shuffle=True, seed=2, augment=True)
    for (xc, yc), (xg, yg) in zip(collect(BatchLoader(split, 16, **kw), 0),
                                  collect(BatchLoader(split, 16, device="cuda", **kw), 0), strict=True):
        assert xg.is_cuda and torch.equal(xc, xg.cpu()) and torch.equal(yc, yg.cpu())


def test_class_coverage_check_flags_a_class_ordered_subset():
    from iat.evaluation.sanity import check_class_coverage

    y = torch.arange(1000) % 10
    assert check_class_coverage(y[:200], y).status == "pass"
    ordered = y.sort().values  # 100 of class 0, then 100 of class 1, ...
    warn = check_class_coverage(ordered[:200], ordered, "validation")
    assert warn.status == "warn" and warn.details["missing"] == list(range(2, 10))
    assert "2 of the 10 classes" in warn.message and "ordered by class" in warn.message
    # 12 examples may miss a class by chance (p ~ 3): no warning
    assert check_class_coverage(ordered[:12], ordered).status == "skip"


def test_trainer_warns_when_validation_examples_miss_classes(tmp_path):
    from iat import config as C
    from iat.training.trainer import Trainer

    split = make_split(n=400, num_classes=4)
    ordered = Split(split.x, split.y.sort().values)  # a custom source ordered by class
    cfg = C.TrainConfig(method="pgd-at", model="cnn", device="cpu", progress=False)
    cfg.data = C.DataConfig(name="custom", val_size=200)
    cfg.optim = C.OptimConfig(epochs=1, batch_size=32)
    cfg.val = C.ValConfig(n_examples=50)
    with pytest.warns(UserWarning, match=r"50 validation examples hold only [123] of the 4 classes"):
        Trainer(cfg, tmp_path / "ordered", make_bundle("custom", ordered, ordered, list("abcd"), "test"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same data in mixed order: silent
        Trainer(cfg, tmp_path / "mixed", make_bundle("custom", split, split, list("abcd"), "test"))


def test_class_coverage_warns_when_the_split_itself_lacks_some_of_the_models_classes():
    """iat 0.1 said PASS for a test split missing a class (it compared the subset with the split only)."""
    from iat.evaluation.sanity import check_class_coverage

    y = torch.arange(300) % 3  # classes 0, 1, 2 of a 4-class model
    assert check_class_coverage(y, y).status == "pass"
    warn = check_class_coverage(y, y, "test", num_classes=4)
    assert warn.status == "warn" and "3 of the model's 4 classes" in warn.message and warn.details["absent_from_split"] == [3]
    assert check_class_coverage(y, y, "test", num_classes=3).status == "pass"


def test_the_standards_table_names_registered_data_sets_and_their_real_statistics():
    """One table (data.standards) holds each data set's threat model and statistics; the statistics are what
    channel_stats computes on the official train split (checked where the files are present)."""
    import os
    from pathlib import Path

    from iat.data import DATASETS, STANDARDS, load_dataset, standard_stats

    assert set(STANDARDS) <= set(DATASETS.names()) and {"mnist", "fashion-mnist", "cifar10", "svhn"} <= set(STANDARDS)
    root = Path(os.environ.get("IAT_DATA_DIR", Path(__file__).resolve().parents[1] / "data"))
    checked = 0
    for name in ("mnist", "fashion-mnist"):
        if not (root / name).is_dir():
            continue
        bundle = load_dataset(name, root)
        mean, std = standard_stats(name)
        assert bundle.mean == pytest.approx(mean, abs=1e-4) and bundle.std == pytest.approx(std, abs=1e-4)
        checked += 1
    if not checked:
        pytest.skip("no MNIST or Fashion-MNIST files under data/")


def test_messages_name_the_command_to_run_not_python_arguments(tmp_path):
    """A missing data set says `iat data fetch NAME --root DIR`; no message under iat/data says download=True."""
    import ast
    from pathlib import Path

    import iat.data
    from iat.data import load_dataset

    with pytest.raises(UsageError, match=f"run `iat data fetch svhn --root {tmp_path}`"):
        load_dataset("svhn", tmp_path)
    for path in Path(iat.data.__file__).parent.glob("*.py"):
        texts = [n.value for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Constant)
                 and isinstance(n.value, str)]
        assert not [t for t in texts if "download=True" in t], path
