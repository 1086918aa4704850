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

import hashlib
import json
import logging
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
        problem = damage(folder, filename)
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
        logger.warning(
            "conversion cache %s not writable (%s); converting for this run only",
            folder.parent,
            exc,
        )
        remove_abandoned(Path(tempfile.gettempdir()), (_TEMPORARY_PREFIX,))
        staging = Path(tempfile.mkdtemp(prefix=_TEMPORARY_PREFIX))
        _TEMPORARY.add(staging)
        try:
            make(staging)
        except BaseException:
            Artefact(staging / filename, temporary=True).release()
            raise
        return Artefact(staging / filename, temporary=True)
    _TEMPORARY.add(staging)  # a SIGTERM mid-conversion left 170 MB here until an hour passed
    try:
        make(staging)
        write_manifest(staging, folder.name)
        placed = _place(staging, folder, filename)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
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
