"""What fit_projection and eval_reid share on the command line: the model options, with
the service's defaults, and errors as one line and exit status 2."""

from __future__ import annotations

import argparse
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

from app.config import Backend, Precision, Settings
from app.inference.projection import ProjectionError
from app.inference.weights import WeightsUnavailable
from app.reid.dataset import DatasetError

# The service's settings and the options that stand for them here: errors raised by the
# loading code name the setting, which is not what a command-line user changes.
_OPTION_FOR_SETTING = {
    "CLIP_MODEL": "--model",
    "CLIP_PRETRAINED": "--pretrained",
    "CLIP_DEVICE": "--device",
    "CLIP_PRECISION": "--precision",
    "CLIP_BACKEND": "--backend",
}
# What the tools report as a mistake to fix rather than a fault: one line, exit status 2.
USER_ERRORS: tuple[type[Exception], ...] = (
    DatasetError,
    ProjectionError,
    WeightsUnavailable,
    ValueError,
)


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """--model, --pretrained, --device, --precision, --backend, defaulting to what the
    service would run here (its CLIP_* environment, else its own defaults)."""
    service = Settings()
    parser.add_argument("--model", default=service.model, help="as CLIP_MODEL")
    parser.add_argument("--pretrained", default=service.pretrained, help="as CLIP_PRETRAINED")
    parser.add_argument("--device", default=service.device, help="as CLIP_DEVICE")
    parser.add_argument(
        "--precision",
        choices=[p.value for p in Precision],
        default=service.precision.value,
        help="as CLIP_PRECISION (default %(default)s: what the service would run; auto is "
        "bf16 on CPUs with AMX or AVX512-BF16, fp16 on GPUs)",
    )
    parser.add_argument(
        "--backend",
        choices=[b.value for b in Backend],
        default=service.backend.value,
        help="as CLIP_BACKEND (default %(default)s)",
    )


def settings_from(args: argparse.Namespace) -> Settings:
    return Settings(
        model=args.model,
        pretrained=args.pretrained,
        device=args.device,
        precision=args.precision,
        backend=args.backend,
        warmup=False,
    )


def as_options(message: str) -> str:
    for setting, option in _OPTION_FOR_SETTING.items():
        message = message.replace(setting, option)
    return message


def fail(parser: argparse.ArgumentParser, message: str) -> NoReturn:
    """End the command over a mistake in its inputs: one line on stderr, status 2 (as
    argparse does for bad options, without the usage text that buries the message)."""
    parser.exit(2, f"{parser.prog}: error: {as_options(message)}\n")


@contextmanager
def one_line_errors(parser: argparse.ArgumentParser) -> Iterator[None]:
    """What USER_ERRORS raise inside ends the command by `fail`, not with a traceback; a
    service that fails a --url run, and Ctrl-C, end it with one line too."""
    from app.client import ClipClientError

    try:
        yield
    except USER_ERRORS as exc:
        fail(parser, str(exc))
    except ClipClientError as exc:  # not the user's input: a service that went away
        parser.exit(1, f"{parser.prog}: error: {exc}\n")
    except KeyboardInterrupt:
        # Outputs are written whole (eval_reid's raw results as soon as they exist).
        parser.exit(130, f"{parser.prog}: interrupted; no file was left half-written\n")


def output_file_problem(text: str) -> str | None:
    """What is wrong with `text` as the file a tool writes (replacing it whole), or None.
    Checked before any work: the write replaces whatever the name points at, and as root
    that was /dev/null itself."""
    if not text:
        return "is empty; name the file to write"
    path = Path(text)
    if text.endswith(("/", os.sep)) or path.is_dir():
        return "is a folder; name the file to write"
    if path.is_symlink():
        return "is a symbolic link, which the file would replace; name the file itself"
    if path.exists() and not path.is_file():
        return "is not a regular file (a device or a pipe); name a file to write"
    parent = path.parent
    if parent.exists() and not parent.is_dir():
        return f"lies under {parent}, which is a file, not a folder"
    if not parent.exists():
        return f"lies in {parent}/, which does not exist"
    why = writable_folder(parent)
    return f"lies in {parent}/, not a folder this user can write to ({why})" if why else None


def output_folder_problem(text: str) -> str | None:
    """What is wrong with `text` as the folder a tool writes its results in, or None."""
    if not text:
        return "is empty; name a folder for the results"
    path = Path(text)
    if path.exists() and not path.is_dir():
        return "is a file; name a folder for the results"
    return writable_folder(path)


def writable_folder(path: Path) -> str | None:
    """Why files cannot be created in `path` (or in the nearest folder above it that
    exists, where it does not yet), or None if they can: tried, as permissions alone do
    not tell (root passes os.access on /proc, which creates nothing)."""
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is not a folder"
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        return f"cannot write in {existing}/ ({exc.strerror or exc})"
    return None
