"""Video sources: Kinetics, Something-Something v2, Diving48 and generic ``path label`` lists.

Each ``scan_*`` function returns a :class:`~data_prep.plan.Plan` of ``kind="video"``; annotation rows
whose video file is missing are not dropped but quarantined with the reason ``video file not found``.
Exact input layouts are in ``docs/data_prep.md`` and in each function's docstring.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from data_prep.errors import PrepError
from data_prep.loading import check_regular
from data_prep.plan import Plan, order_samples
from data_prep.scan import Sample
from data_prep.walk import TreeWalker

logger = logging.getLogger(__name__)

VIDEO_EXTENSIONS = frozenset({".mp4", ".webm", ".mkv", ".avi", ".mov", ".m4v"})
_MISSING = "video file not found"
#: Kinetics CSV split names -> vitpipe split names.
KINETICS_SPLITS = {"train": "train", "val": "val", "validate": "val", "validation": "val", "test": "test"}


def _walk_order(path: Path, root: Path) -> tuple[tuple[int, str], ...]:
    """Sort key of ``os.walk``'s top-down order: a folder's own files before its sub-folders'."""
    parts = path.relative_to(root).parts
    return (*((1, d) for d in parts[:-1]), (0, parts[-1]))


def _index_videos(root: Path) -> tuple[dict[str, Path], dict[str, str]]:
    """Map file stem -> path for every video file below ``root`` (first in walk order wins).

    The tree is walked safely (:class:`~data_prep.walk.TreeWalker`): each real file once, symlink loops
    not followed, FIFOs and devices not opened. Returns the index and, for video-named entries that
    were not listed, stem -> the reason (what an annotation row naming that stem is quarantined with).
    """
    root = Path(root)
    if not root.is_dir():
        raise PrepError(f"no such directory: {root} (the videos folder)")
    walker = TreeWalker(root)
    found: dict[str, Path] = {}
    for p in sorted(walker.files(root), key=lambda p: _walk_order(p, root)):
        if p.suffix.lower() in VIDEO_EXTENSIONS:
            found.setdefault(p.stem, p)
    rejected = {Path(src).stem: why for src, why in walker.rejected if Path(src).suffix.lower() in VIDEO_EXTENSIONS}
    if walker.rejected:
        logger.warning("%s: %d entries not listed (symlink loops, second names of a file, non-regular files), "
                       "e.g. %s: %s", root, len(walker.rejected), *walker.rejected[0])
    return found, rejected


def _rel(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


def _plan(classes: list[str], splits: dict[str, list[Sample]], missing: dict[str, list[tuple[str, str]]],
          shard_size: int, seed: int, options: dict[str, Any], class_names: list[str] | None = None) -> Plan:
    if not any(splits.values()):
        raise PrepError("no video found for any annotation row; check --videos and the annotation files")
    return Plan("video", classes, {s: order_samples(v, seed, shuffle=s == "train") for s, v in splits.items()},
                shard_size, {"seed": seed, **options}, class_names,
                {s: sorted(v) for s, v in missing.items() if v})


def scan_kinetics(annotations: Sequence[Path], videos: Path, *, shard_size: int, seed: int,
                  options: dict[str, Any], full_videos: bool = False) -> Plan:
    """Kinetics-400/600/700: CSV annotations + clip files named by YouTube id and times.

    CSV columns: ``label,youtube_id,time_start,time_end,split`` (one or more files, e.g. train.csv and
    validate.csv). Clip files anywhere below ``videos`` named ``<youtube_id>_<start:06d>_<end:06d>.<ext>``
    (e.g. ``train/abseiling/0wR5jVB-WPk_000417_000427.mp4``), already cut to the window; the whole
    clip is used. With ``full_videos`` the files are the uncut videos ``<youtube_id>.<ext>`` and the
    window ``[time_start, time_end)`` is cut out. Classes: sorted label names of the train rows.
    """
    index, rejected = _index_videos(videos)
    rows = []
    for path in annotations:
        with open(path, newline="", encoding="utf-8") as f:
            rows.extend(csv.DictReader(f))
    labelled = [r for r in rows if r.get("label")]
    if len(labelled) < len(rows):
        logger.info("kinetics: %d annotation rows without a label (unlabelled test split) are not converted",
                    len(rows) - len(labelled))
    classes = sorted({r["label"] for r in labelled if KINETICS_SPLITS.get(r["split"]) == "train"})
    if not classes:
        raise PrepError(f"{[str(p) for p in annotations]}: no labelled train rows (columns label,youtube_id,"
                        "time_start,time_end,split)")
    cid = {c: i for i, c in enumerate(classes)}
    splits: dict[str, list[Sample]] = {}
    missing: dict[str, list[tuple[str, str]]] = {}
    for r in labelled:
        split = KINETICS_SPLITS.get(r["split"], r["split"])
        start, end = float(r["time_start"]), float(r["time_end"])
        stem = f"{r['youtube_id']}_{int(start):06d}_{int(end):06d}"
        path = index.get(r["youtube_id"] if full_videos else stem)
        splits.setdefault(split, [])
        if path is None or r["label"] not in cid:
            why = (rejected.get(r["youtube_id"] if full_videos else stem, _MISSING) if path is None
                   else f"label {r['label']!r} is not a train class")
            missing.setdefault(split, []).append((stem, why))
            continue
        window = (start, end) if full_videos else (None, None)
        splits[split].append(Sample(path, cid[r["label"]], r["label"], _rel(path, videos), *window))
    return _plan(classes, splits, missing, shard_size, seed, options)


def _ssv2_class(template: str) -> str:
    return template.replace("[", "").replace("]", "")


def scan_ssv2(labels: Path, split_files: dict[str, Path], videos: Path, *, shard_size: int, seed: int,
              options: dict[str, Any]) -> Plan:
    """Something-Something v2: ``labels.json`` + ``train.json``/``validation.json`` + ``<id>.webm`` files.

    ``labels.json`` maps each template (without brackets) to its class index as a string
    (``{"Holding something": "16", ...}``); the class order is that index. Each split file is a list of
    ``{"id": "78687", "template": "Holding [something] next to [something]", ...}``; the video is
    ``<videos>/<id>.webm``.
    """
    mapping = json.loads(labels.read_text(encoding="utf-8"))
    classes = [name for name, _ in sorted(mapping.items(), key=lambda kv: int(kv[1]))]
    if [int(v) for v in sorted(mapping.values(), key=int)] != list(range(len(classes))):
        raise PrepError(f"{labels}: class indices are not 0..{len(classes) - 1}")
    cid = {c: i for i, c in enumerate(classes)}
    index, rejected = _index_videos(videos)
    splits: dict[str, list[Sample]] = {}
    missing: dict[str, list[tuple[str, str]]] = {}
    for split, path in split_files.items():
        splits[split] = []
        for entry in json.loads(path.read_text(encoding="utf-8")):
            name = _ssv2_class(entry["template"])
            video = index.get(str(entry["id"]))
            if video is None or name not in cid:
                missing.setdefault(split, []).append((str(entry["id"]), rejected.get(str(entry["id"]), _MISSING)
                                                      if video is None else f"template {name!r} not in {labels.name}"))
                continue
            splits[split].append(Sample(video, cid[name], name, _rel(video, videos)))
    return _plan(classes, splits, missing, shard_size, seed, options)


def scan_diving48(split_files: dict[str, Path], videos: Path, *, shard_size: int, seed: int,
                  options: dict[str, Any], vocab: Path | None = None) -> Plan:
    """Diving48: JSON lists of ``{"vid_name", "label", "start_frame", "end_frame"}`` + ``<vid_name>.mp4``.

    Class ids are ``"00"`` ... ``"47"`` (the integer labels); names come from ``Diving48_vocab.json``
    (a list of ``[take-off, somersault, twist, flight]`` per class) when given.
    """
    entries = {split: json.loads(p.read_text(encoding="utf-8")) for split, p in split_files.items()}
    num = 1 + max(int(e["label"]) for es in entries.values() for e in es)
    names = None
    if vocab is not None:
        words = json.loads(vocab.read_text(encoding="utf-8"))
        num = max(num, len(words))
        names = [" / ".join(w) if isinstance(w, list) else str(w) for w in words]
    classes = [f"{i:02d}" for i in range(num)]
    index, rejected = _index_videos(videos)
    splits: dict[str, list[Sample]] = {}
    missing: dict[str, list[tuple[str, str]]] = {}
    for split, es in entries.items():
        splits[split] = []
        for e in es:
            video = index.get(e["vid_name"])
            if video is None:
                missing.setdefault(split, []).append((e["vid_name"], rejected.get(e["vid_name"], _MISSING)))
                continue
            label = int(e["label"])
            splits[split].append(Sample(video, label, classes[label], _rel(video, videos)))
    return _plan(classes, splits, missing, shard_size, seed, options, names)


def scan_videolist(lists: dict[str, Path], root: Path, *, shard_size: int, seed: int, options: dict[str, Any],
                   class_file: Path | None = None) -> Plan:
    """Generic lists (FineGym, UCF101, HMDB51 ...): one ``<path> <label> [<start> <end>]`` line per clip.

    ``path`` is relative to ``root`` (it may contain spaces; the label and times are the last fields),
    ``label`` is the integer class index, ``start``/``end`` an optional window in seconds. Class names
    come from ``class_file`` (one per line, line i = class i) when given, else ids are ``"0"``, ``"1"``...
    """
    if not Path(root).is_dir():
        raise PrepError(f"no such directory: {root} (the videos root)")
    parsed: dict[str, list[tuple[str, int, float | None, float | None]]] = {}
    for split, path in lists.items():
        parsed[split] = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            parts = line.rsplit(None, 3)
            try:
                if len(parts) == 4 and _is_number(parts[2]) and _is_number(parts[3]):
                    parsed[split].append((parts[0], int(parts[1]), float(parts[2]), float(parts[3])))
                else:
                    rel, label = line.rsplit(None, 1)
                    parsed[split].append((rel, int(label), None, None))
            except ValueError as exc:
                raise PrepError(f"{path}:{n}: expected '<path> <label> [<start> <end>]', got {line!r}") from exc
    num = 1 + max(lbl for rows in parsed.values() for _, lbl, _, _ in rows)
    names = None
    if class_file is not None:
        names = [x.strip() for x in class_file.read_text(encoding="utf-8").splitlines() if x.strip()]
        num = max(num, len(names))
    classes = names if names and len(set(names)) == len(names) == num else [str(i) for i in range(num)]
    splits: dict[str, list[Sample]] = {}
    missing: dict[str, list[tuple[str, str]]] = {}
    for split, rows in parsed.items():
        splits[split] = []
        for rel, label, start, end in rows:
            video = root / rel
            why = check_regular(video)  # stat only: a FIFO or device named in a list is never opened
            if why is not None:
                missing.setdefault(split, []).append((rel, _MISSING if why == "file not found" else why))
                continue
            splits[split].append(Sample(video, label, classes[label], rel, start, end))
    return _plan(classes, splits, missing, shard_size, seed, options, names)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
