"""The multi-scale batch sampler: resolutions, batch sizes, sharding and coverage."""

from __future__ import annotations

from collections import Counter

import pytest

from mvcompile.train.sampler import (
    MultiScaleBatchSampler,
    batch_size_for,
    eval_batches,
    scaled_resolutions,
)

A, B = (2, 2, 2), (8, 4, 2)


def test_paper_set_snaps_to_sizes_the_network_accepts() -> None:
    # {160,192,256,288,320}: 160 and 288 are not multiples of 64; ties go toward the base.
    assert scaled_resolutions(256, A) == (192, 256, 320)
    assert scaled_resolutions(256, B) == (192, 256, 320)
    assert scaled_resolutions(128, A) == (64, 128)
    assert scaled_resolutions(64, A) == (64,)
    assert scaled_resolutions(512, A) == (320, 384, 512, 576, 640)
    with pytest.raises(ValueError, match="base resolution 100"):
        scaled_resolutions(100, A)


def test_batch_size_keeps_pixels_per_batch_about_constant() -> None:
    assert batch_size_for(256, 256, 128) == 128
    assert batch_size_for(192, 256, 128) == 227  # ⌊128·(256/192)²⌋
    assert batch_size_for(320, 256, 128) == 81
    assert batch_size_for(1024, 64, 2) == 1  # never zero
    for r in (192, 256, 320):
        pixels = batch_size_for(r, 256, 128) * r * r
        assert abs(pixels - 128 * 256 * 256) <= r * r


def _sampler(n: int, rank: int = 0, world: int = 2, seed: int = 5) -> MultiScaleBatchSampler:
    return MultiScaleBatchSampler(n, base_batch=4, base_resolution=256,
                                  resolutions=(192, 256, 320), seed=seed, rank=rank,
                                  world_size=world)


def _epoch(sampler: MultiScaleBatchSampler, epoch: int) -> list[list[tuple[int, int, int]]]:
    sampler.set_epoch(epoch)
    return list(sampler)


def test_each_batch_has_one_resolution_and_its_batch_size() -> None:
    batches = _epoch(_sampler(1001, world=1), 0)
    seen = Counter()
    for batch in batches[:-1]:
        (res,) = {r for _, r, _ in batch}
        assert len(batch) == batch_size_for(res, 256, 4)
        seen[res] += 1
    assert set(seen) == {192, 256, 320}  # all drawn
    assert len(batches) == len(_sampler(1001, world=1))


def test_ranks_are_disjoint_in_step_and_cover_every_sample() -> None:
    world, n = 3, 1000
    per_rank = [_epoch(_sampler(n, r, world), 2) for r in range(world)]
    assert len({len(b) for b in per_rank}) == 1  # same number of steps on every rank
    for step in zip(*per_rank, strict=True):
        assert len({r for batch in step for _, r, _ in batch}) == 1  # one resolution per step
        assert all(batch for batch in step)
    indices = [[i for batch in batches for i, _, _ in batch] for batches in per_rank]
    flat = [i for rank in indices for i in rank]
    assert sorted(flat) == list(range(n))  # every sample exactly once, so ranks are disjoint


def test_tail_smaller_than_world_is_padded_not_dropped() -> None:
    world = 4
    n = 4 * 7 * 10 + 1  # tiny batches so that the tail is short in most plans
    per_rank = [_epoch(MultiScaleBatchSampler(n, 1, 64, (64,), seed=0, rank=r,
                                              world_size=world), 0) for r in range(world)]
    flat = [i for batches in per_rank for batch in batches for i, _, _ in batch]
    assert set(flat) == set(range(n))
    assert len(flat) == n + world - 1  # one leftover sample, padded with three repeats
    assert {len(b) for b in per_rank} == {n // world + 1}


def test_deterministic_per_seed_and_epoch_and_shuffled_between_epochs() -> None:
    first = _epoch(_sampler(500, seed=1), 0)
    assert _epoch(_sampler(500, seed=1), 0) == first
    assert _epoch(_sampler(500, seed=1), 1) != first
    assert _epoch(_sampler(500, seed=2), 0) != first
    assert [i for i, _, _ in first[0]] != sorted(i for i, _, _ in first[0])
    seeds = [s for batch in first for _, _, s in batch]
    assert len(set(seeds)) > 0.95 * len(seeds)  # augmentation seeds differ per item


def test_eval_batches_shard_without_padding() -> None:
    shards = [eval_batches(11, 2, 64, rank=r, world_size=3) for r in range(3)]
    flat = sorted(i for shard in shards for batch in shard for i, _, _ in batch)
    assert flat == list(range(11))
    assert all(len(batch) <= 2 for shard in shards for batch in shard)


def test_bad_sharding_is_refused() -> None:
    with pytest.raises(ValueError, match="cannot be shared"):
        MultiScaleBatchSampler(1, 4, 64, (64,), world_size=2)
    with pytest.raises(ValueError, match="outside"):
        MultiScaleBatchSampler(10, 4, 64, (64,), rank=2, world_size=2)
