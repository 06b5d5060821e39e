"""What the loaders check before and while they read, so that damaged or missing data is never silent.

**Before reading** (:func:`bad_shards`, one ``stat`` per shard): every shard ``dataset.json`` lists exists and
has the byte size it records. The ranks agree on the result (one all-reduce of a flag per shard), so they
all stop, or all leave out the same shards and plan the same epoch (:mod:`pipeline.data.order` plans over
the shards that are left). ``data.on_bad_shard = "error"`` (the default) stops with one line naming the
shard; ``"skip"`` leaves it out with a warning and counts it (``data/bad_shards``).

**While reading**: the ``stream`` reader counts the samples of every shard as it reads them (a truncated
shard ends early, a padded one holds more); the ``exact`` reader finds a sample that is not where the
manifest says. Under ``error`` that stops the run; under ``skip`` the shard's remaining samples are left out
(a batch may be shorter: the number of steps, and so the collectives, stay the same on every rank).

**Decoding**: a sample that fails to decode is skipped with a rate-limited warning and counted
(``data/skipped_samples``); more than ``data.max_skip_fraction`` of a window of ``data.skip_window``
samples stops the run with one line (:class:`SkipGuard`), so a data set that does not decode never spins.

**The data kind** (:func:`check_data_kind`): image recipes on video shards and video recipes on image shards
are refused before anything is built, from ``dataset.json`` and the first sample's members.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from data_prep.format import IMAGE_EXTS, META, VIDEO_EXTS, ShardInfo, is_frame_ext
from pipeline.data.shards import LoaderError, split_entry

logger = logging.getLogger(__name__)

#: Full warnings per process for samples that fail to decode; later ones are summarised.
_FULL_WARNINGS = 3
#: Seconds between two summary lines of skipped samples in one process.
_SUMMARY_EVERY_S = 30.0
#: Bad shards named one by one in a log line or an error.
_NAMED = 5


def shard_problem(root: Path, split: str, shard: ShardInfo) -> str | None:
    """What is wrong with one shard on disk against ``dataset.json`` (existence, byte size; one stat), or None."""
    path = root / split / shard.name
    try:
        size = os.stat(path).st_size
    except OSError as err:
        return f"{path}: shard missing ({err.strerror})"
    if shard.bytes and size != shard.bytes:
        what = "truncated" if size < shard.bytes else "extra data after its samples"
        return f"{path}: {size} bytes, dataset.json says {shard.bytes} ({what})"
    return None


def shard_problems(dataset_dir: str | Path, split: str, rank: int = 0, world_size: int = 1) -> list[tuple[int, str]]:
    """Checks this rank's share (every ``world_size``-th shard from ``rank``) of ``split``'s shards, a stat each.

    Returns:
        ``(shard position in file order, problem)`` for each bad shard of the share.

    Raises:
        LoaderError: If the data set or split cannot be read.
    """
    root = Path(dataset_dir)
    _, entry = split_entry(root, split)
    return [(i, problem) for i in range(rank, len(entry.shards), world_size)
            if (problem := shard_problem(root, split, entry.shards[i]))]


def _rank_and_world() -> tuple[int, int]:
    """This process's rank and the world size (0, 1 without a process group)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _agree(bad: list[int], num_shards: int) -> list[int]:
    """The union over ranks of the bad shard positions (one all-reduce of ``num_shards`` flags)."""
    from pipeline.dist import all_reduce_max

    flags = [0] * num_shards
    for i in bad:
        flags[i] = 1
    return [i for i, f in enumerate(all_reduce_max(flags)) if f]


def bad_shards(dataset_dir: str | Path, split: str, on_bad_shard: str) -> frozenset[int]:
    """The shards of ``split`` to leave out, agreed by every rank; stops under ``on_bad_shard = "error"``.

    Every rank must call it at the same point (it enters one collective).

    Args:
        dataset_dir: Directory written by ``vitpipe prep``.
        split: Split name.
        on_bad_shard: ``"error"`` or ``"skip"`` (``data.on_bad_shard``).

    Returns:
        Positions (file order) of the shards to leave out; empty when all are sound.

    Raises:
        LoaderError: Under ``"error"`` when a shard is bad (one line naming it, on every rank), and under
            ``"skip"`` when no shard is left.
    """
    root = Path(dataset_dir)
    _, entry = split_entry(root, split)
    rank, world_size = _rank_and_world()
    local = dict(shard_problems(root, split, rank, world_size))  # a share each: stats do not grow with ranks
    agreed = _agree(sorted(local), len(entry.shards))
    num_shards = len(entry.shards)
    if not agreed:
        return frozenset()
    lines = [local.get(i) or shard_problem(root, split, entry.shards[i]) or f"{split} shard {i}: bad on another rank"
             for i in agreed]  # another rank's bad shard: stat it here too, to name what is wrong
    more = f" (and {len(lines) - 1} more bad shard(s))" if len(lines) > 1 else ""
    if on_bad_shard != "skip":
        raise LoaderError(f"{lines[0]}{more}; re-run vitpipe prep, or set data.on_bad_shard = 'skip'")
    if len(agreed) == num_shards:
        raise LoaderError(f"{split}: every one of its {num_shards} shards is bad, e.g. {lines[0]}")
    for line in lines[:_NAMED]:
        logger.warning("skipping bad shard %s", line)
    if len(lines) > _NAMED:
        logger.warning("skipping %d more bad shards of %s", len(lines) - _NAMED, split)
    return frozenset(agreed)


class DataHealth:
    """Counters shared by a loader and its worker processes (shared memory, inherited by forked workers).

    Attributes:
        skipped_shards: Shards left out before reading (the same on every rank).
    """

    def __init__(self, skipped_shards: int = 0) -> None:
        self.skipped_shards = skipped_shards
        self._counts = multiprocessing.RawArray("q", 2)  # shards found bad while reading, samples skipped

    def shard_bad(self) -> None:
        """Counts a shard found bad while reading."""
        self._counts[0] += 1

    def sample_skipped(self) -> None:
        """Counts a sample that failed to decode."""
        self._counts[1] += 1

    @property
    def counts(self) -> tuple[int, int]:
        """``(shards found bad while reading, samples skipped)`` in this rank's processes."""
        return int(self._counts[0]), int(self._counts[1])


class SkipGuard:
    """Per reading process: skips a sample that fails to decode, warns (rate-limited), stops when too many fail.

    The samples are counted in consecutive windows of ``window``; once more than ``max_fraction × window``
    of one window have failed (the run need not wait for the window to end), :meth:`failed` raises.

    Args:
        max_fraction: ``data.max_skip_fraction``.
        window: ``data.skip_window``.
        health: Where skipped samples are counted for the metrics (optional).
    """

    def __init__(self, max_fraction: float, window: int, health: DataHealth | None = None) -> None:
        self.max_fraction, self.window, self.health = max_fraction, window, health
        self.seen = self.failures = self.total = 0
        self.first: str | None = None
        self._last_summary = 0.0
        self._pid = os.getpid()

    def _reset_if_forked(self) -> None:
        if self._pid != os.getpid():
            self.seen = self.failures = self.total = 0
            self.first, self._last_summary, self._pid = None, 0.0, os.getpid()

    def _tick(self) -> None:
        self.seen += 1
        if self.seen > self.window:
            self.seen, self.failures = 1, 0

    def ok(self) -> None:
        """Counts a sample that decoded."""
        self._reset_if_forked()
        self._tick()

    def failed(self, exn: BaseException, sample: str = "") -> None:
        """Counts a sample that failed to decode, warns, and raises when the window's limit is passed.

        Args:
            exn: What the decoder raised.
            sample: Names the sample (key and shard) in the messages.

        Raises:
            LoaderError: More than ``max_fraction`` of the window failed (one line, with the first error).
        """
        self._reset_if_forked()
        self._tick()
        self.failures += 1
        self.total += 1
        if self.health is not None:
            self.health.sample_skipped()
        message = f"{type(exn).__name__}: {exn}".splitlines()[0] if str(exn) else type(exn).__name__
        message = f"{sample}: {message}" if sample else message
        self.first = self.first or message
        if self.failures > self.max_fraction * self.window:
            raise LoaderError(
                f"{self.failures} of the last {self.seen} samples failed to decode (more than "
                f"data.max_skip_fraction = {self.max_fraction:g} of data.skip_window = {self.window}); "
                f"first error: {self.first}")
        now = time.monotonic()
        if self.total <= _FULL_WARNINGS:
            logger.warning("skipped a sample that failed to decode or augment: %s", message)
        elif now - self._last_summary >= _SUMMARY_EVERY_S:
            logger.warning("skipped %d samples that failed to decode or augment in this process so far "
                           "(latest: %s)", self.total, message)
        else:
            return
        self._last_summary = now


@dataclass
class ReadPolicy:
    """How a loader treats bad shards and samples that fail to decode (the ``data.*`` keys of that name).

    Attributes:
        on_bad_shard: ``"error"`` or ``"skip"``.
        max_skip_fraction: Decode failures tolerated per window.
        skip_window: Samples per window.
        exclude: Shards (positions in file order) left out before reading (:func:`bad_shards`).
        health: The counters shared with the loader's workers.
    """

    on_bad_shard: str = "error"
    max_skip_fraction: float = 0.1
    skip_window: int = 1000
    exclude: frozenset[int] = frozenset()
    health: DataHealth = field(default_factory=DataHealth)
    _seen: set[str] = field(default_factory=set, repr=False)  # bad shards already counted in this process

    def guard(self) -> SkipGuard:
        """A decode-failure guard counting into :attr:`health`."""
        return SkipGuard(self.max_skip_fraction, self.skip_window, self.health)

    def shard_bad(self, problem: str, url: str) -> None:
        """A shard found bad while reading: raises under ``error``; under ``skip`` warns once per process and counts.

        Raises:
            LoaderError: Under ``on_bad_shard = "error"``.
        """
        if self.on_bad_shard != "skip":
            raise LoaderError(f"{problem}; re-run vitpipe prep, or set data.on_bad_shard = 'skip'")
        if url not in self._seen:
            self._seen.add(url)
            self.health.shard_bad()
            logger.warning("skipping the rest of bad shard %s", problem)


def worker_error(err: BaseException) -> LoaderError | None:
    """The one-line :class:`LoaderError` inside a DataLoader worker's re-raised exception, if it is one.

    PyTorch re-raises a worker's exception with the worker's whole traceback as its message; the user
    needs its last line.
    """
    if not isinstance(err, LoaderError):
        return None
    text = str(err)
    if not text.startswith("Caught "):
        return err
    for line in reversed(text.strip().splitlines()):
        if "LoaderError: " in line:
            return LoaderError(line.split("LoaderError: ", 1)[1])
    return LoaderError(text.strip().splitlines()[-1])


# ------------------------------------------------------------------ the data kind


def model_takes_video(model_name: str) -> bool:
    """Whether a registered model takes clips (``B×3×T×H×W``): the ``…_video`` models."""
    return model_name.endswith("_video")


def first_sample_members(tar_path: str | Path, limit: int = 256) -> list[str]:
    """The member extensions of a shard's first sample, read from its tar headers (no media is read)."""
    exts, key = [], None
    try:
        with tarfile.open(tar_path, mode="r:") as tar:
            for _ in range(limit):
                member = tar.next()
                if member is None:
                    break
                k, _, ext = member.name.partition(".")
                if key is not None and k != key:
                    break
                key = k
                exts.append(ext)
    except (OSError, tarfile.TarError) as err:
        raise LoaderError(f"{tar_path}: cannot read the shard's first sample ({err})") from err
    return exts


def _components_kind(exts: list[str]) -> str | None:
    """``image``, ``video`` or None (neither) from a sample's member extensions."""
    if any(e in VIDEO_EXTS for e in exts) or (any(is_frame_ext(e) for e in exts) and META in exts):
        return "video"
    if any(e in IMAGE_EXTS for e in exts):
        return "image"
    return None


def check_data_kind(dataset_dir: str | Path, split: str, model_name: str) -> str:
    """Refuses a recipe whose model takes another kind of input than the shards hold (images vs clips).

    Reads ``dataset.json`` and the member headers of the split's first sample (a few kB).

    Returns:
        The data kind, ``"image"`` or ``"video"``.

    Raises:
        LoaderError: One line naming the model, the data set and what each holds.
    """
    root = Path(dataset_dir)
    info, entry = split_entry(root, split)
    wants = "video" if model_takes_video(model_name) else "image"
    if info.kind != wants:
        raise LoaderError(
            f"model.name = {model_name!r} takes {'video clips' if wants == 'video' else 'images'} but "
            f"data.path = {str(root)!r} holds {info.kind} shards (dataset.json kind {info.kind!r}): use "
            f"{'a video' if wants == 'video' else 'an image'} data set or "
            f"{'an image' if wants == 'image' else 'a video'} model")
    if entry.shards:
        first = root / split / entry.shards[0].name
        if first.is_file():  # a missing shard is the shard check's to report
            exts = first_sample_members(first)
            found = _components_kind(exts)
            if found != info.kind:
                raise LoaderError(f"{first}: dataset.json says {info.kind} but its first sample has members "
                                  f"{sorted(exts)} ({found or 'neither image nor video'}); re-run vitpipe prep")
    return info.kind

