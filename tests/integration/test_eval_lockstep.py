"""Evaluation on 3 processes whose shares of the validation split differ never deadlocks, on every engine.

The validation split has 1 shard (two ranks get nothing) or 4 shards of unequal sizes (the ranks get
unequal batch counts). Under DeepSpeed ZeRO-3 every forward all-gathers the weights, so a rank that
stopped early used to leave the others waiting forever; now every rank runs the same number of forward
passes and the metrics equal a 1-process evaluation of the same weights.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import model
from data_prep.digits import write_digits
from data_prep.shard import prep_imagefolder
from pipeline.build import build_model
from pipeline.config_io import load_config
from pipeline.data.loaders import build_eval
from pipeline.data.shards import read_split
from pipeline.evaluate import evaluate
from tests.conftest import ROOT

pytestmark = pytest.mark.slow

PROCS = 3
BASE = ["--model.name=vit_pico_patch4_32", "--model.num_classes=10", "--data.img_size=32", "--data.num_workers=1",
        "--data.batch_size=16", "--eval.batch_size=16", "--engine.mixed_precision=no", "--run.seed=3"]
ENGINES = {"ddp": [], "zero3": ["--engine.backend=deepspeed", "--engine.zero_stage=3"]}


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    tmp = tmp_path_factory.mktemp("lockstep")
    raw = tmp / "raw"
    write_digits(raw, size=32, limit=400)
    datasets = {"one_shard": tmp / "one", "unequal": tmp / "unequal"}
    prep_imagefolder(raw, datasets["one_shard"], shard_size=1000, workers=1)
    prep_imagefolder(raw, datasets["unequal"], shard_size=23, workers=1)
    torch.manual_seed(0)
    weights = tmp / "w.safetensors"
    save_file(model.create_model("vit_pico_patch4_32", num_classes=10).state_dict(), str(weights))
    return weights, datasets


def test_the_splits_are_uneven(setup: tuple[Path, dict[str, Path]]) -> None:
    _, datasets = setup
    one, _ = read_split(datasets["one_shard"], "val")
    unequal, _ = read_split(datasets["unequal"], "val")
    assert len(one) == 1
    assert len(unequal) == PROCS + 1 and len({s.num_samples for s in unequal}) > 1


@pytest.mark.parametrize("engine", sorted(ENGINES))
def test_every_rank_finishes_with_the_one_process_metrics(setup: tuple[Path, dict[str, Path]], engine: str,
                                                          tmp_path: Path) -> None:
    weights, datasets = setup
    out = tmp_path / "result.json"
    overrides = [*BASE, *ENGINES[engine]]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={PROCS}",
           str(ROOT / "tests" / "integration" / "eval_worker.py"), str(out), str(weights),
           *map(str, datasets.values()), "--", *overrides]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    for path in datasets.values():
        cfg = load_config(None, [*BASE, f"--data.path={path}"])
        cpu = torch.device("cpu")
        want = evaluate(build_model(cfg, weights=weights), build_eval(cfg, "val", rank=0, world_size=1, device=cpu),
                        cpu)
        got = results[str(path)]
        total = sum(s.num_samples for s in read_split(path, "val")[0])
        assert got["samples"] == want["samples"] == total  # every validation sample exactly once
        assert (got["top1"], got["top5"]) == (want["top1"], want["top5"])
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
