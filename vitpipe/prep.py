"""The ``vitpipe prep`` command: offline conversion of image and video datasets into vitpipe datasets.

Wire it into a top-level parser with :func:`add_prep_parser`; the chosen sub-command's handler is
stored as ``args.func`` and returns an exit code; :func:`main` runs it in-process (tests, benchmarks).
``vitpipe prep`` imports no torch (the Slurm templates run ``python -m vitpipe prep``). The work is
done by :mod:`data_prep`, which knows nothing of argument parsing.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from data_prep.errors import PrepError
from data_prep.format import DATASET_JSON, DatasetInfo, FormatError

logger = logging.getLogger(__name__)

_PREP_DESCRIPTION = """\
Prepare datasets offline for vitpipe training.

Converts a source dataset into WebDataset tar shards with NVIDIA DALI index files,
a parquet manifest per split, a quarantine manifest and a dataset.json description.
Training reads the output directory only. Run `vitpipe prep <source> --help` for
each source's exact input layout; docs/data_prep.md has the details.
"""

_IMAGENET_DESCRIPTION = """\
Convert an ImageNet / ImageFolder tree into a vitpipe image dataset.

Expected input layout (class ids are folder names; any names work):

  SRC/train/<class-id>/*.JPEG     required, e.g. SRC/train/n01440764/n01440764_10026.JPEG
  SRC/val/<class-id>/*.JPEG       optional, same class folders as train (a subset is fine)
  SRC/val/*.JPEG                  or flat, labelled by one of:
    SRC/LOC_val_solution.csv        Kaggle solution file (or --val-solution FILE)
    SRC/ILSVRC2012_devkit_t12/      devkit: data/ILSVRC2012_validation_ground_truth.txt
                                    + data/meta.mat (or --devkit DIR)
  SRC/LOC_synset_mapping.txt      optional class names "<wnid> <names>" (or synset_words.txt,
                                  or --synsets FILE; else the devkit's meta.mat)

Images may be .jpg/.jpeg/.png/.tif/.tiff in any letter case. The class list is the sorted
train folder names (torchvision/timm order), so label i is the i-th folder. Inputs that
cannot be stored (zero-byte, not an image, truncated, oversized, FIFOs and devices,
symlink loops, a second name of one file, a read that blocks for --read-timeout-s) are
quarantined with the reason in OUT/quarantine.parquet. Pixels are stored as 8-bit grey
or RGB that every loader decodes alike: 16-bit and float images scaled (not clipped),
palette, alpha, CMYK and TIFF converted, EXIF orientation applied; the manifest's note
column says what was done to each image.

Output (OUT):

  OUT/dataset.json                 classes, splits, shards, counts, options (written last)
  OUT/train.parquet, val.parquet   manifest: key, shard, offset, bytes, label, class_id,
                                   width, height, format, sha256, source, note
  OUT/quarantine.parquet           split, key, source, reason of every input not written
  OUT/train/train-000000.tar       shards; each sample has .jpg (or .png), .cls (label
                                   text), .lbl (int64 LE for DALI) and .json
  OUT/train/train-000000.idx       DALI index (same format as `wds2idx`)
  OUT/train/train-000000.parquet   shard sidecar manifest (marks the shard complete)

Train samples are globally shuffled with --seed before sharding; val keeps its
sorted (class, path) order. Output is byte-identical for the same input and options,
whatever --workers, --threads or --num-tasks.
"""

#: ``prep SOURCE --help`` example of each source (the check commands follow it).
_EXAMPLES = {
    "imagenet": "vitpipe prep imagenet --src /data/imagenet --out /data/imagenet-wds --shard-size 1000",
    "kinetics": "vitpipe prep kinetics --annotations /data/k400/annotations/train.csv \\\n"
                "      /data/k400/annotations/validate.csv --videos /data/k400/videos --out /data/k400-wds",
    "ssv2": "vitpipe prep ssv2 --labels /data/ssv2/labels.json --train /data/ssv2/train.json \\\n"
            "      --validation /data/ssv2/validation.json --videos /data/ssv2/videos --out /data/ssv2-wds",
    "diving48": "vitpipe prep diving48 --train /data/diving48/Diving48_V2_train.json \\\n"
                "      --val /data/diving48/Diving48_V2_test.json --vocab /data/diving48/Diving48_vocab.json \\\n"
                "      --videos /data/diving48/rgb --out /data/diving48-wds",
    "videolist": "vitpipe prep videolist --list train=/data/ucf101/train.txt --list val=/data/ucf101/val.txt \\\n"
                 "      --root /data/ucf101/videos --classes /data/ucf101/classes.txt --out /data/ucf101-wds",
}


def _epilog(source: str) -> str:
    out = _EXAMPLES[source].split("--out ", 1)[1].split()[0]
    return (f"example:\n  {_EXAMPLES[source]}\n  vitpipe prep verify {out} && vitpipe prep inspect {out}\n\n"
            + _SCALE_EPILOG)


_SCALE_EPILOG = """\
scale:
  --workers N processes write shards in parallel. A Slurm array splits the shards
  across machines: run the same command with --task-index I --num-tasks N in every
  task (slurm/prep_array.sbatch), then `vitpipe prep merge OUT`. The input is scanned
  once: --slurm plans at submission, else --plan-only or the first task writes
  OUT/_parts/plan.{json,parquet} and every task reads only its own shards from it.
  Re-running after a kill keeps finished shards and rewrites the rest.
  Rule of thumb: shards >= nodes x GPUs x loader workers (--nodes/--gpus-per-node/
  --loader-workers warn when not); ImageNet-1k train (1,281,167 images) with
  --shard-size 1000 gives 1,282 shards of about 110 MB.
"""

_VIDEO_NOTE = """\
Videos are decoded with PyAV, cut to the annotated window, resampled to --fps (this
also fixes variable frame rates), rotated upright when they carry rotation metadata,
downscaled to --short-side and re-encoded with a keyframe every --keyint frames as
H.264 mp4 (--codec h264), VP9 webm (vp9) or JPEG frames (jpeg). Videos without a video
stream, undecodable (truncated) or without frames are quarantined. Audio is dropped.
"""


def _positive_int(text: str) -> int:
    """Argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative(text: str) -> float:
    """Argparse type: a number >= 0."""
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {text}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {value}")
    return value


def _split_file(text: str) -> tuple[str, Path]:
    split, sep, path = text.partition("=")
    if not sep or not split or not path:
        raise argparse.ArgumentTypeError(f"expected SPLIT=FILE, got {text!r}")
    return split, Path(path)


@dataclass(frozen=True)
class _TaskOption:
    """An option that the Slurm array tasks receive (their command is rebuilt from these)."""

    flag: str
    dest: str
    form: Literal["switch", "value", "values", "repeated"]


#: How an option's value is written back: argparse ``action`` -> form (else "values" with nargs, "value").
_FORMS: dict[str | None, Literal["switch", "repeated"]] = {"store_true": "switch", "append": "repeated"}


class _Options:
    """Adds the options of one ``prep SOURCE`` parser and records those the array tasks need.

    ``--slurm`` runs the same command in every array task; :func:`_task_argv` rebuilds it from the
    parsed values of the recorded options (options added with ``task=False`` steer only this process
    or the submission).
    """

    def __init__(self, parser: argparse.ArgumentParser) -> None:
        self.parser = parser
        self.for_tasks: list[_TaskOption] = []

    def add(self, container: Any, flag: str, *, task: bool = True, **kwargs: Any) -> None:
        action = container.add_argument(flag, **kwargs)
        if task:
            form = _FORMS.get(kwargs.get("action"), "values" if kwargs.get("nargs") else "value")
            self.for_tasks.append(_TaskOption(flag, action.dest, form))


def _add_common(o: _Options, shard_size: int) -> None:
    p = o.parser
    o.add(p, "--out", type=Path, required=True, metavar="DIR", help="output directory (created if missing)")
    o.add(p, "--shard-size", type=_positive_int, default=shard_size, metavar="N",
          help="inputs per shard (default: %(default)s)")
    o.add(p, "--seed", type=int, default=0, help="seed of the global train shuffle (default: %(default)s)")
    o.add(p, "--workers", task=False, type=_positive_int, default=os.cpu_count() or 1, metavar="N",
          help="processes writing shards (default: CPU count, %(default)s)")
    o.add(p, "--threads", type=_positive_int, default=4, metavar="N",
          help="image reader threads per process (default: %(default)s; videos: one at a time)")
    o.add(p, "--task-index", task=False, type=int, default=0, metavar="I", help="this array task (default: 0)")
    o.add(p, "--num-tasks", task=False, type=_positive_int, default=1, metavar="N",
          help="array tasks sharing the work; >1 leaves the merge to `prep merge` (default: 1)")
    o.add(p, "--plan-only", task=False, action="store_true",
          help="scan and write OUT/_parts/plan.{json,parquet} for array tasks, then stop")
    o.add(p, "--max-failure-rate", type=_fraction, default=0.01, metavar="F",
          help="fail when more than this fraction of inputs is quarantined (default: %(default)s)")
    s = p.add_argument_group("Slurm (--slurm: submit a job array and a dependent merge job instead of running here)")
    o.add(s, "--slurm", task=False, action="store_true", help="submit to Slurm (cluster defaults: slurm/cluster.toml)")
    o.add(s, "--slurm-tasks", task=False, type=_positive_int, metavar="N",
          help="array tasks (default: the cluster file's)")
    o.add(s, "--slurm-throttle", task=False, type=int, metavar="K", help="tasks running at once (0: no limit)")
    o.add(s, "--partition", task=False, help="Slurm partition (default: the cluster file's)")
    o.add(s, "--account", task=False, help="Slurm account (default: the cluster file's)")
    o.add(s, "--qos", task=False, help="Slurm QOS (default: the cluster file's)")
    o.add(s, "--time", task=False, help="time limit of each array task (default: the cluster file's [prep] time)")
    o.add(s, "--cluster", task=False, metavar="FILE", help="cluster defaults (default: slurm/cluster.toml)")
    o.add(s, "--dry-run", task=False, action="store_true",
          help="with --slurm: print the batch scripts, submit nothing")
    g = p.add_argument_group("training layout (only for the shard-count warning)")
    o.add(g, "--nodes", type=_positive_int, default=1, help="nodes you will train on (default: 1)")
    o.add(g, "--gpus-per-node", type=_positive_int, default=8, help="GPUs per node (default: 8)")
    o.add(g, "--loader-workers", type=_positive_int, default=8, help="loader workers per GPU (default: 8)")


def _add_video(o: _Options) -> None:
    g = o.parser.add_argument_group("video re-encoding")
    o.add(g, "--codec", choices=("h264", "vp9", "jpeg"), default="h264",
          help="h264 (mp4), vp9 (webm) or jpeg (frame sequence) (default: %(default)s)")
    o.add(g, "--fps", type=float, default=30.0, help="output frame rate (default: %(default)s)")
    o.add(g, "--short-side", type=_positive_int, default=320, help="short side in pixels (default: %(default)s)")
    o.add(g, "--keyint", type=_positive_int, default=8, help="keyframe interval in frames (default: %(default)s)")
    o.add(g, "--crf", type=int, default=23, help="H.264/VP9 constant rate factor (default: %(default)s)")
    o.add(g, "--quality", type=int, default=90, help="JPEG quality of frame sequences (default: %(default)s)")
    o.add(g, "--max-seconds", type=float, default=60.0, help="cap on the clip length (default: %(default)s)")


def _sub(sources: Any, name: str, help_: str, description: str, shard_size: int) -> _Options:
    p = sources.add_parser(name, help=help_, description=description, epilog=_epilog(name),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    o = _Options(p)
    _add_common(o, shard_size)
    p.set_defaults(task_options=o.for_tasks)
    return o


def add_prep_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``prep`` command and its sub-commands to an argparse subparsers object.

    Args:
        subparsers: The object returned by ``ArgumentParser.add_subparsers()``.

    Returns:
        The ``prep`` parser.
    """
    prep = subparsers.add_parser(
        "prep",
        help="convert datasets into WebDataset shards + DALI indexes (offline, run once)",
        description=_PREP_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sources = prep.add_subparsers(dest="prep_source", metavar="SOURCE", required=True)
    o = _sub(sources, "imagenet", "ImageNet / ImageFolder tree: SRC/train/<class-id>/*.JPEG [+ val]",
             _IMAGENET_DESCRIPTION, 1000)
    p = o.parser
    o.add(p, "--src", type=Path, required=True, metavar="DIR", help="source root holding train/ and val/")
    o.add(p, "--splits", nargs="+", default=["train", "val"], help="splits (default: train val)")
    o.add(p, "--val-solution", type=Path, metavar="CSV", help="LOC_val_solution.csv for a flat val/")
    o.add(p, "--devkit", type=Path, metavar="DIR", help="ILSVRC2012_devkit_t12 for a flat val/")
    o.add(p, "--synsets", type=Path, metavar="FILE", help="'<wnid> <names>' lines for class names")
    g = p.add_argument_group("image storage")
    o.add(g, "--resize", type=_positive_int, metavar="N",
          help="downscale to short side N and re-encode as JPEG (default: store the source bytes)")
    o.add(g, "--quality", type=int, default=90, help="JPEG quality when re-encoding (default: %(default)s)")
    o.add(g, "--header-only", action="store_true",
          help="check image headers only (faster; truncated files are not caught)")
    o.add(g, "--max-pixels", type=_positive_int, default=89_478_485,
          help="quarantine larger images as decompression bombs (default: %(default)s)")
    o.add(g, "--read-timeout-s", type=_non_negative, default=60.0, metavar="S",
          help="quarantine a file whose read blocks longer (hung network file system; 0: wait for ever; "
               "default: %(default)s)")
    p.set_defaults(func=run_prep_imagenet)

    o = _sub(sources, "kinetics", "Kinetics CSVs + <youtube_id>_<start>_<end>.mp4 clips",
                    "Kinetics-400/600/700.\n\n  --annotations train.csv validate.csv   columns label,youtube_id,"
                    "time_start,time_end,split\n  --videos DIR   clips named <youtube_id>_<start:06d>_<end:06d>.mp4 "
                    "anywhere below DIR\n  (--full-videos: uncut <youtube_id>.mp4, cut to [time_start, time_end))"
                    "\n\nClasses: sorted train label names.\n\n" + _VIDEO_NOTE, 100)
    o.add(o.parser, "--annotations", type=Path, nargs="+", required=True, metavar="CSV")
    o.add(o.parser, "--videos", type=Path, required=True, metavar="DIR")
    o.add(o.parser, "--full-videos", action="store_true", help="files are uncut <youtube_id>.<ext> videos")
    _add_video(o)
    o.parser.set_defaults(func=run_prep_video)

    o = _sub(sources, "ssv2", "Something-Something v2: labels.json + train/validation.json + <id>.webm",
                "Something-Something v2.\n\n  --labels labels.json   {template: index}\n  --train train.json "
                "--validation validation.json   [{id, template, ...}]\n  --videos DIR   <id>.webm\n\n" + _VIDEO_NOTE,
                100)
    o.add(o.parser, "--labels", type=Path, required=True, metavar="JSON")
    o.add(o.parser, "--train", type=Path, required=True, metavar="JSON")
    o.add(o.parser, "--validation", type=Path, metavar="JSON")
    o.add(o.parser, "--videos", type=Path, required=True, metavar="DIR")
    _add_video(o)
    o.parser.set_defaults(func=run_prep_video)

    o = _sub(sources, "diving48", "Diving48: Diving48_V2_{train,test}.json + <vid_name>.mp4",
                  "Diving48.\n\n  --train Diving48_V2_train.json --val Diving48_V2_test.json   [{vid_name, label, "
                  "...}]\n  --vocab Diving48_vocab.json   optional class names\n  --videos DIR   <vid_name>.mp4\n\n"
                  + _VIDEO_NOTE, 100)
    o.add(o.parser, "--train", type=Path, required=True, metavar="JSON")
    o.add(o.parser, "--val", type=Path, metavar="JSON")
    o.add(o.parser, "--vocab", type=Path, metavar="JSON")
    o.add(o.parser, "--videos", type=Path, required=True, metavar="DIR")
    _add_video(o)
    o.parser.set_defaults(func=run_prep_video)

    o = _sub(sources, "videolist", "generic '<path> <label> [<start> <end>]' lists (FineGym, UCF101, ...)",
                 "Generic video lists.\n\n  --list train=train.txt --list val=val.txt   lines '<path> <label> "
                 "[<start> <end>]'\n  --root DIR   paths are relative to it\n  --classes FILE   optional, one "
                 "class name per line (line i = label i)\n\n" + _VIDEO_NOTE, 100)
    o.add(o.parser, "--list", type=_split_file, action="append", required=True, metavar="SPLIT=FILE")
    o.add(o.parser, "--root", type=Path, required=True, metavar="DIR")
    o.add(o.parser, "--classes", type=Path, metavar="FILE")
    _add_video(o)
    o.parser.set_defaults(func=run_prep_video)

    merge = sources.add_parser("merge", help="after array tasks: check all shards, write manifests + dataset.json",
                               description="Check that every planned shard is complete, then write the split "
                               "manifests, quarantine.parquet and dataset.json.",
                               epilog="example:\n  vitpipe prep merge /data/imagenet-wds",
                               formatter_class=argparse.RawDescriptionHelpFormatter)
    merge.add_argument("out", type=Path, metavar="OUT")
    merge.set_defaults(func=run_merge)
    verify = sources.add_parser("verify", help="re-read every shard and check it against the manifests",
                                description="Re-read every shard; check counts, index files, offsets, sha256 and "
                                "labels against the manifests; decode a sample. Exit 1 on any mismatch.",
                                epilog="example:\n  vitpipe prep verify /data/imagenet-wds --decode-fraction 0.05",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    verify.add_argument("out", type=Path, metavar="OUT")
    verify.add_argument("--decode-fraction", type=_fraction, default=0.01, metavar="F",
                        help="fraction of payloads to decode (default: %(default)s; at least one per shard)")
    verify.set_defaults(func=run_verify)
    inspect = sources.add_parser("inspect", help="class histogram, sizes, formats of a prepared dataset",
                                 description="Class histogram, sizes and formats of a prepared dataset.",
                                 epilog="example:\n  vitpipe prep inspect /data/imagenet-wds --json",
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    inspect.add_argument("out", type=Path, metavar="OUT")
    inspect.add_argument("--json", action="store_true", help="print the summary as JSON")
    inspect.set_defaults(func=run_inspect)
    return prep


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    return {"max_failure_rate": args.max_failure_rate,
            "train_layout": {"nodes": args.nodes, "gpus_per_node": args.gpus_per_node,
                             "loader_workers": args.loader_workers}}


def _request(args: argparse.Namespace) -> list[str]:
    """The command a plan is made for: the array tasks' command without ``--out``, ``--threads`` and the timeout."""
    argv, request = _task_argv(args), []
    skip = False
    for token in argv:
        if skip:
            skip = False
        elif token in ("--out", "--threads", "--read-timeout-s"):
            skip = True
        else:
            request.append(token)
    return request


def _run(args: argparse.Namespace, build: Callable[[], Any], opts: Any) -> int:
    """Plan (once per output directory for array tasks) and write this task's shards; one task also merges."""
    from data_prep.planfile import ensure_plan, write_plan
    from data_prep.shard import merge, run_plan, run_planned

    if args.plan_only:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        write_plan(build(), args.out, _settings(args), _request(args))
        return 0
    if args.num_tasks == 1:  # the whole run here: scan again, whatever an earlier run planned
        results = run_plan(build(), args.out, opts, workers=args.workers, threads=args.threads,
                           settings=_settings(args), request=_request(args))
    else:
        ensure_plan(args.out, _request(args), build, _settings(args))
        results = run_planned(args.out, opts, workers=args.workers, threads=args.threads,
                              task_index=args.task_index, num_tasks=args.num_tasks)
    written = sum(r.num_samples for r in results)
    quarantined = sum(len(r.quarantined) for r in results)
    logger.info("task %d/%d: %d shards (%d kept from an earlier run), %d written, %d quarantined",
                args.task_index, args.num_tasks, len(results), sum(r.skipped for r in results), written, quarantined)
    if args.num_tasks > 1:
        logger.info("task done; after all tasks run `vitpipe prep merge %s`", args.out)
        return 0
    _report(merge(args.out), args.out)
    return 0


def _report(info: DatasetInfo, out: Path) -> None:
    c = info.counts
    parts = [f"{name}: {s.num_samples} samples in {len(s.shards)} shards" for name, s in info.splits.items()]
    logger.info("prepared %d classes; %s; inputs %d = written %d + quarantined %d; output %s",
                info.num_classes, "; ".join(parts), c.inputs, c.written, c.quarantined, Path(out) / DATASET_JSON)


def _task_argv(args: argparse.Namespace) -> list[str]:
    """The prep command of one array task, rebuilt from the parsed values of its options (paths made absolute)."""
    def text(value: Any) -> str:
        if isinstance(value, Path):
            return str(value.resolve())
        if isinstance(value, tuple):  # --list SPLIT=FILE
            return f"{value[0]}={Path(value[1]).resolve()}"
        return str(value)

    argv = [args.prep_source]
    for opt in args.task_options:
        value = getattr(args, opt.dest)
        if value is None or value is False:
            continue
        if opt.form == "switch":
            argv.append(opt.flag)
        elif opt.form == "repeated":
            argv += [x for v in value for x in (opt.flag, text(v))]
        elif opt.form == "values":
            argv += [opt.flag, *map(text, value)]
        else:
            argv += [opt.flag, text(value)]
    return argv


def _submit(args: argparse.Namespace, build: Callable[[], Any]) -> int:
    """``--slurm``: plan here (once; the tasks read their slices), then submit the array and the merge job."""
    from vitpipe.slurm_jobs import submit_prep

    num_shards = None
    if not args.dry_run:
        from data_prep.planfile import write_plan

        Path(args.out).mkdir(parents=True, exist_ok=True)
        record = write_plan(build(), args.out, _settings(args), _request(args))
        num_shards = sum(len(sp["shards"]) for sp in record["splits"].values())
    return submit_prep(args, _task_argv(args), num_shards=num_shards)


def _image_plan(args: argparse.Namespace) -> tuple[Callable[[], Any], Any]:
    from data_prep.imagenet import build_image_plan
    from data_prep.images import ImageOptions

    opts = ImageOptions(resize=getattr(args, "resize", None), quality=getattr(args, "quality", 90),
                        decode_check=not getattr(args, "header_only", False),
                        max_pixels=getattr(args, "max_pixels", 89_478_485),
                        read_timeout_s=getattr(args, "read_timeout_s", 60.0))

    def build() -> Any:
        return build_image_plan(args.src, splits=args.splits, shard_size=args.shard_size, seed=args.seed, opts=opts,
                                val_solution=args.val_solution, devkit=args.devkit, synsets=args.synsets)

    return build, opts


def _video_plan(args: argparse.Namespace) -> tuple[Callable[[], Any], Any]:
    from data_prep import video_sources as vs
    from data_prep.video import VideoOptions

    opts = VideoOptions(codec=args.codec, fps=args.fps, short_side=args.short_side, keyint=args.keyint,
                        crf=args.crf, quality=args.quality, max_seconds=args.max_seconds)
    options = {k: getattr(opts, k) for k in ("codec", "fps", "short_side", "keyint", "crf", "quality", "max_seconds")}
    common = {"shard_size": args.shard_size, "seed": args.seed, "options": options}

    def build() -> Any:
        if args.prep_source == "kinetics":
            return vs.scan_kinetics(args.annotations, args.videos, full_videos=args.full_videos, **common)
        if args.prep_source == "ssv2":
            files = {"train": args.train, **({"val": args.validation} if args.validation else {})}
            return vs.scan_ssv2(args.labels, files, args.videos, **common)
        if args.prep_source == "diving48":
            files = {"train": args.train, **({"val": args.val} if args.val else {})}
            return vs.scan_diving48(files, args.videos, vocab=args.vocab, **common)
        return vs.scan_videolist(dict(args.list), args.root, class_file=args.classes, **common)

    return build, opts


#: Path options that must name an existing folder / file (checked before anything is scanned).
_DIR_OPTIONS = ("src", "videos", "root", "devkit")
_FILE_OPTIONS = ("annotations", "labels", "train", "validation", "val", "vocab", "classes", "val_solution",
                 "synsets", "list")


def _check_paths(args: argparse.Namespace) -> None:
    """Raise PrepError (exit 2) naming the first source folder or file that does not exist."""
    if getattr(args, "slurm", False) and getattr(args, "dry_run", False):
        return  # nothing is read here: the paths may exist only where the jobs run
    for dest in _DIR_OPTIONS:
        value = getattr(args, dest, None)
        if isinstance(value, Path) and not value.is_dir():
            flag = "--" + dest.replace("_", "-")
            raise PrepError(f"no such directory: {value} ({flag})" if not value.exists()
                            else f"not a directory: {value} ({flag})")
    for dest in _FILE_OPTIONS:
        value = getattr(args, dest, None)
        values = value if isinstance(value, list) else [value]
        for v in values:
            path = v[1] if isinstance(v, tuple) else v  # --list SPLIT=FILE
            if isinstance(path, Path) and not path.is_file():
                flag = "--" + dest.replace("_", "-")
                raise PrepError(f"no such file: {path} ({flag})" if not path.exists()
                                else f"not a regular file: {path} ({flag})")


def _disk_errors(func: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Report an OS error writing the output (full disk, quota, I/O) as one :class:`PrepError` line.

    Shard writers already name their tar or sidecar; this catches the rest (plan, manifests,
    dataset.json), naming the file in the error or else the output directory. Temporary files are
    removed by the writers themselves (:class:`data_prep.format.AtomicPath`).
    """
    def wrapped(args: argparse.Namespace) -> int:
        from data_prep.tarwrite import storage_errno, storage_error

        try:
            return func(args)
        except OSError as exc:
            if storage_errno(exc):
                raise storage_error(exc, args.out) from None
            raise

    wrapped.__doc__, wrapped.__name__ = func.__doc__, func.__name__
    return wrapped


@_disk_errors
def run_prep_imagenet(args: argparse.Namespace) -> int:
    """Run ``prep imagenet`` with parsed arguments (returns 0; raises PrepError on unusable input)."""
    _check_paths(args)
    build, opts = _image_plan(args)
    return _submit(args, build) if args.slurm else _run(args, build, opts)


@_disk_errors
def run_prep_video(args: argparse.Namespace) -> int:
    """Run ``prep kinetics|ssv2|diving48|videolist`` with parsed arguments."""
    _check_paths(args)
    build, opts = _video_plan(args)
    return _submit(args, build) if args.slurm else _run(args, build, opts)


@_disk_errors
def run_merge(args: argparse.Namespace) -> int:
    """Run ``prep merge OUT``."""
    from data_prep.shard import merge

    _report(merge(args.out), args.out)
    return 0


def run_verify(args: argparse.Namespace) -> int:
    """Run ``prep verify OUT``: 0 when sound, 1 with one log line per problem otherwise."""
    from data_prep.verify import verify_dataset

    problems = verify_dataset(args.out, decode_fraction=args.decode_fraction)
    for p in problems:
        logger.error("%s", p)
    if problems:
        sys.stderr.write(f"prep verify: {len(problems)} problem(s) in {args.out}\n")
        return 1
    logger.info("%s: every shard, index and manifest row checks out", args.out)
    return 0


def run_inspect(args: argparse.Namespace) -> int:
    """Run ``prep inspect OUT`` (summary on stdout)."""
    from data_prep.verify import format_inspect, inspect_dataset

    summary = inspect_dataset(args.out)
    sys.stdout.write((json.dumps(summary, indent=2) if args.json else format_inspect(summary)) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Runs ``vitpipe prep ...`` in this process without the rest of the ``vitpipe`` command.

    Args:
        argv: Arguments without the program name (``["prep", "imagenet", ...]``); None reads ``sys.argv``.

    Returns:
        The exit code: 0, 1 when ``prep verify`` found problems, 2 for unusable input.
    """
    parser = argparse.ArgumentParser(prog="vitpipe", description=_PREP_DESCRIPTION)
    add_prep_parser(parser.add_subparsers(dest="command", metavar="COMMAND", required=True))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args))
    except (PrepError, FormatError) as exc:
        sys.stderr.write(f"prep: error: {exc}\n")
        return 2
