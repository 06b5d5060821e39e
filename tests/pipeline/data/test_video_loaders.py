"""Video shards made by `vitpipe prep videolist` (H.264, VP9, JPEG frames) through the training loaders."""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import ConfigError, DataCfg, EvalCfg, JobCfg
from pipeline.data.loaders import build_loaders
from pipeline.data.shards import LoaderError
from pipeline.data.video import video_spec_of

CPU = torch.device("cpu")


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
    with pytest.raises(ConfigError, match="data.hflip = 0.5: must be 0 with data.video.recipe = 'ssv2'"):
        DataCfg(path=str(video_sets["h264"]), hflip=0.5, video={"recipe": "ssv2"})  # refused, not overridden
    spec = video_spec_of(DataCfg(path=str(video_sets["h264"]), hflip=0.0, video={"recipe": "ssv2"}))
    assert spec.flip is False and spec.sampling == "segment" and spec.frames == 16
    spec = video_spec_of(DataCfg(path=str(video_sets["h264"]), hflip=0.0, video={"recipe": "ssv2", "frames": 8}))
    assert spec.frames == 8 and spec.spatial_crops == 3  # keys beat the recipe
    with pytest.raises(ConfigError, match="data.video"):  # at config time now, before any loader
        _job(video_sets["h264"], frames=0)
    with pytest.raises(ConfigError, match="data.video.recipe"):
        _job(video_sets["h264"], recipe="kinetics-9000")


def _dali(job: JobCfg) -> JobCfg:
    return replace(job, data=replace(job.data, backend="dali", dali_device="cpu", dali_threads=1))


def test_dali_cpu_refuses_h264_clearly(video_sets: dict[str, Path]) -> None:
    with pytest.raises(LoaderError, match="cannot decode H.264"):
        build_loaders(_dali(_job(video_sets["h264"])), rank=0, world_size=1, device=CPU, num_classes=2)


@pytest.mark.parametrize("codec", ["vp9", "jpeg"])
def test_dali_cpu_reads_clips_like_wds(video_sets: dict[str, Path], codec: str) -> None:
    """DALI's video graph (NVDEC / nvJPEG on a GPU) on its CPU backend: same contract, same frames."""
    job = _job(video_sets[codec])
    train, evals = build_loaders(_dali(job), rank=0, world_size=2, device=CPU, num_classes=2)
    train.set_epoch(1)
    batches = list(train)
    assert len(batches) == 2 and batches[0]["input"].shape == (2, 3, 4, 32, 32)
    assert batches[0]["input"].dtype == torch.float32 and batches[0]["label"].dtype == torch.int64
    dali_views = list(evals)
    wds_views = list(build_loaders(job, rank=0, world_size=2, device=CPU, num_classes=2)[1])
    assert len(dali_views) == len(wds_views)
    for a, b in zip(dali_views, wds_views, strict=True):
        assert torch.equal(a["label"], b["label"]) and a["input"].shape == b["input"].shape == (2, 6, 3, 4, 32, 32)
        assert (a["input"] - b["input"]).abs().mean() < 0.05  # resizer rounding only


def test_clip_randaugment_applies_the_same_draws_to_every_frame() -> None:
    from pipeline.data.sample_transforms import apply_to_clip, randaugment

    frame = torch.randint(0, 256, (3, 1, 24, 24), dtype=torch.uint8)
    clip = frame.expand(3, 5, 24, 24).contiguous()  # five identical frames
    augment = randaugment("rand-m9-mstd0.5-inc1", 24, (0.485, 0.456, 0.406))
    changed = 0
    for seed in range(20):
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed)
        out = apply_to_clip(augment, clip)
        assert out.shape == clip.shape and out.dtype == torch.uint8
        assert all(torch.equal(out[:, 0], out[:, t]) for t in range(5))  # one draw for the whole clip
        changed += not torch.equal(out, clip)
    assert changed >= 10  # and it does augment (each of its 2 operations applies with probability 0.5)


@pytest.mark.parametrize("backend", ["wds", "dali"])
def test_video_randaugment_in_both_backends(video_sets: dict[str, Path], backend: str) -> None:
    job = _job(video_sets["vp9"])
    job = replace(job, data=replace(job.data, randaugment="rand-m9-mstd0.5-inc1", backend=backend,
                                    dali_device="cpu", dali_threads=1))
    train, _ = build_loaders(job, rank=0, world_size=1, device=CPU, num_classes=2)
    train.set_epoch(0)
    batch = next(iter(train))
    assert batch["input"].shape == (2, 3, 4, 32, 32) and torch.isfinite(batch["input"]).all()
