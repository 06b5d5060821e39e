"""Structural attention maps of a StructViT, image or video, as pictures readable at a glance (paper App. D).

For one query position, the literal StructSA path gives the joint-softmax attention A (h × D × N′) and the
merged structural map c^struct (C × N): the per-key dynamic kernels κ_{i,j} = Σ_d A_{i,(j,d)} H^V_{:,d,:} placed
at their key positions and summed onto the grid, so that y_i = Σ_p c^struct_{i,p} ⊙ v_p.

* Image (:func:`render_attention`): the input with the query, the channel-mean merged map over the image, and
  the D per-detector maps Σ_h A_{:,d,:}, each labelled with its share of the attention.
* Video (:func:`render_video_attention`): one column per time position of the layer's token grid (a tubelet
  of the stem's temporal stride): the clip's frame there, the merged map over it and the attention over the
  keys at that time (summed over heads and detectors), on scales shared by all time positions, so that
  where in time the query looks shows at a glance. The query sits at the centre of the middle time position.

Panels are at least :data:`model.viz.panels.PANEL` pixels (small inputs enlarged by nearest neighbour).

    img = render_attention(net, image, query=(112, 80))   # PIL image; img.save("attn.png")
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from model.layers.structsa import kv_grid_size
from model.structvit import StructViT
from model.viz.panels import diverging, mark, overlay, panel, scale_factor, sequential, sheet

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def has_structsa(net: torch.nn.Module, stage: int = 2) -> bool:
    """Whether ``net`` is a StructViT whose ``stage`` has StructSA layers (the pictures need them)."""
    if not isinstance(net, StructViT) or len(net.stages) <= stage:
        return False
    return getattr(net.stages[stage].blocks[-1], "attn", None) is not None


@torch.no_grad()
def structural_attention(net: StructViT, image: torch.Tensor, query: Sequence[int], stage: int = 2,
                         block: int = -1) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]:
    """Attention of one query of one StructSA layer.

    Args:
        net: A StructViT.
        image: One normalised input: an image (3, H, W), or a clip (3, T, H, W) for a video model.
        query: Query position in input pixels: (row, col), or (frame, row, col) for a clip.
        stage: Stage index of the layer (2 or 3).
        block: Block index within the stage.

    Returns:
        ``(merged, per_d, token)``: the channel-mean merged map on the token grid ((H′, W′) or (T′, H′, W′)),
        the per-detector maps summed over heads on the key/value grid ((D, H″, W″) or (D, T″, H″, W″)), and
        the query's token position.

    Raises:
        ValueError: For a stage without StructSA, or an input or query that does not fit the model.
    """
    if image.dim() != (4 if net.video else 3) or len(query) != image.dim() - 1:
        raise ValueError(f"a {'video' if net.video else 'image'} StructViT takes one "
                         f"{'(3, T, H, W) clip' if net.video else '(3, H, W) image'} and a query of "
                         f"{image.dim() - 1} coordinates; got {tuple(image.shape)} and {tuple(query)}")
    attn = getattr(net.stages[stage].blocks[block], "attn", None)
    if attn is None:
        raise ValueError(f"stage {stage} has no StructSA layers")
    captured: dict[str, torch.Tensor | tuple[int, ...]] = {}

    def hook(_module: torch.nn.Module, args: tuple) -> None:
        captured["x"], captured["grid"] = args[0], tuple(args[1])

    handle = attn.register_forward_pre_hook(hook)
    was_training = net.training
    try:
        net.eval()
        net.forward_features(image.unsqueeze(0))
    finally:
        handle.remove()
        net.train(was_training)
    x, grid = captured["x"], captured["grid"]
    assert isinstance(x, torch.Tensor) and isinstance(grid, tuple)
    token = tuple(min(q * g // s, g - 1) for q, g, s in zip(query, grid, image.shape[1:], strict=True))
    a, merged = attn.attention_maps(x, grid, [int(np.ravel_multi_index(token, grid))])  # (1,1,h,D,N′), (1,1,C,N)
    per_d = a[0, 0].sum(0).reshape(-1, *kv_grid_size(grid, attn.kernel_size, attn.kv_stride))
    return merged[0, 0].mean(0).reshape(grid), per_d, token


def to_uint8(image: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """A normalised (3, …, H, W) tensor → (…, H, W, 3) uint8 array."""
    shape = (3,) + (1,) * (image.dim() - 1)
    x = image.float().cpu() * torch.tensor(std).view(shape) + torch.tensor(mean).view(shape)
    return (x.clamp(0, 1) * 255).round().byte().movedim(0, -1).numpy()


def _enlarged(rgb: np.ndarray) -> tuple[np.ndarray, int]:
    f = scale_factor(*rgb.shape[:2])
    return rgb.repeat(f, 0).repeat(f, 1), f


def render_attention(net: StructViT, image: torch.Tensor, query: tuple[int, int], stage: int = 2,
                     block: int = -1, mean: Sequence[float] = IMAGENET_MEAN,
                     std: Sequence[float] = IMAGENET_STD) -> Image.Image:
    """Renders the structural attention of one query of an image StructViT.

    Args:
        net: An image StructViT.
        image: One normalised image, (3, H, W).
        query: Query position in input pixels, (row, col).
        stage: Stage of the StructSA layer.
        block: Block within the stage.
        mean: Normalisation mean, to show the image.
        std: Normalisation std.

    Returns:
        A PIL image (RGB), one row of labelled panels: the input with the query marked, the merged map
        over it, and the D detector maps on one shared scale.
    """
    merged, per_d, token = structural_attention(net, image, query, stage, block)
    merged, per_d = merged.float().cpu(), per_d.float().cpu()  # drawn on the host
    rgb, f = _enlarged(to_uint8(image, mean, std))
    lim = float(merged.abs().max()) or 1.0
    share = per_d.flatten(1).sum(1) / max(float(per_d.sum()), 1e-12)
    top = float(per_d.max()) or 1.0
    row = [panel(mark(rgb, (query[0] + 0.5) * f, (query[1] + 0.5) * f), f"input, query at {tuple(query)}"),
           panel(overlay(rgb, diverging(merged.float().numpy() / lim)), f"merged map, token {token}")]
    row += [panel(overlay(rgb, sequential(per_d[k].float().numpy() / top), 0.7),
                  f"detector {k}: {100 * float(share[k]):.0f}% of A") for k in range(per_d.shape[0])]
    return sheet([row])


def render_video_attention(net: StructViT, clip: torch.Tensor, stage: int = 2, block: int = -1,
                           mean: Sequence[float] = IMAGENET_MEAN,
                           std: Sequence[float] = IMAGENET_STD) -> Image.Image:
    """Renders the attention of the clip's centre query over time positions, for a video StructViT.

    Args:
        net: A video StructViT.
        clip: One normalised clip, (3, T, H, W).
        stage: Stage of the StructSA layer.
        block: Block within the stage.
        mean: Normalisation mean, to show the frames.
        std: Normalisation std.

    Returns:
        A PIL image (RGB): per time position of the layer's grid (columns), the frame, the merged map over
        it and the attention over that time's keys (rows), on scales shared across time.
    """
    t, h, w = clip.shape[1:]
    centre = (t // 2, h // 2, w // 2)  # the middle frame lies in the middle time position
    merged, per_d, token = structural_attention(net, clip, centre, stage, block)
    merged, per_d = merged.float().cpu(), per_d.float().cpu()  # drawn on the host
    frames = to_uint8(clip, mean, std)  # (T, H, W, 3)
    lim = float(merged.abs().max()) or 1.0
    attention = per_d.sum(0)  # (T″, H″, W″): over heads and detectors
    top = float(attention.max()) or 1.0
    share = attention.flatten(1).sum(1) / max(float(attention.sum()), 1e-12)
    rows: list[list[Image.Image]] = [[], [], []]
    for tau in range(merged.shape[0]):
        frame = min(t - 1, tau * t // merged.shape[0])
        rgb, f = _enlarged(frames[frame])
        shown = mark(rgb, (centre[1] + 0.5) * f, (centre[2] + 0.5) * f) if tau == token[0] else rgb
        rows[0].append(panel(shown, f"t={tau} (frame {frame})" + (", query" if tau == token[0] else "")))
        rows[1].append(panel(overlay(rgb, diverging(merged[tau].float().numpy() / lim)), f"merged map, t={tau}"))
        kv_tau = min(attention.shape[0] - 1, tau * attention.shape[0] // merged.shape[0])
        rows[2].append(panel(overlay(rgb, sequential(attention[kv_tau].float().numpy() / top), 0.7),
                             f"attention at t={tau}: {100 * float(share[kv_tau]):.0f}%"))
    return sheet(rows)

