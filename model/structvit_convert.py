"""Image -> video StructViT: temporal inflation of an ImageNet-trained state dict (spec §4.2).

The paper: "we temporally inflate the model weights pretrained on ImageNet-1K". Following UniFormer's
``inflate_weight`` (non-centre mode), every 2-D kernel (O, I, kh, kw) becomes the 3-D kernel of the video model
(O, I, kt, kh, kw) by repeating it kt times along time and dividing by kt, so that a temporally constant clip
gives the image response away from the temporal borders. This covers the stem (4×4 -> 3×4×4), the
downsampling convs (2×2 -> 1×2×2), the C-blocks' CPE / depthwise 5×5 / 1×1 convs, the S-blocks' CPE and the
StructSA key/value kernels H^K, H^V (3×3 -> 3×3×3, the spec's recommended reading). Everything else (Linear,
norms) is copied unchanged; the classifier is dropped when its shape differs (e.g. 1000 -> 400 classes).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

logger = logging.getLogger(__name__)


def inflate_weight(weight_2d: torch.Tensor, time_dim: int) -> torch.Tensor:
    """(O, I, kh, kw) -> (O, I, time_dim, kh, kw), repeated along time and divided by ``time_dim``."""
    return weight_2d.unsqueeze(2).repeat(1, 1, time_dim, 1, 1) / time_dim


def inflate_state_dict(image_sd: dict[str, torch.Tensor], video_model: nn.Module) -> dict[str, torch.Tensor]:
    """Maps an image StructViT state dict onto a video StructViT of the same size.

    Args:
        image_sd: State dict of an image model (e.g. ``structvit_b_4_1``).
        video_model: The target video model (e.g. ``structvit_b_4_1_video``); only its shapes are read.

    Returns:
        A state dict for ``video_model``; classifier entries are omitted when their shapes differ, so load it
        with ``strict=False`` in that case (see :func:`load_inflated`).

    Raises:
        ValueError: On a key the video model lacks or a shape that inflation cannot produce.
    """
    target = video_model.state_dict()
    out: dict[str, torch.Tensor] = {}
    for key, value in image_sd.items():
        if key not in target:
            raise ValueError(f"{key}: not in the video model")
        want = target[key].shape
        if value.shape == want:
            out[key] = value
        elif value.dim() == 4 and len(want) == 5 and want[:2] + want[3:] == value.shape:
            out[key] = inflate_weight(value, want[2])
        elif key.startswith("head."):
            logger.info("dropping %s: %s -> %s (new classifier)", key, tuple(value.shape), tuple(want))
        else:
            raise ValueError(f"{key}: cannot inflate {tuple(value.shape)} to {tuple(want)}")
    return out


def load_inflated(video_model: nn.Module, image_sd: dict[str, torch.Tensor]) -> list[str]:
    """Loads inflated image weights into ``video_model``.

    Args:
        video_model: The video model, modified in place.
        image_sd: The image model's state dict.

    Returns:
        The keys left at their fresh initialisation (the classifier when the class count changed).

    Raises:
        RuntimeError: If anything but the classifier is missing.
    """
    missing, unexpected = video_model.load_state_dict(inflate_state_dict(image_sd, video_model), strict=False)
    if unexpected or any(not k.startswith("head.") for k in missing):
        raise RuntimeError(f"inflation left missing={missing} unexpected={unexpected}")
    return list(missing)
