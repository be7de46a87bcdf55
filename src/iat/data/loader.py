"""BatchLoader: reproducible, device-resident mini-batches with whole-batch crop/flip augmentation.

Everything random about an epoch (order, crop offsets, flips) is drawn up front on a CPU generator
seeded from (seed, epoch). Hence a resumed run that restarts at batch k sees exactly the batches it
would have seen, a GPU run sees the same examples as a CPU run, and W ranks with batch B see the same
augmented examples as one rank with batch W*B.
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from ..errors import UsageError
from .core import Split


def epoch_seed(seed: int, epoch: int) -> int:
    """A 63-bit seed for (seed, epoch); hashed so nearby pairs get unrelated streams."""
    digest = hashlib.sha256(f"iat-batches:{int(seed)}:{int(epoch)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def crop_flip(x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, flip: torch.Tensor, pad: int) -> torch.Tensor:
    """Random-crop (zero padding `pad`) and optionally mirror each image of a batch, with one gather.

    x: [B, C, H, W]; dy, dx: [B] offsets in [0, 2*pad]; flip: [B] bool. Returns a new [B, C, H, W].
    """
    b, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad)) if pad else x
    rows = dy[:, None] + torch.arange(h, device=x.device)  # [B, H]
    cols = torch.arange(w, device=x.device).expand(b, w)
    cols = torch.where(flip[:, None], w - 1 - cols, cols) + dx[:, None]  # [B, W]
    bi = torch.arange(b, device=x.device)[:, None, None, None]
    ci = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[bi, ci, rows[:, None, :, None], cols[:, None, None, :]]


def _positive_int(name: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise UsageError(f"{name} must be an integer >= {low}, got {value!r}")
    return value


class BatchLoader:
    """Mini-batches of a Split as (x float32 in [0, 1] NCHW, y int64), both on `device`.

    The split is copied to the device once as uint8 and each batch is converted there (/255).
    Global batch i is perm[i*B*W : (i+1)*B*W] (B = batch_size per rank, W = world_size); rank r takes
    its r-th contiguous share. Without drop_last the last global batch may be short; it is then shared
    as evenly as possible, and every rank still yields the same number of batches (possibly an empty
    one) so that collective operations stay in step.

    Augmentation (augment=True): random crop with `crop_padding` zero pixels each side, then a
    horizontal flip with probability 0.5 (if `flip`).
    """

    def __init__(self, split: Split, batch_size: int, *, shuffle: bool, seed: int = 0, augment: bool = False,
                 crop_padding: int = 4, flip: bool = True, device: torch.device | str = "cpu",
                 drop_last: bool = False, rank: int = 0, world_size: int = 1) -> None:
        self.batch_size = _positive_int("batch_size", batch_size, 1)
        self.world_size = _positive_int("world_size", world_size, 1)
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
            raise UsageError(f"rank must be an integer in [0, {world_size}), got {rank!r}")
        self.crop_padding = _positive_int("crop_padding", crop_padding, 0)
        n = len(split)
        if n == 0:
            raise UsageError("cannot make batches of an empty split")
        total = batch_size * world_size
        if drop_last and total > n:
            per_rank = f" ({batch_size} per rank x {world_size} ranks)" if world_size > 1 else ""
            raise UsageError(
                f"batch size {total}{per_rank} is larger than the data set ({n} examples); "
                "lower the batch size or set drop_last=False"
            )
        self.n, self.rank, self.seed = n, rank, seed
        self.shuffle, self.augment, self.flip, self.drop_last = shuffle, augment, flip, drop_last
        self.device = torch.device(device)
        self.x = split.x.to(self.device)
        self.y = split.y.to(self.device)
        self.epoch = 0

    def __len__(self) -> int:
        total = self.batch_size * self.world_size
        return self.n // total if self.drop_last else -(-self.n // total)

    def set_epoch(self, epoch: int) -> None:
        """Make the next `iter(loader)` run epoch `epoch` (for resuming)."""
        self.epoch = int(epoch)

    def _draws(self, epoch: int) -> tuple[torch.Tensor, ...]:
        """Order and augmentation draws for one epoch, indexed by position in the epoch's order."""
        g = torch.Generator().manual_seed(epoch_seed(self.seed, epoch))
        perm = torch.randperm(self.n, generator=g) if self.shuffle else torch.arange(self.n)
        if not self.augment:
            return (perm.to(self.device),)
        # Drawn after the order, so switching augmentation on does not change which examples go together.
        offsets = torch.randint(0, 2 * self.crop_padding + 1, (2, self.n), generator=g)
        flips = torch.rand(self.n, generator=g) < 0.5
        if not self.flip:
            flips = torch.zeros_like(flips)
        return tuple(t.to(self.device) for t in (perm, offsets[0], offsets[1], flips))

    def _rank_share(self, i: int) -> tuple[int, int]:
        """Positions [lo, hi) of this rank's share of global batch i."""
        start = i * self.batch_size * self.world_size
        size = min(self.batch_size * self.world_size, self.n - start)
        q, r = divmod(size, self.world_size)
        lo = start + self.rank * q + min(self.rank, r)
        return lo, lo + q + (1 if self.rank < r else 0)

    def batches(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield this rank's batches of `epoch`, from batch `start` on; a pure function of (seed, epoch)."""
        if isinstance(start, bool) or not isinstance(start, int) or not 0 <= start <= len(self):
            raise UsageError(f"start must be an integer in [0, {len(self)}], got {start!r}")
        draws = self._draws(epoch)
        for i in range(start, len(self)):
            lo, hi = self._rank_share(i)
            idx = draws[0][lo:hi]
            xb = self.x[idx]
            if self.augment:
                xb = crop_flip(xb, draws[1][lo:hi], draws[2][lo:hi], draws[3][lo:hi], self.crop_padding)
            yield xb.float().div_(255), self.y[idx]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One epoch; the epoch counter advances only after a full pass."""
        epoch = self.epoch
        yield from self.batches(epoch)
        self.epoch = epoch + 1
