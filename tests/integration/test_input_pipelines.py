"""Training end to end through each input backend, with the paper-style augmentation switched on."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from tests.conftest import run_cli

pytestmark = pytest.mark.slow

RECIPE = "jobs/demo/vitnano_digits_cls_cpu_quick.toml"
FULL_AUG = ["--data.randaugment='rand-m9-mstd0.5-inc1'", "--data.reprob=0.25", "--data.mixup=0.8",
            "--data.cutmix=1.0"]


def _train(digits_shards: Path, out: Path, name: str, *extra: str, procs: int = 1) -> dict:
    proc = run_cli("train", RECIPE, "--nproc-per-node", str(procs), f"--data.path={digits_shards}",
                   f"--run.output_dir={out}", f"--run.name={name}", "--data.num_workers=1",
                   "--tracking.log_every_steps=1", *extra, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / name / "summary.json").read_text())


def test_dali_backend_trains_the_quick_demo(digits_shards: Path, tmp_path: Path) -> None:
    """DALI's CPU backend (the GPU graph with ``cpu`` decoders) feeds a whole run that learns."""
    summary = _train(digits_shards, tmp_path, "dali", "--data.backend='dali'", "--data.dali_threads=1")
    assert summary["status"] == "FINISHED" and summary["val_samples"] == 359  # every val sample once
    assert summary["val_top1"] >= 50.0, summary  # chance is 10 %; the wds quick demo reaches ~70 %


@pytest.mark.parametrize("backend", ["wds", "dali"])
def test_full_augmentation_on_two_processes(digits_shards: Path, tmp_path: Path, backend: str) -> None:
    """RandAugment, random erasing and mixup/CutMix soft targets through DDP on 2 gloo processes."""
    summary = _train(digits_shards, tmp_path, backend, f"--data.backend='{backend}'", "--data.dali_threads=1",
                     "--schedule.max_steps=6", *FULL_AUG, procs=2)
    assert summary["status"] == "FINISHED" and summary["steps"] == 6 and summary["world_size"] == 2
    log = (tmp_path / backend / "log.rank0.txt").read_text()
    losses = [float(v) for v in re.findall(r"train/loss=(\S+)", log)]
    assert len(losses) == 6 and all(math.isfinite(v) and 0 < v < 5 for v in losses), losses


@pytest.mark.parametrize("backend", ["wds", "dali"])
def test_video_training_with_multi_view_evaluation(video_sets: dict[str, Path], tmp_path: Path, backend: str) -> None:
    """A tiny video StructViT trains on VP9 clips and is evaluated on 2 clips × 3 crops per video."""
    proc = run_cli("train", RECIPE, f"--data.path={video_sets['vp9']}", f"--run.output_dir={tmp_path}",
                   "--run.name=video", "--model.name='structvit_tiny_4_1_video'", "--model.num_classes=2",
                   f"--data.backend='{backend}'", "--data.dali_threads=1", "--data.num_workers=1",
                   "--data.batch_size=2", "--data.hflip=0.5", "--schedule.max_steps=4", "--eval.every_epochs=1",
                   "--data.video={frames = 4, stride = 2, num_clips = 2, spatial_crops = 3}", "--data.mixup=0.8",
                   "--tracking.log_every_steps=1", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "video" / "summary.json").read_text())
    assert summary["status"] == "FINISHED" and summary["val_samples"] == 4  # each video once, views averaged
    assert summary["steps"] == 4
