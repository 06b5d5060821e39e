"""Three tiny training runs shared by the picture and export tests (started together, read by several tests).

* ``image_structvit``: StructViT-tiny on a 7-class image folder (32 px);
* ``video_structvit``: video StructViT-tiny on the H.264 clips (2 classes, 4 frames of 32 px);
* ``filtervit``: FilterViT-pico on the 7-class image folder, with ``tracking.register_model = true``.

Each trains 2 steps with an evaluation after each (pictures at steps 1 and 2) in its own output directory
with its own SQLite MLflow store, as ``vitpipe train`` subprocesses run at the same time. The stores start
as copies of one freshly created store, so that MLflow creates its tables once, not once per run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import ROOT

RECIPE = "jobs/demo/vitnano_digits_cls_cpu_quick.toml"
COMMON = ["--schedule.max_steps=2", "--eval.every_steps=1", "--eval.every_epochs=0", "--tracking.pictures=1",
          "--tracking.system_metrics_s=0", "--tracking.log_every_steps=1", "--data.num_workers=0",
          "--engine.cpu_threads=1", "--data.img_size=32"]


@dataclass
class Run:
    """A finished run: its directory, MLflow store and run id."""

    run_dir: Path
    uri: str
    run_id: str
    summary: dict


def _seven_classes(root: Path) -> Path:
    """A 7-class image folder (4 train and 1 val image of 32 px per class), prepared by `vitpipe prep imagenet`."""
    from vitpipe.prep import main as prep_main

    rng = np.random.default_rng(7)
    for split, count in (("train", 4), ("val", 1)):
        for c in range(7):
            folder = root / "src" / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
                pixels[..., c % 3] = 40 * c  # something to learn
                Image.fromarray(pixels).save(folder / f"{c}_{i}.png")
    out = root / "shards"
    assert prep_main(["prep", "imagenet", "--src", str(root / "src"), "--out", str(out), "--shard-size", "16",
                      "--workers", "1"]) == 0
    return out


@pytest.fixture(scope="session")
def picture_runs(video_sets: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Run]:
    """The three runs, trained concurrently once per session."""
    from mlflow.tracking import MlflowClient

    root = tmp_path_factory.mktemp("picture-runs")
    seven = _seven_classes(root / "seven")
    MlflowClient(f"sqlite:///{root / 'template.db'}").search_experiments()  # creates the tables
    jobs = {
        "image_structvit": [f"--data.path={seven}", "--model.name='structvit_tiny_4_1'", "--model.num_classes=7",
                            "--data.batch_size=8"],
        "video_structvit": [f"--data.path={video_sets['h264']}", "--model.name='structvit_tiny_4_1_video'",
                            "--model.num_classes=2", "--data.batch_size=2", "--data.video={frames = 4, stride = 2}"],
        "filtervit": [f"--data.path={seven}", "--model.name='filtervit_pico'",
                      "--model.num_classes=7", "--data.batch_size=8", "--tracking.register_model=true"],
    }
    for name in jobs:
        (root / name).mkdir()
        shutil.copyfile(root / "template.db", root / name / "mlflow.db")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    procs = {}
    for name, args in jobs.items():
        with open(root / name / "console.txt", "w") as console:  # a file: no pipe fills up while others run
            procs[name] = subprocess.Popen([sys.executable, "-m", "vitpipe", "train", RECIPE, *COMMON, *args,
                                            f"--run.output_dir={root / name}", f"--run.name={name}"],
                                           cwd=ROOT, env=env, stdout=console, stderr=subprocess.STDOUT)
    runs = {}
    for name, proc in procs.items():
        assert proc.wait(timeout=600) == 0, f"{name}: {(root / name / 'console.txt').read_text()[-3000:]}"
        summary = json.loads((root / name / name / "summary.json").read_text())
        runs[name] = Run(root / name / name, summary["tracking_uri"], summary["mlflow_run_id"], summary)
    return runs
