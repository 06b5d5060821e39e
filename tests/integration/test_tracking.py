"""Tracking through a real MLflow server that goes away mid-run, across a preemption and resume: nothing lost,
nothing twice."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipeline.dist import free_port
from tests.conftest import ROOT
from vitpipe.ui import start_server, stop_server, wait_healthy

pytestmark = pytest.mark.slow


def _server(store: Path, port: int) -> subprocess.Popen:
    proc = start_server(store, port)
    wait_healthy(f"http://127.0.0.1:{port}", proc)
    return proc


def _wait_for(lines, text: str) -> None:
    for line in lines:
        if text in line:
            return
    raise AssertionError(f"training ended before {text!r}")


def _train(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "vitpipe", *args], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def test_outage_preemption_and_resume_lose_nothing(digits_shards: Path, tmp_path: Path) -> None:
    """The server is killed at step 5, the job preempted (SIGUSR1) during the outage, the server restarted
    and the run resumed from an older checkpoint than its last logged step: the pending records are
    replayed, every train/loss step is in MLflow exactly once, and system metrics go on through the outage."""
    store, port = tmp_path / "server" / "mlflow.db", free_port()
    store.parent.mkdir()
    server = _server(store, port)
    run_dir = tmp_path / "outage"
    args = ["train", "jobs/demo/vitnano_digits_cls_cpu_quick.toml", f"--data.path={digits_shards}",
            f"--run.output_dir={tmp_path}", "--run.name=outage", f"--tracking.uri=http://127.0.0.1:{port}",
            "--tracking.log_every_steps=1", "--schedule.epochs=2", "--tracking.system_metrics_s=0.5",
            "--checkpoint.every_steps=4", "--checkpoint.keep_last=3"]
    train = _train(args)
    try:
        _wait_for(train.stderr, "step 5 ")
        os.killpg(server.pid, signal.SIGKILL)  # killed, not stopped: a crashed tracking server
        stop_server(server)
        _wait_for(train.stderr, "step 11 ")  # these steps and system samples are queued
        train.send_signal(signal.SIGUSR1)
        rest = train.stderr.read()
        assert train.wait(timeout=120) == 75, rest[-3000:]
        up = time.time() * 1000
        assert "could not be delivered; saved to" in rest and (run_dir / "mlflow_pending.json").exists()
        newest = max(run_dir.glob("checkpoints/step_*"))
        shutil.rmtree(newest)  # resume from an older checkpoint: its later steps were logged already
        server = _server(store, port)
        train = _train(args)
        rest = train.stderr.read()
        assert train.wait(timeout=300) == 0, rest[-3000:]
    finally:
        train.kill()
        stop_server(server)
    log = (run_dir / "log.rank0.txt").read_text()
    assert "MLflow unreachable" in log and "a previous job could not deliver" in log
    assert "not logged again" in log
    assert not (run_dir / "mlflow_pending.json").exists() and not (run_dir / "mlflow_pending.images").exists()
    client = MlflowClient(f"sqlite:///{store}")
    exp = client.get_experiment_by_name("vitpipe-demo")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"  # the UI opens on training runs
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["vitpipe.resumed"] == "true"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert sorted(steps) == list(range(1, 45))  # 2 epochs × 22 steps, each exactly once
    system = client.get_metric_history(run.info.run_id, "system/cpu_utilization_percentage")
    assert sorted(m.step for m in system) == list(range(len(system)))  # numbering continues across jobs
    assert any(m.timestamp > up for m in system)  # and after it
    assert run.data.tags["vitpipe.git_sha"] != "unknown"


def test_unreachable_server_at_start_trains_without_tracking(digits_shards: Path, tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "vitpipe", "train", "jobs/demo/vitnano_digits_cls_cpu_quick.toml",
                           f"--data.path={digits_shards}", f"--run.output_dir={tmp_path}", "--run.name=nosrv",
                           f"--tracking.uri=http://127.0.0.1:{free_port()}", "--schedule.max_steps=3"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "unreachable at start" in proc.stderr and (tmp_path / "nosrv" / "final" / "model.safetensors").exists()
