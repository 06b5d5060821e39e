"""The ``dali`` backend: NVIDIA DALI decodes and augments images on the GPU (or DALI's CPU backend).

How samples reach DALI: the DALI index files written by ``vitpipe prep`` (one ``.idx`` per tar,
``ext offset size`` for every component) give each JPEG's byte range, so an epoch's order is planned
in Python and the bytes are read with ``pread`` and fed through ``fn.external_source``. DALI's own
webdataset reader shuffles through a fixed buffer, splits ranks by sample count and cannot skip to a
batch; planning the order here gives the same contract as the ``wds`` backend:

* epoch ``e``: the shard permutation of ``(seed, e)`` (shared with ``wds``), rank ``r`` of ``R`` takes
  shards ``r::R``, and its samples are permuted with ``(seed, e, r)`` — disjoint ranks that together
  cover the epoch;
* every rank yields ``samples // (R × B)`` batches (a rank whose shards are short borrows from its
  shards of the next epoch's permutation);
* resume after ``k`` batches starts the plan at batch ``k``: no sample is repeated or lost. The
  random augmentation draws of the rest of that epoch differ from an uninterrupted run (DALI's
  generators are seeded per epoch and resume position, not fast-forwarded).

The graph (training): ``decoders.image_random_crop`` (nvJPEG + hardware decoder on ``mixed``; the
random-resized crop is decoded as a region of interest) → bicubic ``resize`` → RandAugment (DALI's
``auto_aug.rand_augment``; timm's magnitude scale, no magnitude noise) or colour twist → flip →
``uint8`` CHW. Normalisation, random erasing and mixup/CutMix follow on the device in
:mod:`pipeline.data.batch_augment`, exactly as for ``wds``.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from functools import cached_property

import numpy as np
import torch

from data_prep.format import load_dataset_info
from pipeline.config import DataCfg
from pipeline.data.dali_base import SampleReader, ShardIndex, parse_randaugment
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


class _Feed:
    """The external source: yields the planned batches, then stops the epoch."""

    def __init__(self, reader: SampleReader, plan: np.ndarray, batch_size: int) -> None:
        self.reader, self.plan, self.batch_size = reader, plan, batch_size
        self.next = 0

    def __call__(self) -> tuple[list[np.ndarray], list[np.ndarray]]:
        start = self.next * self.batch_size
        if start >= len(self.plan):
            raise StopIteration
        self.next += 1
        return self.reader.read(self.plan[start:start + self.batch_size])


class DaliLoader:
    """One rank's DALI batches ``{"input": B×3×S×S uint8, "label": B int64}`` (on the GPU for ``gpu``)."""

    def __init__(self, cfg: DataCfg, split: str, *, batch_size: int, rank: int, world_size: int, seed: int,
                 train: bool) -> None:
        self.cfg, self.split, self.batch_size, self.train = cfg, split, batch_size, train
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.shards, _ = read_split(cfg.path, split)
        if train:
            check_shards(self.shards, split, world_size, 1, cfg.resample_shards)
            self.steps_per_epoch = steps_per_epoch(self.shards, split, world_size, batch_size)
        self.device = resolve_device(cfg)
        self.device_id = torch.cuda.current_device() if self.device == "gpu" else None
        self.epoch, self.skip = 0, 0
        self.video_spec = None
        info = load_dataset_info(cfg.path)
        if info.kind == "video":
            from pipeline.data.video import video_spec_of

            self.video_spec = video_spec_of(cfg)
            _check_video_codec(info.options.get("codec", ""), self.device)

    @cached_property
    def reader(self) -> SampleReader:
        """Byte ranges of every shard of the split (read once)."""
        if self.video_spec is not None:
            from pipeline.data.dali_video import VideoShardIndex

            return SampleReader([VideoShardIndex.load(s) for s in self.shards])
        return SampleReader([ShardIndex.load(s) for s in self.shards])

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Selects the epoch for the next iteration, resuming after ``skip_batches`` consumed batches."""
        self.epoch, self.skip = epoch, skip_batches

    def __len__(self) -> int:
        return self.steps_per_epoch if self.train else -(-self._eval_plan().shape[0] // self.batch_size)

    def _eval_plan(self) -> np.ndarray:
        mine = range(self.rank, len(self.shards), self.world_size)
        parts = [np.stack([np.full(self.shards[i].num_samples, i), np.arange(self.shards[i].num_samples)], 1)
                 for i in mine]
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros((0, 2), np.int64)

    def _plan(self) -> np.ndarray:
        if not self.train:
            return self._eval_plan()
        sizes = [s.num_samples for s in self.shards]
        plan = epoch_plan(self.shards, sizes, seed=self.seed, epoch=self.epoch, rank=self.rank,
                          world_size=self.world_size, count=self.steps_per_epoch * self.batch_size)
        return plan[self.skip * self.batch_size:]

    def _pipeline(self, plan: np.ndarray, seed: int) -> object:
        if self.video_spec is None:
            return build_pipeline(self.cfg, _Feed(self.reader, plan, self.batch_size), train=self.train,
                                  device=self.device, batch_size=self.batch_size, seed=seed,
                                  device_id=self.device_id)
        from pipeline.data.dali_video import VideoFeed, build_video_pipeline

        feed = VideoFeed(self.reader, plan, self.batch_size, self.video_spec, train=self.train,
                         seed=(self.seed, self.epoch, self.rank), first=self.skip * self.batch_size)
        with _dali_deprecations_to_debug():
            return build_video_pipeline(self.video_spec, feed, train=self.train, device=self.device,
                                        batch_size=self.batch_size, threads=self.cfg.dali_threads, seed=seed,
                                        device_id=self.device_id, randaugment=self.cfg.randaugment,
                                        color_jitter=self.cfg.color_jitter,
                                        fill=int(round(255 * self.cfg.mean[0])))

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        plan = self._plan()
        if not len(plan):
            return
        seed = seed_of(self.seed, self.epoch, self.rank, self.skip) & 0x7FFFFFFF if self.train else 0
        pipe = self._pipeline(plan, seed)
        batches = DALIGenericIterator([pipe], ["input", "label"], auto_reset=False,
                                      last_batch_policy=LastBatchPolicy.PARTIAL, prepare_first_batch=False)
        try:
            for out in batches:
                yield {"input": out[0]["input"], "label": out[0]["label"].view(-1).long()}
        finally:
            del batches, pipe
