"""The plan file: a run's plan written once, of which every array task reads only its own slice.

Scanning a source tree and planning it is the expensive, whole-dataset part of a prep run (ImageNet-21k:
14 M files, minutes of directory walking and gigabytes of ``Sample`` objects). It is done once per
output directory, by whichever runs first of ``vitpipe prep ... --slurm`` (at submission),
``--plan-only``, or the first array task; the others read the result:

``<out>/_parts/plan.parquet``
    One row per planned input (columns :data:`PLAN_COLUMNS`), in global shard order (splits in plan
    order, then shard order). Row groups hold whole shards (:data:`ROWS_PER_GROUP` rows, rounded down
    to a multiple of the shard size), so an array task reads the row groups of its shard range and
    never the rest.
``<out>/_parts/plan.json``
    What the merge needs (classes, options, per split the input count, the digest of every shard and
    the inputs rejected while scanning), the run settings, the ``request`` (the command that planned,
    without ``--out`` and the options that do not change the output) and the plan file's layout.
    Written last: its presence marks a complete plan.

A task checks every shard it reads against the digest in ``plan.json`` (:func:`data_prep.plan.shard_digest`),
so a plan file that does not belong to its ``plan.json`` is refused, and :func:`ensure_plan` refuses a
plan made by another command with one line naming the first option that differs. Nothing in either
file is unpickled; both are written atomically.

Concurrency: the first task takes ``_parts/plan.lock`` (exclusive create, refreshed every
``stale_s / 5`` seconds while planning); the others wait for ``plan.json``. A lock not refreshed for
``stale_s`` (its holder was killed) is broken. Planning is deterministic, so two planners that race
after a broken lock write identical files.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data_prep.errors import PrepError
from data_prep.format import AtomicPath, Settings, atomic_write_bytes
from data_prep.plan import Plan, ShardTask, records_digest, shard_digest, task_range
from data_prep.scan import Sample

logger = logging.getLogger(__name__)

PARTS_DIR = "_parts"
PLAN_JSON = "plan.json"
PLAN_ROWS = "plan.parquet"
PLAN_LOCK = "plan.lock"
#: Layout version of ``plan.parquet`` (stored in ``plan.json`` and in the parquet schema metadata).
PLAN_FILE_VERSION = 1
#: Rows per row group (rounded down to whole shards, at least one shard): the most a task reads beyond
#: its own slice is two partial row groups.
ROWS_PER_GROUP = 16_384
_VERSION_KEY = b"vitpipe.plan_version"

#: Columns of ``plan.parquet``; ``class_id`` is ``classes[label]`` of ``plan.json``.
PLAN_COLUMNS = pa.schema(
    [
        pa.field("split", pa.string(), nullable=False),
        pa.field("shard", pa.int32(), nullable=False),  # shard index within the split
        pa.field("position", pa.int64(), nullable=False),  # position in the split's planned order (key number)
        pa.field("path", pa.string(), nullable=False),  # absolute path of the input file
        pa.field("source", pa.string(), nullable=False),  # path relative to the source root (manifests, digests)
        pa.field("label", pa.int32(), nullable=False),
        pa.field("start", pa.float64(), nullable=True),  # videos: window start, seconds
        pa.field("end", pa.float64(), nullable=True),  # videos: window end, seconds
    ],
    metadata={_VERSION_KEY: str(PLAN_FILE_VERSION).encode()},
)

__all__ = ["PLAN_COLUMNS", "PlanSlice", "ensure_plan", "read_plan_record", "read_slice", "write_plan"]


def parts_dir(out: Path) -> Path:
    """``<out>/_parts``: the plan and what the merge needs."""
    return Path(out) / PARTS_DIR


# ---------------------------------------------------------------- writing


def _rows(plan: Plan, split: str, items: Sequence[Sample], first: int, cwd: str) -> tuple[pa.Table, list[str]]:
    """The plan-file rows of consecutive whole shards of a split, and the digest of each of those shards."""
    # one pass over the samples: after the train shuffle they lie all over memory, every pass is cache misses
    records = [(str(s.path), s.source, s.label, s.class_id, s.start, s.end) for s in items]
    digests = []
    for at in range(0, len(records), plan.shard_size):
        index = (first + at) // plan.shard_size
        chunk = [[r[1], r[2], r[3], r[4], r[5]] for r in records[at : at + plan.shard_size]]
        digests.append(records_digest(plan.kind, plan.options, split, index, first + at, chunk))
    paths, sources, labels, _, starts, ends = zip(*records, strict=True) if records else ((),) * 6
    positions = np.arange(first, first + len(records), dtype=np.int64)
    table = pa.table(
        [
            pa.repeat(pa.scalar(split, pa.string()), len(records)),
            pa.array((positions // plan.shard_size).astype(np.int32)),
            pa.array(positions),
            pa.array([p if p.startswith("/") else os.path.join(cwd, p) for p in paths], pa.string()),
            pa.array(sources, pa.string()),
            pa.array(labels, pa.int32()),
            pa.array(starts, pa.float64()),
            pa.array(ends, pa.float64()),
        ],
        schema=PLAN_COLUMNS,
    )
    return table, digests


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while rows are built from millions of live ``Sample`` objects.

    Every collection would walk all of them (it made writing a 300,000-input plan 4x slower); nothing
    built here holds a reference cycle, so reference counting frees it all the same.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def shards_per_group(shard_size: int, rows_per_group: int = ROWS_PER_GROUP) -> int:
    """Whole shards per row group of the plan file."""
    return max(1, rows_per_group // shard_size)


def write_plan(
    plan: Plan,
    out: Path,
    settings: Settings | None = None,
    request: Sequence[str] | None = None,
    rows_per_group: int = ROWS_PER_GROUP,
) -> dict[str, Any]:
    """Write ``_parts/plan.parquet`` and then ``_parts/plan.json`` (atomically, stray temporaries removed).

    Args:
        plan: The whole run's plan.
        out: Output root.
        settings: Run settings stored for the merge (failure rate, train layout).
        request: The planning command, compared by :func:`ensure_plan` (None: made through the library).
        rows_per_group: Rows per row group of the plan file (rounded down to whole shards).

    Returns:
        The record written to ``plan.json``.
    """
    parts = parts_dir(out)
    parts.mkdir(parents=True, exist_ok=True)
    for stale in parts.glob(".plan.*.tmp"):
        stale.unlink(missing_ok=True)
    group = shards_per_group(plan.shard_size, rows_per_group)
    rows, digests = 0, {}
    with (_gc_paused(), AtomicPath(parts / PLAN_ROWS) as tmp,
          pq.ParquetWriter(str(tmp), PLAN_COLUMNS, compression="zstd") as w):
        for split, items in plan.splits.items():
            digests[split] = []
            step = group * plan.shard_size
            for first in range(0, len(items), step):
                table, shard_digests = _rows(plan, split, items[first : first + step], first, os.getcwd())
                w.write_table(table, row_group_size=table.num_rows)
                digests[split] += shard_digests
                rows += table.num_rows
    record = {
        **plan.describe(digests),
        "settings": dict(settings or {}),
        "request": None if request is None else list(request),
        "plan_file": {"name": PLAN_ROWS, "version": PLAN_FILE_VERSION, "rows": rows, "shards_per_group": group},
    }
    atomic_write_bytes(parts / PLAN_JSON, (json.dumps(record, indent=1, sort_keys=True) + "\n").encode())
    logger.info("planned %d inputs in %d shards: %s", rows, sum(len(sp["shards"]) for sp in record["splits"].values()),
                parts / PLAN_JSON)
    return record


# ---------------------------------------------------------------- reading


def read_plan_record(out: Path) -> dict[str, Any] | None:
    """Return ``plan.json`` if a plan is there, else None (also for one written before plan files existed)."""
    path = parts_dir(out) / PLAN_JSON
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise PrepError(f"{path}: cannot read the plan ({exc}); delete it to plan again") from exc
    if not isinstance(record, dict) or "plan_file" not in record:
        return None  # written by a version without plan files: plan again
    return record


@dataclass(frozen=True)
class PlanSlice:
    """The shards of one array task, read from the plan file.

    Attributes:
        tasks: The task's shards, in global order.
        span: Their positions in the global shard list.
        num_shards: Shards in the whole plan.
        rows_read: Plan rows read from disk (the slice plus at most two partial row groups).
    """

    tasks: list[ShardTask]
    span: range
    num_shards: int
    rows_read: int


def _groups(record: dict[str, Any]) -> Iterator[tuple[str, int, int]]:
    """``(split, first shard, shard count)`` of every row group, in file order."""
    group = record["plan_file"]["shards_per_group"]
    for split, sp in record["splits"].items():
        n = len(sp["shards"])
        for first in range(0, n, group):
            yield split, first, min(group, n - first)


def read_slice(out: Path, task_index: int, num_tasks: int, record: dict[str, Any] | None = None) -> PlanSlice:
    """Read the shards of array task ``task_index`` of ``num_tasks`` from the plan file.

    Only the row groups that hold the task's shard range (:func:`data_prep.plan.task_range`) are read;
    every shard is checked against its digest in ``plan.json``.

    Args:
        out: Output root holding ``_parts/``.
        task_index: This task.
        num_tasks: Number of tasks.
        record: ``plan.json`` when already read.

    Raises:
        PrepError: If there is no plan, or the plan file does not match ``plan.json``.
    """
    parts = parts_dir(out)
    record = record or read_plan_record(out)
    if record is None:
        raise PrepError(f"{parts / PLAN_JSON}: no plan; run the prep command (or its --plan-only) first")
    kind, options, shard_size = record["kind"], record["options"], record["shard_size"]
    classes = record["classes"]
    layout = list(_groups(record))
    num_shards = sum(n for _, _, n in layout)
    span = task_range(num_shards, task_index, num_tasks)
    wanted, base = [], 0
    for g, (_, _, n) in enumerate(layout):
        if base < span.stop and span.start < base + n:
            wanted.append(g)
        base += n
    path = parts / PLAN_ROWS
    try:
        with pq.ParquetFile(path) as pf:
            meta = pf.schema_arrow.metadata or {}
            if meta.get(_VERSION_KEY) != str(PLAN_FILE_VERSION).encode() or pf.metadata.num_row_groups != len(layout):
                raise PrepError(f"{path}: does not match {PLAN_JSON} (layout); delete {parts} and plan again")
            table = pf.read_row_groups(wanted) if wanted else PLAN_COLUMNS.empty_table()
    except (OSError, pa.ArrowInvalid) as exc:
        raise PrepError(f"{path}: cannot read the plan file ({exc}); delete {parts} and plan again") from exc
    mine: dict[tuple[str, int], list[Sample]] = {}
    base = 0
    for split, first, n in layout:
        for index in range(first, first + n):
            if base + index - first in span:
                mine[(split, index)] = []
        base += n
    columns = table.to_pydict()
    with _gc_paused():
        for split, shard, path_, source, label, start, end in zip(
            columns["split"], columns["shard"], columns["path"], columns["source"], columns["label"],
            columns["start"], columns["end"], strict=True,
        ):
            items = mine.get((split, shard))
            if items is not None:  # rows of the row groups at both ends that belong to other tasks are skipped
                items.append(Sample(Path(path_), label, classes[label], source, start, end))
    tasks = []
    for (split, index), items in mine.items():
        digest = record["splits"][split]["shards"][index]
        if shard_digest(kind, options, split, index, index * shard_size, items) != digest:
            raise PrepError(f"{path}: shard {split} {index} does not match {PLAN_JSON}; delete {parts} and plan again")
        tasks.append(ShardTask(split, index, index * shard_size, tuple(items), digest))
    return PlanSlice(tasks, span, num_shards, table.num_rows)


# ---------------------------------------------------------------- once per dataset


def _options(argv: Sequence[str]) -> dict[str, list[str]]:
    """``--flag value ...`` -> {flag: values}; the first token (the source) is keyed ``"source"``."""
    found: dict[str, list[str]] = {"source": list(argv[:1])}
    key = "source"
    for token in argv[1:]:
        if token.startswith("--"):
            key = token
            found.setdefault(key, [])
        else:
            found[key].append(token)
    return found


def check_request(record: dict[str, Any], request: Sequence[str], where: Path) -> None:
    """Raise PrepError (one line) if the plan at ``where`` was made by another command than ``request``."""
    planned = record.get("request")
    if planned == list(request):
        return
    if planned is None:
        why = "it was planned through the library API"
    else:
        theirs, ours = _options(planned), _options(request)
        flag = next(f for f in [*theirs, *ours] if theirs.get(f) != ours.get(f))
        show = " ".join(theirs.get(flag) or ["(not given)"]), " ".join(ours.get(flag) or ["(not given)"])
        why = f"{flag} is {show[0]} there, {show[1]} here" if flag != "source" else f"source {show[0]} there"
    raise PrepError(f"{where}: planned by another command ({why}); run every task with the same options, "
                    f"or delete {where.parent} to plan again")


@contextlib.contextmanager
def _heartbeat(lock: Path, every_s: float) -> Iterator[None]:
    """Refresh the lock's mtime every ``every_s`` seconds while the block runs."""
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(every_s):
            with contextlib.suppress(OSError):
                os.utime(lock)

    thread = threading.Thread(target=beat, name="plan-lock-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _try_lock(lock: Path) -> bool:
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    holder = {"host": socket.gethostname(), "pid": os.getpid(), "job": os.environ.get("SLURM_JOB_ID"),
              "task": os.environ.get("SLURM_ARRAY_TASK_ID")}
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(holder) + "\n")
    return True


def _lock_state(lock: Path) -> tuple[int, int] | None:
    try:
        st = lock.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns


def ensure_plan(
    out: Path,
    request: Sequence[str],
    build: Callable[[], Plan],
    settings: Settings | None = None,
    *,
    stale_s: float = 300.0,
    max_poll_s: float = 2.0,
) -> dict[str, Any]:
    """Return the plan of ``out``, planning it first if no task has (one planner per output directory).

    Args:
        out: Output root.
        request: This command (see :func:`write_plan`); a plan made by another one is refused.
        build: Scans the source and returns the plan; called only by the task that plans.
        settings: Run settings stored with the plan.
        stale_s: A lock whose mtime has not changed for this long (as seen from here) is broken.
        max_poll_s: Longest wait between two looks at the plan while another task plans.

    Returns:
        The ``plan.json`` record.

    Raises:
        PrepError: If the plan there was made by another command, or ``build`` fails.
    """
    parts = parts_dir(out)
    parts.mkdir(parents=True, exist_ok=True)
    lock, where = parts / PLAN_LOCK, parts / PLAN_JSON
    seen, since, poll, told = None, time.monotonic(), 0.05, False
    while True:
        record = read_plan_record(out)
        if record is not None:
            check_request(record, request, where)
            return record
        if _try_lock(lock):
            try:
                record = read_plan_record(out)  # written between our look and our lock
                if record is None:
                    logger.info("planning %s (other tasks wait for it)", out)
                    with _heartbeat(lock, stale_s / 5):
                        record = write_plan(build(), out, settings, request)
                check_request(record, request, where)
                return record
            finally:
                lock.unlink(missing_ok=True)
        state = _lock_state(lock)
        if state != seen:
            seen, since = state, time.monotonic()
        elif state is not None and time.monotonic() - since > stale_s:
            logger.warning("%s not refreshed for %.0f s: its holder is gone, breaking it", lock, stale_s)
            with contextlib.suppress(OSError):
                os.replace(lock, parts / f".{PLAN_LOCK}.{os.getpid()}.stale")
                (parts / f".{PLAN_LOCK}.{os.getpid()}.stale").unlink()
            continue
        if not told and state is not None:
            logger.info("waiting for the plan another task is writing (%s)", lock)
            told = True
        time.sleep(poll)
        poll = min(2 * poll, max_poll_s)
