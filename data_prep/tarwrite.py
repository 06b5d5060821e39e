"""Deterministic WebDataset tar writer that writes the DALI index alongside.

The tar is byte-identical for identical input: every member header has fixed fields (mtime 0, uid/gid
0, empty uname/gname, mode 0o644, regular file, USTAR format) and members are written in the order
given. The tar and its index are written to hidden temporary files in the target directory and moved
into place on :meth:`TarShardWriter.close` (:class:`data_prep.format.AtomicPath`), so a reader never
sees a partial shard. The index format is :func:`data_prep.format.format_index`.
"""

from __future__ import annotations

import io
import logging
import tarfile
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from data_prep.format import AtomicPath, ComponentLocation, atomic_write_bytes, format_index

logger = logging.getLogger(__name__)

#: Tar member header format; USTAR gives exactly one 512-byte header per member (names < 100 bytes).
TAR_FORMAT = tarfile.USTAR_FORMAT
_MAX_NAME = 99


def _check_name(key: str, ext: str) -> str:
    """Validate a sample key and component extension and return the member name.

    Raises:
        ValueError: If the key contains a dot, slash or whitespace, the extension is empty or contains
            whitespace, or the member name does not fit a USTAR header.
    """
    if not key or any(c in key for c in "./ \t\n"):
        raise ValueError(f"invalid sample key {key!r}: must be non-empty, without dots, slashes or spaces")
    if not ext or any(c.isspace() or c == "/" for c in ext):
        raise ValueError(f"invalid component extension {ext!r}")
    name = f"{key}.{ext}"
    if len(name.encode("utf-8")) > _MAX_NAME:
        raise ValueError(f"member name {name!r} is longer than {_MAX_NAME} bytes")
    return name


def _member_info(name: str, size: int) -> tarfile.TarInfo:
    """Return a tar header with every field fixed except name and size."""
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info


class TarShardWriter:
    """Write one WebDataset shard (``.tar``) and, optionally, its DALI index (``.idx``).

    Use as a context manager; leaving the block normally commits both files, leaving it with an
    exception removes the temporary files.

    Example:
        >>> with TarShardWriter(Path("train-000000.tar"), Path("train-000000.idx")) as w:
        ...     locs = w.add_sample("train_00000000", [(JPG, jpeg_bytes), *label_components(3)])
    """

    def __init__(self, tar_path: Path, idx_path: Path | None = None) -> None:
        """Open hidden temporary files next to ``tar_path``.

        Args:
            tar_path: Final path of the shard.
            idx_path: Final path of the DALI index, or None to write no index.
        """
        self.tar_path = Path(tar_path)
        self.idx_path = None if idx_path is None else Path(idx_path)
        self._target = AtomicPath(self.tar_path)
        self._file = open(self._target.tmp, "wb")  # closed by close() or abort()
        self._tar = tarfile.TarFile(fileobj=self._file, mode="w", format=TAR_FORMAT)
        self._index: list[list[tuple[ComponentLocation, str]]] = []
        self._closed = False

    @property
    def num_samples(self) -> int:
        """Number of samples added so far."""
        return len(self._index)

    @property
    def bytes_written(self) -> int:
        """Bytes written to the tar so far (headers and padding included, end-of-archive excluded)."""
        return self._tar.offset

    def add_sample(self, key: str, components: Sequence[tuple[str, bytes]]) -> list[ComponentLocation]:
        """Append one sample, its components in the given order.

        Args:
            key: Sample key (member base name); must not contain dots, slashes or whitespace.
            components: ``(extension, data)`` pairs.

        Returns:
            The location of each component's data in the tar, in the same order.

        Raises:
            ValueError: On an invalid key or extension, no components, or a repeated extension.
        """
        if self._closed:
            raise ValueError(f"{self.tar_path}: writer is closed")
        exts = [ext for ext, _ in components]
        if not exts or len(set(exts)) != len(exts):
            raise ValueError(f"sample {key!r}: need at least one component and unique extensions, got {exts}")
        entries: list[tuple[ComponentLocation, str]] = []
        for ext, data in components:
            name = _check_name(key, ext)
            info = _member_info(name, len(data))
            header_size = len(info.tobuf(self._tar.format, self._tar.encoding, self._tar.errors))
            offset = self._tar.offset + header_size
            self._tar.addfile(info, io.BytesIO(data))
            entries.append((ComponentLocation(ext, offset, len(data)), name))
        self._index.append(entries)
        return [loc for loc, _ in entries]

    def close(self) -> None:
        """Finish the tar, write the index and move both into place.

        Raises:
            ValueError: If no sample was added (DALI and ``wds2idx`` reject empty shards).
        """
        if self._closed:
            return
        if not self._index:
            self.abort()
            raise ValueError(f"{self.tar_path}: refusing to write an empty shard")
        self._tar.close()
        self._file.close()
        if self.idx_path is not None:
            atomic_write_bytes(self.idx_path, format_index(self._index).encode("utf-8"))
        self._target.commit()
        self._closed = True
        logger.debug("wrote %s (%d samples)", self.tar_path, len(self._index))

    def abort(self) -> None:
        """Discard the shard: close and delete the temporary file."""
        if self._closed:
            return
        self._closed = True
        self._file.close()
        self._target.discard()

    def __enter__(self) -> TarShardWriter:
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

