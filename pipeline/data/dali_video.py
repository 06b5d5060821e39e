"""DALI video: decode the sampled frames from the tar bytes (NVDEC on the GPU), crop and flip per clip.

Shares :mod:`pipeline.data.dali`'s plan (order, rank split, resume) and :mod:`pipeline.data.video`'s frame
samplers, so a clip's frame indices are the same whichever backend reads it. Per sample, Python reads
the sample's tar members with one ``pread`` of its byte range (:func:`~pipeline.data.reader.read_sample`),
takes the encoded ``mp4``/``webm`` bytes and the ``json`` frame count, draws the indices from
``(seed, epoch, position in the epoch)``, and feeds both to ``fn.decoders.video(frames=...)``:

* training: one random-resized crop (``data.crop_scale``/``crop_ratio``, the same for every frame) to
  ``S×S``, RandAugment or colour twist with one draw per clip, one flip decision per clip (none when
  ``video.flip`` is false), → ``3×T×S×S`` uint8;
* evaluation: ``num_clips × T`` frames decoded at once, short side resized to ``eval_short_side``
  (or ``S``), ``spatial_crops`` crops along the long side → ``V×3×T×S×S`` uint8, view ``v = c·K + j``
  as in :func:`pipeline.data.video.eval_views`.

Codecs: on the GPU (``mixed``) H.264, HEVC, VP8/VP9, AV1; DALI's CPU backend decodes VP8/VP9/MJPEG
only, so H.264 shards on a machine without a GPU need ``data.backend = 'wds'`` (PyAV). JPEG frame
sequences: only the sampled ``fNNNN.jpg`` are read, one external-source output per clip position,
decoded by ``decoders.image`` (nvJPEG on the GPU) and stacked into the clip (the whole sample is read,
one ``pread``, and the sampled frames are cut out of it).
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Iterator
from typing import Any

import numpy as np

from data_prep.format import META, VIDEO_EXTS, frame_ext
from pipeline.data.order import PlannedBatch
from pipeline.data.reader import SampleIndex, ShardFiles, read_sample
from pipeline.data.shards import LoaderError


class VideoFeed:
    """External source: per sample the encoded video (or its sampled JPEG frames), its frame indices and label.

    Args:
        index: Byte ranges of the split's samples.
        files: Open shard files.
        batches: The planned batches, in order (endless in training, cycling in evaluation).
        spec: The :class:`~pipeline.data.video.VideoSpec` (sampling rule, T, τ, clips).
        train: Random (training) or fixed (evaluation) frame indices.
        seed: Run seed; training draws come from ``(seed, epoch, position in the epoch)``.

    Attributes:
        jpeg_frames: Whether the samples are JPEG frame sequences (``fNNNN.jpg``) rather than mp4/webm.
        pending: ``(epoch, step, keys)`` of each batch handed to DALI, oldest first.
    """

    def __init__(self, index: SampleIndex, files: ShardFiles, batches: Iterator[PlannedBatch], spec: Any, *,
                 train: bool, seed: int) -> None:
        self.index, self.files, self.batches, self.spec = index, files, batches, spec
        self.train, self.seed = train, seed
        self.pending: deque[tuple[int, int, list[str]]] = deque()
        first = read_sample(index, files, 0)
        if META not in first:
            raise LoaderError(f"{index.paths[0]}: a sample has no json component (frame count); re-run vitpipe prep")
        self.jpeg_frames = not any(ext in first for ext in VIDEO_EXTS)
        if self.jpeg_frames and frame_ext(0) not in first:
            raise LoaderError(f"{index.paths[0]}: samples are neither mp4/webm videos nor fNNNN.jpg frame sequences")

    def indices(self, meta: dict[str, Any], epoch: int, position: int) -> np.ndarray:
        """The sample's frame indices, int32 ``(T,)`` in training, ``(C·T,)`` in evaluation."""
        from pipeline.data.video import sample_indices

        n = int(meta["frames"])
        rng = np.random.default_rng([self.seed, epoch, position]) if self.train else None
        return sample_indices(n, self.spec, train=self.train, rng=rng).reshape(-1).astype(np.int32)

    def __call__(self) -> tuple[list[np.ndarray], ...]:
        """The next batch (``StopIteration`` when the planned batches end).

        Returns:
            Videos: ``(encoded videos, frame indices, labels)``. JPEG frame sequences: the sampled
            frames' JPEG bytes as one output per clip position, then the labels.
        """
        batch = next(self.batches)
        videos, frames, labels, keys = [], [], [], []
        for sample_id, position in zip(batch.ids.tolist(), batch.positions.tolist(), strict=True):
            sample = read_sample(self.index, self.files, sample_id)
            meta = json.loads(sample[META])
            idx = self.indices(meta, batch.epoch, position)
            if self.jpeg_frames:  # per sample: its sampled frames
                videos.append([np.frombuffer(sample[frame_ext(int(i))], np.uint8) for i in idx])
            else:
                videos.append(np.frombuffer(next(sample[ext] for ext in VIDEO_EXTS if ext in sample), np.uint8))
            frames.append(idx)
            labels.append(np.array([int(meta["label"])], np.int64))
            keys.append(sample["__key__"])
        self.pending.append((batch.epoch, batch.step, keys))
        if not self.jpeg_frames:
            return videos, frames, labels
        return (*[list(position) for position in zip(*videos, strict=True)], labels)


def build_video_pipeline(spec: Any, source: VideoFeed, *, train: bool, device: str, batch_size: int,
                         threads: int, seed: int, device_id: int | None, randaugment: str = "",
                         color_jitter: float = 0.0, fill: int = 124) -> Any:
    """Builds the DALI video graph (once per run; the feed decides what it reads).

    Returns:
        A built pipeline with outputs ``(clips, labels)``: ``3×T×S×S`` uint8 in training,
        ``V×3×T×S×S`` uint8 in evaluation; labels ``1`` int64.
    """
    from nvidia.dali import fn, pipeline_def, types

    from pipeline.data.dali_base import parse_randaugment

    size, decode_dev = spec.img_size, "mixed" if device == "gpu" else "cpu"

    jpeg_frames = source.jpeg_frames
    positions = spec.frames * (1 if train else spec.num_clips)  # frames per sample

    @pipeline_def(batch_size=batch_size, num_threads=threads, device_id=device_id, seed=seed,
                  prefetch_queue_depth=2, enable_conditionals=bool(train and randaugment))
    def graph():  # noqa: ANN202 - DALI graph
        if jpeg_frames:  # one output per clip position, decoded by nvJPEG (mixed) and stacked into F×H×W×3
            *jpegs, labels = fn.external_source(source=source, num_outputs=positions + 1, batch=True,
                                                dtype=[types.UINT8] * positions + [types.INT64])
            frames = [fn.decoders.image(j, device=decode_dev, output_type=types.RGB) for j in jpegs]
            clips = fn.stack(*frames, axis=0, axis_name="F")
        else:
            encoded, indices, labels = fn.external_source(source=source, num_outputs=3, batch=True,
                                                          dtype=[types.UINT8, types.INT32, types.INT64])
            clips = fn.decoders.video(encoded, device=decode_dev, frames=indices, pad_mode="edge")  # F×H×W×3
        if train:
            clips = fn.random_resized_crop(clips, size=[size, size], random_area=list(spec.scale),
                                           random_aspect_ratio=list(spec.ratio), interp_type=types.INTERP_LINEAR,
                                           antialias=True)
            if randaugment:  # DALI applies each sample's drawn operations to all of its frames
                from nvidia.dali.auto_aug import rand_augment

                n, m = parse_randaugment(randaugment)
                clips = rand_augment.rand_augment(clips, n=n, m=m, num_magnitude_bins=11, shape=[size, size],
                                                  fill_value=fill, max_translate_rel=0.45)
            elif color_jitter > 0:
                lo, hi = max(0.0, 1 - color_jitter), 1 + color_jitter
                clips = fn.color_twist(clips, brightness=fn.random.uniform(range=[lo, hi]),
                                       contrast=fn.random.uniform(range=[lo, hi]),
                                       saturation=fn.random.uniform(range=[lo, hi]))
            if spec.flip:
                clips = fn.flip(clips, horizontal=fn.random.coin_flip(probability=0.5))
            clips = fn.transpose(clips, perm=[3, 0, 1, 2], output_layout="CFHW")
        else:
            clips = _eval_views(fn, types, clips, spec)
        return clips, labels.gpu() if device == "gpu" else labels

    pipe = graph()
    pipe.build()
    return pipe


def _eval_views(fn: Any, types: Any, clips: Any, spec: Any) -> Any:
    """``(C·T)×H×W×3`` → ``V×3×T×S×S``: short-side resize, ``K`` crops along the long side, views ``c·K + j``."""
    size, crops = spec.img_size, spec.spatial_crops
    clips = fn.resize(clips, resize_shorter=spec.resize_eval, interp_type=types.INTERP_LINEAR, antialias=True)
    shape = clips.shape(dtype=types.FLOAT)  # (C·T, H, W, 3)
    wide = shape[2] > shape[1]  # crops move along the long side; the short side stays centred
    positions = [0.5] if crops == 1 else [0.0, 0.5, 1.0]
    views = []
    for p in positions:
        along_x = 0.5 + (p - 0.5) * fn.cast(wide, dtype=types.FLOAT)
        along_y = 0.5 + (p - 0.5) * (1.0 - fn.cast(wide, dtype=types.FLOAT))
        views.append(fn.crop(clips, crop=[size, size], crop_pos_x=along_x, crop_pos_y=along_y))
    stacked = fn.stack(*views, axis=0)  # K×(C·T)×S×S×3
    stacked = fn.reshape(stacked, shape=[crops, spec.num_clips, spec.frames, size, size, 3])
    views = fn.transpose(stacked, perm=[1, 0, 5, 2, 3, 4])  # C×K×3×T×S×S
    return fn.reshape(views, shape=[spec.num_clips * crops, 3, spec.frames, size, size])
