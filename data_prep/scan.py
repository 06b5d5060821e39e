"""Scanning of ImageNet / ImageFolder style directory trees.

Layout: ``<split_dir>/<class_id>/<file>``, where files may also sit in nested sub-folders of a class
folder (torchvision's ``ImageFolder`` and timm's folder reader walk class folders recursively).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from data_prep.errors import PrepError
from data_prep.walk import TreeWalker

logger = logging.getLogger(__name__)

#: Accepted image file extensions, compared case-insensitively (TIFF is converted to PNG).
IMAGE_EXTENSIONS: frozenset[str] = frozenset({".jpg", ".jpeg", ".png", ".tif", ".tiff"})


@dataclass(frozen=True)
class Sample:
    """One image of a split, before it is written to a shard.

    Attributes:
        path: Absolute or caller-relative path of the source file.
        label: Class index (position of ``class_id`` in the class list).
        class_id: Class folder name, e.g. ``"n01440764"``.
        source: POSIX path of the file relative to the source root, e.g.
            ``"train/n01440764/n01440764_10026.JPEG"``; recorded in the manifest and sample JSON.
        start: Videos only: start of the annotated time window in seconds (None: from the start).
        end: Videos only: end of the annotated time window in seconds (None: to the end).
    """

    path: Path
    label: int
    class_id: str
    source: str
    start: float | None = None
    end: float | None = None


def list_class_dirs(split_dir: Path) -> list[str]:
    """Return the sorted class folder names of a split directory.

    The order is plain ``sorted()`` on the folder names, as torchvision's ``find_classes`` does. timm's
    folder reader sorts with a natural key instead; the two agree whenever class names have equal length
    (e.g. ImageNet WordNet ids).

    Args:
        split_dir: Directory holding one folder per class.

    Returns:
        Sorted class folder names (hidden folders, starting with ``"."``, are ignored).

    Raises:
        PrepError: If ``split_dir`` is missing, not a directory, or holds no class folders.
    """
    if not split_dir.is_dir():
        raise PrepError(f"{split_dir}: no such directory (expected <split>/<class-id>/<image files>)")
    classes = sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise PrepError(f"{split_dir}: no class folders (expected {split_dir}/<class-id>/<image files>)")
    return classes


def is_image_file(path: Path) -> bool:
    """Return True if ``path`` has an accepted image extension (case-insensitive)."""
    return path.suffix.lower() in IMAGE_EXTENSIONS


def _relative_source(path: Path, root: Path) -> str:
    """Return ``path`` relative to ``root`` as a POSIX string (falls back to the absolute path)."""
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.resolve().as_posix()


def scan_imagefolder(
    split_dir: Path,
    classes: Sequence[str] | None = None,
    root: Path | None = None,
    ignored: list[str] | None = None,
    walker: TreeWalker | None = None,
) -> tuple[list[str], list[Sample]]:
    """Scan an ImageFolder split directory.

    Args:
        split_dir: Directory laid out as ``<split_dir>/<class_id>/<file>``. Files with extensions other
            than .jpg/.jpeg/.png/.tif/.tiff (any case) are skipped, counted and reported in a warning.
        classes: Class list that defines the labels (e.g. the train classes when scanning val). When
            None, the sorted class folders of ``split_dir`` are used.
        root: Directory that ``Sample.source`` paths are relative to; defaults to ``split_dir.parent``
            so sources look like ``"train/<class_id>/<file>"``.
        ignored: When given, the sources of files left out (no image extension, or outside class
            folders) are appended to it, so the caller can quarantine them instead of losing them.
        walker: The walk of the whole source tree (one per tree, shared by its splits, so that a file
            reached under two names is listed once); entries it rejects (symlink loops, second names of
            a file, FIFOs, devices, sockets) are in ``walker.rejected``. None: a walk of this split only,
            whose rejections are logged.

    Returns:
        ``(classes, samples)``: the class list that defines the labels, and the samples sorted by
        class index then path.

    Raises:
        PrepError: If the directory is missing or empty, holds no image files, or (with ``classes``
            given) holds a class folder that is not in ``classes``.
    """
    split_dir = Path(split_dir)
    root = split_dir.parent if root is None else Path(root)
    folders = list_class_dirs(split_dir)
    class_list = list(folders) if classes is None else list(classes)
    index = {name: i for i, name in enumerate(class_list)}
    unknown = [name for name in folders if name not in index]
    if unknown:
        raise PrepError(
            f"{split_dir}: {len(unknown)} class folder(s) not in the train classes, "
            f"e.g. {unknown[0]!r}; val classes must be a subset of train classes"
        )
    samples: list[Sample] = []
    own_walker = walker is None
    walker = TreeWalker(root) if walker is None else walker
    walker.reserve(split_dir / name for name in folders)
    left_out = [_relative_source(p, root) for p in walker.stray_files(split_dir)]
    for name in sorted(folders, key=index.__getitem__):
        files = walker.files(split_dir / name)
        images = [p for p in files if is_image_file(p)]
        left_out.extend(_relative_source(p, root) for p in files if not is_image_file(p))
        if not images:
            logger.warning("%s: class folder %r holds no image files", split_dir, name)
        samples.extend(Sample(p, index[name], name, _relative_source(p, root)) for p in images)
    if left_out:
        logger.warning(
            "%s: skipped %d file(s) without an image extension (%s) or outside class folders",
            split_dir, len(left_out), "/".join(sorted(IMAGE_EXTENSIONS)),
        )
        if ignored is not None:
            ignored.extend(left_out)
    if own_walker and walker.rejected:
        logger.warning("%s: %d entries not listed (symlink loops, second names of a file, non-regular files), "
                       "e.g. %s: %s", split_dir, len(walker.rejected), *walker.rejected[0])
    if not samples:
        raise PrepError(f"{split_dir}: no image files (.jpg/.jpeg/.png) found in its class folders")
    logger.info("%s: %d images in %d class folders", split_dir, len(samples), len(folders))
    return class_list, samples
