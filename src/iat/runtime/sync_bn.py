"""BatchNorm over the global batch of a multi-process run (config `distributed.sync_bn`, `--sync-bn`).

Under DDP each rank normalises with its own shard's statistics, so W ranks of batch B do not compute
what one process of batch W*B computes once a model has BatchNorm. `convert` swaps every BatchNorm
layer, in place and before the DDP wrapping, for one whose training-mode statistics are taken over
all ranks: torch's SyncBatchNorm on CUDA (it supports only CUDA/XPU inputs), `GlobalBatchNorm` below
elsewhere (CPU, gloo). Parameters and buffers are the same tensors under the same names, so the
state_dict, the optimizer and the checkpoints are those of the plain model.

Every collective sits in a training-mode forward (and its backward); the attack engine crafts on the
bare module, possibly in train-mode BN (bn_mode), but every rank runs the same crafting steps on its
shard, so the collectives stay aligned; eval-mode forwards (validation, evaluation) are plain BatchNorm.
"""
from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.nn.functional import all_reduce
from torch.nn.modules.batchnorm import _BatchNorm


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class GlobalBatchNorm(_BatchNorm):
    """BatchNorm whose training-mode mean and variance are those of the batch over all ranks.

    One differentiable all-reduce of (sum, sum of squares, count) per channel, shifted by the running
    mean (the same on every rank) so that the variance does not lose digits to cancellation; its backward
    sums the gradients of the statistics over ranks, so DDP's averaged gradient is the global batch's.
    Running statistics update as in BatchNorm (momentum, or a cumulative mean for momentum None; the
    unbiased variance of the global batch). Not training, or in a single process: plain BatchNorm.
    """

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected an input with a channel dimension, got {x.dim()}D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x normalised with the global batch's statistics in training mode (a collective), else as BatchNorm."""
        if not self.training or _world() == 1:
            return super().forward(x)
        self._check_input_dim(x)
        c = self.num_features
        dims = [0, *range(2, x.dim())]
        shape = [1, c] + [1] * (x.dim() - 2)
        xf = x.float()
        shift = (self.running_mean.detach().float() if self.running_mean is not None
                 else xf.new_zeros(c)).view(shape)
        centred = xf - shift
        count = xf.new_full((1,), x.numel() // c)
        with warnings.catch_warnings():  # deprecated in torch 2.13 in favour of a private module
            warnings.simplefilter("ignore", FutureWarning)
            stats = all_reduce(torch.cat([centred.sum(dims), (centred * centred).sum(dims), count]))
        total = stats[2 * c]
        mean_shifted = stats[:c] / total
        var = (stats[c:2 * c] / total - mean_shifted * mean_shifted).clamp_min(0)  # biased, as BN normalises
        mean = mean_shifted + shift.view(c)
        self._update_running(mean.detach(), var.detach(), total.detach())
        y = (xf - mean.view(shape)) * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)

    @torch.no_grad()
    def _update_running(self, mean: torch.Tensor, var: torch.Tensor, total: torch.Tensor) -> None:
        if not self.track_running_stats:
            return
        assert self.num_batches_tracked is not None and self.running_mean is not None and self.running_var is not None
        self.num_batches_tracked.add_(1)
        factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        unbiased = var * total / (total - 1).clamp_min(1)
        self.running_mean.mul_(1 - factor).add_(factor * mean.to(self.running_mean.dtype))
        self.running_var.mul_(1 - factor).add_(factor * unbiased.to(self.running_var.dtype))


def _global(bn: _BatchNorm) -> GlobalBatchNorm:
    new = GlobalBatchNorm(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
    if bn.affine:
        new.weight, new.bias = bn.weight, bn.bias  # the same Parameters: the optimizer's stay valid
    new.running_mean, new.running_var = bn.running_mean, bn.running_var
    new.num_batches_tracked = bn.num_batches_tracked
    new.train(bn.training)
    return new


def _replace(module: nn.Module) -> int:
    count = 0
    for name, child in module.named_children():
        if isinstance(child, _BatchNorm) and not isinstance(child, GlobalBatchNorm):
            setattr(module, name, _global(child))
            count += 1
        else:
            count += _replace(child)
    return count


def convert(model: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm layer of `model` made global-batch, in place (the model must not itself be one)."""
    if isinstance(model, _BatchNorm):
        raise ValueError("convert a model that contains BatchNorm layers, not a BatchNorm layer itself")
    if device.type in ("cuda", "xpu"):
        converted = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        assert converted is model  # children are replaced in place when the root is no BatchNorm
    else:
        _replace(model)
    return model
