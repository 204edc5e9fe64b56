"""Finding the images to embed: files, folders walked recursively, and path lists."""

from __future__ import annotations

import base64
import os
import stat
import sys
from collections import Counter
from pathlib import Path
from typing import Iterable

from .errors import UserError

# What cameras, phones and the web save photos as. HEIC/HEIF (iPhones since 2017) decode through pillow-heif,
# AVIF through Pillow itself (11.2+); .mpo is the multi-picture JPEG some cameras write, .jfif/.jpe browser
# downloads. Anything else in a folder (videos, RAW files, sidecars) is counted, not opened.
IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".apng", ".webp", ".avif", ".heic", ".heif", ".bmp", ".gif",
     ".tif", ".tiff", ".mpo"}
)
# Folders of derived files that would embed every photo a second time: Synology's thumbnails (@eaDir).
SKIPPED_FOLDERS = frozenset({"@eaDir"})


def discover(
    inputs: Iterable[str], *, files_from: str | None = None, passed_over: Counter[str] | None = None
) -> list[str]:
    """Every image path under `inputs`, each once, in sorted order (by the path's bytes).

    Named files are taken whatever their extension (the user asked for them); folders are walked recursively
    for regular files with an image extension (case-insensitive), skipping hidden files and folders and
    `SKIPPED_FOLDERS`. Symlinks are followed, but each folder is entered once, so a symlink loop neither hangs
    nor repeats images. A missing argument is an error; a missing line of `files_from` is kept and fails as a
    bad file instead, since long lists are often a little stale. `passed_over`, when given, counts the other
    files the walk found, by lower-case extension ("" for none), so the user can be told what was left out.
    """
    found: dict[str, None] = {}
    seen_dirs: set[tuple[int, int]] = set()
    passed_over = Counter() if passed_over is None else passed_over
    for name in inputs:
        if not os.path.lexists(name):
            raise UserError(f"input {display_path(name)} does not exist.")
        _add(name, found, seen_dirs, passed_over)
    if files_from is not None:
        for name in read_path_list(files_from):
            if os.path.isdir(name):
                _add(name, found, seen_dirs, passed_over)
            else:
                found.setdefault(os.path.normpath(name))
    return sorted(found, key=os.fsencode)


def _add(name: str, found: dict[str, None], seen_dirs: set[tuple[int, int]], passed_over: Counter[str]) -> None:
    if os.path.isdir(name):
        for path in _walk(name, seen_dirs, passed_over):
            found.setdefault(path)
    else:
        found.setdefault(os.path.normpath(name))


def _walk(top: str, seen_dirs: set[tuple[int, int]], passed_over: Counter[str]) -> Iterable[str]:
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
                    if entry.name not in SKIPPED_FOLDERS:
                        stack.append(entry.path)
                elif entry.is_file():
                    suffix = os.path.splitext(entry.name)[1].lower()
                    if suffix in IMAGE_SUFFIXES:
                        yield os.path.normpath(entry.path)
                    else:
                        passed_over[suffix] += 1
            except OSError:
                continue  # a broken symlink, or one that loops onto itself


def describe_passed_over(passed_over: Counter[str], shown: int = 5) -> str:
    """'1,204 .mov, 96 .aae and 3 more kinds': the files a walk left out, most common kinds first."""
    kinds = sorted(passed_over.items(), key=lambda kind: (-kind[1], kind[0]))
    parts = [f"{count:,} {suffix or '(no extension)'}" for suffix, count in kinds[:shown]]
    if len(kinds) > shown:
        parts.append(f"{len(kinds) - shown} more kinds")
    return parts[0] if len(parts) == 1 else f"{', '.join(parts[:-1])} and {parts[-1]}"


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
