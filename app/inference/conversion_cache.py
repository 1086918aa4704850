"""The on-disk cache of converted image towers (OpenVINO IR, ONNX), and its integrity.

An entry is a folder named by the weights' hash, the runtime's version and the artefact
(runtimes._cache_key). It is written whole or not at all: converted in a staging folder
beside it and renamed into place, so a crash or a replica converting at the same time
never leaves half an entry. It carries a manifest of its files' sizes and SHA-256, and
an entry whose files do not match it (a truncated copy, a flipped bit on a shared
volume, a file deleted by hand, or no manifest) is set aside and converted again, with a
warning, rather than loaded: a damaged weights file loads and answers with wrong
embeddings (a probe measured cosine 0.5 to the model's). Hashing ViT-B-32's ~170 MB
costs ~0.15 s of a start.
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


def cached(folder: Path, filename: str, make: Callable[[Path], None]) -> Artefact:
    """folder/filename, made by `make(staging_folder)` on a miss or a damaged entry."""
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
        remove_abandoned(folder.parent)
        staging = Path(tempfile.mkdtemp(prefix=_STAGING_PREFIX, dir=folder.parent))
    except OSError as exc:
        logger.warning(
            "conversion cache %s not writable (%s); converting for this run only",
            folder.parent,
            exc,
        )
        staging = Path(tempfile.mkdtemp(prefix="clip-reid-"))
        try:
            make(staging)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return Artefact(staging / filename, temporary=True)
    try:
        make(staging)
        write_manifest(staging)
        placed = _place(staging, folder, filename)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
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


def write_manifest(entry: Path) -> None:
    files = {
        str(path.relative_to(entry)): {"bytes": path.stat().st_size, "sha256": _sha256(path)}
        for path in sorted(entry.rglob("*"))
        if path.is_file() and path.name != MANIFEST
    }
    (entry / MANIFEST).write_text(json.dumps({"files": files}, indent=1))


def damage(entry: Path, filename: str) -> str | None:
    """What is wrong with a cache entry, or None when every file matches its manifest."""
    try:
        files = json.loads((entry / MANIFEST).read_text())["files"]
    except FileNotFoundError:
        return f"no {MANIFEST}: written by an older version, or by hand"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"{MANIFEST} unreadable: {exc}"
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
    except (OSError, KeyError, TypeError) as exc:
        return f"unreadable: {exc}"
    return None


def set_aside(entry: Path) -> None:
    """Move a damaged entry out of the way (one rename, so no process loads half of
    it), then delete it."""
    aside = entry.with_name(f"{_SET_ASIDE_PREFIX}{entry.name}-{uuid.uuid4().hex[:8]}")
    entry.rename(aside)
    shutil.rmtree(aside, ignore_errors=True)


def remove_abandoned(cache: Path, older_than_s: float = ABANDONED_AFTER_S) -> None:
    """Staging and set-aside folders left by processes killed mid-conversion."""
    now = time.time()
    for path in cache.iterdir():
        if not path.name.startswith((_STAGING_PREFIX, _SET_ASIDE_PREFIX)):
            continue
        try:
            if now - path.stat().st_mtime > older_than_s:
                shutil.rmtree(path, ignore_errors=True)
        except OSError:
            continue


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
