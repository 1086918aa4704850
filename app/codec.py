"""Embeddings on the wire: standard base64 (with padding) of little-endian float32 bytes.

The same functions serve the server, the client and the tests, so the three can never
disagree about byte order or padding.
"""

from __future__ import annotations

import base64
import binascii

import numpy as np
import numpy.typing as npt

WIRE_DTYPE = np.dtype("<f4")
WIRE_DTYPES: dict[str, np.dtype[np.floating]] = {
    "float32": np.dtype("<f4"),
    "float16": np.dtype("<f2"),
}


class EmbeddingDecodeError(ValueError):
    """A base64 embedding that cannot be turned into a finite float32 vector."""


def _wire(dtype: str) -> np.dtype[np.floating]:
    try:
        return WIRE_DTYPES[dtype]
    except KeyError:
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


def decode_embedding(text: str, dtype: str = "float32") -> npt.NDArray[np.float32]:
    """base64 to a float32 vector; the dimension is the byte length over the item size
    (4 for float32, 2 for float16 — which one the sender says, since lengths alone
    cannot tell them apart).

    Raises EmbeddingDecodeError for bad base64, empty input, a length that is not a
    multiple of the item size, or NaN/infinite values.
    """
    wire = _wire(dtype)
    if not isinstance(text, str):
        raise EmbeddingDecodeError("embedding must be a base64 string")
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise EmbeddingDecodeError(f"embedding is not valid standard base64: {exc}") from None
    if not raw:
        raise EmbeddingDecodeError("embedding is empty")
    if len(raw) % wire.itemsize:
        raise EmbeddingDecodeError(
            f"embedding has {len(raw)} bytes, not a multiple of {wire.itemsize} ({dtype}); "
            f"send base64 of little-endian {dtype} values"
        )
    vector = np.frombuffer(raw, dtype=wire).astype(np.float32)
    if not np.isfinite(vector).all():
        raise EmbeddingDecodeError("embedding contains NaN or infinite values")
    return vector


def decode_embeddings(texts: list[str], dtype: str = "float32") -> npt.NDArray[np.float32]:
    """A list of base64 embeddings to a 2-D array; all must share one dimension."""
    vectors = [decode_embedding(text, dtype) for text in texts]
    dims = {vector.shape[0] for vector in vectors}
    if len(dims) > 1:
        raise ValueError(f"embeddings have different dimensions: {sorted(dims)}")
    if not vectors:
        return np.zeros((0, 0), dtype=np.float32)
    return np.stack(vectors)
