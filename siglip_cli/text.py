"""Text for people: counts and lists in words, and names as one terminal line whatever bytes they hold."""

from __future__ import annotations

import os
import re
from typing import Callable

# What a library function is given to tell the user something, a line at a time (the CLI says it on stderr).
Note = Callable[[str], None]


def no_note(message: str) -> None:
    """The `Note` of a caller that listens to none."""

_CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_LONE_SURROGATES = re.compile(r"[\ud800-\udfff]")  # how Python's str holds a name's bytes that are not UTF-8


def counted(n: int, noun: str) -> str:
    """'3 files', '1 file'."""
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def first_of(items: list[str], shown: int) -> str:
    """'a, b, c, 4 more': the first `shown` of `items`, and how many are left out; all of them where only one would
    be (it takes no more room than '1 more')."""
    if len(items) <= shown + 1:
        return ", ".join(items)
    return ", ".join(items[:shown] + [f"{len(items) - shown:,} more"])


def display_path(path: str | os.PathLike) -> str:
    """The path as text for a terminal: bytes that are not UTF-8 and control characters shown as `\\xe9`, `\\x1b`
    (`escape_controls`). Two names that differ only in such bytes stay two names: as U+FFFD, `caf\\xe8.jpg` and
    `caf\\xe9.jpg` both read `caf\ufffd.jpg`, and a note that one was gone did not say which."""
    return escape_controls(os.fsencode(path).decode("utf-8", errors="surrogateescape"))


def escape_controls(text: str) -> str:
    """`text` as one terminal line: control characters (a newline, an escape sequence that would recolour the
    terminal, C1 controls such as CSI) shown as `\\x1b`, and a name's bytes that are not UTF-8 (an `-o` name as
    typed, held by Python as lone surrogates) as `\\xe9`, as `display_path` shows them."""
    text = _LONE_SURROGATES.sub(_escaped_byte, text)
    return _CONTROL_CHARACTERS.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def _escaped_byte(match: re.Match) -> str:
    """`\\xe9` for the surrogate that holds byte 0xE9 of a name (Python's `surrogateescape`); U+FFFD for a lone
    surrogate of any other origin."""
    code = ord(match.group())
    return f"\\x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else "\ufffd"
