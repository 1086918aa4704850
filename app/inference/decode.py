"""Turn uploaded bytes into an RGB PIL image, or a clear client error.

This is the trust boundary: everything a client sends passes through here before any
model code sees it. Pixels are decoded in the decode threads or processes; the event
loop only reads headers (open_image), to charge pixels before any decoding.
"""

from __future__ import annotations

import base64
import io
import logging
import re
import warnings
from collections.abc import Callable
from typing import TypeVar

import numpy as np
import simplejpeg
from PIL import Image, ImageFile, UnidentifiedImageError

from app.errors import InvalidImage, PayloadTooLarge, ServiceError
from app.inference.headers import draft_size, header_size

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Formats of the contract. (Pillow's JPEG opener also takes the MPO files cameras write.)
ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")

# Register every plugin now: `Image.open(formats=...)` only knows the ones loaded.
Image.init()

# Crops background-composited onto black: the same fill open_clip pads with.
_ALPHA_BACKGROUND = (0, 0, 0)

# What each EXIF orientation takes to show the picture upright (TIFF 6.0, tag 0x0112).
_ORIENTATION_TAG = 0x0112
_UPRIGHT: dict[int, Image.Transpose] = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
# Where Pillow finds an orientation: the EXIF block, or XMP where EXIF has none.
_ORIENTATION_SOURCES = ("exif", "xmp", "XML:com.adobe.xmp")

# Refuse truncated files rather than embed half a picture.
ImageFile.LOAD_TRUNCATED_IMAGES = False

# libjpeg's warnings that mean pixels are missing or garbled (cut-off, corrupt entropy
# data), as simplejpeg words them: refused. Its other warnings leave the pixels whole.
_MISSING_OR_DAMAGED_PIXELS = (
    "premature end",  # the scan data stops early: the rest would be filled with grey
    "bad huffman code",
    "bad arithmetic code",
    "instead of rst",  # a restart marker lost: the blocks after it are misplaced
)
# "N extraneous bytes before marker 0xd9": the decoder had every block it needed and
# bytes of scan data were left before the end marker. A few are an encoder's padding, the
# picture whole; hundreds mean the scan was misread (a span of it overwritten decoded
# to garbage in every row, and Pillow said nothing).
_LEFTOVER_BEFORE_END = re.compile(r"(\d+) extraneous bytes before marker 0xd9")
_MOST_PADDING_BEFORE_END = 64


# The first bytes of each accepted format's files.
_IMAGE_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG", b"GIF8", b"RIFF", b"BM", b"II*\x00", b"MM\x00*")


def _looks_like_base64_text(data: bytes) -> bool:
    """Text where an image file's bytes were due: a client that put the base64 (or a
    data: URL) in a multipart field, or encoded a JSON image twice."""
    head = data[:4096].strip()
    if head[:5].lower() == b"data:":
        return True
    sample = re.sub(rb"\s", b"", head)[:64]
    sample = sample[: len(sample) // 4 * 4].replace(b"-", b"+").replace(b"_", b"/")
    try:
        decoded = base64.b64decode(sample, validate=True)
    except ValueError:
        return False
    return decoded.startswith(_IMAGE_SIGNATURES)


def decode_image(data: bytes, *, max_pixels: int) -> Image.Image:
    """Decode one image file into a loaded RGB image with EXIF orientation applied.

    Raises InvalidImage (400) for anything that is not a readable image in an accepted
    format and PayloadTooLarge (413) when its pixel count exceeds `max_pixels`.
    """
    return load_rgb(open_image(data, max_pixels=max_pixels))


def open_image(data: bytes, *, max_pixels: int, reduce_to: int | None = None) -> Image.Image:
    """Read the header only: format and size are known, no pixel is decoded yet.

    With `reduce_to`, a JPEG is set to decode at the smallest of 1/2, 1/4 or 1/8 scale
    that keeps both sides at least `reduce_to` pixels (libjpeg's DCT scaling, "draft"
    mode): a 24 Mpx photo then costs a fraction of its full decode. The returned image's
    `size` is what `load_rgb` will decode, so callers can charge pixels before paying.
    """
    if not data:
        raise InvalidImage("image is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            # Pillow's own bomb check warns; ours below is the one that answers.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except UnidentifiedImageError:
        if _looks_like_base64_text(data):
            raise InvalidImage(
                "file is not a decodable image: it is base64 text (or a data: URL), not "
                "the image's bytes; in a multipart form send the file itself (curl -F "
                'image=@crop.jpg), or send the base64 as JSON ({"image": "<base64>"})'
            ) from None
        raise InvalidImage(
            "file is not a decodable image; send JPEG, PNG, WebP, BMP, GIF or TIFF"
        ) from None
    except Image.DecompressionBombError:
        raise PayloadTooLarge(_too_many_pixels(None, max_pixels)) from None
    except Exception as exc:  # Pillow raises many types on hostile headers
        raise InvalidImage(f"image is truncated or corrupt: {_describe(exc)}") from None

    width, height = image.size
    if width < 1 or height < 1:
        raise InvalidImage(f"image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise PayloadTooLarge(_too_many_pixels(f"{width}x{height} = {width * height}", max_pixels))
    if reduce_to and image.format == "JPEG" and min(width, height) >= 2 * reduce_to:
        try:
            image.draft(None, (reduce_to, reduce_to))
        except Exception as exc:
            raise InvalidImage(f"image is truncated or corrupt: {_describe(exc)}") from None
    return image


def decoded_pixels(data: bytes, *, max_pixels: int, reduce_to: int | None = None) -> int:
    """The pixels open_image(data, ...) then load_rgb will decode, with open_image's
    refusals, but read from the header without Pillow where headers.py can (JPEG, PNG):
    admission charges every image on the event loop before any is decoded."""
    header = header_size(data)
    if header is None:
        width, height = open_image(data, max_pixels=max_pixels, reduce_to=reduce_to).size
        return width * height
    kind, width, height = header
    if width * height > max_pixels:
        raise PayloadTooLarge(_too_many_pixels(f"{width}x{height} = {width * height}", max_pixels))
    if reduce_to and kind == "JPEG" and min(width, height) >= 2 * reduce_to:
        width, height = draft_size((width, height), reduce_to)
    return width * height


def load_rgb(image: Image.Image) -> Image.Image:
    """Decode an opened image's first frame to upright 8-bit RGB."""
    try:
        jpeg = _decode_jpeg(image)
        if jpeg is not None:
            image = jpeg
        else:
            # Animations and multi-page files open at their first frame, which is the
            # crop; counting frames (n_frames) would walk the whole file: never asked.
            image.load()
        return to_rgb(_upright(image))
    except (InvalidImage, PayloadTooLarge):
        raise
    except Image.DecompressionBombError:
        raise PayloadTooLarge("image decodes to far more pixels than its header says") from None
    except Exception as exc:
        raise InvalidImage(f"image is truncated or corrupt: {_describe(exc)}") from None


def exif_orientation(image: Image.Image) -> int | None:
    """The EXIF orientation an image asks to be shown in; None where it has none, or an
    EXIF block Pillow cannot parse (a camera's or an editor's slip): the pixels then
    are the picture, as a viewer shows them, not a reason to refuse the file."""
    try:
        orientation = image.getexif().get(_ORIENTATION_TAG)
    except Exception:
        return None
    return orientation if isinstance(orientation, int) else None


def _upright(image: Image.Image) -> Image.Image:
    """A decoded image turned as its EXIF orientation says (the same image where it
    says nothing: no copy), with the orientation dropped from its metadata, so that
    the crops cut from a frame, which inherit it, are not turned a second time."""
    turn = _UPRIGHT.get(exif_orientation(image) or 1)
    upright = image if turn is None else image.transpose(turn)
    for source in _ORIENTATION_SOURCES:
        upright.info.pop(source, None)
    return upright


def _decode_jpeg(image: Image.Image) -> Image.Image | None:
    """An opened JPEG's pixels through simplejpeg, at the size open_image set (its DCT
    scaling included), or None where Pillow decodes instead (other formats, CMYK, a
    file not in memory, and the damage libjpeg can tolerate, such as stray bytes before
    a marker).

    Both are libjpeg-turbo with the same defaults, so the pixels are the same (tested),
    in half the time: Pillow parses and loads in Python around it. And damaged scan data
    is refused: Pillow keeps decoding past it, and a file cut short that still ends with
    an end marker came out with its lower part grey, embedded without a word.
    """
    if not isinstance(image, ImageFile.ImageFile) or image.format != "JPEG":
        return None
    if image.mode not in ("RGB", "L"):  # CMYK, YCCK
        return None
    source = getattr(image, "fp", None)
    if not isinstance(source, io.BytesIO):
        return None
    colorspace = "RGB" if image.mode == "RGB" else "GRAY"
    # After `draft`, the size is libjpeg's at Pillow's 1/2, 1/4 or 1/8 scale, and the
    # smallest of libjpeg's scales giving at least that size is that same scale.
    width, height = image.size if image.decoderconfig else (0, 0)
    try:
        pixels = simplejpeg.decode_jpeg(
            source.getvalue(),
            colorspace=colorspace,
            min_width=width,
            min_height=height,
            strict=True,
        )
    except ValueError as exc:
        if any(sign in str(exc).lower() for sign in _MISSING_OR_DAMAGED_PIXELS):
            raise InvalidImage(f"image is truncated or corrupt: {_describe(exc)}") from None
        leftover = _LEFTOVER_BEFORE_END.search(str(exc))
        if leftover and int(leftover.group(1)) > _MOST_PADDING_BEFORE_END:
            raise InvalidImage(
                f"image is corrupt: its compressed data decodes {leftover.group(1)} bytes "
                "short of its end (misread scan data); send the file as the camera wrote it"
            ) from None
        return None
    if pixels.shape[:2] != (image.height, image.width):
        return None  # never seen; Pillow's reading of the header decides
    decoded = Image.fromarray(pixels[:, :, 0] if colorspace == "GRAY" else pixels)
    decoded.info.update(image.info)  # the EXIF orientation, for _upright
    return decoded


def prepare_image(image: Image.Image, transform: Callable[[Image.Image], T]) -> T:
    """Decode an opened image and apply `transform`; a picture the transform cannot take
    is still the client's picture: InvalidImage (400), not a 500."""
    rgb = load_rgb(image)
    try:
        return transform(rgb)
    except ServiceError:
        raise
    except Exception:
        logger.exception("preprocessing failed for a %dx%d image", *rgb.size)
        raise InvalidImage(
            f"image of {rgb.size[0]}x{rgb.size[1]} pixels could not be prepared for "
            "the model; send an ordinary person crop"
        ) from None


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB, keeping what the picture shows."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        return _high_depth_to_rgb(image)
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, _ALPHA_BACKGROUND)
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    try:
        return image.convert("RGB")
    except (ValueError, OSError):
        raise InvalidImage(f"image mode {mode} cannot be converted to RGB") from None


def _high_depth_to_rgb(image: Image.Image) -> Image.Image:
    """16-bit and float greyscale: scale to 8 bits instead of clipping at 255. float32
    and in place: a 40 Mpx frame costs a few bytes a pixel, not float64 copies."""
    values = np.array(image, dtype=np.float32)
    if image.mode == "F":
        if values.size and not np.isfinite(values).any():
            raise InvalidImage(
                "image is a float image whose every pixel is NaN or infinite: there is no "
                "picture to embed; send the pixels the camera recorded"
            )
        # Some pixels without a value (a sensor's no-data): black, as transparency is.
        np.nan_to_num(values, copy=False)
        peak = float(values.max()) if values.size else 1.0
        if peak <= 1.0:
            values *= 255.0
    elif image.mode == "I" and values.size and (values.min() < 0 or values.max() > 65535):
        # 32-bit integers beyond the 16-bit range (a 32-bit TIFF): its own range to
        # 0..255, where dividing by 257 made a full-range image white.
        low, high = min(float(values.min()), 0.0), float(values.max())
        values -= low
        values *= 255.0 / (high - low)
    else:
        values /= 257.0  # 65535 -> 255 (mode I holds 16-bit PNGs in older Pillow)
    np.rint(values, out=values)
    np.clip(values, 0, 255, out=values)
    grey = values.astype(np.uint8)
    del values
    return Image.fromarray(grey).convert("RGB")  # uint8 2-D is mode L


def _too_many_pixels(amount: str | None, limit: int) -> str:
    """`amount` None: Pillow's own check refused it, far over, before the size was read."""
    over = (
        f"far more pixels than allowed, over the limit of {limit}"
        if amount is None
        else f"{amount} pixels, over the limit of {limit}"
    )
    return f"image has {over} (CLIP_MAX_IMAGE_PIXELS); downscale or crop it before sending"


def _describe(exc: Exception) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text[:200]
