"""Video shards made by `vitpipe prep videolist` (H.264, VP9, JPEG frames) through the training loaders."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from data_prep.cli import main as prep_main
from pipeline.config import ConfigError, DataCfg, EvalCfg, JobCfg
from pipeline.data import build_loaders, video_spec_of

CPU = torch.device("cpu")
FRAMES = 24


def _make_video(path: Path, label: int) -> None:
    """24 frames at 24 fps, 64×48; frame i has grey level 8·i (plus the label in the blue channel)."""
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=24)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(FRAMES):
            arr = np.full((48, 64, 3), 8 * i, np.uint8)
            arr[..., 2] = 100 * label
            for packet in stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


@pytest.fixture(scope="module")
def video_sets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same 8 train + 4 val clips prepared in each stored format."""
    src = tmp_path_factory.mktemp("videos")
    lists = {"train": [], "val": []}
    for split, count in (("train", 8), ("val", 4)):
        for i in range(count):
            name = f"{split}{i}.mp4"
            _make_video(src / name, i % 2)
            lists[split].append(f"{name} {i % 2}")
    for split, rows in lists.items():
        (src / f"{split}.txt").write_text("\n".join(rows) + "\n")
    out = {}
    for codec in ("h264", "vp9", "jpeg"):
        dest = tmp_path_factory.mktemp(codec)
        assert prep_main(["prep", "videolist", "--list", f"train={src / 'train.txt'}", "--list",
                          f"val={src / 'val.txt'}", "--root", str(src), "--out", str(dest), "--codec", codec,
                          "--fps", "24", "--short-side", "48", "--keyint", "6", "--shard-size", "2",
                          "--workers", "1"]) == 0
        out[codec] = dest
    return out


def _job(path: Path, **video: object) -> JobCfg:
    data = DataCfg(path=str(path), img_size=32, batch_size=2, num_workers=1, hflip=0.5,
                   video={"frames": 4, "stride": 2, "sampling": "dense", "num_clips": 2, "spatial_crops": 3,
                          **video})
    return JobCfg(data=data, eval=EvalCfg(batch_size=2))


@pytest.mark.parametrize("codec", ["h264", "vp9", "jpeg"])
def test_video_batch_contract_per_format(video_sets: dict[str, Path], codec: str) -> None:
    train, evals = build_loaders(_job(video_sets[codec]), rank=0, world_size=2, device=CPU, num_classes=2)
    train.set_epoch(0)
    batches = list(train)
    assert len(batches) == 8 // (2 * 2)
    batch = batches[0]
    assert batch["input"].shape == (2, 3, 4, 32, 32) and batch["input"].dtype == torch.float32
    assert batch["label"].dtype == torch.int64
    views = next(iter(evals))
    assert views["input"].shape == (2, 6, 3, 4, 32, 32)  # 2 temporal clips × 3 spatial crops
    # the decoded frames are the sampled ones: a dense clip of stride 2 rises by 16 grey levels per frame
    red = views["input"][0, 0, 0].mean(dim=(-1, -2)) * 0.229 + 0.485  # back to the 0-1 scale
    steps = (red.diff() * 255).tolist()
    assert all(abs(s - 16) < 4 for s in steps), steps


def test_formats_decode_to_the_same_frames(video_sets: dict[str, Path]) -> None:
    firsts = {}
    for codec, path in video_sets.items():
        _, evals = build_loaders(_job(path), rank=0, world_size=1, device=CPU, num_classes=2)
        firsts[codec] = torch.cat([b["input"] for b in evals])
    for codec in ("vp9", "jpeg"):
        assert (firsts[codec] - firsts["h264"]).abs().mean() < 0.05, codec


def test_no_flip_for_direction_dependent_labels_and_clear_errors(video_sets: dict[str, Path]) -> None:
    spec = video_spec_of(DataCfg(path=str(video_sets["h264"]), hflip=0.5, video={"recipe": "ssv2"}))
    assert spec.flip is False and spec.sampling == "segment" and spec.frames == 16  # the recipe beats hflip
    spec = video_spec_of(DataCfg(path=str(video_sets["h264"]), video={"recipe": "ssv2", "frames": 8}))
    assert spec.frames == 8 and spec.spatial_crops == 3  # keys beat the recipe
    with pytest.raises(ConfigError, match="data.video"):
        video_spec_of(_job(video_sets["h264"], frames=0).data)
    with pytest.raises(ConfigError, match="data.video.recipe"):
        video_spec_of(_job(video_sets["h264"], recipe="kinetics-9000").data)
    job = _job(video_sets["h264"])
    with pytest.raises(ConfigError, match="video"):
        build_loaders(replace(job, data=replace(job.data, backend="dali", dali_device="cpu")), rank=0,
                      world_size=1, device=CPU, num_classes=2)
