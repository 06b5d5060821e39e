"""``python -m pipeline.train``: usage, one-line user errors, and a short run evaluated and exported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline.evaluate import evaluate_run
from pipeline.export import ExportError, export_run
from pipeline.rundir import RunError
from pipeline.train import main, parse_args

ROOT = Path(__file__).resolve().parents[2]
RECIPE = "jobs/demo/vitnano_digits_cls_cpu_quick.toml"


def _train(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.train", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def test_help_prints_the_usage() -> None:
    proc = _train("--help")
    assert proc.returncode == 0 and proc.stdout.startswith("usage: pipeline.train [-h] RECIPE")
    assert "--section.key=value" in proc.stdout and "75" in proc.stdout


def test_overrides_and_the_deepspeed_launchers_local_rank() -> None:
    assert parse_args(["--local_rank=1", "r.toml", "--optim.lr=1e-3", "--data.crop_scale=[0.5,1.0]"]) == \
        ("r.toml", ["--optim.lr=1e-3", "--data.crop_scale=[0.5,1.0]"])
    with pytest.raises(SystemExit) as exc:
        parse_args(["r.toml", "--nope"])
    assert exc.value.code == 2


def test_config_error_is_one_line_with_status_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([RECIPE, "--engine.mixed_precision=fp16"]) == 2
    err = capsys.readouterr().err
    assert err == "pipeline.train: error: engine.mixed_precision = 'fp16': must be one of 'no', 'bf16'\n"


def test_missing_data_is_one_line_with_status_2(tmp_path: Path) -> None:
    proc = _train(RECIPE, f"--data.path={tmp_path}", f"--run.output_dir={tmp_path}")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.splitlines()[-1].startswith("pipeline.train: error: data.path = ")


def test_run_dirs_that_are_not_runs(tmp_path: Path) -> None:
    with pytest.raises(RunError, match="is not a run directory"):
        evaluate_run(tmp_path, None, None, [])
    (tmp_path / "config.toml").write_text("")
    with pytest.raises(RunError, match=r"weights .*model.safetensors not found"):
        evaluate_run(tmp_path, None, None, [])
    with pytest.raises(ExportError, match="has no checkpoints/latest"):
        export_run(tmp_path, "latest", None)
    with pytest.raises(ExportError, match="step_1 is not a complete checkpoint"):
        export_run(tmp_path, "step_1", None)


@pytest.mark.slow
def test_short_run_then_evaluate_run_and_export_run(digits_shards: Path, tmp_path: Path) -> None:
    args = [RECIPE, f"--data.path={digits_shards}", f"--run.output_dir={tmp_path}", "--run.name=short",
            "--schedule.max_steps=4", "--data.num_workers=1", "--tracking.enabled=false"]
    proc = _train(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "short"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "FINISHED" and summary["steps"] == 4

    result = evaluate_run(run_dir, None, None, [])
    assert result["top1"] == pytest.approx(summary["val_top1"]) and result["split"] == "val"
    path = export_run(run_dir, "latest", None)
    assert path == run_dir / "export" / "step_00000004.safetensors"
    a, b = load_file(path), load_file(run_dir / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    again = _train(*args)  # a finished run is refused, on one line
    assert again.returncode == 2
    assert again.stderr.splitlines()[-1] == (f"pipeline.train: error: run.name = 'short': {run_dir.resolve()} "
                                             "holds a finished run; choose another run.name")
