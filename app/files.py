"""Files the project writes for others to read."""

from __future__ import annotations

import os
from pathlib import Path


def as_umask_allows(path: str | Path) -> None:
    """Give `path` the permissions a plain open() would have: safetensors writes its files
    0600 whatever the umask, and model and projection files are meant to be mounted into
    the container, whose service runs as another user (uid 10001) and then cannot read
    them."""
    umask = os.umask(0)  # read it: the only portable way sets it too, so put it back
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)
