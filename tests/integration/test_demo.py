"""The whole path end to end: `vitpipe demo --quick` (1 process and torchrun × 2), eval, the MLflow
store it leaves, and `vitpipe ui` serving it."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import timm
import torch
from mlflow.tracking import MlflowClient

import model  # noqa: F401  (registers vitpipe's models with timm)
from tests.conftest import ROOT, run_cli

pytestmark = pytest.mark.slow


def _summary(stdout: str) -> Path:
    match = re.search(r"run directory\s+(\S+)", stdout)
    assert match, stdout
    return Path(match.group(1))


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """One quick demo in a single process; returns (runs dir, run dir)."""
    runs = tmp_path_factory.mktemp("runs")
    proc = run_cli("demo", "--quick", "--out", str(runs), "--tracking.system_metrics_s=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return runs, _summary(proc.stdout)


def _only_run(runs: Path):
    client = MlflowClient(f"sqlite:///{runs / 'mlflow.db'}")
    exp = client.get_experiment_by_name("vitpipe-demo")
    found = client.search_runs([exp.experiment_id])
    assert len(found) == 1, [r.info.run_name for r in found]
    return client, found[0]


def test_demo_learns_and_leaves_one_tracked_run(demo_run: tuple[Path, Path]) -> None:
    runs, run_dir = demo_run
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "FINISHED" and summary["world_size"] == 1
    assert summary["val_samples"] == 359
    assert summary["val_top1"] >= 50.0, summary  # chance is 10 %; the quick demo reaches ~70 %
    client, run = _only_run(runs)
    assert run.info.status == "FINISHED" and run.info.run_name == run_dir.name
    assert run.data.params["model.name"] == "vit_nano_patch8_32"
    assert run.data.params["data.path"].endswith("digits-shards")
    assert run.data.metrics["val/top1"] == pytest.approx(summary["val_top1"])
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert len(history) >= 10 and history[-1].value < history[0].value  # per-step metrics, loss going down
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.toml", "summary.json", "checkpoint", "logs"} <= artifacts
    assert [a.path for a in client.list_artifacts(run.info.run_id, "checkpoint")] == ["checkpoint/model.safetensors"]
    assert (run_dir / "log.rank0.txt").read_text().count("val/top1") >= 2
    assert any(key.startswith("system/cpu") for key in run.data.metrics)  # MLflow's system metrics
    assert run.data.tags["vitpipe.git_sha"] not in ("", "unknown")


def test_resolved_config_and_weights_reproduce_the_result(demo_run: tuple[Path, Path]) -> None:
    _, run_dir = demo_run
    summary = json.loads((run_dir / "summary.json").read_text())
    proc = run_cli("eval", str(run_dir))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["top1"] == pytest.approx(summary["val_top1"]) and result["samples"] == 359
    # the exported weights load strictly into the registry-built model
    net = timm.create_model("vit_nano_patch8_32", num_classes=10,
                            checkpoint_path=str(run_dir / "final" / "model.safetensors"))
    assert net(torch.zeros(1, 3, 32, 32)).shape == (1, 10)


def test_ui_serves_the_run(demo_run: tuple[Path, Path]) -> None:
    runs, run_dir = demo_run
    proc = subprocess.Popen([sys.executable, "-m", "vitpipe", "ui", "--runs", str(runs), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        line = proc.stdout.readline()
        url = re.search(r"http://127\.0\.0\.1:\d+", line)
        assert url, (line, proc.stderr.read() if proc.poll() is not None else "")
        with urllib.request.urlopen(url.group(0) + "/", timeout=10) as page:
            assert page.status == 200
        request = urllib.request.Request(url.group(0) + "/api/2.0/mlflow/experiments/search",
                                         data=b'{"max_results": 10}', headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as reply:
            names = [e["name"] for e in json.load(reply)["experiments"]]
        assert "vitpipe-demo" in names
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    with pytest.raises(OSError):  # the server went away with it
        urllib.request.urlopen(url.group(0) + "/health", timeout=3)


def test_demo_under_torchrun_two_processes(tmp_path: Path) -> None:
    proc = run_cli("demo", "--quick", "--nproc-per-node", "2", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = _summary(proc.stdout)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["val_samples"] == 359
    assert summary["val_top1"] >= 40.0, summary  # half the steps of one process at twice the batch (~57 %)
    assert (run_dir / "log.rank1.txt").is_file() and (run_dir / "log.rank0.txt").is_file()
    _, run = _only_run(tmp_path)  # one MLflow run for the job, not one per rank
    assert run.data.params["engine.backend"] == "ddp" and run.data.tags["vitpipe.world_size"] == "2"
