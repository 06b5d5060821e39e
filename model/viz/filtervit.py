"""Filter-mask pictures of a FilterViT/DropoutViT: the continuous score and the selected top-K pixels.

For each filter block the model computes two masks (spec ``filtervit.md`` §9–10): the continuous
gate s ∈ (0.46, 1) that multiplies every pixel, and the binary top-K selection that picks the tokens.
:func:`render_filter_masks` draws both, per filter block, as overlays on the input crop (nearest
upsampling from the feature map, so one feature pixel is one visible block). It returns PIL images,
so training code can log them (``mlflow.log_image``) and ``vitpipe viz masks`` saves them as PNG.
The author's own visualisation saved only the binary mask at feature-map resolution.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from model.layers.filter_attention import TokenSubsetAttention

#: Anchor colours of the score colour map (dark blue → teal → yellow), as in perceptual maps.
_CMAP = np.array([[13, 8, 135], [84, 2, 163], [139, 10, 165], [185, 50, 137], [219, 92, 104], [244, 136, 73],
                  [254, 188, 43], [240, 249, 33]], dtype=np.float32)


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


def _upsample(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    return np.asarray(Image.fromarray(mask).resize(size, Image.NEAREST))


def _colormap(x: np.ndarray) -> np.ndarray:
    pos = np.clip(x, 0, 1) * (len(_CMAP) - 1)
    lo = np.floor(pos).astype(int).clip(0, len(_CMAP) - 2)
    frac = (pos - lo)[..., None]
    return (_CMAP[lo] * (1 - frac) + _CMAP[lo + 1] * frac).astype(np.uint8)


def _label(img: Image.Image, text: str) -> Image.Image:
    ImageDraw.Draw(img).text((3, 2), text, fill=(255, 255, 255), stroke_width=1, stroke_fill=(0, 0, 0))
    return img


def overlay_panels(image: np.ndarray, masks: list[FilterMasks], b: int) -> list[tuple[str, Image.Image]]:
    """Overlays of sample ``b``: for each block, the score (if any) and the top-K selection.

    Args:
        image: The input crop, H×W×3 uint8.
        masks: From :func:`collect_filter_masks`.
        b: Sample index in the batch.

    Returns:
        (name, picture) pairs, e.g. ``("L0-55-score", ...)``, ``("L0-55-top256", ...)``.
    """
    size = (image.shape[1], image.shape[0])
    base = image.astype(np.float32)
    panels = []
    for m in masks:
        sel = m.selected[b].numpy()
        (h, w), k = sel.shape, int(sel.sum())
        if m.scores is not None:
            s = m.scores[b].numpy()
            norm = (s - s.min()) / max(float(s.max() - s.min()), 1e-6)  # stretched per map: s ∈ (0.46, 1)
            heat = _upsample(_colormap(norm), size).astype(np.float32)
            pic = Image.fromarray((0.45 * base + 0.55 * heat).astype(np.uint8))
            text = f"L{m.layer} {h}x{w} score {s.min():.2f}-{s.max():.2f}"
            panels.append((f"L{m.layer}-{h}-score", _label(pic, text)))
        on = _upsample(sel.astype(np.uint8) * 255, size)[..., None] > 0
        red = np.array([255, 40, 40], dtype=np.float32)
        pic = Image.fromarray(np.where(on, 0.4 * base + 0.6 * red, 0.35 * base).astype(np.uint8))
        panels.append((f"L{m.layer}-{h}-top{k}", _label(pic, f"L{m.layer} {h}x{w} top-{k}")))
    return panels


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
    tiles = [_label(Image.fromarray(crop), "input"), *(p for _, p in panels)]
    sheet = Image.new("RGB", (sum(t.width for t in tiles) + 4 * (len(tiles) - 1), crop.shape[0]), "white")
    x = 0
    for t in tiles:
        sheet.paste(t, (x, 0))
        x += t.width + 4
    return sheet


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
