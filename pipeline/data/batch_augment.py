"""Batch-level augmentation on the training device: normalisation, random erasing, mixup / CutMix.

Every backend hands over ``uint8`` pixels (images ``B×3×H×W``, video ``B×3×T×H×W``); what happens
after the copy to the device is shared, so the batch contract (dtype, layout, value range) cannot
drift between backends.

The semantics are timm's (``timm.data.Mixup`` in batch mode, ``timm.data.RandomErasing`` in
``pixel`` mode, as DeiT and Swin train), with one difference: every random draw comes from a
generator seeded by ``(seed, epoch, batch index)`` instead of NumPy's and torch's global state, so
a resumed run draws exactly what the uninterrupted run would have drawn.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


def normalize(pixels: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """``uint8`` pixels → float32 ``(x / 255 - mean) / std``, per channel (dimension 1).

    Args:
        pixels: ``B×3×H×W`` or ``B×3×T×H×W`` uint8 (any device).
        mean: Per-channel mean on the 0–1 scale.
        std: Per-channel standard deviation on the 0–1 scale.

    Returns:
        Same shape, float32.
    """
    shape = (1, -1) + (1,) * (pixels.dim() - 2)
    m = torch.tensor(mean, device=pixels.device).view(shape) * 255.0
    s = torch.tensor(std, device=pixels.device).view(shape) * 255.0
    return (pixels.float() - m) / s


def one_hot_smooth(labels: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    """Label-smoothed one-hot targets (timm: off = ε/K, on = 1 − ε + ε/K).

    Args:
        labels: ``B`` int64.
        num_classes: K.
        smoothing: ε.

    Returns:
        ``B×K`` float32; every row sums to 1.
    """
    off = smoothing / num_classes
    out = torch.full((labels.numel(), num_classes), off, device=labels.device)
    return out.scatter_(1, labels.view(-1, 1), 1.0 - smoothing + off)


@dataclass
class RandomErasing:
    """timm's RandomErasing, ``pixel`` mode, one rectangle per sample, on normalised tensors.

    Each sample is erased with probability ``prob``: a rectangle of area ``U(0.02, 1/3)`` of the image
    and log-uniform aspect ratio in ``(0.3, 1/0.3)`` (up to 10 attempts to fit) is filled with
    ``N(0, 1)`` noise. For video the same rectangle covers every frame.
    """

    prob: float
    min_area: float = 0.02
    max_area: float = 1 / 3
    min_aspect: float = 0.3
    attempts: int = 10

    def __call__(self, x: torch.Tensor, rng: np.random.Generator, noise: torch.Generator) -> torch.Tensor:
        """Erases in place and returns ``x`` (``B×3×H×W`` or ``B×3×T×H×W`` float)."""
        height, width = x.shape[-2:]
        log_ratio = (math.log(self.min_aspect), -math.log(self.min_aspect))
        for i in range(x.shape[0]):
            if rng.random() >= self.prob:
                continue
            for _ in range(self.attempts):
                area = rng.uniform(self.min_area, self.max_area) * height * width
                aspect = math.exp(rng.uniform(*log_ratio))
                h, w = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
                if h < height and w < width:
                    top, left = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
                    patch = x[i, ..., top:top + h, left:left + w]
                    patch.copy_(torch.randn(patch.shape, generator=noise, device=noise.device).to(x.device))
                    break
        return x


@dataclass
class Mixup:
    """timm's ``Mixup`` in batch mode: one λ per batch, mixed with the batch reversed.

    With probability ``prob`` a batch is mixed; CutMix is chosen over mixup with probability
    ``switch_prob`` when both are on. CutMix pastes a box of area ``1 − λ`` (clipped at the border,
    λ then corrected to the pasted area) from the reversed batch; targets are
    ``λ·y + (1 − λ)·y[::-1]`` of label-smoothed one-hot vectors, so each row sums to 1.
    """

    mixup_alpha: float
    cutmix_alpha: float
    num_classes: int
    smoothing: float = 0.1
    prob: float = 1.0
    switch_prob: float = 0.5

    def draw(self, rng: np.random.Generator) -> tuple[float, bool]:
        """Draws ``(λ, use_cutmix)`` for one batch (λ = 1: no mixing)."""
        if rng.random() >= self.prob or (self.mixup_alpha <= 0 and self.cutmix_alpha <= 0):
            return 1.0, False
        if self.mixup_alpha > 0 and self.cutmix_alpha > 0:
            cut = bool(rng.random() < self.switch_prob)
        else:
            cut = self.cutmix_alpha > 0
        alpha = self.cutmix_alpha if cut else self.mixup_alpha
        return float(rng.beta(alpha, alpha)), cut

    def __call__(self, x: torch.Tensor, labels: torch.Tensor,
                 rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Mixes a batch in place.

        Args:
            x: ``B×3×H×W`` or ``B×3×T×H×W`` float (B even is not required).
            labels: ``B`` int64.
            rng: This batch's generator.

        Returns:
            ``x`` and the soft targets ``B×K`` float32.
        """
        lam, cut = self.draw(rng)
        if lam < 1.0:
            if cut:
                (top, bottom, left, right), lam = cutmix_box(x.shape[-2:], lam, rng)
                x[..., top:bottom, left:right] = x.flip(0)[..., top:bottom, left:right]
            else:
                reversed_part = x.flip(0).mul_(1.0 - lam)  # a copy, taken before x is scaled in place
                x.mul_(lam).add_(reversed_part)
        y = one_hot_smooth(labels, self.num_classes, self.smoothing)
        return x, y * lam + y.flip(0) * (1.0 - lam)


def cutmix_box(size: torch.Size | tuple[int, int], lam: float,
               rng: np.random.Generator) -> tuple[tuple[int, int, int, int], float]:
    """A CutMix box of area ≈ ``(1 − λ)·H·W`` centred uniformly, clipped to the image (timm's ``rand_bbox``).

    Returns:
        ``(top, bottom, left, right)`` and λ corrected to the box actually pasted.
    """
    height, width = int(size[0]), int(size[1])
    ratio = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    cy, cx = int(rng.integers(0, height)), int(rng.integers(0, width))
    top, bottom = max(cy - cut_h // 2, 0), min(cy + (cut_h + 1) // 2, height)
    left, right = max(cx - cut_w // 2, 0), min(cx + (cut_w + 1) // 2, width)
    return (top, bottom, left, right), 1.0 - (bottom - top) * (right - left) / float(height * width)


@dataclass
class BatchAugment:
    """What the training device does to every batch after the copy: normalise, erase, mix.

    Draws come from ``(seed, epoch, batch index)``: the same batch gets the same erasing and mixing
    whether or not the run was interrupted before it.
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]
    seed: int
    erasing: RandomErasing | None = None
    mixup: Mixup | None = None

    def __call__(self, pixels: torch.Tensor, labels: torch.Tensor, epoch: int,
                 index: int) -> dict[str, torch.Tensor]:
        """Returns the batch contract: ``input`` float32, ``label`` int64 and, when mixing, ``target``."""
        x = normalize(pixels, self.mean, self.std)
        out = {"input": x, "label": labels}
        if self.erasing is None and self.mixup is None:
            return out
        rng = np.random.default_rng([self.seed, epoch, index, 0xA06])
        if self.erasing is not None:
            noise = torch.Generator(device=x.device).manual_seed(int(rng.integers(2**62)))
            self.erasing(x, rng, noise)
        if self.mixup is not None:
            out["input"], out["target"] = self.mixup(x, labels, rng)
        return out
