"""The sample index from the split manifest and byte-range reads through a bounded set of open files."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import webdataset as wds

from data_prep.format import LBL, read_index
from pipeline.data.reader import SampleIndex, ShardFiles, read_media, read_sample
from pipeline.data.shards import LoaderError


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_index_from_the_manifest_matches_the_dali_index_files(digits_shards: Path) -> None:
    index = SampleIndex.load(digits_shards, "train", keys=True)
    assert index.num_samples == 1438 and len(index.paths) == 12  # 11 shards of 128 and one of 30
    for shard, path in enumerate(index.paths):
        entries = read_index(Path(path).with_suffix(".idx"))
        ids = np.arange(index.starts[shard], index.starts[shard + 1])
        ranges = zip(index.offset[ids].tolist(), index.size[ids].tolist(), strict=True)
        assert [e["jpg"] for e in entries] == list(ranges)
        media, keys = read_media(index, ShardFiles(index.paths), ids[:3])
        assert keys == index.keys.to_pylist()[ids[0]:ids[0] + 3]
        assert bytes(media[0][:2]) == b"\xff\xd8"  # a JPEG
    labels = [read_sample(index, ShardFiles(index.paths), i)[LBL] for i in (0, 700, 1437)]
    assert [int.from_bytes(v, "little") for v in labels] == index.label[[0, 700, 1437]].tolist()


def test_read_sample_gives_what_webdataset_gives(digits_shards: Path) -> None:
    index = SampleIndex.load(digits_shards, "train")
    files = ShardFiles(index.paths)
    for shard in (0, len(index.paths) - 1):  # the last sample of a shard reads to the end of the tar
        expected = list(wds.DataPipeline(wds.SimpleShardList([index.paths[shard]]), wds.tarfile_to_samples()))
        assert len(expected) == index.sizes[shard]
        for i, want in enumerate(expected):
            got = read_sample(index, files, int(index.starts[shard]) + i)
            assert got.keys() == want.keys() and all(got[k] == want[k] for k in want)


def test_open_files_stay_bounded_whatever_the_shard_count(digits_shards: Path) -> None:
    index = SampleIndex.load(digits_shards, "train")
    files = ShardFiles(index.paths, max_open=3)
    baseline, peak = _open_fds(), 0
    for sample_id in np.random.default_rng(0).permutation(index.num_samples)[:400].tolist():
        read_sample(index, files, sample_id)
        peak = max(peak, _open_fds() - baseline)
    assert files.open_count == 3 and peak <= 3 < len(index.paths)
    assert files.opened > len(index.paths)  # files were closed and reopened, not kept
    files.close()
    assert _open_fds() == baseline


def test_a_manifest_that_disagrees_with_the_shards_is_refused(digits_shards: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(digits_shards, copy)
    table = pq.read_table(copy / "train.parquet")
    pq.write_table(table.slice(1), copy / "train.parquet")  # one row short of dataset.json
    with pytest.raises(LoaderError, match="do not list the shards of dataset.json"):
        SampleIndex.load(copy, "train")
    offsets = table.column("offset").to_numpy().copy()
    offsets[5] += 512  # points at the next member, not the sample's media
    pq.write_table(table.set_column(2, "offset", [offsets]), copy / "train.parquet")
    index = SampleIndex.load(copy, "train")
    with pytest.raises(LoaderError, match="not where the manifest says"):
        read_media(index, ShardFiles(index.paths), np.array([5]))
    with pytest.raises(LoaderError, match="manifest and shard disagree|runs past"):
        read_sample(index, ShardFiles(index.paths), 5)
