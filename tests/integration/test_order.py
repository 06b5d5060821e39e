"""`vitpipe order` against what training actually reads; DALI under an open-file limit below the shard count."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_prep.format import Counts, DatasetInfo, QuarantineInfo, ShardInfo, SplitInfo, manifest_schema
from pipeline.data.order import SamplePlan
from tests.conftest import ROOT, run_cli

pytestmark = pytest.mark.slow

RECIPE = "jobs/demo/vitnano_digits_cls_cpu_quick.toml"


def _rows(path: Path) -> list[tuple[int, int, str]]:
    with path.open(newline="") as f:
        return [(int(r["rank"]), int(r["step"]), r["key"]) for r in csv.DictReader(f)]


@pytest.mark.parametrize("backend", ["wds", "dali"])
def test_training_reads_what_vitpipe_order_prints(digits_shards: Path, tmp_path: Path, backend: str) -> None:
    """2 processes × 2 workers, shards of 128 and one of 30: the keys each rank trained on in epoch 0 (recorded
    from the tar headers of what it read) are exactly `vitpipe order`'s rows, in order."""
    order = run_cli("order", str(digits_shards), "--ranks", "2", "--workers", "2", "--batch", "64", "--epoch", "0",
                    "--out", str(tmp_path / "order.csv"))
    assert order.returncode == 0, order.stderr
    assert "30 samples (the remainder) not read" in order.stderr  # 1438 = 11 steps × 2 ranks × 64 + 30
    keys = tmp_path / "keys"
    train = run_cli("train", RECIPE, "--nproc-per-node", "2", f"--data.path={digits_shards}",
                    f"--run.output_dir={tmp_path}", "--run.name=t", f"--data.backend='{backend}'",
                    "--data.num_workers=2", "--data.dali_threads=1", "--schedule.epochs=1",
                    "--schedule.warmup_epochs=0", "--tracking.enabled=false", f"--data.record_keys='{keys}'")
    assert train.returncode == 0, train.stderr[-3000:]
    printed = _rows(tmp_path / "order.csv")
    trained = _rows(keys / "keys-rank0-of2-epoch0.csv") + _rows(keys / "keys-rank1-of2-epoch0.csv")
    assert len(printed) == 2 * 11 * 64 and trained == printed
    assert len({key for _, _, key in trained}) == len(trained)  # every sample at most once


def _imagenet_shaped(root: Path, sizes: list[int]) -> None:
    """dataset.json and a full-schema train manifest for ``sizes`` (no tar files: `vitpipe order` reads none)."""
    names = [f"train-{i:06d}.tar" for i in range(len(sizes))]
    n = sum(sizes)
    split = SplitInfo(n, tuple(ShardInfo(name, s, name[:-4] + ".idx", 0) for name, s in zip(names, sizes, strict=True)),
                      "train.parquet", n, 0)
    DatasetInfo(2, "image", ("c0",), {"train": split}, Counts(n, n, 0), QuarantineInfo("", 0, {}), {}, {}).write(root)
    ids = np.arange(n)
    text = pa.array(np.full(n, ""))
    columns = {"key": pa.array(np.char.add("train_", np.char.zfill(ids.astype(str), 8))),
               "shard": pa.DictionaryArray.from_arrays(pa.array(np.repeat(np.arange(len(sizes)), sizes)),
                                                       pa.array(names)).cast(pa.string()),
               "offset": pa.array(512 + 1024 * (ids - np.repeat(np.cumsum(sizes) - sizes, sizes))),
               "bytes": pa.array(np.full(n, 100)), "label": pa.array(np.zeros(n, np.int64))}
    schema = manifest_schema()
    table = pa.table({f.name: columns.get(f.name, pa.nulls(n, f.type) if f.nullable else
                                           (text if f.type == pa.string() else pa.array(np.zeros(n), f.type)))
                      for f in schema}, schema=schema)
    pq.write_table(table, root / "train.parquet")


def test_vitpipe_order_at_imagenet_1k_scale(tmp_path: Path) -> None:
    """1,282 shards (the last one partial), 64 ranks × 8 workers × 256: the printed table is the plan, every
    key at most once, 78 steps on every rank; the rest of the epoch on 48 ranks completes it."""
    sizes = [1000] * 1281 + [167]
    _imagenet_shaped(tmp_path, sizes)
    common = [str(tmp_path), "--workers", "8", "--batch", "256", "--epoch", "3", "--seed", "5"]
    first = run_cli("order", *common, "--ranks", "64", "--out", str(tmp_path / "e3.parquet"))
    assert first.returncode == 0, first.stderr
    rest = run_cli("order", *common, "--ranks", "48", "--resume-step", "40", "--from-ranks", "64", "--out",
                   str(tmp_path / "rest.parquet"))
    assert rest.returncode == 0, rest.stderr
    table = pq.read_table(tmp_path / "e3.parquet")
    rank, step = table.column("rank").to_numpy(), table.column("step").to_numpy()
    assert np.array_equal(np.bincount(rank), np.full(64, 78 * 256))  # equal steps on every rank
    assert np.array_equal(np.unique(step), np.arange(78))
    ids = np.char.replace(table.column("key").to_numpy(zero_copy_only=False).astype(str), "train_", "").astype(int)
    plan = SamplePlan(np.array(sizes), seed=5, rank=0, world_size=64, batch_size=256, block_shards=16)
    assert np.array_equal(ids, plan.epoch_table(3).transpose(1, 0, 2).ravel())  # the loaders' plan, rank-major
    assert len(np.unique(ids)) == len(ids) == 78 * 64 * 256  # missing: the remainder of 3,215 only
    resumed = pq.read_table(tmp_path / "rest.parquet")
    done = ids[step < 40]
    more = np.char.replace(resumed.column("key").to_numpy(zero_copy_only=False).astype(str), "train_", "").astype(int)
    both = np.concatenate([done, more])
    assert len(np.unique(both)) == len(both)  # nothing repeated
    assert sum(sizes) - len(both) < 48 * 256  # nothing skipped but the new remainder
    assert np.array_equal(np.bincount(resumed.column("rank").to_numpy()), np.full(48, len(more) // 48))


def test_dali_trains_three_epochs_over_more_shards_than_the_open_file_limit(tmp_path: Path) -> None:
    """160 training shards (+ 40 val) and `ulimit -n 128`: DALI reads through at most data.max_open_files
    files and builds one training pipeline for the three epochs (before: one open file per shard, kept)."""
    from data_prep.digits import write_digits
    from data_prep.shard import prep_imagefolder

    write_digits(tmp_path / "raw", size=32, limit=600)
    info = prep_imagefolder(tmp_path / "raw", tmp_path / "shards", shard_size=3, seed=0, workers=1)
    assert len(info.splits["train"].shards) == 160 > 128
    train = [sys.executable, "-m", "vitpipe", "train", RECIPE, f"--data.path={tmp_path / 'shards'}",
             f"--run.output_dir={tmp_path}", "--run.name=many", "--data.backend='dali'", "--data.dali_device='cpu'",
             "--data.dali_threads=1", "--data.batch_size=16", "--data.max_open_files=8", "--schedule.epochs=3",
             "--schedule.warmup_epochs=0", "--eval.every_epochs=1", "--tracking.enabled=false"]
    proc = subprocess.run(["bash", "-c", 'ulimit -n 128 && exec "$@"', "bash", *train], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "many" / "summary.json").read_text())
    assert summary["status"] == "FINISHED" and summary["epochs"] == 3 and summary["steps"] == 3 * (480 // 16)
    assert proc.stderr.count("training pipeline built") == 1  # one pipeline for the run, not one per epoch
    assert proc.stderr.count("evaluation pipeline built") == 1  # three evaluations, one pipeline
