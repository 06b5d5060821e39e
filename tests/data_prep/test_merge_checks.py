"""``vitpipe prep merge`` checks every tar and DALI index against its sidecar before ``dataset.json`` exists."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from data_prep.format import DATASET_JSON
from vitpipe.cli import main as vitpipe_main


@pytest.fixture
def prepared(digits_shards: Path, tmp_path: Path) -> Path:
    """A private copy of the digits shards (with ``_parts/plan.json``, so it can be merged again)."""
    return Path(shutil.copytree(digits_shards, tmp_path / "data"))


def _merge(out: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    status = vitpipe_main(["prep", "merge", str(out)])
    return status, capsys.readouterr().err


def test_a_sound_data_set_merges_again(prepared: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _merge(prepared, capsys)[0] == 0
    assert (prepared / DATASET_JSON).is_file()


@pytest.mark.parametrize("damage, says", [
    ("missing tar", "train-000003.tar: shard missing"),
    ("truncated tar", "train-000003.tar: 100000 bytes, its sidecar records 593920 (truncated)"),
    ("missing index", "train-000003.idx: index missing"),
    ("index of another shard", "train-000003.idx: lists 30 samples, the sidecar records 128"),
    ("index with a moved sample", "train-000003.idx: sample 0's media offset differs from the sidecar manifest"),
])
def test_a_damaged_shard_fails_the_merge_naming_it(prepared: Path, damage: str, says: str,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    train = prepared / "train"
    tar, idx = train / "train-000003.tar", train / "train-000003.idx"
    if damage == "missing tar":
        tar.unlink()
    elif damage == "truncated tar":
        os.truncate(tar, 100_000)
    elif damage == "missing index":
        idx.unlink()
    elif damage == "index of another shard":
        shutil.copy(train / "train-000011.idx", idx)
    else:
        lines = idx.read_text().splitlines()
        fields = lines[1].split()
        fields[1] = str(int(fields[1]) + 512)  # the first component's offset, one block later
        idx.write_text("\n".join([lines[0], " ".join(fields), *lines[2:]]) + "\n")
    status, err = _merge(prepared, capsys)
    assert status == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vitpipe prep: error: ") and says in lines[0], err
    assert not (prepared / DATASET_JSON).exists()  # a data set that failed its merge is not marked complete
