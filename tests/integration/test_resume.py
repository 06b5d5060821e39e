"""Preemption and exact resume: SIGUSR1 → checkpoint + exit 75 → rerun → same weights, one MLflow run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from pipeline.preempt import EXIT_PREEMPTED
from tests.conftest import ROOT, run_cli

pytestmark = pytest.mark.slow

RECIPE = "jobs/demo/vitnano_digits_cls_cpu_quick.toml"


def _args(shards: Path, out: Path, name: str) -> list[str]:
    return ["train", RECIPE, f"--data.path={shards}", f"--run.output_dir={out}", f"--run.name={name}",
            "--schedule.epochs=2", "--data.num_workers=2", "--tracking.log_every_steps=1", "--eval.every_epochs=1",
            "--model.kwargs={ drop_rate = 0.1 }",  # dropout: the model's own RNG must resume exactly too
            "--optim.ema_decay=0.9", "--optim.layer_decay=0.8"]  # EMA state and per-layer groups resume too


def _preempt_after(args: list[str], step: int) -> int:
    """Starts training, sends SIGUSR1 once step ``step`` is logged, returns the exit status."""
    proc = subprocess.Popen([sys.executable, "-m", "vitpipe", *args], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    sent = False
    for line in proc.stderr:
        if not sent and f"step {step} " in line:
            proc.send_signal(signal.SIGUSR1)
            sent = True
    assert sent, "training ended before the signal could be sent"
    return proc.wait(timeout=300)


def test_preempted_run_resumes_bit_exactly(digits_shards: Path, tmp_path: Path) -> None:
    full = run_cli(*_args(digits_shards, tmp_path, "full"), timeout=300)
    assert full.returncode == 0, full.stderr[-3000:]

    assert _preempt_after(_args(digits_shards, tmp_path, "cut"), step=12) == EXIT_PREEMPTED
    cut = tmp_path / "cut"
    assert json.loads((cut / "summary.json").read_text())["status"] == "PREEMPTED"
    latest = cut / "checkpoints" / (cut / "checkpoints" / "latest").read_text()
    stopped_at = json.loads((latest / "trainer_state.json").read_text())
    assert 12 <= stopped_at["step"] < 22 and stopped_at["batches_in_epoch"] > 0  # mid-epoch (22 steps/epoch)

    again = run_cli(*_args(digits_shards, tmp_path, "cut"), timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stderr

    a, b = load_file(tmp_path / "full/final/model.safetensors"), load_file(cut / "final/model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bitwise, fp32 on CPU

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("vitpipe-demo").experiment_id
    runs = {r.info.run_name: r for r in client.search_runs([experiment])}
    assert sorted(runs) == ["cut", "full"]  # one run for the resumed job
    steps = [m.step for m in client.get_metric_history(runs["cut"].info.run_id, "train/loss")]
    assert steps == list(range(1, steps[-1] + 1))  # continuous numbering across the restart
    full_loss = [m.value for m in client.get_metric_history(runs["full"].info.run_id, "train/loss")]
    cut_loss = [m.value for m in client.get_metric_history(runs["cut"].info.run_id, "train/loss")]
    assert cut_loss == full_loss  # the same loss trajectory
    for key in ("val/top1", "val_ema/top1", "val_ema/loss"):
        history = [[m.value for m in client.get_metric_history(runs[r].info.run_id, key)] for r in ("full", "cut")]
        assert history[0] == history[1] and len(history[0]) == 2, key
    assert runs["cut"].info.status == "FINISHED" and runs["cut"].data.tags["vitpipe.resumed"] == "true"


def test_corrupt_latest_checkpoint_falls_back_to_the_previous(digits_shards: Path, tmp_path: Path) -> None:
    args = _args(digits_shards, tmp_path, "c") + ["--schedule.max_steps=8", "--checkpoint.every_steps=3",
                                                  "--checkpoint.keep_last=3", "--tracking.enabled=false"]
    assert _preempt_after(args, step=7) == EXIT_PREEMPTED
    ckpts = tmp_path / "c" / "checkpoints"
    latest, older, oldest = sorted(ckpts.glob("step_*"), reverse=True)  # the preemption's, step 6, step 3
    assert (ckpts / "latest").read_text() == latest.name
    weights = bytearray((latest / "model.safetensors").read_bytes())
    weights[8:200] = bytes(192)  # the same size: only the content hash can tell (issue 14, finding 6)
    (latest / "model.safetensors").write_bytes(bytes(weights))
    optimizer = older / "optimizer.bin"
    optimizer.write_bytes(optimizer.read_bytes()[:1000])  # truncated, as a lost write after a crash leaves it
    proc = run_cli(*args, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (f"checkpoint {latest} is corrupt (model.safetensors: content differs from its recorded sha256 "
            "(same size))") in proc.stderr
    assert f"checkpoint {older} is corrupt (optimizer.bin: 1000 bytes," in proc.stderr
    assert f"resumed from {oldest}: step 3" in proc.stderr


def _preempt_rank(args: list[str], rank: int, step: int) -> int:
    """Starts a multi-process run, sends SIGUSR1 to one rank's trainer at ``step``, returns the exit status."""
    import psutil

    proc = subprocess.Popen([sys.executable, "-m", "vitpipe", *args], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    for line in proc.stderr:
        if f"step {step} " in line:
            trainers = [p for p in psutil.Process(proc.pid).children(recursive=True)  # not the torchrun agent
                        if "pipeline.train" in " ".join(p.cmdline())
                        and not any(agent in " ".join(p.cmdline()) for agent in ("distributed.run", "vitpipe.launch"))]
            pids = {p.pid for p in trainers}  # loader workers are children of a trainer: leave them out
            ranks = [p for p in trainers if p.ppid() not in pids and f"RANK={rank}" in _environ(p)]
            assert len(ranks) == 1
            ranks[0].send_signal(signal.SIGUSR1)
            break
    proc.stderr.read()
    return proc.wait(timeout=300)


def test_two_process_preemption_then_resume_on_one(digits_shards: Path, tmp_path: Path) -> None:
    """SIGUSR1 to rank 1 alone stops both ranks at the same step; the run then resumes on one process."""
    args = _args(digits_shards, tmp_path, "shrink") + ["--nproc-per-node", "2", "--data.num_workers=1"]
    assert _preempt_rank(args, rank=1, step=4) != 0  # torchrun reports the workers' status 75 as a failure
    run_dir = tmp_path / "shrink"
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "PREEMPTED"
    assert "exiting with status 75" in (run_dir / "log.rank1.txt").read_text()
    resumed = run_cli(*[a for a in args if a not in ("--nproc-per-node", "2")], timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming 1 processes from a checkpoint of 2" in resumed.stderr
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "FINISHED"


def test_zero2_preemption_resumes_bit_exactly(digits_shards: Path, tmp_path: Path) -> None:
    """DeepSpeed ZeRO-2 on 2 processes: sharded optimizer states go through checkpoint and resume exactly."""
    def args(name: str) -> list[str]:
        return [*_args(digits_shards, tmp_path, name), "--nproc-per-node", "2", "--data.num_workers=1",
                "--engine.backend=deepspeed", "--engine.zero_stage=2", "--optim.ema_decay=0",
                "--tracking.enabled=false"]

    full = run_cli(*args("full"), timeout=300)
    assert full.returncode == 0, full.stderr[-3000:]
    cut = [*args("cut"), "--checkpoint.every_steps=2", "--checkpoint.keep_last=2"]
    assert _preempt_rank(cut, rank=0, step=6) != 0
    latest, previous = sorted((tmp_path / "cut" / "checkpoints").glob("step_*"), reverse=True)
    shard = latest / "pytorch_model" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"  # hashed and verified by rank 1
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one bit pattern flipped, the same size
    shard.write_bytes(bytes(data))
    again = run_cli(*cut, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (f"checkpoint {latest} is corrupt (pytorch_model/zero_pp_rank_1_mp_rank_00_optim_states.pt: content "
            "differs") in again.stderr
    assert f"resumed from {previous}" in again.stderr  # both ranks: the same fallback, then an exact resume
    a, b = (load_file(tmp_path / r / "final" / "model.safetensors") for r in ("full", "cut"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def _environ(process) -> str:
    try:
        return " ".join(f"{k}={v}" for k, v in process.environ().items() if k == "RANK")
    except Exception:  # noqa: BLE001 - a process that just exited
        return ""


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_resume_on_a_different_number_of_processes(digits_shards: Path, tmp_path: Path, stage: int) -> None:
    """A ZeRO run preempted on 2 processes continues on 1: weights and step carry over (see README)."""
    args = [*_args(digits_shards, tmp_path, "ds"), "--nproc-per-node", "2", "--data.num_workers=1",
            "--engine.backend=deepspeed", f"--engine.zero_stage={stage}", "--tracking.enabled=false",
            "--optim.ema_decay=0", "--schedule.max_steps=8"]  # (EMA needs whole weights on every rank: not ZeRO-3)
    assert _preempt_rank(args, rank=0, step=4) != 0
    run_dir = tmp_path / "ds"
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "PREEMPTED"
    export = run_cli("export", str(run_dir), "--out", str(tmp_path / "at_preemption.safetensors"))
    assert export.returncode == 0, export.stderr[-3000:]
    before = load_file(tmp_path / "at_preemption.safetensors")
    resumed = run_cli(*[a for a in args if a not in ("--nproc-per-node", "2")], timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "from a checkpoint of 2" in resumed.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "FINISHED" and summary["world_size"] == 1
    after = load_file(run_dir / "final" / "model.safetensors")
    assert before.keys() == after.keys() and any(not torch.equal(before[k], after[k]) for k in before)
