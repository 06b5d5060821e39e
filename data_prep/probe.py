"""Header-only image inspection with PIL (format and size, without decoding pixels)."""

from __future__ import annotations

import io
import re
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from data_prep.format import JPG, PNG

#: PIL format name -> (WebDataset component extension, manifest format name).
#: MPO is the multi-picture JPEG variant some cameras write; its first frame is a plain JPEG stream.
_FORMATS: dict[str, tuple[str, str]] = {
    "JPEG": (JPG, "jpeg"),
    "MPO": (JPG, "jpeg"),
    "PNG": (PNG, "png"),
    "TIFF": (PNG, "png"),  # always decoded and stored as PNG (data_prep.pixels)
}
_ADDRESS_RE = re.compile(r" at 0x[0-9a-fA-F]+")


class ProbeError(Exception):
    """The bytes are not an image this pipeline accepts; the message is the reason."""


@dataclass(frozen=True)
class ImageInfo:
    """Format and size of an encoded image.

    Attributes:
        ext: WebDataset component extension (``"jpg"`` or ``"png"``).
        format: Manifest format name (``"jpeg"`` or ``"png"``).
        width: Width in pixels.
        height: Height in pixels.
    """

    ext: str
    format: str
    width: int
    height: int


def probe_image(data: bytes) -> ImageInfo:
    """Read format and size from the image header.

    Only the header is parsed (``Image.open(...).size``); pixel data is not decoded, so a file whose
    header is intact but whose body is truncated is not detected here. The format comes from the
    content, not the file name: a PNG saved as ``.JPEG`` (ImageNet has one) is stored as ``png``.

    Args:
        data: Encoded file bytes.

    Returns:
        The image's format and size.

    Raises:
        ProbeError: If PIL cannot identify the bytes, or the format is not JPEG or PNG.
    """
    img, info = open_image(data)
    img.close()
    return info


def open_image(data: bytes) -> tuple[Image.Image, ImageInfo]:
    """Open an image lazily (header parsed, pixels not decoded) and identify it, as :func:`probe_image`.

    Args:
        data: Encoded file bytes.

    Returns:
        The opened image, which the caller closes (or decodes), and its format and size.

    Raises:
        ProbeError: If PIL cannot identify the bytes, or the format is not JPEG or PNG.
    """
    try:
        img = Image.open(io.BytesIO(data))
        pil_format = img.format or "unknown"
        width, height = img.size
    except UnidentifiedImageError as exc:
        raise ProbeError("PIL cannot identify the data as an image (corrupt file or unknown format)") from exc
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad input
        # Strip object addresses ("<_io.BytesIO object at 0x...>") so reasons are reproducible.
        message = _ADDRESS_RE.sub("", str(exc))
        raise ProbeError(f"cannot read image header: {type(exc).__name__}: {message}") from exc
    if pil_format not in _FORMATS or width <= 0 or height <= 0:
        img.close()
        if pil_format not in _FORMATS:
            raise ProbeError(f"unsupported image format {pil_format} (only JPEG, PNG and TIFF are accepted)")
        raise ProbeError(f"invalid image size {width}x{height}")
    ext, fmt = _FORMATS[pil_format]
    return img, ImageInfo(ext=ext, format=fmt, width=int(width), height=int(height))
