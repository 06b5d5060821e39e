r"""Deterministic WebDataset tar writer that writes the DALI index alongside.

The tar is byte-identical for identical input: every member header has fixed fields (mtime 0, uid/gid
0, empty uname/gname, mode 0o644, regular file, USTAR format) and members are written in the order
given. The tar and its index are written to hidden temporary files in the target directory and moved
into place with ``os.replace`` on :meth:`TarShardWriter.close`, so a reader never sees a partial shard.

Index format (what NVIDIA DALI's ``wds2idx`` writes and ``fn.readers.webdataset`` reads)::

    v1.2 <number of samples>
    <ext> <data offset> <size> <member name> [<ext> <data offset> <size> <member name> ...]

one line per sample, one ``ext offset size name`` group per component, all separated by single
spaces, each line ending in ``\\n``. The offset is that of the member's data (its header offset + 512),
and the extension is everything after the first dot of the member's base name.
"""

from __future__ import annotations

import io
import logging
import os
import tarfile
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

logger = logging.getLogger(__name__)

#: Version tag of the DALI webdataset index format written by ``wds2idx`` (DALI 2.x).
INDEX_VERSION = "v1.2"
#: Tar member header format; USTAR gives exactly one 512-byte header per member (names < 100 bytes).
TAR_FORMAT = tarfile.USTAR_FORMAT
_MAX_NAME = 99
#: Permissions of written files (``mkstemp`` would leave them at 0o600, unreadable to other users).
FILE_MODE = 0o644


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


def format_index(samples: Sequence[Sequence[tuple[ComponentLocation, str]]]) -> str:
    """Render a DALI webdataset index (``wds2idx`` format) as text.

    Args:
        samples: Per sample, its components in tar order as ``(location, member name)`` pairs.

    Returns:
        The index file contents.
    """
    lines = [f"{INDEX_VERSION} {len(samples)}"]
    for components in samples:
        lines.append(" ".join(f"{loc.ext} {loc.offset} {loc.size} {name}" for loc, name in components))
    return "\n".join(lines) + "\n"


class TarShardWriter:
    """Write one WebDataset shard (``.tar``) and, optionally, its DALI index (``.idx``).

    Use as a context manager; leaving the block normally commits both files, leaving it with an
    exception removes the temporary files.

    Example:
        >>> with TarShardWriter(Path("train-000000.tar"), Path("train-000000.idx")) as w:
        ...     locs = w.add_sample("train_00000000", [("jpg", jpeg_bytes), ("cls", b"3")])
    """

    def __init__(self, tar_path: Path, idx_path: Path | None = None) -> None:
        """Open hidden temporary files next to ``tar_path``.

        Args:
            tar_path: Final path of the shard.
            idx_path: Final path of the DALI index, or None to write no index.
        """
        self.tar_path = Path(tar_path)
        self.idx_path = None if idx_path is None else Path(idx_path)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.tar_path.name}.", suffix=".tmp", dir=self.tar_path.parent)
        os.fchmod(fd, FILE_MODE)
        self._tmp_path = Path(tmp)
        self._file = os.fdopen(fd, "wb")
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
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        if self.idx_path is not None:
            _atomic_write_text(self.idx_path, format_index(self._index))
        os.replace(self._tmp_path, self.tar_path)
        self._closed = True
        logger.debug("wrote %s (%d samples)", self.tar_path, len(self._index))

    def abort(self) -> None:
        """Discard the shard: close and delete the temporary file."""
        if self._closed:
            return
        self._closed = True
        self._file.close()
        self._tmp_path.unlink(missing_ok=True)

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


def _atomic_write_text(path: Path, text: str) -> None:
    r"""Write ``text`` (UTF-8, ``\\n`` line ends) to ``path`` through a temporary file and ``os.replace``."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary file in the same directory, fsync, ``os.replace``).

    Args:
        path: Destination file.
        data: File contents.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, FILE_MODE)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
