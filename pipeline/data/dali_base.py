"""What both DALI graphs (images and video) share: the index-driven sample reader and the RandAugment spec.

The ``.idx`` beside each tar (written by ``vitpipe prep``, format in :mod:`data_prep.format`) gives every
component's byte range, so samples are read with ``pread`` in the order Python planned and fed to DALI
through ``fn.external_source``.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_prep.format import IMAGE_EXTS, LBL, FormatError, read_index
from pipeline.data.shards import LoaderError, Shard

logger = logging.getLogger(__name__)


def read_shard_index(shard: Shard) -> list[dict[str, tuple[int, int]]]:
    """The ``.idx`` beside a shard's tar, checked against ``dataset.json``'s sample count.

    Returns:
        One ``{ext: (offset, size)}`` per sample, in tar order.

    Raises:
        LoaderError: If the index is unreadable, malformed or lists another number of samples.
    """
    try:
        entries = read_index(Path(shard.url).with_suffix(".idx"))
    except FormatError as err:
        raise LoaderError(str(err)) from err
    if len(entries) != shard.num_samples:
        raise LoaderError(f"{shard.url}: index lists {len(entries)} samples, dataset.json {shard.num_samples}")
    return entries


@dataclass(frozen=True)
class ShardIndex:
    """Byte ranges of one shard's images and labels."""

    path: str
    image: np.ndarray
    """``N×2`` int64 (offset, size) of each sample's jpg/png."""
    label: np.ndarray
    """``N×2`` int64 (offset, size) of each sample's ``lbl`` (int64 little-endian) component."""

    @classmethod
    def load(cls, shard: Shard) -> ShardIndex:
        """Reads the ``.idx`` beside a shard's tar."""
        entries = read_shard_index(shard)
        try:
            image = [next((e[ext] for ext in IMAGE_EXTS if ext in e), None) for e in entries]
            return cls(shard.url, np.array(image, dtype=np.int64), np.array([e[LBL] for e in entries], np.int64))
        except (KeyError, TypeError, ValueError) as err:
            raise LoaderError(f"{shard.url}: a sample lacks a jpg/png or lbl component ({err}); "
                              "the dali backend reads image shards written by `vitpipe prep`") from err


class SampleReader:
    """Reads image bytes and labels by ``(shard, sample)`` with ``pread`` (file handles kept open)."""

    def __init__(self, shards: list[ShardIndex]) -> None:
        self.shards = shards
        self._fds: dict[int, int] = {}

    def _fd(self, shard: int) -> int:
        if shard not in self._fds:
            self._fds[shard] = os.open(self.shards[shard].path, os.O_RDONLY)
        return self._fds[shard]

    def read_raw(self, refs: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """``refs`` is ``n×2`` (shard, sample); returns the bytes of each sample's two indexed ranges."""
        first, second = [], []
        for shard, sample in refs:
            fd, idx = self._fd(int(shard)), self.shards[int(shard)]
            for ranges, out in ((idx.image, first), (idx.label, second)):
                offset, size = ranges[sample]
                out.append(np.frombuffer(os.pread(fd, int(size), int(offset)), dtype=np.uint8))
        return first, second

    def read_ranges(self, shard: int, ranges: np.ndarray) -> list[np.ndarray]:
        """The bytes of ``ranges`` (``n×2`` offset, size) of one shard."""
        fd = self._fd(shard)
        return [np.frombuffer(os.pread(fd, int(size), int(offset)), dtype=np.uint8) for offset, size in ranges]

    def read(self, refs: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """``refs`` is ``n×2`` (shard, sample); returns the encoded images and the ``1``-element labels."""
        images, labels = self.read_raw(refs)
        return images, [raw.view("<i8").astype(np.int64) for raw in labels]

    def close(self) -> None:
        """Closes the open shard files."""
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def parse_randaugment(config: str) -> tuple[int, int]:
    """``rand-m9-n2-mstd0.5-inc1`` → ``(n, m)``; DALI has no magnitude noise (``mstd``), logged once."""
    fields = dict(re.findall(r"(mstd|inc|m|n|w|p)([\d.]+)", config))
    if "mstd" in fields and float(fields["mstd"]) > 0:
        logger.info("dali RandAugment: magnitude noise mstd=%s is not available in DALI; using a fixed m",
                    fields["mstd"])
    return int(fields.get("n", 2)), int(float(fields.get("m", 9)))
