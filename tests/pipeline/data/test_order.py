"""Exact epochs at scale, from the loaders' own planning code (pipeline.data.order) on ImageNet-shaped shard lists.

ImageNet-1k: 1,281,167 training images in 1,282 shards of 1,000 (the last one partial); ImageNet-21k:
14,197 shards of 1,000. 64 ranks × batch 256 × 8 loader workers, as a large run has them.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from pipeline.data.order import EpochOrder, PlanError, SamplePlan, ranges
from pipeline.data.wds import _PlanSampler

IN1K = np.array([1000] * 1281 + [167])
IN21K = np.full(14_197, 1000)
RANKS, WORKERS, BATCH, BLOCK = 64, 8, 256, 16
SHAPES = {"in1k": IN1K, "in21k": IN21K}


def _plan(sizes: np.ndarray, world: int = RANKS, rank: int = 0, seed: int = 0) -> SamplePlan:
    return SamplePlan(sizes, seed=seed, rank=rank, world_size=world, batch_size=BATCH, block_shards=BLOCK)


def _counts(total: int, *tables: np.ndarray) -> np.ndarray:
    return np.bincount(np.concatenate([t.ravel() for t in tables]), minlength=total)


@pytest.mark.parametrize("shape", SHAPES)
def test_every_sample_once_per_epoch_equal_steps_and_a_new_order_each_epoch(shape: str) -> None:
    sizes = SHAPES[shape]
    total = int(sizes.sum())
    plan = _plan(sizes)
    steps = total // (RANKS * BATCH)
    assert plan.steps_per_epoch == steps == {"in1k": 78, "in21k": 866}[shape]
    epochs = [plan.epoch_table(e) for e in (0, 1)]
    for table in epochs:
        assert table.shape == (steps, RANKS, BATCH)  # every rank: the same number of full batches
        counts = _counts(total, table)
        assert counts.max() == 1  # no sample twice
        assert total - counts.sum() == total % (RANKS * BATCH) < RANKS * BATCH  # missing: the remainder only
    assert not np.array_equal(epochs[0], epochs[1])
    mine = [epochs[e][:, 5].ravel() for e in (0, 1)]  # rank 5 reads other samples next epoch
    assert len(np.intersect1d(mine[0], mine[1])) < 0.05 * len(mine[0])
    rest = [_counts(total, t) == 0 for t in epochs]
    assert not np.array_equal(rest[0], rest[1])  # the remainder is a different set each epoch


@pytest.mark.parametrize("shape", SHAPES)
def test_resume_mid_epoch_on_48_ranks_completes_the_epoch(shape: str) -> None:
    sizes = SHAPES[shape]
    total = int(sizes.sum())
    before = _plan(sizes).epoch_table(2)
    stop = before.shape[0] // 2  # stopped after this many steps on 64 ranks
    after_plan = _plan(sizes, world=48)
    start = after_plan.resume_at(2, stop * RANKS * BATCH)
    after = after_plan.epoch_table(2, start)
    assert after.shape == (after_plan.steps_per_epoch - start, 48, BATCH)  # equal steps on the 48 ranks
    counts = _counts(total, before[:stop], after)
    assert counts.max() == 1  # nothing repeated
    assert total - counts.sum() < 48 * BATCH  # nothing skipped but the new remainder
    assert total - counts.sum() == (total - stop * RANKS * BATCH) % (48 * BATCH)
    # and the 48-rank loaders' own per-rank streams follow that table, into the next epoch
    for rank in (0, 47):
        stream = _plan(sizes, world=48, rank=rank)
        assert stream.resume_at(2, stop * RANKS * BATCH) == start
        got = [next(b) for b in [stream.batches(2, start)] for _ in range(3)]
        assert [g.step for g in got] == [start, start + 1, start + 2]
        assert all(np.array_equal(g.ids, after[i, rank]) for i, g in enumerate(got))


def test_same_size_resume_keeps_the_uninterrupted_numbering() -> None:
    plan = _plan(IN1K)
    full = plan.epoch_table(4)
    assert plan.resume_at(4, 30 * RANKS * BATCH) == 30
    assert np.array_equal(plan.epoch_table(4, 30), full[30:])
    assert plan.cursor(4, 30) == 30 * RANKS * BATCH


@pytest.mark.filterwarnings("ignore:This DataLoader will create 8 worker processes")  # 8 workers on a small CPU
def test_rank_streams_and_eight_real_workers_follow_the_plan_across_epochs() -> None:
    """The loader's sampler under a real DataLoader with 8 workers: batches arrive in plan order, epoch 0
    then epoch 1 from one iterator (nothing dropped at the boundary)."""
    class Ids(Dataset):
        def __len__(self) -> int:
            return int(IN1K.sum())

        def __getitem__(self, batch):  # noqa: ANN001, ANN204 - a PlannedBatch in, its ids out
            return {"ids": torch.from_numpy(batch.ids), "epoch": batch.epoch, "step": batch.step}

    table = _plan(IN1K).epoch_table(0)
    nxt = _plan(IN1K).epoch_table(1)
    rank = 63
    plan = _plan(IN1K, rank=rank)
    sampler = _PlanSampler(plan)
    sampler.start = (0, 70)
    loader = DataLoader(Ids(), batch_size=None, sampler=sampler, num_workers=WORKERS)
    got = [b for _, b in zip(range(12), loader, strict=False)]  # steps 70..77 of epoch 0, then 0..3 of epoch 1
    assert [(b["epoch"], b["step"]) for b in got] == [(0, s) for s in range(70, 78)] + [(1, s) for s in range(4)]
    want = [table[s, rank] for s in range(70, 78)] + [nxt[s, rank] for s in range(4)]
    assert all(np.array_equal(b["ids"].numpy(), w) for b, w in zip(got, want, strict=True))


def test_a_step_reads_a_bounded_number_of_shards() -> None:
    """Locality: a rank's batch comes from at most two blocks of 16 shards, a whole step (64 ranks, 16,384
    samples: one block and a bit) from at most three, whatever the shard count."""
    plan = _plan(IN21K)
    shard = np.searchsorted(plan.order(0).starts, plan.epoch_table(0)[:200], side="right") - 1  # steps×R×B
    per_batch = [len(np.unique(batch)) for step in shard for batch in step]
    per_step = [len(np.unique(step)) for step in shard]
    assert max(per_batch) <= 2 * BLOCK and max(per_step) <= 3 * BLOCK


def test_take_is_a_slice_of_the_whole_order_and_seeds_matter() -> None:
    sizes = np.array([5, 0, 7, 3, 9, 1, 4])  # an empty shard too
    order = EpochOrder(sizes, seed=3, epoch=1, block_shards=2)
    whole = order.all()
    assert np.array_equal(np.sort(whole), np.arange(sizes.sum()))
    rng = np.random.default_rng(0)
    for _ in range(50):
        a, b = sorted(rng.integers(0, sizes.sum() + 1, 2))
        assert np.array_equal(order.take(a, b), whole[a:b])
    assert not np.array_equal(whole, EpochOrder(sizes, seed=4, epoch=1, block_shards=2).all())
    assert np.array_equal(ranges(np.array([10, 3]), np.array([2, 3])), [10, 11, 3, 4, 5])
    with pytest.raises(PlanError, match="fewer than one global batch"):
        SamplePlan(sizes, seed=0, rank=0, world_size=4, batch_size=8, block_shards=2)


def test_elastic_resume_keeps_gradient_accumulation_whole() -> None:
    plan = _plan(IN1K, world=48)
    plan.steps_per_epoch = plan.full_steps // 4 * 4  # what the trainer sets with 4 accumulation steps
    cursor = 17 * RANKS * BATCH  # 17 steps of 64 ranks: not a step boundary of 48 ranks
    start = plan.resume_at(0, cursor, multiple=4)
    assert (plan.steps_per_epoch - start) % 4 == 0 and plan.cursor(0, start) == cursor
    left = plan.total - cursor - (plan.steps_per_epoch - start) * 48 * BATCH
    assert 0 <= left < 4 * 48 * BATCH  # what accumulation drops joins the remainder
