"""bench/loader.py: its data generator and its interleaved timing, on fakes (no timing assertions)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_loader_script", ROOT / "bench" / "loader.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def test_image_tree_is_imagefolder_jpegs(bench, tmp_path: Path) -> None:
    kb = bench.make_image_tree(tmp_path, images=6, classes=3, val_per_class=1)
    train = sorted((tmp_path / "train").rglob("*.JPEG"))
    assert len(train) == 6 and len(list((tmp_path / "val").rglob("*.JPEG"))) == 3
    assert sorted(p.name for p in (tmp_path / "train").iterdir()) == ["n00000000", "n00000001", "n00000002"]
    with Image.open(train[0]) as im:
        assert im.format == "JPEG" and im.size in bench.SIZES
    assert kb > 0


def test_compare_interleaves_rounds_and_reports_failures(bench) -> None:
    order = []

    def fake(name: str):
        def epochs(epoch: int):
            for _ in range(3):
                order.append(name)
                yield {"label": torch.zeros(4, dtype=torch.int64)}
        return lambda: epochs

    def broken():
        raise RuntimeError("no such backend")

    loaders = [bench.Loader("a", 2, "workers", fake("a")), bench.Loader("b", 2, "workers", fake("b")),
               bench.Loader("c", 1, "GPU", broken)]
    rows = bench.compare(loaders, dataset=12, rounds=2, seconds=0.02, warmup=1)
    assert [r.name for r in rows] == ["a", "b", "c"]
    assert rows[0].rate.items > 0 and rows[0].rate.items % 4 == 0 and rows[0].rate.passes == rows[0].rate.items / 12
    assert rows[2].rate is None and "no such backend" in rows[2].note
    switches = sum(1 for x, y in zip(order, order[1:], strict=False) if x != y)
    assert switches >= 3  # a b a b: the rounds interleave


def test_redraw_on_error_counts_and_retries(bench) -> None:
    calls = iter([ValueError("bits"), 7])

    def flaky(_):
        value = next(calls)
        if isinstance(value, Exception):
            raise value
        return value

    bench.ERRORS.value = 0
    assert bench.RedrawOnError(flaky)(np.zeros(1)) == 7 and bench.ERRORS.value == 1


def test_recipe_is_a_valid_config(bench, tmp_path: Path) -> None:
    from pipeline.config_io import load_config

    args = bench.parse_args(["--workers", "1"])
    path = tmp_path / "r.toml"
    path.write_text(bench.recipe(args, tmp_path / "shards", "dali", "cpu"))
    cfg = load_config(str(path), [])
    assert cfg.data.backend == "dali" and cfg.data.mixup == 0.8 and cfg.schedule.max_steps == args.train_steps
