"""The embedded default data set: scikit-learn's 1,797 scanned handwritten digits as real JPEG files.

The digits (8×8 pixels, 17 grey levels, 10 classes; the UCI "Optical Recognition of Handwritten
Digits" test set) ship inside scikit-learn, so the demo needs no download. They are written in
ImageNet's folder layout::

    <out>/train/<class-id>/digit_<index>.JPEG     class-id = "0" ... "9"
    <out>/val/<class-id>/digit_<index>.JPEG

Split (fixed): sample ``i`` of ``sklearn.datasets.load_digits()`` goes to ``val`` when
``i % 5 == 4``, else to ``train``: 1,438 train and 359 val images, every class in both.
Each image is scaled from 0-16 to 0-255, upscaled with bicubic interpolation and saved as a
greyscale baseline JPEG (quality 95).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
from PIL import Image

from data_prep.format import atomic_write_bytes

logger = logging.getLogger(__name__)

VAL_EVERY, VAL_REMAINDER = 5, 4
_MARKER = "digits.json"


def split_of(index: int) -> str:
    """The fixed split of digit ``index``."""
    return "val" if index % VAL_EVERY == VAL_REMAINDER else "train"


def write_digits(out: Path, size: int = 32, limit: int | None = None) -> dict[str, int]:
    """Writes the digits as JPEG files in ImageNet layout (skipped when already complete).

    Args:
        out: Output root (gets ``train/`` and ``val/``).
        size: Side of the upscaled square images.
        limit: Write only the first ``limit`` digits (for fast tests); None writes all 1,797.

    Returns:
        Number of images per split.
    """
    from sklearn.datasets import load_digits

    marker = out / _MARKER
    wanted = {"size": size, "limit": limit}
    if marker.is_file() and json.loads(marker.read_text()).get("options") == wanted:
        return json.loads(marker.read_text())["counts"]
    digits = load_digits()
    images = digits.images[:limit] if limit else digits.images  # N×8×8, values 0..16
    counts = {"train": 0, "val": 0}
    for i, (pixels, label) in enumerate(zip(images, digits.target, strict=False)):
        split = split_of(i)
        folder = out / split / str(int(label))
        folder.mkdir(parents=True, exist_ok=True)
        grey = Image.fromarray(np.round(pixels * (255.0 / 16.0)).astype(np.uint8), mode="L")
        grey.resize((size, size), Image.BICUBIC).save(folder / f"digit_{i:04d}.JPEG", quality=95)
        counts[split] += 1
    atomic_write_bytes(marker, json.dumps({"options": wanted, "counts": counts}).encode())
    logger.info("wrote %d train and %d val digit JPEGs (%d×%d) under %s", counts["train"], counts["val"],
                size, size, out)
    return counts
