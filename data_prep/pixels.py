"""Pixel conversions at prep time, so that every loader decodes a stored image to the same pixels.

PIL (the ``wds`` backend) and DALI's decoders agree on 8-bit greyscale or RGB JPEG and PNG without an
EXIF orientation; they disagree elsewhere (a 16-bit PNG: PIL's ``convert("RGB")`` clips it to 255,
DALI scales it; an EXIF-rotated JPEG: one loader rotates, the other does not). Prep therefore stores
only those: every other input is decoded here, converted by the rules below and re-encoded (PNG for
lossless sources, JPEG for JPEG sources), and the manifest's ``note`` column says what was done.

======================  ==========================================================  ======================
source pixels           rule                                                        note
======================  ==========================================================  ======================
16-bit (PNG, TIFF)      ``value >> 8`` (the high byte; PIL's own rule for 16-bit    ``16-bit->8-bit (>>8)``
                        RGB PNG), never clipped
32-bit integer ``I``    values in 0..255 kept; in 0..65535 ``>> 8``; otherwise      ``32-bit->8-bit (...)``
                        linear min..max -> 0..255
32-bit float ``F``      values in 0..1 ``x 255`` rounded; otherwise linear          ``float->8-bit (...)``
                        min..max -> 0..255 (NaN -> 0)
1, 2 or 4 bits          scaled to 0..255 (1-bit: 0 / 255)                           ``1-bit->8-bit``
palette (``P``)         expanded to RGB; its transparency as alpha (next row)       ``palette->rgb``
alpha (LA, RGBA, PA)    composited over black (``c * a / 255``); alpha dropped      ``alpha over black``
CMYK, YCbCr, LAB, HSV   converted to RGB with PIL                                   ``cmyk->rgb``, ...
EXIF orientation 2-8    applied (stored upright; no EXIF is written)                ``exif-rotated (N)``
TIFF                    stored as PNG (lossless)                                    ``tiff->png``
======================  ==========================================================  ======================
"""

from __future__ import annotations

import numpy as np
from PIL import Image

ORIENTATION_TAG = 0x0112
#: EXIF orientation -> the transposition that makes the image upright (as ``PIL.ImageOps.exif_transpose``).
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
#: PIL modes whose pixels are stored as they are (8 bits per channel, no alpha).
PLAIN_MODES = frozenset({"L", "RGB"})
#: PIL modes of single-channel (greyscale) images.
GREY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def exif_orientation(img: Image.Image) -> int:
    """Return the image's EXIF orientation (1 when absent, unreadable or not one of 1..8)."""
    try:
        value = img.getexif().get(ORIENTATION_TAG)
    except Exception:  # noqa: BLE001 - a damaged EXIF block is no orientation
        return 1
    return int(value) if isinstance(value, int) and value in _UPRIGHT else 1


def upright(img: Image.Image, orientation: int) -> Image.Image:
    """Return ``img`` turned upright for an EXIF ``orientation`` (the image itself for 1)."""
    method = _UPRIGHT.get(orientation)
    return img if method is None else img.transpose(method)


def png_bit_depth(data: bytes) -> int | None:
    """Return the bit depth per channel from a PNG's IHDR chunk, or None when ``data`` is not a PNG."""
    if len(data) < 26 or not data.startswith(_PNG_SIGNATURE) or data[12:16] != b"IHDR":
        return None
    return data[24]


def is_plain(img: Image.Image, bits: int | None) -> bool:
    """True when an opened image decodes identically in every loader as it is (8-bit L or RGB)."""
    return img.mode in PLAIN_MODES and bits in (None, 8)


def _over_black(arr: np.ndarray) -> np.ndarray:
    """Composite ``H x W x (C+1)`` uint8 pixels with their last channel as alpha over black."""
    colour, alpha = arr[..., :-1].astype(np.uint32), arr[..., -1:].astype(np.uint32)
    return ((colour * alpha + 127) // 255).astype(np.uint8)


def _scaled_int(arr: np.ndarray, what: str) -> tuple[np.ndarray, str]:
    lo, hi = int(arr.min()), int(arr.max())
    if lo >= 0 and hi <= 255:
        return arr.astype(np.uint8), f"{what}->8-bit (values 0..255 kept)"
    if lo >= 0 and hi <= 65535:
        return (arr >> 8).astype(np.uint8), f"{what}->8-bit (>>8)"
    return _linear(arr.astype(np.float64), lo, hi), f"{what}->8-bit (min {lo}..max {hi} -> 0..255)"


def _linear(arr: np.ndarray, lo: float, hi: float) -> np.ndarray:
    if hi <= lo:
        return np.full(arr.shape, int(np.clip(round(lo), 0, 255)), np.uint8)
    return np.rint((arr - lo) * (255.0 / (hi - lo))).clip(0, 255).astype(np.uint8)


def _scaled_float(arr: np.ndarray) -> tuple[np.ndarray, str]:
    arr = np.nan_to_num(arr.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = float(arr.min()), float(arr.max())
    if lo >= 0.0 and hi <= 1.0:
        return np.rint(arr * 255.0).astype(np.uint8), "float->8-bit (0..1 x255)"
    return _linear(arr, lo, hi), f"float->8-bit (min {lo:g}..max {hi:g} -> 0..255)"


def to_8bit(img: Image.Image, bits: int | None = None) -> tuple[Image.Image, list[str]]:
    """Convert a loaded image to 8-bit ``L`` or ``RGB`` by the module's rules.

    Args:
        img: A decoded (loaded) image of any PIL mode.
        bits: Bit depth per channel of the source when known (a PNG's IHDR), else None.

    Returns:
        The converted image (``img`` itself when it is already 8-bit L or RGB) and the notes that
        describe the conversion (empty when none).
    """
    out, notes = _convert(img, bits)
    if bits not in (None, 8) and img.mode not in ("1", "P", "PA") and not any("-bit->" in n for n in notes):
        notes.insert(0, f"{bits}-bit->8-bit" + (" (>>8)" if bits == 16 else ""))  # PIL took the high byte
    return out, notes


def _convert(img: Image.Image, bits: int | None) -> tuple[Image.Image, list[str]]:
    mode = img.mode
    if mode in PLAIN_MODES:
        return img, []
    if mode.startswith("I;16"):
        arr = np.asarray(img).astype(np.uint16)
        return Image.fromarray((arr >> 8).astype(np.uint8), "L"), ["16-bit->8-bit (>>8)"]
    if mode == "I":
        out, note = _scaled_int(np.asarray(img).astype(np.int64), f"{bits or 32}-bit")
        return Image.fromarray(out, "L"), [note]
    if mode == "F":
        out, note = _scaled_float(np.asarray(img))
        return Image.fromarray(out, "L"), [note]
    if mode == "1":
        return img.convert("L"), ["1-bit->8-bit"]
    if mode in ("P", "PA"):
        alpha = mode == "PA" or "transparency" in img.info
        rgb = img.convert("RGBA" if alpha else "RGB")
        notes = ["palette->rgb"]
        if alpha:
            rgb = Image.fromarray(_over_black(np.asarray(rgb)), "RGB")
            notes.append("alpha over black")
        return rgb, notes
    if mode in ("LA", "La", "RGBA", "RGBa"):
        base = img.convert("LA" if mode.startswith("L") else "RGBA")  # premultiplied -> straight alpha
        out = _over_black(np.asarray(base))
        grey = out.shape[-1] == 1
        return Image.fromarray(out[..., 0] if grey else out, "L" if grey else "RGB"), ["alpha over black"]
    return img.convert("RGB"), [f"{mode.lower()}->rgb"]
