"""``eval.every_steps``: evaluation on a step schedule, for runs whose epochs are long or few."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import run_cli

pytestmark = pytest.mark.slow


def test_evaluates_every_n_steps_and_at_the_end(digits_shards: Path, tmp_path: Path) -> None:
    proc = run_cli("train", "jobs/demo/vitnano_digits_cls_cpu_quick.toml", f"--data.path={digits_shards}",
                   f"--run.output_dir={tmp_path}", "--run.name=steps", "--schedule.max_steps=7",
                   "--eval.every_steps=3", "--eval.every_epochs=0", "--data.num_workers=1",
                   "--tracking.system_metrics_s=0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                filter_string="attributes.run_name = 'steps'")
    steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "val/top1"))
    assert steps == [3, 6, 7]
    with pytest.raises(Exception, match="eval.every_steps"):
        from pipeline.config_io import load_config

        load_config(None, ["--eval.every_steps=-1"])
