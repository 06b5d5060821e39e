"""Parsers and handlers of the ``vitpipe`` subcommands (``prep``: :mod:`vitpipe.prep`, ``viz``: :mod:`vitpipe.viz`).

Building a parser imports nothing heavy: torch, timm and MLflow are imported by the handlers.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

logger = logging.getLogger("vitpipe")

_TRAIN_EPILOG = """\
examples:
  vitpipe train jobs/demo/vitpico_digits_cls_cpu.toml --data.path=runs/demo-data/digits-shards
  vitpipe train RECIPE --nproc-per-node 2 --run.name=try2        # torchrun on this machine
  torchrun --nproc_per_node 2 -m pipeline.train RECIPE ...       # the same, launched by hand

The run directory <run.output_dir>/<run.name> receives config.toml (the resolved config),
log.rank{N}.txt, checkpoints/, final/model.safetensors and summary.json; the MLflow run
goes to <run.output_dir>/mlflow.db unless tracking.uri says otherwise.
"""


def add_demo_parser(sub: Any, formatter: Any) -> None:
    """Adds ``vitpipe demo``."""
    from vitpipe.demo import DEMO_DESCRIPTION, run_demo_command

    p = sub.add_parser("demo", help="run the whole path on the embedded digits data set",
                       description=DEMO_DESCRIPTION, formatter_class=formatter)
    p.add_argument("--out", default="runs", help="runs directory (default: %(default)s)")
    p.add_argument("--nproc-per-node", type=int, default=1, metavar="N",
                   help="training processes (N > 1 uses torchrun with gloo; default: %(default)s)")
    p.add_argument("--quick", action="store_true",
                   help="a faster, smaller variant (subset of digits, tiny model, few epochs) for tests")
    p.set_defaults(func=run_demo_command, accepts_overrides=True)


def add_train_parser(sub: Any, formatter: Any, overrides_help: str) -> None:
    """Adds ``vitpipe train``."""
    p = sub.add_parser("train", help="train from a recipe", formatter_class=formatter,
                       description="Train a model from a recipe TOML (jobs/...), with overrides.",
                       epilog=overrides_help + "\n" + _TRAIN_EPILOG)
    p.add_argument("recipe", help="recipe TOML file, e.g. jobs/demo/vitpico_digits_cls_cpu.toml")
    p.add_argument("--nproc-per-node", type=int, default=1, metavar="N",
                   help="start N processes with torchrun on this machine (default: %(default)s)")
    p.set_defaults(func=run_train_command, accepts_overrides=True)


def run_train_command(args: argparse.Namespace) -> int:
    """Trains in this process, or under torchrun when ``--nproc-per-node`` > 1."""
    if args.nproc_per_node > 1:
        from pipeline.config_io import load_config
        from vitpipe.launch import torchrun

        load_config(args.recipe, args.overrides)  # fail here, once, rather than in every rank
        return torchrun(args.nproc_per_node, ["-m", "pipeline.train", args.recipe, *args.overrides])
    from pipeline.train import exit_status, run

    return exit_status(run(args.recipe, args.overrides))


def add_eval_parser(sub: Any, formatter: Any, overrides_help: str) -> None:
    """Adds ``vitpipe eval``."""
    p = sub.add_parser("eval", help="evaluate a run's weights (top-1/top-5)", formatter_class=formatter,
                       description="Evaluate a finished run's exported weights (or another weights file) "
                                   "on a split, with the run's resolved config.",
                       epilog=overrides_help + "\nexample:\n  vitpipe eval runs/demo-digits-20261122-101500\n")
    p.add_argument("run_dir", help="run directory (holds config.toml and final/model.safetensors)")
    p.add_argument("--weights", help="weights file (default: RUN_DIR/final/model.safetensors)")
    p.add_argument("--split", help="split to evaluate (default: the config's data.val_split)")
    p.set_defaults(func=run_eval_command, accepts_overrides=True)


def run_eval_command(args: argparse.Namespace) -> int:
    """Evaluates and prints the result as one JSON line on stdout."""
    from pipeline.evaluate import evaluate_run

    result = evaluate_run(Path(args.run_dir), args.weights, args.split, args.overrides)
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


def add_export_parser(sub: Any, formatter: Any) -> None:
    """Adds ``vitpipe export``."""
    p = sub.add_parser("export", help="write a checkpoint's weights as one fp32 safetensors file",
                       formatter_class=formatter,
                       description="Consolidate a checkpoint (DDP or DeepSpeed ZeRO-0..3, any number of ranks) "
                                   "into fp32 safetensors that timm.create_model(name, checkpoint_path=...) loads "
                                   "strictly; the file is verified by loading it into the run's model.",
                       epilog="example:\n  vitpipe export runs/my-run --out my-run.safetensors\n")
    p.add_argument("run_dir", help="run directory (holds config.toml and checkpoints/)")
    p.add_argument("--checkpoint", default="latest",
                   help="checkpoint directory name under RUN_DIR/checkpoints, e.g. step_00001000 (default: latest)")
    p.add_argument("--out", help="output file (default: RUN_DIR/export/<checkpoint>.safetensors)")
    p.set_defaults(func=run_export_command)


def run_export_command(args: argparse.Namespace) -> int:
    """Exports, verifies and prints the output path."""
    from pipeline.export import export_run

    sys.stdout.write(str(export_run(Path(args.run_dir), args.checkpoint, args.out)) + "\n")
    return 0


def add_config_parser(sub: Any, formatter: Any, overrides_help: str) -> None:
    """Adds ``vitpipe config``."""
    p = sub.add_parser("config", help="show the resolved config of a recipe, or every key", epilog=overrides_help,
                       description="Print the resolved config (recipe + overrides + defaults) as TOML.",
                       formatter_class=formatter)
    p.add_argument("recipe", nargs="?", help="recipe TOML (default: the built-in defaults)")
    p.add_argument("--keys", action="store_true", help="list every key with its default and meaning")
    p.set_defaults(func=run_config_command, accepts_overrides=True)


def run_config_command(args: argparse.Namespace) -> int:
    """Prints the resolved config, or the documented key list."""
    from pipeline.config_io import dump_toml, field_docs, load_config

    if args.keys:
        for key, default, doc in field_docs():
            sys.stdout.write(f"{key} = {default}\n    {doc}\n")
        return 0
    sys.stdout.write(dump_toml(load_config(args.recipe, args.overrides)))
    return 0


def add_models_parser(sub: Any, formatter: Any) -> None:
    """Adds ``vitpipe models``."""
    p = sub.add_parser("models", help="the model zoo: measured params and GMACs beside published numbers",
                       formatter_class=formatter,
                       description="Build every vitpipe-registered model (random weights) and print its parameter "
                                   "count and GMACs (the papers' \"GFLOPs\") at its default input size beside the "
                                   "published numbers. With --names, list the names that `model.name` accepts "
                                   "(vitpipe's and timm's) without building anything.",
                       epilog="examples:\n  vitpipe models                 the whole zoo table (minutes on CPU)\n"
                              "  vitpipe models 'filtervit_*'   one family\n"
                              "  vitpipe models --names 'swin*' names only, timm's included\n")
    p.add_argument("pattern", nargs="?", default="*", help="shell-style filter, e.g. 'swin_*' (default: all)")
    p.add_argument("--names", action="store_true", help="only list matching registered names (vitpipe and timm)")
    p.add_argument("--format", choices=("text", "markdown"), default="text", help="table format (default: %(default)s)")
    p.set_defaults(func=run_models_command)


def run_models_command(args: argparse.Namespace) -> int:
    """Prints the measured zoo table, or one registered name per line with ``--names``."""
    from model import list_models

    if args.names:
        sys.stdout.write("\n".join(list_models(args.pattern)) + "\n")
        return 0
    from model.zoo import format_table, measure, vitpipe_models

    names = vitpipe_models(args.pattern)
    if not names:
        sys.stdout.write(f"no vitpipe model matches {args.pattern!r} (try --names for timm's)\n")
        return 0
    sys.stdout.write(format_table([measure(n) for n in names], markdown=args.format == "markdown"))
    return 0


def add_ui_parser(sub: Any, formatter: Any) -> None:
    """Adds ``vitpipe ui``."""
    from vitpipe.ui import add_ui_arguments, run_ui_command

    p = sub.add_parser("ui", help="serve the MLflow UI over the project's tracking store",
                       formatter_class=formatter,
                       description="Start the MLflow tracking UI on 127.0.0.1 over <runs>/mlflow.db and print "
                                   "its address; stop it with Ctrl-C (or SIGHUP/SIGTERM). --auth requires a "
                                   "login (see docs/tracking.md).")
    add_ui_arguments(p)
    p.set_defaults(func=run_ui_command)


_SUBMIT_EPILOG = """\
examples:
  vitpipe submit jobs/swin/swin_t_in1k_cls_1x8.toml --nodes 2 --gpus-per-node 8 --partition gpu --time 12:00:00
  vitpipe submit RECIPE --nodes 16 --gpus-per-node 8 --dry-run        # print the batch script only
  vitpipe submit --eval runs/my-run --split val                        # evaluate a finished run
  vitpipe status runs/my-run       vitpipe cancel runs/my-run       vitpipe cancel my-run --signal USR1

The batch script is rendered from slurm/train.sbatch with the cluster defaults of slurm/cluster.toml
(or --cluster FILE / $VITPIPE_CLUSTER) into <run dir>/slurm/train.sbatch, where `sbatch` can submit it
again; Slurm's output goes to <run dir>/slurm/job-<id>.out, appended across requeues. One srun task per
node starts torchrun (c10d rendezvous on the first node, port from the job id). SIGUSR1 arrives
--signal-lead seconds before the time limit: the trainers checkpoint and the job requeues itself (at
most --max-requeues times), then resumes from the checkpoint into the same MLflow run.
"""


def add_submit_parser(sub: Any, formatter: Any, overrides_help: str) -> None:
    """Adds ``vitpipe submit``."""
    from vitpipe.slurm_jobs import run_submit_command

    p = sub.add_parser("submit", help="submit training (or evaluation) as a Slurm batch job",
                       formatter_class=formatter, epilog=overrides_help + "\n" + _SUBMIT_EPILOG,
                       description="Render a Slurm batch script for a recipe (multi-node torchrun, checkpoint "
                                   "and requeue on SIGUSR1) into the run directory and submit it with sbatch.")
    p.add_argument("target", help="recipe TOML; with --eval, a run directory")
    p.add_argument("--nodes", type=int, default=1, metavar="N", help="nodes (default: %(default)s)")
    p.add_argument("--gpus-per-node", type=int, metavar="G",
                   help="GPUs per node, one trainer each (default: the cluster file's, else 0 = one CPU trainer)")
    p.add_argument("--nproc-per-node", type=int, metavar="N", help="trainers per node (default: G, at least 1)")
    g = p.add_argument_group("Slurm options (default: the cluster file)")
    g.add_argument("--partition", metavar="P")
    g.add_argument("--account", metavar="A")
    g.add_argument("--qos", metavar="Q")
    g.add_argument("--time", metavar="T", help="time limit, e.g. 12:00:00")
    g.add_argument("--cpus-per-task", type=int, metavar="C", help="CPUs per node task")
    g.add_argument("--mem", metavar="M", help="memory per node, e.g. 480G")
    g.add_argument("--constraint", metavar="F", help="node features")
    g.add_argument("--exclusive", action="store_true", help="whole nodes")
    g.add_argument("--max-requeues", type=int, metavar="N", help="bound on self-requeues after preemption")
    g.add_argument("--signal-lead", type=int, metavar="S", help="SIGUSR1 S seconds before the time limit")
    g.add_argument("--env", action="append", metavar="NAME=VALUE", help="export in the job (repeatable)")
    g.add_argument("--sbatch", action="append", metavar="--OPTION[=V]",
                   help="another #SBATCH option, e.g. --sbatch=--dependency=afterok:123 (repeatable)")
    g.add_argument("--cluster", metavar="FILE", help="cluster defaults (default: $VITPIPE_CLUSTER or "
                                                     "slurm/cluster.toml)")
    g.add_argument("--python", metavar="PATH", help="interpreter in the job (default: the cluster file's, "
                                                    "else this one)")
    p.add_argument("--dry-run", action="store_true", help="print the batch script; write and submit nothing")
    e = p.add_argument_group("evaluation")
    e.add_argument("--eval", action="store_true", help="TARGET is a run directory: evaluate its weights")
    e.add_argument("--split", help="split to evaluate (default: the run's data.val_split)")
    e.add_argument("--weights", help="weights file (default: RUN_DIR/final/model.safetensors)")
    p.set_defaults(func=run_submit_command, accepts_overrides=True)


def add_status_parser(sub: Any, formatter: Any) -> None:
    """Adds ``vitpipe status``."""
    from vitpipe.slurm_jobs import run_status_command

    p = sub.add_parser("status", help="Slurm jobs of a run (or prep output) and where the run stands",
                       formatter_class=formatter,
                       description="Show the state of every Slurm job submitted for a run directory (or a "
                                   "`vitpipe prep --slurm` output directory), the run's status, latest "
                                   "checkpoint, attempts (requeues) and MLflow run.")
    p.add_argument("target", help="run directory, prep output directory, or a run name under --runs")
    p.add_argument("--runs", default="runs", help="runs directory for a run name (default: %(default)s)")
    p.set_defaults(func=run_status_command)


def add_cancel_parser(sub: Any, formatter: Any) -> None:
    """Adds ``vitpipe cancel``."""
    from vitpipe.slurm_jobs import run_cancel_command

    p = sub.add_parser("cancel", help="cancel (or signal) the Slurm jobs of a run", formatter_class=formatter,
                       description="scancel the queued and running jobs of a run (or prep output) directory. "
                                   "With --signal USR1 the jobs are not cancelled: the trainers checkpoint at "
                                   "the next step and the job requeues itself.")
    p.add_argument("target", help="run directory, prep output directory, or a run name under --runs")
    p.add_argument("--runs", default="runs", help="runs directory for a run name (default: %(default)s)")
    p.add_argument("--signal", metavar="SIG", help="send this signal to the jobs' steps instead (e.g. USR1)")
    p.set_defaults(func=run_cancel_command)
