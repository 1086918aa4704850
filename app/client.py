"""A small client for the service: images in, numpy arrays out.

    from app.client import ClipClient
    with ClipClient("http://localhost:8000", api_key="...") as client:
        vector = client.embed("crop.jpg")                 # np.ndarray, float32, norm 1
        vectors = client.embed_batch([img1, img2])        # (2, 512)
        score = client.similarity(vector, vectors[0])
        outfit = client.analyze("crop.jpg")               # dict: top, bottom, embedding

`AsyncClipClient` has the same methods as coroutines.

Images may be paths, an encoded file's bytes (bytes, bytearray, memoryview, or a file
object opened in binary mode, read from where it stands), PIL images or numpy arrays.
PIL images are sent as PNG in the modes PNG stores (1, L, LA, P, RGB, RGBA, I;16), and in
the others (CMYK, LAB, I, F, I;16B...) as deflated TIFF, which the service reads in any
mode: it sees the same pixels either way. The few modes neither format stores are converted
first: HSV and YCbCr to RGB (as the service would), La and RGBa to un-premultiplied LA and
RGBA, I;16N to I. Arrays must be (H, W) grey, (H, W, 3) RGB or (H, W, 4) RGBA, and are
sent as PNG:

- uint8: used as is;
- float (any width): NaN and inf are refused. If every value lies in [0, 1] the array is
  read as a 0..1 image and scaled by 255; otherwise values must lie in [0, 255] and are
  rounded. (So an all-dark 0..255 float image whose maximum is <= 1 reads as 0..1.)
- other integer types: values must lie in [0, 255];
- anything else (bool, complex, negative or > 255 values, other shapes) raises ValueError.

`embed_batch` takes a list (or any iterable, read once) of at least one image; one image
on its own, or none, raises ValueError before any request, and an image that cannot be
read (a missing file, None) raises naming its index: `images[3]: ...`.

Flags (`include_embedding`, `analyze`) must be bools: a string such as "false" is truthy
in Python, so it raises TypeError rather than asking for the opposite.

Errors: every error the client raises about the service is a `ClipClientError`:
`ClipServiceError` when the service answered with an error (`.status`, `.code`,
`.message`), or with a success that is not in this service's shape (code
`unexpected_answer`: another server on that port, a proxy), `ClipConnectionError` when it
could not be reached or did not answer in time (the httpx error is its `__cause__`).
429/502/503/504 answers are retried after the server's Retry-After (or a short backoff),
refused connections (a service still starting) after a short backoff, `retries` times at
most, each wait stretched by up to as much again at random so that many refused callers
do not all come back at the same instant; a connection closed without an answer is sent
again once. The error after the last try says how many were made. `timeout_s` bounds a
whole call, its retries and the waits between them included: a retry that would start
past it, or with less time left than the last attempt took, is not made (the error says
so), and each attempt's connect, send and reads together end when the time is up. An
answer still arriving then is given up (httpx times each read, so one trickled a byte at
a time would otherwise hold a call for ever). With a transport of your own, the sync
client checks between the chunks it reads, so a read already waiting may take what was
left once more.
A client used after close() raises ClipClientError; settings it cannot work with (a
timeout of 0 or below or over 1,000,000 s, retries that are not a whole number) raise
TypeError or ValueError when it is made.
"""

from __future__ import annotations

import asyncio
import io
import json
import math
import numbers
import os
import random
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Generic, TypeVar, cast

import httpx
import numpy as np
import numpy.typing as npt
from PIL import Image

from app import call_deadline
from app.codec import WIRE_DTYPES, decode_embedding, encode_embedding

ImageInput = (
    str | os.PathLike[str] | bytes | bytearray | memoryview | IO[bytes] | Image.Image
    | npt.NDArray[Any]
)  # fmt: skip
# A detector's boxes: an (n, 4) array or a list (any iterable) of [x1, y1, x2, y2].
Boxes = npt.NDArray[Any] | Iterable[Sequence[float]]
# 502 and 504 are a proxy's word for a backend that is restarting or busy. Every call is
# safe to send again: the service computes, it stores nothing.
RETRIED_STATUSES = (429, 502, 503, 504)
# httpcore's words for a connection closed before or during the answer; its other protocol
# errors (an illegal status line, a malformed header) are an answer that is not HTTP.
_NOT_COMPLETE = "the answer was not complete when the call's time ran out"
_DISCONNECTED = re.compile(r"disconnected without sending|peer closed connection", re.I)


def _dropped(exc: Exception) -> bool:
    """The connection closed without an answer (worth one resend): a keep-alive
    connection the server closed as the request went out (a graceful restart does that),
    or a proxy with no backend yet; as opposed to a reply that is not HTTP: another kind
    of server, or TLS spoken to http://."""
    if isinstance(exc, httpx.RemoteProtocolError):
        return bool(_DISCONNECTED.search(str(exc)))
    return isinstance(exc, httpx.ReadError | httpx.WriteError)


T = TypeVar("T")


class ClipClientError(Exception):
    """Base of the client's errors: catch this for "the call did not give an answer"."""


class ClipServiceError(ClipClientError):
    """An error answer from the service: HTTP status, the error code and its message."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message


class ClipConnectionError(ClipClientError):
    """The service could not be reached, or did not answer within the timeout."""

    def __init__(self, message: str, url: str) -> None:
        super().__init__(message)
        self.url = url


# --- images -------------------------------------------------------------------------


def _array_to_uint8(array: npt.NDArray[Any]) -> npt.NDArray[np.uint8]:
    """A numpy image as uint8 pixels, by the rules in the module docstring."""
    accepted = (
        "numpy images must be (H, W), (H, W, 3) or (H, W, 4) arrays of uint8, of integers "
        "in 0..255, or of finite floats in 0..1 (scaled by 255) or 0..255"
    )
    shape_ok = array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))
    if not shape_ok or array.size == 0:
        raise ValueError(f"{accepted}; got shape {array.shape}")
    if array.dtype == np.uint8:
        return array
    kind = array.dtype.kind
    if kind not in "uif":  # bool, complex, object...: no reading of them is obviously right
        raise ValueError(f"{accepted}; got dtype {array.dtype}")
    if kind == "f":
        if not np.isfinite(array).all():
            raise ValueError(f"{accepted}; got NaN or infinite values")
        # float64 so that x / 255 * 255 rounds back to x exactly for every uint8 value.
        values = array.astype(np.float64)
        low, high = float(values.min()), float(values.max())
        if low >= 0.0 and high <= 1.0:
            # The usual float convention (PIL/torchvision/skimage); a plain uint8 cast
            # would turn every pixel into 0 or 1.
            values = values * 255.0
        elif low < 0.0 or high > 255.0:
            raise ValueError(f"{accepted}; got {array.dtype} values in [{low:g}, {high:g}]")
        return np.rint(values).astype(np.uint8)
    low, high = int(array.min()), int(array.max())
    if low < 0 or high > 255:
        raise ValueError(f"{accepted}; got {array.dtype} values in [{low}, {high}]")
    return array.astype(np.uint8)


# Modes PNG stores as they are. Pillow writes every other mode as TIFF but those below,
# and the service reads TIFF in any mode (CMYK and LAB to RGB, 16-bit and float scaled),
# so nothing is lost on the way. Deflated: a 1080p CMYK frame is 8 MB uncompressed, and
# 3 Mpx was over the service's body limit.
_PNG_MODES = frozenset({"1", "L", "LA", "P", "RGB", "RGBA", "I;16"})
# Modes neither format stores, and the mode each is sent in: what the service itself would
# make of them (HSV and YCbCr to RGB, alpha un-premultiplied), or a wider mode that keeps
# every value. (libtiff reads a compressed YCbCr TIFF back as its own RGB, not as Pillow's.)
_SENT_AS = {"HSV": "RGB", "YCbCr": "RGB", "La": "LA", "RGBa": "RGBA", "I;16N": "I"}


def image_bytes(image: ImageInput) -> bytes:
    """Any accepted image form to encoded file bytes (numpy and PIL become PNG, or TIFF
    for the PIL modes PNG cannot store)."""
    if isinstance(image, bytes):
        return image
    if isinstance(image, bytearray | memoryview):
        return bytes(image)
    if isinstance(image, (str, os.PathLike)):
        return Path(image).read_bytes()
    if isinstance(image, np.ndarray):
        image = Image.fromarray(_array_to_uint8(image))
    if isinstance(image, Image.Image):
        if image.mode in _SENT_AS:
            image = image.convert(_SENT_AS[image.mode])
        buffer = io.BytesIO()
        if image.mode in _PNG_MODES:
            image.save(buffer, "PNG")
        else:
            image.save(buffer, "TIFF", compression="tiff_deflate")
        return buffer.getvalue()
    if isinstance(image, io.TextIOBase):
        raise TypeError("cannot send a file opened in text mode as an image: open it with 'rb'")
    read = getattr(image, "read", None)
    if callable(read):  # an open file, BytesIO, a socket's makefile: from where it stands
        data = read()
        if not isinstance(data, bytes | bytearray):
            kind = type(data).__name__
            raise TypeError(f"read() gave {kind}, not bytes: open the file with 'rb'")
        return bytes(data)
    raise TypeError(f"cannot send {type(image).__name__} as an image")


# --- calls: each request built, and its answer parsed, once for both clients ----------


@dataclass(frozen=True)
class _Call(Generic[T]):
    """One request to make and how to read its (successful) JSON answer.

    The clients differ only in how they send (sync or async); everything about a call
    that could drift between the two lives here.
    """

    path: str
    kwargs: dict[str, Any]  # files / data / json / params for httpx's request()
    parse: Callable[[dict[str, Any]], T]  # raises _Unexpected for an answer of another shape
    method: str = "POST"


# One image where a list of them is expected: iterated, a path is its characters, bytes
# its byte values and an array its rows, none of which says what went wrong.
_ONE_IMAGE = (str, bytes, bytearray, memoryview, os.PathLike, io.IOBase, Image.Image, np.ndarray)


def _image_list(images: Iterable[ImageInput], method: str) -> list[ImageInput]:
    """The images as a list, read once (a generator cannot be read twice)."""
    if isinstance(images, _ONE_IMAGE):
        raise ValueError(
            f"{method} takes a list of images, got one {type(images).__name__}: pass [image]"
        )
    return list(images)


# Errors reading an image that are re-raised, as the same type, with the image's place in
# front of their message; other types keep their message and get the place as a note.
_RELABELLED = (FileNotFoundError, IsADirectoryError, PermissionError, TypeError, ValueError)


def _files(
    field: str, images: Sequence[ImageInput], batch: bool = False
) -> list[tuple[str, tuple[str, bytes]]]:
    """Multipart parts of the images; in a batch an unreadable image is named by its
    index (`images[3]: ...`), as the service names the parts it refuses."""
    parts = []
    for index, image in enumerate(images):
        try:
            parts.append((field, (f"image{index}", image_bytes(image))))
        except (OSError, TypeError, ValueError) as exc:
            if not batch:
                raise
            place = f"{field}[{index}]"
            if type(exc) in _RELABELLED:
                raise type(exc)(f"{place}: {exc}") from exc
            exc.add_note(f"while reading {place}")
            raise
    return parts


def _seconds(
    value: object, name: str, *, optional: bool = False, above_zero: bool = False
) -> float | None:
    """A setting in seconds, refused at construction rather than on the first call (as
    httpx's error, every call timing out at once, or an OverflowError from the socket
    layer, which takes no timeout of about 1e10 s or more)."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        allowed = "a number of seconds" + (" or None" if optional else "")
        raise TypeError(f"{name} must be {allowed}, got {value!r}")
    seconds = float(value)
    low_ok = seconds > 0 if above_zero else seconds >= 0
    if not (low_ok and seconds <= _MOST_SECONDS):  # NaN and inf too
        least = "above 0" if above_zero else "at least 0"
        hint = " (None waits as long as it takes)" if optional else ""
        raise ValueError(
            f"{name} must be {least} and at most {_MOST_SECONDS:.0f} seconds{hint}, got {value!r}"
        )
    return seconds


def _base_url(url: object) -> str:
    """The service's address as httpx will use it; refused here, with what to write,
    rather than as an AttributeError or httpx's InvalidURL on the first call."""
    if not isinstance(url, str):
        raise TypeError(f"url must be a string such as 'http://host:8000', got {url!r}")
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise ValueError(f"url {url!r} is not a valid URL: {exc}") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ValueError(f"url must start with http:// or https:// and name a host, got {url!r}")
    return url.rstrip("/")


def _count(value: object, name: str, least: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a whole number, got {value!r}")
    if value < least:
        raise ValueError(f"{name} must be at least {least}, got {value!r}")
    return int(value)


def _flag(value: object, name: str) -> str:
    """A bool as the form field's text. Anything else is refused: `"false"` is truthy."""
    if not isinstance(value, bool | np.bool_):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return "true" if value else "false"


def _vector(embedding: npt.ArrayLike | str, dtype: str) -> str:
    """Arrays are encoded in `dtype`; strings are sent as they are and must be in it
    (the service refuses, 422, a length that is not its dimension in that dtype)."""
    if isinstance(embedding, str):
        return embedding
    return encode_embedding(np.asarray(embedding), dtype)


def _vectors(vectors: Sequence[npt.ArrayLike | str], name: str) -> Sequence[npt.ArrayLike | str]:
    """Several embeddings: a list, or the rows of a 2-D array. One vector (a 1-D array,
    or a string) would otherwise be read number by number, or character by character."""
    if isinstance(vectors, str) or (isinstance(vectors, np.ndarray) and vectors.ndim != 2):
        shape = "a string" if isinstance(vectors, str) else f"an array of shape {vectors.shape}"
        raise ValueError(
            f"{name} takes a list of embeddings or a 2-D array of them, got {shape}: pass "
            f"[vector] for one"
        )
    return vectors


def _sentence(exc: Exception) -> str:
    """An exception's text ending in one full stop, however it ends itself. The async
    transport's are vaguer than the sync one's ("All connection attempts failed", or
    nothing for a timeout): the system's own error, further down the chain, is added."""
    text = str(exc).rstrip(". ")
    if not text or text == "All connection attempts failed":
        system = _system_error(exc)
        if system is not None:
            text = f"{text}: {system}" if text else str(system)
        elif isinstance(exc, httpx.TimeoutException) and not text:
            text = "timed out"
    return (text or "no detail") + "."


def _system_error(exc: BaseException) -> OSError | None:
    """The first error with an errno in `exc`'s chain of causes, if any."""
    seen: set[int] = set()
    link: BaseException | None = exc
    while link is not None and id(link) not in seen:
        seen.add(id(link))
        if isinstance(link, OSError) and link.errno is not None:
            return link
        link = link.__cause__ or link.__context__
    return None


class _Unexpected(Exception):
    """A success answer without a field this service sends, or with it in another shape."""

    def __init__(self, problem: str) -> None:
        super().__init__(problem)
        self.problem = problem


def _field(body: dict[str, Any], name: str, read: Callable[[Any], T]) -> T:
    """`read(body[name])`, or _Unexpected naming the field: an answer of another shape
    (another server on the port) fails here, never as a KeyError in the caller's code or
    as its JSON returned as if it were this service's."""
    if name not in body:
        raise _Unexpected(f"no {name!r} field")
    try:
        return read(body[name])
    except (TypeError, ValueError, KeyError, IndexError) as exc:
        raise _Unexpected(f"a malformed {name!r} field") from exc


def _require(ok: bool) -> None:
    if not ok:
        raise ValueError("not in this service's shape")


def _known_dtype(value: Any) -> str:
    _require(value in WIRE_DTYPES)  # a list or an object: TypeError, also caught
    return str(value)


def _wire_dtype(body: dict[str, Any]) -> str:
    """The answer's embedding encoding; float32 where it does not say."""
    return _field(body, "dtype", _known_dtype) if "dtype" in body else "float32"


def _rows(texts: Any, dtype: str, count: int) -> list[npt.NDArray[np.float32]]:
    """`count` embeddings of one dimension: one per image or box sent."""
    _require(isinstance(texts, list) and len(texts) == count)
    rows = [decode_embedding(text, dtype) for text in texts]
    _require(len({row.size for row in rows}) <= 1)
    return rows


def _whole(value: Any) -> int:
    """A JSON integer >= 0 (bool is an int to Python, not to JSON)."""
    _require(isinstance(value, int) and not isinstance(value, bool) and value >= 0)
    return int(value)


def _number(value: Any) -> float:
    """A JSON number (float() would also take "0.5" and true)."""
    _require(isinstance(value, int | float) and not isinstance(value, bool))
    return float(value)


def _object(value: Any) -> dict[str, Any]:
    _require(isinstance(value, dict))
    return dict(value)


def _outfits(value: Any, count: int) -> list[dict[str, Any]]:
    """/embed/frame's descriptors: {"top": Garment, "bottom": Garment} per box sent."""
    _require(isinstance(value, list) and len(value) == count)
    outfits = [_object(outfit) for outfit in value]
    for outfit in outfits:
        _require(isinstance(outfit.get("top"), dict) and isinstance(outfit.get("bottom"), dict))
    return outfits


def _embed_call(image: ImageInput, dtype: str) -> _Call[npt.NDArray[np.float32]]:
    def parse(body: dict[str, Any]) -> npt.NDArray[np.float32]:
        wire = _wire_dtype(body)
        return _field(body, "embedding", lambda text: decode_embedding(text, wire))

    return _Call("/embed", {"files": _files("image", [image]), "params": {"dtype": dtype}}, parse)


def _embed_batch_call(images: Iterable[ImageInput], dtype: str) -> _Call[npt.NDArray[np.float32]]:
    listed = _image_list(images, "embed_batch")
    if not listed:
        # The server can only answer an empty multipart body with a puzzling 415.
        raise ValueError("embed_batch needs at least one image")

    def parse(body: dict[str, Any]) -> npt.NDArray[np.float32]:
        wire = _wire_dtype(body)
        return np.stack(_field(body, "embeddings", lambda e: _rows(e, wire, len(listed))))

    files = _files("images", listed, batch=True)
    return _Call("/embed/batch", {"files": files, "params": {"dtype": dtype}}, parse)


def _similarity_call(a: npt.ArrayLike | str, b: npt.ArrayLike | str, dtype: str) -> _Call[float]:
    def parse(body: dict[str, Any]) -> float:
        return _field(body, "similarity", _number)

    payload = {"a": _vector(a, dtype), "b": _vector(b, dtype), "dtype": dtype}
    return _Call("/similarity", {"json": payload}, parse)


def _matches(value: Any, queries: int) -> list[list[dict[str, Any]]]:
    """A list of matches per query, each match an object with an index and a similarity."""
    _require(isinstance(value, list) and len(value) == queries)
    for row in value:
        _require(isinstance(row, list))
        for match in row:
            _whole(_object(match)["index"])
            _number(match["similarity"])
    return cast("list[list[dict[str, Any]]]", value)


def _search_call(
    queries: Sequence[npt.ArrayLike | str],
    gallery: Sequence[npt.ArrayLike | str],
    top_k: int,
    dtype: str,
) -> _Call[list[list[dict[str, Any]]]]:
    encoded = [_vector(q, dtype) for q in _vectors(queries, "queries")]

    def parse(body: dict[str, Any]) -> list[list[dict[str, Any]]]:
        return _field(body, "matches", lambda matches: _matches(matches, len(encoded)))

    payload = {
        "queries": encoded,
        "gallery": [_vector(g, dtype) for g in _vectors(gallery, "gallery")],
        "top_k": top_k,
        "dtype": dtype,
    }
    return _Call("/similarity", {"json": payload}, parse)


@dataclass(frozen=True)
class FrameResult:
    """One frame's answer: a row per box, in box order."""

    embeddings: npt.NDArray[np.float32]  # (boxes, dim)
    boxes: list[list[int]]  # as the service used them: whole pixels, clipped to the frame
    descriptors: list[dict[str, Any]] | None  # {"top": ..., "bottom": ...} per box, if asked


def _box_list(boxes: Boxes) -> list[list[float]]:
    """Boxes as JSON-ready lists, checked as the service checks them: an (n, 4) array or
    a list of four-number boxes. Never reshaped: a wrong shape is the caller's bug."""
    if isinstance(boxes, np.ndarray):
        if boxes.size == 0:
            return []
        if boxes.ndim != 2 or boxes.shape[1] != 4 or not np.issubdtype(boxes.dtype, np.number):
            raise ValueError(f"boxes must be an (n, 4) array of numbers, got {boxes.shape}")
        return [[float(v) for v in row] for row in boxes]
    listed: list[list[float]] = []
    for index, box in enumerate(boxes):
        values = list(box) if isinstance(box, list | tuple | np.ndarray) else None
        if (
            values is None
            or len(values) != 4
            or not all(
                isinstance(v, int | float | np.integer | np.floating) and not isinstance(v, bool)
                for v in values
            )
        ):
            raise ValueError(f"boxes[{index}] must be four numbers [x1, y1, x2, y2], got {box!r}")
        listed.append([float(v) for v in values])
    return listed


def _int_boxes(value: Any, count: int) -> list[list[int]]:
    """The boxes the service used: one [x1, y1, x2, y2] of whole pixels per box sent."""
    _require(isinstance(value, list) and len(value) == count)
    for box in value:
        _require(isinstance(box, list) and len(box) == 4)
        for coordinate in box:
            _require(isinstance(coordinate, int) and not isinstance(coordinate, bool))
    return cast("list[list[int]]", value)


def _frame_call(frame: ImageInput, boxes: Boxes, analyze: bool, dtype: str) -> _Call[FrameResult]:
    listed = _box_list(boxes)

    def parse(body: dict[str, Any]) -> FrameResult:
        wire = _wire_dtype(body)
        rows = _field(body, "embeddings", lambda e: _rows(e, wire, len(listed)))
        if rows:
            embeddings = np.stack(rows)
        else:  # no box, no row to tell the dimension: the answer's `dim` does
            embeddings = np.zeros((0, _field(body, "dim", _whole)), np.float32)
        used = _field(body, "boxes", lambda b: _int_boxes(b, len(listed)))
        descriptors = None
        if analyze:
            descriptors = _field(body, "descriptors", lambda d: _outfits(d, len(listed)))
        return FrameResult(embeddings, used, descriptors)

    data = {"boxes": json.dumps(listed), "analyze": _flag(analyze, "analyze")}
    files = _files("image", [frame])
    return _Call("/embed/frame", {"files": files, "data": data, "params": {"dtype": dtype}}, parse)


def _analyze_call(
    image: ImageInput, include_embedding: bool, dtype: str = "float32"
) -> _Call[dict[str, Any]]:
    data = {"include_embedding": _flag(include_embedding, "include_embedding")}

    def parse(body: dict[str, Any]) -> dict[str, Any]:
        _field(body, "top", _object)
        _field(body, "bottom", _object)
        if include_embedding or body.get("embedding") is not None:
            wire = _wire_dtype(body)
            body["embedding"] = _field(body, "embedding", lambda text: decode_embedding(text, wire))
        return body

    request = {"files": _files("image", [image]), "data": data, "params": {"dtype": dtype}}
    return _Call("/analyze", request, parse)


# --- answers and retries ----------------------------------------------------------------


def _raise_for_error(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    try:
        error = response.json()["error"]
        code, message = str(error["code"]), str(error["message"])
    except (ValueError, KeyError, TypeError, RecursionError):
        code, message = "http_error", _foreign_answer(response)
    raise ClipServiceError(response.status_code, code, message)


def _parse_answer(call: _Call[T], response: httpx.Response) -> T:
    """A success answer read by `call`, or ClipServiceError `unexpected_answer` when it is
    not in this service's shape: not JSON, or a field missing or malformed."""
    try:
        body = response.json()
    except (ValueError, RecursionError) as exc:  # not JSON, not text, or nested past Python's
        raise _unexpected_answer(response, "not JSON") from exc
    if not isinstance(body, dict):
        raise _unexpected_answer(response, "not a JSON object")
    try:
        return call.parse(body)
    except _Unexpected as exc:
        raise _unexpected_answer(response, exc.problem) from exc


def _unexpected_answer(response: httpx.Response, problem: str) -> ClipServiceError:
    message = _foreign_answer(response, problem)
    return ClipServiceError(response.status_code, "unexpected_answer", message)


def _foreign_answer(response: httpx.Response, problem: str = "") -> str:
    """An answer not in the service's JSON shape (a proxy's page, another server on that
    port): what is wrong with it, what to check, and the start of its text on one line,
    not a page of HTML in the exception."""
    kind = response.headers.get("content-type", "no content type").split(";")[0]
    text = " ".join(response.text.split())
    said = f"; it begins: {text[:120]!r}" if text else ""
    url = response.request.url
    origin = f"{url.scheme}://{url.netloc.decode('ascii', 'replace')}"
    what = f"; {problem}" if problem else ""
    return (
        f"the answer is not this service's ({kind}, {len(response.content)} bytes{what}): a "
        f"proxy in between, or {origin} is another server{said}"
    )


# Longest wait between two /ready polls of wait_until_ready.
_READY_POLL_CAP_S = 2.0
# The longest wait a setting may ask for (11.6 days); None is the way to wait for ever.
_MOST_SECONDS = 1e6
# An attempt with less time left than this would only time out: not started.
_LEAST_ATTEMPT_S = 0.01
_RETRY_AFTER_SECONDS = re.compile(r"[0-9]{1,9}(?:\.[0-9]{1,6})?")


def _backoff(attempt: int, cap_s: float) -> float:
    return min(0.5 * 2.0**attempt, cap_s)


def _retry_delay(response: httpx.Response, attempt: int, cap_s: float) -> float:
    # Seconds in ASCII digits; anything else (an HTTP date, "²", which str.isdigit
    # takes and float() refuses) gets the usual backoff.
    header = response.headers.get("Retry-After", "").strip()
    seconds = _RETRY_AFTER_SECONDS.fullmatch(header)
    delay = float(seconds.group()) if seconds else _backoff(attempt, cap_s)
    return min(delay, cap_s)


class _Base:
    """Settings and the send-loop decisions shared by both clients; no I/O here."""

    def __init__(
        self,
        url: str,
        api_key: str | None,
        timeout_s: float | None,
        retries: int,
        max_retry_wait_s: float,
        max_connections: int,
    ) -> None:
        self._url = _base_url(url)
        if api_key is not None and not isinstance(api_key, str):
            raise TypeError(f"api_key must be a string or None, got {type(api_key).__name__}")
        self._headers = {"X-API-Key": api_key} if api_key else {}
        self._timeout = _seconds(timeout_s, "timeout_s", optional=True, above_zero=True)
        self._retries = _count(retries, "retries", 0)
        self._max_retry_wait_s = cast(float, _seconds(max_retry_wait_s, "max_retry_wait_s"))
        max_connections = _count(max_connections, "max_connections", 1)
        self._limits = httpx.Limits(
            max_connections=max_connections, max_keepalive_connections=min(20, max_connections)
        )

    def _spread(self, delay: float) -> float:
        """`delay` stretched by up to as much again at random, within the cap: an
        overloaded service that refused a burst gets it back spread out, not in one
        wave that it refuses again (Retry-After is a least, so only ever added to)."""
        return min(delay * (1.0 + random.random()), self._max_retry_wait_s)

    def _deadline(self) -> float | None:
        """When a call starting now must be over (monotonic): timeout_s bounds the whole
        call, retries and the waits between them included, not each attempt."""
        return None if self._timeout is None else time.monotonic() + self._timeout

    @staticmethod
    def _time_left(deadline: float | None) -> float | None:
        """An attempt's httpx timeout: what is left of the call's (None: no bound)."""
        return None if deadline is None else max(deadline - time.monotonic(), _LEAST_ATTEMPT_S)

    @staticmethod
    def _ends_past(deadline: float | None, delay: float, took: float) -> bool:
        """A retry after `delay` would start with less time left than the last attempt
        took: it would most likely time out, and report an overloaded service (the 503
        it just answered) as one that does not answer."""
        need = max(took, _LEAST_ATTEMPT_S)
        return deadline is not None and time.monotonic() + delay + need >= deadline

    def _delay_after_answer(
        self, response: httpx.Response, attempt: int, deadline: float | None, took: float
    ) -> float | None:
        """Seconds to wait before trying again, or None to stop with this answer."""
        if response.status_code not in RETRIED_STATUSES or attempt >= self._retries:
            return None
        delay = self._spread(_retry_delay(response, attempt, self._max_retry_wait_s))
        return None if self._ends_past(deadline, delay, took) else delay

    def _delay_after_failure(
        self,
        exc: httpx.RequestError,
        attempt: int,
        dropped: int,
        deadline: float | None,
        took: float,
    ) -> float:
        """Seconds to wait before trying again, or raises ClipConnectionError.

        A refused connection is retried: the request never reached the server, and a
        service that is restarting refuses connections for a few seconds. A connection
        closed without an answer is retried once (`dropped` counts those of this call):
        a graceful restart closes idle keep-alive connections, and one may close just as
        a request goes out on it; twice is a service or proxy that drops this request. A
        timeout is not: the server may still be working on it, and waiting `timeout_s`
        again would multiply the caller's wait. Nor is anything once the retry would
        start past the call's `deadline`.
        """
        if attempt < self._retries:
            delay: float | None = None
            if isinstance(exc, httpx.ConnectError):
                delay = self._spread(_backoff(attempt, self._max_retry_wait_s))
            elif _dropped(exc) and dropped == 0:
                delay = 0.0
            if delay is not None:
                if not self._ends_past(deadline, delay, took):
                    return delay
                raise self._connection_error(exc, attempt + 1, out_of_time=True) from exc
        raise self._connection_error(exc, attempt + 1) from exc

    def _poll_timeout(self, deadline: float) -> float:
        """A /ready poll's own timeout: never past wait_until_ready's deadline (a port
        that accepts and never answers would otherwise hold each poll for timeout_s)."""
        own = self._timeout if self._timeout is not None else math.inf
        return max(0.05, min(own, deadline - time.monotonic()))

    def _ready_delay(
        self,
        outcome: httpx.Response | httpx.RequestError,
        deadline: float,
        attempt: int,
        timeout_s: float,
    ) -> float | None:
        """wait_until_ready's decision: None once /ready answered 200, else seconds to
        wait before asking again; raises once `deadline` (monotonic) would pass."""
        if isinstance(outcome, httpx.Response):
            if outcome.status_code == 200:
                return None
            if outcome.status_code not in (502, 503, 504):
                _raise_for_error(outcome)  # a wrong URL (404), a wrong key (401)
            # Loading answers Retry-After 5; asked more often, readiness is seen sooner. A
            # proxy in front answers 502/504 until the service listens.
            delay = min(_retry_delay(outcome, attempt, _READY_POLL_CAP_S), _READY_POLL_CAP_S)
        elif isinstance(outcome, (httpx.ConnectError, httpx.TimeoutException)) or _dropped(outcome):
            # Not listening yet (imports), or a port forward (docker, kubectl) that
            # accepts and closes while nothing listens behind it.
            delay = _backoff(attempt, _READY_POLL_CAP_S)
        else:
            raise self._connection_error(outcome, attempt + 1) from outcome
        remaining = deadline - time.monotonic()
        if remaining > 0:
            return min(delay, remaining)
        waited = f"not ready within {timeout_s:g} s"
        if isinstance(outcome, httpx.Response):
            try:
                _raise_for_error(outcome)
            except ClipServiceError as exc:
                raise ClipServiceError(exc.status, exc.code, f"{waited}: {exc.message}") from None
            raise AssertionError("a 503 is an error answer")
        detail = str(outcome) or "no answer"
        raise ClipConnectionError(
            f"the CLIP service at {self._url} was {waited}: {type(outcome).__name__}: "
            f"{detail}. Check that it is starting (its log says what it loads) and that the "
            "URL is right, or wait longer.",
            self._url,
        ) from outcome

    def _connection_error(
        self, exc: httpx.RequestError, attempts: int, out_of_time: bool = False
    ) -> ClipConnectionError:
        tries = f" ({attempts} attempts)" if attempts > 1 else ""
        if out_of_time:
            plural = "s" if attempts > 1 else ""
            tries = (
                f" ({attempts} attempt{plural}; not tried again, as the retry would start past "
                f"timeout_s, {self._timeout:g} s, which bounds the whole call)"
            )
        if isinstance(exc, httpx.PoolTimeout):
            # Never sent: the client's own connections were all in use.
            message = (
                f"the request to the CLIP service at {self._url} was not sent: all "
                f"{self._limits.max_connections} connections of this client stayed busy for "
                f"{self._timeout:g} s. Make fewer calls at once, or raise max_connections "
                "or timeout_s."
            )
        elif isinstance(exc, httpx.TimeoutException):
            message = (
                f"no answer from the CLIP service at {self._url} within {self._timeout:g} s"
                f"{tries}: {type(exc).__name__}: {_sentence(exc)} Check that the service is "
                "not overloaded, or raise timeout_s."
            )
        elif isinstance(exc, httpx.DecodingError):
            # An answer came, in a Content-Encoding its body does not match.
            message = (
                f"the answer from the CLIP service at {self._url} could not be decoded: "
                f"{type(exc).__name__}: {_sentence(exc)} Something in between (a proxy) may "
                "have changed it, or another server answers at that address."
            )
        elif isinstance(exc, httpx.RemoteProtocolError) and not _dropped(exc):
            message = (
                f"the CLIP service at {self._url} answered with something that is not HTTP"
                f"{tries}: {type(exc).__name__}: {_sentence(exc)} Check the URL: another kind "
                "of server may listen there, or one that wants https://."
            )
        elif _dropped(exc):
            # Reached, then dropped: a restart or a crash mid-request, not a wrong URL.
            message = (
                f"the CLIP service at {self._url} closed the connection without an answer"
                f"{tries}: {type(exc).__name__}: {_sentence(exc)} Check its log: it may have "
                "restarted or stopped while the request was in flight."
            )
        else:
            message = (
                f"cannot reach the CLIP service at {self._url}{tries}: "
                f"{type(exc).__name__}: {_sentence(exc)} Check that it is running and that "
                "the URL (scheme, host, port) is right."
            )
        return ClipConnectionError(message, self._url)

    def _answer(self, call: _Call[T], response: httpx.Response, attempts: int) -> T:
        try:
            _raise_for_error(response)
        except ClipServiceError as exc:
            if exc.status in RETRIED_STATUSES and attempts <= self._retries:
                # Retries were left, but the next would have started past timeout_s.
                plural = "s" if attempts > 1 else ""
                message = (
                    f"{exc.message} (still {exc.status} after {attempts} attempt{plural}; the "
                    f"next would start past timeout_s, {self._timeout:g} s, which bounds the "
                    "whole call: raise timeout_s to wait longer)"
                )
                raise ClipServiceError(exc.status, exc.code, message) from None
            if attempts > 1 and exc.status in RETRIED_STATUSES:
                # The caller's retry budget went: say so, and how to get more.
                message = (
                    f"{exc.message} (still {exc.status} after {attempts} attempts; raise "
                    "retries or max_retry_wait_s to wait longer)"
                )
                raise ClipServiceError(exc.status, exc.code, message) from None
            raise
        return _parse_answer(call, response)

    def _refuse_if_closed(self, closed: bool) -> None:
        if closed:
            raise ClipClientError(
                f"this client of {self._url} is closed: make a new one, or make the calls "
                "inside its `with` block"
            )


class ClipClient(_Base):
    """Synchronous client; use as a context manager or call close()."""

    def __init__(
        self,
        url: str = "http://localhost:8000",
        api_key: str | None = None,
        timeout_s: float | None = 60.0,
        retries: int = 3,
        max_retry_wait_s: float = 30.0,
        transport: httpx.BaseTransport | None = None,
        max_connections: int = 100,
    ) -> None:
        super().__init__(url, api_key, timeout_s, retries, max_retry_wait_s, max_connections)
        self._http = httpx.Client(
            base_url=self._url,
            headers=self._headers,
            timeout=self._timeout,
            transport=transport,
            limits=self._limits,
        )
        call_deadline.bind(self._http)

    def __enter__(self) -> ClipClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _attempt(self, call: _Call[Any], deadline: float | None) -> httpx.Response:
        """One request, over by `deadline`: httpx times each read, so an answer trickled
        a byte at a time would otherwise hold the call for ever. On the client's own
        transports every socket operation waits at most until `deadline`
        (call_deadline); on others the answer is read in chunks, and given up between
        them once `deadline` has passed."""
        time_left = self._time_left(deadline)
        if deadline is None:
            return self._http.request(call.method, call.path, timeout=time_left, **call.kwargs)
        request = self._http.build_request(call.method, call.path, timeout=time_left, **call.kwargs)
        with call_deadline.deadline(deadline):
            streamed = self._http.send(request, stream=True)
            try:
                body = bytearray()
                for chunk in streamed.iter_bytes():  # decoded, as read() would
                    body += chunk
                    if time.monotonic() > deadline:
                        raise httpx.ReadTimeout(_NOT_COMPLETE, request=request)
            except httpx.TimeoutException as exc:
                raise httpx.ReadTimeout(_NOT_COMPLETE, request=request) from exc
            finally:
                streamed.close()
        # The decoded body, under headers that no longer describe an encoded one.
        headers = [
            (name, value)
            for name, value in streamed.headers.raw
            if name.lower() not in (b"content-encoding", b"content-length")
        ]
        return httpx.Response(
            streamed.status_code, headers=headers, content=bytes(body), request=request
        )

    def _send(self, call: _Call[T]) -> T:
        self._refuse_if_closed(self._http.is_closed)
        deadline, attempt, dropped = self._deadline(), 0, 0
        while True:
            started = time.monotonic()
            try:
                response = self._attempt(call, deadline)
            except httpx.RequestError as exc:
                took = time.monotonic() - started
                delay = self._delay_after_failure(exc, attempt, dropped, deadline, took)
                dropped += _dropped(exc)
            else:
                took = time.monotonic() - started
                retry_in = self._delay_after_answer(response, attempt, deadline, took)
                if retry_in is None:
                    return self._answer(call, response, attempt + 1)
                delay = retry_in
            time.sleep(delay)
            attempt += 1

    def wait_until_ready(self, timeout_s: float = 300.0) -> None:
        """Return once the service's /ready answers 200: for a client started beside the
        service, which refuses connections for a few seconds, then answers 503
        `not_ready` while the model loads (a minute or more for a first download or
        conversion). Raises ClipConnectionError or ClipServiceError after `timeout_s`."""
        self._refuse_if_closed(self._http.is_closed)
        deadline, attempt = time.monotonic() + timeout_s, 0
        while True:
            outcome: httpx.Response | httpx.RequestError
            try:
                outcome = self._http.get("/ready", timeout=self._poll_timeout(deadline))
            except httpx.RequestError as exc:
                outcome = exc
            delay = self._ready_delay(outcome, deadline, attempt, timeout_s)
            if delay is None:
                return
            time.sleep(delay)
            attempt += 1

    def embed(self, image: ImageInput, dtype: str = "float32") -> npt.NDArray[np.float32]:
        """`dtype="float16"` halves the bytes on the wire; the result is float32 either way."""
        return self._send(_embed_call(image, dtype))

    def embed_batch(
        self, images: Iterable[ImageInput], dtype: str = "float32"
    ) -> npt.NDArray[np.float32]:
        return self._send(_embed_batch_call(images, dtype))

    def similarity(
        self, a: npt.ArrayLike | str, b: npt.ArrayLike | str, dtype: str = "float32"
    ) -> float:
        """Cosine of two embeddings: arrays, or base64 strings in `dtype` (pass
        "float16" for strings from `embed(..., dtype="float16")`)."""
        return self._send(_similarity_call(a, b, dtype))

    def search(
        self,
        queries: Sequence[npt.ArrayLike | str],
        gallery: Sequence[npt.ArrayLike | str],
        top_k: int = 5,
        dtype: str = "float32",
    ) -> list[list[dict[str, Any]]]:
        return self._send(_search_call(queries, gallery, top_k, dtype))

    def analyze(
        self, image: ImageInput, include_embedding: bool = False, dtype: str = "float32"
    ) -> dict[str, Any]:
        """The outfit descriptor (`top`, `bottom`), and with `include_embedding` the
        embedding, sent in `dtype` and returned as float32."""
        return self._send(_analyze_call(image, include_embedding, dtype))

    def embed_frame(
        self,
        frame: ImageInput,
        boxes: Boxes,
        analyze: bool = False,
        dtype: str = "float32",
    ) -> FrameResult:
        """Embeddings of the people boxed in a whole frame: `boxes` as the detector gives
        them, `[[x1, y1, x2, y2], ...]` in the frame's pixels (a list or an (n, 4) array).
        Send the camera's JPEG bytes as they are: arrays and PIL images go as PNG
        (or TIFF)."""
        return self._send(_frame_call(frame, boxes, analyze, dtype))


class AsyncClipClient(_Base):
    """Asynchronous client; use with `async with` or await aclose()."""

    def __init__(
        self,
        url: str = "http://localhost:8000",
        api_key: str | None = None,
        timeout_s: float | None = 60.0,
        retries: int = 3,
        max_retry_wait_s: float = 30.0,
        transport: httpx.AsyncBaseTransport | None = None,
        max_connections: int = 100,
    ) -> None:
        super().__init__(url, api_key, timeout_s, retries, max_retry_wait_s, max_connections)
        self._http = httpx.AsyncClient(
            base_url=self._url,
            headers=self._headers,
            timeout=self._timeout,
            transport=transport,
            limits=self._limits,
        )
        self._loop: asyncio.AbstractEventLoop | None = None

    async def __aenter__(self) -> AsyncClipClient:
        return self

    def _check_loop(self) -> None:
        """Its connections belong to the event loop of its first call: a second
        asyncio.run would reuse them and fail with "Event loop is closed"."""
        self._refuse_if_closed(self._http.is_closed)
        running = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = running
        elif self._loop is not running:
            raise ClipClientError(
                f"this AsyncClipClient of {self._url} was first used in another event loop "
                "(an earlier asyncio.run): make one client per loop, or make every call "
                "in one loop"
            )

    async def __aexit__(self, *_: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _attempt(self, call: _Call[Any], deadline: float | None) -> httpx.Response:
        """One request, its whole answer read by `deadline`: httpx times each read, so
        an answer trickled a byte at a time would otherwise hold the call for ever."""
        time_left = self._time_left(deadline)
        try:
            async with asyncio.timeout(time_left):
                return await self._http.request(
                    call.method, call.path, timeout=time_left, **call.kwargs
                )
        except TimeoutError:
            raise httpx.ReadTimeout(_NOT_COMPLETE) from None

    async def _send(self, call: _Call[T]) -> T:
        self._check_loop()
        deadline, attempt, dropped = self._deadline(), 0, 0
        while True:
            started = time.monotonic()
            try:
                response = await self._attempt(call, deadline)
            except httpx.RequestError as exc:
                took = time.monotonic() - started
                delay = self._delay_after_failure(exc, attempt, dropped, deadline, took)
                dropped += _dropped(exc)
            else:
                took = time.monotonic() - started
                retry_in = self._delay_after_answer(response, attempt, deadline, took)
                if retry_in is None:
                    return self._answer(call, response, attempt + 1)
                delay = retry_in
            await asyncio.sleep(delay)
            attempt += 1

    async def wait_until_ready(self, timeout_s: float = 300.0) -> None:
        """ClipClient.wait_until_ready, awaited."""
        self._check_loop()
        deadline, attempt = time.monotonic() + timeout_s, 0
        while True:
            outcome: httpx.Response | httpx.RequestError
            try:
                outcome = await self._http.get("/ready", timeout=self._poll_timeout(deadline))
            except httpx.RequestError as exc:
                outcome = exc
            delay = self._ready_delay(outcome, deadline, attempt, timeout_s)
            if delay is None:
                return
            await asyncio.sleep(delay)
            attempt += 1

    async def embed(self, image: ImageInput, dtype: str = "float32") -> npt.NDArray[np.float32]:
        """`dtype="float16"` halves the bytes on the wire; the result is float32 either way."""
        return await self._send(_embed_call(image, dtype))

    async def embed_batch(
        self, images: Iterable[ImageInput], dtype: str = "float32"
    ) -> npt.NDArray[np.float32]:
        return await self._send(_embed_batch_call(images, dtype))

    async def similarity(
        self, a: npt.ArrayLike | str, b: npt.ArrayLike | str, dtype: str = "float32"
    ) -> float:
        return await self._send(_similarity_call(a, b, dtype))

    async def search(
        self,
        queries: Sequence[npt.ArrayLike | str],
        gallery: Sequence[npt.ArrayLike | str],
        top_k: int = 5,
        dtype: str = "float32",
    ) -> list[list[dict[str, Any]]]:
        return await self._send(_search_call(queries, gallery, top_k, dtype))

    async def analyze(
        self, image: ImageInput, include_embedding: bool = False, dtype: str = "float32"
    ) -> dict[str, Any]:
        """As ClipClient.analyze."""
        return await self._send(_analyze_call(image, include_embedding, dtype))

    async def embed_frame(
        self,
        frame: ImageInput,
        boxes: Boxes,
        analyze: bool = False,
        dtype: str = "float32",
    ) -> FrameResult:
        """As ClipClient.embed_frame."""
        return await self._send(_frame_call(frame, boxes, analyze, dtype))
