"""Reading samples by byte range: the split's sample index (one columnar read) and a bounded set of open files.

:class:`SampleIndex` is built from the split manifest (``<split>.parquet``, written by ``vitpipe prep``) with
one columnar read of the columns it needs — every sample's shard, media offset and size and label — and
checked against ``dataset.json``; no per-shard ``.idx`` file is parsed. Sample ``id`` ``i`` is row ``i``
(shards in file order, samples in tar order), the numbering of :mod:`pipeline.data.order`. Its arrays take
16 bytes per sample (≈ 230 MB per process for ImageNet-21k), shared copy-on-write with forked workers.

:class:`ShardFiles` reads with ``os.pread`` through at most ``max_open`` open files per process (the least
recently used is closed first), whatever the shard count.

Tar layout relied on (:mod:`data_prep.tarwrite`): USTAR members with one 512-byte header each, a sample's
members consecutive, media first. So a sample's members span from ``offset - 512`` to the next sample's
``offset - 512`` (the end of the tar for a shard's last sample); :func:`parse_members` splits that range
into the dict webdataset would give, and the header in front of the media names the sample's key.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.data.shards import LoaderError, split_entry

logger = logging.getLogger(__name__)

TAR_BLOCK = 512


@dataclass(frozen=True, eq=False)
class SampleIndex:
    """Where every sample of a split lives (see the module docstring).

    Attributes:
        paths: Tar path of each shard, file order.
        starts: int64 ``(S+1,)``: id of each shard's first sample; ``starts[-1]`` = samples.
        shard_bytes: int64 ``(S,)``: tar sizes from ``dataset.json`` (0 when unknown, format version 1).
        offset: int64 ``(N,)``: byte offset of each sample's media data (first frame for frame sequences).
        size: int32 ``(N,)``: media bytes (sum over frames).
        label: int32 ``(N,)``: class index.
        keys: The sample keys (a pyarrow string array), only when asked for.
    """

    paths: tuple[str, ...]
    starts: np.ndarray
    shard_bytes: np.ndarray
    offset: np.ndarray
    size: np.ndarray
    label: np.ndarray
    keys: Any = None

    @property
    def num_samples(self) -> int:
        """Samples in the split."""
        return int(self.starts[-1])

    @property
    def sizes(self) -> np.ndarray:
        """Samples per shard, int64 ``(S,)``."""
        return np.diff(self.starts)

    def shard_of(self, ids: np.ndarray) -> np.ndarray:
        """The shard of each id, int64 like ``ids``."""
        return np.searchsorted(self.starts, ids, side="right") - 1

    def member_ranges(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(shard, start, stop)`` of each sample's tar members (headers included), int64 like ``ids``.

        ``stop`` of a shard's last sample is the tar's size, or -1 when unknown (read to the end of file).
        """
        ids = np.asarray(ids, np.int64)
        shard = self.shard_of(ids)
        last = ids + 1 >= self.starts[shard + 1]
        following = self.offset[np.minimum(ids + 1, self.num_samples - 1)] - TAR_BLOCK
        end = np.where(self.shard_bytes[shard] > 0, self.shard_bytes[shard], -1)
        return shard, self.offset[ids] - TAR_BLOCK, np.where(last, end, following)

    @classmethod
    def load(cls, dataset_dir: str | Path, split: str, *, keys: bool = False,
             exclude: frozenset[int] = frozenset()) -> SampleIndex:
        """Reads the split manifest (one columnar read) and checks it against ``dataset.json``.

        Args:
            dataset_dir: Directory written by ``vitpipe prep``.
            split: Split name.
            keys: Also read the ``key`` column (``vitpipe order``).
            exclude: Positions (file order) of shards to leave out (bad shards under
                ``data.on_bad_shard = "skip"``); the samples of the others are numbered from 0 again.

        Raises:
            LoaderError: If the data set, split or manifest cannot be read, or the manifest's rows do
                not list the shards of ``dataset.json`` with their sample counts, in order.
        """
        import pyarrow as pa
        import pyarrow.parquet as pq

        root = Path(dataset_dir)
        info, entry = split_entry(root, split)
        path = root / entry.manifest
        names = [s.name for s in entry.shards]
        sizes = np.array([s.num_samples for s in entry.shards], np.int64)
        starts = np.concatenate([[0], np.cumsum(sizes)])
        disagree = LoaderError(f"{path}: its rows do not list the shards of dataset.json with their sample "
                               "counts in order; re-run vitpipe prep merge")
        columns = ["shard", "offset", "bytes", "label"] + (["key"] if keys else [])
        n = int(starts[-1])
        offset, size, label = np.empty(n, np.int64), np.empty(n, np.int32), np.empty(n, np.int32)
        key_parts, pos, lookup, dictionary = [], 0, np.zeros(0, np.int64), None
        position = {name: i for i, name in enumerate(names)}
        try:
            manifest = pq.ParquetFile(path, read_dictionary=["shard"])
            if manifest.metadata.num_rows != n:
                raise disagree
            # Batch by batch into the final arrays: the peak stays at them plus one batch.
            for batch in manifest.iter_batches(batch_size=1 << 16, columns=columns, use_threads=False):
                k = batch.num_rows
                shard = batch.column(0)
                if dictionary is None or not shard.dictionary.equals(dictionary):
                    dictionary = shard.dictionary
                    lookup = np.array([position.get(str(v), -1) for v in dictionary.to_pylist()], np.int64)
                expected = np.searchsorted(starts, np.arange(pos, pos + k), side="right") - 1
                if not np.array_equal(lookup[shard.indices.to_numpy(zero_copy_only=False)], expected):
                    raise disagree
                offset[pos:pos + k] = batch.column(1).to_numpy()
                size[pos:pos + k] = batch.column(2).to_numpy()
                label[pos:pos + k] = batch.column(3).to_numpy()
                if keys:
                    key_parts.append(batch.column(4))
                pos += k
        except (OSError, ValueError, KeyError) as err:  # pyarrow's errors derive from these
            if err is disagree:
                raise
            raise LoaderError(f"{path}: cannot read the split manifest ({err}); re-run vitpipe prep merge") from err
        folder = root / split
        index = cls(
            paths=tuple(str(folder / n) for n in names),
            starts=starts,
            shard_bytes=np.array([s.bytes for s in entry.shards], np.int64),
            offset=offset, size=size, label=label,
            keys=pa.chunked_array(key_parts, pa.string()).combine_chunks() if keys else None,
        )
        return index.without(exclude) if exclude else index

    def without(self, exclude: frozenset[int]) -> SampleIndex:
        """This index less the shards at positions ``exclude`` (samples numbered from 0 again)."""
        from pipeline.data.order import ranges

        keep = np.array([i for i in range(len(self.paths)) if i not in exclude], np.int64)
        ids = ranges(self.starts[keep], self.sizes[keep])
        return SampleIndex(
            paths=tuple(self.paths[i] for i in keep.tolist()),
            starts=np.concatenate([[0], np.cumsum(self.sizes[keep])]).astype(np.int64),
            shard_bytes=self.shard_bytes[keep], offset=self.offset[ids], size=self.size[ids],
            label=self.label[ids], keys=self.keys.take(ids) if self.keys is not None else None,
        )


class ShardFiles:
    """``pread`` access to shard files through at most ``max_open`` open files (least recently used closed).

    Safe to share with forked workers: a process that did not open the files closes its inherited copies
    and opens its own.

    Attributes:
        opened: Files opened by this process so far (each counts once per open).
    """

    def __init__(self, paths: tuple[str, ...] | list[str], max_open: int = 64) -> None:
        if max_open < 1:
            raise ValueError(f"max_open must be >= 1, got {max_open}")
        self.paths, self.max_open = tuple(paths), max_open
        self._fds: OrderedDict[int, int] = OrderedDict()
        self._pid = os.getpid()
        self.opened = 0

    @property
    def open_count(self) -> int:
        """Files this object holds open now."""
        return len(self._fds) if self._pid == os.getpid() else 0

    def _fd(self, shard: int) -> int:
        if self._pid != os.getpid():  # a forked copy: the descriptors are the parent's
            self._drop()
            self._pid, self.opened = os.getpid(), 0
        fd = self._fds.get(shard)
        if fd is not None:
            self._fds.move_to_end(shard)
            return fd
        while len(self._fds) >= self.max_open:
            os.close(self._fds.popitem(last=False)[1])
        try:
            fd = os.open(self.paths[shard], os.O_RDONLY)
        except OSError as err:
            raise LoaderError(f"{self.paths[shard]}: cannot open the shard ({err.strerror})") from err
        self._fds[shard] = fd
        self.opened += 1
        return fd

    def pread(self, shard: int, offset: int, size: int) -> bytes:
        """``size`` bytes at ``offset`` of shard ``shard`` (fewer at the end of the file; ``size < 0``: to the end)."""
        fd = self._fd(shard)
        if size < 0:
            size = os.fstat(fd).st_size - offset
        data = os.pread(fd, size, offset)
        return data

    def _drop(self) -> None:
        for fd in self._fds.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds.clear()

    def close(self) -> None:
        """Closes this process's open files."""
        if self._pid == os.getpid():
            self._drop()

    def __getstate__(self) -> dict[str, Any]:  # pickled for spawned workers: without descriptors
        return {"paths": self.paths, "max_open": self.max_open}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["paths"], state["max_open"])

    def __del__(self) -> None:
        self.close()


def parse_members(data: bytes, source: str) -> dict[str, Any]:
    """Splits a sample's tar members into webdataset's sample dict.

    Args:
        data: The bytes from the sample's first member header to (at least) its last member's data; a
            zero block (end of archive) ends it early.
        source: The shard path, for messages and ``__url__``.

    Returns:
        ``{"__key__": key, "__url__": source, ext: bytes, ...}`` (``ext`` is the member name after the
        key's first dot, as webdataset splits it).

    Raises:
        LoaderError: If the bytes are not USTAR members of one sample (manifest and shard disagree).
    """
    sample: dict[str, Any] = {"__url__": source}
    pos, view = 0, memoryview(data)
    while pos + TAR_BLOCK <= len(data) and data[pos] != 0:
        header = data[pos:pos + TAR_BLOCK]
        if header[257:262] != b"ustar":
            raise LoaderError(f"{source}: no tar member header at byte range start (manifest and shard disagree)")
        name = header[:100].split(b"\0", 1)[0].decode("utf-8")
        size = int(header[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
        key, _, ext = name.partition(".")
        if sample.setdefault("__key__", key) != key:
            raise LoaderError(f"{source}: member {name} inside the byte range of sample {sample['__key__']}")
        start = pos + TAR_BLOCK
        if start + size > len(data):
            raise LoaderError(f"{source}: member {name} runs past the sample's byte range")
        sample[ext] = bytes(view[start:start + size])
        pos = start + -(-size // TAR_BLOCK) * TAR_BLOCK
    if "__key__" not in sample:
        raise LoaderError(f"{source}: empty sample byte range (manifest and shard disagree)")
    return sample


def read_sample(index: SampleIndex, files: ShardFiles, sample_id: int) -> dict[str, Any]:
    """One sample as webdataset's dict (every component), read with one ``pread``."""
    shard, start, stop = (int(v[0]) for v in index.member_ranges(np.array([sample_id])))
    data = files.pread(shard, start, stop - start if stop >= 0 else -1)
    return parse_members(data, index.paths[shard])


def read_media(index: SampleIndex, files: ShardFiles, ids: np.ndarray) -> tuple[list[np.ndarray], list[str]]:
    """The media bytes (uint8 arrays) and keys of samples ``ids``: one ``pread`` each, header included.

    The key comes from the member header in front of the media, so it names what was read.
    """
    shards = index.shard_of(ids)
    media, keys = [], []
    for sample_id, shard in zip(ids.tolist(), shards.tolist(), strict=True):
        offset, size = int(index.offset[sample_id]), int(index.size[sample_id])
        data = files.pread(shard, offset - TAR_BLOCK, size + TAR_BLOCK)
        if len(data) != size + TAR_BLOCK or data[257:262] != b"ustar":
            raise LoaderError(f"{index.paths[shard]}: sample {sample_id} is not where the manifest says")
        keys.append(data[:100].split(b"\0", 1)[0].split(b".", 1)[0].decode("utf-8"))
        media.append(np.frombuffer(data, np.uint8, offset=TAR_BLOCK))
    return media, keys
