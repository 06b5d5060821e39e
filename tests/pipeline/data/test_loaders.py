"""Both backends (``wds`` and DALI's CPU backend) behind one batch contract, on shards made by `vitpipe prep`."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from data_prep.format import read_index
from pipeline.config import DataCfg, JobCfg
from pipeline.data.dali import DaliLoader, epoch_plan
from pipeline.data.loaders import build_eval, build_loaders
from pipeline.data.shards import epoch_shard_order, read_split
from pipeline.data.wds import build_train_loader
from tests.conftest import shifted_difference

CPU = torch.device("cpu")


def _cfg(path: Path, backend: str, **data: object) -> JobCfg:
    base = DataCfg(path=str(path), img_size=32, batch_size=16, num_workers=1, backend=backend, dali_threads=1,
                   hflip=0.5, randaugment="rand-m9-mstd0.5-inc1", reprob=0.25, mixup=0.8, cutmix=1.0)
    return JobCfg(data=replace(base, **data))


@pytest.mark.parametrize("backend", ["wds", "dali"])
def test_training_batch_contract(digits_shards: Path, backend: str) -> None:
    train, evals = build_loaders(_cfg(digits_shards, backend), rank=0, world_size=2, device=CPU, num_classes=10)
    train.set_epoch(0)
    batch = next(iter(train))
    assert set(batch) == {"input", "label", "target"}
    assert batch["input"].shape == (16, 3, 32, 32) and batch["input"].dtype == torch.float32
    assert batch["label"].dtype == torch.int64 and batch["label"].shape == (16,)
    assert batch["target"].shape == (16, 10) and batch["target"].dtype == torch.float32
    torch.testing.assert_close(batch["target"].sum(1), torch.ones(16))
    first = next(iter(evals))
    assert set(first) == {"input", "label"} and first["input"].dtype == torch.float32
    # normalised with ImageNet statistics: the image of [0, 255] is [-2.118, 2.640]
    assert -2.12 <= first["input"].min() < 0 < first["input"].max() <= 2.641


def test_backends_agree_on_evaluation_batches(digits_shards: Path) -> None:
    """Same samples in the same order; pixels differ only by decoder/resizer rounding and crop offsets."""
    wds_batches = list(build_eval(_cfg(digits_shards, "wds"), "val", rank=1, world_size=2, device=CPU))
    dali_batches = list(build_eval(_cfg(digits_shards, "dali"), "val", rank=1, world_size=2, device=CPU))
    assert len(wds_batches) == len(dali_batches)
    for a, b in zip(wds_batches, dali_batches, strict=True):
        assert torch.equal(a["label"], b["label"])
        assert a["input"].shape == b["input"].shape
        assert shifted_difference(a["input"], b["input"]) < 0.02  # normalised units (≈ 1 grey level)


def _keys(plan: np.ndarray) -> set[tuple[int, int]]:
    return {(int(s), int(i)) for s, i in plan}


def test_dali_rank_plans_are_disjoint_and_cover_the_epoch(digits_shards: Path) -> None:
    """Stream sampling's plan (``epoch_plan``): disjoint ranks, each short of or beyond its quota."""
    shards, _ = read_split(digits_shards, "train")  # 11 shards of 128 and one of 30
    sizes = [s.num_samples for s in shards]
    world, batch = 3, 16
    steps = sum(sizes) // (world * batch)
    plans = [epoch_plan(shards, sizes, seed=0, epoch=1, rank=r, world_size=world, count=steps * batch)
             for r in range(world)]
    assert all(len(p) == steps * batch for p in plans)  # the same number of batches on every rank
    order = epoch_shard_order(shards, 0, 1)
    own = [sum(s.num_samples for s in order[r::world]) for r in range(world)]
    mine = [_keys(p[:min(n, steps * batch)]) for p, n in zip(plans, own, strict=True)]
    assert [len(k) for k in mine] == [min(n, steps * batch) for n in own]  # no sample twice
    assert not (mine[0] & mine[1] or mine[0] & mine[2] or mine[1] & mine[2])  # ranks are disjoint
    everything = {(i, j) for i, n in enumerate(sizes) for j in range(n)}
    # together they read the whole epoch but each rank's drop-last excess over its quota
    assert len(everything - set.union(*mine)) == sum(max(n - steps * batch, 0) for n in own)
    # a rank whose shards hold fewer samples than its quota continues into its next-epoch shards
    short = int(np.argmin(own))
    assert own[short] < steps * batch
    again = epoch_plan(shards, sizes, seed=0, epoch=1, rank=1, world_size=world, count=steps * batch)
    other = epoch_plan(shards, sizes, seed=0, epoch=2, rank=1, world_size=world, count=steps * batch)
    assert np.array_equal(plans[1], again) and not np.array_equal(plans[1], other)


def test_wds_rank_splits_are_disjoint(digits_shards: Path) -> None:
    """Stream sampling: ranks read disjoint shards; repeats come only from borrowing next-epoch shards."""
    def key_index(sample: dict) -> torch.Tensor:  # the sample's number, as the "input"
        return torch.tensor(int(re.sub(r"\D", "", sample["__key__"])))

    world, workers, batch, epoch = 2, 2, 16, 3
    seen = []
    for rank in range(world):
        loader = build_train_loader(digits_shards, "train", key_index, batch_size=batch, num_workers=workers,
                                    rank=rank, world_size=world, seed=0, shuffle_buffer=1, sampler="stream")
        loader.set_epoch(epoch)  # (a shuffle buffer would also hold back up to its size of own samples)
        seen.append(torch.cat([b["input"] for b in loader]).tolist())
    shards, _ = read_split(digits_shards, "train")
    # a worker whose shards hold fewer samples than its share of batches continues into its shards of the
    # next epoch's permutation: the only source of repeats
    order, quota = epoch_shard_order(shards, 0, epoch), len(seen[0]) // workers
    borrowed = sum(max(quota - sum(s.num_samples for s in order[r::world][w::workers]), 0)
                   for r in range(world) for w in range(workers))
    repeats = len(seen[0]) + len(seen[1]) - len(set(seen[0]) | set(seen[1]))
    assert repeats <= borrowed < 128
    assert len(seen[0]) == len(seen[1]) == sum(s.num_samples for s in shards) // (world * batch) * batch


def test_dali_same_seed_same_batches_and_exact_resume(digits_shards: Path) -> None:
    cfg = _cfg(digits_shards, "dali").data

    def run(epoch: int, skip: int = 0, seed: int = 0) -> list[torch.Tensor]:
        loader = DaliLoader(cfg, "train", batch_size=16, rank=1, world_size=2, seed=seed, train=True)
        loader.set_epoch(epoch, skip)
        return [b["label"] for b in loader]

    full = run(2)
    assert len(full) == sum(s.num_samples for s in read_split(digits_shards, "train")[0]) // 32
    assert all(torch.equal(a, b) for a, b in zip(full, run(2), strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(full, run(3), strict=True))
    resumed = run(2, skip=5)
    assert len(resumed) == len(full) - 5  # nothing repeated, nothing lost
    assert all(torch.equal(a, b) for a, b in zip(resumed, full[5:], strict=True))


def test_dali_index_files_are_read(digits_shards: Path) -> None:
    entries = read_index(digits_shards / "train" / "train-000000.idx")
    assert len(entries) == read_split(digits_shards, "train")[0][0].num_samples
    assert {"jpg", "cls", "lbl", "json"} <= set(entries[0])


def _plan_keys(digits_shards: Path, world: int, batch: int, epoch: int) -> list[list[list[str]]]:
    """``vitpipe order``'s table as keys: ``[rank][step] -> keys`` (the plan both loaders follow)."""
    from pipeline.data.order import SamplePlan
    from pipeline.data.reader import SampleIndex

    index = SampleIndex.load(digits_shards, "train", keys=True)
    keys = np.array(index.keys.to_pylist())
    table = SamplePlan(index.sizes, seed=0, rank=0, world_size=world, batch_size=batch,
                       block_shards=16).epoch_table(epoch)
    return [[keys[table[s, r]].tolist() for s in range(table.shape[0])] for r in range(world)]


@pytest.mark.parametrize("backend", ["wds", "dali"])
def test_exact_sampling_reads_the_plan_with_one_reader_across_epochs(digits_shards: Path, backend: str,
                                                                     tmp_path: Path) -> None:
    """3 ranks (wds: × 2 workers): the keys of every batch are the plan's, epoch after epoch, from one
    DataLoader iterator (one DALI pipeline) per rank; every sample at most once per epoch."""
    world, epochs = 3, (0, 1)
    want = {e: _plan_keys(digits_shards, world, 16, e) for e in epochs}
    for rank in range(world):
        job = _cfg(digits_shards, backend, num_workers=2, record_keys=str(tmp_path), randaugment="", mixup=0.0,
                   cutmix=0.0)
        train, _ = build_loaders(job, rank=rank, world_size=world, device=CPU, num_classes=10)
        for epoch in epochs:
            train.set_epoch(epoch)
            got = [raw["key"] for raw in train.loader]  # the backend's batches, keys read from the tar headers
            assert got == want[epoch][rank]
        assert getattr(train.loader, "restarts", getattr(train.loader, "builds", None)) == 1
    for epoch in epochs:
        flat = [k for rank in want[epoch] for batch in rank for k in batch]
        assert len(flat) == len(set(flat)) == 1438 // 48 * 48  # all but the 14-sample remainder, once


def test_exact_sampling_resumes_mid_epoch_on_another_number_of_processes(digits_shards: Path, tmp_path: Path) -> None:
    """3 ranks stop after 11 of their 29 steps; 2 ranks continue the epoch: no sample twice, none skipped but
    the new remainder (what the trainer does with ``position`` and ``resume_at``)."""
    def loader(rank: int, world: int) -> object:
        job = _cfg(digits_shards, "wds", num_workers=0, record_keys=str(tmp_path), randaugment="", mixup=0.0,
                   cutmix=0.0)
        return build_loaders(job, rank=rank, world_size=world, device=CPU, num_classes=10)[0]

    seen: list[str] = []
    for rank in range(3):
        train = loader(rank, 3)
        train.set_epoch(1)
        seen += [k for _, raw in zip(range(11), train.loader, strict=False) for k in raw["key"]]
        samples = train.position(1, 11)
    assert samples == 11 * 3 * 16
    steps = []
    for rank in range(2):
        train = loader(rank, 2)
        skip = train.resume_at(1, samples, world_size=3)
        train.set_epoch(1, skip)
        batches = [raw["key"] for raw in train.loader]
        steps.append((skip, len(batches), len(train)))
        seen += [k for batch in batches for k in batch]
    assert steps[0] == steps[1] and steps[0][0] + steps[0][1] == steps[0][2]  # the epoch still ends at its length
    assert len(seen) == len(set(seen))  # nothing repeated
    assert 1438 - len(seen) == (1438 - samples) % 32 < 32  # nothing skipped but the remainder of 2 × 16


def test_key_record_keeps_the_rows_of_a_resumed_epoch(tmp_path: Path) -> None:
    from pipeline.data.loaders import KeyRecorder

    first = KeyRecorder(tmp_path, rank=1, world_size=4)
    first.start(2, 0)
    first.add(0, ["a", "b"])
    first.add(1, ["c", "d"])
    first.write()
    again = KeyRecorder(tmp_path, rank=1, world_size=4)  # a resumed process, continuing at batch 1 of epoch 2
    again.start(2, 1)
    again.add(1, ["c", "d"])
    again.add(2, ["e", "f"])
    again.write()
    rows = (tmp_path / "keys-rank1-of4-epoch2.csv").read_text().splitlines()
    assert rows == ["rank,step,key", "1,0,a", "1,0,b", "1,1,c", "1,1,d", "1,2,e", "1,2,f"]


def test_dali_stream_sampling_follows_its_plan_with_one_pipeline(digits_shards: Path) -> None:
    from pipeline.data.reader import SampleIndex

    index = SampleIndex.load(digits_shards, "train", keys=True)
    keys = np.array(index.keys.to_pylist())
    shards, _ = read_split(digits_shards, "train")
    cfg = _cfg(digits_shards, "dali", sampler="stream", randaugment="")
    loader = DaliLoader(cfg.data, "train", batch_size=16, rank=1, world_size=2, seed=0, train=True, keys=True)
    for epoch in (0, 1):
        loader.set_epoch(epoch)
        got = [k for batch in loader for k in batch["key"]]
        refs = epoch_plan(shards, [s.num_samples for s in shards], seed=0, epoch=epoch, rank=1, world_size=2,
                          count=loader.steps_per_epoch * 16)
        assert got == keys[index.starts[refs[:, 0]] + refs[:, 1]].tolist()
    assert loader.builds == 1
