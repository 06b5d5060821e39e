"""A safe walk of a source tree: each real file once, nothing opened, loops and odd entries reported.

``os.walk(followlinks=True)`` lists a file once per name and descends into ``ln -s . loop`` until the
path is too long (a class folder with a loop was listed 41 times), and it lists FIFOs, devices and
sockets as files, so a reader later blocks in ``open`` on a FIFO. :class:`TreeWalker` stats every
entry instead (``stat``, never ``open``) and keeps, per tree:

* each real file (``st_dev``, ``st_ino``) once: a second name of it (a symlink or a hard link) is
  rejected as ``duplicate: same file as <first>``; the real name wins over a symlink, else the first
  in walk order (splits in order, class folders in label order, paths sorted);
* each folder once: a symlink to an enclosing folder is rejected as ``symlink loop: ...``, one to a
  folder walked elsewhere as ``duplicate folder: ...`` (neither is entered);
* FIFOs, character and block devices and sockets rejected as ``not a regular file: <kind>``, broken
  or self-referencing symlinks as ``broken symbolic link: ...``, unreadable folders as
  ``cannot read folder: ...``.

Rejections are ``(source, reason)`` pairs that the plan quarantines, so ``inputs = written +
quarantined`` still holds and each one is visible in ``quarantine.parquet``.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterable
from pathlib import Path

_KINDS = {stat.S_IFIFO: "fifo", stat.S_IFCHR: "character device", stat.S_IFBLK: "block device",
          stat.S_IFSOCK: "socket"}
Ident = tuple[int, int]


def relative_source(path: Path, root: Path) -> str:
    """Return ``path`` relative to ``root`` as a POSIX string (falls back to the absolute path)."""
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.resolve().as_posix()


def file_kind(mode: int) -> str:
    """Name the file type of an ``st_mode`` (``"fifo"``, ``"socket"``, ...)."""
    return _KINDS.get(stat.S_IFMT(mode), f"file type {stat.S_IFMT(mode):o}")


def stat_error_reason(path: Path | str, exc: OSError) -> str:
    """The rejection reason for an entry that cannot be stat'ed."""
    if exc.errno == errno.ELOOP:
        return "broken symbolic link: too many levels of symbolic links (it points to itself)"
    if exc.errno == errno.ENOENT and os.path.islink(path):
        return f"broken symbolic link: target {os.readlink(path)!r} does not exist"
    return f"cannot stat: {exc.strerror or type(exc).__name__}"


class TreeWalker:
    """Lists the regular files of a source tree, each real file once (see the module docstring).

    Args:
        root: Directory that sources (in results and reasons) are relative to.

    Attributes:
        rejected: ``(source, reason)`` of every entry not listed, in walk order (:meth:`take` empties it).
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.rejected: list[tuple[str, str]] = []
        self._files: dict[Ident, str] = {}
        self._dirs: dict[Ident, str] = {}

    def source(self, path: Path) -> str:
        """The source string of ``path`` (relative to the root)."""
        return relative_source(path, self.root)

    def take(self) -> list[tuple[str, str]]:
        """Return the rejections so far and forget them (e.g. after each split)."""
        out, self.rejected = self.rejected, []
        return out

    def _reject(self, path: Path, reason: str) -> None:
        self.rejected.append((self.source(path), reason))

    def reserve(self, folders: Iterable[Path]) -> None:
        """Register folders that are walked later (class folders), so that a link to one is a duplicate."""
        for folder in folders:
            try:
                st = os.stat(folder)
            except OSError:
                continue
            self._dirs.setdefault((st.st_dev, st.st_ino), self.source(Path(folder)))

    def _entries(self, folder: Path) -> list[os.DirEntry[str]] | None:
        try:
            with os.scandir(folder) as it:
                return sorted(it, key=lambda e: e.name)
        except OSError as exc:
            self._reject(folder, f"cannot read folder: {exc.strerror or type(exc).__name__}")
            return None

    def _stat(self, entry: os.DirEntry[str]) -> os.stat_result | None:
        try:
            return entry.stat()  # follows symlinks; never opens the file
        except OSError as exc:
            self._reject(Path(entry.path), stat_error_reason(entry.path, exc))
            return None

    def files(self, top: Path) -> list[Path]:
        """Return the regular files below ``top`` (recursively, following links), sorted by path.

        Args:
            top: Folder to walk.

        Returns:
            Paths (under ``top``, through the names they were reached by) of files not listed before.
        """
        top = Path(top)
        try:
            st = os.stat(top)
        except OSError as exc:
            self._reject(top, stat_error_reason(top, exc))
            return []
        ident = (st.st_dev, st.st_ino)
        self._dirs.setdefault(ident, self.source(top))
        found: list[tuple[bool, Path, Ident]] = []
        self._walk(top, {ident: self.source(top)}, found)
        return self._keep(found)

    def stray_files(self, folder: Path) -> list[Path]:
        """Return the regular files lying directly in ``folder`` (hidden ones ignored; others rejected)."""
        found: list[tuple[bool, Path, Ident]] = []
        for entry in self._entries(folder) or []:
            if entry.name.startswith(".") or entry.is_dir():
                continue
            st = self._stat(entry)
            if st is None:
                continue
            if stat.S_ISREG(st.st_mode):
                found.append((entry.is_symlink(), Path(entry.path), (st.st_dev, st.st_ino)))
            else:
                self._reject(Path(entry.path), f"not a regular file: {file_kind(st.st_mode)}")
        return self._keep(found)

    def _walk(self, folder: Path, ancestors: dict[Ident, str], found: list[tuple[bool, Path, Ident]]) -> None:
        for entry in self._entries(folder) or []:
            path = Path(entry.path)
            st = self._stat(entry)
            if st is None:
                continue
            ident = (st.st_dev, st.st_ino)
            if stat.S_ISREG(st.st_mode):
                found.append((entry.is_symlink(), path, ident))
            elif not stat.S_ISDIR(st.st_mode):
                self._reject(path, f"not a regular file: {file_kind(st.st_mode)}")
            elif ident in ancestors:
                self._reject(path, f"symlink loop: points to its enclosing folder {ancestors[ident]}")
            elif ident in self._dirs:
                self._reject(path, f"duplicate folder: same folder as {self._dirs[ident]} (not walked twice)")
            else:
                self._dirs[ident] = self.source(path)
                self._walk(path, {**ancestors, ident: self.source(path)}, found)

    def _keep(self, found: list[tuple[bool, Path, Ident]]) -> list[Path]:
        """Keep each real file once: real names before symlinks, then in path order."""
        keep = []
        for _, path, ident in sorted(found):
            first = self._files.get(ident)
            if first is None:
                self._files[ident] = self.source(path)
                keep.append(path)
            else:
                self._reject(path, f"duplicate: same file as {first}")
        return sorted(keep)
