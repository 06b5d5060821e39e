"""The webdataset loader: batch contract, rank splits, epoch determinism, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.config import DataCfg
from pipeline.data_wds import (
    LoaderError,
    build_eval_loader,
    build_train_loader,
    epoch_shard_order,
    read_split,
)
from pipeline.transforms import eval_transform, train_transform

DATA = DataCfg(img_size=32, batch_size=16, hflip=0.0, crop_scale=(0.8, 1.0))


def _keys_transform(image):  # identity-ish transform that keeps the pixels comparable
    return eval_transform(DATA)(image)


def _train(path: Path, rank: int, world: int, seed: int = 0, workers: int = 0, batch: int = 16):
    return build_train_loader(path, "train", train_transform(DATA), batch_size=batch, num_workers=workers,
                              rank=rank, world_size=world, seed=seed, shuffle_buffer=64)


def test_batch_contract(digits_shards: Path) -> None:
    loader = _train(digits_shards, 0, 1, workers=2)
    batch = next(iter(loader))
    assert set(batch) == {"image", "label"}
    assert batch["image"].shape == (16, 3, 32, 32) and batch["image"].dtype == torch.float32
    assert batch["label"].shape == (16,) and batch["label"].dtype == torch.int64
    assert batch["label"].min() >= 0 and batch["label"].max() <= 9
    # normalised with ImageNet statistics: values leave [0, 1]
    assert batch["image"].min() < 0 < batch["image"].max()


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
        seen.append(torch.cat([labels for _, labels in loader]))
    assert sum(len(s) for s in seen) == sum(s.num_samples for s in shards)
    # rank 0 has shards 0 and 2, rank 1 has shard 1: sizes follow the shard split
    assert len(seen[0]) == shards[0].num_samples + shards[2].num_samples


def test_too_few_shards_is_a_clear_error(digits_shards: Path) -> None:
    with pytest.raises(LoaderError, match="12 shards but 4 ranks × 4 workers need at least 16"):
        _train(digits_shards, 0, 4, workers=4)


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
        assert torch.equal(a["label"], b["label"]) and torch.equal(a["image"], b["image"])


def test_augmentation_does_not_touch_global_rng(digits_shards: Path) -> None:
    torch.manual_seed(7)
    before = torch.get_rng_state()
    loader = _train(digits_shards, 0, 1, workers=0)
    next(iter(loader))
    assert torch.equal(before, torch.get_rng_state())
