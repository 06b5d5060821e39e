"""Parts ``env`` (versions of everything a figure depends on) and ``data`` (the generated data sets)."""

from __future__ import annotations

import multiprocessing
import os
import platform
import shutil
import subprocess
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from common import Result, load_bench, missing, peak_tflops


def _version(*dists: str) -> str:
    """The installed version of the first distribution found (read from its metadata, not imported)."""
    for dist in dists:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return "not installed"


def _driver() -> str:
    if shutil.which("nvidia-smi") is None:
        return "–"
    out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                         text=True, timeout=20)
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else "–"


def env(ctx: dict[str, Any], res: Result) -> None:
    """Device, driver, CUDA, torch, DALI and the other versions the figures depend on."""
    import torch

    cuda = torch.cuda.is_available()
    name = torch.cuda.get_device_name(0) if cuda else f"CPU ({platform.processor() or platform.machine()})"
    mem = torch.cuda.get_device_properties(0).total_memory / 2**30 if cuda else 0.0
    facts = {
        "device": name, "device_memory_gib": round(mem, 1), "gpus": torch.cuda.device_count() if cuda else 0,
        "driver": _driver(), "cuda": torch.version.cuda or "–", "cudnn": str(torch.backends.cudnn.version() or "–"),
        "torch": torch.__version__,
        "dali": _version("nvidia-dali-cuda130", "nvidia-dali-cuda120", "nvidia-dali-cuda110", "nvidia-dali"),
        "pyav": _version("av"), "webdataset": _version("webdataset"), "deepspeed": _version("deepspeed"),
        "timm": _version("timm"), "accelerate": _version("accelerate"), "mlflow": _version("mlflow"),
        "python": platform.python_version(), "cpu_cores": os.cpu_count(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "peak_bf16_tflops": peak_tflops(name) if cuda else 0.0,
    }
    rows = res.table("Environment", ["what", "value"])
    rows += [[k, v] for k, v in facts.items()]
    res.obj["data"] = facts
    res.finish()


# ------------------------------------------------------------------------------------------- data


def _write_images(job: tuple[str, int, int, int, int, int]) -> int:
    """Writes JPEGs ``start..stop`` of one split (worker process); returns their bytes."""
    src, split_id, start, stop, classes, quality = job
    from PIL import Image

    loader = load_bench("loader")
    import numpy as np

    split = ("train", "val")[split_id]
    total = 0
    for i in range(start, stop):
        rng = np.random.default_rng([split_id, i])
        width, height = loader.SIZES[int(rng.integers(len(loader.SIZES)))]
        folder = Path(src) / split / f"n{i % classes:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{split}_{i:06d}.JPEG"
        # Baseline (not progressive) 4:2:0 JPEG: what ImageNet holds and the hardware decoder takes.
        Image.fromarray(loader.photo(rng, width, height)).save(path, quality=quality, progressive=False,
                                                               subsampling="4:2:0")
        total += path.stat().st_size
    return total


def make_images(src: Path, images: int, classes: int, quality: int, workers: int) -> float:
    """ImageNet-like ``SRC/{train,val}/<class>/*.JPEG`` written by ``workers`` processes; mean train KB."""
    val = 2 * classes
    step = max(images // (4 * workers), 1)
    jobs = [(str(src), 0, s, min(s + step, images), classes, quality) for s in range(0, images, step)]
    jobs += [(str(src), 1, s, min(s + step, val), classes, quality) for s in range(0, val, step)]
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        sizes = pool.map(_write_images, jobs)
    train_jobs = sum(1 for j in jobs if j[1] == 0)
    return sum(sizes[:train_jobs]) / images / 1e3


def data(ctx: dict[str, Any], res: Result) -> None:
    """Generates the JPEGs and clips and shards them with ``vitpipe prep`` (imagenet, videolist)."""
    s, work, cores = ctx["sizes"], Path(ctx["work"]), os.cpu_count() or 1
    loader = load_bench("loader")
    rows = res.table("Generated data (on this machine, no downloads)", ["data set", "items", "detail", "seconds"])
    src, shards = work / "imagenet-like", work / "imagenet-like-wds"
    t0 = time.perf_counter()
    kb = make_images(src, s["images"], s["classes"], s["jpeg_quality"], cores)
    t1 = time.perf_counter()
    loader.prep(["imagenet", "--src", str(src), "--out", str(shards), "--shard-size", str(s["shard_size"]),
                 "--workers", str(cores)])
    rows.append(["ImageNet-like JPEGs (`vitpipe prep imagenet`)", s["images"],
                 f"{s['classes']} classes, 500×375-like sizes, baseline JPEG q{s['jpeg_quality']}, {kb:.0f} KB mean, "
                 f"{s['shard_size']} per shard", f"{t1 - t0:.1f} + prep {time.perf_counter() - t1:.1f}"])
    res.obj["data"].update(shards=str(shards), src=str(src), images=s["images"], classes=s["classes"], kb=kb)
    res.flush()
    reason = missing("av")
    if reason:
        res.note(f"clips: {reason}")
        res.finish()
        return
    import av

    for codec in ("libx264", "libvpx-vp9"):
        if codec not in av.codecs_available:
            res.note(f"clips: skipped: PyAV has no {codec} encoder")
            res.finish()
            return
    clips = work / "clips"
    clips.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    loader.make_clips(clips, s["clips"], 2, s["clip_frames"])
    rows.append(["source clips (H.264, PyAV libx264)", s["clips"] + 2, f"320×240, {s['clip_frames']} frames at 30 fps",
                 f"{time.perf_counter() - t0:.1f}"])
    video = {}
    for codec in ("h264", "vp9"):
        out, t0 = work / f"clips-{codec}", time.perf_counter()
        loader.prep(["videolist", "--list", f"train={clips / 'train.txt'}", "--list", f"val={clips / 'val.txt'}",
                     "--root", str(clips), "--out", str(out), "--codec", codec, "--fps", "30", "--short-side", "240",
                     "--keyint", "8", "--shard-size", "2", "--workers", str(cores), "--threads", "1"])
        rows.append([f"`vitpipe prep videolist --codec {codec}`", s["clips"] + 2, "short side 240, keyframe every 8",
                     f"{time.perf_counter() - t0:.1f}"])
        video[codec] = str(out)
        res.obj["data"]["video"] = video
        res.flush()
    res.finish()
