"""Reading, checking and (optionally) re-encoding one source image.

What happens to each kind of input (also in ``docs/data_prep.md``):

=========================  ===================================================================
input                      outcome
=========================  ===================================================================
8-bit grey/RGB JPEG / PNG  stored byte-for-byte (default) or resized and re-encoded (``resize``)
other pixels, TIFF         converted to 8-bit L/RGB and re-encoded (PNG; JPEG for JPEG sources), noted:
                           16-bit, float, palette, alpha, 1-bit, YCbCr, ... (:mod:`data_prep.pixels`)
EXIF orientation 2..8      turned upright and re-encoded without EXIF (note ``exif-rotated (N)``)
zero-byte file             quarantined: ``empty file``
not an image               quarantined: ``PIL cannot identify ...``
other image format         quarantined: ``unsupported image format ...`` (GIF, BMP, WebP, ...)
truncated / corrupt data   quarantined: ``truncated or corrupt image data`` (decode check)
more than ``max_pixels``   quarantined: ``decompression bomb ...`` (checked from the header)
CMYK / YCCK JPEG           converted: decoded to RGB and re-encoded as JPEG (note ``cmyk->rgb``)
8-bit greyscale            stored as-is (note ``grayscale``); both loaders decode to RGB
PNG named ``.JPEG``        stored as ``png`` (the content decides; note ``png named .jpeg``)
=========================  ===================================================================

The decode check of a JPEG that is stored as-is decodes it at 1/8 scale, luma only (``Image.draft``):
libjpeg still reads and entropy-decodes every coefficient of every component, so truncated or
corrupt data fails exactly as in a full decode, but the inverse DCT, chroma upsampling and colour
conversion run on 1/64 of the pixels (about 1.7x cheaper for a 500x375 photo). Images whose pixels are
needed (resize, conversion, orientation) are decoded in full; PNGs are decoded in full.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

from PIL import Image

from data_prep.format import JPG, PNG
from data_prep.loading import DEFAULT_READ_TIMEOUT_S
from data_prep.pixels import GREY_MODES, PLAIN_MODES, exif_orientation, is_plain, png_bit_depth, to_8bit, upright
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
        read_timeout_s: Seconds a source read may block (a hung network file system) before the input
            is quarantined as ``read timeout``; 0 waits for ever. Not part of the shard digests.
    """

    resize: int | None = None
    quality: int = 90
    decode_check: bool = True
    max_pixels: int = DEFAULT_MAX_PIXELS
    read_timeout_s: float = DEFAULT_READ_TIMEOUT_S


def _encode_jpeg(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _resized(img: Image.Image, short: int, bits: int | None, notes: list[str]) -> Image.Image:
    w, h = img.size
    scale = short / min(w, h)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    img.draft("RGB", size)  # JPEG: let libjpeg decode at 1/2, 1/4 or 1/8 scale first (much faster)
    if img.mode not in PLAIN_MODES and img.mode != "CMYK":
        img.load()
        img, converted = to_8bit(img, bits)  # 16-bit, palette, alpha ...: scaled, never clipped by convert("RGB")
        notes.extend(converted)
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
            return _encode(img, info, data, notes, opts)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            raise Quarantine(f"truncated or corrupt image data: {exc}") from exc


def _encode(img: Image.Image, info: ImageInfo, data: bytes, notes: list[str], opts: ImageOptions) -> Encoded:
    """Store as-is, or decode, convert (:mod:`data_prep.pixels`), turn upright and re-encode."""
    mode, tiff = img.mode, img.format == "TIFF"
    jpeg = info.format == "jpeg" and not tiff
    cmyk = mode == "CMYK"  # CMYK and YCCK JPEGs both open as CMYK in PIL
    bits = png_bit_depth(data)
    # JPEG, TIFF: EXIF from the header. PNG: only an eXIf chunk before the pixels here (PIL's getexif would
    # decode a PNG to look further, and swallowing a failed decode there could let a truncated PNG pass);
    # one after the pixels is found once the image is decoded (below).
    orientation = exif_orientation(img) if tiff or "exif" in img.info else 1  # no EXIF block: nothing to parse
    if mode in GREY_MODES:
        notes.append("grayscale")
    if opts.resize is not None and min(img.size) > opts.resize:
        converted: list[str] = []
        out = _resized(img, opts.resize, bits, converted)
        notes.append(f"resized to short side {opts.resize}")
        notes.extend(converted)
        if cmyk:
            notes.append("cmyk->rgb")
        return _jpeg_payload(out, orientation, opts.quality, notes)
    if jpeg and (cmyk or orientation != 1):
        if cmyk:
            notes.append("cmyk->rgb")
        return _jpeg_payload(img.convert("RGB") if cmyk else img, orientation, max(opts.quality, 95), notes)
    if tiff or not is_plain(img, bits) or orientation != 1:
        return _png_payload(img, bits, orientation, notes, tiff)
    if opts.decode_check or opts.resize is not None:
        check_decodes(img)  # stored as-is: only whether it decodes matters
        late = exif_orientation(img) if not jpeg else 1  # a PNG's eXIf chunk may follow its pixel data
        if late != 1:
            return _png_payload(img, bits, late, notes, tiff)
    return Encoded([(info.ext, data)], info.format, info.width, info.height, note="; ".join(notes))


def _jpeg_payload(img: Image.Image, orientation: int, quality: int, notes: list[str]) -> Encoded:
    """Turn a decoded 8-bit image upright and encode it as JPEG (no EXIF is written)."""
    if orientation != 1:
        img = upright(img, orientation)
        notes.append(f"exif-rotated ({orientation})")
    return Encoded([(JPG, _encode_jpeg(img, quality))], "jpeg", img.width, img.height, note="; ".join(notes))


def _png_payload(img: Image.Image, bits: int | None, orientation: int, notes: list[str], tiff: bool) -> Encoded:
    """Decode a lossless source, convert it to 8-bit L/RGB, turn it upright and encode it as PNG."""
    img.load()
    out, converted = to_8bit(img, bits)
    notes.extend(converted)
    if tiff:
        notes.append("tiff->png")
    if orientation != 1:
        out = upright(out, orientation)
        notes.append(f"exif-rotated ({orientation})")
    buf = io.BytesIO()
    out.save(buf, format="PNG")
    return Encoded([(PNG, buf.getvalue())], "png", out.width, out.height, note="; ".join(notes))
