"""MLflow records delivered by a background thread: in full, through a hung or stopped server, at close,
at a preemption deadline and at a forced exit (the end-to-end outage during training is test_tracking.py)."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipeline.dist import free_port
from pipeline.metrics import MlflowLogger, default_tracking_uri
from tests.conftest import ROOT
from vitpipe.ui import start_server, stop_server, wait_healthy


def _serve(folder: Path):
    """A real MLflow server over a SQLite store; yields ``(uri, process)``, stopped at the end."""
    store, port = folder / "mlflow.db", free_port()
    proc = start_server(store, port)
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(uri, proc)
        yield uri, proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGCONT)  # a stopped server cannot handle SIGTERM
        stop_server(proc)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    """One server for the tests that stop it with SIGSTOP (and always continue it)."""
    yield from _serve(tmp_path_factory.mktemp("server"))


@pytest.fixture()
def own_server(tmp_path: Path):
    """A server that the test may end."""
    yield from _serve(tmp_path)


@pytest.fixture(scope="module")
def sqlite_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One SQLite store for the tests without a server (its schema is created once)."""
    return default_tracking_uri(tmp_path_factory.mktemp("sqlite"))


def _steps(uri: str, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in MlflowClient(uri).get_metric_history(run_id, key))


def test_every_record_reaches_the_store_at_close(sqlite_uri: str, tmp_path: Path) -> None:
    """2,500 log calls (5,000 metrics, merged into batches of ≤ 1,000) and an artifact, all delivered by close()."""
    uri = sqlite_uri
    lg = MlflowLogger(uri, "exp", "r", {"optim.lr": 0.1}, {}, pending_file=tmp_path / "pending.json")
    for step in range(1, 2501):
        lg.log({"train/loss": step / 10, "train/lr": 0.1}, step)
    (tmp_path / "note.txt").write_text("x")
    lg.log_artifact(tmp_path / "note.txt")
    lg.log({"val/top1": 50.0}, 2500)
    lg.close()
    assert _steps(uri, lg.run_id, "train/loss") == list(range(1, 2501))  # nothing lost, nothing twice
    run = MlflowClient(uri).get_run(lg.run_id)
    assert run.info.status == "FINISHED" and run.data.metrics == {"train/loss": 250.0, "train/lr": 0.1,
                                                                  "val/top1": 50.0}
    assert [a.path for a in MlflowClient(uri).list_artifacts(lg.run_id)] == ["note.txt"]
    assert not lg.pending and not (tmp_path / "pending.json").exists()


@pytest.mark.slow
def test_hung_server_loses_nothing(server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Records logged while the server is stopped (requests hang) are delivered after it continues; system
    metrics are sampled through the outage and go on after it (MLflow's own monitor stops for good)."""
    uri, proc = server
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    lg = MlflowLogger(uri, "exp", "hung", {}, {}, pending_file=tmp_path / "pending.json", system_metrics_s=0.2)
    os.killpg(proc.pid, signal.SIGSTOP)
    down = time.time() * 1000
    for step in range(1, 21):
        lg.log({"train/loss": float(step)}, step)
    try:
        assert lg.pending  # a stopped server answers nothing: still queued
        time.sleep(1.5)
    finally:
        os.killpg(proc.pid, signal.SIGCONT)
    up = time.time() * 1000
    time.sleep(1.0)
    lg.close()
    assert _steps(uri, lg.run_id, "train/loss") == list(range(1, 21))
    system = MlflowClient(uri).get_metric_history(lg.run_id, "system/cpu_utilization_percentage")
    assert sorted(m.step for m in system) == list(range(len(system)))
    assert any(down < m.timestamp < up for m in system) and any(m.timestamp > up for m in system)
    assert MlflowClient(uri).get_run(lg.run_id).info.status == "FINISHED"
    assert not (tmp_path / "pending.json").exists()


@pytest.mark.slow
def test_server_gone_at_close_saves_the_queue(own_server, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """One warning per outage; what close() cannot deliver goes to the pending file, with its steps."""
    uri, proc = own_server
    lg = MlflowLogger(uri, "exp", "gone", {}, {}, pending_file=tmp_path / "pending.json")
    lg.log({"train/loss": 0.5}, 1)
    stop_server(proc)
    with caplog.at_level(logging.WARNING, logger="pipeline.metrics"):
        for step in range(2, 7):
            lg.log({"train/loss": float(step)}, step)
        lg.close()
    assert sum("MLflow unreachable" in r.getMessage() for r in caplog.records) == 1
    saved = json.loads((tmp_path / "pending.json").read_text())
    assert saved["run_id"] == lg.run_id
    steps = [m[2] for r in saved["records"] if r["kind"] == "metrics" for m in r["args"][0]]
    assert steps[-5:] == [2, 3, 4, 5, 6] and steps[0] in (1, 2)  # step 1 may have been delivered before the stop


@pytest.mark.slow
def test_next_job_replays_the_pending_file(server, tmp_path: Path) -> None:
    """A resumed job starts while the server is unreachable (its run is reopened later) and ends in the
    outage with metrics and an image pending; the next job, with the server there, sends them first,
    deletes the pending file and its PNGs, and does not log again the steps the run has."""
    import numpy as np

    uri, _ = server
    pending = tmp_path / "pending.json"
    lg = MlflowLogger(uri, "exp", "replay", {}, {}, pending_file=pending)
    lg.log({"train/loss": 1.0}, 1)
    lg.close("KILLED")
    down = MlflowLogger(f"http://127.0.0.1:{free_port()}", "exp", "replay", {}, {}, run_id=lg.run_id,
                        pending_file=pending)
    assert down.run_id == lg.run_id  # kept: reopened once the server answers
    for step in range(2, 6):
        down.log({"train/loss": float(step)}, step)
    down.log_image("pictures/sample0", np.full((8, 256, 3), 200, np.uint8), 5)
    down.close("KILLED")
    assert len(list((tmp_path / "pending.images").glob("*.png"))) == 1
    resumed = MlflowLogger(uri, "exp", "replay", {}, {}, run_id=lg.run_id, pending_file=pending)
    assert resumed.floor["train/loss"] == 5
    for step in range(3, 8):  # resumed from a checkpoint at step 2: steps 3–5 are logged already
        resumed.log({"train/loss": 10.0 * step}, step)
    resumed.close()
    client = MlflowClient(uri)
    history = client.get_metric_history(lg.run_id, "train/loss")
    assert sorted((m.step, m.value) for m in history) == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 5.0),
                                                         (6, 60.0), (7, 70.0)]
    images = [a.path for a in client.list_artifacts(lg.run_id, "images")]
    assert [p.split("+")[:3] for p in images if p.endswith(".png")] == [["images/pictures~sample0", "step", "5"]]
    assert client.get_run(lg.run_id).info.status == "FINISHED"
    assert not pending.exists() and not (tmp_path / "pending.images").exists()
    assert json.loads((tmp_path / "mlflow_state.json").read_text())["steps"]["train/loss"] == 7


CHILD = textwrap.dedent("""
    import os, signal, sys, time
    from pathlib import Path
    from pipeline.metrics import MlflowLogger
    from pipeline.preempt import Preemption

    uri, out, mode = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    lg = MlflowLogger(uri, "exp", mode, {}, {}, pending_file=out / "pending.json")
    preemption = Preemption(timeout_s=3.0)
    preemption.at_exit(lg.save_pending)
    print("ready", flush=True)
    sys.stdin.readline()  # the test stops the server meanwhile
    for step in range(1, 6):
        lg.log({"train/loss": float(step)}, step)
    os.kill(os.getpid(), signal.SIGUSR1)
    if mode == "deadline":  # the trainer's path: close within the time the watchdog leaves
        lg.close("KILLED", preemption.time_left() * 0.8)
        sys.exit(0)
    time.sleep(60)  # a rank stuck in a collective: the watchdog must end it
""")


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["deadline", "watchdog"])
def test_preemption_keeps_queued_records(server, tmp_path: Path, mode: str) -> None:
    """Server hung after a preemption signal: close() gives up at the deadline, or the watchdog's exit
    saves the queue; either way the records are in the pending file."""
    uri, proc = server
    child = subprocess.Popen([sys.executable, "-c", CHILD, uri, str(tmp_path), mode], cwd=ROOT, text=True,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             env={**os.environ, "MLFLOW_HTTP_REQUEST_TIMEOUT": "60"})
    assert child.stdout.readline().strip() == "ready"
    os.killpg(proc.pid, signal.SIGSTOP)  # requests now hang for the full 60 s timeout
    child.stdin.write("go\n")
    child.stdin.flush()
    try:
        assert child.wait(timeout=50) == (0 if mode == "deadline" else 75)
    finally:
        child.kill()
        os.killpg(proc.pid, signal.SIGCONT)
    saved = json.loads((tmp_path / "pending.json").read_text())
    assert [m[2] for r in saved["records"] if r["kind"] == "metrics" for m in r["args"][0]] == [1, 2, 3, 4, 5]


def test_log_image_reaches_the_image_panel(sqlite_uri: str, tmp_path: Path) -> None:
    """log_image through a real SQLite store: an image under images/ with its key and step in the file name
    (what MLflow's UI reads for the image panel and its step slider), and the run's logged-images tag."""
    import numpy as np
    from PIL import Image

    uri = sqlite_uri
    lg = MlflowLogger(uri, "exp", "img", {}, {}, pending_file=tmp_path / "pending.json")
    picture = np.zeros((40, 300, 3), np.uint8)
    picture[:, :150, 0] = 255
    lg.log_image("pictures/attention", picture, step=7)
    picture[:] = 0  # the queued copy is not touched
    lg.log_image("pictures/attention", picture, step=9)
    with pytest.raises(ValueError, match="H×W×3"):
        lg.log_image("bad", np.zeros((4, 4), np.uint8), step=1)
    lg.close()
    client = MlflowClient(uri)
    files = sorted(a.path for a in client.list_artifacts(lg.run_id, "images"))
    pngs = [f for f in files if f.endswith(".png")]
    assert sorted(f.split("+")[:3] for f in pngs) == [["images/pictures~attention", "step", "7"],
                                                      ["images/pictures~attention", "step", "9"]]
    assert len([f for f in files if f.endswith("+compressed.webp")]) == 2  # the panel's thumbnails
    by_step = {int(f.split("+")[2]): f for f in pngs}
    with Image.open(client.download_artifacts(lg.run_id, by_step[7], str(tmp_path))) as img:
        got = np.asarray(img)
    assert got.shape == (40, 300, 3) and got[0, 0, 0] == 255 and got[0, 200, 0] == 0
    assert client.get_run(lg.run_id).data.tags.get("mlflow.loggedImages") == "True"
    exp = client.get_experiment(client.get_run(lg.run_id).info.experiment_id)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"  # the UI's training view
