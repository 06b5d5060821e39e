"""The webdataset loader: batch contract, rank splits, epoch determinism, clear errors."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from pipeline.config import DataCfg
from pipeline.data.sample_transforms import eval_transform, train_transform
from pipeline.data.shards import LoaderError, epoch_shard_order, read_split
from pipeline.data.wds import build_eval_loader, build_train_loader, image_sample_fn

DATA = DataCfg(img_size=32, batch_size=16, hflip=0.0, crop_scale=(0.8, 1.0))


_keys_transform = image_sample_fn(eval_transform(DATA))


def _train(path: Path, rank: int, world: int, seed: int = 0, workers: int = 0, batch: int = 16,
           resample: bool = False, sampler: str = "exact"):
    return build_train_loader(path, "train", image_sample_fn(train_transform(DATA)), batch_size=batch,
                              num_workers=workers, rank=rank, world_size=world, seed=seed, shuffle_buffer=64,
                              resample=resample, sampler=sampler)


def test_batch_contract(digits_shards: Path) -> None:
    loader = _train(digits_shards, 0, 1, workers=2)
    batch = next(iter(loader))
    assert set(batch) == {"input", "label"}
    # pixels stay uint8 until the device (normalisation happens there, shared by every backend)
    assert batch["input"].shape == (16, 3, 32, 32) and batch["input"].dtype == torch.uint8
    assert batch["label"].shape == (16,) and batch["label"].dtype == torch.int64
    assert batch["label"].min() >= 0 and batch["label"].max() <= 9
    assert batch["input"].float().std() > 10  # real pixels, not a constant


def test_every_rank_gets_the_same_number_of_batches(digits_shards: Path) -> None:
    shards, _ = read_split(digits_shards, "train")
    total = sum(s.num_samples for s in shards)
    counts = []
    for rank in range(3):
        loader = _train(digits_shards, rank, 3)
        loader.set_epoch(1)
        counts.append(sum(1 for _ in loader))
    assert counts == [total // (3 * 16)] * 3


def test_same_seed_same_order_and_epochs_differ(digits_shards: Path) -> None:
    def labels(seed: int, epoch: int) -> list[int]:
        loader = _train(digits_shards, 0, 2, seed=seed)
        loader.set_epoch(epoch)
        torch.manual_seed(0)
        return torch.cat([b["label"] for b in loader]).tolist()

    assert labels(0, 0) == labels(0, 0)
    assert labels(0, 0) != labels(0, 1)
    assert labels(0, 0) != labels(5, 0)


def test_epoch_shard_order_is_a_permutation(digits_shards: Path) -> None:
    shards, _ = read_split(digits_shards, "train")
    orders = [epoch_shard_order(shards, 0, e) for e in range(4)]
    assert all(sorted(o, key=lambda s: s.url) == shards for o in orders)
    assert len({tuple(s.url for s in o) for o in orders}) > 1


def test_eval_split_is_covered_exactly_once_by_ranks(digits_shards: Path) -> None:
    shards, _ = read_split(digits_shards, "val")
    seen = []
    for rank in range(2):
        loader = build_eval_loader(digits_shards, "val", _keys_transform, batch_size=50, num_workers=2,
                                   rank=rank, world_size=2)
        seen.append(torch.cat([b["label"] for b in loader]))
    assert sum(len(s) for s in seen) == sum(s.num_samples for s in shards)
    # rank 0 has shards 0 and 2, rank 1 has shard 1: sizes follow the shard split
    assert len(seen[0]) == shards[0].num_samples + shards[2].num_samples


def test_too_few_shards_is_a_clear_error_or_resampling_by_choice(digits_shards: Path) -> None:
    """Stream sampling gives each worker whole shards: too few of them is an error, or resampling by choice."""
    with pytest.raises(LoaderError, match="12 shards but 4 ranks × 4 workers need at least 16"):
        _train(digits_shards, 0, 4, workers=4, sampler="stream")
    shards, _ = read_split(digits_shards, "train")
    steps = sum(s.num_samples for s in shards) // (7 * 16)
    for rank in (0, 6):  # 7 ranks × 2 workers > 12 shards: with resampling every worker still gets shards
        loader = _train(digits_shards, rank, 7, workers=2, resample=True, sampler="stream")
        loader.set_epoch(0)
        assert sum(1 for _ in loader) == steps


def test_exact_sampling_needs_no_shard_per_worker(digits_shards: Path) -> None:
    """Exact sampling splits samples, not shards: 7 ranks × 2 workers read 12 shards, every sample at most once."""
    def key_index(sample: dict) -> torch.Tensor:
        return torch.tensor(int(sample["__key__"].split("_")[1]))

    shards, _ = read_split(digits_shards, "train")
    steps = sum(s.num_samples for s in shards) // (7 * 16)
    seen = []
    for rank in range(7):
        loader = build_train_loader(digits_shards, "train", key_index, batch_size=16, num_workers=2 if rank < 2 else 0,
                                    rank=rank, world_size=7, seed=0, shuffle_buffer=64)
        loader.set_epoch(0)
        batches = [b["input"] for b in loader]
        assert len(batches) == steps
        seen += torch.cat(batches).tolist()
    assert len(seen) == len(set(seen)) == steps * 7 * 16


def test_batch_larger_than_split_is_a_clear_error(digits_shards: Path) -> None:
    with pytest.raises(LoaderError, match="fewer than one global batch"):
        _train(digits_shards, 0, 2, batch=1000)


def test_missing_split_and_dataset(digits_shards: Path, tmp_path: Path) -> None:
    with pytest.raises(LoaderError, match="no split 'test'"):
        read_split(digits_shards, "test")
    with pytest.raises(ValueError, match="not a vitpipe dataset"):
        read_split(tmp_path, "train")


@pytest.mark.parametrize("workers, skip", [(0, 5), (2, 5), (2, 6)])
def test_resume_mid_epoch_gives_the_same_batches(digits_shards: Path, workers: int, skip: int) -> None:
    full = _train(digits_shards, 1, 2, seed=3, workers=workers)
    full.set_epoch(2)
    expected = list(full)
    resumed = _train(digits_shards, 1, 2, seed=3, workers=workers)
    resumed.set_epoch(2, skip_batches=skip)
    got = list(resumed)
    assert len(got) == len(expected) - skip
    for a, b in zip(got, expected[skip:], strict=True):
        assert torch.equal(a["label"], b["label"]) and torch.equal(a["input"], b["input"])


def test_augmentation_does_not_touch_global_rng(digits_shards: Path) -> None:
    torch.manual_seed(7)
    before = torch.get_rng_state()
    loader = _train(digits_shards, 0, 1, workers=0)
    next(iter(loader))
    assert torch.equal(before, torch.get_rng_state())


def test_persistent_workers_follow_the_epoch(digits_shards: Path) -> None:
    """Workers live across epochs (persistent) and still read each epoch's own order and resume point."""
    persistent = _train(digits_shards, 0, 2, seed=1, workers=2)
    assert persistent.loader.persistent_workers
    fresh = build_train_loader(digits_shards, "train", image_sample_fn(train_transform(DATA)), batch_size=16,
                               num_workers=2, rank=0, world_size=2, seed=1, shuffle_buffer=64,
                               persistent_workers=False)
    for epoch, skip in ((0, 0), (1, 0), (1, 3), (2, 1)):
        persistent.set_epoch(epoch, skip)
        fresh.set_epoch(epoch, skip)
        got, want = list(persistent), list(fresh)
        assert len(got) == len(want) == persistent.steps_per_epoch - skip
        for a, b in zip(got, want, strict=True):
            assert torch.equal(a["label"], b["label"]) and torch.equal(a["input"], b["input"])


def test_randaugment_is_seeded_per_sample(digits_shards: Path) -> None:
    """timm's RandAugment picks operations with NumPy's global generator: it too is seeded per sample, so a
    resumed epoch still reproduces the uninterrupted batches and the workers do not share draws."""
    from dataclasses import replace

    cfg = replace(DATA, randaugment="rand-m9-mstd0.5-inc1")

    def loader(skip: int) -> list[torch.Tensor]:
        train = build_train_loader(digits_shards, "train", image_sample_fn(train_transform(cfg)), batch_size=16,
                                   num_workers=2, rank=0, world_size=1, seed=2, shuffle_buffer=64)
        train.set_epoch(1, skip_batches=skip)
        return [b["input"] for b in itertools.islice(train, 6 - skip)]

    full, resumed = loader(0), loader(3)
    assert all(torch.equal(a, b) for a, b in zip(resumed, full[3:], strict=True))
