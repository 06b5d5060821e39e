"""Decoding only the sampled frames of one WebDataset video sample, on CPU.

A sample is the dict that ``webdataset.tarfile_to_samples`` yields, *before* any ``wds.decode`` stage
(which would decode every ``fNNNN.jpg`` of a frame sequence): raw ``bytes`` per component plus
``__key__``. Data prep (``data_prep/shard.py``) stores one of three media layouts:

===================  ==============================  ==========================================
component(s)         codec                           CPU decoder used here
===================  ==============================  ==========================================
``mp4``              H.264                           PyAV (DALI's CPU backend has no H.264)
``webm``             VP9                             DALI ``fn.decoders.video(device="cpu")``;
                                                     PyAV when DALI is not installed or when
                                                     ``webm_backend="pyav"``
``f0000.jpg`` ...    JPEG per frame                  PIL, only the requested ``fNNNN.jpg``
===================  ==============================  ==========================================

plus ``json`` with ``fps`` and ``frames`` (the frame count), which :func:`num_frames` and the PyAV
path use. PyAV seeks to the keyframe at or before the first wanted frame of each run of nearby
indices and decodes forward, keeping only the wanted frames; a gap of more than ``seek_gap`` frames
starts a new run (a new seek). Anything that cannot be decoded raises :class:`VideoDecodeError`
naming the sample key, so the loader can skip the sample and count it.
"""

from __future__ import annotations

import bisect
import io
import json
import logging
import os
import threading
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np

from data_prep.format import META, MP4, WEBM, frame_ext, is_frame_ext

logger = logging.getLogger(__name__)

WebmBackend = Literal["auto", "dali", "pyav"]
#: Frames between two wanted indices beyond which PyAV seeks again instead of decoding through.
DEFAULT_SEEK_GAP = 16

__all__ = ["DEFAULT_SEEK_GAP", "VideoDecodeError", "decode_frames", "dali_available", "media_format", "num_frames"]


class VideoDecodeError(RuntimeError):
    """A sample's video cannot be decoded (corrupt, truncated, missing frames or components).

    Attributes:
        key: The sample key (``__key__``), or ``"?"`` when the sample has none.
    """

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"sample {key}: {reason}")
        self.key = key


def _key(sample: Mapping[str, Any]) -> str:
    return str(sample.get("__key__", "?"))


def _meta(sample: Mapping[str, Any]) -> dict[str, Any]:
    """The sample's ``json`` component as a dict ({} when absent)."""
    raw = sample.get(META)
    if raw is None:
        return {}
    if isinstance(raw, Mapping):
        return dict(raw)
    try:
        return json.loads(raw)
    except (ValueError, TypeError) as exc:
        raise VideoDecodeError(_key(sample), f"unreadable json component: {exc}") from exc


def media_format(sample: Mapping[str, Any]) -> Literal["mp4", "webm", "jpeg"]:
    """Which media layout a sample holds.

    Raises:
        VideoDecodeError: If it has none of ``mp4``, ``webm`` or ``f0000.jpg``.
    """
    if MP4 in sample:
        return "mp4"
    if WEBM in sample:
        return "webm"
    if frame_ext(0) in sample:
        return "jpeg"
    media = sorted(k for k in sample if not k.startswith("__"))
    raise VideoDecodeError(_key(sample), f"no mp4, webm or f0000.jpg component (has {media})")


def num_frames(sample: Mapping[str, Any]) -> int:
    """The number of frames ``n`` of a sample, the range the frame samplers draw from.

    Read from ``json["frames"]`` (written by data prep); without it, counted from the ``fNNNN.jpg``
    components or from the container (stream header, else a demux pass over the packets).

    Raises:
        VideoDecodeError: If the count cannot be found or is below 1.
    """
    meta = _meta(sample)
    if "frames" in meta:
        n = int(meta["frames"])
    elif media_format(sample) == "jpeg":
        n = sum(1 for k in sample if is_frame_ext(k))
    else:
        n = _container_frames(sample)
    if n < 1:
        raise VideoDecodeError(_key(sample), f"frame count is {n}")
    return n


def _container_frames(sample: Mapping[str, Any]) -> int:
    import av

    data = sample[media_format(sample)]
    try:
        with av.open(io.BytesIO(data)) as container:
            stream = container.streams.video[0]
            if stream.frames:
                return int(stream.frames)
            return sum(1 for p in container.demux(stream) if p.size)
    except (av.FFmpegError, IndexError, OSError) as exc:
        raise VideoDecodeError(_key(sample), f"cannot read the container: {exc}") from exc


def decode_frames(
    sample: Mapping[str, Any],
    indices: Sequence[int] | np.ndarray,
    *,
    webm_backend: WebmBackend = "auto",
    seek_gap: int = DEFAULT_SEEK_GAP,
) -> np.ndarray:
    """Decodes the frames ``indices`` of one sample, and only what is needed to get them.

    Args:
        sample: Raw WebDataset sample: ``__key__``, one media layout (``mp4`` | ``webm`` |
            ``f0000.jpg`` ...) as bytes, and ``json`` (bytes or dict) with ``frames`` and ``fps``.
        indices: Frame indices, any shape, any order, repeats allowed; each in ``[0, n)``.
        webm_backend: VP9 decoder: ``"dali"``, ``"pyav"``, or ``"auto"`` (DALI if importable).
        seek_gap: PyAV only: a gap of more than this many frames between consecutive wanted
            frames is crossed by seeking rather than by decoding through.

    Returns:
        uint8 array of shape ``(*indices.shape, H, W, 3)`` (RGB); entry ``j`` is frame ``indices[j]``.

    Raises:
        VideoDecodeError: If the media is missing, corrupt or truncated, or a frame is not in it.
        ValueError: If an index is negative or not below ``json["frames"]``.
    """
    idx = np.asarray(indices, dtype=np.int64)
    flat = idx.reshape(-1)
    if flat.size == 0:
        raise ValueError("decode_frames needs at least one frame index")
    meta = _meta(sample)
    limit = int(meta.get("frames", np.iinfo(np.int64).max))
    if flat.min() < 0 or flat.max() >= limit:
        raise ValueError(f"sample {_key(sample)}: frame indices must lie in [0, {limit}), got {flat.tolist()}")
    fmt = media_format(sample)
    if fmt == "jpeg":
        frames = _decode_jpeg(sample, flat)
    elif fmt == "webm" and _use_dali(webm_backend):
        frames = _decode_dali(sample[fmt], flat, _key(sample))
    else:
        frames = _decode_pyav(sample[fmt], flat, _key(sample), meta.get("fps"), seek_gap)
    return frames.reshape(*idx.shape, *frames.shape[1:])


# ---------------------------------------------------------------- JPEG frame sequences


def _decode_jpeg(sample: Mapping[str, Any], flat: np.ndarray) -> np.ndarray:
    """Decodes each distinct ``fNNNN.jpg`` once; returns (len(flat), H, W, 3) uint8."""
    from PIL import Image

    key = _key(sample)
    decoded: dict[int, np.ndarray] = {}
    for i in np.unique(flat).tolist():
        name = frame_ext(i)
        if name not in sample:
            raise VideoDecodeError(key, f"frame component {name} is missing")
        try:
            with Image.open(io.BytesIO(sample[name])) as img:
                decoded[i] = np.asarray(img.convert("RGB"))
        except (OSError, ValueError, TypeError) as exc:
            raise VideoDecodeError(key, f"cannot decode {name}: {exc}") from exc
    return _stack(decoded, flat, key)


def _stack(decoded: Mapping[int, np.ndarray], flat: np.ndarray, key: str) -> np.ndarray:
    shapes = {a.shape for a in decoded.values()}
    if len(shapes) != 1:
        raise VideoDecodeError(key, f"frames differ in size: {sorted(shapes)}")
    return np.stack([decoded[i] for i in flat.tolist()])


# ---------------------------------------------------------------- PyAV (H.264, and VP9 fallback)


class _Clock:
    """Frame index <-> presentation timestamp of a constant-rate stream (frame ``k`` at ``k / fps``)."""

    def __init__(self, stream: Any, fps: float) -> None:
        self.start, self.base, self.fps = stream.start_time or 0, stream.time_base, fps

    def index(self, pts: int) -> int:
        return round(float((pts - self.start) * self.base) * self.fps)

    def pts(self, index: int) -> int:
        return self.start + int(index / self.fps / self.base)


def _keyframes(container: Any, stream: Any, clock: _Clock) -> list[int]:
    """Sorted frame indices of the keyframes, from one demux pass over the packets (no decoding)."""
    return sorted(clock.index(p.pts) for p in container.demux(stream) if p.is_keyframe and p.pts is not None)


def _key_before(keyframes: list[int], index: int) -> int:
    """The last keyframe at or before ``index`` (0 when none is known)."""
    pos = bisect.bisect_right(keyframes, index)
    return keyframes[pos - 1] if pos else 0


def _decode_pyav(data: bytes, flat: np.ndarray, key: str, fps: float | None, seek_gap: int) -> np.ndarray:
    """Decodes the wanted frames with PyAV; returns (len(flat), H, W, 3) uint8."""
    import av

    wanted = np.unique(flat).tolist()
    decoded: dict[int, np.ndarray] = {}
    try:
        with av.open(io.BytesIO(data)) as container:
            stream = container.streams.video[0]
            rate = float(fps or stream.average_rate or stream.guessed_rate or 0)
            if rate <= 0:
                raise VideoDecodeError(key, "no frame rate in json or stream")
            clock = _Clock(stream, rate)
            keyframes = _keyframes(container, stream, clock)
            count, seeks = _decode_forward(container, stream, clock, keyframes, wanted, seek_gap, decoded)
        logger.debug("sample %s: decoded %d frames with %d seeks for %d wanted", key, count, seeks, len(wanted))
    except VideoDecodeError:
        raise
    except (av.FFmpegError, IndexError, OSError, ValueError) as exc:
        raise VideoDecodeError(key, f"cannot decode video: {type(exc).__name__}: {exc}") from exc
    missing = sorted(set(wanted) - decoded.keys())
    if missing:
        raise VideoDecodeError(key, f"frames {missing[:8]} not found in the stream (truncated?)")
    return _stack(decoded, flat, key)


def _decode_forward(container: Any, stream: Any, clock: _Clock, keyframes: list[int], wanted: list[int],
                    seek_gap: int, out: dict[int, np.ndarray]) -> tuple[int, int]:
    """Decodes forward from the keyframe before ``wanted[0]``, keeping the wanted frames in ``out``.

    When the next wanted frame is more than ``seek_gap`` frames ahead and a keyframe lies between,
    it seeks to that keyframe instead of decoding through the gap. Each keyframe is sought at most once.

    Returns:
        (frames decoded, seeks made).
    """
    wanted_set, j, pos = set(wanted), 0, -1
    frames, sought, count, seeks = None, -1, 0, 0
    while j < len(wanted):
        target = _key_before(keyframes, wanted[j])
        if frames is None or (wanted[j] - pos > seek_gap and target > max(pos + 1, sought)):
            container.seek(clock.pts(target), stream=stream, backward=True, any_frame=False)
            frames, sought, seeks = container.decode(stream), target, seeks + 1
        frame = next(frames, None)
        if frame is None:
            break
        count += 1
        pos = clock.index(frame.pts) if frame.pts is not None else pos + 1
        if pos in wanted_set:
            out[pos] = frame.to_ndarray(format="rgb24")
        while j < len(wanted) and wanted[j] <= pos:
            j += 1
    return count, seeks


# ---------------------------------------------------------------- DALI (VP9 on CPU)


def dali_available() -> bool:
    """Whether ``nvidia.dali`` can be imported (its CPU video decoder handles VP8/VP9/MJPEG)."""
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


_warned: set[str] = set()
#: The process that first ran a DALI pipeline; a process forked from it after that must not use DALI.
_dali_pid: int | None = None


def _fallback(reason: str) -> bool:
    if reason not in _warned:
        logger.warning("decoding VP9 with PyAV: %s", reason)
        _warned.add(reason)
    return False


def _use_dali(backend: WebmBackend) -> bool:
    if backend == "pyav":
        return False
    if backend not in ("auto", "dali"):
        raise ValueError(f"webm_backend must be 'auto', 'dali' or 'pyav', got {backend!r}")
    if _dali_pid is not None and _dali_pid != os.getpid():
        # DALI is not fork-safe: a pipeline run in the parent before the fork hangs in the child.
        return _fallback("this process was forked after its parent ran DALI (start loader workers "
                         "before decoding in the main process, or use the 'spawn' start method)")
    if dali_available():
        return True
    if backend == "dali":
        raise ImportError("webm_backend='dali' but nvidia.dali is not installed")
    return _fallback("nvidia.dali is not installed")


_dali_local = threading.local()


def _dali_pipeline() -> Any:
    """This thread's batch-1 CPU pipeline: external bytes + frame list -> decoders.video (built once)."""
    global _dali_pid
    pipe = getattr(_dali_local, "pipe", None)
    if pipe is not None:
        return pipe
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali import pipeline_def

    # exec_dynamic keeps the pipeline usable after a failed sample; depth 1 = one sample per run().
    @pipeline_def(batch_size=1, num_threads=1, device_id=None, exec_dynamic=True, prefetch_queue_depth=1)
    def _pipe() -> Any:
        encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
        frames = fn.external_source(name="frames", dtype=types.INT32, ndim=1)
        # pad_mode="none": a frame past the end of a truncated stream is an error, not a black frame
        return fn.decoders.video(encoded, device="cpu", frames=frames, pad_mode="none")

    _dali_pid = os.getpid()
    pipe = _pipe()
    pipe.build()
    _dali_local.pipe = pipe
    return pipe


def _dali_reason(exc: Exception) -> str:
    """The operator's own message out of DALI's multi-line pipeline error."""
    text = str(exc)
    if "encountered:" in text:
        text = text.split("encountered:", 1)[1]
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("C++ context")]
    return lines[0] if lines else type(exc).__name__


def _decode_dali(data: bytes, flat: np.ndarray, key: str) -> np.ndarray:
    """DALI CPU ``fn.decoders.video`` with an explicit frame list; returns (len(flat), H, W, 3) uint8."""
    pipe = _dali_pipeline()
    try:
        pipe.feed_input("encoded", [np.frombuffer(data, dtype=np.uint8)])
        pipe.feed_input("frames", [flat.astype(np.int32)])
        (out,) = pipe.run()
        frames = np.array(out.as_tensor())[0]
    except RuntimeError as exc:
        _dali_local.pipe = None  # rebuild on the next call rather than trust a pipeline after an error
        raise VideoDecodeError(key, f"DALI cannot decode video: {_dali_reason(exc)}") from exc
    if frames.shape[0] != flat.size:
        raise VideoDecodeError(key, f"DALI returned {frames.shape[0]} frames for {flat.size} requested")
    return frames
