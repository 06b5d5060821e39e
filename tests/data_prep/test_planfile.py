"""The plan file: written once per output directory, read in slices by array tasks (data_prep.planfile)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from data_prep.errors import PrepError
from data_prep.plan import Plan
from data_prep.planfile import (
    PARTS_DIR,
    PLAN_JSON,
    PLAN_LOCK,
    PLAN_ROWS,
    _heartbeat,
    _try_lock,
    ensure_plan,
    read_plan_record,
    read_slice,
    write_plan,
)
from data_prep.scan import Sample
from tests.data_prep.test_images_scale import _jpeg, make_imagenet

ROOT = Path(__file__).resolve().parents[2]


def _plan(n_train: int = 23, n_val: int = 7, shard_size: int = 3, video: bool = False) -> Plan:
    """A plan of made-up inputs (no files): 3 classes, a shuffled train split and a val split."""
    classes = ["a", "b", "c"]

    def sample(split: str, i: int) -> Sample:
        window = (0.5 * i, 0.5 * i + 2.0) if video and i % 2 else (None, None)
        return Sample(Path(f"/data/{split}/{i:05d}.jpg"), i % 3, classes[i % 3], f"{split}/{i:05d}.jpg", *window)

    splits = {"train": [sample("train", i) for i in range(n_train)], "val": [sample("val", i) for i in range(n_val)]}
    return Plan("video" if video else "image", classes, splits, shard_size, {"seed": 0},
                prequarantined={"train": [("train/x.txt", "no image extension")]})


@pytest.mark.parametrize("video", [False, True])
def test_slices_of_every_task_make_the_whole_plan(tmp_path: Path, video: bool) -> None:
    plan = _plan(video=video)
    record = write_plan(plan, tmp_path, {"max_failure_rate": 0.1}, ["imagenet", "--src", "/s"], rows_per_group=6)
    assert record["plan_file"] == {"name": PLAN_ROWS, "version": 1, "rows": 30, "shards_per_group": 2}
    assert {k: v for k, v in record.items() if k not in ("settings", "request", "plan_file")} == plan.describe()
    assert pq.ParquetFile(tmp_path / PARTS_DIR / PLAN_ROWS).metadata.num_row_groups == 4 + 2  # 8 + 3 shards
    whole = plan.shards()
    for num_tasks in (1, 2, 3, 5, 11, 13):
        got = []
        for i in range(num_tasks):
            part = read_slice(tmp_path, i, num_tasks)
            assert part.num_shards == 11 and [whole.index(t) for t in part.tasks] == list(part.span)
            # a task reads its own shards plus at most the rest of the two row groups at its ends
            assert part.rows_read <= sum(len(t.items) for t in part.tasks) + 2 * 6
            got += part.tasks
        assert got == whole  # split, index, first position, every Sample (path, window ...) and digest
    assert read_slice(tmp_path, 4, 11).rows_read == 6  # one row group of 2 shards out of 30 rows


def test_plan_file_that_does_not_match_plan_json_is_refused(tmp_path: Path) -> None:
    write_plan(_plan(), tmp_path, rows_per_group=6)
    other = tmp_path / "other"
    write_plan(_plan(n_train=22), other, rows_per_group=6)  # one input fewer: shard 7 of train differs
    (other / PARTS_DIR / PLAN_ROWS).replace(tmp_path / PARTS_DIR / PLAN_ROWS)
    assert len(read_slice(tmp_path, 0, 4).tasks) == 2  # shards 0-1 are the same in both
    with pytest.raises(PrepError, match=r"shard train 7 does not match plan.json; delete .*_parts and plan again"):
        read_slice(tmp_path, 2, 4)
    (tmp_path / PARTS_DIR / PLAN_ROWS).write_bytes(b"PAR1 not parquet")
    with pytest.raises(PrepError, match="cannot read the plan file"):
        read_slice(tmp_path, 0, 1)


def test_first_task_plans_the_others_wait_for_it(tmp_path: Path) -> None:
    """A live lock (refreshed) makes a task wait and use the plan of the lock holder, never plan itself."""
    parts = tmp_path / PARTS_DIR
    parts.mkdir()
    lock = parts / PLAN_LOCK
    assert _try_lock(lock) and not _try_lock(lock)

    def holder() -> None:  # plans for longer than the stale limit, refreshing the lock
        with _heartbeat(lock, 0.05):
            time.sleep(1.0)
            write_plan(_plan(), tmp_path, request=["imagenet"])
        lock.unlink()

    def must_not_run() -> Plan:
        raise AssertionError("a waiting task planned")

    thread = threading.Thread(target=holder)
    thread.start()
    record = ensure_plan(tmp_path, ["imagenet"], must_not_run, stale_s=0.5, max_poll_s=0.05)
    thread.join()
    assert record == read_plan_record(tmp_path) and not lock.exists()


def test_stale_lock_is_broken(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / PARTS_DIR).mkdir()
    (tmp_path / PARTS_DIR / PLAN_LOCK).write_text('{"host": "gone", "pid": 1}\n')  # a planner killed with -9
    with caplog.at_level(logging.WARNING, logger="data_prep"):
        record = ensure_plan(tmp_path, ["imagenet"], _plan, stale_s=0.3, max_poll_s=0.05)
    assert record["request"] == ["imagenet"] and "breaking it" in caplog.text
    assert sorted(p.name for p in (tmp_path / PARTS_DIR).iterdir()) == [PLAN_JSON, PLAN_ROWS]


def test_plan_of_another_command_is_refused_with_one_line(tmp_path: Path) -> None:
    write_plan(_plan(), tmp_path, request=["imagenet", "--src", "/s", "--shard-size", "3", "--seed", "0"])
    cases = ((["imagenet", "--src", "/s", "--shard-size", "4", "--seed", "0"], "--shard-size is 3 there, 4 here"),
             (["imagenet", "--src", "/s", "--shard-size", "3"], r"--seed is 0 there, \(not given\) here"),
             (["kinetics", "--src", "/s"], "source imagenet there"))
    for request, why in cases:
        with pytest.raises(PrepError, match=why) as info:
            ensure_plan(tmp_path, request, _plan)
        assert "\n" not in str(info.value) and "delete" in str(info.value)
    write_plan(_plan(), tmp_path)  # through the library: no request
    with pytest.raises(PrepError, match="planned through the library API"):
        ensure_plan(tmp_path, ["imagenet"], _plan)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vitpipe", "prep", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def _files(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_tasks_read_the_plan_not_the_tree(tmp_path: Path) -> None:
    """``--plan-only`` scans once; tasks then write what was planned, even if the tree changed since."""
    import numpy as np

    src = make_imagenet(tmp_path / "src", n_train=4, n_val=1, bad=False)
    common = ["imagenet", "--src", str(src), "--shard-size", "3", "--workers", "1"]
    assert _cli(*common, "--out", str(tmp_path / "ref")).returncode == 0  # one process, before the change
    res = _cli(*common, "--out", str(tmp_path / "out"), "--plan-only")
    assert res.returncode == 0 and "planned 15 inputs in 5 shards" in res.stderr, res.stderr
    assert not (tmp_path / "out" / "train").exists()  # planned, nothing written
    (src / "train" / "n01440764" / "late.JPEG").write_bytes(_jpeg(np.random.default_rng(5)))
    for i in range(3):
        res = _cli(*common, "--out", str(tmp_path / "out"), "--num-tasks", "3", "--task-index", str(i))
        assert res.returncode == 0 and "planning" not in res.stderr, res.stderr
    assert _cli("merge", str(tmp_path / "out")).returncode == 0
    assert _files(tmp_path / "out") == _files(tmp_path / "ref")  # late.JPEG is not in it
    res = _cli(*common, "--out", str(tmp_path / "out"), "--shard-size", "5", "--num-tasks", "3", "--task-index", "0")
    assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr
    assert "planned by another command (--shard-size is 3 there, 5 here)" in res.stderr
    record = json.loads((tmp_path / "out" / PARTS_DIR / PLAN_JSON).read_text())
    assert "--out" not in record["request"] and "--workers" not in record["request"]
