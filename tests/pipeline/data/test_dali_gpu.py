"""DALI on the GPU (nvJPEG / hardware JPEG decoder, NVDEC): the same batches as the CPU paths.

Marked ``gpu``: deselected on CPU machines, run with ``bash scripts/test.sh -m gpu`` where a GPU is lent.
"""

from __future__ import annotations

import importlib.util
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from pipeline.config import DataCfg, EvalCfg, JobCfg
from pipeline.data.loaders import build_eval, build_loaders
from tests.conftest import shifted_difference

_MISSING = [m for m in ("nvidia.dali", "webdataset", "av") if importlib.util.find_spec(m) is None]
# Checked before any fixture is built: a GPU image without DALI or PyAV skips here instead of erroring in set-up.
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(bool(_MISSING), reason=f"not installed: {', '.join(_MISSING)}")]


@pytest.fixture(scope="module")
def cuda() -> torch.device:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    return torch.device("cuda", 0)


def test_gpu_image_batches_match_the_cpu_backend(cuda: torch.device, digits_shards: Path) -> None:
    data = DataCfg(path=str(digits_shards), img_size=32, batch_size=16, backend="dali", dali_threads=2)
    gpu = list(build_eval(JobCfg(data=replace(data, dali_device="gpu")), "val", rank=0, world_size=1, device=cuda))
    cpu = list(build_eval(JobCfg(data=replace(data, dali_device="cpu")), "val", rank=0, world_size=1,
                          device=torch.device("cpu")))
    assert len(gpu) == len(cpu)
    for a, b in zip(gpu, cpu, strict=True):
        assert a["input"].device.type == "cuda" and torch.equal(a["label"].cpu(), b["label"])
        assert shifted_difference(a["input"].cpu(), b["input"]) < 0.05  # nvJPEG vs libjpeg rounding
    train, _ = build_loaders(JobCfg(data=replace(data, dali_device="gpu", randaugment="rand-m9-mstd0.5-inc1",
                                                 mixup=0.8, cutmix=1.0, reprob=0.25)),
                             rank=0, world_size=1, device=cuda, num_classes=10)
    train.set_epoch(0)
    batch = next(iter(train))
    assert batch["input"].is_cuda and batch["input"].shape == (16, 3, 32, 32)
    torch.testing.assert_close(batch["target"].sum(1), torch.ones(16, device=cuda))


@pytest.mark.parametrize("codec", ["h264", "vp9", "jpeg"])
def test_nvdec_clips_match_the_wds_backend(cuda: torch.device, video_sets: dict[str, Path], codec: str) -> None:
    data = DataCfg(path=str(video_sets[codec]), img_size=32, batch_size=2, num_workers=1,
                   video={"frames": 4, "stride": 2, "num_clips": 2, "spatial_crops": 3})
    job = JobCfg(data=data, eval=EvalCfg(batch_size=2))
    gpu = list(build_eval(replace(job, data=replace(data, backend="dali", dali_device="gpu")), "val", rank=0,
                          world_size=1, device=cuda))
    wds = list(build_eval(job, "val", rank=0, world_size=1, device=torch.device("cpu")))
    assert len(gpu) == len(wds)
    for a, b in zip(gpu, wds, strict=True):
        assert torch.equal(a["label"].cpu(), b["label"]) and a["input"].shape == b["input"].shape
        assert (a["input"].cpu() - b["input"]).abs().mean() < 0.05
