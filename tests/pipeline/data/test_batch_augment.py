"""Device-side batch augmentation: normalisation, random erasing, mixup/CutMix against timm's semantics."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from timm.data.mixup import mixup_target, rand_bbox

from pipeline.config import IMAGENET_MEAN, IMAGENET_STD
from pipeline.data.batch_augment import BatchAugment, Mixup, RandomErasing, cutmix_box, normalize, one_hot_smooth


def test_normalize_matches_torchvision_to_tensor_then_normalize() -> None:
    from torchvision.transforms import functional as TF

    pixels = torch.randint(0, 256, (2, 3, 5, 7), dtype=torch.uint8)
    want = torch.stack([TF.normalize(p.float() / 255, IMAGENET_MEAN, IMAGENET_STD)
                        for p in pixels])
    torch.testing.assert_close(normalize(pixels, IMAGENET_MEAN, IMAGENET_STD), want, rtol=1e-5, atol=1e-5)
    video = torch.randint(0, 256, (2, 3, 4, 5, 7), dtype=torch.uint8)  # B×3×T×H×W: channel dim 1
    torch.testing.assert_close(normalize(video, IMAGENET_MEAN, IMAGENET_STD)[:, :, 2],
                               normalize(video[:, :, 2], IMAGENET_MEAN, IMAGENET_STD))


def test_smoothed_targets_equal_timm() -> None:
    labels = torch.tensor([3, 0, 9, 3])
    ours = one_hot_smooth(labels, 10, 0.1)
    torch.testing.assert_close(ours, mixup_target(labels, 10, lam=1.0, smoothing=0.1))
    lam = 0.3
    mixed = ours * lam + ours.flip(0) * (1 - lam)
    torch.testing.assert_close(mixed, mixup_target(labels, 10, lam=lam, smoothing=0.1))


def test_cutmix_box_equals_timm_rand_bbox() -> None:
    for seed in range(20):
        lam = float(np.random.default_rng(seed + 100).beta(1.0, 1.0))
        (top, bottom, left, right), corrected = cutmix_box((24, 40), lam, np.random.default_rng(seed))
        rng = np.random.default_rng(seed)  # the centre our box used: the generator's first two draws
        cy, cx = int(rng.integers(0, 24)), int(rng.integers(0, 40))
        yl, yh, xl, xh = _timm_box((24, 40), lam, cy, cx)
        assert (top, bottom, left, right) == (yl, yh, xl, xh)
        assert corrected == pytest.approx(1 - (yh - yl) * (xh - xl) / (24 * 40))


def _timm_box(size: tuple[int, int], lam: float, cy: int, cx: int) -> tuple[int, int, int, int]:
    """timm's rand_bbox with the centre fixed (it otherwise draws it from NumPy's global state)."""
    import unittest.mock

    draws = iter([cy, cx])
    with unittest.mock.patch("numpy.random.randint", lambda *a, **k: next(draws)):
        return rand_bbox((1, 3, *size), lam)


@pytest.mark.parametrize("alphas", [(0.8, 0.0), (0.0, 1.0), (0.8, 1.0)])
def test_mixup_targets_sum_to_one_and_inputs_mix(alphas: tuple[float, float]) -> None:
    mix = Mixup(*alphas, num_classes=10, smoothing=0.1)
    x = torch.arange(8, dtype=torch.float32).view(8, 1, 1, 1).expand(8, 3, 16, 16).clone()
    labels = torch.arange(8) % 10
    for seed in range(10):
        out, target = mix(x.clone(), labels, np.random.default_rng(seed))
        torch.testing.assert_close(target.sum(1), torch.ones(8))
        assert target.shape == (8, 10) and (target >= 0).all()
        lam, cut = mix.draw(np.random.default_rng(seed))
        if not cut:  # mixup: every pixel is λ·x + (1−λ)·x_reversed
            torch.testing.assert_close(out[:, 0, 0, 0], lam * x[:, 0, 0, 0] + (1 - lam) * x.flip(0)[:, 0, 0, 0])
        else:  # CutMix: the pasted area equals the target weight of the reversed batch's label
            pasted = (out[0, 0] != x[0, 0]).float().mean().item()
            weight = target[0, labels.flip(0)[0]].item() - 0.01  # minus the smoothing floor
            assert pasted == pytest.approx(weight / 0.9, abs=1e-6)


def test_video_cutmix_pastes_the_same_box_on_every_frame() -> None:
    mix = Mixup(0.0, 1.0, num_classes=4, smoothing=0.0)
    x = torch.zeros(2, 3, 4, 16, 16)
    x[1] = 1.0
    out, _ = mix(x, torch.tensor([0, 1]), np.random.default_rng(3))
    assert all(torch.equal(out[0, :, 0], out[0, :, t]) for t in range(4))


def test_random_erasing_probability_and_area() -> None:
    erase = RandomErasing(prob=0.5)
    x = torch.zeros(400, 3, 32, 32)
    erase(x, np.random.default_rng(0), torch.Generator().manual_seed(0))
    erased = (x != 0).flatten(1).any(1)
    assert 160 < erased.sum() < 240  # ≈ half the samples
    areas = (x[erased, 0] != 0).flatten(1).float().mean(1)
    assert areas.min() >= 0.015 and areas.max() <= 0.36  # rounding of h and w


def test_batch_augment_is_a_function_of_seed_epoch_and_index() -> None:
    aug = BatchAugment(IMAGENET_MEAN, IMAGENET_STD, seed=4, erasing=RandomErasing(1.0),
                       mixup=Mixup(0.8, 1.0, num_classes=10))
    pixels = torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8)
    labels = torch.arange(6)
    a, b = aug(pixels, labels, epoch=1, index=5), aug(pixels, labels, epoch=1, index=5)
    c = aug(pixels, labels, epoch=1, index=6)
    assert torch.equal(a["input"], b["input"]) and torch.equal(a["target"], b["target"])
    assert not torch.equal(a["input"], c["input"])
    assert set(a) == {"input", "label", "target"} and a["input"].dtype == torch.float32
    plain = BatchAugment(IMAGENET_MEAN, IMAGENET_STD, seed=4)(pixels, labels, epoch=0, index=0)
    assert set(plain) == {"input", "label"}


def test_randaugment_at_full_magnitude_never_fails() -> None:
    """PosterizeIncreasing at magnitude 10 asks Pillow for 0 bits, which it refuses: clamped to 1 bit."""
    import random

    from PIL import Image

    from pipeline.data.sample_transforms import randaugment

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    augment = randaugment("rand-m10-n3-inc1", 32, IMAGENET_MEAN)
    for seed in range(300):
        random.seed(seed)
        np.random.seed(seed)
        assert augment(image).size == (32, 32)
