"""The ``dali`` backend: NVIDIA DALI decodes and augments images on the GPU (or DALI's CPU backend).

How samples reach DALI: the split manifest gives every sample's byte range (one columnar read,
:class:`~pipeline.data.reader.SampleIndex`); the bytes are read with ``pread`` through at most
``data.max_open_files`` open files and fed through ``fn.external_source`` in the order Python planned.
DALI's own webdataset reader shuffles through a fixed buffer, splits ranks by sample count and cannot skip
to a batch; planning the order here gives the contract of the ``wds`` backend:

* ``exact`` sampling (default): the :class:`~pipeline.data.order.SamplePlan` both backends and ``vitpipe
  order`` share — every sample once per epoch across ranks (but a remainder smaller than one global
  batch), resumable mid-epoch on any number of processes;
* ``stream`` sampling: epoch ``e``'s shard permutation of ``(seed, e)`` (shared with ``wds``), rank ``r``
  of ``R`` takes shards ``r::R``, its samples permuted with ``(seed, e, r)``; a rank whose shards are short
  borrows from its shards of the next epoch's permutation (:func:`epoch_plan`);
* every rank yields ``samples // (R × B)`` batches; resume after ``k`` batches starts the plan at batch
  ``k``: no sample is repeated or lost. The random augmentation draws of the rest of that epoch differ
  from an uninterrupted run (DALI's generators are seeded per pipeline, not fast-forwarded).

One training pipeline and one evaluation pipeline are built per run: the training feed runs on from one
epoch into the next (a pipeline is rebuilt only when the trainer asks for a position other than the next
one, i.e. on a resume), the evaluation feed cycles through the rank's evaluation batches.

The graph (training): ``decoders.image_random_crop`` (nvJPEG + hardware decoder on ``mixed``; the
random-resized crop is decoded as a region of interest) → bicubic ``resize`` → RandAugment (DALI's
``auto_aug.rand_augment``; timm's magnitude scale, no magnitude noise) or colour twist → flip →
``uint8`` CHW. Normalisation, random erasing and mixup/CutMix follow on the device in
:mod:`pipeline.data.batch_augment`, exactly as for ``wds``.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import warnings
from collections import deque
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from data_prep.format import load_dataset_info
from pipeline.config import DataCfg
from pipeline.data.dali_base import parse_randaugment
from pipeline.data.integrity import ReadPolicy
from pipeline.data.order import PlanError, PlannedBatch, SamplePlan, ranges
from pipeline.data.reader import SampleIndex, ShardFiles, read_media
from pipeline.data.shards import (
    LoaderError,
    Shard,
    check_shards,
    epoch_shard_order,
    seed_of,
    steps_per_epoch,
)

logger = logging.getLogger(__name__)

# Hardware-decoder memory pads from NVIDIA's ResNet-50 example: avoid reallocations on the first batches.
_DEVICE_PAD, _HOST_PAD = 211_025_920, 140_544_512


def epoch_plan(shards: list[Shard], sizes: list[int], *, seed: int, epoch: int, rank: int, world_size: int,
               count: int) -> np.ndarray:
    """The first ``count`` samples rank ``rank`` reads in epoch ``epoch``.

    Args:
        shards: All shards of the split (file order).
        sizes: Samples per shard.
        seed: Run seed.
        epoch: Epoch number.
        rank: This rank.
        world_size: Number of ranks.
        count: ``steps × batch``; taken from this epoch's shards, continuing into the next epoch's
            permutation when the rank's shards hold fewer.

    Returns:
        ``count×2`` int64 (shard position in ``shards``, sample position in the shard).
    """
    position = {s.url: i for i, s in enumerate(shards)}
    parts, have, lap = [], 0, 0
    while have < count:
        mine = [position[s.url] for s in epoch_shard_order(shards, seed, epoch + lap)[rank::world_size]]
        if not mine:
            raise LoaderError(f"rank {rank} of {world_size} gets no shard: use more shards or data.resample_shards")
        refs = np.concatenate([np.stack([np.full(sizes[i], i), np.arange(sizes[i])], 1) for i in mine])
        refs = refs[np.random.default_rng([seed, epoch + lap, rank]).permutation(len(refs))]
        parts.append(refs)
        have, lap = have + len(refs), lap + 1
    return np.concatenate(parts)[:count].astype(np.int64)


def resolve_device(cfg: DataCfg) -> str:
    """``gpu`` or ``cpu`` for ``data.dali_device`` (``auto``: the GPU when CUDA is available)."""
    if cfg.dali_device == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    if cfg.dali_device == "gpu" and not torch.cuda.is_available():
        raise LoaderError("data.dali_device = 'gpu' but CUDA is not available: use 'cpu' or 'auto'")
    return cfg.dali_device


def build_pipeline(cfg: DataCfg, source: object, *, train: bool, device: str, batch_size: int, seed: int,
                   device_id: int | None) -> object:
    """Builds the DALI graph for one epoch.

    Returns:
        A built ``nvidia.dali.Pipeline`` with outputs ``(images 3×S×S uint8, labels 1 int64)`` per sample.
    """
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali.auto_aug import rand_augment

    size = cfg.img_size
    decode_dev = "mixed" if device == "gpu" else "cpu"
    gpu_args = ({"hw_decoder_load": cfg.dali_hw_decoder_load, "device_memory_padding": _DEVICE_PAD,
                 "host_memory_padding": _HOST_PAD} if device == "gpu" else {})

    @pipeline_def(batch_size=batch_size, num_threads=cfg.dali_threads, device_id=device_id, seed=seed,
                  enable_conditionals=bool(train and cfg.randaugment), prefetch_queue_depth=2)
    def graph():  # noqa: ANN202 - DALI graph
        jpegs, labels = fn.external_source(source=source, num_outputs=2, batch=True,
                                           dtype=[types.UINT8, types.INT64])
        if train:
            images = fn.decoders.image_random_crop(
                jpegs, device=decode_dev, output_type=types.RGB, random_area=list(cfg.crop_scale),
                random_aspect_ratio=list(cfg.crop_ratio), num_attempts=10, **gpu_args)
            images = fn.resize(images, size=[size, size], interp_type=types.INTERP_CUBIC, antialias=True)
            if cfg.randaugment:
                n, m = parse_randaugment(cfg.randaugment)
                fill = [int(round(255 * v)) for v in cfg.mean]
                images = rand_augment.rand_augment(images, n=n, m=m, num_magnitude_bins=11, shape=[size, size],
                                                   fill_value=fill[0], max_translate_rel=0.45)
            elif cfg.color_jitter > 0:
                lo, hi = max(0.0, 1 - cfg.color_jitter), 1 + cfg.color_jitter
                images = fn.color_twist(images, brightness=fn.random.uniform(range=[lo, hi]),
                                        contrast=fn.random.uniform(range=[lo, hi]),
                                        saturation=fn.random.uniform(range=[lo, hi]))
            mirror = fn.random.coin_flip(probability=cfg.hflip)
        else:
            images = fn.decoders.image(jpegs, device=decode_dev, output_type=types.RGB, **gpu_args)
            images = fn.resize(images, resize_shorter=int(round(size / cfg.eval_crop_pct)),
                               interp_type=types.INTERP_CUBIC, antialias=True)
            mirror = 0
        images = fn.crop_mirror_normalize(images, dtype=types.UINT8, output_layout="CHW", crop=[size, size],
                                          mirror=mirror, mean=[0.0], std=[1.0])
        return images, labels.gpu() if device == "gpu" else labels

    with _dali_deprecations_to_debug():
        pipe = graph()
    pipe.build()
    return pipe


@contextlib.contextmanager
def _dali_deprecations_to_debug() -> Iterator[None]:
    """Sends DALI's own deprecation warnings to the debug log while a graph is traced.

    DALI 2.4's ``auto_aug`` calls its deprecated ``fn.experimental`` aliases and forces the warnings on
    (``simplefilter("default")`` inside DALI), so warning filters cannot silence them.
    """
    shown = warnings.showwarning

    def to_log(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001, ANN202
        logger.debug("%s: %s", category.__name__, message)

    warnings.showwarning = to_log
    try:
        yield
    finally:
        warnings.showwarning = shown


def _check_video_codec(codec: str, device: str) -> None:
    """Refuses, up front, video shards that this DALI backend cannot decode."""
    if codec == "h264" and device == "cpu":
        raise LoaderError("DALI's CPU backend cannot decode H.264 (the PyPI wheel has VP8/VP9/MJPEG only): use "
                          "data.backend = 'wds' (PyAV), a GPU (data.dali_device = 'gpu'), or VP9 shards "
                          "(vitpipe prep ... --codec vp9)")


class StreamPlan:
    """``stream`` sampling's plan for one rank (:func:`epoch_plan`), as :class:`PlannedBatch` es across epochs.

    A batch's ``first`` numbers its samples rank-major within the epoch (``rank × steps × B + k``), so
    every sample of an epoch has its own position (it seeds video frame sampling).
    """

    def __init__(self, index: SampleIndex, split: str, *, seed: int, rank: int, world_size: int,
                 batch_size: int) -> None:
        self.index, self.seed, self.rank, self.world_size, self.batch_size = index, seed, rank, world_size, batch_size
        self.shards = [Shard(p, int(n)) for p, n in zip(index.paths, index.sizes, strict=True)]
        self.steps_per_epoch = steps_per_epoch(self.shards, split, world_size, batch_size)
        self._epoch: tuple[int, int, np.ndarray] | None = None  # (epoch, steps, ids)

    def _ids(self, epoch: int) -> np.ndarray:
        if self._epoch is None or self._epoch[:2] != (epoch, self.steps_per_epoch):
            refs = epoch_plan(self.shards, [s.num_samples for s in self.shards], seed=self.seed, epoch=epoch,
                              rank=self.rank, world_size=self.world_size,
                              count=self.steps_per_epoch * self.batch_size)
            self._epoch = (epoch, self.steps_per_epoch, self.index.starts[refs[:, 0]] + refs[:, 1])
        return self._epoch[2]

    def batches(self, epoch: int, step: int = 0) -> Iterator[PlannedBatch]:
        """This rank's batches from ``step`` of ``epoch`` on, continuing into the next epochs (endless)."""
        b = self.batch_size
        while True:
            for j in range(step, self.steps_per_epoch):
                first = (self.rank * self.steps_per_epoch + j) * b
                yield PlannedBatch(epoch, j, first, self._ids(epoch)[j * b:(j + 1) * b])
            epoch, step = epoch + 1, 0


class _ImageFeed:
    """The external source of image graphs: the planned batches' encoded images and labels, in order.

    ``pending`` holds ``(epoch, step, keys)`` of each batch handed to DALI, oldest first; the key of a
    sample comes from the tar header in front of its bytes.
    """

    def __init__(self, index: SampleIndex, files: ShardFiles, batches: Iterator[PlannedBatch],
                 policy: ReadPolicy | None = None) -> None:
        self.index, self.files, self.batches = index, files, batches
        self.policy = policy or ReadPolicy()
        self.pending: deque[tuple[int, int, list[str]]] = deque()

    def _read(self, ids: np.ndarray) -> tuple[list[np.ndarray], list[str], np.ndarray]:
        """The batch's media; under ``data.on_bad_shard = "skip"`` without the samples that cannot be read."""
        try:
            return (*read_media(self.index, self.files, ids), ids)
        except LoaderError:
            if self.policy.on_bad_shard != "skip":
                raise
        images, keys, kept = [], [], []
        for sample_id in ids.tolist():
            try:
                media, key = read_media(self.index, self.files, np.array([sample_id]))
            except LoaderError as err:
                self.policy.shard_bad(str(err), self.index.paths[int(self.index.shard_of(np.array([sample_id]))[0])])
                continue
            images += media
            keys += key
            kept.append(sample_id)
        if not kept:
            raise LoaderError(f"every sample of a batch of {self.index.paths[0]}'s split is in a bad shard")
        return images, keys, np.array(kept, np.int64)

    def __call__(self) -> tuple[list[np.ndarray], list[np.ndarray]]:
        batch = next(self.batches)  # StopIteration ends a finite plan
        images, keys, ids = self._read(batch.ids)
        labels = [np.array([v], np.int64) for v in self.index.label[ids].tolist()]
        self.pending.append((batch.epoch, batch.step, keys))
        return images, labels


class DaliLoader:
    """One rank's DALI batches ``{"input": B×3×S×S uint8, "label": B int64}`` (on the GPU for ``gpu``).

    Training follows the trainer's contract (:meth:`set_epoch`, then the epoch's batches) with one pipeline
    for the whole run; evaluation yields the rank's share of the split (whole shards ``r::R``) each time it
    is iterated, from one pipeline too.
    """

    def __init__(self, cfg: DataCfg, split: str, *, batch_size: int, rank: int, world_size: int, seed: int,
                 train: bool, keys: bool = False, policy: ReadPolicy | None = None) -> None:
        self.cfg, self.split, self.batch_size, self.train, self.keys = cfg, split, batch_size, train, keys
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.policy = policy or ReadPolicy()
        self.index = SampleIndex.load(cfg.path, split, exclude=self.policy.exclude)  # one columnar read
        self.expected_samples = self.index.num_samples
        """Samples every rank together must evaluate (the split less skipped shards)."""
        self.files = ShardFiles(self.index.paths, cfg.max_open_files)
        self.plan: SamplePlan | StreamPlan | None = None
        if train and cfg.sampler == "exact":
            try:
                self.plan = SamplePlan(self.index.sizes, seed=seed, rank=rank, world_size=world_size,
                                       batch_size=batch_size, block_shards=cfg.shuffle_shards)
            except PlanError as err:
                raise LoaderError(f"{split} has {self.index.num_samples} samples, fewer than one global batch of "
                                  f"{world_size} × {batch_size}: lower data.batch_size") from err
        elif train:
            check_shards([Shard(p, 0) for p in self.index.paths], split, world_size, 1, cfg.resample_shards)
            self.plan = StreamPlan(self.index, split, seed=seed, rank=rank, world_size=world_size,
                                   batch_size=batch_size)
        self.device = resolve_device(cfg)
        self.device_id = torch.cuda.current_device() if self.device == "gpu" else None
        self.epoch, self.skip = 0, 0
        self.builds = 0
        """Pipelines built so far (1 per run for training without a resume)."""
        self._live: Any = None  # (iterator, pipeline, feed)
        self._next: tuple[int, int] | None = None
        self.video_spec = None
        info = load_dataset_info(cfg.path)
        if info.kind == "video":
            from pipeline.data.video import video_spec_of

            self.video_spec = video_spec_of(cfg)
            _check_video_codec(info.options.get("codec", ""), self.device)

    @property
    def steps_per_epoch(self) -> int:
        """Training batches per epoch, the same on every rank."""
        assert self.plan is not None, "an evaluation loader has no epochs"
        return self.plan.steps_per_epoch

    @steps_per_epoch.setter
    def steps_per_epoch(self, value: int) -> None:
        assert self.plan is not None, "an evaluation loader has no epochs"
        if value != self.plan.steps_per_epoch:
            self._close()  # planned batches of the old length may be in flight
        self.plan.steps_per_epoch = value

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Selects the epoch for the next iteration, resuming after ``skip_batches`` consumed batches."""
        self.epoch, self.skip = epoch, skip_batches

    def position(self, epoch: int, batches: int) -> int:
        """Samples of ``epoch`` consumed by all ranks before batch ``batches`` (what a checkpoint records)."""
        if isinstance(self.plan, SamplePlan):
            return self.plan.cursor(epoch, batches)
        return batches * self.world_size * self.batch_size

    def resume_at(self, epoch: int, samples: int, world_size: int, multiple: int = 1) -> int:
        """The batch to resume ``epoch`` at after ``samples`` consumed on ``world_size`` ranks.

        Exact sampling continues the epoch on any number of ranks; stream sampling on the same number only
        (otherwise the epoch restarts).
        """
        if isinstance(self.plan, SamplePlan):
            return self.plan.resume_at(epoch, samples, multiple)
        if world_size != self.world_size:
            logger.warning("stream sampling: %d ranks resume a checkpoint of %d: epoch %d restarts from its "
                           "beginning (data.sampler = 'exact' continues it)", self.world_size, world_size, epoch)
            return 0
        return samples // (self.world_size * self.batch_size)

    def __len__(self) -> int:
        return self.steps_per_epoch if self.train else len(self._eval_batches())

    def _eval_batches(self) -> list[PlannedBatch]:
        """This rank's evaluation batches: whole shards ``rank::world_size`` in file order (last batch partial)."""
        mine = np.arange(self.rank, len(self.index.paths), self.world_size)
        ids = ranges(self.index.starts[mine], self.index.sizes[mine])
        b = self.batch_size
        return [PlannedBatch(0, j, j * b, ids[j * b:(j + 1) * b]) for j in range(-(-len(ids) // b))]

    def _build(self, batches: Iterator[PlannedBatch], seed: int) -> None:
        """Builds the pipeline (and its iterator) fed by ``batches``."""
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        self._close()
        if self.video_spec is None:
            feed: Any = _ImageFeed(self.index, self.files, batches, self.policy)
            pipe = build_pipeline(self.cfg, feed, train=self.train, device=self.device, batch_size=self.batch_size,
                                  seed=seed, device_id=self.device_id)
        else:
            from pipeline.data.dali_video import VideoFeed, build_video_pipeline

            feed = VideoFeed(self.index, self.files, batches, self.video_spec, train=self.train, seed=self.seed)
            with _dali_deprecations_to_debug():
                pipe = build_video_pipeline(self.video_spec, feed, train=self.train, device=self.device,
                                            batch_size=self.batch_size, threads=self.cfg.dali_threads, seed=seed,
                                            device_id=self.device_id, randaugment=self.cfg.randaugment,
                                            color_jitter=self.cfg.color_jitter,
                                            fill=int(round(255 * self.cfg.mean[0])))
        # No reader and a feed that does not end: the iterator runs on as long as it is asked.
        iterator = DALIGenericIterator([pipe], ["input", "label"], auto_reset=False,
                                       last_batch_policy=LastBatchPolicy.PARTIAL, prepare_first_batch=False)
        self._live = (iterator, pipe, feed)
        self.builds += 1
        logger.info("dali: %s pipeline built (%s, %d so far)", "training" if self.train else "evaluation",
                    f"epoch {self.epoch} batch {self.skip}" if self.train else f"{self.split} split", self.builds)

    def _close(self) -> None:
        if self._live is not None:
            iterator, pipe, _ = self._live
            self._live = self._next = None
            del iterator, pipe

    def _batch(self, expect: tuple[int, int]) -> dict[str, Any]:
        """The live pipeline's next batch, checked against the plan position ``(epoch, step)``."""
        iterator, _, feed = self._live
        try:
            out = next(iterator)[0]
        except LoaderError:
            raise
        except RuntimeError as err:  # DALI's decoder failed on a sample: its message, on one line
            first = next((line for line in str(err).splitlines() if line.strip()), type(err).__name__)
            raise LoaderError(f"dali could not decode a sample of {self.split}: {first.strip()}") from None
        epoch, step, keys = feed.pending.popleft()
        if (epoch, step) != expect:  # the feed and this loop disagree: a bug
            raise RuntimeError(f"dali loader out of step: got batch {step} of epoch {epoch}, expected {expect}")
        batch = {"input": out["input"], "label": out["label"].view(-1).long()}
        return {**batch, "key": keys} if self.keys else batch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if not self.train:
            yield from self._eval_iter()
            return
        assert self.plan is not None
        if self._live is None or self._next != (self.epoch, self.skip):
            seed = seed_of(self.seed, self.epoch, self.rank, self.skip) & 0x7FFFFFFF
            self._build(self.plan.batches(self.epoch, self.skip), seed)
            self._next = (self.epoch, self.skip)
        for step in range(self.skip, self.steps_per_epoch):
            batch = self._batch((self.epoch, step))
            self._next = (self.epoch, step + 1) if step + 1 < self.steps_per_epoch else (self.epoch + 1, 0)
            yield batch

    def _eval_iter(self) -> Iterator[dict[str, Any]]:
        batches = self._eval_batches()
        if not batches:
            return
        if self._live is None or self._next != (0, 0):  # first use, or the last evaluation stopped early
            self._build(itertools.cycle(batches), seed=0)
            self._next = (0, 0)
        for j in range(len(batches)):
            batch = self._batch((0, j))
            self._next = (0, (j + 1) % len(batches))
            yield batch
