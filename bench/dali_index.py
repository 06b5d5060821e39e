"""DALI sample-index start-up (issue 13): one ``.idx`` parse per shard (before) vs one columnar manifest read (after).

Usage: ``python bench/dali_index.py [--shards 1000] [--per-shard 1000] [--rounds 3] [--work DIR]``

Writes a synthetic split of ``--shards × --per-shard`` samples (default 1,000,000) the way ``vitpipe prep``
lays it out — ``dataset.json``, one DALI index per shard (``jpg``/``cls``/``lbl``/``json`` components per
sample, ``wds2idx`` format) and the split manifest with the full manifest schema (zstd parquet) — then
times, in fresh processes interleaved round by round (before, after, before, after, ...):

* **before**: what every rank of the ``dali`` backend did at start-up until now — read and parse every
  shard's ``.idx`` (:func:`data_prep.format.read_index`) and keep the jpg and lbl byte ranges as arrays
  (the former ``ShardIndex.load``, reproduced verbatim below);
* **after**: :meth:`pipeline.data.reader.SampleIndex.load` — one columnar read of the manifest's
  ``shard``/``offset``/``bytes``/``label`` columns, checked against ``dataset.json``.

Each row gives the median wall time over the rounds (after: including the import of pyarrow, which the
``.idx`` path did not need), per sample, and the process's peak RSS above an interpreter that imported the
loader modules (``ru_maxrss``). No tar file is needed by either.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

_CHILD = r"""
import gc, json, resource, sys, time
import numpy as np
from pathlib import Path
from data_prep.format import IMAGE_EXTS, LBL, load_dataset_info, read_index
from pipeline.data.reader import SampleIndex

root, which = Path(sys.argv[1]), sys.argv[2]
gc.collect()
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
imported = 0.0
if which == "after":  # counted: a rank imports pyarrow for it (the .idx path did not need it)
    import pyarrow.parquet
    imported = time.perf_counter() - t0
if which == "before":  # the former pipeline.data.dali_base.ShardIndex.load, for every shard of the split
    info = load_dataset_info(root)
    index = []
    for shard in info.split("train").shards:
        entries = read_index(root / "train" / shard.index)
        assert len(entries) == shard.num_samples
        image = [next((e[ext] for ext in IMAGE_EXTS if ext in e), None) for e in entries]
        index.append((np.array(image, dtype=np.int64), np.array([e[LBL] for e in entries], np.int64)))
    samples = sum(len(i[0]) for i in index)
else:
    index = SampleIndex.load(root, "train")
    samples = index.num_samples
seconds = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"seconds": seconds, "samples": samples, "rss_mb": (peak - base) / 1024, "import_s": imported}))
"""


def write_split(root: Path, shards: int, per_shard: int) -> None:
    """dataset.json, ``shards`` DALI index files and the train manifest (no tars)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from data_prep.format import Counts, DatasetInfo, QuarantineInfo, ShardInfo, SplitInfo, manifest_schema

    folder = root / "train"
    folder.mkdir(parents=True, exist_ok=True)
    n = shards * per_shard
    names = [f"train-{i:06d}.tar" for i in range(shards)]
    infos = tuple(ShardInfo(name, per_shard, name[:-4] + ".idx", 0) for name in names)
    DatasetInfo(2, "image", ("c0",), {"train": SplitInfo(n, infos, "train.parquet", n, 0)}, Counts(n, n, 0),
                QuarantineInfo("", 0, {}), {}, {}).write(root)
    sample_bytes = 110_000  # an ImageNet JPEG, about
    stride = 512 + sample_bytes + 512 + 512 + 512 + 512 + 512 + 512  # jpg + cls + lbl + json members, padded
    for s, name in enumerate(names):
        lines = [f"v1.2 {per_shard}"]
        for i in range(per_shard):
            key, base = f"train_{s * per_shard + i:08d}", i * stride
            lines.append(f"jpg {base + 512} {sample_bytes} {key}.jpg cls {base + 111_104} 3 {key}.cls "
                         f"lbl {base + 112_128} 8 {key}.lbl json {base + 113_152} 120 {key}.json")
        (folder / (name[:-4] + ".idx")).write_text("\n".join(lines) + "\n")
    ids = np.arange(n)
    local = ids % per_shard
    columns = {"key": pa.array(np.char.add("train_", np.char.zfill(ids.astype(str), 8))),
               "shard": pa.array(np.repeat(np.array(names), per_shard)),
               "offset": pa.array(local * stride + 512), "bytes": pa.array(np.full(n, sample_bytes)),
               "label": pa.array(ids % 1000), "format": pa.array(np.full(n, "jpeg")),
               "sha256": pa.array(np.full(n, "0" * 64)), "source": pa.array(np.char.add("train/", ids.astype(str)))}
    schema = manifest_schema()
    table = pa.table({f.name: columns.get(f.name) or (pa.nulls(n, f.type) if f.nullable else
                                                      pa.array(np.zeros(n), f.type) if f.type != pa.string() else
                                                      pa.array(np.full(n, "")))
                      for f in schema}, schema=schema)
    pq.write_table(table, root / "train.parquet", compression="zstd")


def run(root: Path, which: str) -> dict[str, float]:
    """One measurement in a fresh interpreter."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", _CHILD, str(root), which], capture_output=True, text=True,
                         env=env, check=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    """Writes the split, times both variants and prints a markdown table."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", type=int, default=1000)
    p.add_argument("--per-shard", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--work", type=Path, help="work directory, kept (default: a temporary one, removed)")
    a = p.parse_args(argv)
    work = a.work or Path(tempfile.mkdtemp(prefix="bench-dali-index-"))
    load = os.getloadavg()
    print(f"{os.cpu_count()} CPU cores, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}", flush=True)
    try:
        if not (work / "dataset.json").is_file():
            write_split(work, a.shards, a.per_shard)
        idx_mb = sum(f.stat().st_size for f in (work / "train").glob("*.idx")) / 1e6
        manifest_mb = (work / "train.parquet").stat().st_size / 1e6
        print(f"{a.shards} shards × {a.per_shard} samples: .idx files {idx_mb:.0f} MB, manifest {manifest_mb:.0f} MB")
        results: dict[str, list[dict[str, float]]] = {"before": [], "after": []}
        for _ in range(a.rounds):
            for which in results:
                results[which].append(run(work, which))
        print(f"\n| index built from | samples | seconds (median of {a.rounds}) | µs per sample | peak RSS added |")
        print("|---|---|---|---|---|")
        base = statistics.median(r["seconds"] for r in results["before"])
        for which, label in (("before", "every shard's `.idx` parsed (before)"),
                             ("after", "one columnar read of the manifest (after)")):
            seconds = statistics.median(r["seconds"] for r in results[which])
            samples = results[which][0]["samples"]
            rss = statistics.median(r["rss_mb"] for r in results[which])
            imported = statistics.median(r["import_s"] for r in results[which])
            speed = "" if which == "before" else f" ({base / seconds:.0f}× faster; pyarrow import {imported:.2f})"
            print(f"| {label} | {samples:,} | {seconds:.2f}{speed} | {1e6 * seconds / samples:.2f} | {rss:.0f} MB |")
    finally:
        if a.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
