"""Off the step path: no host read in a steady-state step (counted CUDA-free), and a ZeRO resume on more
processes whose conversion uses the main process's cores while the others wait outside any collective."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, run_cli

pytestmark = pytest.mark.slow

RECIPE = "jobs/demo/vitnano_digits_cls_cpu_quick.toml"


def test_steady_state_steps_read_nothing_back(digits_shards: Path, tmp_path: Path) -> None:
    """2 processes (DDP, gloo), 12 steps, metrics every 4: each rank reads one value at log steps, else none."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "pipeline.host_sync", RECIPE, "--out", str(tmp_path / "syncs"), f"--data.path={digits_shards}",
           f"--run.output_dir={tmp_path}", "--run.name=syncs", "--schedule.max_steps=12",
           "--tracking.log_every_steps=4", "--data.num_workers=1"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in (0, 1):
        result = json.loads((tmp_path / "syncs" / f"syncs.rank{rank}.json").read_text())
        steps = result["steps"]
        assert [s["step"] for s in steps] == list(range(1, 13))
        assert [s["reads"] for s in steps] == [1 if s["log"] else 0 for s in steps] == [0, 0, 0, 1] * 3
        log_reads = [site for site in result["sites"] if "pipeline/trainer.py" in site]
        assert len(log_reads) == 1 and log_reads[0].startswith("tolist ")  # the metrics' one read
        assert result["sites"][log_reads[0]] == 3
        assert result["host_reads"] > 0  # the counter was on: AdamW's CPU step counters, counted apart


def _preempt_after(args: list[str], step: int) -> int:
    proc = subprocess.Popen([sys.executable, "-m", "vitpipe", *args], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    sent = False
    for line in proc.stderr:
        if not sent and f"step {step} " in line:
            proc.send_signal(signal.SIGUSR1)
            sent = True
    assert sent, "training ended before the signal could be sent"
    return proc.wait(timeout=300)


def test_zero2_resume_on_more_processes(digits_shards: Path, tmp_path: Path) -> None:
    """ZeRO-2 preempted on 1 process resumes on 2: rank 0 converts to the universal format with every core
    it has, rank 1 waits for the conversion on the file system; the run then finishes on 2 processes."""
    args = ["train", RECIPE, f"--data.path={digits_shards}", f"--run.output_dir={tmp_path}", "--run.name=grow",
            "--engine.backend=deepspeed", "--engine.zero_stage=2", "--schedule.max_steps=8",
            "--tracking.log_every_steps=1", "--tracking.enabled=false", "--data.num_workers=1"]
    assert _preempt_after(args, step=3) == 75
    resumed = run_cli(*args, "--nproc-per-node", "2", timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    run_dir = tmp_path / "grow"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "FINISHED" and summary["world_size"] == 2 and summary["steps"] == 8
    cores = len(os.sched_getaffinity(0))
    assert f"with {cores} worker processes per phase" in (run_dir / "log.rank0.txt").read_text()
    rank1 = (run_dir / "log.rank1.txt").read_text()
    assert "waiting for the main process to convert" in rank1 and "resumed from" in rank1
