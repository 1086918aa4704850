"""The on-disk cache of converted image towers (OpenVINO IR, ONNX), and its integrity.

An entry is a folder named by the weights' hash, the runtime's version and the artefact
(runtimes.build.cache_key). It is written whole or not at all: converted in a staging folder
beside it and renamed into place, so a crash or a replica converting at the same time
never leaves half an entry. It carries a manifest of its key and its files' sizes and
SHA-256, and an entry whose files do not match it (a truncated copy, a flipped bit on a
shared volume, a file deleted by hand, no manifest, or another key's entry copied in)
is set aside and converted again, with a warning, rather than loaded: a damaged weights
file loads and answers with wrong embeddings (a probe measured cosine 0.5 to the
model's). Hashing ViT-B-32's ~170 MB costs ~0.15 s of a start.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
# Staging and set-aside folders older than this belong to a process that died (a
# conversion takes a minute at most): removed when the next conversion starts.
ABANDONED_AFTER_S = 3600.0
_STAGING_PREFIX = ".staging-"
_SET_ASIDE_PREFIX = ".damaged-"
_TEMPORARY_PREFIX = "clip-reid-conversion-"  # only ours are swept from the shared /tmp
# For-this-run conversions not yet released, and conversions under way in the cache's
# staging folders: what remove_temporary deletes at an exit that skips the cleanup.
_TEMPORARY: set[Path] = set()


@dataclass(frozen=True)
class Artefact:
    """A converted tower's file; `temporary` when the cache could not take it, so it
    lives in a folder of this process's own, to be released once the runtime loaded it
    (both runtimes keep what they need: OpenVINO maps the weights, which outlives the
    file's name; ONNX Runtime reads them)."""

    path: Path
    temporary: bool = False

    def release(self) -> None:
        if self.temporary:
            shutil.rmtree(self.path.parent, ignore_errors=True)
            _TEMPORARY.discard(self.path.parent)


def cached(folder: Path, filename: str, make: Callable[[Path], None]) -> Artefact:
    """folder/filename, made by `make(staging_folder)` on a miss or a damaged entry."""
    remove_abandoned(folder.parent)  # on every start: a hit too may follow a killed one
    if folder.exists():
        try:
            problem = damage(folder, filename)
        except EntryUnreadable as exc:
            # Another user's entry (a cache warmed as root, a volume two deployments
            # share): whole, as far as anyone knows, and not ours to set aside.
            logger.warning(
                "conversion cache entry %s is not readable by this process (uid %d: %s); "
                "leaving it to its owner and converting for this run only: run the "
                "service as the user that wrote CLIP_CACHE_DIR, or make it readable",
                folder,
                os.getuid(),
                exc,
            )
            return _for_this_run(filename, make)
        if problem is None:
            logger.info("conversion cache hit: %s", folder)
            return Artefact(folder / filename)
        logger.warning(
            "conversion cache entry %s is damaged (%s); converting the model again",
            folder,
            problem,
        )
    started = time.perf_counter()
    try:
        if folder.exists():
            set_aside(folder)
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=_STAGING_PREFIX, dir=folder.parent))
    except OSError as exc:
        cache = folder.parent
        why = "is a file, not a folder" if cache.is_file() else f"not writable ({exc})"
        logger.warning("conversion cache %s %s; converting for this run only", cache, why)
        return _for_this_run(filename, make)
    _TEMPORARY.add(staging)  # a SIGTERM mid-conversion left 170 MB here until an hour passed
    try:
        try:
            make(staging)
            write_manifest(staging, folder.name)
        except Exception as exc:
            if not _write_failure(exc, folder.parent):
                raise
            # A full volume: the conversion itself is fine, and may fit elsewhere.
            logger.warning(
                "writing the converted model into the conversion cache %s failed (%s: "
                "%s; %s); converting for this run only: free space there, or point "
                "CLIP_CACHE_DIR at a volume with room",
                folder.parent,
                type(exc).__name__,
                exc,
                free_space(folder.parent),
            )
            shutil.rmtree(staging, ignore_errors=True)
            _TEMPORARY.discard(staging)
            return _for_this_run(filename, make, cache_failure=exc)
        # mkdtemp made it private (0700): an entry is for every user of the cache.
        staging.chmod(0o777 & ~_umask())
        try:
            placed = _place(staging, folder, filename)
        except EntryUnreadable:
            # Another user's entry landed first: ours serves this run.
            _TEMPORARY.add(staging)
            return Artefact(staging / filename, temporary=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        _TEMPORARY.discard(staging)
        raise
    _TEMPORARY.discard(staging)
    seconds = time.perf_counter() - started
    if placed:
        logger.info("converted the image tower in %.1fs into %s", seconds, folder)
    else:
        logger.info(
            "converted the image tower in %.1fs, but another process put its copy in "
            "place first; using %s",
            seconds,
            folder,
        )
    return Artefact(folder / filename)


class EntryUnreadable(OSError):
    """A cache entry this process may not read (another user's)."""


class CacheWriteFailed(RuntimeError):
    """The conversion could be written neither into the cache nor to a temporary folder."""


# What writing a file on a full volume, or past a quota or file-size limit, raises:
# OSError with these, or (OpenVINO's serialiser) a C++ stream error in a RuntimeError.
_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_STREAM_ERRORS = ("iostream error", "No space left", "Disk quota exceeded", "File too large")
_LOW_SPACE_BYTES = 1 << 30


def _write_failure(exc: BaseException, folder: Path) -> bool:
    """Whether `exc`, raised while converting into `folder`, is the volume refusing
    the bytes rather than the model failing to convert."""
    if isinstance(exc, OSError) and exc.errno in _FULL:
        return True
    if any(words in str(exc) for words in _STREAM_ERRORS):
        return True
    try:
        return shutil.disk_usage(folder).free < _LOW_SPACE_BYTES
    except OSError:
        return False


def free_space(folder: Path) -> str:
    try:
        return f"{shutil.disk_usage(folder).free // (1 << 20)} MB free there"
    except OSError:
        return "its free space unknown"


def _umask() -> int:
    """The process's umask, without setting it (os.umask would, for every thread)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o022


def _for_this_run(
    filename: str, make: Callable[[Path], None], cache_failure: BaseException | None = None
) -> Artefact:
    """`make` into a temporary folder of this process's own, released once loaded."""
    remove_abandoned(Path(tempfile.gettempdir()), (_TEMPORARY_PREFIX,))
    staging = Path(tempfile.mkdtemp(prefix=_TEMPORARY_PREFIX))
    _TEMPORARY.add(staging)
    try:
        make(staging)
    except BaseException as exc:
        Artefact(staging / filename, temporary=True).release()
        if (
            cache_failure is not None
            and isinstance(exc, Exception)
            and _write_failure(exc, staging)
        ):
            raise CacheWriteFailed(
                f"the converted model could be written neither into the conversion cache "
                f"({type(cache_failure).__name__}: {cache_failure}) nor into "
                f"{tempfile.gettempdir()} ({type(exc).__name__}: {exc}); is the disk "
                "full? Free space, or point CLIP_CACHE_DIR at a volume with room"
            ) from exc
        raise
    return Artefact(staging / filename, temporary=True)


def _place(staging: Path, folder: Path, filename: str) -> bool:
    """Rename the staged entry into place; False where another process's whole entry
    was there first (and is used)."""
    for _ in range(3):
        try:
            staging.rename(folder)
            return True
        except OSError:
            if damage(folder, filename) is None:
                shutil.rmtree(staging, ignore_errors=True)
                return False
            set_aside(folder)
    staging.rename(folder)  # raises: the cache keeps changing under us
    return True


def write_manifest(staging: Path, key: str) -> None:
    """The manifest of a staged entry that will be renamed to `key`."""
    files = {
        str(path.relative_to(staging)): {"bytes": path.stat().st_size, "sha256": _sha256(path)}
        for path in sorted(staging.rglob("*"))
        if path.is_file() and path.name != MANIFEST
    }
    (staging / MANIFEST).write_text(json.dumps({"key": key, "files": files}, indent=1))


def damage(entry: Path, filename: str) -> str | None:
    """What is wrong with a cache entry, or None when every file matches its manifest
    and the manifest is this entry's own (an entry copied in from another model's key,
    whole as it may be, is another model)."""
    try:
        manifest = json.loads((entry / MANIFEST).read_text())
    except FileNotFoundError:
        return f"no {MANIFEST}: written by an older version, or by hand"
    except PermissionError as exc:
        raise EntryUnreadable(exc.errno, exc.strerror, exc.filename) from exc
    except (OSError, ValueError) as exc:
        return f"{MANIFEST} unreadable: {exc}"
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not all(
        isinstance(f, dict) and isinstance(f.get("bytes"), int) and isinstance(f.get("sha256"), str)
        for f in files.values()
    ):
        return f"{MANIFEST} is not a manifest"
    if manifest.get("key") != entry.name:
        return f"{MANIFEST} is {shown_key(manifest.get('key'))}'s, not this entry's"
    if filename not in files:
        return f"{filename} is not in its {MANIFEST}"
    try:
        for name, expected in files.items():
            path = entry / name
            if not path.is_file():
                return f"{name} is missing"
            if path.stat().st_size != expected["bytes"]:
                return f"{name} is {path.stat().st_size} bytes, not {expected['bytes']}"
            if _sha256(path) != expected["sha256"]:
                return f"{name} does not match its SHA-256"
    except PermissionError as exc:
        raise EntryUnreadable(exc.errno, exc.strerror, exc.filename) from exc
    except OSError as exc:
        return f"unreadable: {exc}"
    return None


def shown_key(key: object) -> str:
    return repr(key)[:80] if not isinstance(key, str) else key[:80]


def set_aside(entry: Path) -> None:
    """Move a damaged entry out of the way (one rename, so no process loads half of
    it), then delete it."""
    aside = entry.with_name(f"{_SET_ASIDE_PREFIX}{entry.name}-{uuid.uuid4().hex[:8]}")
    try:
        entry.rename(aside)
    except FileNotFoundError:
        return  # another process found the same damage and moved it first
    _remove(aside)


def remove_abandoned(
    folder: Path,
    prefixes: tuple[str, ...] = (_STAGING_PREFIX, _SET_ASIDE_PREFIX),
    older_than_s: float = ABANDONED_AFTER_S,
) -> None:
    """What processes killed mid-conversion left in `folder` (staging and set-aside
    folders in the cache, for-this-run conversions in the temporary folder)."""
    now = time.time()
    try:
        paths = list(folder.iterdir())
    except OSError:
        return
    for path in paths:
        if not path.name.startswith(prefixes):
            continue
        try:
            if now - path.lstat().st_mtime > older_than_s:
                _remove(path)
        except OSError:
            continue


def remove_temporary() -> None:
    """Delete this process's for-this-run conversions and its unfinished staging folders
    now: for an exit that skips Python's cleanup (SIGTERM while the model loads)."""
    for folder in list(_TEMPORARY):
        shutil.rmtree(folder, ignore_errors=True)
        _TEMPORARY.discard(folder)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
