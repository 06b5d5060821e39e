"""slurm/prep_array.sbatch + prep_merge.sbatch run as Slurm would run them (no Slurm needed)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.data_prep.test_images_scale import make_imagenet

ROOT = Path(__file__).resolve().parents[2]


def _files(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_array_template_two_tasks_then_merge(tmp_path: Path) -> None:
    if shutil.which("bash") is None:
        pytest.skip("no bash")
    src = make_imagenet(tmp_path / "src", bad=False)
    stub = tmp_path / "bin"
    stub.mkdir()
    (stub / "sbatch").write_text(f'#!/bin/bash\necho "$@" >> {tmp_path}/sbatch.log\necho 4242\n')
    (stub / "sbatch").chmod(0o755)
    env = {**os.environ, "PATH": f"{stub}:{os.environ['PATH']}", "PYTHON": sys.executable,
           "SLURM_SUBMIT_DIR": str(ROOT), "SLURM_ARRAY_JOB_ID": "777", "SLURM_ARRAY_TASK_MIN": "3",
           "SLURM_ARRAY_TASK_COUNT": "2", "SLURM_CPUS_PER_TASK": "1"}
    args = ["imagenet", "--src", str(src), "--out", str(tmp_path / "out"), "--shard-size", "4"]
    for task_id in (3, 4):  # --array=3-4: task indices 0 and 1
        res = subprocess.run(["bash", str(ROOT / "slurm/prep_array.sbatch"), *args], cwd=tmp_path,
                             env={**env, "SLURM_ARRAY_TASK_ID": str(task_id)}, capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
        assert f"prep task {task_id - 3}/2" in res.stdout
        assert ("planning" in res.stderr) == (task_id == 3), res.stderr  # the first task plans, the second reads
    submitted = (tmp_path / "sbatch.log").read_text().splitlines()
    assert submitted == [f"--parsable --dependency=afterok:777 --kill-on-invalid-dep=yes slurm/prep_merge.sbatch "
                         f"{tmp_path / 'out'}"]
    assert not (tmp_path / "out" / "dataset.json").exists()
    res = subprocess.run(["bash", str(ROOT / "slurm/prep_merge.sbatch"), str(tmp_path / "out")], cwd=tmp_path,
                         env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "every shard, index and manifest row checks out" in res.stderr
    ref = subprocess.run([sys.executable, "-m", "vitpipe", "prep", *args[:-4], "--out", str(tmp_path / "ref"),
                          "--shard-size", "4", "--workers", "1"], cwd=ROOT, capture_output=True, text=True)
    assert ref.returncode == 0, ref.stderr
    assert _files(tmp_path / "out") == _files(tmp_path / "ref")
