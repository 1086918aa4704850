"""Give memory freed at startup back to the operating system.

Loading builds the whole CLIP (random init, then the checkpoint over it) and embeds the
garment prompts with the text tower; afterwards only the image tower is kept. glibc keeps
much of what was freed in its heaps, so the resident set would stay near the startup
peak; `malloc_trim` returns it. A no-op where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc


def release_freed_memory() -> bool:
    gc.collect()
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return False
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return bool(trim(0))
