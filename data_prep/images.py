"""Reading, checking and (optionally) re-encoding one source image.

What happens to each kind of input (also in ``docs/data_prep.md``):

=========================  ===================================================================
input                      outcome
=========================  ===================================================================
JPEG / PNG                 stored byte-for-byte (default) or resized and re-encoded (``resize``)
zero-byte file             quarantined: ``empty file``
not an image               quarantined: ``PIL cannot identify ...``
other image format         quarantined: ``unsupported image format ...`` (GIF, BMP, WebP, ...)
truncated / corrupt data   quarantined: ``truncated or corrupt image data`` (decode check)
more than ``max_pixels``   quarantined: ``decompression bomb ...`` (checked from the header)
CMYK / YCCK JPEG           converted: decoded to RGB and re-encoded as JPEG (note ``cmyk->rgb``)
greyscale                  stored as-is (note ``grayscale``); both loaders decode to RGB
PNG named ``.JPEG``        stored as ``png`` (the content decides; note ``png named .jpeg``)
=========================  ===================================================================

The decode check of a JPEG that is stored as-is decodes it at 1/8 scale, luma only (``Image.draft``):
libjpeg still reads and entropy-decodes every coefficient of every component, so truncated or
corrupt data fails exactly as in a full decode, but the inverse DCT, chroma upsampling and colour
conversion run on 1/64 of the pixels (about 1.7x cheaper for a 500x375 photo). Images whose pixels are
needed (resize, CMYK conversion) are decoded as before; PNGs are decoded in full.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

from PIL import Image

from data_prep.format import JPG
from data_prep.probe import ImageInfo, ProbeError, open_image

#: PIL's own default limit (about 89.5 MP); larger images are quarantined as decompression bombs.
DEFAULT_MAX_PIXELS = 89_478_485


class Quarantine(Exception):  # noqa: N818 - an outcome, not an error of the program
    """The input cannot be stored; ``str(exc)`` is the reason recorded in the quarantine manifest."""


@dataclass(frozen=True)
class Encoded:
    """A payload ready to be written to a shard.

    Attributes:
        components: Media components as ``(extension, bytes)``: one for an image or a video file,
            one per frame (``f0000.jpg``, ...) for JPEG frame sequences.
        format: Manifest format name (``jpeg``, ``png``, ``h264``, ``vp9``, ``jpeg-frames``).
        width: Width in pixels.
        height: Height in pixels.
        fps: Frames per second (videos only).
        frames: Frame count (videos only).
        duration: Duration in seconds (videos only).
        note: Conversions applied or facts worth knowing, ``;``-separated ("" when none).
    """

    components: list[tuple[str, bytes]]
    format: str
    width: int
    height: int
    fps: float | None = None
    frames: int | None = None
    duration: float | None = None
    note: str = ""


@dataclass(frozen=True)
class ImageOptions:
    """How images are checked and stored.

    Attributes:
        resize: Short side in pixels to downscale larger images to (re-encoded as JPEG); None stores
            the source bytes unchanged.
        quality: JPEG quality of re-encoded images.
        decode_check: Decode every image to catch truncated or corrupt data (the default; JPEGs stored
            as-is at reduced scale, see the module docstring); False checks the header only, which is
            faster but lets truncated files through.
        max_pixels: Images with more pixels are quarantined without being decoded.
    """

    resize: int | None = None
    quality: int = 90
    decode_check: bool = True
    max_pixels: int = DEFAULT_MAX_PIXELS


def _encode_jpeg(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _resized(img: Image.Image, short: int) -> Image.Image:
    w, h = img.size
    scale = short / min(w, h)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    img.draft("RGB", size)  # JPEG: let libjpeg decode at 1/2, 1/4 or 1/8 scale first (much faster)
    return img.convert("RGB").resize(size, Image.Resampling.BICUBIC, reducing_gap=2.0)


def check_decodes(img: Image.Image) -> None:
    """Decode an opened image only to prove that its data is complete and sound; the pixels are discarded.

    A JPEG is decoded at 1/8 scale and, when it is YCbCr, as luma only: the entropy-coded data of every
    component is still read to its end (that is where truncation and corruption show), only the
    inverse DCT and colour conversion work on fewer pixels. Other formats are decoded in full.

    Args:
        img: An image opened with ``Image.open`` and not loaded yet; it is consumed.

    Raises:
        OSError, SyntaxError, ValueError: From the decoder, on truncated or corrupt data.
    """
    if img.format in ("JPEG", "MPO"):
        img.draft("L" if img.mode == "RGB" else img.mode, (1, 1))
    img.load()


def process_image(data: bytes, name: str, opts: ImageOptions) -> Encoded:
    """Check one source image and return what to store.

    Args:
        data: The file bytes.
        name: The source file name (only its extension is used, for the ``png named .jpeg`` note).
        opts: Check and re-encode options.

    Returns:
        The payload to store.

    Raises:
        Quarantine: If the input cannot be stored (see the module table for the reasons).
    """
    if not data:
        raise Quarantine("empty file (0 bytes)")
    try:
        img, info = open_image(data)
    except ProbeError as exc:
        raise Quarantine(str(exc)) from exc
    with img:
        return _check_and_encode(img, info, data, name, opts)


def _check_and_encode(img: Image.Image, info: ImageInfo, data: bytes, name: str, opts: ImageOptions) -> Encoded:
    pixels = info.width * info.height
    if pixels > opts.max_pixels:
        raise Quarantine(f"decompression bomb: {info.width}x{info.height} = {pixels} pixels > {opts.max_pixels}")
    notes = []
    if info.format == "png" and name.lower().endswith((".jpg", ".jpeg")):
        notes.append("png named .jpeg")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # size was checked above
        try:
            mode = img.mode
            cmyk = mode == "CMYK"  # CMYK and YCCK JPEGs both open as CMYK in PIL
            resize = opts.resize is not None and min(img.size) > opts.resize
            if mode in ("L", "LA", "1", "I;16"):
                notes.append("grayscale")
            if resize:
                out = _resized(img, opts.resize)
                notes.append(f"resized to short side {opts.resize}")
                if cmyk:
                    notes.append("cmyk->rgb")
                payload = _encode_jpeg(out, opts.quality)
                return Encoded([(JPG, payload)], "jpeg", out.width, out.height, note="; ".join(notes))
            if cmyk:
                notes.append("cmyk->rgb")
                payload = _encode_jpeg(img.convert("RGB"), max(opts.quality, 95))
                return Encoded([(JPG, payload)], "jpeg", info.width, info.height, note="; ".join(notes))
            if opts.decode_check or opts.resize is not None:
                check_decodes(img)  # stored as-is: only whether it decodes matters
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            raise Quarantine(f"truncated or corrupt image data: {exc}") from exc
    return Encoded([(info.ext, data)], info.format, info.width, info.height, note="; ".join(notes))
