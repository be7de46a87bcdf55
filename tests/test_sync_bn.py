"""Global-batch BatchNorm under DDP (gloo, 2 CPU processes): with distributed.sync_bn, 2 ranks of batch B
train a BatchNorm model (cnn4, crafting in train-mode BN) as 1 process of batch 2B does, weights and running
statistics alike; without it they do not. The layer itself matches BatchNorm on the whole batch in output,
gradients and running statistics."""
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from iat import config as C
from iat.models import create_model
from iat.records import RunRecord
from iat.same_run import first_difference
from iat.runtime.checkpoint import load_checkpoint
from iat.runtime.sync_bn import GlobalBatchNorm, convert
from iat.training.trainer import Trainer

from gloo_helpers import bundle, free_port


def make_cfg(sync_bn: bool) -> C.TrainConfig:
    cfg = C.TrainConfig(method="pgd-at", model="cnn4", seed=3, device="cpu", progress=False)
    cfg.method_options = {"bn_mode": "train"}  # crafting runs the global-batch statistics too
    cfg.data = C.DataConfig(name="synthetic", val_size=32)
    cfg.optim = C.OptimConfig(epochs=1, batch_size=32, lr=0.05, schedule="constant")
    cfg.threat = C.ThreatModel(eps=8 / 255, step_size=2 / 255, steps=2)
    cfg.val = C.ValConfig(steps=1, n_examples=16, batch_size=16)
    cfg.distributed = C.DistributedConfig(sync_bn=sync_bn)
    return cfg


def _layer_case(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(8, 3, 4, 4, generator=g) * 2 + 5  # a mean far from 0: the variance must not cancel
    w = torch.randn(8, 3, 4, 4, generator=g)  # weights of the loss, so the gradient depends on every element
    return x, w


def _bn(cls: type, momentum) -> nn.Module:
    torch.manual_seed(1)
    bn = cls(3, momentum=momentum)
    nn.init.normal_(bn.weight)
    nn.init.normal_(bn.bias)
    return bn


def _layer_step(bn: nn.Module, x: torch.Tensor, w: torch.Tensor) -> dict[str, torch.Tensor]:
    x = x.clone().requires_grad_(True)
    for _ in range(2):  # two steps: the second shifts by a running mean that moved
        bn.zero_grad()
        x.grad = None
        (bn(x) * w).sum().backward()
    return {"out": bn(x).detach(), "x_grad": x.grad, "w_grad": bn.weight.grad, "b_grad": bn.bias.grad,
            "mean": bn.running_mean.clone(), "var": bn.running_var.clone()}


def _worker(rank: int, world: int, port: int, root: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    try:
        for sync_bn in (True, False):
            Trainer(make_cfg(sync_bn), Path(root) / f"sync-{sync_bn}", bundle()).fit()
        x, w = _layer_case()
        for momentum in (0.1, None):
            rows = slice(4 * rank, 4 * rank + 4)
            part = _layer_step(_bn(GlobalBatchNorm, momentum), x[rows], w[rows])
            torch.save(part, Path(root) / f"layer-{momentum}-rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def max_difference(a: Path, b: Path) -> float:
    wa, wb = (load_checkpoint(r / "checkpoints" / "last.safetensors")["model"] for r in (a, b))
    assert wa.keys() == wb.keys()  # the converted model checkpoints under the plain model's names
    return max(float((wa[k].double() - wb[k].double()).abs().max()) for k in wa if wa[k].is_floating_point())


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Path:
    """One spawn of 2 gloo ranks for the tests below: two training runs and the layer's own check."""
    root = tmp_path_factory.mktemp("two-ranks")
    mp.spawn(_worker, args=(2, free_port(), str(root)), nprocs=2, join=True)
    return root


def test_two_ranks_with_sync_bn_equal_one_process_of_2b(two_ranks, tmp_path):
    ref = tmp_path / "ref"
    Trainer(make_cfg(True), ref, bundle()).fit()  # one process: plain BatchNorm over the batch of 32
    synced, unsynced = max_difference(two_ranks / "sync-True", ref), max_difference(two_ranks / "sync-False", ref)
    print(f"max |weight or running stat| difference from 1 process: sync_bn {synced:.2e}, without {unsynced:.2e}")
    assert synced < 1e-5
    assert unsynced > 1e-3
    state = load_checkpoint(two_ranks / "sync-True" / "checkpoints" / "last.safetensors")["model"]
    plain = Trainer(make_cfg(True), tmp_path / "plain", bundle()).model
    plain.load_state_dict(state)  # strict: the plain model takes the synced run's weights for evaluation


def test_global_batch_norm_equals_batch_norm_on_the_whole_batch(two_ranks):
    """2 ranks of 4 rows against BatchNorm2d on all 8: output, input and parameter gradients, running stats."""
    x, w = _layer_case()
    for momentum in (0.1, None):
        whole = _layer_step(_bn(nn.BatchNorm2d, momentum), x, w)
        parts = [torch.load(two_ranks / f"layer-{momentum}-rank{r}.pt") for r in (0, 1)]
        for key in ("out", "x_grad"):  # the backward all-reduce gives each row the whole loss's gradient
            assert torch.allclose(torch.cat([p[key] for p in parts]), whole[key], atol=1e-5), key
        for key in ("w_grad", "b_grad"):  # each rank holds its rows' part; DDP sums (averages) them
            assert torch.allclose(parts[0][key] + parts[1][key], whole[key], atol=1e-4), key
        for key in ("mean", "var"):
            assert torch.allclose(parts[0][key], whole[key], atol=1e-5), key
            assert torch.equal(parts[0][key], parts[1][key]), key


def test_convert_keeps_names_and_tensors_and_falls_back_to_batch_norm_in_one_process():
    model = create_model("cnn4", num_classes=10, in_channels=1, input_size=8)
    before = dict(model.state_dict(keep_vars=True))
    params = list(model.parameters())
    x = torch.rand(4, 1, 8, 8)
    model.train()
    expected = model(x)
    assert convert(model, torch.device("cpu")) is model
    assert any(isinstance(m, GlobalBatchNorm) for m in model.modules())
    after = model.state_dict(keep_vars=True)
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)
    assert all(a is b for a, b in zip(model.parameters(), params))  # the optimizer's parameters stay valid
    assert torch.allclose(model(x), expected)  # no process group: plain BatchNorm


def test_an_older_run_without_the_setting_is_the_same_run():
    new = C.to_dict(C.TrainConfig())
    old = {k: v for k, v in new.items() if k != "distributed"}
    assert first_difference(RunRecord(config=old), RunRecord(config=new)) is None
    synced = C.to_dict(C.TrainConfig(distributed=C.DistributedConfig(sync_bn=True)))
    assert "distributed.sync_bn" in first_difference(RunRecord(config=old), RunRecord(config=synced))
