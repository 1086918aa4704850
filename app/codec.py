"""Embeddings on the wire: standard base64 of little-endian float32 (or float16) bytes.

The same functions serve the server, the client and the tests, so the three can never
disagree about byte order or padding.
"""

from __future__ import annotations

import base64
import binascii
import re

import numpy as np
import numpy.typing as npt

WIRE_DTYPE = np.dtype("<f4")
WIRE_DTYPES: dict[str, np.dtype[np.floating]] = {
    "float32": np.dtype("<f4"),
    "float16": np.dtype("<f2"),
}


class EmbeddingDecodeError(ValueError):
    """A base64 embedding that cannot be turned into a finite float32 vector."""


class Base64Error(ValueError):
    """Text that is not standard base64, even read as leniently as RFC 2045 allows."""


_NOT_BASE64 = re.compile(r"[^A-Za-z0-9+/=]")
# RFC 2397: `data:[<media type>][;<parameter>=<value>]*;base64,` (the type may be empty).
_DATA_URL_PREFIX = re.compile(r"^\s*data:[^,]*;base64,", re.IGNORECASE)


def decode_base64(text: str) -> bytes:
    """Standard base64 as MIME decoders read it: whitespace and line breaks anywhere are
    ignored (`base64` prints 76-column lines), and missing `=` padding is restored.
    What is refused, each with its own message: characters outside A-Z a-z 0-9 + /
    (URL-safe `-` and `_` included), `=` before the end, and a length no encoder makes.
    A data URL's `data:...;base64,` prefix is dropped, as browsers' FileReader write it.
    """
    if text[:32].lstrip()[:5].lower() == "data:":
        text = _DATA_URL_PREFIX.sub("", text, count=1)
    try:  # the common case, at C speed: one line, padded
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        pass
    compact = "".join(text.split())
    stray = _NOT_BASE64.search(compact)
    if stray is not None:
        character = stray.group()
        hint = " (URL-safe base64: send + and / instead of - and _)" if character in "-_" else ""
        raise Base64Error(
            f"character {character!r} at position {stray.start()} (whitespace not counted) is "
            f"not standard base64, which uses only A-Z, a-z, 0-9, +, / and = padding{hint}"
        )
    data = compact.rstrip("=")
    if "=" in data:
        raise Base64Error("'=' padding appears before the end of the base64 text")
    if len(compact) - len(data) > 2 or len(data) % 4 == 1:
        raise Base64Error(
            f"{len(data)} base64 characters cannot be whole bytes: the text is cut short "
            "or has extra characters"
        )
    try:
        return base64.b64decode(data + "=" * (-len(data) % 4), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise Base64Error(f"base64 could not be decoded: {exc}") from None


def _wire(dtype: str) -> np.dtype[np.floating]:
    try:
        return WIRE_DTYPES[dtype]
    except (KeyError, TypeError):  # TypeError: a list or a dict, which cannot be a key
        raise ValueError(f"dtype must be one of {', '.join(WIRE_DTYPES)}, not {dtype!r}") from None


def encode_embedding(vector: npt.ArrayLike, dtype: str = "float32") -> str:
    """One 1-D vector to base64 of its little-endian float32 (or float16) bytes."""
    array = np.asarray(vector)
    if array.ndim != 1:
        raise ValueError(f"expected a 1-D vector, got shape {array.shape}")
    return base64.b64encode(array.astype(_wire(dtype), copy=False).tobytes()).decode("ascii")


def encode_embeddings(matrix: npt.ArrayLike, dtype: str = "float32") -> list[str]:
    """Each row of a 2-D array to its base64 string."""
    array = np.asarray(matrix)
    if array.ndim != 2:
        raise ValueError(f"expected a 2-D array, got shape {array.shape}")
    return [encode_embedding(row, dtype) for row in array]


def decode_embedding(
    text: str, dtype: str = "float32", *, check_finite: bool = True, dim: int | None = None
) -> npt.NDArray[np.float32]:
    """base64 to a float32 vector; the dimension is the byte length over the item size
    (4 for float32, 2 for float16 — which one the sender says, since lengths alone
    cannot tell them apart; pass `dim`, the service's /info `dim`, to have a vector of
    another length refused, with a hint when it is the other dtype's length).

    Raises EmbeddingDecodeError for bad base64, empty input, a length that is not a
    multiple of the item size, or (unless `check_finite` is off, for a caller that checks
    the dimension first: float32 bytes read as float16 are often NaN) NaN/infinite values.
    """
    wire = _wire(dtype)
    if dim is not None and (not isinstance(dim, int) or isinstance(dim, bool) or dim < 1):
        raise ValueError(f"dim must be a whole number >= 1, such as /info's 512, not {dim!r}")
    if not isinstance(text, str):
        raise EmbeddingDecodeError("embedding must be a base64 string")
    try:
        raw = decode_base64(text)
    except Base64Error as exc:
        raise EmbeddingDecodeError(f"embedding is not valid base64: {exc}") from None
    if not raw:
        raise EmbeddingDecodeError("embedding is empty")
    if len(raw) % wire.itemsize:
        raise EmbeddingDecodeError(
            f"embedding has {len(raw)} bytes, not a multiple of {wire.itemsize} ({dtype}); "
            f"send base64 of little-endian {dtype} values"
        )
    vector = np.frombuffer(raw, dtype=wire).astype(np.float32)
    if dim is not None and vector.size != dim:
        other = {"float32": "float16", "float16": "float32"}[dtype]
        hint = (
            f": it is {other} text, pass dtype={other!r}"
            if len(raw) == dim * WIRE_DTYPES[other].itemsize
            else ""
        )
        raise EmbeddingDecodeError(
            f"embedding has {vector.size} {dtype} values, expected {dim}{hint}"
        )
    if check_finite:
        check_embedding_finite(vector)
    return vector


def check_embedding_finite(vector: npt.NDArray[np.float32]) -> None:
    if not np.isfinite(vector).all():
        raise EmbeddingDecodeError("embedding contains NaN or infinite values")


def decode_embeddings(texts: list[str], dtype: str = "float32") -> npt.NDArray[np.float32]:
    """A list of base64 embeddings to a 2-D array; all must share one dimension."""
    vectors = [decode_embedding(text, dtype) for text in texts]
    dims = {vector.shape[0] for vector in vectors}
    if len(dims) > 1:
        raise ValueError(f"embeddings have different dimensions: {sorted(dims)}")
    if not vectors:
        return np.zeros((0, 0), dtype=np.float32)
    return np.stack(vectors)
