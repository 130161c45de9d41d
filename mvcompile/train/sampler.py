"""Multi-scale batch sampler (MobileViT paper §3.2; ml-cvnets' ``VariableBatchSampler``).

Each batch draws a resolution r from a set S and takes b(r) images, so that the pixels per
batch stay about constant:

    b(r) = max(1, ⌊b₀ · (r₀ / r)²⌋)        (b₀ images at the base resolution r₀)

The paper's set is S = {160, 192, 256, 288, 320} at r₀ = 256. For another base the set is
scaled by r₀/256; every size is then snapped to the nearest resolution the network accepts
(:func:`mvcompile.graphs.mobilevit.valid_resolutions`: multiples of 64 for both patch
configs), ties going toward r₀, and duplicates dropped. So r₀ = 256 gives {192, 256, 320},
r₀ = 128 gives {64, 128} and r₀ = 64 gives {64}.

The plan of an epoch depends only on (seed, epoch): a permutation of the dataset, then global
batches of ``world_size · b(r)`` consecutive indices, each split round-robin across ranks.
Ranks therefore see disjoint samples and the same number of batches (which DDP needs), and
every sample appears in each epoch. Only when fewer than ``world_size`` samples are left at
the end is the last batch padded with samples from the start of the permutation. Every item
also carries a seed for its random augmentation, so augmentation does not depend on data
loader workers or ranks.

This module is plain Python and NumPy; it does not import torch.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from mvcompile.graphs.mobilevit import valid_resolutions

PAPER_RESOLUTIONS = (160, 192, 256, 288, 320)
PAPER_BASE = 256

Item = tuple[int, int, int]  # (dataset index, resolution, augmentation seed)


def scaled_resolutions(base: int, patch_sizes: tuple[int, ...],
                       reference: tuple[int, ...] = PAPER_RESOLUTIONS,
                       reference_base: int = PAPER_BASE) -> tuple[int, ...]:
    """The reference set scaled to ``base`` and snapped to valid sizes (see module doc)."""
    valid = valid_resolutions(patch_sizes, up_to=4 * max(base, *reference))
    if base not in valid:
        raise ValueError(f"base resolution {base} is not one of the valid sizes {valid[:6]}...")
    out = set()
    for r in reference:
        target = r * base / reference_base
        out.add(min(valid, key=lambda v, t=target: (abs(v - t), abs(v - base))))
    return tuple(sorted(out))


def batch_size_for(resolution: int, base_resolution: int, base_batch: int) -> int:
    """b(r) = max(1, ⌊b₀ · (r₀ / r)²⌋)."""
    return max(1, int(base_batch * base_resolution**2 / resolution**2))


@dataclass(frozen=True)
class GlobalBatch:
    """One step for all ranks: a resolution, the indices and their augmentation seeds."""

    resolution: int
    indices: np.ndarray
    seeds: np.ndarray


class MultiScaleBatchSampler:
    """Yields this rank's batches as lists of (index, resolution, seed); use as a DataLoader
    ``batch_sampler``. Call :meth:`set_epoch` before each epoch."""

    def __init__(self, num_samples: int, base_batch: int, base_resolution: int,
                 resolutions: tuple[int, ...], *, seed: int = 0, rank: int = 0,
                 world_size: int = 1) -> None:
        if num_samples < world_size:
            raise ValueError(f"{num_samples} samples cannot be shared by {world_size} ranks")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.num_samples = num_samples
        self.base_batch = base_batch
        self.base_resolution = base_resolution
        self.resolutions = tuple(resolutions)
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def plan(self, epoch: int) -> list[GlobalBatch]:
        """Every global batch of ``epoch``, identical on all ranks."""
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(self.num_samples)
        batches, pos = [], 0
        while pos < self.num_samples:
            res = int(rng.choice(self.resolutions))
            size = self.world_size * batch_size_for(res, self.base_resolution, self.base_batch)
            chunk = order[pos:pos + size]
            pos += size
            if len(chunk) < self.world_size:  # pad so that every rank gets a sample
                chunk = np.concatenate([chunk, order[:self.world_size - len(chunk)]])
            seeds = rng.integers(0, 2**31 - 1, size=len(chunk))
            batches.append(GlobalBatch(res, chunk, seeds))
        return batches

    def num_batches(self, epoch: int) -> int:
        return len(self.plan(epoch))

    def __len__(self) -> int:
        return self.num_batches(self.epoch)

    def __iter__(self) -> Iterator[list[Item]]:
        for batch in self.plan(self.epoch):
            mine = slice(self.rank, None, self.world_size)
            yield [(int(i), batch.resolution, int(s))
                   for i, s in zip(batch.indices[mine], batch.seeds[mine], strict=True)]


def eval_batches(num_samples: int, batch_size: int, resolution: int, *, rank: int = 0,
                 world_size: int = 1) -> list[list[Item]]:
    """This rank's share of the validation set, in order, unpadded, at one resolution."""
    mine = list(range(rank, num_samples, world_size))
    return [[(i, resolution, 0) for i in mine[s:s + batch_size]]
            for s in range(0, len(mine), batch_size)]
