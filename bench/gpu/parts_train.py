"""Parts ``pytest_gpu`` (the gpu-marked tests), ``train_loader`` (data wait through the loaders) and ``engines``.

``train_loader`` and ``engines`` run the real trainer (``python -m pipeline.train``) through bench/loader.py's
``train_wait`` (its recipe: the ImageNet-like shards, the full augmentation), one process on one device.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from common import ROOT, Result, earlier, fmt, load_bench, missing
from parts_loader import gpu_reason, loader_args

TEST_LINE = re.compile(r"^(tests/\S+::\S+)\s+(PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)")


def gpu_test_files() -> list[str]:
    """The gpu-marked test modules: ``tests/**/test_*gpu*.py``."""
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").rglob("test_*gpu*.py"))


def pytest_gpu(ctx: dict[str, Any], res: Result) -> None:
    """``pytest -m gpu`` over the gpu test modules; one row per test."""
    if reason := missing("pytest"):
        return res.finish(reason)
    files = gpu_test_files()
    table = res.table(f"pytest -m gpu ({', '.join(files)})", ["test", "outcome"])
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", *files, "-v", "-rs", "-p", "no:cacheprovider",
           f"--basetemp={Path(ctx['work']) / 'pytest'}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    tail: list[str] = []
    for line in proc.stdout:
        print(line, end="", flush=True)
        tail = (tail + [line.rstrip()])[-40:]
        if m := TEST_LINE.match(line):
            table.append([m.group(1), m.group(2)])
            res.flush()
    proc.wait()
    bad = [r for r in table if r[1] in ("FAILED", "ERROR")]
    if proc.returncode not in (0, 5) or bad:
        res.obj["notes"] += tail[-15:]
        return res.finish(f"failed: {len(bad)} of {len(table)} tests (pytest exit {proc.returncode})")
    res.finish("ok" if table else "failed: no tests collected")


def _shards(ctx: dict[str, Any]) -> Path | None:
    got = earlier(ctx, "data")
    return Path(got["data"]["shards"]) if got and got.get("data", {}).get("shards") else None


def _trainer_extra(ctx: dict[str, Any]) -> list[str]:
    import torch

    peak = float((earlier(ctx, "env") or {"data": {}})["data"].get("peak_bf16_tflops") or 0.0)
    extra: list[str] = []
    if torch.cuda.is_available():
        extra += ["--engine.mixed_precision=bf16", f"--engine.peak_tflops={peak}"]
    return extra


def _train_rows(ctx: dict[str, Any], res: Result, title: str, runs: list[tuple[str, str, str, list[str], str | None]],
                base: str) -> None:
    """Runs ``(label, backend, dali_device, extra, skip reason)`` trainer runs and fills one table."""
    shards = _shards(ctx)
    if shards is None:
        return res.finish("skipped: no image data (part data did not finish)")
    lo, a = load_bench("loader"), loader_args(ctx)
    work = Path(ctx["work"]) / f"train-{res.path.stem}"
    work.mkdir(parents=True, exist_ok=True)
    cols = ["run", "img/s", "ms/step", f"vs {base}", "data wait", "first window wait", "MFU", "windows", "run wall s"]
    table = res.table(title, cols)
    for label, *_, reason in runs:
        table.append([label, reason or "not reached (part time box)"] + [""] * (len(cols) - 2))
    res.flush()
    got: dict[str, dict[str, float]] = {}
    for i, (label, backend, dev, extra, reason) in enumerate(runs):
        if reason:
            continue
        try:
            r = lo.train_wait(a, work, shards, backend, dev, extra=[*_trainer_extra(ctx), *extra],
                              tag="-" + re.sub(r"\W+", "-", label))
        except Exception as err:  # noqa: BLE001 - one run failing keeps the others' figures
            table[i] = [label, f"failed: {str(err)[:200]}"] + [""] * (len(cols) - 2)
            res.flush()
            continue
        got[label] = r
        b = got.get(base)
        table[i] = [label, fmt(r["img_per_s"]), fmt(a.train_batch / r["img_per_s"] * 1e3),
                    f"{r['img_per_s'] / b['img_per_s']:.2f}×" if b else "–", f"{100 * r['wait']:.1f} %",
                    f"{100 * r['first_wait']:.0f} %", f"{100 * r['mfu']:.1f} %" if r["mfu"] == r["mfu"] else "–",
                    r["windows"], fmt(r["wall"], 0)]
        res.obj["data"]["rows"] = got
        res.flush()
    failed = [r[0] for r in table if str(r[1]).startswith("failed")]
    res.finish(f"failed: {', '.join(failed)}" if failed else "ok")


def train_loader(ctx: dict[str, Any], res: Result) -> None:
    """The trainer through the ``wds`` loader (all cores) and the DALI GPU loader: img/s and data-wait fraction."""
    if reason := missing("webdataset", "accelerate"):
        return res.finish(reason)
    s, a = ctx["sizes"], loader_args(ctx)
    runs = [("wds (CPU workers)", "wds", "cpu", [], None),
            ("dali GPU", "dali", "gpu", [], gpu_reason())]
    _train_rows(ctx, res, f"Training loop through the loaders: `python -m pipeline.train`, {s['train_model']} at "
                f"{s['train_size']}², batch {s['train_batch']}, {s['train_steps']} steps, full augmentation, "
                f"{a.workers} workers / DALI threads; data wait = share of wall time waiting for the next batch "
                f"(windows of {s['log_every']} steps, the first excluded)", runs, "wds (CPU workers)")


def engines(ctx: dict[str, Any], res: Result) -> None:
    """DDP vs DeepSpeed ZeRO-1/2/3 step time on one GPU: the engines' own overhead."""
    import torch

    if reason := missing("webdataset", "accelerate"):
        return res.finish(reason)
    s = ctx["sizes"]
    ctx["sizes"] = {**s, "train_batch": s["engine_batch"], "train_steps": s["engine_steps"]}
    dali = gpu_reason() is None
    backend, dev = ("dali", "gpu") if dali else ("wds", "cpu")
    ds = missing("deepspeed")
    runs = [("ddp", backend, dev, [], None)] + [
        (f"zero{z}", backend, dev, ["--engine.backend=deepspeed", f"--engine.zero_stage={z}"], ds) for z in (1, 2, 3)]
    where = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    _train_rows(ctx, res, f"Engines on one device ({where}): `python -m pipeline.train`, {s['train_model']}, batch "
                f"{s['engine_batch']}, {s['engine_steps']} steps, {backend} loader ({dev}); ms/step = batch / img/s of "
                "the logged windows after the first", runs, "ddp")
