"""Damaged or missing data is never silent: bad shards stop training (or are skipped and counted), evaluation
reports only complete results, and recipes whose data kind does not match stop at once.

Each test damages its own copy of the digits shards (``digits_shards``: 12 train shards of 128 samples and
one of 30, 3 val shards); the training runs stop at start-up, before a step.
"""

from __future__ import annotations

import os
import shutil
import tarfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import save_file

from pipeline.build import build_model
from pipeline.config_io import dump_toml, load_config
from pipeline.data.integrity import ReadPolicy
from pipeline.data.loaders import build_loaders
from pipeline.data.sample_transforms import train_transform
from pipeline.data.shards import LoaderError
from pipeline.data.wds import build_train_loader, image_sample_fn
from pipeline.train import main as train_main
from vitpipe.cli import main as vitpipe_main

RECIPE = "jobs/demo/vitnano_digits_cls_cpu_quick.toml"
CPU = torch.device("cpu")


@pytest.fixture
def data(digits_shards: Path, tmp_path: Path) -> Path:
    """A private copy of the digits shards, to damage."""
    return Path(shutil.copytree(digits_shards, tmp_path / "data"))


def _damage(root: Path, how: str) -> Path:
    """Deletes, truncates or pads (one extra sample appended) a train shard; returns its path."""
    shard = root / "train" / "train-000005.tar"
    if how == "deleted":
        shard.unlink()
    elif how == "truncated":
        os.truncate(shard, 100_000)
    else:
        extra = root / "extra.jpg"
        extra.write_bytes(b"\xff\xd8" + bytes(30_000))  # more than the tar's end padding: the size grows
        with tarfile.open(shard, "a") as tar:
            tar.add(extra, arcname="zzextra.jpg")
    return shard


def _overrides(data: Path, tmp_path: Path, *more: str) -> list[str]:
    return [f"--data.path={data}", f"--run.output_dir={tmp_path / 'runs'}", "--schedule.max_steps=1",
            "--tracking.enabled=false", *more]


def _one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize("how, says", [("deleted", "shard missing"), ("truncated", "(truncated)"),
                                       ("padded", "(extra data after its samples)")])
def test_a_bad_shard_stops_training_naming_it(data: Path, tmp_path: Path, how: str, says: str,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    shard = _damage(data, how)
    assert train_main([RECIPE, *_overrides(data, tmp_path)]) == 2
    line = _one_error_line(capsys)
    assert line.startswith("pipeline.train: error: ") and str(shard) in line and says in line, line
    assert "Traceback" not in line


@pytest.mark.parametrize("backend, sampler", [("wds", "exact"), ("wds", "stream"), ("dali", "exact")])
def test_skip_mode_leaves_bad_shards_out_and_counts_them(data: Path, backend: str, sampler: str) -> None:
    _damage(data, "deleted")
    (data / "val" / "val-000001.tar").unlink()
    cfg = load_config(RECIPE, [f"--data.path={data}", "--data.on_bad_shard=skip", f"--data.sampler={sampler}",
                               "--data.num_workers=0", f"--data.backend={backend}", "--data.dali_device=cpu",
                               "--data.dali_threads=1"])
    train, evals = build_loaders(cfg, rank=0, world_size=1, device=CPU, num_classes=10)
    assert train.steps_per_epoch == (1438 - 128) // 64  # the plan is made over the sound shards
    assert evals.expected_samples == 359 - 128
    train.set_epoch(0)
    assert next(iter(train))["input"].shape[0] == 64
    assert train.data_metrics(train.local_counts()) == {"data/bad_shards": 2.0, "data/skipped_samples": 0.0}


def test_a_shard_truncated_under_a_running_stream_reader_stops_it_or_is_skipped(data: Path) -> None:
    """The stream reader counts each shard's samples as it reads (no stat check in between here)."""
    shard = _damage(data, "truncated")
    fn = image_sample_fn(train_transform(load_config(RECIPE, [f"--data.path={data}"]).data))

    def epoch(policy: ReadPolicy) -> int:
        loader = build_train_loader(data, "train", fn, batch_size=64, num_workers=1, rank=0, world_size=1, seed=0,
                                    shuffle_buffer=64, sampler="stream", persistent_workers=False, policy=policy)
        loader.set_epoch(0)
        return sum(1 for _ in loader)

    with pytest.raises(LoaderError, match=rf"^{shard}: unreadable after \d+ of 128 samples") as err:
        epoch(ReadPolicy())
    assert "\n" not in str(err.value)
    policy = ReadPolicy(on_bad_shard="skip")
    assert epoch(policy) == 1438 // 64  # the same step count on every rank: the stream runs on
    assert policy.health.counts[0] == 1


def _fake_run(data: Path, tmp_path: Path) -> Path:
    """A run directory with a resolved config and (untrained) weights, as ``vitpipe eval`` reads it."""
    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    cfg = load_config(RECIPE, [f"--data.path={data}"])
    (run / "config.toml").write_text(dump_toml(cfg))
    save_file(build_model(cfg).state_dict(), str(run / "final" / "model.safetensors"))
    return run


def test_eval_reports_only_when_every_sample_was_evaluated(data: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    run = _fake_run(data, tmp_path)
    shard = data / "val" / "val-000002.tar"
    offset = pq.read_table(data / "val" / "val-000002.parquet").column("offset").to_pylist()[1]
    with shard.open("r+b") as f:  # same size: the second sample's tar header no longer parses
        f.seek(offset - 512)
        f.write(b"\x00garbage" * 64)
    assert vitpipe_main(["eval", str(run), "--data.num_workers=0"]) == 2
    line = _one_error_line(capsys)
    assert f"{shard}: 1 samples read, dataset.json says 103 (truncated)" in line, line  # read as the tar's end
    (data / "val" / "val-000001.tar").unlink()
    assert vitpipe_main(["eval", str(run), "--data.on_bad_shard=skip"]) == 2  # eval is strict whatever the key
    line = _one_error_line(capsys)
    assert "val-000001.tar: shard missing" in line, line


def test_a_video_recipe_on_image_shards_stops_at_once(digits_shards: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    start = time.monotonic()
    assert train_main([RECIPE, *_overrides(digits_shards, tmp_path, "--model.name=structvit_tiny_4_1_video")]) == 2
    assert time.monotonic() - start < 10
    out = capsys.readouterr()
    assert len((out.out + out.err).splitlines()) <= 30
    line = [ln for ln in out.err.splitlines() if "error:" in ln]
    assert len(line) == 1 and "takes video clips but data.path" in line[0] and "holds image shards" in line[0]


def test_an_image_recipe_on_video_shards_stops_at_once(video_sets: dict[str, Path], tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    start = time.monotonic()
    assert train_main([RECIPE, *_overrides(video_sets["vp9"], tmp_path)]) == 2
    assert time.monotonic() - start < 10
    out = capsys.readouterr()
    assert len((out.out + out.err).splitlines()) <= 30
    line = [ln for ln in out.err.splitlines() if "error:" in ln]
    assert len(line) == 1 and "takes images but data.path" in line[0] and "holds video shards" in line[0]


@pytest.mark.parametrize("sampler", ["stream", "exact"])
def test_a_data_set_that_does_not_decode_stops_with_one_line(data: Path, tmp_path: Path, sampler: str,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    for sidecar in sorted((data / "train").glob("train-*.parquet")):  # every JPEG zeroed in place
        rows = pq.read_table(sidecar, columns=["offset", "bytes"]).to_pylist()
        with sidecar.with_suffix(".tar").open("r+b") as f:
            for r in rows:
                f.seek(r["offset"])
                f.write(bytes(r["bytes"]))
    start = time.monotonic()
    assert train_main([RECIPE, *_overrides(data, tmp_path, f"--data.sampler={sampler}")]) == 2
    assert time.monotonic() - start < 60
    line = _one_error_line(capsys)
    assert "failed to decode" in line and "Traceback" not in line, line
