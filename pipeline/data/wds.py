"""The CPU loader: WebDataset shards → per-epoch shard shuffle → split by rank and worker → batches.

Epoch contract (training):

* An epoch is ``steps_per_epoch = train_samples // (world_size × batch_size)`` batches on every
  rank, so every rank takes the same number of optimizer steps and DDP never waits at an epoch end.
* The shard order of epoch ``e`` is a permutation drawn from ``(seed, e)``; rank ``r`` of ``R`` takes
  shards ``r::R`` of it and its worker ``w`` of ``W`` takes every ``W``-th of those.
* Each worker reads its shards through a shuffle buffer seeded from ``(seed, epoch, rank, worker)``.
  A worker whose shards run out before the rank has its batches goes on with its shards of the
  next permutation, so shards of unequal size repeat a few samples instead of stalling a rank.
* Each sample's augmentation draws from its own seed, derived from ``(seed, epoch, rank, worker,
  position in the worker's stream)``; nothing depends on process-global random state.

Workers persist across epochs (``persistent_workers``): the epoch and resume position live in
shared memory that every worker reads when the DataLoader restarts its iteration, so an epoch
boundary costs no process start-up.

Resume: ``set_epoch(epoch, skip_batches=k)`` yields exactly the batches ``k, k+1, ...`` that an
uninterrupted epoch would have yielded, bit for bit. Workers drop their share of the first ``k``
batches right after the shuffle buffer, before decoding (batch ``j`` of an epoch comes from worker
``j mod W``: PyTorch's DataLoader fetches from its workers in turn, so after a resume the worker
roles are rotated by ``k mod W``). Nothing is repeated or lost.

Evaluation reads every sample exactly once: ranks and workers split the shards in a fixed order.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import logging
import multiprocessing
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_prep.format import CLS, IMAGE_EXTS
from pipeline.data.shards import (
    Shard,
    check_shards,
    epoch_shard_order,
    read_split,
    seed_of,
    steps_per_epoch,
)

logger = logging.getLogger(__name__)


SampleFn = Callable[[dict[str, Any]], torch.Tensor]
"""Turns one raw sample (``{"__key__", "jpg" | "mp4" | ..., "cls", "json"}``, bytes) into its input tensor."""


def image_sample_fn(transform: Callable[[Any], torch.Tensor]) -> SampleFn:
    """Decodes a sample's ``jpg``/``png`` component with PIL and applies ``transform`` to the RGB image."""
    def apply(sample: dict[str, Any]) -> torch.Tensor:
        data = next((sample[ext] for ext in IMAGE_EXTS if ext in sample), None)
        if data is None:
            raise KeyError(f"sample {sample.get('__key__')} has no jpg/png component")
        with Image.open(io.BytesIO(data)) as image:
            return transform(image.convert("RGB"))
    return apply


class ShardStream(IterableDataset):
    """Decoded, transformed ``(input, label)`` samples of one rank, split over loader workers."""

    def __init__(
        self,
        shards: list[Shard],
        transform: SampleFn,
        *,
        rank: int,
        world_size: int,
        seed: int,
        train: bool,
        shuffle_buffer: int = 1000,
        resample: bool = False,
    ) -> None:
        self.shards, self.transform, self.resample = shards, transform, resample
        self.rank, self.world_size, self.seed, self.train = rank, world_size, seed, train
        self.shuffle_buffer = shuffle_buffer
        self._state = multiprocessing.RawArray("q", 3)  # epoch, skip_batches, batch_size; shared with workers
        self.set_epoch(0)

    @property
    def epoch(self) -> int:
        """Epoch of the next iteration."""
        return int(self._state[0])

    @property
    def skip_batches(self) -> int:
        """Batches of that epoch already consumed (resume)."""
        return int(self._state[1])

    @property
    def batch_size(self) -> int:
        """The loader's batch size (to turn batches into samples)."""
        return int(self._state[2])

    def set_epoch(self, epoch: int, skip_batches: int = 0, batch_size: int = 1) -> None:
        """Selects the epoch of the next iteration and how many of its batches were already consumed.

        Persistent workers read these values when the next iteration starts.
        """
        self._state[0], self._state[1], self._state[2] = epoch, skip_batches, batch_size

    def _worker(self) -> tuple[int, int]:
        """Returns (logical worker id, number of workers).

        After ``k`` consumed batches the DataLoader's first worker plays the part of worker ``k mod W``,
        whose batch comes next in the uninterrupted order.
        """
        info = get_worker_info()
        if info is None:
            return 0, 1
        return (info.id + self.skip_batches) % info.num_workers, info.num_workers

    def _my_shards(self, epoch: int) -> list[Shard]:
        worker, num_workers = self._worker()
        if not self.train:
            return self.shards[self.rank :: self.world_size][worker::num_workers]
        order = epoch_shard_order(self.shards, self.seed, epoch)
        lap = 1
        while self.resample and len(order) < self.world_size * num_workers:  # too few shards: repeat them
            order += epoch_shard_order(self.shards, self.seed + 7919 * lap, epoch)
            lap += 1
        return order[self.rank :: self.world_size][worker::num_workers]

    def _urls(self) -> Iterator[str]:
        if not self.train:
            yield from (s.url for s in self._my_shards(self.epoch))
            return
        for lap in itertools.count():  # wrap into the next permutation rather than run dry
            yield from (s.url for s in self._my_shards(self.epoch + lap))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int]]:
        worker, _ = self._worker()
        stages: list[Any] = [lambda: ({"url": url} for url in self._urls()),
                             wds.tarfile_to_samples(handler=wds.warn_and_continue)]
        if self.train:
            rng = random.Random(seed_of(self.seed, self.epoch, self.rank, worker))
            stages += [wds.shuffle(self.shuffle_buffer, initial=min(self.shuffle_buffer, 256), rng=rng),
                       self._number_and_skip]
        stages.append(wds.map(self._transform, handler=_skip_and_count))
        yield from wds.DataPipeline(*stages)

    def _number_and_skip(self, samples: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        """Drops this worker's share of the already consumed batches and seeds every later sample."""
        worker, num_workers = self._worker()
        k = self.skip_batches
        skip = ((k - worker + num_workers - 1) // num_workers if k > worker else 0) * self.batch_size
        for position, sample in enumerate(samples):
            if position >= skip:
                sample["__seed__"] = seed_of(self.seed, self.epoch, self.rank, worker, position)
                yield sample

    def _transform(self, sample: dict[str, Any]) -> tuple[torch.Tensor, int]:
        label = int(sample[CLS])
        with _seeded(sample.get("__seed__")):
            return self.transform(sample), label


def _skip_and_count(exn: Exception) -> bool:
    """Skips a sample that fails to decode or augment, with a warning (the stream goes on)."""
    logger.warning("skipped a sample that failed to decode or augment: %r", exn)
    return True


@contextlib.contextmanager
def _seeded(seed: int | None) -> Iterator[None]:
    """Seeds torch's, Python's and NumPy's global RNGs for one sample's augmentation, restoring them afterwards.

    All three are needed: torchvision draws from torch, timm's RandAugment picks its operations with
    ``numpy.random`` and draws magnitudes with ``random``.
    """
    if seed is None:
        yield
        return
    state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)  # CPU only: torch.manual_seed also queues accelerator seeding
        random.seed(seed)
        np.random.seed(seed)
        try:
            yield
        finally:
            random.setstate(state)
            np.random.set_state(np_state)


@dataclass
class TrainLoader:
    """A rank's training batches; iterate once per epoch after :meth:`set_epoch`."""

    stream: ShardStream
    loader: DataLoader
    steps_per_epoch: int

    skip: int = 0

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Selects the epoch for the next iteration, resuming after ``skip_batches`` consumed batches."""
        self.skip = skip_batches
        self.stream.set_epoch(epoch, skip_batches, self.loader.batch_size or 1)

    def __len__(self) -> int:
        return self.steps_per_epoch

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for inputs, labels in itertools.islice(self.loader, self.steps_per_epoch - self.skip):
            yield {"input": inputs, "label": labels}


@dataclass
class EvalLoader:
    """A rank's evaluation batches as ``{"input", "label"}`` dicts (every sample once over all ranks)."""

    loader: DataLoader

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for inputs, labels in self.loader:
            yield {"input": inputs, "label": labels}


def build_train_loader(
    dataset_dir: str | Path,
    split: str,
    transform: SampleFn,
    *,
    batch_size: int,
    num_workers: int,
    rank: int,
    world_size: int,
    seed: int,
    shuffle_buffer: int,
    persistent_workers: bool = True,
    resample: bool = False,
) -> TrainLoader:
    """Builds the training loader of one rank.

    Args:
        dataset_dir: Directory written by ``vitpipe prep``.
        split: Split to read.
        transform: Raw sample → input tensor (:func:`image_sample_fn` or a video sample function).
        batch_size: Per-rank batch size.
        num_workers: DataLoader worker processes (0: decode in this process).
        rank: This rank.
        world_size: Number of ranks.
        seed: Run seed (with the epoch it fixes the order and the augmentation).
        shuffle_buffer: Samples held by each worker's shuffle buffer.
        persistent_workers: Keep the workers alive across epochs.
        resample: Allow fewer shards than ranks × workers by repeating shards within an epoch.

    Returns:
        A loader yielding ``{"input": B×3×H×W (or B×3×T×H×W) uint8, "label": B int64}`` for
        ``steps_per_epoch`` batches per epoch, the same count on every rank.

    Raises:
        LoaderError: If there are fewer shards than ranks × workers (and no resampling) or fewer
            samples than one global batch.
    """
    shards, _ = read_split(dataset_dir, split)
    check_shards(shards, split, world_size, num_workers, resample)
    steps = steps_per_epoch(shards, split, world_size, batch_size)
    stream = ShardStream(shards, transform, rank=rank, world_size=world_size, seed=seed, train=True,
                         shuffle_buffer=shuffle_buffer, resample=resample)
    # Its own generator: creating an iterator then never draws from the training process's RNG.
    loader = DataLoader(stream, batch_size=batch_size, num_workers=num_workers, drop_last=True,
                        persistent_workers=persistent_workers and num_workers > 0,
                        pin_memory=torch.cuda.is_available(), generator=torch.Generator().manual_seed(seed))
    logger.info("train loader: %d shards, %d steps/epoch per rank, %d workers", len(shards), steps, num_workers)
    return TrainLoader(stream, loader, steps)


def build_eval_loader(
    dataset_dir: str | Path,
    split: str,
    transform: SampleFn,
    *,
    batch_size: int,
    num_workers: int,
    rank: int,
    world_size: int,
) -> EvalLoader:
    """Builds an evaluation loader: this rank's share of the split, every sample exactly once overall.

    Returns:
        Batches of ``{"input": B×3×H×W uint8 (video: B×V×3×T×H×W), "label": B int64}``; the last batch
        may be smaller and a rank may get no batch at all when the split has fewer shards than ranks.
    """
    shards, _ = read_split(dataset_dir, split)
    mine = shards[rank::world_size]
    workers = min(num_workers, len(mine))
    stream = ShardStream(shards, transform, rank=rank, world_size=world_size, seed=0, train=False)
    return EvalLoader(DataLoader(stream, batch_size=batch_size, num_workers=workers, drop_last=False,
                                 pin_memory=torch.cuda.is_available(), generator=torch.Generator().manual_seed(0)))
