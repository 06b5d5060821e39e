"""Parquet manifests: one row per written sample (split and shard sidecars), and the quarantine manifest."""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass, fields
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from data_prep.tarwrite import FILE_MODE

logger = logging.getLogger(__name__)

#: Manifest format version, stored in the schema metadata.
MANIFEST_VERSION = 2

#: Column layout of ``<split>.parquet``.
MANIFEST_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),  # sample key, e.g. "train_00000042"
        pa.field("shard", pa.string(), nullable=False),  # shard file name, e.g. "train-000000.tar"
        pa.field("offset", pa.int64(), nullable=False),  # byte offset of the image data in the shard
        pa.field("bytes", pa.int64(), nullable=False),  # image data size in bytes
        pa.field("label", pa.int64(), nullable=False),  # class index
        pa.field("class_id", pa.string(), nullable=False),  # class folder name
        pa.field("width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("fps", pa.float64()),  # videos only (null for images)
        pa.field("frames", pa.int32()),  # videos only
        pa.field("duration", pa.float64()),  # videos only, seconds
        pa.field("format", pa.string(), nullable=False),  # jpeg, png, h264, vp9, jpeg-frames
        pa.field("sha256", pa.string(), nullable=False),  # hex digest of the payload (all frames, in order)
        pa.field("source", pa.string(), nullable=False),  # path relative to the source root
        pa.field("note", pa.string(), nullable=False),  # conversions applied ("" when none)
    ],
    metadata={"vitpipe.manifest_version": str(MANIFEST_VERSION)},
)


@dataclass(frozen=True)
class ManifestRow:
    """One manifest row; field names and order match :data:`MANIFEST_SCHEMA`."""

    key: str
    shard: str
    offset: int
    bytes: int
    label: int
    class_id: str
    width: int
    height: int
    fps: float | None
    frames: int | None
    duration: float | None
    format: str
    sha256: str
    source: str
    note: str


_COLUMNS = [f.name for f in fields(ManifestRow)]

#: Quarantine manifest (``quarantine.parquet``): every input that was not written, and why.
QUARANTINE_SCHEMA = pa.schema(
    [
        pa.field("split", pa.string(), nullable=False),
        pa.field("key", pa.string()),  # planned key (null for inputs rejected while scanning)
        pa.field("source", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
    ],
    metadata={"vitpipe.manifest_version": str(MANIFEST_VERSION)},
)


def rows_to_table(rows: list[ManifestRow]) -> pa.Table:
    """Return manifest rows as a table with :data:`MANIFEST_SCHEMA`."""
    return pa.Table.from_pydict({name: [getattr(r, name) for r in rows] for name in _COLUMNS}, schema=MANIFEST_SCHEMA)


def write_table_atomic(table: pa.Table, path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write a zstd parquet file through a hidden temporary file and ``os.replace``.

    Args:
        table: The rows.
        path: Destination.
        metadata: Extra schema metadata (merged into the table's).
    """
    if metadata:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), **metadata})
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        os.chmod(tmp, FILE_MODE)
        pq.write_table(table, tmp, compression="zstd")
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
