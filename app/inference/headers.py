"""The decoded size of a JPEG or PNG from its first bytes, without Pillow.

Admission charges every image's pixels before any is decoded, on the event loop. Pillow's
JPEG opener parses every marker in Python (quantisation tables included): with decode
processes on a GPU host that was ~22 % of the main process's GIL time. This reads only
the frame header. Anything it does not recognise with certainty (another format, an MPO,
a malformed or truncated header) answers None, and the caller asks Pillow, whose errors
are the ones the client sees; the pixels themselves are always decoded by Pillow.
"""

from __future__ import annotations

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Start-of-frame markers (baseline, extended, progressive, lossless; Huffman and
# arithmetic): the ones whose segment carries the frame's height and width.
_SOF_MARKERS = frozenset(
    {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
)
_STANDALONE_MARKERS = frozenset({0x01, *range(0xD0, 0xD8)})
_START_OF_SCAN = 0xDA
_APP2 = 0xE2


def header_size(data: bytes) -> tuple[str, int, int] | None:
    """(format, width, height) from a JPEG's frame header or a PNG's IHDR, or None when
    unsure."""
    if data.startswith(_PNG_SIGNATURE):
        size = _png_size(data)
        return None if size is None else ("PNG", *size)
    if data.startswith(b"\xff\xd8"):
        size = _jpeg_size(data)
        return None if size is None else ("JPEG", *size)
    return None


def draft_size(size: tuple[int, int], reduce_to: int) -> tuple[int, int]:
    """What a JPEG of `size` decodes to in Pillow's draft mode toward `reduce_to`: the
    largest of 1/8, 1/4, 1/2 (or 1) scaling that keeps both sides >= `reduce_to`, rounded
    up (Pillow's JpegImageFile.draft; tested against it)."""
    scale = min(size[0] // reduce_to, size[1] // reduce_to)
    factor = next(f for f in (8, 4, 2, 1) if scale >= f)
    return (size[0] + factor - 1) // factor, (size[1] + factor - 1) // factor


def _png_size(data: bytes) -> tuple[int, int] | None:
    # signature, then the IHDR chunk: length (13), type, width, height
    if len(data) < 24 or data[12:16] != b"IHDR" or data[8:12] != b"\x00\x00\x00\x0d":
        return None
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    return (width, height) if width > 0 and height > 0 else None


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    """The last frame header's size, read up to the first scan as Pillow does; None for
    a multi-picture file (Pillow's MPO), a malformed segment or no frame before the scan."""
    position, end = 2, len(data)
    size: tuple[int, int] | None = None
    while position + 4 <= end:
        if data[position] != 0xFF:
            return None
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        if marker in _STANDALONE_MARKERS:
            position += 2
            continue
        if marker == _START_OF_SCAN:
            return size
        length = int.from_bytes(data[position + 2 : position + 4], "big")
        if length < 2 or position + 2 + length > end:
            return None
        if marker == _APP2 and data[position + 4 : position + 8] == b"MPF\x00":
            return None
        if marker in _SOF_MARKERS:
            if length < 7:
                return None
            height = int.from_bytes(data[position + 5 : position + 7], "big")
            width = int.from_bytes(data[position + 7 : position + 9], "big")
            if width < 1 or height < 1:
                return None
            size = (width, height)
        position += 2 + length
    return None
