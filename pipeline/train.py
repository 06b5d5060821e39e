"""Training entry point: ``python -m pipeline.train RECIPE [--section.key=value ...]``.

Launch it directly (one process), under ``torchrun --nproc_per_node N``, the DeepSpeed launcher or
``srun``; rank and world size come from the launcher's environment. ``vitpipe train`` calls
:func:`run`. Exit status: 0 when the run finished, 75 after a preemption checkpoint (requeue and
resume), 2 for a problem the user can fix (printed on one line), 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from data_prep.format import FormatError
from pipeline.config import ConfigError
from pipeline.config_io import load_config
from pipeline.data.shards import LoaderError
from pipeline.dist import watch_launcher, world_info_from_env
from pipeline.log import setup_logging
from pipeline.preempt import EXIT_PREEMPTED

logger = logging.getLogger(__name__)

PROG = "pipeline.train"
EXIT_USER_ERROR = 2

_EPILOG = """\
overrides:
  Any config key can be set as --section.key=value (TOML syntax for the value:
  --optim.lr=1e-3, --data.crop_scale=[0.5,1.0], --engine.mixed_precision=bf16).
  Precedence: command line > recipe > defaults.

examples:
  python -m pipeline.train jobs/demo/vitpico_digits_cls_cpu.toml --data.path=runs/demo-data/digits-shards
  torchrun --nproc_per_node 2 -m pipeline.train RECIPE --run.name=try2

exit status: 0 finished, 75 preempted (checkpoint written; requeue to resume), 2 user error, 1 failure.
"""


def run(recipe: str | None, overrides: list[str]) -> dict[str, Any]:
    """Loads the config, trains and tears down.

    Args:
        recipe: Recipe TOML path (None: defaults only).
        overrides: ``--section.key=value`` items.

    Returns:
        The run summary.
    """
    cfg = load_config(recipe, overrides)
    setup_logging(world_info_from_env().rank, None, cfg.run.log_level)
    from pipeline.rundir import StorageError, release_run_dirs, run_dir_of, storage_message
    from pipeline.trainer import Trainer  # heavy imports only after the config is known to be valid

    stem = Path(recipe).stem if recipe else "run"
    trainer = None
    try:
        trainer = Trainer(cfg, stem)
        return trainer.fit()
    except (OSError, RuntimeError) as err:  # a full disk: one line naming the path, not a chain of tracebacks
        message = storage_message(err, trainer.run_dir if trainer else run_dir_of(cfg, stem))
        if message is None:
            raise
        raise StorageError(message) from None
    finally:
        if trainer is not None:
            trainer.acc.end_training()
        release_run_dirs()


def user_errors() -> tuple[type[BaseException], ...]:
    """Errors reported on one line without a traceback: bad config, missing or malformed data, unknown model.

    The model registry is imported here, not at the top, so that ``--help`` and config errors are instant.
    """
    from model.factory import UnknownModelError
    from pipeline.rundir import RunError  # e.g. pipeline.checkpoint.CheckpointError: no checkpoint can be resumed

    return ConfigError, LoaderError, FormatError, UnknownModelError, RunError, FileNotFoundError


def report_user_error(line: str) -> None:
    """Prints a user error once per job: rank 0 prints it; under ``vitpipe.launch`` other ranks hand it over.

    The same error is usually raised on every rank (a taken run directory, missing data). Ranks other
    than 0 started by :mod:`vitpipe.launch` write it to their log file and torchelastic's error file,
    from which the launcher prints it only if it differs from rank 0's. Under a bare ``torchrun`` every
    rank prints it (never silent).
    """
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if world_info_from_env().rank == 0 or not os.environ.get("VITPIPE_LAUNCHER") or not error_file:
        sys.stderr.write(line + "\n")
        return
    logger.warning("%s", line)  # this rank's log file (its console shows errors only)
    try:
        Path(error_file).write_text(json.dumps({"message": line, "timestamp": int(time.time())}))
    except OSError:
        sys.stderr.write(line + "\n")


def exit_status(summary: dict[str, Any]) -> int:
    """The process exit status of a run summary: 0 finished, 75 preempted, 1 otherwise."""
    return {"FINISHED": 0, "PREEMPTED": EXIT_PREEMPTED}.get(summary["status"], 1)


def build_parser() -> argparse.ArgumentParser:
    """The entry point's argument parser (overrides are collected apart, see :func:`parse_args`)."""
    parser = argparse.ArgumentParser(prog=PROG, allow_abbrev=False, epilog=_EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     description="Train a model from a recipe TOML (jobs/...), with overrides.",
                                     usage=f"{PROG} [-h] RECIPE [--section.key=value ...]")
    parser.add_argument("recipe", metavar="RECIPE", help="recipe TOML file, e.g. jobs/demo/vitpico_digits_cls_cpu.toml")
    return parser


def parse_args(argv: list[str]) -> tuple[str, list[str]]:
    """Splits the command line into the recipe and its ``--section.key=value`` overrides.

    The DeepSpeed launcher's ``--local_rank=N`` is dropped: rank and world size come from the environment.

    Returns:
        ``(recipe, overrides)``; exits with status 2 and the usage on a malformed command line.
    """
    parser = build_parser()
    argv = [a for a in argv if not a.startswith(("--local_rank", "--local-rank"))]
    args, rest = parser.parse_known_args(argv)
    overrides = [a for a in rest if a.startswith("--") and "." in a.split("=")[0]]
    unknown = [a for a in rest if a not in overrides]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return args.recipe, overrides


def main(argv: list[str] | None = None) -> int:
    """Trains from the command line, reporting user errors on one line.

    Returns:
        The process exit status (see the module docstring).
    """
    recipe, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    watch_launcher(EXIT_PREEMPTED)  # under torchrun: end with the launcher, never train on as an orphan
    try:
        return exit_status(run(recipe, overrides))
    except user_errors() as err:
        report_user_error(f"{PROG}: error: {err}")
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        sys.stderr.write(f"{PROG}: interrupted\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
