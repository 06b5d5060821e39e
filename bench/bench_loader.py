"""Throughput of the CPU webdataset loader (decode + augment + batch), by number of workers.

Usage: python bench/bench_loader.py [--workers 0 1 2] [--batches 60] [--img-size 32]

Shards the embedded digits once (JPEG, real codec), then times iterating the training loader of one
rank with each worker count and prints images/s. The baseline is decoding in the training process
(0 workers). The DALI backend (issue #6) is compared against these figures.
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import time
from pathlib import Path

from pipeline.config import DataCfg
from pipeline.data_wds import build_train_loader
from pipeline.transforms import train_transform
from vitpipe.demo import prepare_digits


def images_per_second(path: Path, workers: int, batches: int, cfg: DataCfg) -> float:
    """Iterates ``batches`` batches (after one warm-up batch) and returns images per second."""
    loader = build_train_loader(path, "train", train_transform(cfg), batch_size=cfg.batch_size,
                                num_workers=workers, rank=0, world_size=1, seed=0, shuffle_buffer=256)
    it = iter(loader)
    next(it)
    t0 = time.perf_counter()
    n = sum(b["label"].numel() for b in itertools.islice(it, batches))
    return n / (time.perf_counter() - t0)


def main() -> None:
    """Prints images/s for each worker count."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--img-size", type=int, default=32)
    args = parser.parse_args()
    path = prepare_digits(Path(tempfile.mkdtemp(prefix="bench-loader-")))
    cfg = DataCfg(img_size=args.img_size, batch_size=64, hflip=0.0)
    print(f"{'workers':>7} {'img/s':>8}")
    for workers in args.workers:
        print(f"{workers:>7} {images_per_second(path, workers, args.batches, cfg):>8.0f}", flush=True)


if __name__ == "__main__":
    main()
