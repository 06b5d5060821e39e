"""ImageNet (ILSVRC2012) and ImageFolder sources: the layouts users actually have.

Train is always ``SRC/train/<wnid>/*.JPEG`` (any ImageFolder tree works; files may sit in nested
folders). The class list is the sorted train folder names, the order torchvision and timm use.
Validation is found in one of these layouts (first match wins):

1. ``SRC/val/<wnid>/*.JPEG``: class folders (e.g. after the usual ``valprep.sh``);
2. ``SRC/val/*.JPEG`` flat, with the Kaggle solution file ``LOC_val_solution.csv``
   (``ImageId,PredictionString``; the first word of the prediction string is the wnid) given with
   ``val_solution`` or found at ``SRC/LOC_val_solution.csv``;
3. ``SRC/val/ILSVRC2012_val_*.JPEG`` flat, with the devkit (``ILSVRC2012_devkit_t12/``) given with
   ``devkit`` or found at ``SRC/ILSVRC2012_devkit_t12``: ``data/ILSVRC2012_validation_ground_truth.txt``
   holds one ILSVRC2012_ID per line for the val files in name order, ``data/meta.mat`` maps
   ILSVRC2012_ID to wnid (read with scipy).

Class names come from ``LOC_synset_mapping.txt`` or ``synset_words.txt`` (``<wnid> <names>`` per
line; at ``SRC/`` or given with ``synsets``), else from the devkit's ``meta.mat`` when present.
"""

from __future__ import annotations

import csv
import logging
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from data_prep.errors import PrepError
from data_prep.format import reason_group
from data_prep.images import ImageOptions
from data_prep.plan import Plan, order_samples
from data_prep.scan import Sample, _relative_source, is_image_file, list_class_dirs, scan_imagefolder
from data_prep.walk import TreeWalker

logger = logging.getLogger(__name__)

SOLUTION_CSV = "LOC_val_solution.csv"
DEVKIT_DIR = "ILSVRC2012_devkit_t12"
SYNSET_FILES = ("LOC_synset_mapping.txt", "synset_words.txt")
_NOT_IMAGE = "no image extension (.jpeg/.jpg/.png/.tif/.tiff) or outside class folders"


def read_synset_names(path: Path) -> dict[str, str]:
    """Read ``<wnid> <name, name, ...>`` lines (``LOC_synset_mapping.txt`` / ``synset_words.txt``)."""
    names = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            wnid, _, name = line.strip().partition(" ")
            names[wnid] = name.strip()
    return names


def read_solution_csv(path: Path) -> dict[str, str]:
    """Read Kaggle's ``LOC_val_solution.csv``: image id (file stem) -> wnid."""
    labels = {}
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            labels[row["ImageId"]] = row["PredictionString"].split()[0]
    return labels


def read_devkit_meta(devkit: Path) -> list[tuple[int, str, str]]:
    """Read ``data/meta.mat`` of the devkit: ``(ILSVRC2012_ID, wnid, words)`` of the 1,000 leaf synsets."""
    from scipy.io import loadmat

    meta = loadmat(str(devkit / "data" / "meta.mat"), squeeze_me=True)["synsets"]
    rows = []
    for entry in meta:
        if int(entry["num_children"]) == 0:  # the 1,000 classes are the leaves (as torchvision reads it)
            rows.append((int(entry["ILSVRC2012_ID"]), str(entry["WNID"]), str(entry["words"])))
    return rows


def read_devkit_labels(devkit: Path, files: Sequence[Path]) -> dict[str, str]:
    """Map each flat val file name to its wnid with the devkit ground truth (files in name order)."""
    ids = {i: wnid for i, wnid, _ in read_devkit_meta(devkit)}
    truth = (devkit / "data" / "ILSVRC2012_validation_ground_truth.txt").read_text().split()
    ordered = sorted(files, key=lambda p: p.name)
    if len(truth) != len(ordered):
        raise PrepError(f"{devkit}: ground truth lists {len(truth)} labels but the flat val folder has "
                        f"{len(ordered)} images")
    return {p.name: ids[int(t)] for p, t in zip(ordered, truth, strict=True)}


def _flat_val(src: Path, val_dir: Path, classes: list[str], val_solution: Path | None, devkit: Path | None,
              ignored: list[tuple[str, str]], walker: TreeWalker) -> list[Sample]:
    files = walker.stray_files(val_dir)  # regular files only, each real file once; the rest is rejected
    images = [p for p in files if is_image_file(p)]
    ignored.extend((_relative_source(p, src), _NOT_IMAGE) for p in files if not is_image_file(p))
    val_solution = val_solution or (src / SOLUTION_CSV if (src / SOLUTION_CSV).is_file() else None)
    devkit = devkit or (src / DEVKIT_DIR if (src / DEVKIT_DIR).is_dir() else None)
    if val_solution is not None:
        by_stem = read_solution_csv(val_solution)
        labels = {p.name: by_stem.get(p.stem) for p in images}
        logger.info("%s: flat val labelled by %s", val_dir, val_solution)
    elif devkit is not None:
        labels = read_devkit_labels(devkit, images)
        logger.info("%s: flat val labelled by the devkit %s", val_dir, devkit)
    else:
        raise PrepError(f"{val_dir}: flat val folder without labels: give --val-solution LOC_val_solution.csv "
                        f"or --devkit {DEVKIT_DIR} (or sort it into class folders)")
    index = {c: i for i, c in enumerate(classes)}
    samples = []
    for p in images:
        wnid = labels.get(p.name)
        if wnid is None or wnid not in index:
            why = "no label for this file" if wnid is None else f"label {wnid!r} is not a train class"
            ignored.append((_relative_source(p, src), why))
            continue
        samples.append(Sample(p, index[wnid], wnid, _relative_source(p, src)))
    return samples


def _log_rejected(src: Path, ignored: dict[str, list[tuple[str, str]]]) -> None:
    """One warning per kind of entry the walk did not list (loops, second names, FIFOs ...)."""
    groups = Counter(reason_group(r) for items in ignored.values() for _, r in items)
    for group, n in sorted(groups.items()):
        example = next((s, r) for items in ignored.values() for s, r in items if reason_group(r) == group)
        logger.warning("%s: %d entr%s quarantined as %r, e.g. %s: %s", src, n, "y" if n == 1 else "ies", group,
                       *example)


def _has_class_folders(split_dir: Path) -> bool:
    try:
        return bool(list_class_dirs(split_dir))
    except PrepError:
        return False


def _class_names(src: Path, classes: list[str], synsets: Path | None, devkit: Path | None) -> list[str] | None:
    synsets = synsets or next((src / n for n in SYNSET_FILES if (src / n).is_file()), None)
    if synsets is not None:
        names = read_synset_names(synsets)
        return [names.get(c, c) for c in classes]
    devkit = devkit or (src / DEVKIT_DIR if (src / DEVKIT_DIR).is_dir() else None)
    if devkit is not None and (devkit / "data" / "meta.mat").is_file():
        names = {wnid: words for _, wnid, words in read_devkit_meta(devkit)}
        return [names.get(c, c) for c in classes]
    return None


def build_image_plan(
    src: Path,
    *,
    splits: Sequence[str] = ("train", "val"),
    shard_size: int = 1000,
    seed: int = 0,
    opts: ImageOptions | None = None,
    val_solution: Path | None = None,
    devkit: Path | None = None,
    synsets: Path | None = None,
) -> Plan:
    """Scan an ImageNet / ImageFolder tree and plan its shards.

    Args:
        src: Source root holding ``train/`` (and optionally ``val/`` or other ImageFolder splits).
        splits: Splits to convert; must include ``"train"`` (it defines the classes).
        shard_size: Planned inputs per shard.
        seed: Seed of the global train shuffle (other splits keep (class, path) order).
        opts: Image options (part of the shard digests and ``dataset.json``).
        val_solution: Kaggle ``LOC_val_solution.csv`` for a flat val folder.
        devkit: ``ILSVRC2012_devkit_t12`` folder for a flat val folder.
        synsets: ``<wnid> <names>`` file for the class names.

    Returns:
        The plan.

    Raises:
        PrepError: On a missing/empty train split, a val class not in train, or a flat val folder
            without labels.
    """
    src = Path(src)
    opts = opts or ImageOptions()
    if "train" not in splits:
        raise PrepError(f"splits {list(splits)} must include 'train' (it defines the class list)")
    if not src.is_dir():
        raise PrepError(f"{src}: no such directory (expected {src}/train/<class-id>/*.JPEG)")
    ignored: dict[str, list[tuple[str, str]]] = {s: [] for s in splits}
    left_out: dict[str, list[str]] = {s: [] for s in splits}
    walker = TreeWalker(src)  # one walk of the tree: a file reached twice (even from two splits) is listed once
    classes, train = scan_imagefolder(src / "train", root=src, ignored=left_out["train"], walker=walker)
    ignored["train"].extend(walker.take())
    found = {"train": train}
    for split in splits:
        split_dir = src / split
        if split == "train":
            continue
        if not split_dir.is_dir():
            logger.info("%s: no %r split, skipping it", src, split)
            continue
        if _has_class_folders(split_dir):
            found[split] = scan_imagefolder(split_dir, classes=classes, root=src, ignored=left_out[split],
                                            walker=walker)[1]
        else:
            found[split] = _flat_val(src, split_dir, classes, val_solution, devkit, ignored[split], walker)
        ignored[split].extend(walker.take())
    _log_rejected(src, ignored)
    options: dict[str, Any] = {"seed": seed, "resize": opts.resize, "quality": opts.quality,
                               "decode_check": opts.decode_check, "max_pixels": opts.max_pixels}
    return Plan(
        kind="image",
        classes=classes,
        splits={s: order_samples(items, seed, shuffle=s == "train") for s, items in found.items()},
        shard_size=shard_size,
        options=options,
        class_names=_class_names(src, classes, synsets, devkit),
        prequarantined={s: sorted([(p, _NOT_IMAGE) for p in left_out[s]] + ignored[s]) for s in found},
    )
