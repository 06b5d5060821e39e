"""``vitpipe order``: which sample every rank reads at every step of an epoch, from the manifests alone.

The rows come from :class:`pipeline.data.order.SamplePlan`, the plan the training loaders of both
backends follow with ``data.sampler = "exact"``; no tar file is read.
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path
from typing import Any

from vitpipe.errors import UserError

CSV_HEADER = b"rank,step,key\n"

_DESCRIPTION = """\
Write the order in which a training run reads a split: for every rank and every step of one epoch,
the keys of the samples in that rank's batch. Computed from dataset.json and the split manifest alone
(no tar is read) by the planning code the loaders use (data.sampler = "exact", both backends), so it
is what a run with the same seed, process count, batch size and data.shuffle_shards reads.

Output (--out FILE.csv or FILE.parquet; CSV on stdout without --out): one row per sample, columns
  rank   the process that reads it (0 .. ranks-1)
  step   the batch's index in the epoch (the loader's batch count)
  key    the sample key (the manifest's key column, e.g. train_00000042)
ordered by rank, then step, then position in the batch. Each sample of the split appears at most once;
the ones that do not (fewer than one global batch: ranks x batch) are the epoch's drop-last remainder.
A summary goes to stderr.

With --resume-step S --from-ranks R0: the rest of the epoch after a run on R0 processes stopped after
S steps (it consumed the first S x R0 x batch samples of the epoch's order), read by --ranks processes.
Steps are numbered as the resumed loader numbers them: the epoch still ends at its steps per epoch.
"""

_EPILOG = """\
examples:
  vitpipe order /data/in1k-wds --ranks 64 --workers 8 --batch 256 --epoch 3 --out order-e3.parquet
  vitpipe order /data/in1k-wds --ranks 48 --batch 256 --epoch 3 --resume-step 40 --from-ranks 64 --out rest.csv
  vitpipe order runs/demo-data/digits-shards --ranks 2 --batch 64 | head     # CSV on stdout

The order does not depend on --workers: worker w of W decodes a rank's batches w, w+W, ... .
training records the keys it actually read with --data.record_keys=DIR (keys-rank{R}-of{W}-epoch{E}.csv,
the same columns).
"""


def add_order_parser(sub: Any, formatter: Any) -> None:
    """Adds ``vitpipe order``."""
    p = sub.add_parser("order", help="which sample every rank reads at every step of an epoch",
                       description=_DESCRIPTION, epilog=_EPILOG, formatter_class=formatter)
    p.add_argument("dataset", help="dataset directory written by vitpipe prep (holds dataset.json)")
    p.add_argument("--split", default="train", help="split (default: %(default)s)")
    p.add_argument("--ranks", type=int, required=True, metavar="R", help="training processes")
    p.add_argument("--workers", type=int, default=1, metavar="W",
                   help="loader workers per process (reported; the order does not depend on it)")
    p.add_argument("--batch", type=int, required=True, metavar="B", help="per-process batch size (data.batch_size)")
    p.add_argument("--epoch", type=int, default=0, metavar="E", help="epoch, from 0 (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="the run's run.seed (default: %(default)s)")
    p.add_argument("--shuffle-shards", type=int, default=16, metavar="K",
                   help="the run's data.shuffle_shards (default: %(default)s)")
    p.add_argument("--resume-step", type=int, metavar="S", help="resume after S steps of the epoch ...")
    p.add_argument("--from-ranks", type=int, metavar="R0", help="... taken on R0 processes (default: --ranks)")
    p.add_argument("--out", help="output file, .csv or .parquet (default: CSV on stdout)")
    p.set_defaults(func=run_order_command)


def _check(args: argparse.Namespace) -> None:
    for name in ("ranks", "batch", "shuffle_shards"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.workers < 0 or args.epoch < 0:
        raise UserError("--workers and --epoch must be >= 0")
    if args.from_ranks is not None and args.resume_step is None:
        raise UserError("--from-ranks goes with --resume-step")
    if args.resume_step is not None and (args.resume_step < 0 or (args.from_ranks or args.ranks) < 1):
        raise UserError("--resume-step must be >= 0 and --from-ranks >= 1")
    if args.out and Path(args.out).suffix not in (".csv", ".parquet"):
        raise UserError(f"--out {args.out}: must end in .csv or .parquet")


def order_table(args: argparse.Namespace) -> tuple[Any, list[str]]:
    """The order as a pyarrow table ``(rank int32, step int32, key string)`` and the summary lines."""
    import numpy as np
    import pyarrow as pa

    from pipeline.data.order import PlanError, SamplePlan
    from pipeline.data.reader import SampleIndex

    index = SampleIndex.load(args.dataset, args.split, keys=True)
    try:
        plan = SamplePlan(index.sizes, seed=args.seed, rank=0, world_size=args.ranks, batch_size=args.batch,
                          block_shards=args.shuffle_shards)
        start, lines = 0, []
        if args.resume_step is not None:
            from_ranks = args.from_ranks or args.ranks
            cursor = args.resume_step * from_ranks * args.batch
            if cursor > index.num_samples:
                raise PlanError(f"step {args.resume_step} of {from_ranks} × {args.batch} is past the epoch's "
                                f"{index.num_samples} samples")
            start = plan.resume_at(args.epoch, cursor)
            lines.append(f"resume: {args.resume_step} steps of {from_ranks} ranks consumed {cursor} samples of "
                         f"epoch {args.epoch}; {args.ranks} ranks continue at step {start} "
                         f"({plan.steps_per_epoch - start} steps left)")
        table = plan.epoch_table(args.epoch, start)  # steps×R×B sample ids
    except PlanError as err:
        raise UserError(str(err)) from err
    steps = table.shape[0]
    per_rank = table.transpose(1, 0, 2).reshape(-1)  # rank-major: (R·steps·B,)
    step_column = np.tile(np.repeat(np.arange(start, start + steps, dtype=np.int32), args.batch), args.ranks)
    out = pa.table({"rank": pa.array(np.repeat(np.arange(args.ranks, dtype=np.int32), steps * args.batch)),
                    "step": pa.array(step_column),
                    "key": index.keys.take(pa.array(per_rank))})
    read = plan.cursor(args.epoch, start) + steps * plan.global_batch
    lines.insert(0, f"{args.dataset} {args.split}, epoch {args.epoch}: {index.num_samples} samples in "
                    f"{len(index.paths)} shards; {args.ranks} ranks × {args.batch} = {plan.steps_per_epoch} steps "
                    f"per epoch; {index.num_samples - read} samples (the remainder) not read this epoch; "
                    f"{out.num_rows} rows (the same for any number of loader workers)")
    return out, lines


def run_order_command(args: argparse.Namespace) -> int:
    """Writes the order to ``--out`` (or stdout) and the summary to stderr."""
    _check(args)
    table, lines = order_table(args)
    import pyarrow.csv as pa_csv

    csv_options = pa_csv.WriteOptions(quoting_style="none", include_header=False)  # keys need no quoting
    if args.out:
        from data_prep.format import AtomicPath

        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        with AtomicPath(out) as tmp:
            if out.suffix == ".parquet":
                import pyarrow.parquet as pq

                pq.write_table(table, str(tmp), compression="zstd")
            else:
                with tmp.open("wb") as f:
                    f.write(CSV_HEADER)
                    pa_csv.write_csv(table, f, csv_options)
        lines.append(f"wrote {out}")
    else:
        buffer = io.BytesIO(CSV_HEADER)
        buffer.seek(0, io.SEEK_END)
        pa_csv.write_csv(table, buffer, csv_options)
        sys.stdout.buffer.write(buffer.getvalue())
        sys.stdout.flush()
    sys.stderr.write("".join(f"vitpipe order: {line}\n" for line in lines))
    return 0
