"""Per-sample CPU image augmentation for the ``wds`` backend (PIL → ``uint8`` tensor).

Training follows timm's ``transforms_imagenet_train`` (what DeiT and Swin use): random-resized crop
(bicubic), horizontal flip, then RandAugment — or, when RandAugment is off, colour jitter. The
result stays ``uint8``: normalisation, random erasing and mixup/CutMix run on the training device
(:mod:`pipeline.data.batch_augment`), where the DALI backend's batches get the very same treatment.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from timm.data.auto_augment import rand_augment_transform
from torchvision import transforms as T

from pipeline.config import DataCfg

BICUBIC = T.InterpolationMode.BICUBIC


def to_uint8_chw(image: Any) -> torch.Tensor:
    """An RGB PIL image → ``3×H×W`` uint8 tensor (no scaling)."""
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)


def randaugment(config: str, img_size: int, mean: tuple[float, ...]) -> Callable[[Any], Any]:
    """Timm's RandAugment for ``config`` (e.g. ``rand-m9-mstd0.5-inc1``) with timm's hyper-parameters.

    Translation is relative to ``0.45 × img_size`` and the fill colour is the dataset mean, as in
    timm's ``transforms_imagenet_train``.
    """
    fill = tuple(int(round(255 * m)) for m in mean)
    transform = rand_augment_transform(config, {"translate_const": int(img_size * 0.45), "img_mean": fill})
    for op in transform.ops:
        if op.aug_fn.__name__ == "posterize":
            op.aug_fn = _posterize_at_least_one_bit
    return transform


def _posterize_at_least_one_bit(image: Any, bits: int, **kwargs: Any) -> Any:
    """Posterize as timm does, with ``bits`` ≥ 1.

    ``PosterizeIncreasing`` at magnitude 10 (reached through ``mstd`` noise or ``m10``) asks for 0 bits,
    which Pillow ≥ 12 refuses with a ValueError (older Pillow returned a black image); 1 bit is the
    strongest posterisation Pillow allows.
    """
    from PIL import ImageOps

    return ImageOps.posterize(image, max(int(bits), 1)) if bits < 8 else image


def train_transform(cfg: DataCfg) -> Callable[[Any], torch.Tensor]:
    """Random-resized crop, flip, RandAugment or colour jitter.

    Returns:
        A function from an RGB PIL image to a ``3×H×W`` uint8 tensor (H = W = ``cfg.img_size``).
        Randomness comes from Python's ``random`` and torch's generator, which the loader seeds per sample.
    """
    steps: list[Any] = [T.RandomResizedCrop(cfg.img_size, scale=cfg.crop_scale, ratio=cfg.crop_ratio,
                                            interpolation=BICUBIC)]
    if cfg.hflip > 0:
        steps.append(T.RandomHorizontalFlip(cfg.hflip))
    if cfg.randaugment:
        steps.append(randaugment(cfg.randaugment, cfg.img_size, cfg.mean))
    elif cfg.color_jitter > 0:
        steps.append(T.ColorJitter(cfg.color_jitter, cfg.color_jitter, cfg.color_jitter))
    steps.append(to_uint8_chw)
    return T.Compose(steps)


def eval_transform(cfg: DataCfg) -> Callable[[Any], torch.Tensor]:
    """Resize the short side to ``img_size / eval_crop_pct`` (bicubic), centre-crop ``img_size``.

    Returns:
        A function from an RGB PIL image to a ``3×H×W`` uint8 tensor.
    """
    resize = int(round(cfg.img_size / cfg.eval_crop_pct))
    return T.Compose([T.Resize(resize, interpolation=BICUBIC), T.CenterCrop(cfg.img_size), to_uint8_chw])


def clip_color_transform(cfg: DataCfg) -> Callable[[Any], Any] | None:
    """RandAugment (or colour jitter when it is off) for video frames, or None when both are off."""
    if cfg.randaugment:
        return randaugment(cfg.randaugment, cfg.img_size, cfg.mean)
    if cfg.color_jitter > 0:
        return T.ColorJitter(cfg.color_jitter, cfg.color_jitter, cfg.color_jitter)
    return None


def apply_to_clip(transform: Callable[[Any], Any], clip: torch.Tensor) -> torch.Tensor:
    """Applies one PIL transform to every frame of a clip with the same random draws (clip-consistent).

    Python's, NumPy's and torch's generators are rewound to the same state before each frame, so every frame
    gets the same operations and magnitudes; afterwards they continue from the state the last frame left.

    Args:
        transform: A PIL → PIL transform drawing from ``random``/``torch`` (timm RandAugment, ColorJitter).
        clip: ``3×T×H×W`` uint8.

    Returns:
        ``3×T×H×W`` uint8.
    """
    from PIL import Image

    py_state, np_state, torch_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    frames = []
    for t in range(clip.shape[1]):
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.set_rng_state(torch_state)
        frame = Image.fromarray(clip[:, t].permute(1, 2, 0).contiguous().numpy())
        frames.append(to_uint8_chw(transform(frame)))
    return torch.stack(frames, dim=1)
