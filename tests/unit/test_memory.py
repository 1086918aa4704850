"""page_out_files gives back the resident pages of the mappings it is told of, and
only those."""

from __future__ import annotations

import mmap
import os
import threading
import time
from pathlib import Path

import pytest

from app.inference.memory import page_out_files, paging_out

MAPS = Path("/proc/self/maps")


def kernel_version() -> tuple[int, int]:
    major, minor = os.uname().release.split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


page_out_works = pytest.mark.skipif(
    not MAPS.exists() or kernel_version() < (5, 4), reason="Linux 5.4+ (MADV_PAGEOUT)"
)
pytestmark = page_out_works


def resident_kb(path: Path) -> int:
    """Resident kB of this process's mappings of `path`, from /proc/self/smaps."""
    total, current = 0, ""
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if "-" in fields[0] and len(fields) >= 5 and ":" in fields[3]:  # a mapping's header
            current = fields[5] if len(fields) > 5 else ""
        elif fields[0] == "Rss:" and current == str(path):
            total += int(fields[1])
    return total


def mapped_and_read(path: Path, size: int) -> mmap.mmap:
    path.write_bytes(bytes(range(256)) * (size // 256))
    with path.open("rb") as file:
        mapping = mmap.mmap(file.fileno(), 0, prot=mmap.PROT_READ)
    sum(mapping[offset] for offset in range(0, size, mmap.PAGESIZE))  # fault every page in
    return mapping


def test_the_named_mappings_leave_memory_and_others_stay(tmp_path: Path) -> None:
    size = 8 * 1024 * 1024
    unused = tmp_path / "libunused_cuda.so"
    kept = tmp_path / "libkept.so"
    unused_map, kept_map = mapped_and_read(unused, size), mapped_and_read(kept, size)
    try:
        assert resident_kb(unused) >= size // 1024 * 0.9
        assert page_out_files(["libunused_cuda"]) == 1
        assert resident_kb(unused) <= size // 1024 * 0.1
        assert resident_kb(kept) >= size // 1024 * 0.9
        # Paged out is not gone: the pages read back as they were.
        assert unused_map[size - 1] == (size - 1) % 256
    finally:
        unused_map.close()
        kept_map.close()


def test_a_copy_on_write_checkpoint_goes_only_when_asked_and_keeps_what_was_written(
    tmp_path: Path,
) -> None:
    size = 8 * 1024 * 1024
    checkpoint = tmp_path / "model.safetensors"
    checkpoint.write_bytes(bytes(range(256)) * (size // 256))
    with checkpoint.open("rb") as file:  # as torch maps a safetensors file: private, writable
        mapping = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_COPY)
    try:
        sum(mapping[offset] for offset in range(0, size, mmap.PAGESIZE))
        mapping[0] = 255  # one page becomes the process's own
        assert page_out_files([str(checkpoint)]) == 0  # writable: only when asked
        assert resident_kb(checkpoint) >= size // 1024 * 0.5
        assert page_out_files([str(checkpoint)], copy_on_write=True) == 1
        assert resident_kb(checkpoint) <= size // 1024 * 0.1
        assert (mapping[0], mapping[size - 1]) == (255, (size - 1) % 256)
        assert checkpoint.read_bytes()[0] == 0  # the file never saw the write
    finally:
        mapping.close()


def test_nothing_named_nothing_advised(tmp_path: Path) -> None:
    assert page_out_files(["/no/such/library/anywhere.so"]) == 0


def test_without_proc_it_is_a_no_op(tmp_path: Path) -> None:
    assert page_out_files(["nvidia"], maps=tmp_path / "absent") == 0


def test_paging_out_repeats_while_the_work_runs_and_stops_with_it() -> None:
    calls: list[str] = []
    with paging_out(lambda: calls.append(threading.current_thread().name), every_s=0.01):
        time.sleep(0.2)
    during = len(calls)
    time.sleep(0.05)
    assert during >= 3  # not once: pages read again during the work go again
    assert len(calls) == during  # and none after
    assert set(calls) == {"page-out"}  # beside the work, not in its thread


def test_paging_out_stops_when_the_work_fails() -> None:
    calls: list[int] = []

    def failing_work() -> None:
        with paging_out(lambda: calls.append(1), every_s=0.01):
            time.sleep(0.05)
            raise RuntimeError("the quantiser failed")

    with pytest.raises(RuntimeError):
        failing_work()
    stopped_at = len(calls)
    time.sleep(0.05)
    assert len(calls) == stopped_at
    assert "page-out" not in [thread.name for thread in threading.enumerate()]
