"""Throughput of `vitpipe prep`: images/s and MB/s, 1 vs N processes, beside two baselines; video clips/s.

Generates ImageNet-like JPEGs (about 500x375, quality 90, smooth content plus noise so they compress
like photos, ~100 KB) and short H.264 clips, then times, in the same run:

* ``tar`` of the same files (the I/O limit: read + write, no checks);
* a naive single-process ``webdataset.ShardWriter`` loop (read bytes, write jpg + cls);
* ``prep imagenet`` storing as-is (full decode check; and header-only), 1 and N processes;
* ``prep imagenet --resize 256`` (decode, resize, re-encode q90), 1 and N processes;
* video re-encoding to h264 / vp9 / jpeg frames (30 fps, short side 320, keyint 8), 1 and N processes.

Usage: ``python bench/prep.py [--images 1500] [--clips 8] [--procs 2]``. Page cache is warm for every
measurement (the files were just written), so these are CPU figures, not disk figures.

``python bench/prep.py --scale [--images 2000] [--plan-inputs 1000000] [--before REV]`` measures instead
what issue 13 asks of preparation at scale, each "before" beside its "after" in the same run (the
"before" code is ``git archive REV`` of this repository, by default the commit before the change):

* per-image decode check (full vs 1/8-scale luma decode) and tar header cost (``TarInfo.tobuf`` twice
  vs the template once);
* ``prep imagenet`` images/s per process, full validation, before vs after, next to ``tar`` and the naive
  ``ShardWriter`` loop; each prep row is the median of 3 interleaved runs in fresh processes;
* planning a synthetic ImageNet-21k-like input list of ``--plan-inputs`` files: time and peak RSS of the
  planner (sort + shuffle + digests + plan file) and of one array task of 64, before (every task builds
  the whole plan) vs after (reads its slice of the plan file), and the directory scan rate of a real tree.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
#: The commit before issue 13's preparation changes (the default "before" of ``--scale``).
BEFORE_REV = "20b3bcfb545fcb7510ce22b24e3995baa02b0177"


def make_images(root: Path, n: int, classes: int = 10) -> int:
    """Write ``n`` photo-like 500x375 q90 JPEGs in ImageFolder layout; return their total bytes."""
    rng = np.random.default_rng(0)
    total = 0
    for i in range(n):
        d = root / "train" / f"n{i % classes:08d}"
        d.mkdir(parents=True, exist_ok=True)
        small = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
        img = np.asarray(Image.fromarray(small).resize((500, 375), Image.Resampling.BICUBIC), dtype=np.int16)
        img = np.clip(img + rng.normal(0, 10, img.shape), 0, 255).astype(np.uint8)
        p = d / f"img_{i:06d}.JPEG"
        Image.fromarray(img).save(p, quality=90)
        total += p.stat().st_size
    return total


def make_clips(root: Path, n: int) -> None:
    """Write ``n`` 5 s 426x240 H.264 clips and a ``train.txt`` video list."""
    import av

    rng = np.random.default_rng(0)
    lines = []
    for i in range(n):
        p = root / f"clip_{i:03d}.mp4"
        with av.open(str(p), "w") as c:
            st = c.add_stream("libx264", rate=30)
            st.width, st.height, st.pix_fmt = 426, 240, "yuv420p"
            base = np.asarray(Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize((426, 240)))
            for t in range(150):  # 5 s at 30 fps, a moving scene
                frame = np.roll(base, 2 * t, axis=1)
                for pkt in st.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                    c.mux(pkt)
            for pkt in st.encode():
                c.mux(pkt)
        lines.append(f"{p.name} {i % 4}")
    (root / "train.txt").write_text("\n".join(lines) + "\n")


def timed(fn, *args: object) -> float:  # noqa: ANN001
    """Seconds taken by ``fn(*args)``."""
    t = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t


def prep(args: list[str]) -> None:
    """Run ``prep ARGS`` in this process (interpreter start-up and imports excluded; pool start-up included)."""
    from vitpipe.prep import main

    if main(["prep", *args]) != 0:
        raise RuntimeError(f"prep {' '.join(args)} failed")


def naive_shardwriter(src: Path, out: Path) -> None:
    """Baseline: one process, read each file and hand it to ``webdataset.ShardWriter``."""
    import webdataset as wds

    out.mkdir()
    files = sorted((src / "train").rglob("*.JPEG"))
    classes = sorted({p.parent.name for p in files})
    with wds.ShardWriter(str(out / "s-%06d.tar"), maxcount=1000, verbose=0) as sink:
        for i, p in enumerate(files):
            sink.write({"__key__": f"s{i:08d}", "jpg": p.read_bytes(), "cls": classes.index(p.parent.name)})


def main() -> None:
    """Run every measurement and print markdown tables."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=1500)
    ap.add_argument("--clips", type=int, default=8)
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--scale", action="store_true", help="issue 13 figures instead (see the module docstring)")
    ap.add_argument("--plan-inputs", type=int, default=1_000_000, help="--scale: inputs of the synthetic plan")
    ap.add_argument("--scan-files", type=int, default=50_000, help="--scale: files of the real tree scanned")
    ap.add_argument("--before", default=BEFORE_REV, help="--scale: git revision of the 'before' code")
    ap.add_argument("--reps", type=int, default=5, help="--scale: runs of each prep row (median)")
    ap.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(a.child)
        return
    if a.scale:
        run_scale(a)
        return
    logging.basicConfig(level=logging.WARNING)  # keeps prep's per-shard log lines out of the tables
    work = Path(tempfile.mkdtemp(prefix="bench_prep_"))
    try:
        src = work / "src"
        mb = make_images(src, a.images) / 1e6
        print(f"{a.images} JPEGs, {mb:.1f} MB ({1e3 * mb / a.images:.0f} KB each); {os.cpu_count()} CPUs\n")
        print("| method | procs | s | images/s | MB/s |\n|---|---:|---:|---:|---:|")

        def row(name: str, procs: int, secs: float) -> None:
            print(f"| {name} | {procs} | {secs:.2f} | {a.images / secs:,.0f} | {mb / secs:.1f} |", flush=True)

        tar_cmd = ["tar", "-cf", str(work / "x.tar"), "-C", str(src), "train"]
        row("`tar -cf` (I/O limit)", 1, timed(subprocess.run, tar_cmd))
        row("naive `wds.ShardWriter` loop", 1, timed(naive_shardwriter, src, work / "naive"))
        quiet = ["--nodes", "1", "--gpus-per-node", "1", "--loader-workers", "1"]
        common = ["imagenet", "--src", str(src), "--shard-size", "100", "--threads", "2", "--splits", "train", *quiet]
        k = 0
        for label, extra in (("prep, store as-is (decode check)", []), ("prep, store as-is (--header-only)",
                                                                         ["--header-only"]),
                             ("prep, --resize 256 (re-encode q90)", ["--resize", "256"])):
            for procs in sorted({1, a.procs}):
                k += 1
                row(label, procs, timed(prep, [*common, *extra, "--out", str(work / f"o{k}"), "--workers", str(procs)]))
        clips = work / "clips"
        clips.mkdir()
        make_clips(clips, a.clips)
        print(f"\n{a.clips} H.264 clips, 426x240, 5 s at 30 fps -> 30 fps, short side 320 (no resize), keyint 8\n")
        print("| codec | procs | s | clips/s |\n|---|---:|---:|---:|")
        for codec in ("h264", "vp9", "jpeg"):
            for procs in sorted({1, a.procs}):
                k += 1
                secs = timed(prep, ["videolist", "--list", f"train={clips / 'train.txt'}", "--root", str(clips),
                                    "--out", str(work / f"o{k}"), "--codec", codec, "--shard-size", "2",
                                    "--workers", str(procs), "--threads", "1", *quiet])
                print(f"| {codec} | {procs} | {secs:.2f} | {a.clips / secs:.2f} |", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ---------------------------------------------------------------- --scale (issue 13)


def _rss_mb() -> float:
    """Peak resident set size of this process since its exec, MB (``VmHWM``; ``ru_maxrss`` includes the parent's)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _synthetic_samples(n: int, classes: int, root: Path) -> tuple[list[str], list]:  # noqa: ANN001
    """``n`` ImageNet-21k-like samples as the directory scan returns them (``Path`` objects, relative sources)."""
    from data_prep.scan import Sample

    wnids = [f"n{10_000_000 + 7 * c:08d}" for c in range(classes)]
    samples = []
    for i in range(n):
        c = i % classes
        name = f"{wnids[c]}_{i // classes + 1}.JPEG"
        samples.append(Sample(root / "train" / wnids[c] / name, c, wnids[c], f"train/{wnids[c]}/{name}"))
    return wnids, samples


def child(argv: list[str]) -> None:
    """One measurement in a fresh process; prints one JSON line (seconds, peak RSS)."""
    mode, rest = argv[0], argv[1:]
    if mode == "prep":  # prep with the code of tree rest[0]; imports done before the clock starts
        sys.path.insert(0, rest[0])
        import data_prep.imagenet  # noqa: F401
        import data_prep.shard  # noqa: F401
        from data_prep.manifest import rows_to_table
        from vitpipe.prep import main as prep_main

        rows_to_table([])  # pyarrow imports pandas on its first array: once per process, not per image
        logging.disable(logging.WARNING)
        workers_cpu, stop = {}, threading.Event()

        def sample() -> None:  # CPU of the pool's processes (forkserver children: not ours to wait for)
            import psutil

            me = psutil.Process()
            while not stop.wait(0.02):
                for proc in me.children(recursive=True):
                    with contextlib.suppress(psutil.Error):
                        workers_cpu[proc.pid] = sum(proc.cpu_times()[:2])

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        t, c = time.perf_counter(), time.process_time()
        if prep_main(["prep", *rest[1:]]) != 0:
            raise RuntimeError(f"prep {rest[1:]} failed")
        wall, cpu = time.perf_counter() - t, time.process_time() - c
        stop.set()
        sampler.join()
        print(json.dumps({"s": wall, "cpu": cpu, "pool_cpu": sum(workers_cpu.values())}))
        return
    if mode == "imports":  # the floor every measurement below includes
        import pyarrow.parquet  # noqa: F401

        import data_prep.planfile  # noqa: F401
        print(json.dumps({"rss_mb": _rss_mb()}))
        return
    n, tree, out = int(rest[0]), rest[1], Path(rest[2])
    sys.path.insert(0, tree)
    import pyarrow as pa

    from data_prep.plan import Plan, order_samples, task_range

    pa.array([1])  # pyarrow imports pandas on its first array from a list: not part of the work measured
    if mode == "after-task":  # one array task of 64 reads its slice of the plan file
        from data_prep.planfile import read_slice

        t0 = time.perf_counter()
        part = read_slice(out, 31, 64)
        print(json.dumps({"s": time.perf_counter() - t0, "rss_mb": _rss_mb(), "rows_read": part.rows_read,
                          "inputs": sum(len(t.items) for t in part.tasks), "shards": len(part.tasks)}))
        return
    if mode == "planner":
        from data_prep.planfile import write_plan
    t0 = time.perf_counter()
    wnids, samples = _synthetic_samples(n, 21_841, Path("/data/imagenet21k"))
    t1 = time.perf_counter()
    plan = Plan("image", wnids, {"train": order_samples(samples, 0, True)}, 1000,
                {"seed": 0, "resize": None, "quality": 90, "decode_check": True, "max_pixels": 89_478_485})
    del samples
    t2 = time.perf_counter()
    result: dict[str, float] = {"samples_s": t1 - t0, "order_s": t2 - t1}
    if mode == "planner":  # scan result -> plan -> plan file, once per dataset
        write_plan(plan, out, {"max_failure_rate": 0.01}, ["imagenet", "--src", "/data/imagenet21k"])
        result["write_s"] = time.perf_counter() - t2
    else:  # "before-task": what every array task did before: the whole plan, then its slice
        shards = plan.shards()
        mine = [shards[i] for i in task_range(len(shards), 31, 64)]
        result.update(digests_s=time.perf_counter() - t2, inputs=sum(len(t.items) for t in mine))
    result.update(s=time.perf_counter() - t0, rss_mb=_rss_mb())
    print(json.dumps(result))


def _child(*argv: str, tree: Path = REPO) -> dict:
    # cwd and PYTHONPATH: the pool's forkserver (a fresh interpreter) must import the same tree's code
    env = {**os.environ, "PYTHONPATH": str(tree)}
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", *argv], capture_output=True,
                          text=True, cwd=tree, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"child {argv[:2]} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _photo(w: int, h: int) -> bytes:
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC), dtype=np.int16)
    img = np.clip(img + rng.normal(0, 10, img.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _per_call_us(fn, n: int) -> float:  # noqa: ANN001
    best = float("inf")
    for _ in range(5):  # best of 5: the machine is shared
        t = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t) / n * 1e6)
    return best


def _micro() -> None:
    import tarfile

    from data_prep.images import check_decodes
    from data_prep.tarwrite import member_header

    print("Per image, one process, best of 5 (µs):\n")
    print("| step | 320×240 | 500×375 |\n|---|---:|---:|")
    photos = {size: _photo(*size) for size in ((320, 240), (500, 375))}
    rows = (("header only (`Image.open`)", lambda d: Image.open(io.BytesIO(d)).size),
            ("full decode (before)", lambda d: Image.open(io.BytesIO(d)).load()),
            ("1/8-scale luma decode (after)", lambda d: check_decodes(Image.open(io.BytesIO(d)))))
    for name, fn in rows:
        cells = [f"{_per_call_us(lambda d=d, fn=fn: fn(d), 200):,.0f}" for d in photos.values()]
        print(f"| {name} | {' | '.join(cells)} |", flush=True)
    info = tarfile.TarInfo("train_00000042.jpg")
    info.size = 77_000
    before = _per_call_us(lambda: [info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape") for _ in range(8)],
                          2000)
    after = _per_call_us(lambda: [member_header(b"train_00000042.jpg", 77_000) for _ in range(4)], 2000)
    print(f"| tar headers of a sample's 4 members: `tobuf` twice each (before) / template once (after) | "
          f"{before:,.0f} | {after:,.1f} |\n", flush=True)


def _before_tree(rev: str, work: Path) -> Path | None:
    tree = work / "before"
    tree.mkdir()
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "data_prep", "vitpipe"], capture_output=True)
    if archive.returncode != 0:
        print(f"(no 'before' rows: git archive {rev} failed: {archive.stderr.decode().strip()})\n")
        return None
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive.stdout, check=True)
    return tree


def _cpu_timed(fn, *args: object) -> tuple[float, float]:  # noqa: ANN001
    """``(wall s, CPU s)`` of ``fn(*args)``: this process's threads plus the child processes it waited for."""
    def cpu() -> float:
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)
        return time.process_time() + kids.ru_utime + kids.ru_stime

    t, c = time.perf_counter(), cpu()
    fn(*args)
    return time.perf_counter() - t, cpu() - c


def _throughput(a: argparse.Namespace, work: Path, before: Path | None) -> None:
    src = work / "src"
    mb = make_images(src, a.images) / 1e6
    print(f"{a.images} JPEGs of 500×375, q90, {mb:.1f} MB ({1e3 * mb / a.images:.0f} KB each); page cache warm. "
          f"prep rows: median of {a.reps} interleaved before/after runs, each in a fresh process (its pool's "
          "forkserver too) importing only that tree's code; the parent's imports are excluded. CPU s = CPU time of "
          "the process (all threads) plus, with procs > 1, of its pool (forkserver and workers, sampled every "
          "20 ms, their start-up imports included): the cost per image, which other jobs on the machine do not "
          "inflate as they do wall time.\n")
    print("| method | procs × threads | wall s | images/s | CPU s | images per CPU-s | vs before (CPU) |\n"
          "|---|---|---:|---:|---:|---:|---:|")
    n = a.images

    def row(name: str, shape: str, wall: float, cpu: float | None, ref: float | None = None) -> None:
        ratio = f"{ref / cpu:.2f}×" if ref and cpu else ""
        cpu_cells = f"{cpu:.2f} | {n / cpu:,.0f}" if cpu else "– | –"
        print(f"| {name} | {shape} | {wall:.2f} | {n / wall:,.0f} | {cpu_cells} | {ratio} |", flush=True)

    row("`tar -cf` (I/O limit, no checks)", "1", *_cpu_timed(subprocess.run, ["tar", "-cf", str(work / "x.tar"),
                                                                            "-C", str(src), "train"]))
    import webdataset  # noqa: F401 - its import (torch) is not part of the loop

    row("naive `wds.ShardWriter` loop (no checks)", "1", *_cpu_timed(naive_shardwriter, src, work / "naive"))
    quiet = ["--nodes", "1", "--gpus-per-node", "1", "--loader-workers", "1", "--splits", "train"]
    k = 0
    runs = (("full validation", [], 1, 1), ("full validation", [], 1, 2), ("--header-only", ["--header-only"], 1, 1),
            ("full validation", [], a.procs, 1))
    for label, extra, procs, threads in runs:
        got: dict[str, list[dict]] = {"before": [], "after": []}
        for _ in range(a.reps):
            for which, tree in (("before", before), ("after", REPO)):
                if tree is None:
                    continue
                k += 1
                args = ["imagenet", "--src", str(src), "--out", str(work / f"o{k}"), "--shard-size", "100",
                        "--workers", str(procs), "--threads", str(threads), *quiet, *extra]
                got[which].append(_child("prep", str(tree), *args, tree=tree))
                shutil.rmtree(work / f"o{k}")
        def med(which: str, key: str, got: dict[str, list[dict]] = got) -> float | None:
            values = [r["cpu"] + r["pool_cpu"] if key == "cpu" else r[key] for r in got[which]]
            return statistics.median(values) if values else None

        ref = med("before", "cpu")
        if got["before"]:
            row(f"prep, {label}, before", f"{procs} × {threads}", med("before", "s"), ref)
        row(f"prep, {label}, after", f"{procs} × {threads}", med("after", "s"), med("after", "cpu"), ref)
    print()


def _plan_scale(a: argparse.Namespace, work: Path, before: Path | None) -> None:
    from data_prep.scan import scan_imagefolder

    n = a.plan_inputs
    floor = _child("imports")["rss_mb"]
    out = work / "planned"
    planner = _child("planner", str(n), str(REPO), str(out))
    task = _child("after-task", str(n), str(REPO), str(out))
    old = _child("before-task", str(n), str(before), str(out), tree=before) if before else None
    sizes = {p.name: p.stat().st_size / 1e6 for p in (out / "_parts").iterdir()}
    print(f"Synthetic ImageNet-21k-like plan: {n:,} inputs in 21,841 classes, shard size 1,000 "
          f"({-(-n // 1000):,} shards), 64 array tasks; each row a fresh process. The inputs are built in memory "
          "as the directory scan returns them (`Path` objects); the scan itself is measured below. Peak RSS "
          f"includes {floor:.0f} MB of interpreter + numpy + pyarrow.\n")
    print("| who | inputs held | s | peak RSS MB |\n|---|---:|---:|---:|")
    if old:
        print(f"| before: every array task (scan result → order → whole plan + digests → its slice) | {n:,} | "
              f"{old['s']:.1f} (samples {old['samples_s']:.1f}, order {old['order_s']:.1f}, "
              f"digests {old['digests_s']:.1f}) | {old['rss_mb']:,.0f} |")
    print(f"| after: the planner, once (scan result → order → digests + plan file) | {n:,} | {planner['s']:.1f} "
          f"(samples {planner['samples_s']:.1f}, order {planner['order_s']:.1f}, write {planner['write_s']:.1f}) | "
          f"{planner['rss_mb']:,.0f} |")
    print(f"| after: one array task (reads its slice: {task['rows_read']:,} rows, {task['shards']} shards) | "
          f"{task['inputs']:,} | {task['s']:.2f} | {task['rss_mb']:,.0f} |")
    print("\nPlan files: " + ", ".join(f"`{k}` {v:,.1f} MB" for k, v in sorted(sizes.items())) + "\n")
    tree = work / "scan"
    for i in range(a.scan_files):
        d = tree / "train" / f"n{i % 100:08d}"
        if i < 100:
            d.mkdir(parents=True)
        (d / f"f{i:08d}.JPEG").touch()
    t = time.perf_counter()
    scan_imagefolder(tree / "train")
    secs = time.perf_counter() - t
    print(f"Directory scan (`scan_imagefolder`, warm dentry cache, local disk): {a.scan_files:,} files in {secs:.2f} s "
          f"= {1e6 * secs / a.scan_files:.1f} µs per file → {14.2e6 * secs / a.scan_files / 60:.1f} min for "
          "ImageNet-21k's 14.2 M files, once per dataset now instead of once per array task.\n")


def run_scale(a: argparse.Namespace) -> None:
    """The ``--scale`` tables (issue 13: preparation at scale)."""
    logging.basicConfig(level=logging.WARNING)
    load = os.getloadavg()
    print(f"{os.cpu_count()} CPUs, load average at start {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}; "
          f"before = `git archive {a.before[:10]}`\n")
    work = Path(tempfile.mkdtemp(prefix="bench_prep_scale_"))
    try:
        before = _before_tree(a.before, work)
        _micro()
        _throughput(a, work, before)
        _plan_scale(a, work, before)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    load = os.getloadavg()
    print(f"load average at end {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}")


if __name__ == "__main__":
    main()
