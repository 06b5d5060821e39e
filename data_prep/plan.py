"""The deterministic plan of a prep run: which input goes to which shard, under which key.

Every shard is a pure function of its planned inputs and the encoding options, so shards can be
written in any order, by any number of processes or Slurm array tasks, skipped when already complete
(resume), and merged afterwards. Keys count positions in the planned order of a split
(``train_00000042`` is the 43rd planned input), so a quarantined input leaves a gap in the keys rather
than shifting every later sample into another shard.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from data_prep.errors import PrepError
from data_prep.format import shard_name
from data_prep.scan import Sample

_SPLIT_RE = re.compile(r"^[A-Za-z0-9_-]+$")


def check_split_name(split: str) -> None:
    """Raise PrepError for a split name that cannot be used in file names and keys."""
    if not _SPLIT_RE.match(split):
        raise PrepError(f"invalid split name {split!r}: use letters, digits, '_' and '-' only")


def order_samples(samples: Sequence[Sample], seed: int, shuffle: bool) -> list[Sample]:
    """Sort samples by (label, source, window), then optionally apply a seeded global permutation.

    Sorting first makes the result independent of the order the caller listed the files in; the
    permutation (``numpy.random.default_rng(seed)``) makes every shard mix classes.
    """
    ordered = sorted(samples, key=lambda s: (s.label, s.source, s.start or 0.0, s.end or 0.0))
    if not shuffle:
        return ordered
    perm = np.random.default_rng(seed).permutation(len(ordered))
    return [ordered[i] for i in perm]


@dataclass(frozen=True)
class ShardTask:
    """One shard to write: its split, index and planned inputs.

    Attributes:
        split: Split name.
        index: Shard index within the split.
        first: Position of ``items[0]`` in the split's planned order (its key number).
        items: Planned inputs, in output order.
        digest: Hash of the inputs and the encoding options; a finished shard with another digest is
            rewritten on resume.
    """

    split: str
    index: int
    first: int
    items: tuple[Sample, ...]
    digest: str

    @property
    def name(self) -> str:
        """Shard file name, e.g. ``train-000003.tar``."""
        return shard_name(self.split, self.index)


def _item_record(s: Sample) -> list[Any]:
    return [s.source, s.label, s.class_id, s.start, s.end]


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def shard_digest(kind: str, options: dict[str, Any], split: str, index: int, first: int,
                 items: Sequence[Sample]) -> str:
    """The digest of one shard: its inputs (source, label, class, window), position and the options.

    A shard's sidecar records it; resume and merge compare it with the plan's, and array tasks check the
    rows they read from the plan file against it.
    """
    return records_digest(kind, options, split, index, first, [_item_record(s) for s in items])


def records_digest(kind: str, options: dict[str, Any], split: str, index: int, first: int,
                   records: Sequence[Sequence[Any]]) -> str:
    """:func:`shard_digest` from the inputs' ``[source, label, class_id, start, end]`` records."""
    return _digest([kind, options, split, index, first, records])


@dataclass
class Plan:
    """The whole run: classes, ordered inputs per split, shard boundaries and options.

    Attributes:
        kind: ``"image"`` or ``"video"``.
        classes: Class ids in label order.
        splits: Split name -> planned inputs in output order (already ordered/shuffled).
        shard_size: Planned inputs per shard (the last shard of a split may hold fewer).
        options: Encoding and ordering options; part of every shard digest and of ``dataset.json``.
        class_names: Human-readable class names in label order, or None.
        prequarantined: Split name -> ``(source, reason)`` of inputs rejected while scanning
            (no image extension, file named by the annotations missing, ...).
    """

    kind: str
    classes: list[str]
    splits: dict[str, list[Sample]]
    shard_size: int
    options: dict[str, Any]
    class_names: list[str] | None = None
    prequarantined: dict[str, list[tuple[str, str]]] = field(default_factory=dict)

    _shards: list[ShardTask] | None = field(default=None, init=False, repr=False, compare=False)
    _digests: dict[tuple[str, int], str] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.shard_size < 1:
            raise PrepError(f"shard size must be at least 1, got {self.shard_size}")
        for split, items in self.splits.items():
            check_split_name(split)
            bad = next((s for s in items if not 0 <= s.label < len(self.classes)
                        or self.classes[s.label] != s.class_id), None)
            if bad is not None:
                raise PrepError(f"{bad.source}: label {bad.label} does not match class {bad.class_id!r}")

    def shards(self) -> list[ShardTask]:
        """All shards of all splits, in split order then shard order (the global shard list; computed once)."""
        if self._shards is None:
            self._shards = list(self.iter_shards())
        return self._shards

    def iter_shards(self) -> Iterator[ShardTask]:
        """The shards of :meth:`shards` one at a time, without keeping the list."""
        for split, items in self.splits.items():
            for index, first in enumerate(range(0, len(items), self.shard_size)):
                chunk = tuple(items[first : first + self.shard_size])
                yield ShardTask(split, index, first, chunk, self.digest(split, index))

    def num_shards(self, split: str) -> int:
        """Shards of a split (the last may hold fewer than ``shard_size`` inputs)."""
        return -(-len(self.splits[split]) // self.shard_size)

    def digest(self, split: str, index: int) -> str:
        """The :func:`shard_digest` of one shard (computed once)."""
        key = (split, index)
        if key not in self._digests:
            first = index * self.shard_size
            items = self.splits[split][first : first + self.shard_size]
            self._digests[key] = shard_digest(self.kind, self.options, split, index, first, items)
        return self._digests[key]

    def num_inputs(self, split: str) -> int:
        """Inputs of a split: planned items plus those rejected while scanning."""
        return len(self.splits[split]) + len(self.prequarantined.get(split, []))

    def describe(self, digests: dict[str, list[str]] | None = None) -> dict[str, Any]:
        """The JSON-serialisable record that ``prep merge`` needs (stored as ``_parts/plan.json``).

        Args:
            digests: Split -> the digest of each shard, when the caller computed them (else computed here).
        """
        return {
            "kind": self.kind,
            "classes": self.classes,
            "class_names": self.class_names,
            "options": self.options,
            "shard_size": self.shard_size,
            "splits": {
                split: {
                    "inputs": self.num_inputs(split),
                    "shards": (digests[split] if digests is not None
                               else [self.digest(split, i) for i in range(self.num_shards(split))]),
                    "prequarantined": [list(x) for x in self.prequarantined.get(split, [])],
                }
                for split in self.splits
            },
        }


def task_range(num_shards: int, task_index: int, num_tasks: int) -> range:
    """The contiguous slice of the global shard list that array task ``task_index`` writes.

    Args:
        num_shards: Shards in the whole plan.
        task_index: This task's index, ``0 <= task_index < num_tasks``.
        num_tasks: Number of tasks the work is split over.

    Returns:
        Global shard positions of this task; the ranges of all tasks are disjoint and cover everything.
    """
    if num_tasks < 1 or not 0 <= task_index < num_tasks:
        raise PrepError(f"task index {task_index} out of range for {num_tasks} task(s)")
    return range(task_index * num_shards // num_tasks, (task_index + 1) * num_shards // num_tasks)
