"""The conversion cache: converted once, never half written, and never loaded damaged."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest

from app.inference import conversion_cache
from app.inference.conversion_cache import (
    MANIFEST,
    cached,
    damage,
    remove_temporary,
    set_aside,
)


class Converter:
    """A stand-in conversion: writes an IR-like pair of files and counts its calls."""

    def __init__(self, weights: bytes = b"\x01" * 4096) -> None:
        self.weights = weights
        self.calls = 0

    def __call__(self, staging: Path) -> None:
        self.calls += 1
        (staging / "tower.xml").write_text("<net/>")
        (staging / "tower.bin").write_bytes(self.weights)


def test_the_cache_converts_once_with_a_manifest(tmp_path: Path) -> None:
    convert, folder = Converter(), tmp_path / "cache" / "key"
    first = cached(folder, "tower.xml", convert)
    second = cached(folder, "tower.xml", convert)
    assert first.path == second.path == folder / "tower.xml"
    assert not first.temporary
    assert convert.calls == 1
    assert (folder / MANIFEST).is_file()
    assert damage(folder, "tower.xml") is None


def test_a_failed_conversion_leaves_nothing(tmp_path: Path) -> None:
    def broken(staging: Path) -> None:
        (staging / "tower.xml").write_text("half")
        raise RuntimeError("conversion died")

    with pytest.raises(RuntimeError):
        cached(tmp_path / "cache" / "key", "tower.xml", broken)
    assert list((tmp_path / "cache").iterdir()) == []  # no entry, no staging folder


def truncate(entry: Path) -> None:
    (entry / "tower.bin").write_bytes((entry / "tower.bin").read_bytes()[:100])


def flip_a_byte(entry: Path) -> None:
    weights = bytearray((entry / "tower.bin").read_bytes())
    weights[2000] ^= 0xFF  # same size: only the hash can tell
    (entry / "tower.bin").write_bytes(bytes(weights))


def copied_from_another_key(entry: Path) -> None:
    """Another model's whole entry (its own manifest matching its files) copied in."""
    other = entry.parent / "other-key"
    cached(other, "tower.xml", Converter(b"\x07" * 4096))
    shutil.rmtree(entry)
    shutil.copytree(other, entry)
    shutil.rmtree(other)


@pytest.mark.parametrize(
    ("harm", "said"),
    [
        (truncate, "tower.bin is 100 bytes"),
        (flip_a_byte, "tower.bin does not match its SHA-256"),
        (lambda entry: (entry / "tower.bin").unlink(), "tower.bin is missing"),
        (lambda entry: (entry / "tower.xml").unlink(), "tower.xml is missing"),
        (lambda entry: (entry / MANIFEST).unlink(), "no manifest.json"),
        (lambda entry: (entry / MANIFEST).write_text("{not json"), "manifest.json unreadable"),
        (lambda entry: (entry / MANIFEST).write_text('{"files": []}'), "is not a manifest"),
        (lambda entry: (entry / MANIFEST).write_text('"files"'), "is not a manifest"),
        (lambda entry: (entry / MANIFEST).write_text('{"files": {"tower.xml": 3}}'), "not a"),
        (copied_from_another_key, "manifest.json is other-key's, not this entry's"),
    ],
    ids=[
        "truncated", "bit flip", "weights deleted", "graph deleted", "no manifest",
        "bad manifest", "files a list", "manifest a string", "file entry a number",
        "another key's entry",
    ],
)  # fmt: skip
def test_a_damaged_entry_is_converted_again_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, harm: object, said: str
) -> None:
    convert, folder = Converter(), tmp_path / "cache" / "key"
    cached(folder, "tower.xml", convert)
    harm(folder)  # type: ignore[operator]
    with caplog.at_level(logging.WARNING, logger="app.inference.conversion_cache"):
        artefact = cached(folder, "tower.xml", convert)
    assert convert.calls == 2
    assert artefact.path == folder / "tower.xml"
    assert (folder / "tower.bin").read_bytes() == convert.weights
    assert damage(folder, "tower.xml") is None
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert str(folder) in warning
    assert said in warning
    assert [p.name for p in folder.parent.iterdir()] == ["key"]  # the damaged copy is gone


def test_another_process_whole_entry_placed_first_is_used(tmp_path: Path) -> None:
    folder = tmp_path / "cache" / "key"
    theirs = Converter(b"\x02" * 4096)

    def slow_conversion(staging: Path) -> None:
        Converter()(staging)
        cached(folder, "tower.xml", theirs)  # a replica finishes while we convert

    artefact = cached(folder, "tower.xml", slow_conversion)
    assert artefact.path == folder / "tower.xml"
    assert (folder / "tower.bin").read_bytes() == theirs.weights
    assert [p.name for p in folder.parent.iterdir()] == ["key"]


def test_a_damaged_entry_placed_while_converting_is_replaced(tmp_path: Path) -> None:
    folder = tmp_path / "cache" / "key"

    def conversion_racing_a_bad_copy(staging: Path) -> None:
        Converter()(staging)
        folder.mkdir()
        (folder / "tower.xml").write_text("<net/>")  # copied by hand, no weights, no manifest

    cached(folder, "tower.xml", conversion_racing_a_bad_copy)
    assert damage(folder, "tower.xml") is None
    assert (folder / "tower.bin").is_file()


def test_an_unwritable_cache_converts_into_a_folder_released_after_loading(
    tmp_path: Path,
) -> None:
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    artefact = cached(blocked / "key", "tower.xml", Converter())
    assert artefact.temporary
    assert artefact.path.read_text() == "<net/>"
    artefact.release()
    assert not artefact.path.parent.exists()  # not left in /tmp, start after start


def test_a_damaged_entry_that_cannot_be_moved_is_converted_for_this_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    convert, folder = Converter(), tmp_path / "cache" / "key"
    cached(folder, "tower.xml", convert)
    truncate(folder)

    def read_only(entry: Path) -> None:
        raise PermissionError(13, "Read-only file system", str(entry))

    monkeypatch.setattr(conversion_cache, "set_aside", read_only)
    artefact = cached(folder, "tower.xml", convert)
    assert artefact.temporary
    assert (artefact.path.parent / "tower.bin").read_bytes() == convert.weights
    artefact.release()


def test_what_killed_conversions_left_is_removed_once_old_on_any_start(
    tmp_path: Path,
) -> None:
    convert, cache = Converter(), tmp_path / "cache"
    cached(cache / "key", "tower.xml", convert)
    old, fresh = cache / ".staging-old", cache / ".staging-fresh"
    for folder in (old, fresh):
        folder.mkdir()
        (folder / "tower.bin").write_bytes(b"x")
    leftover = cache / ".damaged-key-1234"
    leftover.write_bytes(b"a file, not a folder")
    hours_ago = time.time() - 2 * 3600
    for path in (old, leftover, cache / "key"):
        os.utime(path, (hours_ago, hours_ago))
    cached(cache / "key", "tower.xml", convert)  # a cache hit sweeps too
    assert convert.calls == 1
    assert sorted(p.name for p in cache.iterdir()) == [".staging-fresh", "key"]


def test_two_processes_setting_aside_one_damaged_entry_both_go_on(tmp_path: Path) -> None:
    entry = tmp_path / "cache" / "key"
    cached(entry, "tower.xml", Converter())
    set_aside(entry)
    set_aside(entry)  # the other process moved it first: nothing to do, no error
    assert not entry.exists()


def test_a_fast_exit_removes_this_runs_conversion(tmp_path: Path) -> None:
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    artefact = cached(blocked / "key", "tower.xml", Converter())
    assert artefact.path.exists()
    remove_temporary()  # what SIGTERM during the load runs before exiting
    assert not artefact.path.parent.exists()


def test_a_fast_exit_mid_conversion_removes_its_staging_folder(tmp_path: Path) -> None:
    """A SIGTERM during a cold conversion left its staging folder (170 MB for ViT-B-32)
    for an hour, and a pod that kept being stopped while starting piled them up."""
    cache = tmp_path / "cache"
    left: list[bool] = []

    def exit_midway(staging: Path) -> None:
        (staging / "tower.bin").write_bytes(b"\x01" * 4096)
        remove_temporary()  # the signal handler, in the middle of the conversion...
        left.append(staging.exists())  # ...which then ends the process: no unwinding
        raise SystemExit

    with pytest.raises(SystemExit):
        cached(cache / "key", "tower.xml", exit_midway)
    assert left == [False]


def test_a_finished_conversion_is_not_this_runs_to_remove(tmp_path: Path) -> None:
    artefact = cached(tmp_path / "cache" / "key", "tower.xml", Converter())
    remove_temporary()
    assert artefact.path.exists()


def test_old_conversions_for_a_run_are_swept_from_the_temporary_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    killed = tmp_path / "clip-reid-conversion-killed"
    other = tmp_path / "clip-reid-build.log"  # not a conversion: kept
    hours_ago = time.time() - 2 * 3600
    killed.mkdir()
    other.write_text("a log")
    for path in (killed, other):
        os.utime(path, (hours_ago, hours_ago))
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    artefact = cached(blocked / "key", "tower.xml", Converter())
    artefact.release()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip-reid-build.log", "file"]


def test_an_entry_is_readable_by_the_caches_other_users(tmp_path: Path) -> None:
    """mkdtemp's 0700 made every entry private to whoever converted it: a cache warmed
    as root, or shared by two deployments, was unreadable to the other user."""
    folder = tmp_path / "cache" / "key"
    cached(folder, "tower.xml", Converter())
    assert folder.stat().st_mode & 0o777 == 0o777 & ~conversion_cache._umask()
    assert folder.stat().st_mode & 0o005 == 0o005  # others may read and enter it


def test_another_users_entry_is_left_alone_and_converted_for_this_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """It was called damaged, moved aside (where its owner's files stayed, undeletable)
    and converted again, every start, by each user in turn."""
    convert, folder = Converter(), tmp_path / "cache" / "key"
    cached(folder, "tower.xml", convert)
    read_text = Path.read_text

    def as_another_user(path: Path, *args: object, **kwargs: object) -> str:
        if path.name == MANIFEST:
            raise PermissionError(13, "Permission denied", str(path))
        return read_text(path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Path, "read_text", as_another_user)
    with caplog.at_level(logging.WARNING):
        artefact = cached(folder, "tower.xml", convert)
    assert artefact.temporary
    assert convert.calls == 2
    assert "not readable by this process" in caplog.text
    assert "damaged" not in caplog.text
    monkeypatch.undo()
    assert damage(folder, "tower.xml") is None  # the owner's entry, untouched
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["key"]
    artefact.release()


class FullVolume(Converter):
    """Fails as a full disk does the first `failures` times: OpenVINO's serialiser
    raises a C++ stream error, not an OSError."""

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures

    def __call__(self, staging: Path) -> None:
        super().__call__(staging)
        if self.calls <= self.failures:
            raise RuntimeError("Exception from src/core/src/pass/serialize.cpp: iostream error")


def test_a_full_cache_volume_converts_for_this_run_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A full disk under CLIP_CACHE_DIR made `auto` fall back to torch, saying only
    "openvino could not run this model (basic_ios::clear: iostream error)"."""
    convert, folder = FullVolume(failures=1), tmp_path / "cache" / "key"
    with caplog.at_level(logging.WARNING):
        artefact = cached(folder, "tower.xml", convert)
    assert artefact.temporary
    assert artefact.path.is_file()
    assert convert.calls == 2
    assert "writing the converted model into the conversion cache" in caplog.text
    assert "MB free there" in caplog.text
    assert list((tmp_path / "cache").iterdir()) == []  # no half entry, no staging
    artefact.release()


def test_a_full_disk_everywhere_is_named_as_such(tmp_path: Path) -> None:
    with pytest.raises(conversion_cache.CacheWriteFailed, match="is the disk full"):
        cached(tmp_path / "cache" / "key", "tower.xml", FullVolume(failures=2))
    assert list((tmp_path / "cache").iterdir()) == []


def test_a_conversion_that_fails_for_its_own_reasons_is_not_tried_twice(tmp_path: Path) -> None:
    calls = []

    def broken(staging: Path) -> None:
        calls.append(staging)
        raise ValueError("unsupported operation")

    with pytest.raises(ValueError, match="unsupported operation"):
        cached(tmp_path / "cache" / "key", "tower.xml", broken)
    assert len(calls) == 1


def test_a_cache_path_that_is_a_file_is_named_as_such(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """It read "not writable ([Errno 17] File exists)"."""
    (tmp_path / "cache").write_text("not a folder")
    with caplog.at_level(logging.WARNING):
        artefact = cached(tmp_path / "cache" / "key", "tower.xml", Converter())
    assert artefact.temporary
    assert "is a file, not a folder; converting for this run only" in caplog.text
    artefact.release()
