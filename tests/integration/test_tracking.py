"""Tracking through a real MLflow server that goes away mid-run: training finishes and catches up."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
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


def test_server_outage_mid_run(digits_shards: Path, tmp_path: Path) -> None:
    store, port = tmp_path / "server" / "mlflow.db", free_port()
    store.parent.mkdir()
    server = _server(store, port)
    args = ["train", "jobs/demo/vitnano_digits_cls_cpu_quick.toml", f"--data.path={digits_shards}",
            f"--run.output_dir={tmp_path}", "--run.name=outage", f"--tracking.uri=http://127.0.0.1:{port}",
            "--tracking.log_every_steps=1", "--schedule.epochs=2"]
    train = subprocess.Popen([sys.executable, "-m", "vitpipe", *args], cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        _wait_for(train.stderr, "step 5 ")
        stop_server(server)
        _wait_for(train.stderr, "step 10 ")  # these steps are queued
        train.send_signal(signal.SIGSTOP)  # hold training while the server comes back
        server = _server(store, port)
        train.send_signal(signal.SIGCONT)
        rest = train.stderr.read()
        assert train.wait(timeout=300) == 0, rest[-3000:]
    finally:
        train.kill()
        stop_server(server)
    log = (tmp_path / "outage" / "log.rank0.txt").read_text()
    assert "MLflow unreachable" in log and "MLflow answers again" in log
    assert not (tmp_path / "outage" / "mlflow_pending.json").exists()
    client = MlflowClient(f"sqlite:///{store}")
    (run,) = client.search_runs([client.get_experiment_by_name("vitpipe-demo").experiment_id])
    assert run.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert steps == list(range(1, 45))  # nothing lost: 2 epochs × 22 steps
    assert run.data.tags["vitpipe.git_sha"] != "unknown"


def test_unreachable_server_at_start_trains_without_tracking(digits_shards: Path, tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "vitpipe", "train", "jobs/demo/vitnano_digits_cls_cpu_quick.toml",
                           f"--data.path={digits_shards}", f"--run.output_dir={tmp_path}", "--run.name=nosrv",
                           f"--tracking.uri=http://127.0.0.1:{free_port()}", "--schedule.max_steps=3"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "unreachable at start" in proc.stderr and (tmp_path / "nosrv" / "final" / "model.safetensors").exists()


@pytest.mark.parametrize("name", ["filtervit_pico", "structvit_tiny_4_1"])
def test_model_pictures_are_logged(digits_shards: Path, tmp_path: Path, name: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "vitpipe", "train", "jobs/demo/vitnano_digits_cls_cpu_quick.toml",
                           f"--data.path={digits_shards}", f"--run.output_dir={tmp_path}", "--run.name=pics",
                           f"--model.name={name}", "--schedule.max_steps=2", "--tracking.pictures=2",
                           "--tracking.system_metrics_s=0"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("vitpipe-demo").experiment_id])
    pictures = [a.path for a in client.list_artifacts(run.info.run_id, "pictures")]
    assert pictures == ["pictures/step00000002_0.png", "pictures/step00000002_1.png"]
    local = client.download_artifacts(run.info.run_id, pictures[0], str(tmp_path))
    assert Path(local).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
