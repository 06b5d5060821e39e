"""Elastic resume end to end (needs pipeline/trainer.py to record ``position`` and call ``resume_at``)."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from tests.conftest import run_cli
from tests.integration.test_resume import _preempt_rank

pytestmark = pytest.mark.slow


def _keys(path: Path) -> list[tuple[int, str]]:
    with path.open(newline="") as f:
        return [(int(r["step"]), r["key"]) for r in csv.DictReader(f)]


def test_two_processes_preempted_then_one_finishes_the_epoch_exactly(digits_shards: Path, tmp_path: Path) -> None:
    """2 processes stop mid-epoch 0; 1 process continues it: every key of epoch 0 once (but the remainder)."""
    keys = tmp_path / "keys"
    args = ["train", "jobs/demo/vitnano_digits_cls_cpu_quick.toml", f"--data.path={digits_shards}",
            f"--run.output_dir={tmp_path}", "--run.name=el", "--data.num_workers=1", "--schedule.epochs=2",
            "--schedule.warmup_epochs=0", "--tracking.enabled=false", "--tracking.log_every_steps=1",
            f"--data.record_keys='{keys}'"]
    assert _preempt_rank([*args, "--nproc-per-node", "2"], rank=0, step=4) != 0
    resumed = run_cli(*args, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "epoch 0 continues at batch" in resumed.stderr
    before = _keys(keys / "keys-rank0-of2-epoch0.csv") + _keys(keys / "keys-rank1-of2-epoch0.csv")
    after = _keys(keys / "keys-rank0-of1-epoch0.csv")
    seen = [k for _, k in before] + [k for _, k in after]
    assert len(seen) == len(set(seen))  # nothing repeated
    assert 1438 - len(seen) < 64  # nothing skipped but the remainder of one 1-process batch
    assert max(s for s, _ in after) == 1438 // 64 - 1  # the epoch ends at its length on 1 process
