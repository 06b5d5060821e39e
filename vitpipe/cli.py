"""The ``vitpipe`` command: one entry point, one subcommand per job.

Heavy imports (torch, timm, mlflow) happen inside the subcommand that needs them, so ``--help``
is instant. User errors (bad config, missing data) print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import os
import sys

from vitpipe import commands
from vitpipe.errors import user_error_types
from vitpipe.order import add_order_parser
from vitpipe.prep import add_prep_parser
from vitpipe.viz import add_viz_parser

_DESCRIPTION = """\
vitpipe: distributed pretraining of vision transformers on images and video.

The path of a run: raw images -> `vitpipe prep` (WebDataset shards + manifest) ->
`vitpipe train RECIPE` (loader, model, optimizer, engine, checkpoints, MLflow) ->
`vitpipe eval RUN_DIR` -> `vitpipe ui` to browse the tracked runs.
"""

_EPILOG = """\
first steps:
  vitpipe demo                         whole path on the embedded digits data set (CPU, ~2 min)
  vitpipe config jobs/demo/vitpico_digits_cls_cpu.toml --keys   every config key, documented
  vitpipe ui                           browse runs in the MLflow UI

run `vitpipe <command> --help` for the details of each command.
"""

_OVERRIDES_HELP = """\
overrides:
  Any config key can be set as --section.key=value (TOML syntax for the value:
  --optim.lr=1e-3, --data.crop_scale=[0.5,1.0], --engine.mixed_precision=bf16).
  Precedence: command line > recipe > defaults. `vitpipe config RECIPE --keys` lists them.
"""


def _formatter(prog: str) -> argparse.HelpFormatter:
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=32)


def build_parser() -> argparse.ArgumentParser:
    """The full command-line parser."""
    parser = argparse.ArgumentParser(prog="vitpipe", description=_DESCRIPTION, epilog=_EPILOG,
                                     formatter_class=_formatter)
    parser.add_argument("--version", action="version", version=f"vitpipe {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    commands.add_demo_parser(sub, _formatter)
    add_prep_parser(sub)
    commands.add_train_parser(sub, _formatter, _OVERRIDES_HELP)
    commands.add_eval_parser(sub, _formatter, _OVERRIDES_HELP)
    commands.add_export_parser(sub, _formatter)
    commands.add_config_parser(sub, _formatter, _OVERRIDES_HELP)
    commands.add_models_parser(sub, _formatter)
    add_order_parser(sub, _formatter)
    add_viz_parser(sub, _formatter)
    commands.add_ui_parser(sub, _formatter)
    commands.add_submit_parser(sub, _formatter, _OVERRIDES_HELP)
    commands.add_status_parser(sub, _formatter)
    commands.add_cancel_parser(sub, _formatter)
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("vitpipe")
    except PackageNotFoundError:
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    """Runs the ``vitpipe`` command.

    Returns:
        The process exit status: 0 on success, 2 for user errors.
    """
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    # The DeepSpeed launcher appends --local_rank=N; rank and world size are read from the environment.
    argv = [a for a in argv if not a.startswith(("--local_rank", "--local-rank"))]
    args, rest = parser.parse_known_args(argv)
    overrides = [a for a in rest if a.startswith("--") and "." in a.split("=")[0]]
    unknown = [a for a in rest if a not in overrides]
    if unknown or (overrides and not getattr(args, "accepts_overrides", False)):
        parser.error(f"unrecognized arguments: {' '.join(unknown or overrides)}")
    args.overrides = overrides
    from pipeline.log import setup_logging

    setup_logging(int(os.environ.get("RANK", 0)), None, os.environ.get("VITPIPE_LOG_LEVEL", "INFO"))
    try:
        return int(args.func(args) or 0)
    except user_error_types() as err:
        sys.stderr.write(f"vitpipe {args.command}: error: {err}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("vitpipe: interrupted\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
