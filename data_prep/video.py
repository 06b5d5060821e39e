"""Re-encoding one source video with PyAV: time window, fixed fps, short side, short GOP.

Output formats (``VideoOptions.codec``):

* ``h264``: H.264 (libx264, yuv420p, no B-frames) in mp4, component ``mp4``; decoded by DALI on GPU
  (NVDEC) and by PyAV/torchcodec on CPU (the DALI PyPI wheel has no CPU H.264 decoder).
* ``vp9``: VP9 (libvpx-vp9, yuv420p) in webm, component ``webm``; decoded by DALI on CPU and GPU.
* ``jpeg``: one JPEG per frame, components ``f0000.jpg``, ``f0001.jpg``, ...

What happens to each kind of input (also in ``docs/data_prep.md``):

* no video stream, cannot be opened (e.g. truncated mp4 without its ``moov`` box), decode error, or
  zero frames in the window: quarantined with the reason;
* variable frame rate: converted to the fixed ``fps`` by presentation time (each output frame shows
  the source frame on screen at that instant);
* rotation metadata (display matrix): the pixels are rotated, the output carries no rotation;
* audio: dropped.

Encodes are single-threaded, which keeps the output byte-identical from run to run; parallelism
comes from the process pool (one shard per process).
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from data_prep.format import MP4, WEBM, frame_ext
from data_prep.images import Encoded, Quarantine

CODECS = ("h264", "vp9", "jpeg")


@dataclass(frozen=True)
class VideoOptions:
    """How videos are re-encoded.

    Attributes:
        codec: ``h264`` (mp4), ``vp9`` (webm) or ``jpeg`` (frame sequence).
        fps: Output frame rate.
        short_side: Downscale so the shorter side is this many pixels (never upscales).
        keyint: Keyframe interval in frames (GOP length); short GOPs make random access cheap.
        crf: Constant rate factor of the H.264 / VP9 encoder.
        quality: JPEG quality of frame sequences.
        max_seconds: Cap on the window length (guards against hour-long inputs); None for no cap.
    """

    codec: str = "h264"
    fps: float = 30.0
    short_side: int = 320
    keyint: int = 8
    crf: int = 23
    quality: int = 90
    max_seconds: float | None = 60.0


def _even(x: float) -> int:
    return max(2, int(round(x / 2)) * 2)


def _output_size(w: int, h: int, short: int) -> tuple[int, int]:
    if min(w, h) <= short:
        return _even(w), _even(h)
    scale = short / min(w, h)
    return _even(w * scale), _even(h * scale)


def _frames_at_fps(
    src: Any, vs: Any, fps: float, start: float, end: float
) -> Iterator[tuple[Any, float]]:
    """Yield ``(frame, rotation)`` resampled to ``fps`` over ``[start, end)`` by presentation time."""
    prev, prev_rot, k, t0 = None, 0.0, 0, None
    frame_dur = 1.0 / float(vs.guessed_rate or vs.average_rate or 25)
    last_time = 0.0
    for frame in src.decode(vs):
        if frame.time is None:
            continue
        t = float(frame.time)
        if t0 is None:
            t0 = max(start, t)
        if prev is not None:
            while t0 + k / fps < min(t, end):
                yield prev, prev_rot
                k += 1
        if t >= end:
            return
        prev, prev_rot, last_time = frame, float(getattr(frame, "rotation", 0) or 0), t
        if prev.duration:
            frame_dur = float(prev.duration * prev.time_base)
    if prev is not None and t0 is not None:
        while t0 + k / fps < min(last_time + frame_dur, end):
            yield prev, prev_rot
            k += 1


def _to_rgb(frame: Any, rotation: float) -> np.ndarray:
    arr = frame.to_ndarray(format="rgb24")
    turns = int(round(rotation / 90.0)) % 4
    if turns:
        arr = np.ascontiguousarray(np.rot90(arr, k=turns))
    return arr


def _resize(arr: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    if (arr.shape[1], arr.shape[0]) == size:
        return arr
    return np.asarray(Image.fromarray(arr).resize(size, Image.Resampling.BILINEAR))


class _Sink:
    """Encodes frames as they arrive, so only the compressed output is held in memory."""

    def __init__(self, opts: VideoOptions) -> None:
        self.opts = opts
        self.frames = 0
        self.size: tuple[int, int] | None = None  # (width, height) of the first frame
        self._parts: list[tuple[str, bytes]] = []
        self._buf: io.BytesIO | None = None
        self._out: Any = None
        self._stream: Any = None
        self._rate = Fraction(1)

    def _open(self, w: int, h: int) -> None:
        import av

        fmt, codec = ("mp4", "libx264") if self.opts.codec == "h264" else ("webm", "libvpx-vp9")
        self._buf = io.BytesIO()
        self._out = av.open(self._buf, "w", format=fmt, options={"fflags": "+bitexact"})
        rate = Fraction(self.opts.fps).limit_denominator(1001)
        self._rate = 1 / rate
        st = self._out.add_stream(codec, rate=rate)
        st.codec_context.time_base = self._rate
        st.width, st.height, st.pix_fmt = w, h, "yuv420p"
        st.codec_context.gop_size = self.opts.keyint
        st.codec_context.thread_count = 1  # single-threaded encoders give byte-identical output
        if self.opts.codec == "h264":
            k = self.opts.keyint
            st.options = {"crf": str(self.opts.crf), "preset": "veryfast", "bf": "0",
                          "x264-params": f"keyint={k}:min-keyint={k}:scenecut=0"}
        else:
            st.options = {"crf": str(self.opts.crf), "b": "0", "deadline": "realtime", "cpu-used": "8",
                          "row-mt": "0", "auto-alt-ref": "0", "lag-in-frames": "0"}
        self._stream = st

    def add(self, arr: np.ndarray) -> None:
        """Encode one RGB frame of shape (H, W, 3)."""
        if self.size is None:
            self.size = (arr.shape[1], arr.shape[0])
        if self.opts.codec == "jpeg":
            from PIL import Image

            buf = io.BytesIO()
            Image.fromarray(arr).save(buf, format="JPEG", quality=self.opts.quality)
            self._parts.append((frame_ext(self.frames), buf.getvalue()))
        else:
            import av

            if self._out is None:
                self._open(arr.shape[1], arr.shape[0])
            frame = av.VideoFrame.from_ndarray(arr, format="rgb24").reformat(format="yuv420p")
            # explicit timestamps: without them rate control sees undefined frame durations and the
            # output is not reproducible
            frame.pts, frame.time_base = self.frames, self._rate
            for packet in self._stream.encode(frame):
                self._out.mux(packet)
        self.frames += 1

    def finish(self) -> list[tuple[str, bytes]]:
        """Flush the encoder and return the media components."""
        if self._out is None:
            return self._parts
        for packet in self._stream.encode():
            self._out.mux(packet)
        self._out.close()
        self._out = None
        return [(MP4 if self.opts.codec == "h264" else WEBM, self._buf.getvalue())]

    def close(self) -> None:
        """Release the encoder (after an error)."""
        if self._out is not None:
            self._out.close()
            self._out = None


def reencode_video(path: Path, start: float | None, end: float | None, opts: VideoOptions) -> Encoded:
    """Cut, resample, rotate, resize and re-encode one video.

    Args:
        path: Source video file.
        start: Window start in seconds (None: the first frame).
        end: Window end in seconds (None: the last frame).
        opts: Output options.

    Returns:
        The payload to store (``fps``, ``frames`` and ``duration`` describe the output).

    Raises:
        Quarantine: If the file has no video stream, cannot be decoded, or yields no frame.
    """
    import av

    if opts.codec not in CODECS:
        raise ValueError(f"unknown video codec {opts.codec!r}; use one of {CODECS}")
    start = float(start or 0.0)
    end = math.inf if end is None else float(end)
    if opts.max_seconds is not None:
        end = min(end, start + opts.max_seconds)
    notes: list[str] = []
    sink = _Sink(opts)
    try:
        with av.open(str(path)) as src:
            if not src.streams.video:
                raise Quarantine("no video stream")
            vs = src.streams.video[0]
            vs.thread_type = "AUTO"
            if start > 0 and vs.time_base:
                src.seek(int(start / vs.time_base), stream=vs, backward=True)
            rotations, size = set(), None
            for frame, rot in _frames_at_fps(src, vs, opts.fps, start, end):
                arr = _to_rgb(frame, rot)
                rotations.add(int(round(rot)) % 360)
                if size is None:
                    size = _output_size(arr.shape[1], arr.shape[0], opts.short_side)
                sink.add(_resize(arr, size))
            if vs.average_rate and vs.guessed_rate and vs.average_rate != vs.guessed_rate:
                notes.append("variable frame rate")
        if not sink.frames:
            raise Quarantine("no frames in the time window (empty video stream)")
        components = sink.finish()
    except Quarantine:
        sink.close()
        raise
    except (av.FFmpegError, OSError, ValueError) as exc:
        sink.close()
        raise Quarantine(f"cannot decode video (truncated or corrupt): {type(exc).__name__}: {exc}") from exc
    if rotations - {0}:
        notes.append(f"rotated {sorted(rotations - {0})} degrees")
    w, h = sink.size
    n = sink.frames
    fmt = "jpeg-frames" if opts.codec == "jpeg" else opts.codec
    return Encoded(components, fmt, w, h, fps=float(opts.fps), frames=n, duration=n / opts.fps,
                   note="; ".join(notes))
