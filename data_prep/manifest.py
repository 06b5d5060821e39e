"""Parquet manifest of a split: one row per sample with its location in the shards."""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass, fields
from pathlib import Path
from types import TracebackType

import pyarrow as pa
import pyarrow.parquet as pq

from data_prep.tarwrite import FILE_MODE

logger = logging.getLogger(__name__)

#: Manifest format version, stored in the schema metadata.
MANIFEST_VERSION = 1

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
        pa.field("format", pa.string(), nullable=False),  # "jpeg" or "png"
        pa.field("sha256", pa.string(), nullable=False),  # hex digest of the image bytes
        pa.field("source", pa.string(), nullable=False),  # path relative to the source root
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
    format: str
    sha256: str
    source: str


_COLUMNS = [f.name for f in fields(ManifestRow)]


class ManifestWriter:
    """Stream manifest rows into a zstd-compressed parquet file, one row group per shard.

    The file is written to a hidden temporary file and moved into place on :meth:`close`; leaving a
    ``with`` block with an exception discards it. Memory stays bounded by one shard's rows.
    """

    def __init__(self, path: Path) -> None:
        """Open the temporary parquet file next to ``path``.

        Args:
            path: Final path of the manifest.
        """
        self.path = Path(path)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        os.fchmod(fd, FILE_MODE)
        os.close(fd)
        self._tmp_path = Path(tmp)
        self._writer = pq.ParquetWriter(self._tmp_path, MANIFEST_SCHEMA, compression="zstd")
        self._pending: list[ManifestRow] = []
        self.num_rows = 0
        self._done = False

    def add(self, row: ManifestRow) -> None:
        """Queue one row (written at the next :meth:`flush`)."""
        self._pending.append(row)

    def flush(self) -> None:
        """Write the queued rows as one row group."""
        if not self._pending:
            return
        columns = {name: [getattr(r, name) for r in self._pending] for name in _COLUMNS}
        self._writer.write_table(pa.Table.from_pydict(columns, schema=MANIFEST_SCHEMA))
        self.num_rows += len(self._pending)
        self._pending = []

    def close(self) -> None:
        """Flush, finish the file and move it into place."""
        if self._done:
            return
        self.flush()
        self._writer.close()
        with open(self._tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(self._tmp_path, self.path)
        self._done = True
        logger.debug("wrote %s (%d rows)", self.path, self.num_rows)

    def abort(self) -> None:
        """Discard the manifest."""
        if self._done:
            return
        self._done = True
        self._writer.close()
        self._tmp_path.unlink(missing_ok=True)

    def __enter__(self) -> ManifestWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
