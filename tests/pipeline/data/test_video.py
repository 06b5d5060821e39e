"""Video clips: frame samplers, decoding only the sampled frames (H.264 / VP9 / JPEG), clip augmentation."""

from __future__ import annotations

import io
import json
import logging
import multiprocessing
import multiprocessing.queues
import re

import av
import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.data.decode import dali_available
from pipeline.data.video import (
    VideoDecodeError,
    VideoSpec,
    crop_offsets,
    decode_frames,
    dense_eval_indices,
    dense_train_indices,
    eval_augment,
    eval_views,
    load_eval_views,
    load_train_clip,
    num_frames,
    sample_indices,
    segment_eval_indices,
    segment_train_indices,
    train_augment,
    video_spec,
)

N, W, H, FPS = 24, 64, 48, 8
TOL = 4  # grey levels; frames are 10 apart


def grey(i: int) -> int:
    return 10 * i


# ---------------------------------------------------------------- tiny real videos


def encode_video(codec: str, fmt: str, n: int = N, gop: int = 4, bframes: bool = False) -> bytes:
    """Frame i is flat grey 10·i, as data prep writes it (constant rate, pts = i)."""
    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt) as c:
        st = c.add_stream(codec, rate=FPS)
        st.width, st.height, st.pix_fmt = W, H, "yuv420p"
        st.codec_context.gop_size = gop
        if codec == "libx264":
            st.options = {"bf": "2" if bframes else "0", "x264-params": f"keyint={gop}:min-keyint={gop}:scenecut=0"}
        for i in range(n):
            frame = av.VideoFrame.from_ndarray(np.full((H, W, 3), grey(i), np.uint8), format="rgb24")
            for p in st.encode(frame):
                c.mux(p)
        for p in st.encode():
            c.mux(p)
    return buf.getvalue()


def jpeg(i: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((H, W, 3), grey(i), np.uint8)).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def meta(n: int = N) -> bytes:
    return json.dumps({"fps": float(FPS), "frames": n, "label": 3}).encode()


@pytest.fixture(scope="module")
def samples() -> dict[str, dict]:
    """Raw WebDataset samples (as tarfile_to_samples yields them) in each media layout."""
    jpgs = {f"f{i:04d}.jpg": jpeg(i) for i in range(N)}
    return {
        "mp4": {"__key__": "train_00000001", "mp4": encode_video("libx264", "mp4"), "json": meta()},
        "mp4-bframes-longgop": {"__key__": "train_00000002", "json": meta(),
                                "mp4": encode_video("libx264", "mp4", gop=N, bframes=True)},
        "webm": {"__key__": "train_00000003", "webm": encode_video("libvpx-vp9", "webm"), "json": meta()},
        "jpeg": {"__key__": "train_00000004", **jpgs, "json": meta()},
    }


def levels(frames: np.ndarray) -> np.ndarray:
    """Mean grey level of each frame; frames (..., H, W, 3) -> (...)."""
    return frames.astype(np.float64).mean(axis=(-3, -2, -1))


# ---------------------------------------------------------------- samplers


def test_dense_train_start_is_uniform_over_the_valid_range() -> None:
    n, t, tau = 100, 8, 4  # span 29 -> start in [0, 71]
    for seed in range(5):
        expect_start = np.random.default_rng(seed).integers(0, 72)
        idx = dense_train_indices(n, t, tau, np.random.default_rng(seed))
        assert idx.dtype == np.int64 and idx.tolist() == [expect_start + tau * k for k in range(t)]
    starts = {int(dense_train_indices(n, t, tau, np.random.default_rng(s))[0]) for s in range(2000)}
    assert starts == set(range(72))
    assert dense_train_indices(29, t, tau, np.random.default_rng(0)).tolist() == list(range(0, 29, 4))


@pytest.mark.parametrize(("n", "t", "tau", "short", "expect"), [
    (10, 4, 4, "clamp", [0, 4, 8, 9]),
    (10, 4, 4, "loop", [0, 4, 8, 2]),
    (3, 5, 1, "clamp", [0, 1, 2, 2, 2]),
    (3, 5, 1, "loop", [0, 1, 2, 0, 1]),
    (1, 3, 2, "clamp", [0, 0, 0]),
])
def test_dense_short_video_rule(n: int, t: int, tau: int, short: str, expect: list[int]) -> None:
    rng = np.random.default_rng(0)
    assert dense_train_indices(n, t, tau, rng, short_video=short).tolist() == expect
    assert rng.random() == np.random.default_rng(0).random()  # nothing drawn for a short video
    assert dense_eval_indices(n, t, tau, 3, short_video=short).tolist() == [expect] * 3


def test_dense_eval_clips_evenly_spaced() -> None:
    idx = dense_eval_indices(100, 8, 4, 4)  # Δ = 71
    assert idx.shape == (4, 8) and idx.dtype == np.int64
    assert idx[:, 0].tolist() == [0, 23, 47, 71] and idx[-1, -1] == 99
    assert (np.diff(idx, axis=1) == 4).all()
    assert dense_eval_indices(100, 8, 4, 1)[0, 0] == 35  # ⌊71/2⌋, centred
    assert dense_eval_indices(30, 8, 4, 2)[:, 0].tolist() == [0, 1]


@pytest.mark.parametrize(("n", "t", "clips", "expect"), [
    (24, 8, 1, [[1, 4, 7, 10, 13, 16, 19, 22]]),
    (5, 8, 1, [[0, 0, 1, 2, 2, 3, 4, 4]]),  # n < T: frames repeat
    (16, 4, 2, [[1, 5, 9, 13], [3, 7, 11, 15]]),
    (100, 4, 3, [[4, 29, 54, 79], [12, 37, 62, 87], [20, 45, 70, 95]]),
    (1, 3, 2, [[0, 0, 0], [0, 0, 0]]),
])
def test_segment_eval_offsets(n: int, t: int, clips: int, expect: list[list[int]]) -> None:
    idx = segment_eval_indices(n, t, clips)
    assert idx.dtype == np.int64 and idx.tolist() == expect


@pytest.mark.parametrize(("n", "t"), [(24, 8), (100, 16), (5, 8), (1, 4), (7, 7)])
def test_segment_train_one_frame_per_segment(n: int, t: int) -> None:
    for seed in range(20):
        idx = segment_train_indices(n, t, np.random.default_rng(seed))
        u = np.random.default_rng(seed).random(t)
        assert idx.dtype == np.int64 and idx.tolist() == np.floor((np.arange(t) + u) * n / t).astype(int).tolist()
        i = np.arange(t)
        assert (idx >= np.floor(i * n / t)).all() and (idx < np.ceil((i + 1) * n / t)).all()
    if n >= t:  # every frame of a segment is reachable
        seen = {int(segment_train_indices(n, t, np.random.default_rng(s))[0]) for s in range(500)}
        assert seen == set(range(int(np.ceil(n / t))))


def test_sample_indices_dispatch_and_errors() -> None:
    dense, seg = VideoSpec(frames=4, stride=2, num_clips=2), VideoSpec(frames=4, sampling="segment", num_clips=3)
    assert sample_indices(50, dense, train=True, rng=np.random.default_rng(1)).shape == (4,)
    assert sample_indices(50, dense, train=False).tolist() == dense_eval_indices(50, 4, 2, 2).tolist()
    assert sample_indices(50, seg, train=False).shape == (3, 4)
    with pytest.raises(ValueError, match="Generator"):
        sample_indices(50, dense, train=True)
    with pytest.raises(ValueError, match="n, frames"):
        dense_train_indices(0, 4, 2, np.random.default_rng(0))


def test_video_spec_validation_and_recipes() -> None:
    with pytest.raises(ValueError, match="spatial_crops"):
        VideoSpec(spatial_crops=2)
    with pytest.raises(ValueError, match="sampling"):
        VideoSpec(sampling="random")
    with pytest.raises(ValueError, match="short_side_range"):
        VideoSpec(img_size=224, short_side_range=(128, 320))
    from_toml = VideoSpec(scale=[0.2, 1.0], mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5])
    assert from_toml.scale == (0.2, 1.0) and hash(from_toml) and VideoSpec(**from_toml.to_dict()) == from_toml
    ssv2 = video_spec("ssv2")
    assert (ssv2.sampling, ssv2.flip, ssv2.views) == ("segment", False, 3)
    assert video_spec("k400", frames=32).frames == 32 and video_spec("k400").views == 4
    with pytest.raises(ValueError, match="unknown video recipe"):
        video_spec("k700")


# ---------------------------------------------------------------- decoding

FORMATS = ["mp4", "mp4-bframes-longgop", "webm-dali", "webm-pyav", "jpeg"]


def _sample_and_backend(samples: dict[str, dict], fmt: str) -> tuple[dict, str]:
    if fmt.startswith("webm"):
        backend = fmt.split("-")[1]
        if backend == "dali" and not dali_available():
            pytest.skip("nvidia.dali not installed")
        return samples["webm"], backend
    return samples[fmt], "auto"


@pytest.mark.parametrize("fmt", FORMATS)
def test_decode_returns_the_requested_frames(samples: dict[str, dict], fmt: str) -> None:
    sample, backend = _sample_and_backend(samples, fmt)
    indices = [3, 17, 5, 5, 23, 0, 12]  # any order, repeats, far apart (seeks with gap 4)
    frames = decode_frames(sample, indices, webm_backend=backend, seek_gap=4)
    assert frames.shape == (7, H, W, 3) and frames.dtype == np.uint8
    np.testing.assert_allclose(levels(frames), [grey(i) for i in indices], atol=TOL)
    clips = decode_frames(sample, np.array([[1, 2], [22, 23]]), webm_backend=backend)
    assert clips.shape == (2, 2, H, W, 3)
    np.testing.assert_allclose(levels(clips), [[10, 20], [220, 230]], atol=TOL)


@pytest.mark.parametrize(("fmt", "most"), [("mp4", 5), ("webm-pyav", 5), ("mp4-bframes-longgop", 21)])
def test_pyav_seeks_over_frames_it_does_not_need(samples: dict[str, dict], caplog: pytest.LogCaptureFixture,
                                                 fmt: str, most: int) -> None:
    sample, backend = _sample_and_backend(samples, fmt)
    with caplog.at_level(logging.DEBUG, logger="pipeline.data.decode"):
        frames = decode_frames(sample, [3, 20], webm_backend=backend, seek_gap=4)
    np.testing.assert_allclose(levels(frames), [30, 200], atol=TOL)
    decoded = int(re.search(r"decoded (\d+) frames", caplog.text).group(1))
    assert decoded == most  # GOP 4: frames 0-3, a seek to keyframe 20, frame 20; one GOP: 0-20 once


def _decode_in_child(sample: dict, queue: multiprocessing.queues.Queue) -> None:
    queue.put(levels(decode_frames(sample, [2, 7])).tolist())


@pytest.mark.skipif(not dali_available(), reason="nvidia.dali not installed")
def test_forked_worker_after_dali_in_parent_does_not_hang(samples: dict[str, dict]) -> None:
    """DALI is not fork-safe: a child forked after the parent ran it decodes VP9 with PyAV instead."""
    decode_frames(samples["webm"], [0], webm_backend="dali")  # the parent runs a DALI pipeline
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_decode_in_child, args=(samples["webm"], queue))
    child.start()
    child.join(timeout=20)
    if child.is_alive():
        child.kill()
        pytest.fail("the forked child hung")
    np.testing.assert_allclose(queue.get(timeout=5), [20, 70], atol=TOL)


def test_num_frames_from_json_and_without_it(samples: dict[str, dict]) -> None:
    for name in ("mp4", "webm", "jpeg"):
        sample = samples[name]
        assert num_frames(sample) == N
        assert num_frames({k: v for k, v in sample.items() if k != "json"}) == N


def test_jpeg_decodes_only_the_sampled_components(samples: dict[str, dict]) -> None:
    sample = dict(samples["jpeg"])
    for i in range(N):
        if i not in (2, 9):
            sample[f"f{i:04d}.jpg"] = b"not a jpeg"  # would fail if touched
    frames = decode_frames(sample, [9, 2, 9])
    np.testing.assert_allclose(levels(frames), [90, 20, 90], atol=TOL)
    with pytest.raises(VideoDecodeError, match=r"train_00000004: cannot decode f0003\.jpg"):
        decode_frames(sample, [3])
    del sample["f0002.jpg"]
    with pytest.raises(VideoDecodeError, match="f0002.jpg is missing"):
        decode_frames(sample, [2])


@pytest.mark.parametrize("fmt", ["mp4", "webm-dali", "webm-pyav"])
def test_corrupt_or_truncated_video_raises_with_the_key(samples: dict[str, dict], fmt: str) -> None:
    sample, backend = _sample_and_backend(samples, fmt)
    media = "mp4" if fmt == "mp4" else "webm"
    garbage = {"__key__": "bad_key_1", media: b"\x00garbage" * 64, "json": meta()}
    with pytest.raises(VideoDecodeError, match="sample bad_key_1"):
        decode_frames(garbage, [0, 1], webm_backend=backend)
    data = sample[media]
    truncated = {"__key__": "bad_key_2", media: data[: len(data) * 2 // 3], "json": meta()}
    with pytest.raises(VideoDecodeError, match="sample bad_key_2"):
        decode_frames(truncated, [1, N - 1], webm_backend=backend)
    np.testing.assert_allclose(levels(decode_frames(sample, [4], webm_backend=backend)), [40], atol=TOL)


def test_decode_argument_errors(samples: dict[str, dict]) -> None:
    with pytest.raises(ValueError, match=r"\[0, 24\)"):
        decode_frames(samples["mp4"], [0, N])
    with pytest.raises(VideoDecodeError, match="no mp4, webm or f0000.jpg"):
        decode_frames({"__key__": "k", "cls": b"1", "json": meta()}, [0])


# ---------------------------------------------------------------- augmentation


def still_clip(t: int = 6, h: int = H, w: int = W) -> np.ndarray:
    """Every frame identical, with detail in both directions (a crop or flip change shows)."""
    yy, xx = np.mgrid[0:h, 0:w]
    frame = np.stack([xx * 255 // (w - 1), yy * 255 // (h - 1), (xx * yy) % 256], -1).astype(np.uint8)
    return np.repeat(frame[None], t, axis=0)


def denorm(x: torch.Tensor, spec: VideoSpec) -> torch.Tensor:
    """(3, T, S, S) normalised -> 0-255."""
    mean = torch.tensor(spec.mean).view(3, 1, 1, 1)
    std = torch.tensor(spec.std).view(3, 1, 1, 1)
    return (x * std + mean) * 255


@pytest.mark.parametrize("mode", ["rrc", "short_side"])
def test_train_same_crop_and_flip_on_every_frame(mode: str) -> None:
    spec = VideoSpec(img_size=32, train_crop=mode, short_side_range=(36, 60), scale=(0.1, 0.5))
    outs = [train_augment(still_clip(), spec, np.random.default_rng(seed)) for seed in range(12)]
    for out in outs:
        assert out.shape == (3, 6, 32, 32) and out.dtype == torch.float32
        assert torch.equal(out, out[:, :1].expand_as(out))  # every frame got the same crop and flip
    assert len({o[:, 0].sum().item() for o in outs}) > 6  # but the crop is random from sample to sample
    again = train_augment(still_clip(), spec, np.random.default_rng(3))
    assert torch.equal(again, outs[3])  # and reproducible from the seed


def test_flip_off_never_flips_and_changes_nothing_else() -> None:
    on, off = VideoSpec(img_size=32), VideoSpec(img_size=32, flip=False)
    clip = still_clip()
    flipped = 0
    for seed in range(40):
        a = train_augment(clip, on, np.random.default_rng(seed))
        b = train_augment(clip, off, np.random.default_rng(seed))
        assert torch.equal(a, b) or torch.equal(a, b.flip(-1))
        flipped += not torch.equal(a, b)
        assert denorm(b, off)[0, 0, :, -1].mean() > denorm(b, off)[0, 0, :, 0].mean()  # red grows left -> right
    assert 5 < flipped < 35


def test_eval_centre_crop_contract() -> None:
    spec = VideoSpec(img_size=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    clip = still_clip(4, h=32, w=64)  # short side already 32: no resampling, exact values
    out = eval_augment(clip, spec)
    assert out.shape == (3, 4, 32, 32) and out.dtype == torch.float32 and out.is_contiguous()
    expect = (torch.from_numpy(clip[..., 16:48, :]).permute(3, 0, 1, 2).float() / 255 - 0.5) / 0.25
    torch.testing.assert_close(out, expect)


@pytest.mark.parametrize(("h", "w", "axis"), [(32, 64, "x"), (64, 32, "y")])
def test_three_crops_along_the_long_side(h: int, w: int, axis: str) -> None:
    spec = VideoSpec(img_size=32, spatial_crops=3, num_clips=2)
    clips = np.stack([still_clip(3, h, w), 255 - still_clip(3, h, w)])  # (C=2, T, H, W, 3)
    views = eval_views(clips, spec)
    assert views.shape == (6, 3, 3, 32, 32)
    assert crop_offsets(64, 32, 3) == [0, 16, 32]
    px = denorm(views, spec)
    for v in range(6):
        clip, crop = divmod(v, 3)
        off = [0, 16, 32][crop]
        window = clips[clip, :, off : off + 32] if axis == "y" else clips[clip, :, :, off : off + 32]
        torch.testing.assert_close(px[v], torch.from_numpy(window).permute(3, 0, 1, 2).float(), atol=1e-3, rtol=0)


def test_uint8_output_for_device_normalisation() -> None:
    spec = VideoSpec(img_size=32, spatial_crops=3)
    clip = still_clip(4, h=40, w=64)
    raw = train_augment(clip, spec, np.random.default_rng(5), normalize=False)
    assert raw.dtype == torch.uint8 and raw.shape == (3, 4, 32, 32) and raw.is_contiguous()
    norm = train_augment(clip, spec, np.random.default_rng(5))
    torch.testing.assert_close(denorm(norm, spec), raw.float(), atol=1e-3, rtol=0)
    views = eval_views(clip[None], spec, normalize=False)
    assert views.dtype == torch.uint8 and views.shape == (3, 3, 4, 32, 32)
    torch.testing.assert_close(denorm(eval_views(clip[None], spec), spec), views.float(), atol=1e-3, rtol=0)


def test_eval_resizes_short_side_first() -> None:
    spec = VideoSpec(img_size=16, eval_short_side=24)
    out = eval_augment(still_clip(2, 48, 96), spec)  # -> 24 × 48, centre 16 × 16
    assert out.shape == (3, 2, 16, 16)
    with pytest.raises(ValueError, match=r"\(T, H, W, 3\) uint8"):
        eval_augment(still_clip(2).astype(np.float32), spec)


# ---------------------------------------------------------------- per sample, end to end


@pytest.mark.parametrize("name", ["mp4", "webm", "jpeg"])
def test_load_train_clip_and_eval_views(samples: dict[str, dict], name: str) -> None:
    spec = VideoSpec(frames=4, stride=3, img_size=32, short_side_range=(32, 40), num_clips=2, spatial_crops=3)
    a = load_train_clip(samples[name], spec, 7)
    assert a.shape == (3, 4, 32, 32) and a.dtype == torch.float32
    torch.testing.assert_close(a, load_train_clip(samples[name], spec, np.random.default_rng(7)))
    views = load_eval_views(samples[name], spec)
    assert views.shape == (6, 3, 4, 32, 32)
    idx = dense_eval_indices(N, 4, 3, 2)  # starts 0 and 14
    grey_seen = denorm(views, spec).mean(dim=(1, 3, 4))  # (V, T)
    expect = torch.tensor([[grey(i) for i in row] for row in idx for _ in range(3)], dtype=torch.float32)
    torch.testing.assert_close(grey_seen, expect, atol=TOL, rtol=0)


def test_segment_recipe_on_jpeg(samples: dict[str, dict]) -> None:
    spec = video_spec("ssv2", frames=8, img_size=32)
    views = load_eval_views(samples["jpeg"], spec)
    assert views.shape == (3, 3, 8, 32, 32)
    grey_seen = denorm(views[1], spec).mean(dim=(0, 2, 3))
    torch.testing.assert_close(grey_seen, torch.tensor([grey(i) for i in (1, 4, 7, 10, 13, 16, 19, 22)],
                                                       dtype=torch.float32), atol=TOL, rtol=0)
