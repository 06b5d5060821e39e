"""Drawing helpers shared by the models' pictures: panels readable at a glance, in PIL only.

Every panel is at least :data:`PANEL` pixels on its short side: small inputs (a 32 px crop) are
enlarged by an integer factor with nearest-neighbour sampling, so that one input or feature pixel is
one visible block, never a blur. Each panel carries its label in a caption bar above it, in a font
sized from the panel's width (not a fixed few pixels), and a picture is a grid of such panels.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

PANEL = 256
"""Smallest side of a panel in pixels."""

GAP = 6
"""White space between panels."""

#: Anchor colours of a sequential colour map (dark blue → purple → orange → yellow, as perceptual maps).
_SEQUENTIAL = np.array([[13, 8, 135], [84, 2, 163], [139, 10, 165], [185, 50, 137], [219, 92, 104],
                        [244, 136, 73], [254, 188, 43], [240, 249, 33]], dtype=np.float32)
#: Anchor colours of a diverging colour map (blue → white → red) for signed maps.
_DIVERGING = np.array([[59, 76, 192], [141, 176, 254], [221, 221, 221], [244, 154, 123], [180, 4, 38]],
                      dtype=np.float32)


def _interpolate(anchors: np.ndarray, x: np.ndarray) -> np.ndarray:
    pos = np.clip(x, 0, 1) * (len(anchors) - 1)
    lo = np.floor(pos).astype(int).clip(0, len(anchors) - 2)
    frac = (pos - lo)[..., None]
    return (anchors[lo] * (1 - frac) + anchors[lo + 1] * frac).astype(np.uint8)


def sequential(x: np.ndarray) -> np.ndarray:
    """Values in [0, 1] → H×W×3 uint8 colours (dark = low, yellow = high)."""
    return _interpolate(_SEQUENTIAL, x)


def diverging(x: np.ndarray) -> np.ndarray:
    """Values in [-1, 1] → H×W×3 uint8 colours (blue = negative, grey = 0, red = positive)."""
    return _interpolate(_DIVERGING, (np.asarray(x) + 1) / 2)


def stretch(x: np.ndarray) -> np.ndarray:
    """Min-max stretch to [0, 1] (a constant map becomes 0)."""
    x = np.asarray(x, dtype=np.float32)
    return (x - x.min()) / max(float(x.max() - x.min()), 1e-12)


def scale_factor(height: int, width: int, min_side: int = PANEL) -> int:
    """The integer enlargement that brings the short side to at least ``min_side`` (1 when it is already)."""
    return max(1, math.ceil(min_side / max(1, min(height, width))))


def enlarge(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of an H×W(×3) uint8 array to ``size`` = (width, height)."""
    return np.asarray(Image.fromarray(rgb).resize(size, Image.NEAREST))


def blend(base: np.ndarray, overlay: np.ndarray, alpha: float) -> np.ndarray:
    """``(1 - alpha) · base + alpha · overlay`` for uint8 H×W×3 arrays of the same size."""
    return ((1 - alpha) * base.astype(np.float32) + alpha * overlay.astype(np.float32)).astype(np.uint8)


def overlay(image: np.ndarray, heat: np.ndarray, alpha: float = 0.55) -> np.ndarray:
    """A low-resolution colour map (h×w×3) over an image (H×W×3), nearest-neighbour, both uint8."""
    return blend(image, enlarge(heat, (image.shape[1], image.shape[0])), alpha)


@lru_cache(maxsize=16)
def font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's built-in font at ``size`` pixels (a bitmap font where FreeType is missing)."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ValueError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def font_size(width: int) -> int:
    """The caption font size for a panel of ``width`` pixels: about 1/16 of it, at least 12."""
    return max(12, width // 16)


def panel(rgb: np.ndarray, label: str) -> Image.Image:
    """One labelled panel: a caption bar, then the picture (uint8 H×W×3, already at panel size).

    The caption's font is sized from the panel's width and shrinks for long labels, so that it fits.
    """
    height, width = rgb.shape[:2]
    size = font_size(width)
    draw_font = font(size)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    while size > 10 and probe.textlength(label, font=draw_font) > width - 8:
        size -= 1
        draw_font = font(size)
    bar = int(font_size(width) * 1.5)
    tile = Image.new("RGB", (width, bar + height), "white")
    tile.paste(Image.fromarray(rgb), (0, bar))
    ImageDraw.Draw(tile).text((4, (bar - size) // 2), label, fill=(0, 0, 0), font=draw_font)
    return tile


def mark(rgb: np.ndarray, row: float, col: float) -> np.ndarray:
    """A yellow cross with a dark outline at (row, col) of an H×W×3 uint8 array (a copy)."""
    img = Image.fromarray(rgb.copy())
    draw = ImageDraw.Draw(img)
    arm, width = max(6, min(img.size) // 14), max(2, min(img.size) // 64)
    for colour, extra in (((0, 0, 0), 2), ((255, 230, 0), 0)):
        draw.line([(col - arm, row - arm), (col + arm, row + arm)], fill=colour, width=width + extra)
        draw.line([(col - arm, row + arm), (col + arm, row - arm)], fill=colour, width=width + extra)
    return np.asarray(img)


def sheet(rows: list[list[Image.Image]]) -> Image.Image:
    """Lays panels out row by row, left-aligned, with :data:`GAP` pixels of white between them."""
    heights = [max(t.height for t in row) for row in rows]
    width = max(sum(t.width for t in row) + GAP * (len(row) - 1) for row in rows)
    out = Image.new("RGB", (width, sum(heights) + GAP * (len(rows) - 1)), "white")
    y = 0
    for row, height in zip(rows, heights, strict=True):
        x = 0
        for tile in row:
            out.paste(tile, (x, y))
            x += tile.width + GAP
        y += height + GAP
    return out
