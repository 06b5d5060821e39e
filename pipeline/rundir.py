"""Run directories: how a run is named, when a directory may be (re)used, and what a finished one holds.

A run lives in ``<run.output_dir>/<run.name>``; an empty ``run.name`` becomes
``<recipe stem>-<UTC time>``. A directory whose ``summary.json`` says ``FINISHED`` is never reused;
one that holds a run (``config.toml``) is resumed, or refused when ``checkpoint.resume`` is false.
The trainer and the Slurm submitter decide with the same functions.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

from pipeline.config import ConfigError, JobCfg

CONFIG_FILE = "config.toml"
SUMMARY_FILE = "summary.json"


class RunError(ValueError):
    """A run directory lacks what a command needs (no config, no weights, no complete checkpoint)."""


def default_run_name(recipe_stem: str, now: datetime | None = None) -> str:
    """The name of a run whose ``run.name`` is empty: ``<recipe stem>-<YYYYmmdd-HHMMSS>`` in UTC.

    Args:
        recipe_stem: Recipe file name without suffix.
        now: The time to use (default: now, UTC).
    """
    return f"{recipe_stem}-{now or datetime.now(UTC):%Y%m%d-%H%M%S}"


def run_dir_of(cfg: JobCfg, recipe_stem: str) -> Path:
    """The absolute run directory ``<run.output_dir>/<run.name or default_run_name(recipe_stem)>``."""
    return Path(cfg.run.output_dir).resolve() / (cfg.run.name or default_run_name(recipe_stem))


def check_run_dir(run_dir: Path, resume: bool) -> None:
    """Refuses a directory that holds a finished run, or any run when ``resume`` is false.

    Args:
        run_dir: The run directory (need not exist).
        resume: ``checkpoint.resume``: whether an unfinished run there may be continued.

    Raises:
        ConfigError: Naming ``run.name`` and the directory.
    """
    name = run_dir.name
    if not resume and (run_dir / CONFIG_FILE).exists():
        raise ConfigError(f"run.name = {name!r}: {run_dir} already holds a run and checkpoint.resume is false")
    summary = run_dir / SUMMARY_FILE
    if summary.is_file() and json.loads(summary.read_text()).get("status") == "FINISHED":
        raise ConfigError(f"run.name = {name!r}: {run_dir} holds a finished run; choose another run.name")


def config_of(run_dir: Path) -> Path:
    """The resolved config a run left (``<run_dir>/config.toml``).

    Raises:
        RunError: When ``run_dir`` is not a run directory.
    """
    if not (run_dir / CONFIG_FILE).is_file():
        raise RunError(f"{run_dir} is not a run directory: no config.toml")
    return run_dir / CONFIG_FILE
