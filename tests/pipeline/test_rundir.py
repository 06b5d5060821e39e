"""Run naming and which run directories may be (re)used."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from pipeline.config import ConfigError, JobCfg, RunCfg
from pipeline.rundir import RunError, check_run_dir, config_of, default_run_name, run_dir_of


def test_default_name_is_the_recipe_stem_and_utc_time() -> None:
    assert default_run_name("vitpico", datetime(2026, 11, 22, 3, 13, 0, tzinfo=UTC)) == "vitpico-20261122-031300"
    stem, day, clock = default_run_name("x").split("-")
    assert stem == "x" and len(day) == 8 and len(clock) == 6


def test_run_dir_is_under_the_output_dir(tmp_path: Path) -> None:
    named = JobCfg(run=RunCfg(name="mine", output_dir=str(tmp_path)))
    assert run_dir_of(named, "recipe") == tmp_path.resolve() / "mine"
    unnamed = run_dir_of(JobCfg(run=RunCfg(output_dir=str(tmp_path))), "recipe")
    assert unnamed.parent == tmp_path.resolve() and unnamed.name.startswith("recipe-")


def test_new_and_unfinished_runs_are_accepted(tmp_path: Path) -> None:
    check_run_dir(tmp_path / "new", resume=False)
    (tmp_path / "config.toml").write_text("")
    (tmp_path / "summary.json").write_text(json.dumps({"status": "PREEMPTED"}))
    check_run_dir(tmp_path, resume=True)


def test_finished_run_is_refused(tmp_path: Path) -> None:
    run = tmp_path / "done"
    run.mkdir()
    (run / "summary.json").write_text(json.dumps({"status": "FINISHED"}))
    with pytest.raises(ConfigError, match=r"run.name = 'done': .* holds a finished run; choose another run.name"):
        check_run_dir(run, resume=True)


def test_existing_run_is_refused_without_resume(tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_text("")
    with pytest.raises(ConfigError, match="already holds a run and checkpoint.resume is false"):
        check_run_dir(tmp_path, resume=False)


def test_config_of_names_a_directory_that_is_not_a_run(tmp_path: Path) -> None:
    with pytest.raises(RunError, match="is not a run directory: no config.toml"):
        config_of(tmp_path)
    (tmp_path / "config.toml").write_text("")
    assert config_of(tmp_path) == tmp_path / "config.toml"
