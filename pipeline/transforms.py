"""CPU image augmentation (PIL → tensor); mean and std come from the config, shared with DALI later."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torchvision import transforms as T

from pipeline.config import DataCfg


def train_transform(cfg: DataCfg) -> Callable[[Any], torch.Tensor]:
    """Random-resized crop, optional horizontal flip, normalisation.

    Returns:
        A function from an RGB PIL image to a 3×H×W float32 tensor (H = W = ``cfg.img_size``).
    """
    steps: list[Any] = [T.RandomResizedCrop(cfg.img_size, scale=cfg.crop_scale, ratio=cfg.crop_ratio,
                                            interpolation=T.InterpolationMode.BICUBIC)]
    if cfg.hflip > 0:
        steps.append(T.RandomHorizontalFlip(cfg.hflip))
    steps += [T.ToTensor(), T.Normalize(cfg.mean, cfg.std)]
    return T.Compose(steps)


def eval_transform(cfg: DataCfg) -> Callable[[Any], torch.Tensor]:
    """Resize the short side to ``img_size / eval_crop_pct``, centre-crop ``img_size``, normalise.

    Returns:
        A function from an RGB PIL image to a 3×H×W float32 tensor.
    """
    resize = int(round(cfg.img_size / cfg.eval_crop_pct))
    return T.Compose([T.Resize(resize, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(cfg.img_size),
                      T.ToTensor(), T.Normalize(cfg.mean, cfg.std)])
