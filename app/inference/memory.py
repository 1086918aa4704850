"""Keep the resident set near what the service really uses (glibc only; no-ops elsewhere).

Two habits of glibc's allocator show as growth that is not a leak:
- Memory freed at startup stays in its heaps. Loading builds the whole CLIP (random init,
  then the checkpoint over it) and embeds the garment prompts with the text tower;
  afterwards only the image tower is kept. `malloc_trim` returns the rest.
- Large blocks move from mmap to the heaps. A decoded 40 Mpx image is 160 MB in 16 MB
  blocks; glibc raises its mmap threshold to the largest block freed (up to 32 MB), so
  later images land in per-thread heaps, which fragment and are rarely returned. A fixed
  threshold keeps every large block mmapped: freed means given back.

And one habit of the dynamic loader: torch's CUDA build maps its CUDA libraries (and
Triton, which torch._dynamo imports) at import, and the pages relocation touched stay
resident, ~200 MB, though a process serving from the CPU never calls them. They are
clean file pages: the kernel can drop them, and would read them back if ever touched.
The same holds for mapped weights that a quantiser reads over and over: `paging_out`
gives them back while it works, so its peak is its own copies, not the file's too.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

_M_MMAP_THRESHOLD = -3  # mallopt parameter numbers from glibc's malloc.h
_LARGE_BLOCK_BYTES = 4 * 1024 * 1024
_MADV_PAGEOUT = 21  # Linux 5.4+: reclaim these pages now
# Path fragments of the libraries a CPU-only process maps and never runs.
GPU_LIBRARIES = ("/nvidia/", "/libtorch_cuda", "/libc10_cuda", "/libcudart", "/triton/")


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


def page_out_files(
    fragments: Sequence[str], *, copy_on_write: bool = False, maps: Path = Path("/proc/self/maps")
) -> int:
    """Give back the resident pages of read-only file mappings (libraries, mapped
    weights) whose path contains one of `fragments`; the number of mappings advised (0
    where Linux or glibc is not). With `copy_on_write`, private writable mappings too
    (a checkpoint torch maps copy-on-write): the pages never written are the file's and
    go; written ones are the process's own and stay where there is no swap."""
    libc = _libc()
    if libc is None or not maps.exists():
        return 0
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    libc.madvise.restype = ctypes.c_int
    advised = 0
    for line in maps.read_text().splitlines():
        fields = line.split(maxsplit=5)
        # Writable mappings hold relocated data, which has no file to be read back from.
        if len(fields) < 6 or ("w" in fields[1] and not (copy_on_write and "p" in fields[1])):
            continue
        if not any(fragment in fields[5] for fragment in fragments):
            continue
        start, end = (int(bound, 16) for bound in fields[0].split("-"))
        advised += libc.madvise(start, end - start, _MADV_PAGEOUT) == 0
    return advised


@contextlib.contextmanager
def paging_out(release: Callable[[], object], every_s: float = 0.3) -> Iterator[None]:
    """Call `release` (page_out_files, say) every `every_s`, in a thread of its own,
    while the block runs: for work that reads a mapped file's pages again and again
    (a quantiser over mapped weights), which would otherwise keep them all resident."""
    stop = threading.Event()

    def run() -> None:
        while not stop.wait(every_s):
            release()

    thread = threading.Thread(target=run, name="page-out", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
