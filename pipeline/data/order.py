"""Exact, elastic epochs: which sample every rank reads at every step.

This is the planning both training loaders (``data.sampler = "exact"``) and ``vitpipe order`` use; it
needs only the samples per shard (``dataset.json``), imports numpy only, and creates no per-sample Python
objects.

**The order of an epoch** is one sequence of the split's ``N`` samples, independent of the number of
processes and workers (:class:`EpochOrder`):

1. the shards are permuted with ``(seed, epoch)`` (the permutation the ``stream`` mode uses too);
2. the permuted shards are cut into blocks of ``block_shards`` consecutive shards;
3. the samples of each block are permuted with ``(seed, epoch, block)``.

Samples are named by their *id*: the position in the split's shards in file order (shard ``s`` holds ids
``starts[s] .. starts[s+1] - 1``, in tar order); ``vitpipe prep`` already shuffles the training samples
globally before sharding, so a block of a few shards is a random mixture of classes. A rank reads from
about ``block_shards`` shards at a time, which keeps its open files and page-cache footprint bounded
whatever the shard count.

**Steps.** With ``R`` ranks and batch ``B`` an epoch has ``steps = N // (R·B)`` steps; at step ``j`` the
ranks read the ``R·B`` consecutive positions from ``j·R·B`` on, rank ``r`` the ``B`` of them from
``j·R·B + r·B`` (:meth:`SamplePlan.step_ids`). Every sample is read exactly once per epoch except the
last ``N mod R·B`` positions (the drop-last remainder, a different set every epoch).

**Elastic resume.** A position in an epoch is the number of the epoch's samples consumed by all ranks
together (:meth:`SamplePlan.cursor`). A run stopped after step ``S`` on ``R0`` ranks consumed the first
``S·R0·B`` positions; on ``R`` ranks it continues from there (:meth:`SamplePlan.resume_at`), the remaining
positions cut into steps of ``R·B``, so no sample is repeated or skipped (the remainder excepted). The
steps of the resumed epoch are numbered so that the epoch still ends at ``steps_per_epoch``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

#: Tags the block-permutation seeds, so they never coincide with other draws from ``(seed, epoch, ...)``.
_BLOCK_TAG = 0x6F726472


class PlanError(ValueError):
    """Planning arguments that cannot give an epoch (e.g. fewer samples than one global batch)."""


def shard_permutation(num_shards: int, seed: int, epoch: int) -> np.ndarray:
    """The shard order of one epoch: a permutation of ``num_shards`` drawn from ``(seed, epoch)``."""
    return np.random.default_rng([seed, epoch]).permutation(num_shards)


def ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """``concatenate([arange(s, s + n) for s, n in zip(starts, lengths)])``, vectorised (int64)."""
    lengths = np.asarray(lengths, np.int64)
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, np.int64)
    before = np.cumsum(lengths) - lengths  # output position of each range's first element
    return np.repeat(np.asarray(starts, np.int64) - before, lengths) + np.arange(total, dtype=np.int64)


class EpochOrder:
    """The order of one epoch's samples (module docstring), evaluated lazily block by block.

    Args:
        sizes: Samples per shard, shards in file order.
        seed: Run seed.
        epoch: Epoch number.
        block_shards: Shards whose samples are shuffled together.
        cache_blocks: Blocks kept materialised (a sequential reader touches at most two at a time).
    """

    def __init__(self, sizes: np.ndarray, seed: int, epoch: int, block_shards: int, cache_blocks: int = 2) -> None:
        if block_shards < 1:
            raise PlanError(f"block_shards must be >= 1, got {block_shards}")
        self.sizes = np.asarray(sizes, np.int64)
        self.seed, self.epoch, self.block_shards = seed, epoch, block_shards
        self.starts = np.concatenate([[0], np.cumsum(self.sizes)])  # id of each shard's first sample
        self.total = int(self.starts[-1])
        self.shards = shard_permutation(len(self.sizes), seed, epoch)
        cum = np.concatenate([[0], np.cumsum(self.sizes[self.shards])])
        edges = np.minimum(np.arange(0, len(self.sizes) + block_shards, block_shards), len(self.sizes))
        self.block_starts = cum[np.unique(edges)]  # position of each block's first sample; last = N
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._cache_blocks = cache_blocks

    @property
    def num_blocks(self) -> int:
        """Blocks in the epoch."""
        return len(self.block_starts) - 1

    def block(self, b: int) -> np.ndarray:
        """The sample ids of block ``b`` in epoch order, int64 ``(block length,)``."""
        if b in self._cache:
            self._cache.move_to_end(b)
            return self._cache[b]
        shards = self.shards[b * self.block_shards:(b + 1) * self.block_shards]
        ids = ranges(self.starts[shards], self.sizes[shards])
        ids = ids[np.random.default_rng([self.seed, self.epoch, _BLOCK_TAG, b]).permutation(len(ids))]
        self._cache[b] = ids
        while len(self._cache) > self._cache_blocks:
            self._cache.popitem(last=False)
        return ids

    def take(self, start: int, stop: int) -> np.ndarray:
        """The sample ids at positions ``start .. stop - 1`` of the epoch, int64 ``(stop - start,)``."""
        if not 0 <= start <= stop <= self.total:
            raise PlanError(f"positions {start}..{stop} outside the epoch's {self.total} samples")
        parts, pos = [], start
        b = int(np.searchsorted(self.block_starts, start, side="right")) - 1
        while pos < stop:
            first, end = int(self.block_starts[b]), int(self.block_starts[b + 1])
            hi = min(stop, end)
            if hi > pos:
                parts.append(self.block(b)[pos - first:hi - first])
            pos, b = hi, b + 1
        return np.concatenate(parts) if len(parts) != 1 else parts[0].copy()

    def all(self) -> np.ndarray:
        """The whole epoch's order, int64 ``(N,)`` (a permutation of ``0 .. N - 1``)."""
        return np.concatenate([self.block(b) for b in range(self.num_blocks)]) if self.total else np.zeros(0, np.int64)


@dataclass(frozen=True)
class PlannedBatch:
    """One batch of one rank: what a loader reads and decodes.

    Attributes:
        epoch: Epoch it belongs to.
        step: Its index in the epoch (the loader's batch count).
        first: Position of its first sample in the epoch; sample ``i`` is at ``first + i`` (seeds its
            augmentation, so a sample is augmented alike whatever the number of processes).
        ids: Sample ids, int64 ``(B,)``.
    """

    epoch: int
    step: int
    first: int
    ids: np.ndarray

    @property
    def positions(self) -> np.ndarray:
        """Epoch positions of the samples, int64 ``(B,)``."""
        return self.first + np.arange(len(self.ids), dtype=np.int64)


class SamplePlan:
    """The exact plan of a run's epochs for one rank (and, through :meth:`step_ids`, for every rank).

    Args:
        sizes: Samples per shard of the split, shards in file order.
        seed: Run seed.
        rank: This rank (only :meth:`rank_batch` and :meth:`batches` use it).
        world_size: Number of ranks.
        batch_size: Per-rank batch size.
        block_shards: Shards whose samples are shuffled together (``data.shuffle_shards``).

    Raises:
        PlanError: If the split holds fewer samples than one global batch.
    """

    def __init__(self, sizes: np.ndarray, *, seed: int, rank: int, world_size: int, batch_size: int,
                 block_shards: int) -> None:
        self.sizes = np.asarray(sizes, np.int64)
        self.seed, self.rank, self.world_size, self.batch_size = seed, rank, world_size, batch_size
        self.block_shards = block_shards
        self.total = int(self.sizes.sum())
        self.global_batch = world_size * batch_size
        self.full_steps = self.total // self.global_batch
        if self.full_steps == 0:
            raise PlanError(f"{self.total} samples, fewer than one global batch of {world_size} × {batch_size}")
        self.steps_per_epoch = self.full_steps
        """Steps per epoch (the trainer may lower it, e.g. to a multiple of the accumulation steps)."""
        self._origins: dict[int, tuple[int, int]] = {}  # epoch -> (step, cursor) of an elastic resume
        self._orders: OrderedDict[int, EpochOrder] = OrderedDict()

    def order(self, epoch: int) -> EpochOrder:
        """The epoch's order (the last two epochs are cached)."""
        if epoch not in self._orders:
            self._orders[epoch] = EpochOrder(self.sizes, self.seed, epoch, self.block_shards)
            while len(self._orders) > 2:
                self._orders.popitem(last=False)
        return self._orders[epoch]

    def cursor(self, epoch: int, step: int) -> int:
        """Samples of ``epoch`` consumed by all ranks together before its step ``step``."""
        first, at = self._origins.get(epoch, (0, 0))
        return at + (step - first) * self.global_batch

    def steps_left(self, cursor: int) -> int:
        """Whole steps of this world size that fit in the epoch after ``cursor`` consumed samples."""
        return max(self.total - cursor, 0) // self.global_batch

    def resume_at(self, epoch: int, cursor: int, multiple: int = 1) -> int:
        """Continues ``epoch`` after ``cursor`` consumed samples, on this plan's number of ranks.

        A cursor on a step boundary of this world size keeps the uninterrupted numbering (same-size
        resume). Otherwise the remaining samples are cut into steps of ``R·B`` numbered so that the epoch
        ends at :attr:`steps_per_epoch`.

        Args:
            epoch: The epoch.
            cursor: Samples of the epoch consumed before (:meth:`cursor` of the run that stopped).
            multiple: Make the steps left a multiple of this (gradient accumulation); the samples of the
                steps this drops join the epoch's remainder.

        Returns:
            The step to continue at (what ``set_epoch(epoch, skip_batches=...)`` takes).
        """
        if not 0 <= cursor <= self.total:
            raise PlanError(f"cursor {cursor} outside the epoch's {self.total} samples")
        if cursor % self.global_batch == 0 and (cursor // self.global_batch) % multiple == 0:
            step = cursor // self.global_batch
        else:
            step = max(self.steps_per_epoch - self.steps_left(cursor) // multiple * multiple, 0)
        step = min(step, self.steps_per_epoch)
        if cursor == step * self.global_batch:
            self._origins.pop(epoch, None)  # the plain numbering
        else:
            self._origins[epoch] = (step, cursor)
        return step

    def step_ids(self, epoch: int, step: int) -> np.ndarray:
        """Every rank's sample ids at ``step`` of ``epoch``: int64 ``(R, B)``, row ``r`` for rank ``r``."""
        if not 0 <= step < self.steps_per_epoch:
            raise PlanError(f"step {step} outside the epoch's {self.steps_per_epoch} steps")
        start = self.cursor(epoch, step)
        return self.order(epoch).take(start, start + self.global_batch).reshape(self.world_size, self.batch_size)

    def rank_batch(self, epoch: int, step: int) -> PlannedBatch:
        """This rank's batch at ``step`` of ``epoch``."""
        ids = self.step_ids(epoch, step)[self.rank]
        return PlannedBatch(epoch, step, self.cursor(epoch, step) + self.rank * self.batch_size, ids)

    def batches(self, epoch: int, step: int = 0) -> Iterator[PlannedBatch]:
        """This rank's batches from ``step`` of ``epoch`` on, continuing into the next epochs (endless)."""
        while True:
            while step < self.steps_per_epoch:
                yield self.rank_batch(epoch, step)
                step += 1
            epoch, step = epoch + 1, 0

    def epoch_table(self, epoch: int, step: int = 0) -> np.ndarray:
        """Every rank's ids at every step of ``epoch`` from ``step`` on: int64 ``(steps, R, B)``."""
        steps = range(step, self.steps_per_epoch)
        if not steps:
            return np.zeros((0, self.world_size, self.batch_size), np.int64)
        return np.stack([self.step_ids(epoch, j) for j in steps])
