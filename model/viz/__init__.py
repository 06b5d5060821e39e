"""The models' pictures, with one entry point so that training can log them without knowing the family.

StructViT → the structural attention of the centre query (:mod:`model.viz.structvit`): for an image model
the merged map and the per-detector maps, for a video model one column per time position of the token grid;
FilterViT/DropoutViT → filter scores and selected pixels (:mod:`model.viz.filtervit`); other models have no
pictures (:func:`why_no_pictures` says why). Pictures are PIL images drawn with PIL only, every panel at
least 256 px (:mod:`model.viz.panels`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image

from model.layers.filter_attention import TokenSubsetAttention
from model.structvit import StructViT
from model.viz.filtervit import render_filter_masks
from model.viz.structvit import has_structsa, render_attention, render_video_attention

__all__ = ["has_pictures", "render_pictures", "why_no_pictures"]


def why_no_pictures(net: torch.nn.Module) -> str:
    """Why :func:`render_pictures` draws nothing for ``net``; empty when it draws."""
    if isinstance(net, StructViT):
        return "" if has_structsa(net) else "a StructViT without StructSA layers in stage 2"
    if any(isinstance(m, TokenSubsetAttention) for m in net.modules()):
        return ""
    return (f"{type(net).__name__} has no model-specific visualisation "
            "(pictures exist for StructViT attention and FilterViT/DropoutViT filter masks)")


def has_pictures(net: torch.nn.Module) -> bool:
    """Whether :func:`render_pictures` draws anything for ``net``."""
    return not why_no_pictures(net)


@torch.no_grad()
def render_pictures(net: torch.nn.Module, inputs: torch.Tensor, mean: Sequence[float],
                    std: Sequence[float]) -> list[Image.Image]:
    """Renders the model's own visualisation for each input of a batch.

    Args:
        net: The model (put in eval mode and back).
        inputs: Normalised images B×3×H×W, clips B×3×T×H×W, or multi-view clips B×V×3×T×H×W (the first
            view is drawn), on the model's device.
        mean: Normalisation mean (0-1 scale), to show the inputs.
        std: Normalisation std.

    Returns:
        One PIL image per input (empty when the model has no pictures).
    """
    if not has_pictures(net):
        return []
    if inputs.dim() == 6:
        inputs = inputs[:, 0]
    inputs = inputs.to(next(net.parameters()).dtype)  # the model's own precision (inputs may be bf16)
    was_training = net.training
    net.eval()
    try:
        if isinstance(net, StructViT) and net.video:
            return [render_video_attention(net, clip, mean=mean, std=std) for clip in inputs]
        if isinstance(net, StructViT):
            h, w = inputs.shape[-2:]
            return [render_attention(net, image, (h // 2, w // 2), mean=mean, std=std) for image in inputs]
        return render_filter_masks(net, inputs, tuple(mean), tuple(std))
    finally:
        net.train(was_training)
