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
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


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
    a = ap.parse_args()
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


if __name__ == "__main__":
    main()
