"""Parquet manifests: one row per written sample (split and shard sidecars), and the quarantine manifest.

The column layout is part of the on-disk contract (:data:`data_prep.format.MANIFEST_COLUMNS`); this
module holds the pyarrow side of writing it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from data_prep.format import AtomicPath, manifest_schema, quarantine_schema

logger = logging.getLogger(__name__)

__all__ = ["MANIFEST_SCHEMA", "QUARANTINE_SCHEMA", "ManifestRow", "rows_to_table", "write_table_atomic"]

#: Column layout of ``<split>.parquet`` (:data:`data_prep.format.MANIFEST_COLUMNS`).
MANIFEST_SCHEMA = manifest_schema()
#: Quarantine manifest (``quarantine.parquet``): every input that was not written, and why.
QUARANTINE_SCHEMA = quarantine_schema()


@dataclass(frozen=True)
class ManifestRow:
    """One manifest row; field names and order match :data:`data_prep.format.MANIFEST_COLUMNS`."""

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
    with AtomicPath(path) as tmp:
        pq.write_table(table, str(tmp), compression="zstd")
