"""``vitpipe demo``: the whole path on the embedded digits data set, on a CPU, in a few minutes."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from vitpipe.errors import UserError
from vitpipe.launch import torchrun

logger = logging.getLogger("vitpipe")

DEMO_RECIPE = "jobs/demo/vitpico_digits_cls_cpu.toml"
QUICK_RECIPE = "jobs/demo/vitnano_digits_cls_cpu_quick.toml"
DEMO_SHARD_SIZE = 128

DEMO_DESCRIPTION = f"""\
Run vitpipe's real path end to end on scikit-learn's 1,797 handwritten digits:

  1. write them as JPEG files in ImageNet layout   <out>/demo-data/digits-jpeg/{{train,val}}/<class>/*.JPEG
  2. vitpipe prep imagenet                         <out>/demo-data/digits-shards (tar shards, manifest)
  3. vitpipe train {DEMO_RECIPE}
     (webdataset loader, tiny ViT from timm's registry, AdamW + warm-up/cosine, label smoothing,
      accelerate; one process, or torchrun on gloo with --nproc-per-node 2)
  4. evaluation (top-1/top-5) and one MLflow run in <out>/mlflow.db
  5. a summary: where the run is and how to look at it (vitpipe ui)

Split: digit i is in val when i % 5 == 4 (1,438 train / 359 val images, 32x32).
Config overrides (--section.key=value) are passed on to training.
"""


def _project_file(rel: str) -> Path:
    """Finds a project file relative to the current directory or the source checkout."""
    for base in (Path.cwd(), Path(__file__).resolve().parents[1]):
        if (base / rel).is_file():
            return base / rel
    raise UserError(f"{rel} not found; run the demo from the vitpipe project directory")


def prepare_digits(out: Path, limit: int | None = None) -> Path:
    """Writes the digit JPEGs and shards them (each step skipped when already done).

    Returns:
        The dataset directory for ``data.path``.
    """
    from data_prep.digits import write_digits
    from data_prep.shard import prep_imagefolder

    name = "digits" if limit is None else f"digits-{limit}"
    raw, shards = out / "demo-data" / f"{name}-jpeg", out / "demo-data" / f"{name}-shards"
    write_digits(raw, size=32, limit=limit)
    if not (shards / "dataset.json").is_file():
        info = prep_imagefolder(raw, shards, shard_size=DEMO_SHARD_SIZE, seed=0)
        logger.info("sharded: %s", {name: split.num_samples for name, split in info.splits.items()})
    return shards


def run_demo(out: Path, nproc: int, quick: bool, overrides: list[str]) -> dict[str, Any]:
    """Prepares the data, trains (in-process or under torchrun) and returns the run summary."""
    shards = prepare_digits(out)
    recipe = str(_project_file(QUICK_RECIPE if quick else DEMO_RECIPE))
    name = f"demo-digits{'-quick' if quick else ''}-{datetime.now(UTC):%Y%m%d-%H%M%S}"
    args = [f"--data.path={shards}", f"--run.output_dir={out}", f"--run.name={name}", *overrides]
    if nproc == 1:
        from pipeline.train import run

        return run(recipe, args)
    status = torchrun(nproc, ["-m", "pipeline.train", recipe, *args])
    summary_file = out.resolve() / name / "summary.json"
    if status != 0 or not summary_file.is_file():
        raise UserError(f"training under torchrun failed (exit status {status}); see {out / name}/log.rank*.txt")
    return json.loads(summary_file.read_text())


def run_demo_command(args: argparse.Namespace) -> int:
    """Runs the demo and writes the summary to stdout."""
    out = Path(args.out)
    summary = run_demo(out, args.nproc_per_node, args.quick, args.overrides)
    sys.stdout.write(format_summary(summary, out))
    return 0 if summary["status"] == "FINISHED" else 1


def format_summary(s: dict[str, Any], out: Path) -> str:
    """The closing message: result, where the run lives, how to look at it."""
    return (
        f"\nvitpipe demo {s['status'].lower()}: trained in {s['seconds']:.0f} s on {s['world_size']} process(es)\n"
        f"  model          {s['model']} ({s['params'] / 1e6:.2f} M parameters), {s['steps']} steps\n"
        f"  held-out top-1 {s['val_top1']:.2f} %   top-5 {s['val_top5']:.2f} %   ({s['val_samples']:.0f} images)\n"
        f"  run directory  {s['run_dir']}\n"
        f"  MLflow run     {s['mlflow_run_id']} in {s['tracking_uri']}\n"
        f"  look at it     vitpipe ui --runs {out}    (then open the printed address)\n"
        f"  evaluate again vitpipe eval {s['run_dir']}\n"
    )
