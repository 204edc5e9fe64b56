"""One image file → its model pixels and its manifest facts (size, mtime, BLAKE2b), in PIL + numpy.

No torch here: the head start (`headstart`) runs this in a process forked before torch is imported; the decoding
workers (`decoding`) run it too, and hand the pixels over as tensors.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import threading
from typing import Callable, Protocol, TypeVar

import numpy as np

from .config import PreprocessConfig
from .preprocess import BadImage, DecodeOptions, bad_file_reason, load_pixels, open_checked
from .text import display_path


class HasImageSize(Protocol):
    """What a device decoder says of a file it claims (`gpu_decode.JpegHeader`): the oriented picture's size."""

    width: int
    height: int


J = TypeVar("J", bound=HasImageSize)
# A file is read whole (hashed, then decoded from memory) by the process that takes it; one larger than this has its
# header checked first, so that a video named .jpg or a 20 GB scan over the pixel limit costs no memory, and is then
# hashed a block at a time and decoded from the file: a photo followed by gigabytes (a damaged copy, a video glued
# on) costs the photo's memory, not the file's.
HEADER_FIRST_BYTES = 64 << 20


def file_digest(data: bytes) -> str:
    """The manifest's `blake2b`: 128 bits of BLAKE2b, in hex, which `--update` compares when only the mtime moved."""
    return _new_digest(data).hexdigest()


def _new_digest(data: bytes = b"") -> hashlib.blake2b:
    """The one hash both ways of reading a file start from: 128-bit BLAKE2b."""
    return hashlib.blake2b(data, digest_size=16)


def digest_of_file(path: str, stop: threading.Event | None = None) -> str:
    """`file_digest` of the file at `path`, read a MiB at a time (a 2 GB TIFF need not fit in memory). `stop`, once
    set, ends the reading with KeyboardInterrupt (`interrupts.stop_flag`)."""
    digest = _new_digest()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            if stop is not None and stop.is_set():
                raise KeyboardInterrupt
            digest.update(block)
    return digest.hexdigest()


def pixels_and_facts(
    path: str, cfg: PreprocessConfig, options: DecodeOptions, *, for_device: Callable[[bytes], J | None] | None = None
) -> tuple[np.ndarray | None, dict, J | None]:
    """One file → ((3, H, W) float32 pixels, facts for the manifest, None). `for_device`, given a small file's bytes,
    may claim it for a device decoder (a JPEG, on the GPU): (None, facts, what it returned) then. Raises on any
    problem with the file."""
    info = os.stat(path)
    if not stat.S_ISREG(info.st_mode):  # a FIFO or a device named like an image is never opened
        raise BadImage("not a regular file")
    if info.st_size > HEADER_FIRST_BYTES:
        with open(path, "rb") as f:  # its own handle: closing the image closes the file it was given
            open_checked(f, options).close()  # a huge file that is no image, or too many pixels: refused unread
        facts = {**stat_facts(info), "blake2b": digest_of_file(path)}
        with open(path, "rb") as f:  # the PIL path whatever `for_device`: the device decoder takes bytes in memory
            pixels, width, height = load_pixels(f, cfg, options)
        return pixels, {"width": width, "height": height, **facts}, None
    with open(path, "rb") as f:
        data = f.read()
    facts = {**stat_facts(info), "blake2b": file_digest(data)}
    if for_device is not None and (claimed := for_device(data)) is not None:
        return None, {"width": claimed.width, "height": claimed.height, **facts}, claimed
    pixels, width, height = load_pixels(io.BytesIO(data), cfg, options)
    return pixels, {"width": width, "height": height, **facts}, None


def failure_reason(error: Exception, path: str) -> str:
    """Why the file at `path` failed, for the errors file; for a missing file, the link that names it, where `path` is
    one (a photo linked into a drive not mounted), or the name that exists without the spaces at its ends (a line of
    a path list, copied with them)."""
    reason = bad_file_reason(error)
    if not isinstance(error, FileNotFoundError):
        return reason
    if os.path.islink(path):
        return f"{reason} (a link to {display_path(os.path.realpath(path))}, which does not exist)"
    if (bare := path.strip()) != path and os.path.lexists(bare):
        reason += f" (without the spaces at its ends, {display_path(bare)} exists)"
    return reason


def stat_facts(info: os.stat_result) -> dict[str, int]:
    """What a manifest row keeps of a file's status, by which a later --update tells whether it changed: its size,
    mtime and ctime. The ctime (inode change time) catches what keeps size and mtime: a tag edited in place with
    `exiftool -P`, a file replaced by one restored with its times; no tool can set it back."""
    return {"size": info.st_size, "mtime_ns": info.st_mtime_ns, "ctime_ns": info.st_ctime_ns}


def error_facts(path: str) -> dict:
    """What an error row keeps of the file at `path`: its size and mtime, or {} where it is missing. A failed file is
    tried again by every --update; one missing then and still missing keeps its row (`earlier_rows._still_current`)."""
    try:
        info = os.stat(path)
        return {"size": info.st_size, "mtime_ns": info.st_mtime_ns}
    except OSError:
        return {}
