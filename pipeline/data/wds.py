"""The CPU loader: per-sample CPU decoding and augmentation in DataLoader workers, two ways of drawing an epoch.

**Exact sampling** (``data.sampler = "exact"``, the default; :class:`ExactTrainLoader`):

* The epoch's order and every rank's batches come from :class:`~pipeline.data.order.SamplePlan` (the plan
  ``vitpipe order`` prints): every training sample once per epoch across all ranks (but a remainder smaller
  than one global batch), ``steps_per_epoch = samples // (world_size × batch_size)`` on every rank.
* A sampler in the training process hands each batch's sample ids to the workers (batch ``j`` to worker
  ``j mod W``, PyTorch's round robin); a worker reads each sample with one ``pread`` of its byte range
  (:mod:`pipeline.data.reader`, through at most ``data.max_open_files`` open files) and decodes it.
* One DataLoader iterator lives across epochs: the sampler runs on into the next epoch, so the batches
  prefetched at an epoch's end are the next epoch's first ones and nothing is decoded twice or thrown away.
* Each sample's augmentation draws from ``(seed, epoch, position in the epoch)``: the same whatever the
  numbers of processes and workers. Resume after ``k`` batches (``set_epoch(epoch, k)``) yields exactly
  the batches ``k, k+1, ...`` of the uninterrupted epoch, bit for bit; on another number of processes
  :meth:`ExactTrainLoader.resume_at` continues the epoch from the samples consumed.

**Stream sampling** (``data.sampler = "stream"``; :class:`TrainLoader`), for storage where random reads
are slow:

* The shard order of epoch ``e`` is a permutation drawn from ``(seed, e)``; rank ``r`` of ``R`` takes
  shards ``r::R`` of it and its worker ``w`` of ``W`` takes every ``W``-th of those, read sequentially
  through a shuffle buffer seeded from ``(seed, epoch, rank, worker)``.
* Every rank yields ``steps_per_epoch`` batches. A worker whose shards run out before the rank has its
  batches goes on with its shards of the next permutation: per epoch some samples are read twice and
  others not at all (shards of unequal size, or more workers than shards divide evenly).
* Each sample's augmentation draws from ``(seed, epoch, rank, worker, position in the worker's stream)``.
  Workers persist across epochs (``persistent_workers``); the epoch and resume position live in shared
  memory that every worker reads when the DataLoader restarts its iteration at each epoch (the batches
  prefetched beyond an epoch's end are dropped).
* Resume: ``set_epoch(epoch, skip_batches=k)`` yields exactly the batches ``k, k+1, ...`` of the
  uninterrupted epoch, bit for bit (workers drop their share of the first ``k`` batches right after the
  shuffle buffer, before decoding; after a resume the worker roles are rotated by ``k mod W``). A change
  of process count restarts the epoch.

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from data_prep.format import CLS, IMAGE_EXTS
from pipeline.data.integrity import ReadPolicy, worker_error
from pipeline.data.order import PlanError, PlannedBatch, SamplePlan
from pipeline.data.reader import SampleIndex, ShardFiles, read_sample
from pipeline.data.shards import (
    LoaderError,
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
        policy: ReadPolicy | None = None,
    ) -> None:
        self.shards, self.transform, self.resample = shards, transform, resample
        self.policy = policy or ReadPolicy()
        self.guard = self.policy.guard()
        self._expected = {s.url: s.num_samples for s in shards}
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

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int, str]]:
        worker, _ = self._worker()
        stages: list[Any] = [self._urls, self._read_shards]
        if self.train:
            rng = random.Random(seed_of(self.seed, self.epoch, self.rank, worker))
            stages += [wds.shuffle(self.shuffle_buffer, initial=min(self.shuffle_buffer, 256), rng=rng),
                       self._number_and_skip]
        stages.append(self._decode)
        yield from wds.DataPipeline(*stages)

    def _read_shards(self, urls: Iterator[str]) -> Iterator[dict[str, Any]]:
        """Each shard's samples, counted against ``dataset.json`` (a truncated, padded or unreadable shard is bad)."""
        for url in urls:
            expected, count, problem = self._expected[url], 0, None
            try:
                for sample in wds.tariterators.tarfile_samples([{"url": url}]):
                    count += 1
                    if count > expected:
                        problem = f"{url}: holds more than the {expected} samples dataset.json lists (extra members)"
                        break
                    yield sample
            except Exception as exn:  # noqa: BLE001 - any read failure makes the shard bad
                problem = f"{url}: unreadable after {count} of {expected} samples ({type(exn).__name__}: {exn})"
            if problem is None and count < expected:
                problem = f"{url}: {count} samples read, dataset.json says {expected} (truncated)"
            if problem is not None:
                self.policy.shard_bad(problem, url)

    def _decode(self, samples: Iterator[dict[str, Any]]) -> Iterator[tuple[torch.Tensor, int, str]]:
        """Transforms each sample; one that fails is skipped and counted (:class:`~.integrity.SkipGuard`)."""
        for sample in samples:
            try:
                out = self._transform(sample)
            except LoaderError:
                raise
            except Exception as exn:  # noqa: BLE001 - skip, warn (rate-limited), stop past the threshold
                self.guard.failed(exn, f"{sample.get('__key__')} of {sample.get('__url__')}")
                continue
            self.guard.ok()
            yield out

    def _number_and_skip(self, samples: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        """Drops this worker's share of the already consumed batches and seeds every later sample."""
        worker, num_workers = self._worker()
        k = self.skip_batches
        skip = ((k - worker + num_workers - 1) // num_workers if k > worker else 0) * self.batch_size
        for position, sample in enumerate(samples):
            if position >= skip:
                sample["__seed__"] = seed_of(self.seed, self.epoch, self.rank, worker, position)
                yield sample

    def _transform(self, sample: dict[str, Any]) -> tuple[torch.Tensor, int, str]:
        label = int(sample[CLS])
        with _seeded(sample.get("__seed__")):
            return self.transform(sample), label, sample["__key__"]


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
    """A rank's training batches with ``stream`` sampling; iterate once per epoch after :meth:`set_epoch`."""

    stream: ShardStream
    loader: DataLoader
    steps_per_epoch: int
    keys: bool = False
    """Add each batch's sample keys as ``"key"`` (``data.record_keys``)."""

    skip: int = 0

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Selects the epoch for the next iteration, resuming after ``skip_batches`` consumed batches."""
        self.skip = skip_batches
        self.stream.set_epoch(epoch, skip_batches, self.loader.batch_size or 1)

    def position(self, epoch: int, batches: int) -> int:
        """Samples of ``epoch`` consumed by all ranks before batch ``batches`` (what a checkpoint records)."""
        return batches * self.stream.world_size * (self.loader.batch_size or 1)

    def resume_at(self, epoch: int, samples: int, world_size: int, multiple: int = 1) -> int:
        """The batch to resume ``epoch`` at after ``samples`` consumed on ``world_size`` ranks.

        Stream sampling resumes exactly on the same number of ranks only; otherwise the epoch restarts.
        """
        if world_size != self.stream.world_size:
            logger.warning("stream sampling: %d ranks resume a checkpoint of %d: epoch %d restarts from its "
                           "beginning (data.sampler = 'exact' continues it)", self.stream.world_size, world_size,
                           epoch)
            return 0
        return samples // (world_size * (self.loader.batch_size or 1))

    def __len__(self) -> int:
        return self.steps_per_epoch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        with _one_line_errors():
            for inputs, labels, keys in itertools.islice(self.loader, self.steps_per_epoch - self.skip):
                yield {"input": inputs, "label": labels, **({"key": list(keys)} if self.keys else {})}


@contextlib.contextmanager
def _one_line_errors() -> Iterator[None]:
    """Re-raises a worker's :class:`LoaderError` with its own one-line message (not the worker's traceback)."""
    try:
        yield
    except LoaderError as err:
        raise worker_error(err) from None


class SampleBatches(Dataset):
    """Exact sampling's worker side: a :class:`~pipeline.data.order.PlannedBatch` → its decoded batch.

    Each sample is read with one ``pread`` (:func:`~pipeline.data.reader.read_sample`) and transformed
    with its augmentation seeded from ``(seed, epoch, position)``. A sample that fails to decode or
    augment is skipped with a warning (the batch is one shorter).
    """

    def __init__(self, index: SampleIndex, transform: SampleFn, *, seed: int, max_open_files: int,
                 policy: ReadPolicy | None = None) -> None:
        self.index, self.transform, self.seed = index, transform, seed
        self.files = ShardFiles(index.paths, max_open_files)
        self.policy = policy or ReadPolicy()
        self.guard = self.policy.guard()

    def __len__(self) -> int:
        return self.index.num_samples

    def __getitem__(self, batch: PlannedBatch) -> dict[str, Any]:
        inputs, labels, keys = [], [], []
        for sample_id, position in zip(batch.ids.tolist(), batch.positions.tolist(), strict=True):
            try:
                sample = read_sample(self.index, self.files, sample_id)
            except LoaderError as err:  # the shard is not what the manifest says (truncated, replaced, gone)
                path = self.index.paths[int(self.index.shard_of(np.array([sample_id]))[0])]
                self.policy.shard_bad(str(err), path)
                continue
            try:
                with _seeded(seed_of(self.seed, batch.epoch, position)):
                    inputs.append(self.transform(sample))
            except Exception as exn:  # noqa: BLE001 - skip, warn (rate-limited), stop past the threshold
                self.guard.failed(exn, f"{sample.get('__key__')} of {sample.get('__url__')}")
                continue
            self.guard.ok()
            labels.append(int(sample[CLS]))
            keys.append(sample["__key__"])
        if not inputs:
            raise LoaderError(f"every sample of batch {batch.step} of epoch {batch.epoch} failed to decode or was "
                              f"in a bad shard (first error: {self.guard.first})")
        return {"input": torch.stack(inputs), "label": torch.tensor(labels, dtype=torch.int64), "key": keys,
                "epoch": batch.epoch, "step": batch.step}


class _PlanSampler:
    """Hands the rank's planned batches to the DataLoader, from ``start`` on and across epochs."""

    def __init__(self, plan: SamplePlan) -> None:
        self.plan, self.start = plan, (0, 0)

    def __iter__(self) -> Iterator[PlannedBatch]:
        return self.plan.batches(*self.start)


@dataclass
class ExactTrainLoader:
    """A rank's training batches with ``exact`` sampling (module docstring); one iterator across epochs.

    The trainer's contract is unchanged: :meth:`set_epoch`, then iterate the epoch's batches. When the
    requested position is where the live iterator stands (the next epoch after a whole one), it goes on;
    otherwise (a resume) the iterator restarts there.
    """

    plan: SamplePlan
    loader: DataLoader
    sampler: _PlanSampler
    keys: bool = False
    """Add each batch's sample keys as ``"key"`` (``data.record_keys``)."""

    epoch: int = 0
    skip: int = 0
    restarts: int = 0
    """Iterators started so far (1 for a run that goes through its epochs without a resume)."""
    _live: Iterator[dict[str, Any]] | None = field(default=None, repr=False)
    _next: tuple[int, int] | None = None

    @property
    def steps_per_epoch(self) -> int:
        """Batches per epoch, the same on every rank."""
        return self.plan.steps_per_epoch

    @steps_per_epoch.setter
    def steps_per_epoch(self, value: int) -> None:
        if value != self.plan.steps_per_epoch:
            self._live = self._next = None  # planned batches of the old length may be in flight
        self.plan.steps_per_epoch = value

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Selects the epoch for the next iteration, resuming after ``skip_batches`` consumed batches."""
        self.epoch, self.skip = epoch, skip_batches

    def position(self, epoch: int, batches: int) -> int:
        """Samples of ``epoch`` consumed by all ranks before batch ``batches`` (what a checkpoint records)."""
        return self.plan.cursor(epoch, batches)

    def resume_at(self, epoch: int, samples: int, world_size: int, multiple: int = 1) -> int:
        """The batch to resume ``epoch`` at after ``samples`` consumed (on ``world_size`` ranks, any number).

        Pass the result to :meth:`set_epoch`; the rest of the epoch reads exactly the samples not yet read
        (in a multiple of ``multiple`` batches: :meth:`~pipeline.data.order.SamplePlan.resume_at`).
        """
        return self.plan.resume_at(epoch, samples, multiple)

    def __len__(self) -> int:
        return self.steps_per_epoch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self._live is None or self._next != (self.epoch, self.skip):
            self.sampler.start = (self.epoch, self.skip)
            self._live = iter(self.loader)
            self._next = (self.epoch, self.skip)
            self.restarts += 1
        for step in range(self.skip, self.steps_per_epoch):
            with _one_line_errors():
                raw = next(self._live)
            if (raw["epoch"], raw["step"]) != (self.epoch, step):  # the sampler and this loop disagree: a bug
                raise RuntimeError(f"loader out of step: got batch {raw['step']} of epoch {raw['epoch']}, "
                                   f"expected {step} of {self.epoch}")
            self._next = (self.epoch, step + 1) if step + 1 < self.steps_per_epoch else (self.epoch + 1, 0)
            yield {"input": raw["input"], "label": raw["label"], **({"key": raw["key"]} if self.keys else {})}


@dataclass
class EvalLoader:
    """A rank's evaluation batches as ``{"input", "label"}`` dicts (every sample once over all ranks)."""

    loader: DataLoader

    expected_samples: int = -1
    """Samples every rank together must evaluate (``dataset.json``, less skipped shards); -1: unknown."""

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        with _one_line_errors():
            for inputs, labels, _ in self.loader:
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
    sampler: Literal["exact", "stream"] = "exact",
    shuffle_shards: int = 16,
    max_open_files: int = 64,
    keys: bool = False,
    policy: ReadPolicy | None = None,
) -> TrainLoader | ExactTrainLoader:
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
        shuffle_buffer: ``stream``: samples held by each worker's shuffle buffer.
        persistent_workers: Keep the workers alive across epochs (``stream``; ``exact`` keeps one
            iterator across epochs anyway, and this keeps its workers through a resume).
        resample: ``stream``: allow fewer shards than ranks × workers by repeating shards within an epoch.
        sampler: ``exact`` (every sample once per epoch, planned by :mod:`pipeline.data.order`) or
            ``stream`` (whole shards per worker; module docstring).
        shuffle_shards: ``exact``: shards whose samples are shuffled together.
        max_open_files: ``exact``: shard files each worker keeps open.
        keys: Add each batch's sample keys as ``"key"`` (a list of ``str``).
        policy: Bad shards and decode failures (:class:`~pipeline.data.integrity.ReadPolicy`; default:
            stop on a bad shard); its ``exclude`` shards are left out of the plan.

    Returns:
        A loader yielding ``{"input": B×3×H×W (or B×3×T×H×W) uint8, "label": B int64}`` for
        ``steps_per_epoch`` batches per epoch, the same count on every rank.

    Raises:
        LoaderError: If there are fewer samples than one global batch, or (``stream``) fewer shards than
            ranks × workers and no resampling.
    """
    pin = torch.cuda.is_available()
    policy = policy or ReadPolicy()
    if sampler == "exact":
        index = SampleIndex.load(dataset_dir, split, exclude=policy.exclude)
        try:
            plan = SamplePlan(index.sizes, seed=seed, rank=rank, world_size=world_size, batch_size=batch_size,
                              block_shards=shuffle_shards)
        except PlanError as err:
            raise LoaderError(f"{split} has {index.num_samples} samples, fewer than one global batch of "
                              f"{world_size} × {batch_size}: lower data.batch_size") from err
        sampler = _PlanSampler(plan)
        dataset = SampleBatches(index, transform, seed=seed, max_open_files=max_open_files, policy=policy)
        # batch_size=None: the planned batches arrive whole; the generator only seeds the workers' base seed.
        exact = DataLoader(dataset, batch_size=None, sampler=sampler, num_workers=num_workers,
                           persistent_workers=persistent_workers and num_workers > 0, pin_memory=pin,
                           generator=torch.Generator().manual_seed(seed))
        logger.info("train loader: exact sampling, %d samples in %d shards, %d steps/epoch per rank, %d workers",
                    index.num_samples, len(index.paths), plan.steps_per_epoch, num_workers)
        return ExactTrainLoader(plan, exact, sampler, keys=keys)
    shards, _ = read_split(dataset_dir, split, policy.exclude)
    check_shards(shards, split, world_size, num_workers, resample)
    steps = steps_per_epoch(shards, split, world_size, batch_size)
    stream = ShardStream(shards, transform, rank=rank, world_size=world_size, seed=seed, train=True,
                         shuffle_buffer=shuffle_buffer, resample=resample, policy=policy)
    # Its own generator: creating an iterator then never draws from the training process's RNG.
    loader = DataLoader(stream, batch_size=batch_size, num_workers=num_workers, drop_last=True,
                        persistent_workers=persistent_workers and num_workers > 0,
                        pin_memory=pin, generator=torch.Generator().manual_seed(seed))
    logger.info("train loader: stream sampling, %d shards, %d steps/epoch per rank, %d workers", len(shards), steps,
                num_workers)
    return TrainLoader(stream, loader, steps, keys=keys)


def build_eval_loader(
    dataset_dir: str | Path,
    split: str,
    transform: SampleFn,
    *,
    batch_size: int,
    num_workers: int,
    rank: int,
    world_size: int,
    policy: ReadPolicy | None = None,
) -> EvalLoader:
    """Builds an evaluation loader: this rank's share of the split, every sample exactly once overall.

    Returns:
        Batches of ``{"input": B×3×H×W uint8 (video: B×V×3×T×H×W), "label": B int64}``; the last batch
        may be smaller and a rank may get no batch at all when the split has fewer shards than ranks.
        Its ``expected_samples`` is the split's sample count (less ``policy.exclude``'s shards).
    """
    policy = policy or ReadPolicy()
    shards, _ = read_split(dataset_dir, split, policy.exclude)
    mine = shards[rank::world_size]
    workers = min(num_workers, len(mine))
    stream = ShardStream(shards, transform, rank=rank, world_size=world_size, seed=0, train=False, policy=policy)
    loader = DataLoader(stream, batch_size=batch_size, num_workers=workers, drop_last=False,
                        pin_memory=torch.cuda.is_available(), generator=torch.Generator().manual_seed(0))
    return EvalLoader(loader, expected_samples=sum(s.num_samples for s in shards))
