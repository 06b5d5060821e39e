"""The batch contract and the loader factory: one interface over the ``wds`` and ``dali`` backends.

Every training batch the trainer sees is a dict on the training device:

* ``input``: float32, normalised with ``data.mean``/``data.std`` — images ``B×3×H×W``, video
  ``B×3×T×H×W`` (evaluation of video: ``B×V×3×T×H×W`` with V = temporal clips × spatial crops);
* ``label``: int64 ``B``;
* ``target``: float32 ``B×K`` soft targets (rows sum to 1), present only when mixup/CutMix is on.

Backends deliver ``uint8`` pixels and int64 labels; the copy to the device, normalisation, random
erasing and mixup/CutMix (:mod:`pipeline.data.batch_augment`) are shared, so both backends meet the contract
with the same dtypes, layout and value ranges.
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from data_prep.format import atomic_write_bytes, load_dataset_info
from pipeline.config import DataCfg, JobCfg
from pipeline.data.batch_augment import BatchAugment, Mixup, RandomErasing, normalize
from pipeline.data.integrity import DataHealth, ReadPolicy, bad_shards
from pipeline.data.sample_transforms import apply_to_clip, clip_color_transform, eval_transform, train_transform
from pipeline.data.shards import read_split
from pipeline.data.wds import SampleFn, build_eval_loader, build_train_loader, image_sample_fn

logger = logging.getLogger(__name__)


class BackendLoader(Protocol):
    """What a backend's training loader offers.

    ``wds``: :class:`~pipeline.data.wds.ExactTrainLoader` or :class:`~pipeline.data.wds.TrainLoader`;
    ``dali``: :class:`~pipeline.data.dali.DaliLoader`.
    """

    steps_per_epoch: int

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None: ...  # noqa: D102

    def position(self, epoch: int, batches: int) -> int: ...  # noqa: D102

    def resume_at(self, epoch: int, samples: int, world_size: int, multiple: int = 1) -> int: ...  # noqa: D102

    def __iter__(self) -> Iterator[dict[str, Any]]: ...  # noqa: D105


class KeyRecorder:
    """``data.record_keys``: the keys of the samples a rank trained on, one CSV per epoch.

    ``<folder>/keys-rank{R}-of{W}-epoch{E}.csv`` (rank ``R`` of ``W`` processes) with the columns of
    ``vitpipe order --out`` (``rank,step,key``), rewritten atomically whenever an iteration over the epoch
    ends; rows of a resumed epoch's earlier batches (an earlier process, the same ``W``) are kept.
    """

    def __init__(self, folder: str | Path, rank: int, world_size: int) -> None:
        self.folder, self.rank, self.world_size = Path(folder), rank, world_size
        self.folder.mkdir(parents=True, exist_ok=True)
        self.rows: list[tuple[int, str]] = []
        self.epoch = -1

    def path(self, epoch: int) -> Path:
        """The CSV of ``epoch``."""
        return self.folder / f"keys-rank{self.rank}-of{self.world_size}-epoch{epoch}.csv"

    def start(self, epoch: int, skip: int) -> None:
        """Begins (or resumes at batch ``skip``) an epoch's record."""
        self.epoch, self.rows = epoch, []
        if skip and self.path(epoch).is_file():
            with self.path(epoch).open(newline="") as f:
                self.rows = [(int(r["step"]), r["key"]) for r in csv.DictReader(f) if int(r["step"]) < skip]

    def add(self, step: int, keys: list[str]) -> None:
        """Records one batch."""
        self.rows += [(step, k) for k in keys]

    def write(self) -> None:
        """Writes the epoch's record so far."""
        text = io.StringIO()
        out = csv.writer(text, lineterminator="\n")
        out.writerow(["rank", "step", "key"])
        out.writerows((self.rank, step, key) for step, key in self.rows)
        atomic_write_bytes(self.path(self.epoch), text.getvalue().encode())


class TrainBatches:
    """A backend's training loader, moved to the device and augmented per batch (the batch contract).

    Batch ``j`` of epoch ``e`` draws its erasing and mixing from ``(seed, e, j)``, so resuming with
    ``set_epoch(e, skip_batches=k)`` reproduces batches ``k, k+1, ...`` of the uninterrupted epoch.
    """

    def __init__(self, loader: BackendLoader, device: torch.device, augment: BatchAugment,
                 recorder: KeyRecorder | None = None, policies: tuple[ReadPolicy, ...] = ()) -> None:
        self.loader, self.device, self.augment, self.recorder = loader, device, augment, recorder
        self.policies = policies
        self.epoch = self.skip = 0

    def local_counts(self) -> list[float]:
        """This rank's ``[shards found bad while reading, samples that failed to decode]``, to be summed over ranks."""
        return [float(sum(p.health.counts[0] for p in self.policies)),
                float(sum(p.health.counts[1] for p in self.policies))]

    def data_metrics(self, reduced: list[float]) -> dict[str, float]:
        """``data/bad_shards`` and ``data/skipped_samples`` from :meth:`local_counts` summed over all ranks.

        ``data/bad_shards``: shards left out at the start (training and validation), plus each time a reading
        process found a shard bad while reading. ``data/skipped_samples``: samples that failed to decode.
        Empty (nothing to report) while both are 0 and ``data.on_bad_shard`` is ``error``.
        """
        read_bad, skipped = reduced
        at_start = sum(p.health.skipped_shards for p in self.policies)  # the same on every rank
        if not (at_start or read_bad or skipped or any(p.on_bad_shard == "skip" for p in self.policies)):
            return {}
        return {"data/bad_shards": float(at_start + read_bad), "data/skipped_samples": float(skipped)}

    @property
    def steps_per_epoch(self) -> int:
        """Batches per epoch, the same on every rank."""
        return self.loader.steps_per_epoch

    @steps_per_epoch.setter
    def steps_per_epoch(self, value: int) -> None:
        self.loader.steps_per_epoch = value

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Selects the epoch of the next iteration and how many of its batches were already consumed."""
        self.epoch, self.skip = epoch, skip_batches
        self.loader.set_epoch(epoch, skip_batches)

    def position(self, epoch: int, batches: int) -> int:
        """Samples of ``epoch`` consumed by all ranks before its batch ``batches``.

        What a checkpoint keeps, so that :meth:`resume_at` can continue the epoch on any number of processes.
        """
        return self.loader.position(epoch, batches)

    def resume_at(self, epoch: int, samples: int, world_size: int, multiple: int = 1) -> int:
        """The batch at which this rank continues ``epoch`` after ``samples`` consumed on ``world_size`` ranks.

        ``exact`` sampling: the rest of the epoch, cut into steps of this world size (nothing repeated or
        skipped), their number a multiple of ``multiple`` (gradient accumulation; what that drops joins the
        remainder); ``stream``: the same batch on the same number of ranks, else 0 (the epoch restarts).
        Pass the result to :meth:`set_epoch` and count the epoch's batches from it.
        """
        return self.loader.resume_at(epoch, samples, world_size, multiple)

    def __len__(self) -> int:
        return self.steps_per_epoch

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if self.recorder is not None:
            self.recorder.start(self.epoch, self.skip)
        try:
            for index, raw in enumerate(self.loader, start=self.skip):
                if self.recorder is not None:
                    self.recorder.add(index, raw["key"])
                pixels = raw["input"].to(self.device, non_blocking=True)
                labels = raw["label"].to(self.device, non_blocking=True)
                yield self.augment(pixels, labels, self.epoch, index)
        finally:
            if self.recorder is not None:
                self.recorder.write()


class EvalBatches:
    """A backend's evaluation loader, moved to the device and normalised.

    Attributes:
        split: The split it reads.
        expected_samples: Samples all ranks together must evaluate (``dataset.json``, less skipped shards):
            :func:`pipeline.evaluate.evaluate` reports nothing when another count was evaluated.
        policy: Its bad-shard policy.
    """

    def __init__(self, loader: Iterable[dict[str, torch.Tensor]], device: torch.device,
                 mean: tuple[float, ...], std: tuple[float, ...], *, split: str = "",
                 policy: ReadPolicy | None = None) -> None:
        self.loader, self.device, self.mean, self.std = loader, device, mean, std
        self.split, self.policy = split, policy or ReadPolicy()
        self.expected_samples = int(getattr(loader, "expected_samples", -1))

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for raw in self.loader:
            pixels = raw["input"].to(self.device, non_blocking=True)
            if pixels.dim() == 6:  # video views B×V×3×T×H×W: normalise as (B·V)×3×T×H×W
                x = normalize(pixels.flatten(0, 1), self.mean, self.std).view(pixels.shape)
            else:
                x = normalize(pixels, self.mean, self.std)
            yield {"input": x, "label": raw["label"].to(self.device, non_blocking=True)}


def batch_augment(cfg: JobCfg, num_classes: int) -> BatchAugment:
    """The device-side augmentation the config asks for (erasing, mixup/CutMix with label smoothing)."""
    d = cfg.data
    mixup = None
    if d.mixup > 0 or d.cutmix > 0:
        mixup = Mixup(d.mixup, d.cutmix, num_classes, smoothing=cfg.loss.label_smoothing, prob=d.mixup_prob,
                      switch_prob=d.mixup_switch_prob)
    erasing = RandomErasing(d.reprob) if d.reprob > 0 else None
    return BatchAugment(d.mean, d.std, cfg.run.seed, erasing=erasing, mixup=mixup)


def is_video(cfg: DataCfg) -> bool:
    """Whether ``data.path`` holds a video data set (``dataset.json`` kind)."""
    return load_dataset_info(cfg.path).kind == "video"


def input_shape(cfg: DataCfg) -> tuple[int, ...]:
    """One training sample's input shape: ``(3, S, S)`` for images, ``(3, T, S, S)`` for video."""
    if is_video(cfg):
        return (3, cfg.video.frames, cfg.img_size, cfg.img_size)
    return (3, cfg.img_size, cfg.img_size)


def video_sample_fn(cfg: DataCfg, *, train: bool) -> SampleFn:
    """The per-sample function for video shards.

    Training: sample ``T`` frame indices, decode only those, one crop and flip for the whole clip, then
    RandAugment (or colour jitter) with the same draws for every frame → ``3×T×S×S`` uint8.
    Evaluation: every view (temporal clips × spatial crops) → ``V×3×T×S×S`` uint8. The training
    draws come from the global generators, which the loader seeds per sample.
    """
    from pipeline.data.video import load_eval_views, load_train_clip, video_spec_of

    spec = video_spec_of(cfg)
    if not train:
        return lambda sample: load_eval_views(sample, spec, normalize=False)
    color = clip_color_transform(cfg)

    def clip_fn(sample: dict[str, Any]) -> torch.Tensor:
        seed = int(torch.randint(0, 2**62, ()).item())
        clip = load_train_clip(sample, spec, np.random.default_rng(seed), normalize=False)  # 3×T×S×S
        return apply_to_clip(color, clip) if color is not None else clip

    return clip_fn


def sample_fn(cfg: DataCfg, *, train: bool) -> SampleFn:
    """The ``wds`` backend's per-sample function for this data set (image or video), training or evaluation."""
    if is_video(cfg):
        return video_sample_fn(cfg, train=train)
    return image_sample_fn(train_transform(cfg) if train else eval_transform(cfg))


def read_policy(d: DataCfg, split: str, *, strict: bool = False) -> ReadPolicy:
    """The bad-shard and decode-failure policy of ``split``, its bad shards found (a stat each) and agreed.

    Every rank must call it at the same point (one collective).

    Args:
        d: The data config.
        split: Split to check.
        strict: Stop on a bad shard whatever ``data.on_bad_shard`` says (``vitpipe eval``).

    Raises:
        LoaderError: A bad shard under ``error`` (one line naming it).
    """
    mode = "error" if strict else d.on_bad_shard
    exclude = bad_shards(d.path, split, mode)
    return ReadPolicy(mode, d.max_skip_fraction, d.skip_window, exclude, DataHealth(len(exclude)))


def build_eval(cfg: JobCfg, split: str, *, rank: int, world_size: int, device: torch.device,
               strict: bool = False) -> EvalBatches:
    """This rank's evaluation batches of ``split`` (every sample once over all ranks) on ``device``.

    ``strict``: a bad shard stops it whatever ``data.on_bad_shard`` says (``vitpipe eval``).
    """
    d = cfg.data
    batch = cfg.eval.batch_size or d.batch_size
    policy = read_policy(d, split, strict=strict)
    if d.backend == "dali":
        from pipeline.data.dali import DaliLoader

        loader: Any = DaliLoader(d, split, batch_size=batch, seed=0, train=False, rank=rank, world_size=world_size,
                                 policy=policy)
    else:
        loader = build_eval_loader(d.path, split, sample_fn(d, train=False), batch_size=batch,
                                   num_workers=d.num_workers, rank=rank, world_size=world_size, policy=policy)
    return EvalBatches(loader, device, d.mean, d.std, split=split, policy=policy)


def build_loaders(cfg: JobCfg, *, rank: int, world_size: int, device: torch.device,
                  num_classes: int) -> tuple[TrainBatches, EvalBatches]:
    """Builds this rank's training and evaluation batches with the configured backend.

    Returns:
        ``(train, eval)`` iterables of batch-contract dicts on ``device``.
    """
    d = cfg.data
    read_split(d.path, d.train_split)  # a clear error for a missing data set or split, before any work
    policy = read_policy(d, d.train_split)
    keys = bool(d.record_keys)
    if d.backend == "dali":
        from pipeline.data.dali import DaliLoader

        train: Any = DaliLoader(d, d.train_split, batch_size=d.batch_size, seed=cfg.run.seed, train=True,
                                rank=rank, world_size=world_size, keys=keys, policy=policy)
        logger.info("dali loader on %s (%s sampling): %d steps/epoch per rank", train.device, d.sampler,
                    train.steps_per_epoch)
    else:
        train = build_train_loader(
            d.path, d.train_split, sample_fn(d, train=True), batch_size=d.batch_size,
            num_workers=d.num_workers, seed=cfg.run.seed, shuffle_buffer=d.shuffle_buffer,
            persistent_workers=d.persistent_workers, resample=d.resample_shards, rank=rank, world_size=world_size,
            sampler=d.sampler, shuffle_shards=d.shuffle_shards, max_open_files=d.max_open_files, keys=keys,
            policy=policy)
    evals = build_eval(cfg, d.val_split, rank=rank, world_size=world_size, device=device)
    recorder = KeyRecorder(d.record_keys, rank, world_size) if keys else None
    return TrainBatches(train, device, batch_augment(cfg, num_classes), recorder, (policy, evals.policy)), evals
