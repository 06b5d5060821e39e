"""Video clips for training and evaluation: frame sampling, decoding and clip-consistent augmentation.

The loaders call this module per sample; every function is deterministic given its arguments (all
randomness comes from an explicit ``numpy.random.Generator``, never from global state).

* :class:`VideoSpec`: frames, sampling rule, crops, flip and evaluation views of one recipe
  (:func:`video_spec` has the StructViT recipes: K400, SSv2, Diving-48, FineGym).
* Frame samplers (integers only; ``n`` = frames in the video, ``T`` = clip length, ``τ`` = stride):
  :func:`dense_train_indices`, :func:`dense_eval_indices`, :func:`segment_train_indices`,
  :func:`segment_eval_indices`, dispatched by :func:`sample_indices`.
* Decoding (:mod:`pipeline.data.decode`): :func:`decode_frames` decodes only the sampled frames.
* Augmentation on a ``(T, H, W, 3)`` uint8 clip -> normalised float32 ``(3, T, S, S)``:
  :func:`train_augment` (one crop and one flip decision for all frames), :func:`eval_augment`,
  :func:`eval_views` (``num_clips × spatial_crops`` views).
* Per sample: :func:`load_train_clip` and :func:`load_eval_views`.

The exact rules are in ``docs/video_loading.md``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.config import IMAGENET_MEAN, IMAGENET_STD, NO_FLIP_VIDEO_RECIPES, VIDEO_RECIPES, DataCfg
from pipeline.data.decode import VideoDecodeError, WebmBackend, decode_frames, num_frames

logger = logging.getLogger(__name__)

Sampling = Literal["dense", "segment"]
ShortVideo = Literal["clamp", "loop"]
TrainCrop = Literal["rrc", "short_side"]

__all__ = [
    "VideoDecodeError", "VideoSpec", "decode_frames", "dense_eval_indices", "dense_train_indices",
    "eval_augment", "eval_views", "load_eval_views", "load_train_clip", "num_frames", "sample_indices",
    "segment_eval_indices", "segment_train_indices", "train_augment", "video_spec", "video_spec_of",
]


@dataclass(frozen=True, kw_only=True)
class VideoSpec:
    """How clips are sampled, decoded and augmented: the per-sample parameters of the clip functions.

    Derived from the run config by :func:`video_spec_of` (``data.video`` + the ``data`` keys it shares);
    its checks guard direct library use, the config's own validation reports user errors.
    """

    frames: int = 16
    """Frames per clip ``T``."""
    stride: int = 4
    """Dense sampling: frame step ``τ`` between clip frames, in stored frames (ignored by segment sampling)."""
    sampling: Sampling = "dense"
    """``"dense"`` (Kinetics: ``T`` frames ``τ`` apart) or ``"segment"`` (SSv2/Diving-48/FineGym: one frame
    from each of ``T`` equal segments, TSN style)."""
    short_video: ShortVideo = "clamp"
    """Dense sampling of a video shorter than the clip span: ``"clamp"`` repeats the last frame,
    ``"loop"`` wraps round to frame 0."""
    num_clips: int = 1
    """Evaluation: temporal clips per video (dense: evenly spaced starts; segment: offsets within segments)."""
    spatial_crops: int = 1
    """Evaluation: 1 (centre) or 3 (left/centre/right, or top/centre/bottom, along the long side)."""
    img_size: int = 224
    """Output side ``S`` of the square crops, in training and evaluation."""
    train_crop: TrainCrop = "rrc"
    """Training crop: ``"rrc"`` (random-resized crop with ``scale``/``ratio``) or ``"short_side"`` (resize the
    short side to a random length in ``short_side_range``, then a random ``S × S`` crop)."""
    scale: tuple[float, float] = (0.08, 1.0)
    """``"rrc"``: crop area range, as fractions of the frame area."""
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    """``"rrc"``: crop aspect-ratio (width / height) range, sampled log-uniformly."""
    short_side_range: tuple[int, int] = (256, 320)
    """``"short_side"``: inclusive range of the resized short side (both ≥ ``img_size``)."""
    eval_short_side: int = 0
    """Evaluation: resize the short side to this before cropping; 0 means ``img_size``."""
    flip: bool = True
    """Training: horizontal flip with probability 0.5 (False for direction-dependent labels, e.g. SSv2)."""
    interpolation: Literal["bilinear", "bicubic"] = "bilinear"
    """Resize filter (antialiased when downscaling)."""
    mean: tuple[float, float, float] = IMAGENET_MEAN
    """Per-channel normalisation mean (0-1 scale)."""
    std: tuple[float, float, float] = IMAGENET_STD
    """Per-channel normalisation standard deviation (0-1 scale)."""
    webm_backend: WebmBackend = "auto"
    """VP9 decoder on CPU: ``"dali"``, ``"pyav"`` or ``"auto"`` (DALI when installed)."""

    def __post_init__(self) -> None:
        for name in ("scale", "ratio", "short_side_range", "mean", "std"):  # TOML arrays arrive as lists
            object.__setattr__(self, name, tuple(getattr(self, name)))
        _require(self.frames >= 1, "frames", self.frames, ">= 1")
        _require(self.stride >= 1, "stride", self.stride, ">= 1")
        _require(self.sampling in ("dense", "segment"), "sampling", self.sampling, "'dense' or 'segment'")
        _require(self.short_video in ("clamp", "loop"), "short_video", self.short_video, "'clamp' or 'loop'")
        _require(self.num_clips >= 1, "num_clips", self.num_clips, ">= 1")
        _require(self.spatial_crops in (1, 3), "spatial_crops", self.spatial_crops, "1 or 3")
        _require(self.img_size >= 8, "img_size", self.img_size, ">= 8")
        _require(self.train_crop in ("rrc", "short_side"), "train_crop", self.train_crop, "'rrc' or 'short_side'")
        _require(0 < self.scale[0] <= self.scale[1] <= 1, "scale", self.scale, "0 < min <= max <= 1")
        _require(0 < self.ratio[0] <= self.ratio[1], "ratio", self.ratio, "0 < min <= max")
        lo, hi = self.short_side_range
        _require(self.img_size <= lo <= hi, "short_side_range", self.short_side_range, "img_size <= min <= max")
        _require(self.eval_short_side == 0 or self.eval_short_side >= self.img_size, "eval_short_side",
                 self.eval_short_side, "0 or >= img_size")
        _require(self.interpolation in ("bilinear", "bicubic"), "interpolation", self.interpolation,
                 "'bilinear' or 'bicubic'")
        _require(len(self.mean) == 3 and len(self.std) == 3 and all(s > 0 for s in self.std), "mean/std",
                 (self.mean, self.std), "three values each, std positive")
        _require(self.webm_backend in ("auto", "dali", "pyav"), "webm_backend", self.webm_backend,
                 "'auto', 'dali' or 'pyav'")

    @property
    def views(self) -> int:
        """Evaluation views per video: ``num_clips × spatial_crops``."""
        return self.num_clips * self.spatial_crops

    @property
    def resize_eval(self) -> int:
        """The evaluation short side (``eval_short_side``, or ``img_size`` when 0)."""
        return self.eval_short_side or self.img_size

    def to_dict(self) -> dict[str, Any]:
        """Plain values, for logging and the resolved config."""
        return asdict(self)


def _require(ok: bool, name: str, value: Any, rule: str) -> None:
    if not ok:
        raise ValueError(f"video.{name} = {value!r}: must be {rule}")


def video_spec(recipe: str, **overrides: Any) -> VideoSpec:
    """A recipe's :class:`VideoSpec`, overrides applied last (e.g. ``video_spec("k400", frames=32)``).

    Raises:
        ValueError: For an unknown recipe name.
    """
    if recipe not in VIDEO_RECIPES:
        raise ValueError(f"unknown video recipe {recipe!r}; known: {sorted(VIDEO_RECIPES)}")
    return VideoSpec(**{**VIDEO_RECIPES[recipe], "flip": recipe not in NO_FLIP_VIDEO_RECIPES, **overrides})


def video_spec_of(data: DataCfg) -> VideoSpec:
    """The clip parameters of a run.

    ``data.video`` gives the sampling and the views; the crop size, crop range, flip (``hflip > 0``) and
    normalisation come from the ``data`` section. The config was validated when it loaded.
    """
    v = data.video
    return VideoSpec(
        frames=v.frames, stride=v.stride, sampling=v.sampling, short_video=v.short_video, num_clips=v.num_clips,
        spatial_crops=v.spatial_crops, img_size=data.img_size, train_crop=v.train_crop, scale=data.crop_scale,
        ratio=data.crop_ratio, short_side_range=v.short_side_range, eval_short_side=v.eval_short_side,
        flip=data.hflip > 0, interpolation=v.interpolation, mean=data.mean, std=data.std,
        webm_backend=v.webm_backend)


# ---------------------------------------------------------------- frame samplers


def _check_counts(n: int, frames: int, stride: int = 1, num_clips: int = 1) -> None:
    if n < 1 or frames < 1 or stride < 1 or num_clips < 1:
        raise ValueError(f"need n, frames, stride, num_clips >= 1; got {n}, {frames}, {stride}, {num_clips}")


def _dense_clip(n: int, start: int, frames: int, stride: int, short_video: ShortVideo) -> np.ndarray:
    """``start + τ·t`` for t < T, clamped to ``n - 1`` or wrapped modulo ``n``; shape (T,)."""
    idx = start + stride * np.arange(frames, dtype=np.int64)
    if short_video == "loop":
        return idx % n
    if short_video == "clamp":
        return np.minimum(idx, n - 1)
    raise ValueError(f"short_video must be 'clamp' or 'loop', got {short_video!r}")


def dense_train_indices(n: int, frames: int, stride: int, rng: np.random.Generator, *,
                        short_video: ShortVideo = "clamp") -> np.ndarray:
    """Dense training clip: ``T`` frames ``τ`` apart from a uniformly random start.

    With span ``L = (T-1)·τ + 1``: if ``n >= L``, ``start = rng.integers(0, n - L + 1)``, i.e.
    ``start ~ U{0, …, n - (T-1)τ - 1}``, and frame ``t`` is ``start + τ·t``. If ``n < L``, no number is
    drawn, ``start = 0`` and ``τ·t`` is clamped to ``n - 1`` (``"clamp"``) or taken modulo ``n`` (``"loop"``).

    Args:
        n: Frames in the video.
        frames: Clip length ``T``.
        stride: Frame step ``τ``.
        rng: Source of the start.
        short_video: Rule for videos shorter than the span.

    Returns:
        int64 array of shape (T,).
    """
    _check_counts(n, frames, stride)
    span = (frames - 1) * stride + 1
    start = int(rng.integers(0, n - span + 1)) if n >= span else 0
    return _dense_clip(n, start, frames, stride, short_video)


def dense_eval_indices(n: int, frames: int, stride: int, num_clips: int, *,
                       short_video: ShortVideo = "clamp") -> np.ndarray:
    """Dense evaluation clips with evenly spaced starts covering the video end to end.

    With ``Δ = max(n - L, 0)`` and ``L = (T-1)·τ + 1``: clip ``k`` of ``C`` starts at
    ``⌊k·Δ / (C-1)⌋`` (so the first starts at 0 and the last ends on the last frame); a single clip
    starts at ``⌊Δ / 2⌋`` (centred). Short videos follow ``short_video`` as in :func:`dense_train_indices`.

    Returns:
        int64 array of shape (num_clips, T).
    """
    _check_counts(n, frames, stride, num_clips)
    delta = max(n - ((frames - 1) * stride + 1), 0)
    if num_clips == 1:
        starts = [delta // 2]
    else:
        starts = [k * delta // (num_clips - 1) for k in range(num_clips)]
    return np.stack([_dense_clip(n, s, frames, stride, short_video) for s in starts])


def segment_train_indices(n: int, frames: int, rng: np.random.Generator) -> np.ndarray:
    """Segment (TSN) training sampling: one uniformly random frame from each of ``T`` equal segments.

    Segment ``i`` is the interval ``[i·n/T, (i+1)·n/T)`` of the time axis; with ``u = rng.random(T)``
    frame ``i`` is ``⌊(i + u_i)·n / T⌋``. This is defined for every ``n >= 1``: when ``n < T`` a
    frame spans several segments and repeats.

    Returns:
        int64 array of shape (T,), non-decreasing, in ``[0, n)``.
    """
    _check_counts(n, frames)
    u = rng.random(frames)
    idx = np.floor((np.arange(frames) + u) * n / frames).astype(np.int64)
    return np.minimum(idx, n - 1)  # guards a float product that rounds up to n


def segment_eval_indices(n: int, frames: int, num_clips: int = 1) -> np.ndarray:
    """Segment evaluation: fixed offsets within the ``T`` equal segments.

    Clip ``k`` of ``C`` takes frame ``⌊(i + (k + ½)/C)·n / T⌋ = ⌊(2(iC + k) + 1)·n / (2TC)⌋`` from
    segment ``i`` (integer arithmetic). One clip takes the middle frame of each segment; ``C`` clips
    together are the middle frames of ``T·C`` equal segments, dealt out in turn.

    Returns:
        int64 array of shape (num_clips, T).
    """
    _check_counts(n, frames, num_clips=num_clips)
    i = np.arange(frames, dtype=np.int64)[None, :]
    k = np.arange(num_clips, dtype=np.int64)[:, None]
    return (2 * (i * num_clips + k) + 1) * n // (2 * frames * num_clips)


def sample_indices(n: int, spec: VideoSpec, *, train: bool, rng: np.random.Generator | None = None) -> np.ndarray:
    """The frame indices of one video under ``spec``.

    Args:
        n: Frames in the video.
        spec: Sampling rule, ``T``, ``τ`` and ``num_clips``.
        train: Training (one random clip) or evaluation (``num_clips`` fixed clips).
        rng: Required for training.

    Returns:
        int64 array, (T,) in training, (num_clips, T) in evaluation.
    """
    if train:
        if rng is None:
            raise ValueError("training sampling needs a numpy Generator")
        if spec.sampling == "dense":
            return dense_train_indices(n, spec.frames, spec.stride, rng, short_video=spec.short_video)
        return segment_train_indices(n, spec.frames, rng)
    if spec.sampling == "dense":
        return dense_eval_indices(n, spec.frames, spec.stride, spec.num_clips, short_video=spec.short_video)
    return segment_eval_indices(n, spec.frames, spec.num_clips)


# ---------------------------------------------------------------- clip augmentation


def _as_tensor(clip: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(T, H, W, 3) uint8 array or tensor -> (T, 3, H, W) uint8 tensor (a view where possible)."""
    t = torch.as_tensor(clip)
    if t.dtype != torch.uint8 or t.ndim != 4 or t.shape[-1] != 3:
        raise ValueError(f"expected a (T, H, W, 3) uint8 clip, got {tuple(t.shape)} {t.dtype}")
    return t.permute(0, 3, 1, 2)


def _resize(x: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """(T, 3, H, W) uint8 -> (T, 3, h, w) uint8, antialiased; returned as is when the size is unchanged.

    Resizing uint8 in channels-last layout is torch's fast CPU path (3-5× faster than float32).
    """
    if tuple(x.shape[-2:]) == size:
        return x
    x = x.contiguous(memory_format=torch.channels_last)
    return F.interpolate(x, size=size, mode=mode, align_corners=False, antialias=True)


def _finish(x: torch.Tensor, spec: VideoSpec, normalize: bool) -> torch.Tensor:
    """(T, 3, S, S) uint8 -> (3, T, S, S) contiguous: float32 ``(x/255 - mean) / std``, or uint8 as is."""
    if not normalize:
        return x.permute(1, 0, 2, 3).contiguous()
    out = torch.empty((x.shape[1], x.shape[0], *x.shape[2:]), dtype=torch.float32)
    out.copy_(x.permute(1, 0, 2, 3))
    scale = 1.0 / (255.0 * torch.tensor(spec.std, dtype=torch.float32).view(3, 1, 1, 1))
    shift = -torch.tensor(spec.mean, dtype=torch.float32).view(3, 1, 1, 1) / torch.tensor(spec.std).view(3, 1, 1, 1)
    return out.mul_(scale).add_(shift)


def _short_side_size(h: int, w: int, short: int) -> tuple[int, int]:
    """(h, w) with the short side scaled to ``short``, the long side rounded."""
    if h <= w:
        return short, max(short, round(w * short / h))
    return max(short, round(h * short / w)), short


def rrc_box(h: int, w: int, scale: tuple[float, float], ratio: tuple[float, float],
            rng: np.random.Generator) -> tuple[int, int, int, int]:
    """A random-resized-crop box ``(top, left, height, width)`` (torchvision's rule, numpy RNG).

    Up to 10 tries: area ``~ U(scale)·h·w``, aspect ``~ exp(U(log ratio))``; the first box that fits is
    placed uniformly. Otherwise the whole frame, cropped centrally to the nearest allowed ratio.
    """
    area = h * w
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            return int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1)), ch, cw
    if w / h < ratio[0]:
        cw, ch = w, round(w / ratio[0])
    elif w / h > ratio[1]:
        cw, ch = round(h * ratio[1]), h
    else:
        cw, ch = w, h
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def _train_crop(x: torch.Tensor, spec: VideoSpec, rng: np.random.Generator) -> torch.Tensor:
    """One crop for the whole clip: (T, 3, H, W) uint8 -> (T, 3, S, S) uint8."""
    s = spec.img_size
    h, w = x.shape[-2:]
    if spec.train_crop == "rrc":
        top, left, ch, cw = rrc_box(h, w, spec.scale, spec.ratio, rng)
        return _resize(x[..., top : top + ch, left : left + cw], (s, s), spec.interpolation)
    short = int(rng.integers(spec.short_side_range[0], spec.short_side_range[1] + 1))
    x = _resize(x, _short_side_size(h, w, short), spec.interpolation)
    top = int(rng.integers(0, x.shape[-2] - s + 1))
    left = int(rng.integers(0, x.shape[-1] - s + 1))
    return x[..., top : top + s, left : left + s]


def train_augment(clip: np.ndarray | torch.Tensor, spec: VideoSpec, rng: np.random.Generator, *,
                  normalize: bool = True) -> torch.Tensor:
    """Training augmentation, identical on every frame: one crop, one flip decision, normalisation.

    Draw order from ``rng``: the crop (``rrc_box``, or short side then top then left), then one
    ``rng.random()`` for the flip, drawn even when ``spec.flip`` is False (so flip on/off changes
    nothing else) and applied only when it is True and the number is below 0.5.

    Args:
        clip: (T, H, W, 3) uint8 RGB frames.
        spec: Crop mode and ranges, ``img_size``, ``flip``, mean/std.
        rng: Per-sample generator (the loader seeds it from the sample's seed).
        normalize: False returns the uint8 pixels (for loaders that normalise on the device).

    Returns:
        float32 tensor of shape (3, T, S, S), ``S = spec.img_size`` (uint8 when ``normalize`` is False).
    """
    x = _train_crop(_as_tensor(clip), spec, rng)
    if rng.random() < 0.5 and spec.flip:
        x = x.flip(-1)
    return _finish(x, spec, normalize)


def crop_offsets(length: int, size: int, crops: int) -> list[int]:
    """Offsets of ``crops`` windows of ``size`` along an axis of ``length``.

    One crop: centred, ``⌈(length - size)/2⌉``; three: ``0``, ``⌈(length - size)/2⌉`` and
    ``length - size`` (PySlowFast's ``uniform_crop``).
    """
    centre = (length - size + 1) // 2
    return [centre] if crops == 1 else [0, centre, length - size]


def _eval_crops(x: torch.Tensor, spec: VideoSpec) -> list[torch.Tensor]:
    """(T, 3, H, W) uint8 -> ``spatial_crops`` tensors (T, 3, S, S) uint8, along the long side."""
    s = spec.img_size
    x = _resize(x, _short_side_size(*x.shape[-2:], spec.resize_eval), spec.interpolation)
    h, w = x.shape[-2:]
    if w >= h:  # crops move along the width; the height is centre-cropped
        top = crop_offsets(h, s, 1)[0]
        return [x[..., top : top + s, left : left + s] for left in crop_offsets(w, s, spec.spatial_crops)]
    left = crop_offsets(w, s, 1)[0]
    return [x[..., top : top + s, left : left + s] for top in crop_offsets(h, s, spec.spatial_crops)]


def eval_augment(clip: np.ndarray | torch.Tensor, spec: VideoSpec, *, normalize: bool = True) -> torch.Tensor:
    """Evaluation single view: resize the short side to ``spec.resize_eval``, centre crop, normalise.

    Args:
        clip: (T, H, W, 3) uint8 RGB frames.
        spec: ``img_size``, ``eval_short_side``, mean/std.
        normalize: False returns uint8 pixels.

    Returns:
        float32 (or uint8) tensor of shape (3, T, S, S).
    """
    return eval_views(torch.as_tensor(clip)[None], _one_view(spec), normalize=normalize)[0]


def _one_view(spec: VideoSpec) -> VideoSpec:
    if spec.spatial_crops == 1:
        return spec
    return VideoSpec(**{**spec.to_dict(), "spatial_crops": 1})


def eval_views(clips: np.ndarray | torch.Tensor, spec: VideoSpec, *, normalize: bool = True) -> torch.Tensor:
    """Multi-view evaluation: every temporal clip × ``spec.spatial_crops`` spatial crops.

    View ``v = c · spatial_crops + j`` is clip ``c`` with crop ``j`` (0 = left/top, 1 = centre,
    2 = right/bottom with three crops). Scores are meant to be averaged over the views.

    Args:
        clips: (C, T, H, W, 3) uint8, the decoded frames of ``C`` temporal clips.
        spec: ``spatial_crops``, ``img_size``, ``eval_short_side``, mean/std.
        normalize: False returns uint8 pixels.

    Returns:
        float32 (or uint8) tensor of shape (C · spatial_crops, 3, T, S, S).
    """
    clips = torch.as_tensor(clips)
    if clips.ndim != 5:
        raise ValueError(f"expected (C, T, H, W, 3) clips, got {tuple(clips.shape)}")
    views = [_finish(crop, spec, normalize) for clip in clips for crop in _eval_crops(_as_tensor(clip), spec)]
    return torch.stack(views)


# ---------------------------------------------------------------- one sample


def load_train_clip(sample: Mapping[str, Any], spec: VideoSpec, rng: np.random.Generator | int, *,
                    normalize: bool = True) -> torch.Tensor:
    """Sample, decode and augment one training clip from a raw WebDataset sample.

    Args:
        sample: Raw sample (see :func:`decode_frames`).
        spec: The recipe.
        rng: Generator, or an integer seed for ``numpy.random.default_rng`` (the loader's per-sample seed).
            Indices are drawn first, then the augmentation.
        normalize: False returns uint8 pixels (for loaders that normalise on the device).

    Returns:
        float32 (or uint8) tensor of shape (3, T, S, S).

    Raises:
        VideoDecodeError: If the sample cannot be decoded.
    """
    rng = np.random.default_rng(rng) if not isinstance(rng, np.random.Generator) else rng
    idx = sample_indices(num_frames(sample), spec, train=True, rng=rng)
    clip = decode_frames(sample, idx, webm_backend=spec.webm_backend)
    return train_augment(clip, spec, rng, normalize=normalize)


def load_eval_views(sample: Mapping[str, Any], spec: VideoSpec, *, normalize: bool = True) -> torch.Tensor:
    """Decode the ``num_clips`` evaluation clips of one sample (each frame once) and make all views.

    Args:
        sample: Raw sample (see :func:`decode_frames`).
        spec: The recipe.
        normalize: False returns uint8 pixels.

    Returns:
        float32 (or uint8) tensor of shape (num_clips · spatial_crops, 3, T, S, S).

    Raises:
        VideoDecodeError: If the sample cannot be decoded.
    """
    idx = sample_indices(num_frames(sample), spec, train=False)
    clips = decode_frames(sample, idx, webm_backend=spec.webm_backend)  # (C, T, H, W, 3)
    return eval_views(clips, spec, normalize=normalize)
