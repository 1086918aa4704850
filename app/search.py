"""Cosine similarity of embeddings: a pair, or each query's top-k gallery matches.

Pure numpy, no HTTP: the /similarity route checks sizes with `check_search_size`, then
runs `pair_similarity` or `search_json` on a worker thread. Failures are the domain
errors of app.errors (InvalidEmbedding, ValidationFailed, PayloadTooLarge).

Memory and time are bounded by the caller's limits (queries x gallery scores, queries x k
matches) and by working in chunks of queries: a chunk's score block holds about
`CHUNK_SCORES` floats, so a search never materialises its whole score matrix, and no
single numpy call runs long. The response text is written straight from the arrays, not
through one pydantic object per match.
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import numpy.typing as npt

from app.codec import EmbeddingDecodeError, check_embedding_finite, decode_embedding
from app.config import Settings
from app.errors import (
    InvalidEmbedding,
    Overloaded,
    PayloadTooLarge,
    RequestTimedOut,
    ValidationFailed,
)

T = TypeVar("T")

FloatRows = npt.NDArray[np.float32]
IndexRows = npt.NDArray[np.intp]

# Scores per chunk: 2**20 float32 are 4 MiB (plus the int64 partition indices, 8 MiB).
CHUNK_SCORES = 1 << 20
# At most this many queries per chunk, however small the gallery.
MAX_CHUNK_QUERIES = 64
# Rows normalised at a time (float64 copies of a block, not of the whole list).
_NORM_BLOCK_ROWS = 4096


@dataclass(frozen=True)
class SearchLimits:
    """The bounds of one search; each names the variable that sets it."""

    max_queries: int
    max_gallery: int
    max_top_k: int
    max_scores: int
    max_matches: int

    @classmethod
    def from_settings(cls, settings: Settings) -> SearchLimits:
        return cls(
            max_queries=settings.max_queries,
            max_gallery=settings.max_gallery,
            max_top_k=settings.max_top_k,
            max_scores=settings.max_search_scores,
            max_matches=settings.max_search_matches,
        )


def check_search_size(queries: int, gallery: int, top_k: int, limits: SearchLimits) -> None:
    """PayloadTooLarge when a count, or the work it implies, is over its limit.

    Needs only the counts, so it runs before any embedding is decoded.
    """
    for name, count, limit, variable in (
        ("queries", queries, limits.max_queries, "CLIP_MAX_QUERIES"),
        ("gallery", gallery, limits.max_gallery, "CLIP_MAX_GALLERY"),
        ("top_k", top_k, limits.max_top_k, "CLIP_MAX_TOP_K"),
    ):
        if count > limit:
            raise PayloadTooLarge(f"{name} is {count}, over the limit of {limit} ({variable})")
    scores = queries * gallery
    if scores > limits.max_scores:
        raise PayloadTooLarge(
            f"queries x gallery is {queries} x {gallery} = {scores} scores, over the limit of "
            f"{limits.max_scores} (CLIP_MAX_SEARCH_SCORES); send fewer queries per request "
            "or a smaller gallery"
        )
    k = min(top_k, gallery)
    matches = queries * k
    if matches > limits.max_matches:
        raise PayloadTooLarge(
            f"queries x min(top_k, gallery) is {queries} x {k} = {matches} matches, over the "
            f"limit of {limits.max_matches} (CLIP_MAX_SEARCH_MATCHES); lower top_k or send "
            "fewer queries per request"
        )


def unit_rows(
    texts: Sequence[str],
    name: str,
    dtype: str = "float32",
    *,
    indexed: bool = True,
    dim: int | None = None,
    others: Sequence[tuple[str, str]] = (),
) -> FloatRows:
    """Base64 embeddings to a 2-D float32 array of unit rows, each `dim` long if given.

    Errors name the item (`gallery[3]: ...`, or just `name` when not `indexed`) and come
    in item order: the first bad item is the one reported, whatever is wrong with it.
    `others` are (name, base64) of other embeddings in the same request: where one of
    them reads at `dtype` to `dim` values, a length that looks like the other dtype
    means the request mixes the two, and "send the other dtype" would be wrong advice.
    """
    if not texts:
        raise ValidationFailed(f"`{name}` is empty")
    matrix: FloatRows | None = None
    for i, text in enumerate(texts):
        where = f"{name}[{i}]" if indexed else name
        try:
            # The length first: float32 bytes read as float16 are often NaN, and "it looks
            # like float32" is the error that tells the sender what to fix.
            vector = decode_embedding(text, dtype, check_finite=False)
        except EmbeddingDecodeError as exc:
            _normalise(matrix, i, name, indexed)  # an earlier item's fault comes first
            raise InvalidEmbedding(f"{where}: {exc}") from None
        if matrix is None:
            if dim is not None and vector.shape[0] != dim:
                neighbours = [(f"{name}[{j}]", texts[j]) for j in range(1, min(3, len(texts)))]
                fitting = next(
                    (n for n, t in [*neighbours, *others] if _reads_to(t, dtype, dim)), ""
                )
                raise ValidationFailed(
                    wrong_dim_message(where, vector.shape[0], dim, dtype, fitting)
                )
            matrix = np.empty((len(texts), vector.shape[0]), dtype=np.float32)
        elif vector.shape[0] != matrix.shape[1]:
            _normalise(matrix, i, name, indexed)
            got, first = vector.shape[0], matrix.shape[1]
            cause = "all embeddings must come from the same model"
            if _read_as_the_other(dtype, got, first):
                cause = _MIXED.format(other=_OTHER_DTYPE[dtype])
            raise ValidationFailed(f"{where} has {got} dims but {name}[0] has {first}; {cause}")
        try:
            check_embedding_finite(vector)
        except EmbeddingDecodeError as exc:
            _normalise(matrix, i, name, indexed)
            raise InvalidEmbedding(f"{where}: {exc}") from None
        matrix[i] = vector
    assert matrix is not None
    _normalise(matrix, len(texts), name, indexed)
    return matrix


_OTHER_DTYPE = {"float32": "float16", "float16": "float32"}
_MIXED = (
    "it looks like {other} beside the others: one request takes one encoding, so send "
    "every embedding in it as the same dtype"
)


def _reads_to(text: str, dtype: str, dim: int) -> bool:
    try:
        return int(decode_embedding(text, dtype, check_finite=False).shape[0]) == dim
    except EmbeddingDecodeError:
        return False


def _read_as_the_other(dtype: str, got: int, expected: int) -> bool:
    """Whether `got` values where `expected` were due is what the other dtype's bytes
    give when read as `dtype`: half as many (float16 read as float32), or twice."""
    return got * 2 == expected if dtype == "float32" else got == expected * 2


def wrong_dim_message(where: str, got: int, dim: int, dtype: str, fitting: str = "") -> str:
    """Why an embedding of the wrong length was refused, and the likely fix: the same
    bytes read as float32 give half as many values as float16 would. Where another
    embedding of the request (`fitting`) reads fine, the request mixes the two."""
    values = "value" if got == 1 else "values"
    message = (
        f"{where} has {got} {values} read as {dtype}, but this service's embeddings have {dim}"
    )
    if fitting and _read_as_the_other(dtype, got, dim):
        return f"{message}, while {fitting} read as {dtype} fit; " + _MIXED.format(
            other=_OTHER_DTYPE[dtype]
        )
    if dtype == "float32" and got * 2 == dim:
        return message + '; it looks like float16: send "dtype": "float16" with it'
    if dtype == "float16" and got == dim * 2:
        return message + '; it looks like float32: send "dtype": "float32" (the default)'
    return message + "; compare embeddings from this service's model (and projection) only"


def _normalise(matrix: FloatRows | None, count: int, name: str, indexed: bool) -> None:
    """Scale the first `count` rows to unit length in place; InvalidEmbedding for the
    first one without a direction."""
    if matrix is None:
        return
    for start in range(0, count, _NORM_BLOCK_ROWS):
        block = matrix[start : min(count, start + _NORM_BLOCK_ROWS)].astype(np.float64)
        norms = np.sqrt(np.einsum("ij,ij->i", block, block))
        bad = np.flatnonzero((norms == 0.0) | ~np.isfinite(norms))
        if bad.size:
            where = f"{name}[{start + int(bad[0])}]" if indexed else name
            raise InvalidEmbedding(f"{where} has no direction (zero or overflowing norm)")
        # Divided in float64: a float32 norm of large values could overflow to inf.
        matrix[start : start + block.shape[0]] = block / norms[:, None]


def same_dim(left: FloatRows, right: FloatRows, a: str, b: str) -> None:
    if left.shape[1] != right.shape[1]:
        raise ValidationFailed(
            f"{a} has {left.shape[1]} dims but {b} has {right.shape[1]}; both must come from "
            "the same model"
        )


def pair_similarity(a: str, b: str, dtype: str = "float32", dim: int | None = None) -> float:
    """Cosine similarity of two base64 embeddings, clipped to [-1, 1]."""
    left = unit_rows([a], "a", dtype, indexed=False, dim=dim, others=[("b", b)])
    right = unit_rows([b], "b", dtype, indexed=False, dim=dim, others=[("a", a)])
    same_dim(left, right, "a", "b")
    # In float64 over the rows' own norms, then to float32, the precision the embeddings
    # carry: a float32 unit row is unit only to ~1e-7, so its product with itself in
    # float32 came out 0.99999994 where a client rightly expects 1.
    l64, r64 = left[0].astype(np.float64), right[0].astype(np.float64)
    cosine = float(l64 @ r64) / float(np.linalg.norm(l64) * np.linalg.norm(r64))
    return max(-1.0, min(1.0, float(np.float32(cosine))))


def queries_per_chunk(gallery: int, chunk_scores: int = CHUNK_SCORES) -> int:
    """Queries scored at once: a block of about `chunk_scores`, 1 to MAX_CHUNK_QUERIES."""
    return max(1, min(MAX_CHUNK_QUERIES, chunk_scores // max(1, gallery)))


def top_k(
    queries: FloatRows, gallery: FloatRows, k: int, *, chunk_scores: int = CHUNK_SCORES
) -> tuple[IndexRows, FloatRows]:
    """Each query's `min(k, len(gallery))` best gallery rows by dot product.

    Returns (indices, similarities), one row per query, best first; equal scores keep
    gallery order (lower index first), at the cut-off too. Similarities are clipped to
    [-1, 1]. Rows should be unit length, so the dot product is the cosine.
    """
    if k < 1:
        raise ValidationFailed(f"top_k must be at least 1, not {k}")
    n = gallery.shape[0]
    k = min(k, n)
    count = queries.shape[0]
    step = queries_per_chunk(n, chunk_scores)
    indices: IndexRows = np.empty((count, k), dtype=np.intp)
    similarities: FloatRows = np.empty((count, k), dtype=np.float32)
    gallery_t = gallery.T
    for start in range(0, count, step):
        stop = min(count, start + step)
        block = queries[start:stop] @ gallery_t
        best = _best_first(block, k)
        indices[start:stop] = best
        similarities[start:stop] = np.take_along_axis(block, best, axis=1)
    np.clip(similarities, -1.0, 1.0, out=similarities)
    return indices, similarities


def _best_first(block: FloatRows, k: int) -> IndexRows:
    """Per row, the column indices of the k largest values, largest first, ties by index."""
    rows, n = block.shape
    if k < n:
        # O(n) selection of the k largest per row, then a sort of only those k.
        chosen = np.argpartition(block, n - k, axis=1)[:, n - k :]
        cutoff = np.take_along_axis(block, chosen[:, :1], axis=1)  # the k-th largest
        # Where values equal to the cut-off outnumber the places left, argpartition
        # picks among them arbitrarily; take the lowest indices instead.
        crowded = np.count_nonzero(block >= cutoff, axis=1) > k
        for row in np.flatnonzero(crowded):
            values, value = block[row], cutoff[row, 0]
            above = np.flatnonzero(values > value)
            level = np.flatnonzero(values == value)[: k - above.size]
            chosen[row] = np.concatenate((above, level))
        chosen.sort(axis=1)
    else:
        chosen = np.broadcast_to(np.arange(n, dtype=np.intp), (rows, n)).copy()
    scores = np.take_along_axis(block, chosen, axis=1)
    # Stable sort of the negated scores: best first, equal scores in index order.
    order = np.argsort(-scores, axis=1, kind="stable")
    best: IndexRows = np.take_along_axis(chosen, order, axis=1)
    return best


def matches_json(indices: IndexRows, similarities: FloatRows) -> bytes:
    """`{"matches": [[{"index": i, "similarity": s}, ...], ...]}` as compact JSON (ASCII).

    Similarities are written with `repr`: the shortest text that parses back to the same
    (float64) value, as a JSON encoder would write it. Written a query at a time, so no
    single step holds the interpreter long (a whole-array `tolist()` of a million
    matches would, for tens of milliseconds).
    """
    pieces = [b'{"matches":[']
    for row in range(indices.shape[0]):
        if row:
            pieces.append(b",")
        entries = [
            f'{{"index":{i},"similarity":{s!r}}}'
            for i, s in zip(indices[row].tolist(), similarities[row].tolist(), strict=True)
        ]
        pieces.append(("[" + ",".join(entries) + "]").encode("ascii"))
    pieces.append(b"]}")
    return b"".join(pieces)


def search_json(
    queries: Sequence[str],
    gallery: Sequence[str],
    k: int,
    dtype: str = "float32",
    dim: int | None = None,
) -> bytes:
    """Decode, rank and render a whole search: the JSON text of its response.

    The caller checks the sizes first (`check_search_size`).
    """
    query_rows = unit_rows(queries, "queries", dtype, dim=dim, others=[("the gallery", gallery[0])])
    gallery_rows = unit_rows(
        gallery, "gallery", dtype, dim=dim, others=[("the queries", queries[0])]
    )
    same_dim(query_rows, gallery_rows, "queries", "gallery")
    indices, similarities = top_k(query_rows, gallery_rows, k)
    return matches_json(indices, similarities)


# Searches admitted to the executor (queued or running). The largest allowed search takes
# about a second on one core, so a full queue means a few seconds of work waiting.
MAX_PENDING_SEARCHES = 4


class SearchExecutor:
    """One worker thread for /similarity's numpy work, with a bound on what waits for it.

    Not the image decode pool: a long search must not hold up /embed's decoding.
    """

    def __init__(self, max_pending: int = MAX_PENDING_SEARCHES) -> None:
        self.max_pending = max_pending
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="search")
        self._lock = threading.Lock()
        self._pending = 0

    @property
    def pending(self) -> int:
        return self._pending

    async def run(self, work: Callable[[], T], timeout_s: float) -> T:
        """work()'s result, computed on the worker thread.

        Overloaded when `max_pending` calls are already queued or running;
        RequestTimedOut past `timeout_s` (a queued call is then dropped; a running one
        finishes, and holds its place until it does).
        """
        with self._lock:
            if self._pending >= self.max_pending:
                raise Overloaded(
                    f"{self._pending} similarity searches are already queued or running; "
                    "retry shortly"
                )
            self._pending += 1
        try:
            # With the caller's context: log lines from the search carry its request id.
            future = self._pool.submit(contextvars.copy_context().run, work)
        except BaseException:
            self._release(None)
            raise
        future.add_done_callback(self._release)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), timeout_s)
        except TimeoutError:
            raise RequestTimedOut(
                f"the similarity search waited over {timeout_s:g}s; the service is busy "
                "with other searches or the timeout is too short"
            ) from None

    def _release(self, _: Future[T] | None) -> None:
        with self._lock:
            self._pending -= 1

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
