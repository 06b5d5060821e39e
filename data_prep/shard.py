"""Split -> WebDataset shards + DALI indexes + parquet manifest, and the dataset-level ``dataset.json``.

Output layout of :func:`prep_imagefolder`::

    <out>/dataset.json                  written last; its presence marks a complete dataset
    <out>/train.parquet                 manifest, one row per sample
    <out>/train/train-000000.tar        WebDataset shard
    <out>/train/train-000000.idx        DALI index of that shard (wds2idx format)
    ...

Each sample has four tar members, in this order: ``<key>.jpg`` (or ``.png``; the source bytes,
unchanged), ``<key>.cls`` (label as ASCII decimal), ``<key>.lbl`` (label as 8-byte little-endian int64,
for DALI's ``dtypes=[UINT8, INT64]``) and ``<key>.json`` (``{"class_id", "label", "source"}``).
"""

from __future__ import annotations

import json
import logging
import re
import struct
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from data_prep.errors import PrepError
from data_prep.loading import Loaded, load_sample, ordered_map
from data_prep.manifest import ManifestRow, ManifestWriter
from data_prep.probe import ImageInfo
from data_prep.scan import Sample, scan_imagefolder
from data_prep.tarwrite import TarShardWriter, atomic_write_bytes

logger = logging.getLogger(__name__)

#: Version of the ``dataset.json`` layout.
FORMAT_VERSION = 1
DATASET_JSON = "dataset.json"
#: Default number of reader threads (source reads are I/O bound, e.g. on network file systems).
DEFAULT_WORKERS = 8
_SPLIT_RE = re.compile(r"^[A-Za-z0-9_-]+$")


@dataclass(frozen=True)
class ShardInfo:
    """One written shard. Attributes: file ``name``, ``num_samples``, and ``index`` file name."""

    name: str
    num_samples: int
    index: str


@dataclass(frozen=True)
class SkippedSample:
    """A source file left out of the shards. Attributes: ``split``, ``source`` path, ``reason``."""

    split: str
    source: str
    reason: str


@dataclass
class SplitSummary:
    """Result of :func:`write_split`.

    Attributes:
        split: Split name.
        num_samples: Samples written.
        shards: Written shards, in order.
        manifest: Manifest file name (relative to the output root).
        skipped: Source files that were left out, with the reason.
        shuffled: Whether the sample order was shuffled.
    """

    split: str
    num_samples: int
    shards: list[ShardInfo] = field(default_factory=list)
    manifest: str = ""
    skipped: list[SkippedSample] = field(default_factory=list)
    shuffled: bool = False


def shard_name(split: str, index: int) -> str:
    """Return the shard file name, e.g. ``train-000003.tar``."""
    return f"{split}-{index:06d}.tar"


def sample_key(split: str, index: int) -> str:
    """Return the sample key, e.g. ``train_00000042`` (unique within the dataset, no dots)."""
    return f"{split}_{index:08d}"


def order_samples(samples: Sequence[Sample], seed: int, shuffle: bool) -> list[Sample]:
    """Sort samples by (label, source path), then optionally apply a seeded global permutation.

    Sorting first makes the result independent of the order the caller listed the files in.

    Args:
        samples: Samples to order.
        seed: Seed for ``numpy.random.default_rng``.
        shuffle: Whether to permute after sorting.

    Returns:
        The ordered samples.
    """
    ordered = sorted(samples, key=lambda s: (s.label, s.source))
    if not shuffle:
        return ordered
    perm = np.random.default_rng(seed).permutation(len(ordered))
    return [ordered[i] for i in perm]


def _components(sample: Sample, data: bytes, info: ImageInfo) -> list[tuple[str, bytes]]:
    """Return the tar components of one sample, in their fixed order."""
    meta = {"class_id": sample.class_id, "label": sample.label, "source": sample.source}
    return [
        (info.ext, data),
        ("cls", str(sample.label).encode("ascii")),
        ("lbl", struct.pack("<q", sample.label)),
        ("json", json.dumps(meta, sort_keys=True, ensure_ascii=False).encode("utf-8")),
    ]


def _label_ok(sample: Sample, classes: Sequence[str]) -> bool:
    """Return True if the sample's label indexes its class id in ``classes``."""
    return 0 <= sample.label < len(classes) and classes[sample.label] == sample.class_id


def _check_write_args(split: str, shard_size: int) -> None:
    """Raise PrepError for a split name or shard size that cannot be used."""
    if not _SPLIT_RE.match(split):
        raise PrepError(f"invalid split name {split!r}: use letters, digits, '_' and '-' only")
    if shard_size < 1:
        raise PrepError(f"shard size must be at least 1, got {shard_size}")


def _remove_stale(split_dir: Path, split: str, keep: set[str]) -> None:
    """Delete shard/index files of ``split`` left from an earlier run that are not in ``keep``."""
    pattern = re.compile(rf"^{re.escape(split)}-\d{{6}}\.(tar|idx)$")
    for path in sorted(split_dir.iterdir()):
        if pattern.match(path.name) and path.name not in keep:
            logger.info("removing stale shard file %s from an earlier run", path)
            path.unlink()


class _SplitWriter:
    """Spread samples over shards of ``shard_size`` and keep the manifest in step."""

    def __init__(self, split_dir: Path, split: str, shard_size: int, manifest: ManifestWriter) -> None:
        self.split_dir, self.split, self.shard_size = split_dir, split, shard_size
        self.manifest = manifest
        self.shards: list[ShardInfo] = []
        self.num_samples = 0
        self._writer: TarShardWriter | None = None

    def add(self, item: Loaded) -> None:
        """Append one loaded sample to the current shard, opening and closing shards as needed."""
        sample, data, info = item.sample, item.data, item.info
        if info is None:
            raise ValueError(f"{sample.source}: cannot write a sample that failed to load ({item.error})")
        if self._writer is None:
            tar_path = self.split_dir / shard_name(self.split, len(self.shards))
            self._writer = TarShardWriter(tar_path, tar_path.with_suffix(".idx"))
        key = sample_key(self.split, self.num_samples)
        loc = self._writer.add_sample(key, _components(sample, data, info))[0]
        self.manifest.add(
            ManifestRow(
                key=key, shard=self._writer.tar_path.name, offset=loc.offset, bytes=loc.size,
                label=sample.label, class_id=sample.class_id, width=info.width, height=info.height,
                format=info.format, sha256=item.sha256, source=sample.source,
            )
        )
        self.num_samples += 1
        if self._writer.num_samples >= self.shard_size:
            self.finish_shard()

    def finish_shard(self) -> None:
        """Commit the open shard (if any) and flush its manifest rows as one row group."""
        if self._writer is None:
            return
        writer, self._writer = self._writer, None
        writer.close()
        self.manifest.flush()
        index_name = writer.tar_path.with_suffix(".idx").name
        self.shards.append(ShardInfo(writer.tar_path.name, writer.num_samples, index_name))
        logger.info("wrote %s (%d samples)", writer.tar_path, writer.num_samples)

    def abort(self) -> None:
        """Discard the open shard."""
        if self._writer is not None:
            self._writer.abort()
            self._writer = None


def write_split(
    samples: Sequence[Sample],
    classes: Sequence[str],
    out_dir: Path,
    split: str,
    shard_size: int,
    seed: int,
    shuffle: bool | None = None,
    workers: int = DEFAULT_WORKERS,
) -> SplitSummary:
    """Write one split as WebDataset shards with DALI indexes and a parquet manifest.

    Ordering: samples are first sorted by (label, source path). The ``"train"`` split is then globally
    shuffled with ``numpy.random.default_rng(seed)``, so every shard mixes classes and the output only
    depends on the file set and the seed. Other splits keep the sorted order unless ``shuffle=True``.
    Keys are ``f"{split}_{i:08d}"`` with ``i`` counting written samples in output order.

    Files that cannot be read or that PIL cannot identify as JPEG/PNG are skipped, logged as a warning
    and listed in ``SplitSummary.skipped``; they do not consume a key.

    Shards go to ``out_dir/<split>/<split>-NNNNNN.tar`` (+ ``.idx``), the manifest to
    ``out_dir/<split>.parquet``. Every file is written atomically. Shard files of the same split left
    over from an earlier run with more shards are deleted.

    Args:
        samples: Samples of the split (e.g. from :func:`data_prep.scan.scan_imagefolder`).
        classes: Class list the labels index into (used for a consistency check).
        out_dir: Output root.
        split: Split name (letters, digits, ``_``, ``-``).
        shard_size: Maximum samples per shard (at least 1).
        seed: Shuffle seed.
        shuffle: Whether to shuffle; None means "only for train".
        workers: Threads that read and hash source files ahead of the writer (output order and
            bytes do not depend on it; 1 reads in the calling thread).

    Returns:
        The split summary.

    Raises:
        PrepError: On an invalid split name, shard size or label, or when no sample could be written.
    """
    _check_write_args(split, shard_size)
    bad = next((s for s in samples if not _label_ok(s, classes)), None)
    if bad is not None:
        raise PrepError(f"{bad.source}: label {bad.label} does not match class {bad.class_id!r}")
    shuffle = split == "train" if shuffle is None else shuffle
    split_dir = Path(out_dir) / split
    split_dir.mkdir(parents=True, exist_ok=True)
    skipped: list[SkippedSample] = []
    with ManifestWriter(Path(out_dir) / f"{split}.parquet") as manifest:
        writer = _SplitWriter(split_dir, split, shard_size, manifest)
        try:
            for item in ordered_map(load_sample, order_samples(samples, seed, shuffle), workers):
                if item.error is not None:
                    logger.warning("skipping %s: %s", item.sample.source, item.error)
                    skipped.append(SkippedSample(split, item.sample.source, item.error))
                    continue
                writer.add(item)
            writer.finish_shard()
        except BaseException:
            writer.abort()
            raise
        if writer.num_samples == 0:
            raise PrepError(f"split {split!r}: none of {len(samples)} files could be read as an image")
    _remove_stale(split_dir, split, {n for s in writer.shards for n in (s.name, s.index)})
    logger.info(
        "split %s: %d samples in %d shards, %d skipped%s",
        split, writer.num_samples, len(writer.shards), len(skipped), " (shuffled)" if shuffle else "",
    )
    return SplitSummary(split, writer.num_samples, writer.shards, f"{split}.parquet", skipped, shuffle)


def _split_entry(summary: SplitSummary) -> dict[str, Any]:
    """Return the ``dataset.json`` entry of one split."""
    return {
        "num_samples": summary.num_samples,
        "shards": [asdict(s) for s in summary.shards],
        "manifest": summary.manifest,
    }


def _scan_splits(src: Path, splits: Sequence[str]) -> tuple[list[str], dict[str, list[Sample]]]:
    """Scan every requested split that exists; the class list comes from train."""
    if "train" not in splits:
        raise PrepError(f"splits {list(splits)} must include 'train' (it defines the class list)")
    if not src.is_dir():
        raise PrepError(f"{src}: no such directory (expected {src}/train/<class-id>/*.JPEG)")
    classes, train = scan_imagefolder(src / "train", root=src)
    found = {"train": train}
    for split in splits:
        if split == "train":
            continue
        if not (src / split).is_dir():
            logger.info("%s: no %r split, skipping it", src, split)
            continue
        found[split] = scan_imagefolder(src / split, classes=classes, root=src)[1]
    return classes, found


def prep_imagefolder(
    src: Path,
    out: Path,
    shard_size: int = 1000,
    seed: int = 0,
    splits: Sequence[str] = ("train", "val"),
    workers: int = DEFAULT_WORKERS,
) -> dict[str, Any]:
    """Convert an ImageNet-style tree into a vitpipe dataset (shards, indexes, manifests, dataset.json).

    ``src/train/<class_id>/*`` is required and defines the classes (sorted folder names); other splits
    (``val`` by default) are optional and may only use train classes. All splits are scanned before
    anything is written, so layout errors surface at once. ``out/dataset.json`` is removed at the
    start and written atomically at the end: its presence marks a complete dataset.

    Args:
        src: Source root holding ``train/`` (and optionally ``val/``).
        out: Output root (created if missing).
        shard_size: Maximum samples per shard.
        seed: Seed of the train shuffle.
        splits: Splits to convert; must include ``"train"``.
        workers: Reader threads per split (see :func:`write_split`); does not change the output.

    Returns:
        The contents written to ``dataset.json``.

    Raises:
        PrepError: If the source layout is invalid (missing/empty train, val class not in train, ...).
    """
    src, out = Path(src), Path(out)
    _check_write_args("train", shard_size)
    classes, found = _scan_splits(src, splits)
    out.mkdir(parents=True, exist_ok=True)
    (out / DATASET_JSON).unlink(missing_ok=True)
    summaries = [
        write_split(found[name], classes, out, name, shard_size, seed, workers=workers)
        for name in splits
        if name in found
    ]
    info: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "kind": "image",
        "classes": list(classes),
        "num_classes": len(classes),
        "splits": {s.split: _split_entry(s) for s in summaries},
        "skipped": [asdict(k) for s in summaries for k in s.skipped],
        "options": {"shard_size": shard_size, "seed": seed},
    }
    text = json.dumps(info, indent=2, ensure_ascii=False) + "\n"
    atomic_write_bytes(out / DATASET_JSON, text.encode("utf-8"))
    return info


def load_dataset_info(path: Path) -> dict[str, Any]:
    """Read a dataset's ``dataset.json``.

    Args:
        path: The dataset root, or the ``dataset.json`` file itself.

    Returns:
        The parsed ``dataset.json``.

    Raises:
        PrepError: If the file is missing, is not valid JSON, or has an unknown format version.
    """
    path = Path(path)
    json_path = path if path.name == DATASET_JSON and not path.is_dir() else path / DATASET_JSON
    if not json_path.is_file():
        raise PrepError(
            f"{path} is not a vitpipe dataset: no {DATASET_JSON}; run `vitpipe prep imagenet` first"
        )
    try:
        info = json.loads(json_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise PrepError(f"{json_path}: cannot read dataset description: {exc}") from exc
    if not isinstance(info, dict) or info.get("format_version") != FORMAT_VERSION:
        version = info.get("format_version") if isinstance(info, dict) else None
        raise PrepError(f"{json_path}: unsupported format_version {version!r} (expected {FORMAT_VERSION})")
    return info
