"""Keep the resident set near what the service really uses (glibc only; no-ops elsewhere).

Two habits of glibc's allocator show as growth that is not a leak:
- Memory freed at startup stays in its heaps. Loading builds the whole CLIP (random init,
  then the checkpoint over it) and embeds the garment prompts with the text tower;
  afterwards only the image tower is kept. `malloc_trim` returns the rest.
- Large blocks move from mmap to the heaps. A decoded 40 Mpx image is 160 MB in 16 MB
  blocks; glibc raises its mmap threshold to the largest block freed (up to 32 MB), so
  later images land in per-thread heaps, which fragment and are rarely returned. A fixed
  threshold keeps every large block mmapped: freed means given back.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc

_M_MMAP_THRESHOLD = -3  # mallopt parameter numbers from glibc's malloc.h
_LARGE_BLOCK_BYTES = 4 * 1024 * 1024


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.malloc_trim  # noqa: B018 - glibc has it, musl and others do not
        libc.mallopt  # noqa: B018
    except (OSError, AttributeError):
        return None
    return libc


def keep_large_blocks_mmapped() -> bool:
    """Allocations of 4 MB and more always from mmap, so freeing returns them at once."""
    libc = _libc()
    if libc is None:
        return False
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, _LARGE_BLOCK_BYTES))


def release_freed_memory() -> bool:
    gc.collect()
    libc = _libc()
    if libc is None:
        return False
    libc.malloc_trim.argtypes = [ctypes.c_size_t]
    libc.malloc_trim.restype = ctypes.c_int
    return bool(libc.malloc_trim(0))
