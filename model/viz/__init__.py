"""The models' pictures, with one entry point so that training can log them without knowing the family.

StructViT (image) → the structural attention of the centre query (:mod:`model.viz.structvit`);
FilterViT/DropoutViT → filter scores and selected pixels (:mod:`model.viz.filtervit`); other models
have no pictures. Pictures are PIL images; matplotlib is imported only inside the functions that draw
with it, so importing this package (or :mod:`model`) does not load it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image

from model.layers.filter_attention import TokenSubsetAttention
from model.structvit import StructViT
from model.viz.filtervit import render_filter_masks
from model.viz.structvit import render_attention

__all__ = ["has_pictures", "render_pictures"]


def has_pictures(net: torch.nn.Module) -> bool:
    """Whether :func:`render_pictures` draws anything for ``net``."""
    if isinstance(net, StructViT):
        return not getattr(net, "video", False)
    return any(isinstance(m, TokenSubsetAttention) for m in net.modules())


@torch.no_grad()
def render_pictures(net: torch.nn.Module, images: torch.Tensor, mean: Sequence[float],
                    std: Sequence[float]) -> list[Image.Image]:
    """Renders the model's own visualisation for each image of a batch.

    Args:
        net: The model (put in eval mode and back).
        images: Normalised images B×3×H×W on the model's device.
        mean: Normalisation mean (0-1 scale), to show the images.
        std: Normalisation std.

    Returns:
        One PIL image per input (empty when the model has no pictures).
    """
    if not has_pictures(net):
        return []
    was_training = net.training
    net.eval()
    try:
        if isinstance(net, StructViT):
            h, w = images.shape[-2:]
            return [render_attention(net, image, (h // 2, w // 2), mean=mean, std=std) for image in images]
        return render_filter_masks(net, images, tuple(mean), tuple(std))
    finally:
        net.train(was_training)
