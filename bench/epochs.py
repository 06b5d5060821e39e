"""Epochs at scale (issue 13): what an epoch reads, what its planning costs, what an epoch boundary costs.

Usage: ``python bench/epochs.py [--only plan throughput boundary] [--images 1200] [--workers 2] [--batch 32]
[--epochs 4] [--rounds 4] [--work DIR]``

**plan** — ImageNet-1k (1,282 shards of 1,000, the last one partial) and ImageNet-21k (14,197 × 1,000)
shard lists at 64 ranks × 8 workers × batch 256, no data needed:

* ``stream`` sampling (before; what every run did until now): each worker reads its shards ``r::R``,
  ``w::W`` of the epoch's permutation and delivers every ``W``-th batch of the rank (PyTorch's round
  robin); the share of the epoch's samples its shards hold beyond its quota is not read, the share it
  lacks comes from its shards of the next epoch's permutation;
* ``exact`` sampling (after): counted from :meth:`pipeline.data.order.SamplePlan.epoch_table` (the table
  ``vitpipe order`` prints);
* what planning costs: one rank's epoch as the loader draws it (step by step), and every rank's table
  at once (``vitpipe order``), wall time and peak traced memory.

**boundary** — real shards (``--images`` ImageNet-like JPEGs from ``bench/loader.py``'s generator, sharded by
``vitpipe prep imagenet``, shards of ``--shard-size``), one rank, random-resized crop to 224 + flip:

* ``wds`` with ``stream`` sampling (before: the DataLoader restarts at every epoch and drops what its
  workers prefetched) and with ``exact`` sampling (after: one iterator across epochs);
* ``dali`` (CPU backend) with one pipeline per epoch (before, as the loader did until now: emulated by
  closing the pipeline at every epoch start) and with one pipeline per run (after).

**throughput** — the same shards, ``wds`` flat out (no simulated step), ``stream`` vs ``exact`` sampling in
interleaved rounds (one epoch each, its first two batches untimed): does reading each sample by byte
range cost throughput against streaming whole shards?

In **boundary**, epoch 0 calibrates: the loader runs flat out and its time per batch ``t`` is measured. The later epochs
run with a simulated device step of ``--step-factor × t`` after each batch (a sleep: the device's work
leaves the CPU to the loader), so that the loader keeps up in steady state. Printed per loader: the median
wait for a batch in steady state, the mean wait for the first batch of each later epoch (the boundary),
that wait in steady-state steps, and the samples decoded but never trained on per boundary (decoded minus
trained on, counted at the end of each epoch after the prefetch settled, growth per epoch).
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import multiprocessing
import os
import shutil
import statistics
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.data.order import SamplePlan, shard_permutation  # noqa: E402

SHAPES = {"ImageNet-1k": np.array([1000] * 1281 + [167]), "ImageNet-21k": np.full(14_197, 1000)}


# ------------------------------------------------------------------------------------------------ plan


def stream_epoch(sizes: np.ndarray, ranks: int, workers: int, batch: int, epoch: int = 0) -> tuple[float, float]:
    """Stream sampling: fractions of the epoch's samples not read, and read from the next epoch's shards."""
    total, steps = int(sizes.sum()), int(sizes.sum()) // (ranks * batch)
    order = shard_permutation(len(sizes), 0, epoch)  # the stream mode's epoch_shard_order
    unseen = borrowed = 0
    for r in range(ranks):
        mine = order[r::ranks]
        for w in range(workers):
            quota = len(range(w, steps, workers)) * batch  # batches w, w + W, ... of the rank
            have = int(sizes[mine[w::workers]].sum())
            unseen, borrowed = unseen + max(have - quota, 0), borrowed + max(quota - have, 0)
    return unseen / total, borrowed / total


def exact_epoch(sizes: np.ndarray, ranks: int, batch: int) -> tuple[float, float, int]:
    """Exact sampling: fractions not read and read twice, and steps per rank, from the plan itself."""
    table = SamplePlan(sizes, seed=0, rank=0, world_size=ranks, batch_size=batch, block_shards=16).epoch_table(0)
    counts = np.bincount(table.ravel(), minlength=int(sizes.sum()))
    return float((counts == 0).mean()), float((counts > 1).mean()), table.shape[0]


def timed(fn: Callable[[], Any]) -> tuple[float, float]:
    """Seconds and peak traced MB of ``fn()``."""
    tracemalloc.start()
    t0 = time.perf_counter()
    fn()
    seconds = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1] / 1e6
    tracemalloc.stop()
    return seconds, peak


def plan_part(ranks: int = 64, workers: int = 8, batch: int = 256) -> None:
    """Prints what an epoch reads with each sampling, and what planning costs."""
    print(f"\n{ranks} ranks × {workers} workers × batch {batch}, one epoch")
    print("| shard list | samples | sampling | steps per rank | not read | read twice / from the next epoch |")
    print("|---|---|---|---|---|---|")
    for name, sizes in SHAPES.items():
        unseen, borrowed = stream_epoch(sizes, ranks, workers, batch)
        steps = int(sizes.sum()) // (ranks * batch)
        print(f"| {name} | {sizes.sum():,} | stream (before) | {steps} | {100 * unseen:.1f} % | "
              f"{100 * borrowed:.1f} % |")
        unseen, twice, steps = exact_epoch(sizes, ranks, batch)
        print(f"| {name} | {sizes.sum():,} | exact (after) | {steps} | {100 * unseen:.2f} % (the remainder) | "
              f"{100 * twice:.1f} % |")
    print("\n| planning (ImageNet-21k) | seconds | peak traced memory |")
    print("|---|---|---|")
    sizes = SHAPES["ImageNet-21k"]

    def one_rank() -> None:
        plan = SamplePlan(sizes, seed=0, rank=17, world_size=ranks, batch_size=batch, block_shards=16)
        for _, _ in zip(range(plan.steps_per_epoch), plan.batches(0), strict=False):
            pass

    def every_rank() -> None:
        SamplePlan(sizes, seed=0, rank=0, world_size=ranks, batch_size=batch, block_shards=16).epoch_table(0)

    for label, fn in (("one rank's epoch, batch by batch (the loader)", one_rank),
                      (f"every rank's table at once ({ranks} × steps × {batch}: `vitpipe order`)", every_rank)):
        seconds, peak = timed(fn)
        print(f"| {label} | {seconds:.2f} | {peak:.0f} MB |")


# -------------------------------------------------------------------------------------------- boundary


def _bench_loader_module() -> Any:
    spec = importlib.util.spec_from_file_location("bench_loader_script", ROOT / "bench" / "loader.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def make_shards(work: Path, images: int, shard_size: int) -> Path:
    """ImageNet-like JPEGs sharded by ``vitpipe prep imagenet`` (kept in ``work`` for a rerun)."""
    shards = work / "shards"
    if not (shards / "dataset.json").is_file():
        loader = _bench_loader_module()
        loader.make_image_tree(work / "jpeg", images, classes=10)
        loader.prep(["imagenet", "--src", str(work / "jpeg"), "--out", str(shards), "--shard-size", str(shard_size),
                     "--workers", "2"])
    return shards


class Counted:
    """A per-sample function that counts its calls in shared memory (loader workers are forked)."""

    def __init__(self, fn: Callable[[Any], Any]) -> None:
        self.fn, self.calls = fn, multiprocessing.Value("q", 0)

    def __call__(self, sample: Any) -> Any:  # noqa: D102
        with self.calls.get_lock():
            self.calls.value += 1
        return self.fn(sample)


def build(kind: str, shards: Path, a: argparse.Namespace) -> tuple[Any, Callable[[], int]]:
    """A rank's backend training loader and a counter of the samples it decoded."""
    from pipeline.config import DataCfg
    from pipeline.data.sample_transforms import train_transform
    from pipeline.data.wds import build_train_loader, image_sample_fn

    cfg = DataCfg(path=str(shards), img_size=224, batch_size=a.batch, num_workers=a.workers, backend="wds",
                  dali_device="cpu", dali_threads=a.workers, shuffle_buffer=256)
    if kind.startswith("wds"):
        fn = Counted(image_sample_fn(train_transform(cfg)))
        loader = build_train_loader(shards, "train", fn, batch_size=a.batch, num_workers=a.workers, rank=0,
                                    world_size=1, seed=0, shuffle_buffer=256,
                                    sampler="stream" if "stream" in kind else "exact")
        return loader, lambda: fn.calls.value
    import pipeline.data.dali as dali

    fed = [0]
    read = dali.read_media

    def counting(index: Any, files: Any, ids: np.ndarray) -> Any:
        fed[0] += len(ids)
        return read(index, files, ids)

    dali.read_media = counting
    return dali.DaliLoader(replace(cfg, backend="dali"), "train", batch_size=a.batch, rank=0, world_size=1, seed=0,
                           train=True), lambda: fed[0]


def boundary_run(kind: str, shards: Path, a: argparse.Namespace) -> dict[str, float]:
    """Runs ``a.epochs`` epochs (epoch 0 calibrates) and measures waits and waste."""
    loader, decoded = build(kind, shards, a)
    waits: dict[int, list[float]] = {}
    excess: list[int] = []
    step_s = 0.0
    consumed = 0
    for epoch in range(a.epochs):
        if kind == "dali, one pipeline per epoch (before)":
            loader._close()  # the former loader built a pipeline in every epoch's __iter__
        loader.set_epoch(epoch)
        waits[epoch] = []
        t = time.perf_counter()
        start = time.perf_counter()
        for batch in loader:
            waits[epoch].append(time.perf_counter() - t)
            consumed += len(batch["label"])
            if step_s:
                time.sleep(step_s)
            t = time.perf_counter()
        if epoch == 0:  # calibration: the loader flat out
            step_s = a.step_factor * (time.perf_counter() - start) / len(waits[0])
        time.sleep(3 * step_s)  # let the prefetch settle, so that the count below sees whole batches
        excess.append(decoded() - consumed)
    steady = statistics.median(w for e in range(1, a.epochs) for w in waits[e][2:])
    boundary = statistics.mean(waits[e][0] for e in range(2, a.epochs))
    waste = [excess[e] - excess[e - 1] for e in range(2, a.epochs)]
    del loader
    return {"step_s": step_s, "steady": steady, "boundary": boundary, "waste": statistics.mean(waste)}


def boundary_part(a: argparse.Namespace, work: Path) -> None:
    """Prints the epoch-boundary table."""
    import torch

    torch.set_num_threads(1)
    shards = make_shards(work, a.images, a.shard_size)
    kinds = ["wds, stream sampling (before)", "wds, exact sampling (after)",
             "dali, one pipeline per epoch (before)", "dali, one pipeline per run (after)"]
    print(f"\n{a.images} ImageNet-like JPEGs in shards of {a.shard_size}, 1 rank, batch {a.batch}, "
          f"{a.workers} workers (dali: threads), {a.epochs} epochs (epoch 0 calibrates), "
          f"simulated step = {a.step_factor} × the loader's own time per batch")
    print("| loader | epoch 0 (calibration): time per batch | simulated step | steady-state wait per batch (median) | "
          "first batch of an epoch: wait | in steady-state steps | decoded, never trained on, per epoch boundary |")
    print("|---|---|---|---|---|---|---|")
    for kind in kinds:
        r = boundary_run(kind, shards, a)
        step = r["step_s"] + r["steady"]
        waste = "– (the former feed stopped at the epoch's end)" if "per epoch" in kind else f"{r['waste']:.0f}"
        print(f"| {kind} | {1e3 * r['step_s'] / a.step_factor:.0f} ms | {1e3 * r['step_s']:.0f} ms | "
              f"{1e3 * r['steady']:.1f} ms | {1e3 * r['boundary']:.0f} ms | {r['boundary'] / step:.2f} | {waste} |",
              flush=True)


def throughput_part(a: argparse.Namespace, work: Path) -> None:
    """Prints wds images/s with stream and exact sampling, interleaved rounds."""
    import torch

    torch.set_num_threads(1)
    shards = make_shards(work, a.images, a.shard_size)
    loaders = {kind: build(kind, shards, a)[0] for kind in ("wds, stream sampling (before)",
                                                             "wds, exact sampling (after)")}
    times: dict[str, list[float]] = {kind: [] for kind in loaders}
    for epoch in range(a.rounds):
        for kind, loader in loaders.items():
            loader.set_epoch(epoch)
            batches = iter(loader)
            next(batches), next(batches)  # untimed: worker start-up, refill after the previous round
            t0, n = time.perf_counter(), 0
            for batch in batches:
                n += len(batch["label"])
            times[kind].append(n / (time.perf_counter() - t0))
    print(f"\n{a.images} ImageNet-like JPEGs, 1 rank, batch {a.batch}, {a.workers} workers, random-resized crop "
          f"224 + flip, {a.rounds} interleaved rounds of one epoch")
    print("| loader | images/s (median) | rounds |")
    print("|---|---|---|")
    for kind, rates in times.items():
        print(f"| {kind} | {statistics.median(rates):.0f} | {', '.join(f'{r:.0f}' for r in rates)} |")


def main(argv: list[str] | None = None) -> None:
    """Runs the requested parts."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", nargs="+", choices=("plan", "throughput", "boundary"),
                   default=["plan", "throughput", "boundary"])
    p.add_argument("--images", type=int, default=1200)
    p.add_argument("--shard-size", type=int, default=100)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--epochs", type=int, default=4, help="epochs per loader, the first one calibrates (>= 3)")
    p.add_argument("--step-factor", type=float, default=1.5)
    p.add_argument("--rounds", type=int, default=4, help="throughput: interleaved rounds")
    p.add_argument("--work", type=Path, help="work directory, kept (default: a temporary one, removed)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    load = os.getloadavg()
    print(f"{os.cpu_count()} CPU cores, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}", flush=True)
    work = a.work or Path(tempfile.mkdtemp(prefix="bench-epochs-"))
    try:
        if "plan" in a.only:
            plan_part()
        if "throughput" in a.only:
            throughput_part(a, work)
        if "boundary" in a.only:
            boundary_part(a, work)
    finally:
        if a.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
