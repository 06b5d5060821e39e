"""Input-pipeline throughput (issue #6): ``wds`` and DALI against the ImageFolder loader users write.

Usage: ``python bench/loader.py [--images 1200] [--classes 10] [--workers N] [--seconds 24] [--rounds 2]
[--device auto|cpu|cuda] [--only image video train] [--work DIR]``

Everything runs on data made here, through the real tools:

* **Images.** ``--images`` ImageNet-like JPEGs (photo-like content, 500×375, 375×500, 500×333, 500×500,
  640×480 ..., quality 90, PIL's libjpeg) in an ImageFolder tree, sharded by ``vitpipe prep imagenet``
  (tars + DALI indexes). The full training augmentation at ``--img-size`` (224): random-resized crop
  (bicubic), flip, timm RandAugment ``--randaugment`` (``rand-m9-mstd0.5-inc1``), random erasing
  (``--reprob``) and mixup/CutMix (0.8/1.0), timed for

  - the baseline a user writes: torchvision ``ImageFolder`` + ``DataLoader(shuffle=True)`` over the
    unsharded JPEGs, ``Compose([RandomResizedCrop, RandomHorizontalFlip, <timm's RandAugment>,
    ToTensor, Normalize, <timm's RandomErasing>])`` in the workers and timm's ``Mixup`` on the batch
    (the same RandAugment with the same hyper-parameters as our ``wds`` path);
  - ``wds``: :func:`pipeline.data.build_loaders` (PIL augmentation in DataLoader workers, then
    normalisation, erasing and mixup on the training device: the CPU here);
  - ``dali`` on DALI's CPU backend (``data.dali_device = "cpu"``; DALI's RandAugment, no magnitude noise);
  - with CUDA: ``dali`` on the GPU (nvJPEG / hardware decoder), images/s per GPU.

  Every loader gets ``--workers`` (default: the CPU count) worker processes or DALI threads; the
  training process itself (batch augmentation, and DALI's feed) comes on top of them, with
  ``--main-threads`` torch threads (1: on a small CPU machine a second pool of intra-op threads beside
  the workers made ``torch.stack``/normalisation of a batch 20-50× slower). The loaders are timed in
  ``--rounds`` interleaved rounds (A B C A B C), ``--seconds`` in all per loader, across epochs, so a
  change of machine load hits every loader alike; each round first draws ``--warmup`` batches untimed
  (worker start-up, the first DALI build, batches prefetched during another loader's round).
* **Video.** ``--clips`` synthetic 320×240 clips (``--clip-frames`` frames at 30 fps, a panning scene)
  prepared by ``vitpipe prep videolist`` as H.264 mp4, VP9 webm and JPEG frames (short side 240,
  keyframe every 8 frames). Training clips of ``--frames`` frames, stride ``--stride``, random-resized
  crop to ``--clip-size`` and flip, clips/s for ``wds`` per format (VP9 with its default decoder, DALI's
  CPU decoder per sample, and with PyAV), DALI's CPU pipeline on VP9 and, with CUDA, DALI on the GPU
  (NVDEC) for H.264 and VP9.
* **Training loop.** The real trainer (``python -m pipeline.train``) trains ``--train-model`` at its
  image size on the ImageNet-like shards with the same augmentation, per backend, for ``--train-steps``
  steps, and reports the fraction of wall time the step loop waited for its next batch (the trainer's
  ``train/data_wait``, time-weighted over the logged windows after the first).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import logging
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402 - after the project root is importable

from pipeline.config import DataCfg, EvalCfg, JobCfg, LossCfg, RunCfg  # noqa: E402

SIZES = ((500, 375), (375, 500), (500, 333), (333, 500), (500, 500), (640, 480), (500, 400), (400, 300))
"""ImageNet-like (width, height): the 500-px long side and aspect ratios most of its JPEGs have."""


# ---------------------------------------------------------------------------------------- data sets


def photo(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A photo-like ``H×W×3`` uint8 image: smooth colour fields, a few soft shapes, sensor noise."""
    small = rng.integers(0, 256, (int(rng.integers(4, 12)), int(rng.integers(4, 12)), 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC), dtype=np.float32)
    for _ in range(int(rng.integers(2, 6))):  # blobs give edges and textures, like objects in a scene
        cy, cx, r = rng.uniform(0, height), rng.uniform(0, width), rng.uniform(20, 150)
        top, bottom = max(int(cy - 1.5 * r), 0), min(int(cy + 1.5 * r) + 1, height)
        left, right = max(int(cx - 1.5 * r), 0), min(int(cx + 1.5 * r) + 1, width)
        yy, xx = np.mgrid[top:bottom, left:right]
        mask = np.clip(1.5 - np.hypot(yy - cy, xx - cx) / r, 0, 1)[..., None]
        box = img[top:bottom, left:right]
        img[top:bottom, left:right] = box * (1 - mask) + rng.integers(0, 256, 3) * mask
    img += rng.normal(0, 10, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def make_image_tree(src: Path, images: int, classes: int, val_per_class: int = 2) -> float:
    """Writes ``SRC/{train,val}/<class>/*.JPEG`` (quality 90) and returns the mean train JPEG size in KB."""
    rng = np.random.default_rng(0)
    total = 0
    for split, count in (("train", images), ("val", classes * val_per_class)):
        for i in range(count):
            folder = src / split / f"n{i % classes:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            width, height = SIZES[int(rng.integers(len(SIZES)))]
            path = folder / f"{split}_{i:06d}.JPEG"
            Image.fromarray(photo(rng, width, height)).save(path, quality=90)
            total += path.stat().st_size if split == "train" else 0
    return total / images / 1e3


def make_clips(src: Path, train: int, val: int, frames: int) -> None:
    """Writes ``train + val`` H.264 clips (320×240 at 30 fps, a panning photo) and the two video lists."""
    import av

    rng = np.random.default_rng(1)
    for split, count in (("train", train), ("val", val)):
        rows = []
        for i in range(count):
            scene = photo(rng, 320 + 4 * frames, 240)
            name = f"{split}_{i:03d}.mp4"
            with av.open(str(src / name), "w") as out:
                stream = out.add_stream("libx264", rate=30)
                stream.width, stream.height, stream.pix_fmt = 320, 240, "yuv420p"
                for t in range(frames):
                    frame = np.ascontiguousarray(scene[:, 4 * t:4 * t + 320])
                    for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                        out.mux(packet)
                for packet in stream.encode():
                    out.mux(packet)
            rows.append(f"{name} {i % 2}")
        (src / f"{split}.txt").write_text("\n".join(rows) + "\n")


QUIET = ["--nodes", "1", "--gpus-per-node", "1", "--loader-workers", "1"]  # no shard-count warnings


def prep(args: list[str]) -> None:
    """Runs ``vitpipe prep ARGS`` in this process."""
    from vitpipe.prep import main

    if main(["prep", *args, *QUIET]) != 0:
        raise RuntimeError(f"vitpipe prep {' '.join(args)} failed")


# ------------------------------------------------------------------------------------------- timing


@dataclass
class Rate:
    """What one configuration delivered in its timed batches, and what its epoch starts cost on top."""

    items: int = 0
    seconds: float = 0.0
    """Time spent waiting for timed batches (steady state: no start-up, no epoch start)."""
    batches: int = 0
    passes: float = 0.0
    epoch_starts: int = 0
    start_seconds: float = 0.0
    """Time spent waiting for the first ``warmup`` batches of every epoch after the first."""
    start_batches: int = 0

    @property
    def per_s(self) -> float:
        """Items (images or clips) per second in the steady state."""
        return self.items / self.seconds

    @property
    def epoch_start_cost(self) -> float:
        """Seconds an epoch start costs beyond the steady-state time of its first batches."""
        if not self.epoch_starts:
            return float("nan")
        extra = self.start_seconds - self.start_batches * self.seconds / max(self.batches, 1)
        return extra / self.epoch_starts

    def add(self, other: Rate) -> None:
        """Accumulates another round."""
        for key in ("items", "seconds", "batches", "epoch_starts", "start_seconds", "start_batches"):
            setattr(self, key, getattr(self, key) + getattr(other, key))


@dataclass
class Row:
    """One printed line."""

    name: str
    units: int
    """Workers, DALI threads or GPUs the figure is divided by."""
    unit: str
    rate: Rate | None
    note: str = ""
    errors: int = 0
    """Samples whose augmentation raised (wds: skipped; baseline: drawn again)."""


def labels_of(batch: Any) -> int:
    """Samples in a batch dict or an ``(input, target)`` pair."""
    return int(batch["label"].numel() if isinstance(batch, dict) else batch[0].shape[0])


ERRORS = multiprocessing.Value("i", 0)
"""Samples whose augmentation raised, counted across (forked) loader workers."""


class CountSkips(logging.Handler):
    """Counts the ``wds`` loader's "skipped an undecodable sample" warnings (in its forked workers too)."""

    def emit(self, record: logging.LogRecord) -> None:  # noqa: D102
        if "skipped" in record.getMessage():
            with ERRORS.get_lock():
                ERRORS.value += 1


class RedrawOnError:
    """Applies ``transform``; when it raises ``ValueError``, counts it and draws again.

    timm's ``PosterizeIncreasing`` at magnitude 10 asks Pillow for 0 bits, which Pillow 13 refuses; a
    bare user loader would die on the first such draw, so the baseline re-draws instead (``wds`` skips
    the sample, see :class:`CountSkips`).
    """

    def __init__(self, transform: Callable[[Any], Any]) -> None:
        self.transform = transform

    def __call__(self, image: Any) -> Any:
        """The transformed image (up to 10 draws)."""
        for _ in range(9):
            try:
                return self.transform(image)
            except ValueError:
                with ERRORS.get_lock():
                    ERRORS.value += 1
        return self.transform(image)


def batches(epochs: Callable[[int], Iterable[Any]]) -> Iterator[tuple[bool, Any]]:
    """One endless stream of ``(first of an epoch after the first, batch)``, epoch after epoch."""
    for epoch in itertools.count():
        for i, batch in enumerate(epochs(epoch)):
            yield i == 0 and epoch > 0, batch


def timed_round(stream: Iterator[tuple[bool, Any]], count: Callable[[Any], int], *, warmup: int,
                seconds: float) -> Rate:
    """Draws ``warmup`` batches untimed, then times batches until ``seconds`` of waiting are counted.

    The untimed batches are the ones a loader prefetched while it waited (worker start-up, the first DALI
    build, or another loader's round). The first ``warmup`` batches of each later epoch are timed apart
    (:attr:`Rate.epoch_start_cost`): at ImageNet scale an epoch start comes every few thousand batches,
    here every few dozen, so mixing them in would weigh them a hundred times too much.
    """
    for _ in range(warmup):
        next(stream)
    rate, in_start = Rate(), 0
    while rate.seconds < seconds:
        t0 = time.perf_counter()
        new_epoch, batch = next(stream)
        waited = time.perf_counter() - t0
        if new_epoch:
            rate.epoch_starts, in_start = rate.epoch_starts + 1, warmup
        if in_start:
            in_start -= 1
            rate.start_seconds += waited
            rate.start_batches += 1
        else:
            rate.items += count(batch)
            rate.seconds += waited
            rate.batches += 1
    return rate


@dataclass
class Loader:
    """One configuration to time."""

    name: str
    units: int
    """Workers, DALI threads or GPUs the figure is divided by."""
    unit: str
    build: Callable[[], Callable[[int], Iterable[Any]]]
    """Builds the loader: returns ``epoch -> batches``."""


def compare(loaders: list[Loader], *, dataset: int, rounds: int, seconds: float, warmup: int) -> list[Row]:
    """Times the loaders in interleaved rounds (A B C A B C ...), so a change of machine load hits all alike.

    Returns:
        One row per loader: items and seconds summed over its rounds (None and a note if it failed).
    """
    streams: dict[str, Iterator[Any] | None] = {}
    totals = {lo.name: Rate() for lo in loaders}
    notes, errors = dict.fromkeys(totals, ""), dict.fromkeys(totals, 0)
    for lo in loaders:
        try:
            streams[lo.name] = batches(lo.build())
        except Exception as err:  # noqa: BLE001 - report and go on with the other loaders
            logging.getLogger(__name__).exception("%s failed", lo.name)
            streams[lo.name], notes[lo.name] = None, f"failed: {type(err).__name__}: {str(err).splitlines()[0][:80]}"
    for _ in range(rounds):
        for lo in loaders:
            stream = streams[lo.name]
            if stream is None:
                continue
            ERRORS.value = 0
            try:
                rate = timed_round(stream, labels_of, warmup=warmup, seconds=seconds / rounds)
            except Exception as err:  # noqa: BLE001
                logging.getLogger(__name__).exception("%s failed", lo.name)
                streams[lo.name], notes[lo.name] = None, f"failed: {type(err).__name__}: {str(err)[:80]}"
                continue
            totals[lo.name].add(rate)
            errors[lo.name] += ERRORS.value
    rows = []
    for lo in loaders:
        rate = totals[lo.name] if not notes[lo.name] else None
        if rate is not None:
            rate.passes = rate.items / dataset
        rows.append(Row(lo.name, lo.units, lo.unit, rate, notes[lo.name], errors[lo.name]))
    streams.clear()  # workers and DALI pipelines end here
    return rows


def image_job(a: argparse.Namespace, path: Path, backend: str, dali_device: str = "cpu") -> JobCfg:
    """The training config of the image runs: the full augmentation at ``--img-size``."""
    data = DataCfg(path=str(path), img_size=a.img_size, batch_size=a.batch, num_workers=a.workers,
                   shuffle_buffer=a.shuffle_buffer, randaugment=a.randaugment, reprob=a.reprob, mixup=0.8,
                   cutmix=1.0, backend=backend, dali_device=dali_device, dali_threads=a.workers)
    return JobCfg(run=RunCfg(seed=0), data=data, loss=LossCfg(label_smoothing=0.1), eval=EvalCfg(batch_size=a.batch))


def ours(job: JobCfg, device: torch.device, num_classes: int) -> Callable[[int], Iterable[Any]]:
    """``epoch -> batches`` of :func:`pipeline.data.build_loaders` (the batch contract on ``device``)."""
    from pipeline.data.loaders import build_loaders

    train, _ = build_loaders(job, rank=0, world_size=1, device=device, num_classes=num_classes)

    def epochs(epoch: int) -> Iterator[dict[str, torch.Tensor]]:
        train.set_epoch(epoch)
        for batch in train:
            if device.type == "cuda":
                torch.cuda.synchronize()  # count a batch when it is ready on the device
            yield batch

    return epochs


def baseline(a: argparse.Namespace, folder: Path, cfg: DataCfg, num_classes: int) -> Callable[[int], Iterable[Any]]:
    """``epoch -> batches`` of the loader users write: ImageFolder + DataLoader + per-sample PIL transforms."""
    from timm.data import Mixup
    from timm.data.random_erasing import RandomErasing
    from torchvision import datasets
    from torchvision import transforms as T

    from pipeline.data.sample_transforms import randaugment

    transform = T.Compose([
        T.RandomResizedCrop(cfg.img_size, scale=cfg.crop_scale, ratio=cfg.crop_ratio,
                            interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(cfg.hflip),
        RedrawOnError(randaugment(cfg.randaugment, cfg.img_size, cfg.mean)),  # timm's, with our hparams
        T.ToTensor(),
        T.Normalize(cfg.mean, cfg.std),
        RandomErasing(cfg.reprob, mode="pixel", device="cpu"),
    ])
    dataset = datasets.ImageFolder(str(folder), transform)
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size, shuffle=True, num_workers=a.workers,
                                         drop_last=True, pin_memory=torch.cuda.is_available(),
                                         persistent_workers=a.workers > 0)
    mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=0.1, num_classes=num_classes)

    def epochs(epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for x, y in loader:
            yield mixup(x, y)

    return epochs


# -------------------------------------------------------------------------------------------- parts


def print_table(title: str, rows: list[Row], what: str, base: float | None = None,
                versus: str = "vs baseline") -> None:
    """Prints rows as a markdown table with per-unit figures and, if given, ratios to ``base``."""
    print(f"\n{title}\n")
    print(f"| loader | {what}/s | per unit | units | {versus} | timed s | passes | epoch starts | "
          "s per epoch start | aug. errors |")
    print("|---|---:|---:|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        if r.rate is None:
            print(f"| {r.name} | – | – | {r.units} {r.unit} | {r.note} | | | | | |")
            continue
        ratio = f"{r.rate.per_s / base:.2f}×" if base else "–"
        print(f"| {r.name} | {r.rate.per_s:,.1f} | {r.rate.per_s / r.units:,.1f} | {r.units} {r.unit} | {ratio} | "
              f"{r.rate.seconds:.1f} | {r.rate.passes:.1f} | {r.rate.epoch_starts} | {r.rate.epoch_start_cost:+.2f} | "
              f"{r.errors} |", flush=True)


def image_data(a: argparse.Namespace, work: Path) -> tuple[Path, Path]:
    """Generates the ImageFolder tree and shards it (once per work directory); returns both directories."""
    src, shards = work / "imagenet-like", work / "imagenet-like-wds"
    if not (shards / "dataset.json").is_file():
        t0 = time.perf_counter()
        kb = make_image_tree(src, a.images, a.classes)
        t1 = time.perf_counter()
        prep(["imagenet", "--src", str(src), "--out", str(shards), "--shard-size", str(a.shard_size),
              "--workers", str(min(a.workers, os.cpu_count() or 1))])
        print(f"generated {a.images} train JPEGs ({kb:.0f} KB mean, q90) in {t1 - t0:.0f} s; "
              f"`vitpipe prep imagenet` in {time.perf_counter() - t1:.0f} s", flush=True)
    return src, shards


def image_part(a: argparse.Namespace, work: Path, cuda: bool) -> None:
    """Times every image loader on the generated data and prints the table."""
    src, shards = image_data(a, work)
    cpu = torch.device("cpu")
    job = image_job(a, shards, "wds")
    timing = dict(dataset=a.images, rounds=a.rounds, seconds=a.seconds, warmup=a.warmup)
    rows = compare([
        Loader("ImageFolder + PIL (baseline)", a.workers, "workers",
               lambda: baseline(a, src / "train", job.data, a.classes)),
        Loader("wds (ours)", a.workers, "workers", lambda: ours(job, cpu, a.classes)),
        Loader("dali, CPU backend (ours)", a.workers, "threads",
               lambda: ours(image_job(a, shards, "dali", "cpu"), cpu, a.classes)),
    ], **timing)
    base = rows[0].rate.per_s if rows[0].rate else None
    print_table(f"Images, {a.img_size}×{a.img_size}, full training augmentation ({a.randaugment}, "
                f"reprob {a.reprob}, mixup 0.8 / CutMix 1.0), batch {a.batch}; per unit = per worker process or "
                f"DALI thread, {os.cpu_count()} CPU cores; {a.rounds} interleaved rounds", rows, "images", base)
    if cuda:
        gpu = torch.device("cuda")
        rows = compare([Loader("dali, GPU", 1, "GPU",
                               lambda: ours(image_job(a, shards, "dali", "gpu"), gpu, a.classes))], **timing)
        print_table(f"Images on {torch.cuda.get_device_name()}: DALI GPU (mixed decode), {a.workers} DALI threads",
                    rows, "images")
    else:
        print("\nDALI GPU images: skipped (no CUDA device)")


def video_job(a: argparse.Namespace, path: Path, backend: str, dali_device: str = "cpu",
              **video: Any) -> JobCfg:
    """The training config of the video runs."""
    data = DataCfg(path=str(path), img_size=a.clip_size, batch_size=a.video_batch, num_workers=a.workers,
                   shuffle_buffer=16, backend=backend, dali_device=dali_device, dali_threads=a.workers,
                   video={"frames": a.frames, "stride": a.stride, "sampling": "dense", **video})
    return JobCfg(run=RunCfg(seed=0), data=data, eval=EvalCfg(batch_size=a.video_batch))


def video_part(a: argparse.Namespace, work: Path, cuda: bool) -> None:
    """Prepares the clips in each stored format, times the video loaders and prints the table."""
    src = work / "clips"
    sets = {codec: work / f"clips-{codec}" for codec in ("h264", "vp9", "jpeg")}
    if not all((p / "dataset.json").is_file() for p in sets.values()):
        src.mkdir(parents=True, exist_ok=True)
        make_clips(src, a.clips, 2, a.clip_frames)
        for codec, out in sets.items():
            t0 = time.perf_counter()
            prep(["videolist", "--list", f"train={src / 'train.txt'}", "--list", f"val={src / 'val.txt'}",
                  "--root", str(src), "--out", str(out), "--codec", codec, "--fps", "30", "--short-side", "240",
                  "--keyint", "8", "--shard-size", "2", "--workers", "1", "--threads", "1"])
            print(f"`vitpipe prep videolist --codec {codec}`: {a.clips + 2} clips in {time.perf_counter() - t0:.1f} s",
                  flush=True)
    cpu = torch.device("cpu")
    timing = dict(dataset=a.clips, rounds=a.rounds, seconds=a.video_seconds, warmup=a.warmup)
    runs = [("wds, H.264 mp4 (PyAV)", video_job(a, sets["h264"], "wds")),
            ("wds, VP9 webm (default: DALI CPU decoder per sample)", video_job(a, sets["vp9"], "wds")),
            ("wds, VP9 webm (PyAV)", video_job(a, sets["vp9"], "wds", webm_backend="pyav")),
            ("wds, JPEG frames (PIL, sampled frames only)", video_job(a, sets["jpeg"], "wds")),
            ("dali, CPU backend, VP9 webm", video_job(a, sets["vp9"], "dali", "cpu"))]
    rows = compare([Loader(name, a.workers, "threads" if name.startswith("dali") else "workers",
                           lambda job=job: ours(job, cpu, 2)) for name, job in runs], **timing)
    print_table(f"Video training clips: {a.frames} frames, stride {a.stride}, random-resized crop {a.clip_size} "
                f"+ flip, batch {a.video_batch}; {a.clips} clips of {a.clip_frames} frames, 320×240 → short side 240",
                rows, "clips", rows[0].rate.per_s if rows[0].rate else None, "vs H.264 (wds)")
    if not cuda:
        print("\nDALI GPU video (NVDEC, H.264 and VP9): skipped (no CUDA device)")
        return
    gpu = torch.device("cuda")
    rows = compare([Loader(f"dali, GPU, {codec}", 1, "GPU", lambda codec=codec: ours(
        video_job(a, sets[codec], "dali", "gpu"), gpu, 2)) for codec in ("h264", "vp9")], **timing)
    print_table(f"Video clips on {torch.cuda.get_device_name()}: DALI GPU (NVDEC), {a.workers} DALI threads",
                rows, "clips")


# ------------------------------------------------------------------------------------ training loop


def recipe(a: argparse.Namespace, shards: Path, backend: str, dali_device: str) -> str:
    """A tiny training recipe (TOML) on the ImageNet-like shards with the full augmentation."""
    return f"""[run]
seed = 0
log_level = "INFO"
[model]
name = "{a.train_model}"
[data]
path = {json.dumps(str(shards))}
img_size = {a.train_size}
batch_size = {a.train_batch}
num_workers = {a.workers}
shuffle_buffer = {a.shuffle_buffer}
randaugment = "{a.randaugment}"
reprob = {a.reprob}
mixup = 0.8
cutmix = 1.0
backend = "{backend}"
dali_device = "{dali_device}"
dali_threads = {a.workers}
[schedule]
epochs = 100
warmup_epochs = 0
max_steps = {a.train_steps}
[eval]
every_epochs = 0
[checkpoint]
keep_last = 1
[tracking]
enabled = false
log_every_steps = {a.log_every}
pictures = 0
"""


STEP_LINE = re.compile(r"step (\d+)\s+(.*)")


def train_wait(a: argparse.Namespace, work: Path, shards: Path, backend: str, dali_device: str,
               extra: Iterable[str] = (), tag: str = "") -> dict[str, float]:
    """Trains with the real trainer; returns img/s and the data-wait fraction after the first window.

    ``extra`` are trainer overrides (``--engine.mixed_precision=bf16`` ...); ``tag`` tells the run apart.
    With ``--engine.peak_tflops`` the result has ``mfu`` too (time-weighted like the wait).
    """
    name = f"{backend}-{dali_device}{tag}"
    path = work / f"train-{name}.toml"
    path.write_text(recipe(a, shards, backend, dali_device))
    cmd = [sys.executable, "-m", "pipeline.train", str(path), f"--run.output_dir={work / 'runs'}",
           f"--run.name={name}-{int(time.time())}", *extra]
    t0 = time.perf_counter()
    env = {**os.environ, **({"OMP_NUM_THREADS": str(a.train_threads)} if a.train_threads else {})}
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"trainer failed ({done.returncode}): {done.stderr.strip().splitlines()[-1:]}")
    windows = []
    for line in (done.stdout + done.stderr).splitlines():
        match = STEP_LINE.search(line)
        if match and "train/data_wait=" in line:
            fields = dict(kv.split("=", 1) for kv in match.group(2).split())
            windows.append((float(fields["train/img_per_s"]), float(fields["train/data_wait"]),
                            float(fields.get("train/mfu", "nan"))))
    timed = windows[1:] or windows  # the first window holds worker start-up and the first DALI build
    seconds = [a.train_batch * a.log_every / w[0] for w in timed]
    wait = sum(s * w[1] for s, w in zip(seconds, timed, strict=True)) / sum(seconds)
    mfu = sum(s * w[2] for s, w in zip(seconds, timed, strict=True)) / sum(seconds)
    ips = a.train_batch * a.log_every * len(timed) / sum(seconds)
    first = windows[0][1] if windows else float("nan")
    return {"img_per_s": ips, "wait": wait, "first_wait": first, "windows": len(timed), "wall": wall, "mfu": mfu}


def train_part(a: argparse.Namespace, work: Path, shards: Path, cuda: bool) -> None:
    """Runs the short training loop per backend and prints the data-wait table."""
    runs = [("wds", "cpu"), ("dali", "cpu")] + ([("dali", "gpu")] if cuda else [])
    threads = a.train_threads or "torch's default"
    print(f"\nTraining loop: `python -m pipeline.train`, {a.train_model} at {a.train_size}×{a.train_size}, batch "
          f"{a.train_batch}, {a.train_steps} steps, same augmentation, {a.workers} workers / DALI threads, trainer "
          f"intra-op threads: {threads}; "
          f"data wait = time the step loop waits for its next batch / wall time (windows of {a.log_every} steps, "
          "the first one excluded)\n")
    print("| backend | img/s | data wait | first window wait | windows | run wall s |\n|---|---:|---:|---:|---:|---:|")
    for backend, dev in runs:
        try:
            r = train_wait(a, work, shards, backend, dev)
            print(f"| {backend} ({dev}) | {r['img_per_s']:,.0f} | {100 * r['wait']:.0f} % | "
                  f"{100 * r['first_wait']:.0f} % | {r['windows']} | {r['wall']:.0f} |", flush=True)
        except Exception as err:  # noqa: BLE001 - report and go on
            print(f"| {backend} ({dev}) | – | – | – | – | failed: {err} |", flush=True)
    if not cuda:
        print("\nDALI GPU training loop: skipped (no CUDA device)")


# ---------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (defaults: a few minutes on 2 cores)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--work", type=Path, help="work directory, kept (default: a temporary one, removed)")
    p.add_argument("--only", nargs="+", choices=("image", "video", "train"), default=["image", "video", "train"])
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="cuda adds the DALI GPU runs; auto: when CUDA is available")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="loader workers = DALI threads")
    p.add_argument("--seconds", type=float, default=24.0, help="timed seconds per image loader (all rounds)")
    p.add_argument("--rounds", type=int, default=2, help="interleaved timing rounds per loader")
    p.add_argument("--warmup", type=int, default=4, help="untimed batches at the start of each round")
    p.add_argument("--main-threads", type=int, default=1,
                   help="torch intra-op threads of the timing process (batch augmentation on CPU, mixup)")
    g = p.add_argument_group("images")
    g.add_argument("--images", type=int, default=1200, help="training JPEGs")
    g.add_argument("--classes", type=int, default=10)
    g.add_argument("--shard-size", type=int, default=100)
    g.add_argument("--img-size", type=int, default=224)
    g.add_argument("--batch", type=int, default=32)
    g.add_argument("--shuffle-buffer", type=int, default=256)
    g.add_argument("--randaugment", default="rand-m9-mstd0.5-inc1")
    g.add_argument("--reprob", type=float, default=0.25)
    g = p.add_argument_group("video")
    g.add_argument("--clips", type=int, default=24, help="training clips")
    g.add_argument("--clip-frames", type=int, default=96, help="frames per generated clip (30 fps)")
    g.add_argument("--frames", type=int, default=16, help="frames per training clip")
    g.add_argument("--stride", type=int, default=4)
    g.add_argument("--clip-size", type=int, default=224)
    g.add_argument("--video-batch", type=int, default=2)
    g.add_argument("--video-seconds", type=float, default=16.0, help="timed seconds per video loader (all rounds)")
    g = p.add_argument_group("training loop")
    g.add_argument("--train-model", default="vit_pico_patch4_32")
    g.add_argument("--train-size", type=int, default=32)
    g.add_argument("--train-batch", type=int, default=64)
    g.add_argument("--train-steps", type=int, default=40)
    g.add_argument("--log-every", type=int, default=8)
    g.add_argument("--train-threads", type=int, default=0,
                   help="OMP_NUM_THREADS of the trainer (torch's intra-op threads); 0: torch's default")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Runs the requested parts and prints their tables."""
    a = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    skips = logging.getLogger("pipeline.data.wds")
    skips.addHandler(CountSkips())  # counted in the tables' last column instead of printed
    skips.propagate = False
    if a.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available")
    cuda = a.device == "cuda" or (a.device == "auto" and torch.cuda.is_available())
    torch.set_num_threads(a.main_threads)  # a second pool of spinning threads beside the workers costs 10-50x here
    work = a.work or Path(tempfile.mkdtemp(prefix="bench-loader-"))
    work.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()
    print(f"{os.cpu_count()} CPU cores, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; "
          f"{'CUDA: ' + torch.cuda.get_device_name() if cuda else 'no CUDA'}; torch {torch.__version__}", flush=True)
    try:
        if "image" in a.only:
            image_part(a, work, cuda)
        if "video" in a.only:
            video_part(a, work, cuda)
        if "train" in a.only:
            train_part(a, work, image_data(a, work)[1], cuda)
    finally:
        if a.work is None:
            with contextlib.suppress(OSError):
                shutil.rmtree(work)
    load = os.getloadavg()
    print(f"\nload average at the end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


if __name__ == "__main__":
    main()
