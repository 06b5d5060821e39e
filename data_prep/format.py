"""The on-disk contract of a vitpipe dataset: what ``vitpipe prep`` writes and the loaders read.

Both sides import this module and nothing else of :mod:`data_prep` on the reading side:

* layout: ``<root>/dataset.json``, ``<root>/<split>.parquet``, ``<root>/quarantine.parquet``,
  ``<root>/<split>/<split>-NNNNNN.{tar,idx,parquet}`` (:func:`shard_name`, :func:`index_name`);
* ``dataset.json``: :class:`DatasetInfo` and its parts, :data:`FORMAT_VERSION`, :func:`load_dataset_info`;
* sample components, in tar order: the media (:data:`JPG`/:data:`PNG`, :data:`MP4`/:data:`WEBM`, or
  :func:`frame_ext` per JPEG frame), then :data:`CLS` (label as ASCII decimal), :data:`LBL` (label as
  8-byte little-endian int64, :data:`LABEL_STRUCT`, what DALI reads) and :data:`META` (JSON object);
* the DALI index beside each tar (``wds2idx`` format): :func:`format_index`, :func:`parse_index`;
* the parquet manifests: :data:`MANIFEST_COLUMNS`, :func:`manifest_schema`, :func:`quarantine_schema`;
* atomic file replacement (:class:`AtomicPath`, :func:`atomic_write_bytes`).

Importing this module imports the standard library only; pyarrow is imported by the schema functions.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import re
import struct
import tempfile
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, TypedDict, cast

if TYPE_CHECKING:
    import pyarrow as pa

#: Version of the ``dataset.json`` layout written now (2 added shard bytes, counts, quarantine, settings,
#: warnings, class names and the video fields); every version in :data:`READABLE_VERSIONS` loads.
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
DATASET_JSON = "dataset.json"
QUARANTINE_MANIFEST = "quarantine.parquet"
KINDS = ("image", "video")


class FormatError(ValueError):
    """A dataset on disk does not follow this contract; the message is one line meant for the user."""


# ---------------------------------------------------------------- file names


def shard_name(split: str, index: int) -> str:
    """Return the shard file name, e.g. ``train-000003.tar``."""
    return f"{split}-{index:06d}.tar"


def index_name(shard: str) -> str:
    """Return the DALI index file name of a shard, e.g. ``train-000003.idx``."""
    return shard.removesuffix(".tar") + ".idx"


def sidecar_name(shard: str) -> str:
    """Return the sidecar manifest file name of a shard, e.g. ``train-000003.parquet``."""
    return shard.removesuffix(".tar") + ".parquet"


def manifest_name(split: str) -> str:
    """Return the split manifest file name, e.g. ``train.parquet``."""
    return f"{split}.parquet"


def sample_key(split: str, index: int) -> str:
    """Return the sample key, e.g. ``train_00000042`` (unique within the dataset, no dots)."""
    return f"{split}_{index:08d}"


# ---------------------------------------------------------------- sample components

JPG, PNG = "jpg", "png"
MP4, WEBM = "mp4", "webm"
CLS, LBL, META = "cls", "lbl", "json"
#: Components that follow the media in every sample, in this order.
NON_MEDIA = (CLS, LBL, META)
#: Image media extensions a reader accepts (prep writes ``jpg`` and ``png``).
IMAGE_EXTS = ("jpg", "jpeg", "png")
VIDEO_EXTS = (MP4, WEBM)
#: ``struct`` format of the :data:`LBL` component: int64, little-endian.
LABEL_STRUCT = "<q"
_FRAME_RE = re.compile(r"^f\d{4,}\.jpg$")


def frame_ext(i: int) -> str:
    """Return the component extension of frame ``i`` of a JPEG frame sequence: ``f0000.jpg``, ``f0001.jpg``, ..."""
    return f"f{i:04d}.jpg"


def is_frame_ext(ext: str) -> bool:
    """Whether ``ext`` names a frame of a JPEG frame sequence (``fNNNN.jpg``)."""
    return _FRAME_RE.match(ext) is not None


def label_components(label: int) -> list[tuple[str, bytes]]:
    """Return the :data:`CLS` and :data:`LBL` components of a label, in tar order."""
    return [(CLS, str(label).encode("ascii")), (LBL, struct.pack(LABEL_STRUCT, label))]


def decode_lbl(data: bytes) -> int:
    """Return the label stored in an :data:`LBL` component.

    Raises:
        FormatError: If ``data`` is not 8 bytes.
    """
    if len(data) != struct.calcsize(LABEL_STRUCT):
        raise FormatError(f"{LBL} component has {len(data)} bytes, expected {struct.calcsize(LABEL_STRUCT)}")
    return struct.unpack(LABEL_STRUCT, data)[0]


def encode_meta(meta: Mapping[str, Any]) -> bytes:
    """Return the :data:`META` component: ``meta`` as UTF-8 JSON with sorted keys.

    The keys are ``class_id``, ``label`` and ``source``; videos add ``fps``, ``frames``, ``duration``,
    ``start`` and ``end``.
    """
    return json.dumps(meta, sort_keys=True, ensure_ascii=False).encode("utf-8")


# ---------------------------------------------------------------- dataset.json


@dataclass(frozen=True)
class ShardInfo:
    """One tar shard of a split (``splits.<split>.shards[i]``).

    Attributes:
        name: Tar file name inside the split folder.
        num_samples: Samples in the tar.
        index: DALI index file name inside the split folder.
        bytes: Tar size in bytes (0 in version-1 files, which did not record it).
    """

    name: str
    num_samples: int
    index: str
    bytes: int


@dataclass(frozen=True)
class SplitInfo:
    """One split (``splits.<split>``).

    Attributes:
        num_samples: Samples written.
        shards: The shards, in file order.
        manifest: Split manifest file name.
        inputs: Inputs planned for the split (written + quarantined).
        quarantined: Inputs not written.
    """

    num_samples: int
    shards: tuple[ShardInfo, ...]
    manifest: str
    inputs: int
    quarantined: int


@dataclass(frozen=True)
class Counts:
    """Inputs of all splits: ``inputs = written + quarantined``."""

    inputs: int
    written: int
    quarantined: int


@dataclass(frozen=True)
class QuarantineInfo:
    """The quarantine manifest.

    Attributes:
        manifest: Its file name ("" in version-1 files, which had none).
        num_samples: Inputs it lists.
        reasons: Count per reason group (:func:`reason_group`), sorted by reason.
    """

    manifest: str
    num_samples: int
    reasons: dict[str, int]


class Options(TypedDict, total=False):
    """Everything that shaped the bytes (``options``); which keys appear depends on the kind and command."""

    shard_size: int
    seed: int
    shuffle: bool
    # images
    decode_check: bool
    max_pixels: int
    quality: int
    resize: int | None
    # videos
    codec: Literal["h264", "vp9", "jpeg"]
    fps: float
    short_side: int
    keyint: int
    crf: int
    max_seconds: float


class TrainLayout(TypedDict):
    """The training layout the shard-count warning was checked against."""

    nodes: int
    gpus_per_node: int
    loader_workers: int


class Settings(TypedDict, total=False):
    """Run settings that did not shape the bytes (``settings``)."""

    max_failure_rate: float
    train_layout: TrainLayout


def reason_group(reason: str) -> str:
    """Return the group a quarantine reason is counted under: the text before its first ``:``."""
    return reason.split(":", 1)[0]


@dataclass(frozen=True)
class DatasetInfo:
    """The contents of ``dataset.json``.

    Attributes:
        format_version: Layout version of the file it came from (:data:`FORMAT_VERSION` when written now).
        kind: ``"image"`` or ``"video"``.
        classes: Class ids in label order.
        splits: Split name -> split, in file order.
        counts: Inputs, written and quarantined over all splits.
        quarantine: The quarantine manifest.
        options: Everything that shaped the bytes.
        settings: Run settings (failure rate, training layout).
        warnings: Warnings of the merge (e.g. too few shards for the training layout).
        class_names: Human-readable class names in label order, or None.
        source: Where it was read from, for error messages (not part of the file).
    """

    format_version: int
    kind: Literal["image", "video"]
    classes: tuple[str, ...]
    splits: dict[str, SplitInfo]
    counts: Counts
    quarantine: QuarantineInfo
    options: Options
    settings: Settings
    warnings: tuple[str, ...] = ()
    class_names: tuple[str, ...] | None = None
    source: str = field(default="", compare=False, repr=False)

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.classes)

    def split(self, name: str) -> SplitInfo:
        """Return one split.

        Raises:
            FormatError: If there is no such split (the message names the splits there are).
        """
        if name not in self.splits:
            raise FormatError(f"{self.source or DATASET_JSON}: no split {name!r}; it has {', '.join(self.splits)}")
        return self.splits[name]

    def to_json(self) -> dict[str, Any]:
        """Return the JSON object of ``dataset.json`` (keys in file order).

        Always the version-2 layout; an info read from a version-1 file keeps ``format_version`` 1 and
        carries the defaults :meth:`from_json` filled in.
        """
        data: dict[str, Any] = {
            "format_version": self.format_version,
            "kind": self.kind,
            "classes": list(self.classes),
            "num_classes": self.num_classes,
            "splits": {
                name: {"num_samples": s.num_samples,
                       "shards": [{"name": sh.name, "num_samples": sh.num_samples, "index": sh.index,
                                   "bytes": sh.bytes} for sh in s.shards],
                       "manifest": s.manifest, "inputs": s.inputs, "quarantined": s.quarantined}
                for name, s in self.splits.items()
            },
            "counts": {"inputs": self.counts.inputs, "written": self.counts.written,
                       "quarantined": self.counts.quarantined},
            "quarantine": {"manifest": self.quarantine.manifest, "num_samples": self.quarantine.num_samples,
                           "reasons": dict(self.quarantine.reasons)},
            "options": copy.deepcopy(dict(self.options)),
            "settings": copy.deepcopy(dict(self.settings)),
            "warnings": list(self.warnings),
        }
        if self.class_names:
            data["class_names"] = list(self.class_names)
        return data

    def dumps(self) -> str:
        """Return the text of ``dataset.json``."""
        return json.dumps(self.to_json(), indent=2, ensure_ascii=False) + "\n"

    def write(self, root: str | Path) -> None:
        """Write ``<root>/dataset.json`` atomically."""
        atomic_write_bytes(Path(root) / DATASET_JSON, self.dumps().encode("utf-8"))

    @classmethod
    def from_json(cls, data: Mapping[str, Any], source: str) -> DatasetInfo:
        """Build from a parsed ``dataset.json`` of any version in :data:`READABLE_VERSIONS`.

        Version 1 lacks shard ``bytes`` (read as 0), split ``inputs``/``quarantined``, ``counts`` and
        ``quarantine`` (derived from its ``skipped`` list), ``settings``, ``warnings`` and ``class_names``.

        Args:
            data: The parsed JSON object.
            source: Where it came from (a path), for error messages.

        Raises:
            FormatError: On an unknown version, a missing field or a field of the wrong type.
        """
        version = data.get("format_version") if isinstance(data, Mapping) else None
        if version not in READABLE_VERSIONS or isinstance(version, bool):
            raise FormatError(f"{source}: unsupported format_version {version!r} "
                              f"(expected one of {READABLE_VERSIONS})")
        r = _Reader(source)
        classes = tuple(r.get(data, "classes", list, "", item=str))
        if r.get(data, "num_classes", int, "") != len(classes):
            raise FormatError(f"{source}: num_classes {data['num_classes']} but {len(classes)} classes")
        kind = r.get(data, "kind", str, "")
        if kind not in KINDS:
            raise FormatError(f"{source}: kind {kind!r} is not one of {KINDS}")
        splits_json = r.get(data, "splits", dict, "")
        if version == 1:
            skipped = [s for s in data.get("skipped", []) if isinstance(s, Mapping)]
            splits = {name: r.split_v1(sp, f"splits.{name}", sum(s.get("split") == name for s in skipped))
                      for name, sp in splits_json.items()}
            reasons = Counter(reason_group(str(s.get("reason", ""))) for s in skipped)
            counts = Counts(sum(s.inputs for s in splits.values()), sum(s.num_samples for s in splits.values()),
                            len(skipped))
            quarantine = QuarantineInfo("", len(skipped), dict(sorted(reasons.items())))
            settings, warnings, class_names = cast(Settings, {}), (), None
        else:
            splits = {name: r.split(sp, f"splits.{name}") for name, sp in splits_json.items()}
            c = r.get(data, "counts", dict, "")
            counts = Counts(*(r.get(c, k, int, "counts") for k in ("inputs", "written", "quarantined")))
            q = r.get(data, "quarantine", dict, "")
            quarantine = QuarantineInfo(r.get(q, "manifest", str, "quarantine"),
                                        r.get(q, "num_samples", int, "quarantine"),
                                        dict(r.get(q, "reasons", dict, "quarantine")))
            settings = cast(Settings, copy.deepcopy(r.get(data, "settings", dict, "")))
            warnings = tuple(r.get(data, "warnings", list, "", item=str))
            names = data.get("class_names")
            class_names = None if names is None else tuple(r.get(data, "class_names", list, "", item=str))
        options = cast(Options, copy.deepcopy(r.get(data, "options", dict, "")))
        return cls(version, kind, classes, splits, counts, quarantine, options, settings, warnings, class_names,
                   source=source)


class _Reader:
    """Typed field access with one-line :class:`FormatError` messages naming the file and the field."""

    def __init__(self, source: str) -> None:
        self.source = source

    def get(self, obj: Mapping[str, Any], key: str, kind: type, where: str, item: type | None = None) -> Any:
        name = f"{where}.{key}" if where else key
        if key not in obj:
            raise FormatError(f"{self.source}: {name} is missing")
        value = obj[key]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise FormatError(f"{self.source}: {name} must be {kind.__name__}, got {type(value).__name__}")
        if item is not None and not all(isinstance(x, item) for x in value):
            raise FormatError(f"{self.source}: {name} must hold {item.__name__} values only")
        return value

    def shard(self, sh: Any, where: str, v1: bool = False) -> ShardInfo:
        if not isinstance(sh, Mapping):
            raise FormatError(f"{self.source}: {where} must be an object")
        return ShardInfo(self.get(sh, "name", str, where), self.get(sh, "num_samples", int, where),
                         self.get(sh, "index", str, where), 0 if v1 else self.get(sh, "bytes", int, where))

    def _shards(self, sp: Mapping[str, Any], where: str, v1: bool) -> tuple[ShardInfo, ...]:
        shards = self.get(sp, "shards", list, where)
        return tuple(self.shard(sh, f"{where}.shards[{i}]", v1) for i, sh in enumerate(shards))

    def split(self, sp: Any, where: str) -> SplitInfo:
        if not isinstance(sp, Mapping):
            raise FormatError(f"{self.source}: {where} must be an object")
        return SplitInfo(self.get(sp, "num_samples", int, where), self._shards(sp, where, False),
                         self.get(sp, "manifest", str, where), self.get(sp, "inputs", int, where),
                         self.get(sp, "quarantined", int, where))

    def split_v1(self, sp: Any, where: str, skipped: int) -> SplitInfo:
        if not isinstance(sp, Mapping):
            raise FormatError(f"{self.source}: {where} must be an object")
        written = self.get(sp, "num_samples", int, where)
        return SplitInfo(written, self._shards(sp, where, True), self.get(sp, "manifest", str, where),
                         written + skipped, skipped)


def load_dataset_info(path: str | Path) -> DatasetInfo:
    """Read a dataset's ``dataset.json``.

    Args:
        path: The dataset root, or the ``dataset.json`` file itself.

    Raises:
        FormatError: If the file is missing, is not valid JSON, has an unknown format version or does
            not have the layout of its version.
    """
    path = Path(path)
    json_path = path if path.name == DATASET_JSON and not path.is_dir() else path / DATASET_JSON
    if not json_path.is_file():
        raise FormatError(f"{path} is not a vitpipe dataset: no {DATASET_JSON}; run `vitpipe prep imagenet` first")
    try:
        data = json.loads(json_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise FormatError(f"{json_path}: cannot read dataset description: {exc}") from exc
    return DatasetInfo.from_json(data, str(json_path))


# ---------------------------------------------------------------- DALI index

#: Version tag of the DALI webdataset index format written by ``wds2idx`` (DALI 2.x).
INDEX_VERSION = "v1.2"


@dataclass(frozen=True)
class ComponentLocation:
    """Where one component's bytes sit inside the tar.

    Attributes:
        ext: Component extension (e.g. ``"jpg"``).
        offset: Byte offset of the component data (not its header) from the start of the tar.
        size: Data size in bytes.
    """

    ext: str
    offset: int
    size: int


def format_index(samples: Sequence[Sequence[tuple[ComponentLocation, str]]]) -> str:
    r"""Render a DALI webdataset index (what ``wds2idx`` writes and ``fn.readers.webdataset`` reads).

    The text is ``v1.2 <samples>`` then one line per sample with one ``<ext> <data offset> <size>
    <member name>`` group per component, everything separated by single spaces, each line ending in
    ``\n``. The offset is that of the member's data (header offset + 512); the extension is everything
    after the first dot of the member's name.

    Args:
        samples: Per sample, its components in tar order as ``(location, member name)`` pairs.

    Returns:
        The index file contents.
    """
    lines = [f"{INDEX_VERSION} {len(samples)}"]
    for components in samples:
        lines.append(" ".join(f"{loc.ext} {loc.offset} {loc.size} {name}" for loc, name in components))
    return "\n".join(lines) + "\n"


def parse_index(text: str, source: str) -> list[dict[str, tuple[int, int]]]:
    """Parse a DALI webdataset index (any ``v1.x`` with ``ext offset size name`` groups).

    Args:
        text: The index file contents.
        source: Where it came from (a path), for error messages.

    Returns:
        One ``{ext: (offset, size)}`` per sample, in tar order.

    Raises:
        FormatError: If the header is not ``v1.x N``, a line is not made of ``ext offset size name``
            groups with non-negative integers, or the number of lines is not ``N``.
    """
    lines = text.splitlines()
    header = lines[0].split() if lines else []
    if len(header) != 2 or not header[0].startswith("v1.") or not header[1].isdigit():
        raise FormatError(f"{source}: not a DALI index file (run `vitpipe prep verify`)")
    samples = []
    for line in lines[1:]:
        fields = line.split()
        if not fields or len(fields) % 4 or not all(fields[i].isdigit() and fields[i + 1].isdigit()
                                                   for i in range(1, len(fields), 4)):
            raise FormatError(f"{source}: malformed index line {line[:80]!r}")
        samples.append({fields[i]: (int(fields[i + 1]), int(fields[i + 2])) for i in range(0, len(fields), 4)})
    if len(samples) != int(header[1]):
        raise FormatError(f"{source}: the header announces {header[1]} samples but {len(samples)} lines follow")
    return samples


def read_index(path: str | Path) -> list[dict[str, tuple[int, int]]]:
    """Read and parse the DALI index file at ``path`` (see :func:`parse_index`).

    Raises:
        FormatError: If the file cannot be read or is malformed.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise FormatError(f"{path}: cannot read the DALI index: {getattr(exc, 'strerror', None) or exc}") from exc
    return parse_index(text, str(path))


# ---------------------------------------------------------------- manifests

#: Manifest layout version, stored in the schema metadata under :data:`MANIFEST_VERSION_KEY`.
MANIFEST_VERSION = 2
MANIFEST_VERSION_KEY = "vitpipe.manifest_version"


@dataclass(frozen=True)
class Column:
    """One parquet column: name, pyarrow type factory name (``pa.<type>()``), nullability, meaning."""

    name: str
    type: Literal["string", "int32", "int64", "float64"]
    nullable: bool
    doc: str = ""


#: Columns of ``<split>.parquet`` and of each shard's sidecar, in order.
MANIFEST_COLUMNS: tuple[Column, ...] = (
    Column("key", "string", False, 'sample key, e.g. "train_00000042"'),
    Column("shard", "string", False, 'shard file name, e.g. "train-000000.tar"'),
    Column("offset", "int64", False, "byte offset of the media data in the shard (first frame for sequences)"),
    Column("bytes", "int64", False, "media data size in bytes (sum over frames)"),
    Column("label", "int64", False, "class index"),
    Column("class_id", "string", False, "class id (folder name, label name)"),
    Column("width", "int32", False),
    Column("height", "int32", False),
    Column("fps", "float64", True, "videos only (null for images)"),
    Column("frames", "int32", True, "videos only"),
    Column("duration", "float64", True, "videos only, seconds"),
    Column("format", "string", False, "jpeg, png, h264, vp9, jpeg-frames"),
    Column("sha256", "string", False, "hex digest of the media bytes (all frames, in order)"),
    Column("source", "string", False, "path relative to the source root"),
    Column("note", "string", False, 'conversions applied ("" when none)'),
)

#: Columns of ``quarantine.parquet``: every input that was not written, and why.
QUARANTINE_COLUMNS: tuple[Column, ...] = (
    Column("split", "string", False),
    Column("key", "string", True, "planned key (null for inputs rejected while scanning)"),
    Column("source", "string", False),
    Column("reason", "string", False),
)


def _schema(columns: Sequence[Column]) -> pa.Schema:
    import pyarrow as pa

    return pa.schema([pa.field(c.name, getattr(pa, c.type)(), nullable=c.nullable) for c in columns],
                     metadata={MANIFEST_VERSION_KEY: str(MANIFEST_VERSION)})


@functools.cache
def manifest_schema() -> pa.Schema:
    """The pyarrow schema of :data:`MANIFEST_COLUMNS` (imports pyarrow)."""
    return _schema(MANIFEST_COLUMNS)


@functools.cache
def quarantine_schema() -> pa.Schema:
    """The pyarrow schema of :data:`QUARANTINE_COLUMNS` (imports pyarrow)."""
    return _schema(QUARANTINE_COLUMNS)


# ---------------------------------------------------------------- atomic writes

#: Permissions of written files (``mkstemp`` would leave them at 0o600, unreadable to other users).
FILE_MODE = 0o644


class AtomicPath:
    """A hidden temporary file beside ``path`` (``.<name>.<random>.tmp``) that replaces ``path`` on commit.

    Readers never see a partial file: :meth:`commit` fsyncs the temporary file and renames it onto
    ``path`` (``os.replace``); :meth:`discard` deletes it. As a context manager it yields the temporary
    path and commits when the block succeeds, discards when it raises::

        with AtomicPath(out / "train.parquet") as tmp:
            pq.write_table(table, tmp)

    Attributes:
        path: Final path.
        tmp: The temporary file (created empty, mode :data:`FILE_MODE`).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        try:
            os.fchmod(fd, FILE_MODE)
        finally:
            os.close(fd)
        self.tmp = Path(tmp)

    def commit(self) -> None:
        """Flush the temporary file to disk and move it onto :attr:`path`."""
        try:
            fd = os.open(self.tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(self.tmp, self.path)
        except BaseException:
            self.discard()
            raise

    def discard(self) -> None:
        """Delete the temporary file."""
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> Path:
        return self.tmp

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.discard()


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary file in the same directory, fsync, ``os.replace``).

    Args:
        path: Destination file; it gets mode :data:`FILE_MODE`.
        data: File contents.
    """
    with AtomicPath(path) as tmp:
        tmp.write_bytes(data)
