"""Shard lists and the ``stream`` mode's epoch planning, shared by both loader backends (``wds`` and ``dali``).

A split is the list of shards ``dataset.json`` names (:func:`read_split`). With ``data.sampler = "stream"``
both backends plan an epoch the same way: the shard permutation of ``(seed, epoch)``
(:func:`epoch_shard_order`), the same number of batches on every rank (:func:`steps_per_epoch`), and a
refusal when ranks × workers would leave a worker without a shard (:func:`check_shards`). The ``exact``
mode's plan is :mod:`pipeline.data.order`. Dataset problems surface as :class:`LoaderError`, one line for
the user.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_prep.format import DatasetInfo, FormatError, SplitInfo, load_dataset_info


class LoaderError(ValueError):
    """A user-fixable problem with the data set or the loader settings."""


@dataclass(frozen=True)
class Shard:
    """One tar shard of a split."""

    url: str
    """Path of the tar file."""
    num_samples: int
    """Samples it holds (from ``dataset.json``)."""


def read_split(dataset_dir: str | Path, split: str,
               exclude: frozenset[int] = frozenset()) -> tuple[list[Shard], list[str]]:
    """Lists a split's shards and the class ids from ``dataset.json``.

    Args:
        dataset_dir: Directory written by ``vitpipe prep``.
        split: Split name, e.g. ``"train"``.
        exclude: Positions (file order) of shards to leave out (``data.on_bad_shard = "skip"``).

    Returns:
        The shards in file order, and the class ids in label order.

    Raises:
        LoaderError: If the data set cannot be read or has no such split.
    """
    info, entry = split_entry(dataset_dir, split)
    folder = Path(dataset_dir) / split
    shards = [Shard(str(folder / s.name), s.num_samples) for i, s in enumerate(entry.shards) if i not in exclude]
    return shards, list(info.classes)


def split_entry(dataset_dir: str | Path, split: str) -> tuple[DatasetInfo, SplitInfo]:
    """``dataset.json`` and one split's entry, a format problem as one :class:`LoaderError` line."""
    try:
        info = load_dataset_info(Path(dataset_dir))
        return info, info.split(split)
    except FormatError as err:
        raise LoaderError(str(err)) from err


def epoch_shard_order(shards: list[Shard], seed: int, epoch: int) -> list[Shard]:
    """The shard permutation of one epoch, the same on every rank and worker."""
    rng = np.random.default_rng([seed, epoch])
    return [shards[i] for i in rng.permutation(len(shards))]


def check_shards(shards: list[Shard], split: str, world_size: int, num_workers: int, resample: bool) -> None:
    """Refuses a split with fewer shards than ranks × workers (some worker would get none) unless resampling."""
    workers = max(num_workers, 1)
    if len(shards) < world_size * workers and not resample:
        raise LoaderError(
            f"{split} has {len(shards)} shards but {world_size} ranks × {workers} workers need at least "
            f"{world_size * workers}: re-shard with a smaller --shard-size, lower data.num_workers, or set "
            "data.resample_shards = true (shards are then drawn with repetition within an epoch)")


def steps_per_epoch(shards: list[Shard], split: str, world_size: int, batch_size: int) -> int:
    """``samples // (ranks × batch)``: the same number of batches on every rank."""
    total = sum(s.num_samples for s in shards)
    steps = total // (world_size * batch_size)
    if steps == 0:
        raise LoaderError(f"{split} has {total} samples, fewer than one global batch of "
                          f"{world_size} × {batch_size}: lower data.batch_size")
    return steps


def seed_of(*parts: int) -> int:
    """A 32-bit seed from integers, the same in every process (unlike ``hash`` of strings)."""
    return zlib.crc32("/".join(map(str, parts)).encode())
