"""Deterministic WebDataset tar writer that writes the DALI index alongside.

The tar is byte-identical for identical input: every member header has fixed fields (mtime 0, uid/gid
0, empty uname/gname, mode 0o644, regular file, USTAR format) and members are written in the order
given. Each header is built once, from a fixed template (:func:`member_header`), and written with its
data and padding straight to the file: the bytes are those ``tarfile`` writes for the same members
(tested), a header costs about a tenth of ``TarInfo.tobuf``, and no per-member object is kept. The tar
and its index are written to hidden temporary files in the target directory and moved into place on
:meth:`TarShardWriter.close` (:class:`data_prep.format.AtomicPath`), so a reader never sees a partial
shard. The index format is :func:`data_prep.format.format_index`.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import tarfile
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from data_prep.errors import PrepError
from data_prep.format import AtomicPath, ComponentLocation, atomic_write_bytes, format_index

logger = logging.getLogger(__name__)

#: Tar member header format; USTAR gives exactly one 512-byte header per member (names < 100 bytes).
TAR_FORMAT = tarfile.USTAR_FORMAT
_MAX_NAME = 99


#: OS errors that mean the output cannot be written (rather than a bad input): reported on one line.
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.EFBIG})


def storage_errno(err: BaseException) -> int | None:
    """The errno of ``err`` if it is an OS error writing output (full disk, quota, I/O), else None.

    pyarrow's ``OSError`` carries no errno, only the message; that is matched too.
    """
    if not isinstance(err, OSError):
        return None
    if err.errno in STORAGE_ERRNOS:
        return err.errno
    return errno.ENOSPC if "No space left on device" in str(err) else None


def storage_error(err: OSError, path: Path | str) -> PrepError:
    """A one-line :class:`PrepError` naming ``path`` (or the file in ``err``), the error and the space left.

    Args:
        err: The OS error (see :func:`storage_errno`).
        path: The file being written when it happened.

    Returns:
        ``no space left on device writing <path> (N MB free)`` or the like, to raise ``from None``.
    """
    code = storage_errno(err) or errno.EIO
    target = Path(err.filename or path)
    probe = target
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        free = f" ({shutil.disk_usage(probe).free / 1e6:.1f} MB free)"
    except OSError:
        free = ""
    return PrepError(f"{os.strerror(code).lower()} writing {target}{free}")


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


#: Tar block size; every header is one block and every member's data is padded to a whole block.
BLOCK = tarfile.BLOCKSIZE
#: ``tar -b20`` record size: the archive ends with two zero blocks and is padded to a whole record.
RECORD = tarfile.RECORDSIZE
_MAX_SIZE = 8**11 - 1  # an 11-digit octal size field (8 GiB); USTAR cannot store more


def _octal(n: int, digits: int) -> bytes:
    """A USTAR number field: ``digits - 1`` octal digits and a NUL (``tarfile.itn`` for in-range values)."""
    return b"%0*o\0" % (digits - 1, n)


#: Header bytes after the name, size and checksum fields: they are the same for every member.
_MODE_UID_GID = _octal(0o644, 8) + _octal(0, 8) + _octal(0, 8)  # offsets 100..123
_MTIME = _octal(0, 12)  # offsets 136..147
_TAIL = (tarfile.REGTYPE + b"\0" * 100 + tarfile.POSIX_MAGIC  # type, linkname, "ustar\0" + "00"
         + b"\0" * 32 + b"\0" * 32  # uname, gname
         + b"\0" * 8 + b"\0" * 8  # devmajor, devminor (empty for regular files, as tarfile writes them)
         + b"\0" * 155 + b"\0" * 12)  # prefix, padding to 512 bytes
#: Sum of the fixed bytes, and of the checksum field read as 8 spaces (how the checksum is defined).
_FIXED_SUM = sum(_MODE_UID_GID) + sum(_MTIME) + sum(_TAIL) + 8 * ord(" ")


def member_header(name: bytes, size: int) -> bytes:
    """Return the 512-byte USTAR header of a regular file with the fixed fields of this writer.

    The result equals ``tarfile.TarInfo.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")`` for a
    ``TarInfo`` with this name and size, mode 0o644, uid/gid 0, mtime 0 and empty user/group names.

    Args:
        name: Member name, UTF-8, at most 99 bytes.
        size: Data size in bytes.

    Returns:
        The header block.
    """
    if not 0 <= size <= _MAX_SIZE:
        raise ValueError(f"member size {size} does not fit a USTAR header")
    name_field = name + b"\0" * (100 - len(name))
    size_field = _octal(size, 12)
    chksum = _FIXED_SUM + sum(name) + sum(size_field)
    return b"".join((name_field, _MODE_UID_GID, size_field, _MTIME, b"%06o\0 " % chksum, _TAIL))


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
        self._offset = 0
        self._index: list[list[tuple[ComponentLocation, str]]] = []
        self._closed = False

    @property
    def num_samples(self) -> int:
        """Number of samples added so far."""
        return len(self._index)

    @property
    def bytes_written(self) -> int:
        """Bytes written to the tar so far (headers and padding included, end-of-archive excluded)."""
        return self._offset

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
            size = len(data)
            self._file.write(member_header(name.encode("utf-8"), size))
            self._file.write(data)
            pad = -size % BLOCK
            if pad:
                self._file.write(b"\0" * pad)
            entries.append((ComponentLocation(ext, self._offset + BLOCK, size), name))
            self._offset += BLOCK + size + pad
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
        end = self._offset + 2 * BLOCK  # two zero blocks end the archive, then zeros to a whole record
        self._file.write(b"\0" * (end - self._offset + (-end % RECORD)))
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
        try:
            self._file.close()  # flushes: on a full disk this raises ENOSPC again
        except OSError as err:
            logger.debug("%s: closing the discarded shard: %s", self.tar_path, err)
        finally:
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

