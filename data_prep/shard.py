"""Plan -> WebDataset shards + DALI indexes + parquet manifests + ``dataset.json``.

Output layout::

    <out>/dataset.json                   written last by the merge; its presence marks a complete dataset
    <out>/train.parquet                  split manifest, one row per written sample
    <out>/quarantine.parquet             every input that was not written, with the reason
    <out>/train/train-000000.tar         WebDataset shard
    <out>/train/train-000000.idx         DALI index of that shard (wds2idx format)
    <out>/train/train-000000.parquet     shard sidecar: its manifest rows; written last, marks the shard done
    <out>/_parts/plan.json               what the merge needs (classes, shard digests, options); written last
    <out>/_parts/plan.parquet            the planned inputs, read in slices by array tasks (data_prep.planfile)

Each sample holds its media component(s), then the label and metadata components; names, encodings
and the ``dataset.json`` layout are defined in :mod:`data_prep.format`.

Work is split by shard: :func:`run_plan` writes the plan file and the shards of one task range (all
of them by default) on a process pool and skips shards whose sidecar says they are complete for the
same inputs and options; :func:`run_planned` does the same for an array task from the plan file
alone (no scan, only its slice in memory); :func:`merge` checks that every planned shard is there and
writes the split manifests, the quarantine manifest and ``dataset.json``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from data_prep.errors import PrepError
from data_prep.format import (
    DATASET_JSON,
    FORMAT_VERSION,
    META,
    QUARANTINE_MANIFEST,
    Counts,
    DatasetInfo,
    QuarantineInfo,
    Settings,
    ShardInfo,
    SplitInfo,
    encode_meta,
    index_name,
    label_components,
    manifest_name,
    reason_group,
    sample_key,
    shard_name,
    sidecar_name,
)
from data_prep.images import Encoded, ImageOptions, Quarantine, process_image
from data_prep.loading import SourceError, check_regular, ordered_map, read_source, read_timeout_reason
from data_prep.manifest import MANIFEST_SCHEMA, QUARANTINE_SCHEMA, ManifestRow, rows_to_table, write_table_atomic
from data_prep.plan import Plan, ShardTask, check_split_name, order_samples, task_range
from data_prep.planfile import PARTS_DIR, PLAN_JSON, read_slice, write_plan
from data_prep.scan import Sample
from data_prep.tarwrite import TarShardWriter, storage_errno, storage_error
from data_prep.verify import check_shard_files
from data_prep.video import VideoOptions

logger = logging.getLogger(__name__)

#: Default reader threads per process.
DEFAULT_WORKERS = 4
_SHARD_META = b"vitpipe.shard"

__all__ = ["ShardResult", "merge", "prep_imagefolder", "run_plan", "run_planned", "write_split"]


@dataclass(frozen=True)
class ShardResult:
    """What writing one shard produced.

    Attributes:
        split: Split name.
        name: Shard file name.
        num_inputs: Planned inputs.
        num_samples: Samples written (0: every input was quarantined and no tar exists).
        bytes: Tar size in bytes.
        quarantined: ``(key, source, reason)`` of each input that was not written.
        skipped: True when the shard was already complete and left alone (resume).
    """

    split: str
    name: str
    num_inputs: int
    num_samples: int
    bytes: int
    quarantined: list[tuple[str, str, str]] = field(default_factory=list)
    skipped: bool = False


# ---------------------------------------------------------------- one shard


def _meta(sample: Sample, enc: Encoded) -> dict[str, Any]:
    meta: dict[str, Any] = {"class_id": sample.class_id, "label": sample.label, "source": sample.source}
    if enc.fps is not None:
        meta.update(fps=enc.fps, frames=enc.frames, duration=enc.duration, start=sample.start, end=sample.end)
    return meta


def _components(sample: Sample, enc: Encoded) -> list[tuple[str, bytes]]:
    """Return the tar components of one sample, in their fixed order."""
    return [*enc.components, *label_components(sample.label), (META, encode_meta(_meta(sample, enc)))]


def encode_sample(sample: Sample, opts: ImageOptions | VideoOptions) -> Encoded | str:
    """Read and encode one input; returns the payload, or the quarantine reason as a string."""
    try:
        if isinstance(opts, VideoOptions):
            from data_prep.video import reencode_video

            reason = check_regular(sample.path)  # stat only: a FIFO or device is never opened
            if reason is not None:
                return reason
            return reencode_video(sample.path, sample.start, sample.end, opts)
        data = read_source(sample.path)  # stat first: a FIFO or device is never opened
        return process_image(data, sample.path.name, opts)
    except (Quarantine, SourceError) as exc:
        return str(exc)


def sidecar_path(out: Path, split: str, index: int) -> Path:
    """Path of a shard's sidecar manifest, e.g. ``<out>/train/train-000003.parquet``."""
    return out / split / sidecar_name(shard_name(split, index))


def read_sidecar_meta(path: Path) -> dict[str, Any] | None:
    """Return the shard record stored in a sidecar's schema metadata, or None if absent/unreadable."""
    try:
        meta = pq.read_schema(path).metadata or {}
        return json.loads(meta[_SHARD_META])
    except (OSError, KeyError, ValueError, pa.ArrowInvalid):
        return None


def shard_is_done(task: ShardTask, out: Path) -> dict[str, Any] | None:
    """Return the sidecar record if the shard is complete for the same inputs and options."""
    record = read_sidecar_meta(sidecar_path(out, task.split, task.index))
    if record is None or record.get("digest") != task.digest:
        return None
    tar = out / task.split / task.name
    if record["num_samples"] and not (tar.is_file() and (tar.parent / index_name(tar.name)).is_file()
                                      and tar.stat().st_size == record["bytes"]):
        return None
    return record


def write_shard(task: ShardTask, out: Path, opts: ImageOptions | VideoOptions, threads: int = 1) -> ShardResult:
    """Write one shard (tar, DALI index, sidecar manifest), or skip it when it is already complete.

    The tar and index are committed first, the sidecar last; a kill at any point leaves either a
    complete shard or one that the next run rewrites from scratch (temporary files are hidden
    ``.<name>.*.tmp`` files, removed at the start of the next run).

    Args:
        task: The shard to write.
        out: Output root.
        opts: Image or video options.
        threads: Threads that read and encode inputs ahead of the writer (output does not depend on it).

    Returns:
        What was written.
    """
    out = Path(out)
    split_dir = out / task.split
    split_dir.mkdir(parents=True, exist_ok=True)
    done = shard_is_done(task, out)
    if done is not None:
        return ShardResult(task.split, task.name, len(task.items), done["num_samples"], done["bytes"],
                           [tuple(q) for q in done["quarantined"]], skipped=True)
    for stale in split_dir.glob(f".{task.name[:-4]}.*.tmp"):
        stale.unlink(missing_ok=True)
    tar_path = split_dir / task.name
    rows: list[ManifestRow] = []
    quarantined: list[tuple[str, str, str]] = []
    writer: TarShardWriter | None = None
    try:
        # Videos are encoded one at a time per process (parallelism comes from the pool): it keeps
        # memory per process at one clip and rules out any cross-talk between encoders in one process.
        encoded = ordered_map(lambda s: encode_sample(s, opts), task.items,
                              1 if isinstance(opts, VideoOptions) else threads,
                              timeout_s=getattr(opts, "read_timeout_s", None), on_timeout=read_timeout_reason)
        for pos, (sample, enc) in enumerate(zip(task.items, encoded, strict=True)):
            key = sample_key(task.split, task.first + pos)
            if isinstance(enc, str):
                quarantined.append((key, sample.source, enc))
                continue
            if writer is None:
                writer = TarShardWriter(tar_path, split_dir / index_name(task.name))
            locs = writer.add_sample(key, _components(sample, enc))
            media = locs[: len(enc.components)]
            digest = hashlib.sha256()
            for _, data in enc.components:
                digest.update(data)
            rows.append(ManifestRow(
                key=key, shard=task.name, offset=media[0].offset, bytes=sum(loc.size for loc in media),
                label=sample.label, class_id=sample.class_id, width=enc.width, height=enc.height,
                fps=enc.fps, frames=enc.frames, duration=enc.duration, format=enc.format,
                sha256=digest.hexdigest(), source=sample.source, note=enc.note,
            ))
        size = 0
        if writer is not None:
            writer.close()
            size = tar_path.stat().st_size
        else:
            tar_path.unlink(missing_ok=True)
            (split_dir / index_name(task.name)).unlink(missing_ok=True)
    except BaseException as exc:
        if writer is not None:
            writer.abort()
        if storage_errno(exc):
            raise storage_error(exc, tar_path) from None
        raise
    record = {"digest": task.digest, "num_samples": len(rows), "bytes": size, "quarantined": quarantined}
    sidecar = sidecar_path(out, task.split, task.index)
    try:
        write_table_atomic(rows_to_table(rows), sidecar, {_SHARD_META: json.dumps(record).encode()})
    except OSError as exc:
        if storage_errno(exc):
            raise storage_error(exc, sidecar) from None
        raise
    for key, source, reason in quarantined:
        logger.warning("quarantined %s (%s): %s", source, key, reason)
    return ShardResult(task.split, task.name, len(task.items), len(rows), size, quarantined)


# ---------------------------------------------------------------- many shards


class _Progress:
    """A tqdm bar over inputs (when tqdm is installed and stderr is a terminal) plus periodic log lines."""

    def __init__(self, total: int, num_shards: int, desc: str) -> None:
        self.total, self.num_shards, self.done, self.shards = total, num_shards, 0, 0
        self.start = self.last_log = time.monotonic()
        try:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="file", dynamic_ncols=True, disable=None)
        except ImportError:  # pragma: no cover - tqdm comes with the training stack
            self.bar = None

    def update(self, result: ShardResult) -> None:
        self.done += result.num_inputs
        self.shards += 1
        if self.bar is not None:
            self.bar.update(result.num_inputs)
        now = time.monotonic()
        if now - self.last_log >= 10 or self.shards == self.num_shards:
            rate = self.done / max(now - self.start, 1e-9)
            eta = (self.total - self.done) / rate if rate else float("inf")
            logger.info("%d/%d shards, %d/%d inputs, %.1f files/s, ETA %s", self.shards, self.num_shards,
                        self.done, self.total, rate, time.strftime("%H:%M:%S", time.gmtime(min(eta, 86399))))
            self.last_log = now

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _run_tasks(
    tasks: Sequence[ShardTask], out: Path, opts: ImageOptions | VideoOptions, workers: int, threads: int,
    on_result: Callable[[ShardResult], None],
) -> None:
    if workers <= 1:
        for task in tasks:
            on_result(write_shard(task, out, opts, threads))
        return
    # forkserver: workers fork from a clean server process that has already imported the encoders
    # (no fork of this possibly multi-threaded process, no per-worker import cost as with spawn).
    ctx = get_context("forkserver")
    ctx.set_forkserver_preload(["data_prep.shard", "data_prep.video", "av", "PIL.Image"])
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        pending = set()
        queue = list(reversed(tasks))
        while queue or pending:
            while queue and len(pending) < 2 * workers:  # bounded: a task carries its whole input list
                pending.add(pool.submit(write_shard, queue.pop(), out, opts, threads))
            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
            for fut in finished:
                on_result(fut.result())


def _run_range(
    mine: Sequence[ShardTask], span: range, num_shards: int, out: Path, opts: ImageOptions | VideoOptions,
    workers: int, threads: int, task_index: int, num_tasks: int,
) -> list[ShardResult]:
    logger.info("task %d/%d: shards %d..%d of %d (%d inputs); %d process(es)", task_index, num_tasks,
                span.start, span.stop - 1, num_shards, sum(len(t.items) for t in mine), workers)
    results: list[ShardResult] = []
    progress = _Progress(sum(len(t.items) for t in mine), len(mine), f"prep {task_index}/{num_tasks}")
    try:
        _run_tasks(mine, out, opts, workers, threads, lambda r: (results.append(r), progress.update(r)))
    finally:
        progress.close()
    skipped = sum(r.skipped for r in results)
    if skipped:
        logger.info("resumed: %d of %d shards were already complete and kept", skipped, len(results))
    return results


def run_plan(
    plan: Plan,
    out: Path,
    opts: ImageOptions | VideoOptions,
    *,
    workers: int = 1,
    threads: int = DEFAULT_WORKERS,
    task_index: int = 0,
    num_tasks: int = 1,
    settings: Settings | None = None,
    request: Sequence[str] | None = None,
) -> list[ShardResult]:
    """Write the plan file, then this task's range of the plan's shards (all of them by default).

    Args:
        plan: The run's plan.
        out: Output root.
        opts: Image or video options.
        workers: Processes writing shards in parallel (1: in this process).
        threads: Reader threads per process.
        task_index: This task's index (Slurm: ``SLURM_ARRAY_TASK_ID``).
        num_tasks: Number of tasks; each gets a disjoint, contiguous range of shards.
        settings: Run settings stored for the merge (train layout, max failure rate).
        request: The planning command, stored with the plan (:func:`data_prep.planfile.write_plan`).

    Returns:
        One result per shard of this task's range (``skipped`` for shards that were already complete).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / DATASET_JSON).unlink(missing_ok=True)
    write_plan(plan, out, settings or Settings(), request)
    shards = plan.shards()
    span = task_range(len(shards), task_index, num_tasks)
    return _run_range([shards[i] for i in span], span, len(shards), out, opts, workers, threads,
                      task_index, num_tasks)


def run_planned(
    out: Path,
    opts: ImageOptions | VideoOptions,
    *,
    workers: int = 1,
    threads: int = DEFAULT_WORKERS,
    task_index: int = 0,
    num_tasks: int = 1,
) -> list[ShardResult]:
    """Write this task's range of shards from the plan file in ``out`` (no scan; only the slice is read).

    Args:
        out: Output root holding ``_parts/plan.json`` and ``_parts/plan.parquet``
            (:func:`data_prep.planfile.ensure_plan`).
        opts: Image or video options (the plan's digests cover them: shards are checked on resume and merge).
        workers: Processes writing shards in parallel (1: in this process).
        threads: Reader threads per process.
        task_index: This task's index.
        num_tasks: Number of tasks.

    Returns:
        One result per shard of this task's range.
    """
    out = Path(out)
    (out / DATASET_JSON).unlink(missing_ok=True)
    part = read_slice(out, task_index, num_tasks)
    return _run_range(part.tasks, part.span, part.num_shards, out, opts, workers, threads, task_index, num_tasks)


# ---------------------------------------------------------------- merge


def _remove_stale(split_dir: Path, split: str, keep: set[str]) -> None:
    pattern = re.compile(rf"^{re.escape(split)}-\d{{6}}\.(tar|idx|parquet)$")
    for path in sorted(split_dir.iterdir()):
        if pattern.match(path.name) and path.name not in keep:
            logger.info("removing stale shard file %s from an earlier run", path)
            path.unlink()


def merge(out: Path) -> DatasetInfo:
    """Check that every planned shard is complete, then write the manifests and ``dataset.json``.

    Every shard's tar and index are checked against its sidecar (existence, size, the index's own
    consistency: :func:`data_prep.verify.check_shard_files`) before ``dataset.json`` is written.

    Args:
        out: Output root written by one or more :func:`run_plan` tasks.

    Returns:
        What was written to ``dataset.json``.

    Raises:
        PrepError: If the plan record is missing, a shard is missing or was written for other inputs,
            a shard's tar or index is missing or disagrees with its sidecar (named; no ``dataset.json``),
            or the quarantined fraction exceeds the run's ``max_failure_rate`` (the quarantine manifest
            is written first, so it can be inspected).
    """
    out = Path(out)
    plan_path = out / PARTS_DIR / PLAN_JSON
    if not plan_path.is_file():
        raise PrepError(f"{out}: no {PARTS_DIR}/{PLAN_JSON}; run a `vitpipe prep <source>` task first")
    plan = json.loads(plan_path.read_text())
    (out / DATASET_JSON).unlink(missing_ok=True)  # it marks a complete data set: gone until this merge succeeds
    settings: Settings = plan.get("settings", {})
    missing: list[str] = []
    damaged: list[str] = []  # tar or index not what the sidecar records
    splits: dict[str, SplitInfo] = {}
    tables: dict[str, pa.Table] = {}
    quarantine: list[dict[str, Any]] = []
    for split, sp in plan["splits"].items():
        shards, parts = [], []
        for index, digest in enumerate(sp["shards"]):
            side = sidecar_path(out, split, index)
            record = read_sidecar_meta(side)
            if record is None or record.get("digest") != digest:
                missing.append(shard_name(split, index))
                continue
            quarantine.extend({"split": split, "key": k, "source": s, "reason": r} for k, s, r in record["quarantined"])
            if record["num_samples"]:
                name = shard_name(split, index)
                table = pq.read_table(side)
                problem = check_shard_files(out / split / name, out / split / index_name(name), record["num_samples"],
                                            record["bytes"], table.column("offset").to_pylist())
                if problem is not None:
                    damaged.append(problem)
                    continue
                shards.append(ShardInfo(name, record["num_samples"], index_name(name), record["bytes"]))
                parts.append(table.replace_schema_metadata(MANIFEST_SCHEMA.metadata))
        quarantine.extend({"split": split, "key": None, "source": s, "reason": r} for s, r in sp["prequarantined"])
        written = sum(s.num_samples for s in shards)
        splits[split] = SplitInfo(written, tuple(shards), manifest_name(split), sp["inputs"], sp["inputs"] - written)
        tables[split] = pa.concat_tables(parts) if parts else rows_to_table([])
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise PrepError(f"{out}: {len(missing)} planned shard(s) missing or incomplete: {shown}; "
                        "re-run the prep task(s) that own them (finished shards are kept)")
    if damaged:
        more = f" (and {len(damaged) - 1} more damaged shard(s))" if len(damaged) > 1 else ""
        raise PrepError(f"{damaged[0]}{more}; delete the damaged shard's files (.tar, .idx, .parquet) and re-run "
                        "the prep task that owns it")
    inputs = sum(s.inputs for s in splits.values())
    written = sum(s.num_samples for s in splits.values())
    if written + len(quarantine) != inputs:  # every input is either written or quarantined
        raise PrepError(f"{out}: counts do not reconcile: {inputs} inputs != {written} written + {len(quarantine)}")
    write_table_atomic(pa.Table.from_pylist(quarantine, schema=QUARANTINE_SCHEMA), out / QUARANTINE_MANIFEST)
    for split, sp in splits.items():
        write_table_atomic(tables[split], out / sp.manifest)
        keep = {n for s in sp.shards for n in (s.name, s.index)}
        keep |= {sidecar_name(shard_name(split, i)) for i in range(len(plan["splits"][split]["shards"]))}
        _remove_stale(out / split, split, keep)
    rate = len(quarantine) / max(inputs, 1)
    max_rate = float(settings.get("max_failure_rate", 0.01))
    logger.info("inputs %d = written %d + quarantined %d (%.3f%%)", inputs, written, len(quarantine), 100 * rate)
    if rate > max_rate or written == 0:
        raise PrepError(f"{out}: {len(quarantine)} of {inputs} inputs quarantined ({100 * rate:.2f}% > "
                        f"--max-failure-rate {100 * max_rate:g}%); see {out / QUARANTINE_MANIFEST}")
    info = _dataset_info(plan, splits, quarantine, settings, out)
    info.write(out)
    return info


def _shard_count_warnings(splits: dict[str, SplitInfo], settings: Settings) -> list[str]:
    layout = settings.get("train_layout")
    train = splits.get("train")
    if not layout or train is None:
        return []
    need = layout["nodes"] * layout["gpus_per_node"] * layout["loader_workers"]
    if len(train.shards) >= need:
        return []
    return [f"train has {len(train.shards)} shards, fewer than nodes x GPUs x loader workers = "
            f"{layout['nodes']} x {layout['gpus_per_node']} x {layout['loader_workers']} = {need}: "
            "some loader workers would get no shard; lower --shard-size"]


def _dataset_info(plan: dict[str, Any], splits: dict[str, SplitInfo], quarantine: list[dict[str, Any]],
                  settings: Settings, out: Path) -> DatasetInfo:
    warnings = _shard_count_warnings(splits, settings)
    for w in warnings:
        logger.warning("%s", w)
    written = sum(s.num_samples for s in splits.values())
    reasons = Counter(reason_group(q["reason"]) for q in quarantine)
    return DatasetInfo(
        format_version=FORMAT_VERSION,
        kind=plan["kind"],
        classes=tuple(plan["classes"]),
        splits=splits,
        counts=Counts(written + len(quarantine), written, len(quarantine)),
        quarantine=QuarantineInfo(QUARANTINE_MANIFEST, len(quarantine), dict(sorted(reasons.items()))),
        options={"shard_size": plan["shard_size"], **plan["options"]},
        settings=settings,
        warnings=tuple(warnings),
        class_names=tuple(plan["class_names"]) if plan.get("class_names") else None,
        source=str(out / DATASET_JSON),
    )


# ---------------------------------------------------------------- image folders (library API)


def write_split(
    samples: Sequence[Sample],
    classes: Sequence[str],
    out_dir: Path,
    split: str,
    shard_size: int,
    seed: int,
    shuffle: bool | None = None,
    workers: int = DEFAULT_WORKERS,
) -> SplitInfo:
    """Write one image split (shards, indexes, sidecars, ``<split>.parquet``) without ``dataset.json``.

    Args:
        samples: Samples of the split.
        classes: Class list the labels index into.
        out_dir: Output root.
        split: Split name.
        shard_size: Planned inputs per shard.
        seed: Shuffle seed.
        shuffle: Whether to shuffle; None means "only for train".
        workers: Reader threads.

    Returns:
        The split's ``dataset.json`` entry.
    """
    check_split_name(split)
    shuffle = split == "train" if shuffle is None else shuffle
    plan = Plan("image", list(classes), {split: order_samples(samples, seed, shuffle)}, shard_size,
                {"seed": seed, "shuffle": shuffle})
    run_plan(plan, out_dir, ImageOptions(), threads=workers, settings={"max_failure_rate": 1.0})
    info = merge(out_dir)
    (Path(out_dir) / DATASET_JSON).unlink()
    return info.splits[split]


def prep_imagefolder(
    src: Path,
    out: Path,
    shard_size: int = 1000,
    seed: int = 0,
    splits: Sequence[str] = ("train", "val"),
    workers: int = DEFAULT_WORKERS,
    processes: int = 1,
    max_failure_rate: float = 0.01,
) -> DatasetInfo:
    """Convert an ImageNet-style tree into a vitpipe dataset (single task: write + merge).

    Args:
        src: Source root holding ``train/<class>/*`` (and optionally ``val/<class>/*``).
        out: Output root.
        shard_size: Planned inputs per shard.
        seed: Seed of the train shuffle.
        splits: Splits to convert; must include ``"train"``.
        workers: Reader threads per process.
        processes: Processes writing shards.
        max_failure_rate: Largest quarantined fraction that still succeeds.

    Returns:
        What was written to ``dataset.json``.
    """
    from data_prep.imagenet import build_image_plan

    plan = build_image_plan(Path(src), splits=splits, shard_size=shard_size, seed=seed, opts=ImageOptions())
    run_plan(plan, out, ImageOptions(), workers=processes, threads=workers,
             settings={"max_failure_rate": max_failure_rate})
    return merge(out)
