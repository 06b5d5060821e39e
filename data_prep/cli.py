"""The ``prep`` command: offline conversion of image folders into vitpipe datasets.

Wire it into a top-level parser with :func:`add_prep_parser`; the chosen sub-command's handler is
stored as ``args.func`` and returns an exit code. ``python -m data_prep`` runs it stand-alone.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from data_prep.errors import PrepError

logger = logging.getLogger(__name__)

_PREP_DESCRIPTION = """\
Prepare datasets offline for vitpipe training.

Converts a source dataset into WebDataset tar shards with NVIDIA DALI index files,
a parquet manifest per split and a dataset.json description. Training reads the
output directory only. Run `vitpipe prep <source> --help` for details.
"""

_IMAGENET_DESCRIPTION = """\
Convert an ImageNet / ImageFolder tree into a vitpipe image dataset.

Expected input layout (class ids are folder names; any names work):

  SRC/train/<class-id>/*.JPEG     required, e.g. SRC/train/n01440764/n01440764_10026.JPEG
  SRC/val/<class-id>/*.JPEG       optional, same class folders as train (a subset is fine)

Images may be .jpg/.jpeg/.png in any letter case; other files are skipped with a
warning. The class list is the sorted train folder names (torchvision/timm order),
so label i is the i-th folder. Files PIL cannot identify are skipped and listed
under "skipped" in dataset.json. The raw ImageNet val folder is flat: sort it into
class folders first (e.g. with the usual valprep.sh).

Output (OUT):

  OUT/dataset.json                 classes, splits, shard list; written last (marks completion)
  OUT/train.parquet, val.parquet   manifest: key, shard, offset, bytes, label, class_id,
                                   width, height, format, sha256, source
  OUT/train/train-000000.tar       shards; each sample has .jpg (or .png; original bytes),
                                   .cls (label text), .lbl (int64 LE for DALI) and .json
  OUT/train/train-000000.idx       DALI index (same format as `wds2idx`)

Train samples are globally shuffled with --seed before sharding; val keeps its
sorted (class, path) order. Output is byte-identical for the same input and options.
"""

_IMAGENET_EPILOG = """\
example:
  vitpipe prep imagenet --src /data/imagenet --out /data/imagenet-wds --shard-size 1000

Shard count rule of thumb: shards >= nodes x GPUs x loader workers (e.g. >= 512 for
8 nodes x 8 GPUs x 8 workers); ImageNet-1k train (1,281,167 images) with
--shard-size 1000 gives 1,282 shards of about 110 MB.
"""


def _positive_int(text: str) -> int:
    """Argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_prep_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``prep`` command (with its ``imagenet`` sub-command) to an argparse subparsers object.

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
    imagenet = sources.add_parser(
        "imagenet",
        help="ImageNet / ImageFolder tree: SRC/train/<class-id>/*.JPEG [+ SRC/val/<class-id>/*.JPEG]",
        description=_IMAGENET_DESCRIPTION,
        epilog=_IMAGENET_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    imagenet.add_argument(
        "--src", type=Path, required=True, metavar="DIR",
        help="source root holding train/<class-id>/*.JPEG and optionally val/<class-id>/*.JPEG",
    )
    imagenet.add_argument(
        "--out", type=Path, required=True, metavar="DIR",
        help="output directory (created if missing; an earlier output there is replaced)",
    )
    imagenet.add_argument(
        "--shard-size", type=_positive_int, default=1000, metavar="N",
        help="maximum samples per shard (default: %(default)s)",
    )
    imagenet.add_argument(
        "--seed", type=int, default=0,
        help="seed of the global train shuffle (default: %(default)s)",
    )
    imagenet.add_argument(
        "--workers", type=_positive_int, default=8, metavar="N",
        help="threads reading and hashing source files (default: %(default)s); output does not depend on it",
    )
    imagenet.set_defaults(func=run_prep_imagenet)
    return prep


def run_prep_imagenet(args: argparse.Namespace) -> int:
    """Run ``prep imagenet`` with parsed arguments.

    Args:
        args: Namespace with ``src``, ``out``, ``shard_size``, ``seed`` and (optionally) ``workers``.

    Returns:
        0 on success.

    Raises:
        PrepError: If the input is unusable (the caller reports it on one line).
    """
    from data_prep.shard import prep_imagefolder  # heavy imports (pyarrow, PIL) only when run

    info = prep_imagefolder(
        Path(args.src), Path(args.out), shard_size=args.shard_size, seed=args.seed,
        workers=getattr(args, "workers", 8),
    )
    parts = [
        f"{name}: {s['num_samples']} samples in {len(s['shards'])} shards"
        for name, s in info["splits"].items()
    ]
    logger.info(
        "prepared %d classes; %s; %d skipped; output %s",
        info["num_classes"], "; ".join(parts), len(info["skipped"]), Path(args.out) / "dataset.json",
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point (``python -m data_prep prep imagenet ...``).

    Args:
        argv: Arguments without the program name; None reads ``sys.argv``.

    Returns:
        The exit code.
    """
    parser = argparse.ArgumentParser(prog="python -m data_prep", description=_PREP_DESCRIPTION)
    add_prep_parser(parser.add_subparsers(dest="command", metavar="COMMAND", required=True))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args))
    except PrepError as exc:
        sys.stderr.write(f"prep: error: {exc}\n")
        return 2
