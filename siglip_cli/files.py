"""Finding the images to embed: files, folders walked recursively, and path lists."""

from __future__ import annotations

import base64
import os
import stat
import sys
from pathlib import Path
from typing import Iterable

from .errors import UserError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})


def discover(inputs: Iterable[str], *, files_from: str | None = None) -> list[str]:
    """Every image path under `inputs`, each once, in sorted order (by the path's bytes).

    Named files are taken whatever their extension (the user asked for them); folders are walked recursively
    for regular files with an image extension (case-insensitive), skipping hidden files and folders. Symlinks
    are followed, but each folder is entered once, so a symlink loop neither hangs nor repeats images.
    A missing argument is an error; a missing line of `files_from` is kept and fails as a bad file instead,
    since long lists are often a little stale.
    """
    found: dict[str, None] = {}
    seen_dirs: set[tuple[int, int]] = set()
    for name in inputs:
        if not os.path.lexists(name):
            raise UserError(f"input {display_path(name)} does not exist.")
        _add(name, found, seen_dirs)
    if files_from is not None:
        for name in read_path_list(files_from):
            if os.path.isdir(name):
                _add(name, found, seen_dirs)
            else:
                found.setdefault(os.path.normpath(name))
    return sorted(found, key=os.fsencode)


def _add(name: str, found: dict[str, None], seen_dirs: set[tuple[int, int]]) -> None:
    if os.path.isdir(name):
        for path in _walk(name, seen_dirs):
            found.setdefault(path)
    else:
        found.setdefault(os.path.normpath(name))


def _walk(top: str, seen_dirs: set[tuple[int, int]]) -> Iterable[str]:
    stack = [top]
    while stack:
        directory = stack.pop()
        try:
            info = os.stat(directory)
            if (info.st_dev, info.st_ino) in seen_dirs:
                continue
            seen_dirs.add((info.st_dev, info.st_ino))
            entries = list(os.scandir(directory))
        except OSError:
            continue  # unreadable or vanished folder: nothing to embed there
        for entry in entries:
            if entry.name.startswith("."):
                continue
            try:
                if entry.is_dir():
                    stack.append(entry.path)
                elif entry.is_file() and os.path.splitext(entry.name)[1].lower() in IMAGE_SUFFIXES:
                    yield os.path.normpath(entry.path)
            except OSError:
                continue  # a broken symlink, or one that loops onto itself


def read_path_list(source: str) -> list[str]:
    """Paths from a file (or `-` for stdin), one per line, or NUL-separated as `find -print0` writes them."""
    try:
        data = sys.stdin.buffer.read() if source == "-" else Path(source).read_bytes()
    except OSError as e:
        raise UserError(f"cannot read the path list {source}: {e.strerror}.") from None
    parts = data.split(b"\0") if b"\0" in data else data.splitlines()
    return [os.fsdecode(part) for part in parts if part.strip()]


def is_regular_file(path: str) -> bool:
    """True for a regular file (after symlinks); a FIFO or device named like an image is never opened."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def display_path(path: str) -> str:
    """The path as readable text: bytes that are not UTF-8 shown as U+FFFD."""
    return os.fsencode(path).decode("utf-8", errors="replace")


def path_fields(path: str) -> dict[str, str]:
    """Manifest fields naming a file: `path`, plus its exact bytes in base64 when the name is not valid UTF-8."""
    raw = os.fsencode(path)
    try:
        return {"path": raw.decode("utf-8")}
    except UnicodeDecodeError:
        return {"path": raw.decode("utf-8", errors="replace"), "path_bytes_b64": base64.b64encode(raw).decode()}


def path_from_fields(row: dict) -> str:
    """Inverse of `path_fields`."""
    if "path_bytes_b64" in row:
        return os.fsdecode(base64.b64decode(row["path_bytes_b64"]))
    return row["path"]
