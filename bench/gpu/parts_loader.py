"""Parts ``loader_images`` and ``loader_video``: DALI on the GPU against the ``wds`` CPU path, same run.

The timing is bench/loader.py's (``compare``: interleaved rounds, steady state apart from epoch starts);
the configurations are its ``image_job`` / ``video_job`` at this run's sizes.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

from common import Result, earlier, fmt, load_bench, missing

HW_LOADS = (0.0, 0.65, 0.9)


def loader_args(ctx: dict[str, Any]) -> argparse.Namespace:
    """bench/loader.py's options at this run's sizes, every core a loader worker / DALI thread."""
    s = ctx["sizes"]
    return load_bench("loader").parse_args([
        "--workers", str(os.cpu_count() or 1), "--img-size", str(s["img_size"]), "--batch", str(s["batch"]),
        "--seconds", str(s["seconds"]), "--rounds", str(s["rounds"]), "--warmup", str(s["warmup"]),
        "--clip-size", str(s["clip_size"]), "--frames", str(s["frames"]), "--stride", str(s["stride"]),
        "--video-batch", str(s["video_batch"]), "--video-seconds", str(s["video_seconds"]),
        "--train-model", s["train_model"], "--train-size", str(s["train_size"]), "--train-batch", str(s["train_batch"]),
        "--train-steps", str(s["train_steps"]), "--log-every", str(s["log_every"])])


def _data(ctx: dict[str, Any]) -> dict[str, Any] | None:
    got = earlier(ctx, "data")
    return got["data"] if got and got.get("data", {}).get("shards") else None


def gpu_reason() -> str | None:
    """Why the DALI GPU rows cannot run here (None: they can)."""
    import torch

    if not torch.cuda.is_available():
        return "skipped: no CUDA device"
    return missing("nvidia.dali")


def _rows(res: Result, title: str, what: str, rows: list[Any], base_name: str) -> None:
    table = res.table(title, ["loader", f"{what}/s", "per unit", "units", f"vs {base_name}", "timed s", "passes",
                              "s per epoch start", "aug. errors"])
    base = next((r.rate.per_s for r in rows if r.name == base_name and r.rate), None)
    for r in rows:
        if r.rate is None:
            table.append([r.name, "–", "–", f"{r.units} {r.unit}", r.note, "", "", "", ""])
            continue
        table.append([r.name, fmt(r.rate.per_s), fmt(r.rate.per_s / r.units), f"{r.units} {r.unit}",
                      f"{r.rate.per_s / base:.2f}×" if base else "–", fmt(r.rate.seconds), fmt(r.rate.passes),
                      fmt(r.rate.epoch_start_cost, 2), r.errors])
    res.flush()


def loader_images(ctx: dict[str, Any], res: Result) -> None:
    """DALI GPU images/s (full augmentation) at hw_decoder_load 0 / 0.65 / 0.9 vs ``wds`` on all cores."""
    import torch

    if reason := missing("webdataset"):  # pipeline.data.loaders needs it, for the DALI rows too
        return res.finish(reason)
    data = _data(ctx)
    if data is None:
        return res.finish("skipped: no image data (part data did not finish)")
    lo, a = load_bench("loader"), loader_args(ctx)
    torch.set_num_threads(a.main_threads)
    shards, classes = Path(data["shards"]), data["classes"]
    reason = gpu_reason()
    # The training process's batch stage (normalise, erasing, mixup) runs where training would: the GPU.
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    wds_job = lo.image_job(a, shards, "wds")
    loaders = [lo.Loader("wds (PIL in workers)", a.workers, "workers", lambda: lo.ours(wds_job, dev, classes))]
    if reason is None:
        for load in HW_LOADS:
            job = lo.image_job(a, shards, "dali", "gpu")
            job = replace(job, data=replace(job.data, dali_hw_decoder_load=load))
            loaders.append(lo.Loader(f"dali GPU, hw_decoder_load {load}", 1, "GPU",
                                     lambda job=job: lo.ours(job, dev, classes)))
    rows = lo.compare(loaders, dataset=data["images"], rounds=a.rounds, seconds=a.seconds, warmup=a.warmup)
    for load in HW_LOADS if reason else ():
        rows.append(lo.Row(f"dali GPU, hw_decoder_load {load}", 1, "GPU", None, reason))
    _rows(res, f"Images: {a.img_size}² full training augmentation ({a.randaugment}, reprob {a.reprob}, mixup 0.8 / "
          f"CutMix 1.0), batch {a.batch}; {a.workers} CPU cores = workers / DALI threads; batch stage on {dev.type}",
          "images", rows, "wds (PIL in workers)")
    failed = [r.name for r in rows if r.rate is None and r.note.startswith("failed")]
    res.finish(f"failed: {', '.join(failed)}" if failed else "ok")


def loader_video(ctx: dict[str, Any], res: Result) -> None:
    """Video clips/s: NVDEC (DALI GPU) for H.264 and VP9 vs PyAV on the CPU."""
    import torch

    data = _data(ctx)
    video = (data or {}).get("video")
    if not video:
        return res.finish(missing("av") or "skipped: no clips (part data did not make them)")
    if reason := missing("webdataset"):
        return res.finish(reason)
    lo, a = load_bench("loader"), loader_args(ctx)
    torch.set_num_threads(a.main_threads)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cpu = [("wds, H.264 mp4, PyAV", lo.video_job(a, Path(video["h264"]), "wds")),
           ("wds, VP9 webm, PyAV", lo.video_job(a, Path(video["vp9"]), "wds", webm_backend="pyav"))]
    loaders = [lo.Loader(name, a.workers, "workers", lambda job=job: lo.ours(job, dev, 2)) for name, job in cpu]
    reason = gpu_reason()
    gpu_names = {"h264": "dali GPU (NVDEC), H.264 mp4", "vp9": "dali GPU (NVDEC), VP9 webm"}
    if reason is None:
        jobs = {c: lo.video_job(a, Path(video[c]), "dali", "gpu") for c in ("h264", "vp9")}
        loaders += [lo.Loader(gpu_names[c], 1, "GPU", lambda job=job: lo.ours(job, dev, 2)) for c, job in jobs.items()]
    rows = lo.compare(loaders, dataset=ctx["sizes"]["clips"], rounds=a.rounds, seconds=a.video_seconds,
                      warmup=a.warmup)
    if reason:
        rows += [lo.Row(name, 1, "GPU", None, reason) for name in gpu_names.values()]
    _rows(res, f"Video training clips: {a.frames} frames, stride {a.stride}, random-resized crop {a.clip_size} + flip, "
          f"batch {a.video_batch}; 320×240 clips → short side 240, keyframe every 8; {a.workers} CPU cores",
          "clips", rows, "wds, H.264 mp4, PyAV")
    failed = [r.name for r in rows if r.rate is None and r.note.startswith("failed")]
    res.finish(f"failed: {', '.join(failed)}" if failed else "ok")
