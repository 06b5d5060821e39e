"""Structural attention maps of an image StructViT, rendered as a PNG overlay (paper App. D style).

For one query position, the literal StructSA path gives the joint-softmax attention A (h × D × N′) and the
merged structural map c^struct (C × N): the per-key dynamic kernels κ_{i,j} = Σ_d A_{i,(j,d)} H^V_{:,d,:} placed
at their key positions and summed onto the grid, so that y_i = Σ_p c^struct_{i,p} ⊙ v_p. The figure shows the
image with the query, the channel-mean merged map over the image, and the D per-detector maps Σ_h A_{:,d,:}.

    img = render_attention(net, image, query=(112, 80))   # PIL image; img.save("attn.png")
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from model.layers.structsa import kv_grid_size
from model.structvit import StructViT

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@torch.no_grad()
def structural_attention(net: StructViT, image: torch.Tensor, query: tuple[int, int], stage: int = 2,
                         block: int = -1) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
    """Attention of one query of one StructSA layer.

    Args:
        net: An image StructViT (``video=False``).
        image: One normalised image, (3, H, W).
        query: Query position in input pixels, (row, col).
        stage: Stage index of the layer (2 or 3).
        block: Block index within the stage.

    Returns:
        ``(merged, per_d, token)``: the channel-mean merged map (H′, W′) on the token grid, the per-detector
        maps summed over heads (D, H″, W″) on the key/value grid, and the query's token (row, col).

    Raises:
        ValueError: For a video model or a stage without StructSA.
    """
    if net.video:
        raise ValueError("attention maps are implemented for image models only")
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
    token = (query[0] * grid[0] // image.shape[1], query[1] * grid[1] // image.shape[2])
    a, merged = attn.attention_maps(x, grid, [token[0] * grid[1] + token[1]])  # (1,1,h,D,N′), (1,1,C,N)
    per_d = a[0, 0].sum(0).reshape(-1, *kv_grid_size(grid, attn.kernel_size, attn.kv_stride))  # (D, H″, W″)
    return merged[0, 0].mean(0).reshape(grid), per_d, token


def _unnormalise(image: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    m, s = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)
    return (image.float().cpu() * s + m).clamp(0, 1).permute(1, 2, 0)  # (H, W, 3)


def render_attention(net: StructViT, image: torch.Tensor, query: tuple[int, int], stage: int = 2,
                     block: int = -1, mean: Sequence[float] = IMAGENET_MEAN,
                     std: Sequence[float] = IMAGENET_STD) -> Image.Image:
    """Renders the structural attention of one query as a PNG-ready picture.

    Args:
        net: An image StructViT.
        image: One normalised image, (3, H, W).
        query: Query position in input pixels, (row, col).
        stage: Stage of the StructSA layer.
        block: Block within the stage.
        mean: Normalisation mean, to show the image.
        std: Normalisation std.

    Returns:
        A PIL image (RGBA): input with the query marked, merged map overlaid, and the D detector maps.
    """
    # Imported here: matplotlib is heavy and only drawing needs it (``import model.viz`` stays light).
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    merged, per_d, _ = structural_attention(net, image, query, stage, block)
    rgb = _unnormalise(image, mean, std)
    h, w = rgb.shape[:2]
    up = F.interpolate(merged[None, None].float(), size=(h, w), mode="bilinear", align_corners=False)[0, 0]
    d = per_d.shape[0]
    fig = Figure(figsize=(3 * (2 + d), 3.4), dpi=80, layout="constrained")
    axes = fig.subplots(1, 2 + d)
    axes[0].imshow(rgb.numpy())
    axes[0].set_title("query")
    lim = float(up.abs().max()) or 1.0
    axes[1].imshow(rgb.numpy())
    axes[1].imshow(up.numpy(), cmap="coolwarm", vmin=-lim, vmax=lim, alpha=0.6)
    axes[1].set_title("merged structural map")
    for k in range(d):
        axes[2 + k].imshow(per_d[k].float().numpy(), cmap="viridis")
        axes[2 + k].set_title(f"A, detector d={k}")
    for ax in axes[:2]:
        ax.plot([query[1]], [query[0]], marker="x", color="yellow", markersize=12, mew=3)
    for ax in axes:
        ax.set_axis_off()
    buf = io.BytesIO()
    FigureCanvasAgg(fig).print_png(buf)
    buf.seek(0)
    return Image.open(buf).copy()
