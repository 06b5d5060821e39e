"""Filter-mask pictures of a FilterViT/DropoutViT: the continuous score and the selected top-K pixels.

For each filter block the model computes two masks (spec ``filtervit.md`` §9–10): the continuous
gate s ∈ (0.46, 1) that multiplies every pixel, and the binary top-K selection that picks the tokens.
:func:`render_filter_masks` draws both, per filter block, as overlays on the input crop (nearest
upsampling from the feature map, so one feature pixel is one visible block; panels of at least 256 px,
labelled above). It returns PIL images, so training code can log them (``mlflow.log_image``) and
``vitpipe viz masks`` saves them as PNG.
The author's own visualisation saved only the binary mask at feature-map resolution.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from model.layers.filter_attention import TokenSubsetAttention
from model.viz.panels import enlarge, overlay, panel, scale_factor, sequential, sheet, stretch


@dataclass
class FilterMasks:
    """The masks of one filter block for a batch.

    Attributes:
        layer: Index of the block among the model's filter blocks.
        scores: Continuous scores B×H×W (``None`` for DropoutViT's random selection).
        selected: Binary top-K selection B×H×W (bool).
    """

    layer: int
    scores: torch.Tensor | None
    selected: torch.Tensor


@torch.no_grad()
def collect_filter_masks(net: torch.nn.Module, images: torch.Tensor) -> list[FilterMasks]:
    """Runs ``net`` in eval mode on normalised images B×3×H×W and returns every filter block's masks."""
    layers = [m for m in net.modules() if isinstance(m, TokenSubsetAttention)]
    was_training = net.training
    net.eval()
    for layer in layers:
        layer.record = True
    try:
        net(images)
    finally:
        for layer in layers:
            layer.record = False
        net.train(was_training)
    out = []
    for i, layer in enumerate(layers):
        if layer.last_index is None:
            continue
        index, (h, w) = layer.last_index, layer.last_hw
        sel = torch.zeros(index.shape[0], h * w, dtype=torch.bool, device=index.device).scatter_(1, index, True)
        scores = None if layer.last_scores is None else layer.last_scores[:, 0].float().cpu()
        out.append(FilterMasks(i, scores, sel.view(-1, h, w).cpu()))
        layer.last_scores = layer.last_index = None
    return out


def overlay_panels(image: np.ndarray, masks: list[FilterMasks], b: int) -> list[tuple[str, Image.Image]]:
    """Labelled overlays of sample ``b``: for each block, the score (if any) and the top-K selection.

    Each overlay is enlarged to at least :data:`model.viz.panels.PANEL` pixels by nearest neighbour, so
    that one feature-map pixel is one visible block.

    Args:
        image: The input crop, H×W×3 uint8.
        masks: From :func:`collect_filter_masks`.
        b: Sample index in the batch.

    Returns:
        (name, picture) pairs, e.g. ``("L0-55-score", ...)``, ``("L0-55-top256", ...)``.
    """
    base = _enlarged(image)
    panels = []
    for m in masks:
        sel = m.selected[b].numpy()
        (h, w), k = sel.shape, int(sel.sum())
        if m.scores is not None:
            s = m.scores[b].numpy()  # stretched per map: s lies in (0.46, 1)
            text = f"block {m.layer} ({h}x{w}): score {s.min():.2f}-{s.max():.2f}"
            panels.append((f"L{m.layer}-{h}-score", panel(overlay(base, sequential(stretch(s))), text)))
        on = enlarge(sel.astype(np.uint8) * 255, (base.shape[1], base.shape[0]))[..., None] > 0
        red = np.array([255, 40, 40], dtype=np.float32)
        pic = np.where(on, 0.4 * base + 0.6 * red, 0.35 * base).astype(np.uint8)
        panels.append((f"L{m.layer}-{h}-top{k}", panel(pic, f"block {m.layer} ({h}x{w}): top-{k} of {h * w}")))
    return panels


def _enlarged(image: np.ndarray) -> np.ndarray:
    f = scale_factor(*image.shape[:2])
    return image.repeat(f, 0).repeat(f, 1)


def denormalise(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """Normalised B×3×H×W → B×H×W×3 uint8."""
    x = images.detach().float().cpu() * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)
    return (x.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()


def render_filter_masks(net: torch.nn.Module, images: torch.Tensor, mean: tuple[float, ...] = (0.5, 0.5, 0.5),
                        std: tuple[float, ...] = (0.5, 0.5, 0.5)) -> list[Image.Image]:
    """One picture per sample: the crop, then each filter block's score and top-K overlays, side by side.

    Callable from training (e.g. every N epochs on a fixed validation batch, then ``mlflow.log_image``).

    Args:
        net: A FilterViT/DropoutViT (any model with :class:`TokenSubsetAttention` layers).
        images: Normalised batch B×3×H×W on the model's device.
        mean: Normalisation mean of ``images``.
        std: Normalisation std of ``images``.

    Returns:
        B PIL images.
    """
    masks = collect_filter_masks(net, images)
    return [_sheet(crop, overlay_panels(crop, masks, b)) for b, crop in enumerate(denormalise(images, mean, std))]


def _sheet(crop: np.ndarray, panels: list[tuple[str, Image.Image]]) -> Image.Image:
    return sheet([[panel(_enlarged(crop), "input"), *(p for _, p in panels)]])


def load_crop(path: Path, size: int, crop_pct: float, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """An image file → normalised 3×size×size tensor (short side to size / crop_pct, centre crop), PIL only."""
    img = Image.open(path).convert("RGB")
    short = int(round(size / crop_pct))
    scale = short / min(img.size)
    img = img.resize((max(short, round(img.width * scale)), max(short, round(img.height * scale))), Image.BICUBIC)
    left, top = (img.width - size) // 2, (img.height - size) // 2
    x = torch.from_numpy(np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.float32) / 255)
    return (x.permute(2, 0, 1) - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def save_filter_masks(net: torch.nn.Module, paths: list[Path], out_dir: Path, batch_size: int = 8) -> list[Path]:
    """Writes, for each image file, ``<stem>-masks.png`` (the sheet) and one PNG per overlay.

    Returns:
        The written files.
    """
    cfg = getattr(net, "pretrained_cfg", {}) or {}
    size = int(cfg.get("input_size", (3, 224, 224))[-1])
    mean, std = tuple(cfg.get("mean", (0.5,) * 3)), tuple(cfg.get("std", (0.5,) * 3))
    device = next(net.parameters()).device
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for start in range(0, len(paths), batch_size):
        chunk = paths[start:start + batch_size]
        images = torch.stack([load_crop(p, size, float(cfg.get("crop_pct", 0.875)), mean, std) for p in chunk])
        images = images.to(device)
        masks = collect_filter_masks(net, images)  # one forward: the sheet and the single overlays agree
        for b, (path, crop) in enumerate(zip(chunk, denormalise(images, mean, std), strict=True)):
            panels = overlay_panels(crop, masks, b)
            for name, pic in [("masks", _sheet(crop, panels)), *panels]:
                written.append(out_dir / f"{path.stem}-{name}.png")
                pic.save(written[-1])
    return written
