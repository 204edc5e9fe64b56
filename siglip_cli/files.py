"""Finding the images to embed: files, folders walked recursively, and path lists."""

from __future__ import annotations

import base64
import codecs
import errno
import hashlib
import os
import re
import stat
import sys
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UserError
from .text import counted, display_path, first_of

# What cameras, phones and the web save photos as. HEIC/HEIF (iPhones since 2017) decode through pillow-heif,
# AVIF through Pillow itself (11.3+); .mpo is the multi-picture JPEG some cameras write, .jfif/.jpe browser
# downloads. Anything else in a folder (videos, RAW files, sidecars) is counted, not opened.
IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".apng", ".webp", ".avif", ".heic", ".heif", ".hif", ".bmp", ".gif",
     ".tif", ".tiff", ".mpo"}
)  # .hif: the HEIF that Canon and Fujifilm cameras write
# Folders that would embed photos a second time or bring back deleted ones: NAS thumbnails (Synology's @eaDir),
# snapshots and recycle bins (Synology, QNAP, Windows: `$Recycle.Bin` on C:, `$RECYCLE.BIN` on other drives,
# `RECYCLER` before Vista), and the fragments fsck recovers. Matched exactly: a user's album "Lost+Found" is walked.
# Each is named in a note. Hidden folders (.Trash, .thumbnails, .snapshot, QNAP's .@__thumb) are skipped anyway.
SKIPPED_FOLDERS = frozenset(
    {"@eaDir", "#recycle", "#snapshot", "@Recycle", "@Recently-Snapshot", "$RECYCLE.BIN", "$Recycle.Bin", "RECYCLER",
     "lost+found"}
)  # fmt: skip
# A macOS Photos library (a folder named `*.photoslibrary`) holds each photo once in `originals` (`Masters` in older
# ones); its `resources/derivatives` and the rest are the same photos again, at other sizes. iPhoto
# (`*.photolibrary`) and Aperture (`*.aplibrary`) libraries keep theirs in `Masters` beside `Previews` and `Thumbnails`.
PHOTOS_LIBRARY_SUFFIXES = (".photoslibrary", ".photolibrary", ".aplibrary")
PHOTOS_LIBRARY_ORIGINALS = frozenset({"originals", "Masters"})


@dataclass
class WalkReport:
    """What folder walks met besides images, so that nothing is left out without the user being told."""

    passed_over: Counter[str] = field(default_factory=Counter)  # other files, by lower-case extension ("" if none)
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # (folder, reason) of folders not listed
    # (path, what it is) of entries named like images that are no files: links to a missing target (an unmounted
    # drive), FIFOs, sockets. Opening a FIFO would block forever.
    not_files: list[tuple[str, str]] = field(default_factory=list)
    # (link, where it leads) of folder links followed out of the folder given: a link to `/` or `~` in a photo
    # folder walks the whole disk, so the user is told where the walk went.
    outside: list[tuple[str, str]] = field(default_factory=list)
    # (link, where it leads) of the other links whose target is missing: a folder link into an unmounted drive
    # leaves nothing else to see, and `--update` keeps the rows under it.
    dangling: list[tuple[str, str]] = field(default_factory=list)
    loops: set[str] = field(default_factory=set)  # those of them that loop (`a -> b`, `b -> a`): no drive to mount
    skipped: list[str] = field(default_factory=list)  # folders of `SKIPPED_FOLDERS`: NAS thumbnails, recycle bins
    # (path, is a folder) of hidden folders and hidden files named like images the walks passed by: macOS's `._`
    # copies and `.thumbnails` are no photos to embed, but a folder of real ones named `.trip` was left out unsaid
    hidden: list[tuple[str, bool]] = field(default_factory=list)
    libraries: list[str] = field(default_factory=list)  # Photos libraries walked (their originals only)
    without_originals: list[str] = field(default_factory=list)  # those of them with no originals folder at all
    links: list[str] = field(default_factory=list)  # image files the walks met as symlinks: each may be another name
    # for a file this run writes (`outputs.refuse_inputs_among_outputs`); few in a photo folder
    listed: int = 0  # paths read from --files-from
    listed_digest: str = ""  # of those paths, normalized and sorted: what a --shard part records of its list
    listed_distinct: int = 0  # how many paths that digest holds

    def notes(self, *, quiet: bool = False) -> list[str]:
        """The notes `siglip embed` gives on stderr; `quiet` keeps those about images that are not embedded."""
        notes = []
        if self.unreadable:
            notes.append(f"could not read {self.unreadable_text()}; images there are not embedded.")
        if self.outside and not quiet:
            notes.append(f"followed {self.outside_text()}; the images there are embedded too.")
        if self.not_files:
            notes.append(f"{self.not_files_text()}; not embedded.")
        if self.dangling:
            notes.append(f"{self.dangling_text()}; nothing there is embedded.")
        if self.skipped and not quiet:
            notes.append(f"left out {self.skipped_text()}.")
        if self.hidden and not quiet:
            notes.append(f"left out {self.hidden_text()}; name one to embed it.")
        walked = sorted(set(self.libraries) - set(self.without_originals))
        if walked and not quiet:
            libraries = first_of([display_path(library) for library in walked], 3)
            notes.append(f"walked only the originals folder (`originals`, `Masters`) of {libraries}; the rest of a "
                         "Photos library is not embedded.")  # fmt: skip
        if self.without_originals:
            notes.append(f"no originals folder (`originals`, `Masters`) in {self.without_originals_text()}: nothing "
                         "there is embedded (the rest of a Photos library holds copies).")  # fmt: skip
        if self.passed_over and not quiet:
            notes.append(
                f"passed over {self.passed_over_text()} in the folders: not images siglip reads "
                "(name a file explicitly to try it anyway)."
            )
        return notes

    def passed_over_text(self, shown: int = 5) -> str:
        """'1,300 files (1,204 .mov, 96 .aae)': the files left out, most common kinds first."""
        kinds = sorted(self.passed_over.items(), key=lambda kind: (-kind[1], kind[0]))
        named = kinds if len(kinds) <= shown + 1 else kinds[:shown]  # a kind of its own, not "1 other kind"
        parts = [f"{count:,} {_suffix_text(suffix)}" for suffix, count in named]
        if len(kinds) > len(named):
            parts.append(counted(len(kinds) - shown, "other kind"))
        return f"{counted(self.passed_over.total(), 'file')} ({', '.join(parts)})"

    def without_originals_text(self, shown: int = 3) -> str:
        """'a/Photos Library.photoslibrary': the Photos libraries walked that have no originals folder."""
        return first_of([display_path(library) for library in sorted(self.without_originals)], shown)

    def skipped_text(self, shown: int = 3) -> str:
        """'2 folders of NAS thumbnails, snapshots, recycle bins or fsck fragments: a/@eaDir, b/#recycle'."""
        folders = first_of([display_path(folder) for folder in sorted(self.skipped)], shown)
        kinds = "NAS thumbnails, snapshots, recycle bins or fsck fragments"
        return f"{counted(len(self.skipped), 'folder')} of {kinds}: {folders}"

    def hidden_text(self, shown: int = 3) -> str:
        """'1 folder and 2 image files whose names start with a dot (hidden): a/.trip, a/._IMG_1.JPG, b/.x.jpg'."""
        folders = sum(is_folder for _, is_folder in self.hidden)
        files = len(self.hidden) - folders
        kinds = [counted(folders, "folder")] * (folders > 0) + [counted(files, "image file")] * (files > 0)
        listed = first_of([display_path(path) for path, _ in _by_bytes(self.hidden)], shown)
        return f"{' and '.join(kinds)} whose names start with a dot (hidden): {listed}"

    def unreadable_text(self, shown: int = 3) -> str:
        """'2 folders: a/locked (Permission denied), b/gone (No such file or directory)'."""
        listed = first_of([f"{display_path(folder)} ({reason})" for folder, reason in self.unreadable], shown)
        return f"{counted(len(self.unreadable), 'folder')}: {listed}"

    def outside_text(self, shown: int = 3) -> str:
        """'1 folder link out of the folders given: photos/nas → /mnt/nas'."""
        listed = first_of([f"{display_path(link)} → {display_path(target)}" for link, target in self.outside], shown)
        return f"{counted(len(self.outside), 'folder link')} out of the folders given: {listed}"

    def dangling_text(self, shown: int = 3) -> str:
        """'1 link that leads nowhere (an unmounted drive?): photos/nas → /mnt/nas'; a link in a loop says so, and
        where every one loops, no drive is asked after."""
        links = _by_bytes(self.dangling)
        listed = first_of([f"{display_path(link)} → {display_path(target)}" + (" (a loop)" * (link in self.loops))
                           for link, target in links], shown)  # fmt: skip
        verb = "leads" if len(self.dangling) == 1 else "lead"
        drive = "" if self.loops.issuperset(link for link, _ in links) else " (an unmounted drive?)"
        return f"{counted(len(self.dangling), 'link')} that {verb} nowhere{drive}: {listed}"

    def not_files_text(self, shown: int = 3) -> str:
        """'2 entries named like images are not files: a/x.jpg (a broken link), a/y.jpg (a FIFO)'."""
        entries = _by_bytes(self.not_files)
        listed = first_of([f"{display_path(path)} ({kind})" for path, kind in entries], shown)
        if len(entries) == 1:
            return f"1 entry named like an image is not a file: {listed}"
        return f"{len(entries):,} entries named like images are not files: {listed}"

    def unreached(self) -> list[str]:
        """What the walk could not reach, one clause each, as `siglip embed --strict` fails on: a folder that cannot
        be listed, a link into a share not mounted, an entry named like an image that is no file."""
        clauses = [f"could not read {self.unreadable_text()}"] if self.unreadable else []
        clauses += [self.dangling_text()] if self.dangling else []
        clauses += [self.not_files_text()] if self.not_files else []
        return clauses

    def unreached_json(self) -> dict[str, list[dict]]:
        """`unreached` as data for `--json`, the paths as the manifest gives them (`path_fields`: a newline as JSON
        writes it, not as a note shows it; bytes that are not UTF-8 also in base64), for a script to act on them."""
        return {
            "unlisted_folders": [{**path_fields(folder), "reason": reason} for folder, reason in self.unreadable],
            "dangling_links": [{**path_fields(link, "link"), **path_fields(target, "target")}
                               for link, target in _by_bytes(self.dangling)],
            "not_files": [{**path_fields(path), "kind": kind} for path, kind in _by_bytes(self.not_files)],
        }  # fmt: skip


def _by_bytes(entries: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """(path, detail) entries sorted by their paths' bytes, as `discover` sorts the files it finds."""
    return sorted(entries, key=lambda entry: os.fsencode(entry[0]))


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether `a` and `b` name one file or folder (both there): a link, a case-blind disk, `.` and its path."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


# Where drives and network shares are mounted, and how many folders down their mount points sit: /Volumes/X
# (macOS), /mnt/X (by hand), /media/X (usbmount, fstab) or /media/USER/X (desktops), /run/media/USER/X (Fedora,
# Arch). Under one of these, a missing folder on the way to the mount point means a drive not mounted.
MOUNT_POINTS = {"/Volumes": (1,), "/mnt": (1,), "/media": (1, 2), "/run/media": (2,)}


def below_mount_points(folder: str) -> tuple[int, tuple[int, ...]] | None:
    """How many folders below a root of `MOUNT_POINTS` the absolute `folder` sits (0: the root itself), with the
    depths drives are mounted at under it; None elsewhere, or where the root is itself a drive's mount point (cloud
    machines mount a data disk at /mnt: its folders are folders)."""
    for root, depths in MOUNT_POINTS.items():
        if folder == root or folder.startswith(root + os.sep):
            return None if os.path.ismount(root) else (len(Path(folder).relative_to(root).parts), depths)
    return None


def empty_folder(folder: str) -> bool:
    """Whether `folder` is a folder with nothing in it; False where it cannot be listed."""
    try:
        with os.scandir(folder) as entries:
            return next(entries, None) is None
    except OSError:
        return False


def _way_to(path: str | os.PathLike) -> tuple[str, list[str]] | None:
    """The deepest folder on the way to `path` that exists, and those after it that do not, highest first: the way
    resolved through its symlinks, a link that leads nowhere included. None where the working directory is gone."""
    try:
        folder = os.path.realpath(os.path.dirname(os.path.abspath(path)))
    except OSError:
        return None
    missing = []
    while not _there(folder):
        missing.append(folder)
        folder = os.path.dirname(folder)
    return folder, missing[::-1]


def _there(path: str) -> bool:
    """Whether `path` exists, or may: one in a folder closed to this user cannot be looked at, and is not missing."""
    try:
        os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError:
        return True
    return True


def missing_folders(path: str | os.PathLike) -> list[str]:
    """The folders on the way to `path` that do not exist, highest first, as writing it would make them; none where
    the way stops at something else (a file, a folder closed to this user, one on a read-only file system), which
    writing it will refuse."""
    way = _way_to(path)
    return way[1] if way and os.path.isdir(way[0]) and os.access(way[0], os.W_OK | os.X_OK) else []


def refuse_an_unreachable_folder(output: str | os.PathLike) -> None:
    """Refuse, before any work, to write `output` where its folder cannot be made or must not be: past something
    that is no folder (a file, a device, a link to nothing: to a drive not mounted, as likely as not), and where a
    drive is mounted but none is now (`MOUNT_POINTS`): in a folder on the way to one that does not exist
    (/media/me/USBDISK, unplugged), or in the empty folder of a drive not mounted (/mnt/nas, left by fstab). The
    output would land on the disk under the mount point, unseen."""
    _refuse_what_is_no_folder(output)
    if (way := _way_to(output)) is None:
        return
    deepest, missing = way
    place = below_mount_points(deepest)
    if place is None or os.path.ismount(deepest):
        return
    below, depths = place
    if below < max(depths) and missing:
        raise UserError(
            f"no drive is mounted at {display_path(missing[0])}, which does not exist: mount the drive, or make the "
            "folder first to write on this disk."
        )
    if below in depths and empty_folder(deepest):
        raise UserError(
            f"no drive is mounted at {display_path(deepest)}, an empty folder: mount the drive, or put any file in "
            "the folder first to write on this disk."
        )


def _refuse_what_is_no_folder(output: str | os.PathLike) -> None:
    """Refuse the first name on the way to `output`, as written, that is there but no folder; from the first that is
    missing on, the run makes them."""
    for step in reversed(Path(output).parents):  # from the top down
        try:
            mode = os.stat(step).st_mode
        except (FileNotFoundError, NotADirectoryError):
            if os.path.islink(step):
                raise UserError(
                    f"cannot write {display_path(output)}: {display_path(step)} is a link to "
                    f"{display_path(os.path.realpath(step))}, which does not exist (an unmounted drive?)."
                ) from None
            return
        except OSError:  # closed to this user, or a loop of links: the run's own refusal says which
            return
        if not stat.S_ISDIR(mode):
            kind = "a file, not a folder" if stat.S_ISREG(mode) else "not a folder"  # /dev/null: a device
            raise UserError(f"cannot write {display_path(output)}: {display_path(step)} is {kind}.")


def discover(
    inputs: Iterable[str],
    *,
    files_from: str | None = None,
    report: WalkReport | None = None,
    digest_list: bool = False,
    leave_out: frozenset[tuple[tuple[int, int], str]] = frozenset(),
) -> list[str]:
    """Every image path under `inputs`, each once, in sorted order (by the path's bytes). "Once" is by directory
    entry (`directory_entry`): a file named both relatively and absolutely, or through a symlinked folder, keeps
    the first spelling met.

    Named files are taken whatever their extension (the user asked for them); folders are walked recursively
    for regular files with an image extension (case-insensitive), skipping hidden files and folders and
    `SKIPPED_FOLDERS`. Symlinks are followed, but each folder is entered once, so a symlink loop neither hangs
    nor repeats images. A missing argument is an error; a missing line of `files_from` is kept and fails as a
    bad file instead, since long lists are often a little stale. `report`, when given, collects what the walks met
    besides the images they return (see `WalkReport`). `leave_out`: directory entries (folder's device and inode,
    name) the walks pass by without a word: the run's own output, which a later run finds in the folder it embeds.
    """
    if isinstance(inputs, (str, bytes, os.PathLike)):  # one path: a list of one, not the letters of its name
        inputs = [inputs]
    found: dict[tuple[object, str], str] = {}  # directory entry -> the path it was first met as
    named: dict[tuple[object, str], str] = {}  # the entries of files named one by one
    folders: dict[str, object] = {}
    seen_dirs: set[tuple[int, int]] = set()
    report = WalkReport() if report is None else report

    def keep(path: str) -> tuple[object, str]:
        entry = directory_entry(path, folders)
        found.setdefault(entry, path)
        return entry

    def add(names: list[str]) -> None:
        """Walk the folders of `names` together, then take its files: the first spelling of an entry met twice is the
        same whatever order the names came in (the parts of a sharded run may give them in any order)."""
        walked = {n for n in names if os.path.isdir(n)}  # not `folders`, the cache of folders' identities
        for folder, file_name, path in _walk(sorted(walked, key=os.fsencode), seen_dirs, report, leave_out):
            found.setdefault((folder, file_name), path)  # the walk knows the entry: no `directory_entry` call
        for path in sorted({tidy_path(n) for n in names if n not in walked}, key=os.fsencode):
            named.setdefault(keep(path), path)

    given = []
    for name in inputs:
        if not isinstance(name, (str, bytes, os.PathLike)):
            raise UserError(f"an input path must be a str or a path, not {type(name).__name__}.")
        name = expand_home(name)
        if not name:  # os.stat("") fails as a missing file; an unset shell variable is the likely cause
            raise UserError("an input path is empty: give image files or folders.")
        try:
            os.stat(name)
        except OSError as e:
            if os.path.islink(name) and e.errno in (errno.ENOENT, errno.ENOTDIR):
                target = display_path(os.readlink(name))
                raise UserError(f"input {display_path(name)} is a link to {target}, which does not exist.") from None
            if e.errno == errno.ENOENT:
                raise UserError(f"input {display_path(name)} does not exist.") from None
            raise UserError(f"input {display_path(name)} cannot be read: {e.strerror}.") from None
        given.append(name)
    add(given)
    if files_from is not None:
        listed = read_path_list(files_from)
        report.listed += len(listed)
        if digest_list:  # for a --shard part's record; sorting a million lines costs seconds, so only then
            names = sorted({os.fsencode(os.path.normpath(name)) for name in listed})
            report.listed_distinct = len(names)
            report.listed_digest = hashlib.blake2b(b"\0".join(names), digest_size=16).hexdigest()
        for name in listed:  # one by one: a list of a million lines is not sorted again
            add([name])
    # A named file a walk also met was counted as passed over (a regular file of another kind), though it is embedded.
    for (folder, name), path in named.items():
        suffix = os.path.splitext(name)[1].lower()
        if suffix not in IMAGE_SUFFIXES and not name.startswith(".") and folder in seen_dirs and is_regular_file(path):
            report.passed_over -= Counter({suffix: 1})
    return sorted(found.values(), key=os.fsencode)


def expand_home(path: str | os.PathLike) -> str:
    """`path` as text, its leading `~` or `~user` expanded as a shell would have, unless a file or folder of that
    literal name is there. The Python API is given paths no shell has seen ("~/photos"), and an output folder
    literally named `~`, made in the current one, would invite an `rm -rf ~`."""
    path = os.fsdecode(path)
    if not path.startswith("~"):
        return path
    return path if os.path.lexists(path.split(os.sep, 1)[0]) else os.path.expanduser(path)


def directory_entry(path: str, folders: dict[str, object]) -> tuple[object, str]:
    """The directory entry `path` names: its folder, as the walk knows folders (device and inode), and its own name.
    Only the folder is resolved: a symlink or hard link to a photo under another name is another name for the user
    to keep, not a repeat. `folders` caches the folders' identities (a walk gives thousands of files per folder)."""
    folder, name = os.path.split(path)
    if folder not in folders:
        try:
            info = os.stat(folder or os.curdir)
            folders[folder] = (info.st_dev, info.st_ino)
        except OSError:  # a stale line of a path list: its folder is gone too
            folders[folder] = os.path.realpath(folder or os.curdir)
    return folders[folder], name


class NoImagesFound(UserError):
    """The inputs hold no image file: the sentence says what they held instead."""


def find_images(
    inputs: list[str],
    *,
    files_from: str | None = None,
    digest_list: bool = False,
    leave_out: frozenset[tuple[tuple[int, int], str]] = frozenset(),
) -> tuple[list[str], WalkReport]:
    """`discover`, with what the walks met; finding no image at all is a UserError that says what was there.
    `digest_list`: also the count and digest of the --files-from list's paths (`WalkReport.listed_digest`)."""
    report = WalkReport()
    paths = discover(inputs, files_from=files_from, report=report, digest_list=digest_list, leave_out=leave_out)
    if not paths and not inputs and not report.listed:
        source = "read from stdin" if files_from == "-" else f"in {display_path(str(files_from))}"
        raise UserError(f"the list of paths {source} is empty: give one path per line, or NUL-separated.")
    if not paths:
        met = [f"found only {report.passed_over_text()}"] if report.passed_over else []
        met += [f"could not read {report.unreadable_text()}"] if report.unreadable else []
        met += [report.not_files_text()] if report.not_files else []
        met += [report.dangling_text()] if report.dangling else []
        if report.without_originals:
            have = "has" if len(report.without_originals) == 1 else "have"
            met.append(f"{report.without_originals_text()} {have} no originals folder, the only one of a Photos "
                       "library walked")  # fmt: skip
        met += [f"left out {report.skipped_text()}"] if report.skipped else []
        raise NoImagesFound(
            f"no image files found in {', '.join(inputs or [str(files_from)])} "
            f"(looked for {' '.join(sorted(IMAGE_SUFFIXES))}{''.join('; ' + m for m in met)})."
        )
    return paths, report


def tidy_path(path: str) -> str:
    """`path` without `.` components and doubled or trailing separators, as `os.path.normpath` gives it, but with
    every `..` kept: after a symlinked folder, `..` leads to the parent of the link's target, which only the file
    system knows (`os.path.normpath` makes `link/../a.jpg` into `a.jpg`, which may be another file)."""
    parts = path.replace(os.altsep, os.sep) if os.altsep else path
    if ".." not in parts.split(os.sep):
        return os.path.normpath(path)
    drive, rest = os.path.splitdrive(parts)
    root = os.sep if rest.startswith(os.sep) else ""
    kept = [part for part in rest.split(os.sep) if part not in ("", ".")]
    return drive + root + os.sep.join(kept)


def _skipped_folder(entry: os.DirEntry) -> bool:
    """Whether a folder is one of `SKIPPED_FOLDERS`, by its name or, through a symlink, by its target's: a link to a
    NAS's `@eaDir` holds its thumbnails all the same."""
    if entry.name in SKIPPED_FOLDERS:
        return True
    return entry.is_symlink() and os.path.basename(os.path.realpath(entry.path)) in SKIPPED_FOLDERS


def _walk(
    tops: list[str],
    seen_dirs: set[tuple[int, int]],
    report: WalkReport,
    leave_out: frozenset[tuple[tuple[int, int], str]],
) -> Iterator[tuple[tuple[int, int], str, str]]:
    """Image files under the folders `tops`, each as its entry (its folder's device and inode, its name:
    `directory_entry`) and its path. Folders reached through a symlink, one given among `tops` too, wait until every
    real one under all of them has been walked, so a folder that is reachable both ways is listed under its real
    path, whatever order the file system or the user gives."""
    real = [top for top in reversed(tops) if not os.path.islink(top)]  # popped from the end: in the order given
    linked = [top for top in reversed(tops) if os.path.islink(top)]
    given, tops_real = set(tops), [os.path.realpath(top) for top in tops]
    while real or linked:
        linked_to = not real  # a folder reached through a symlink: its own name may be the link's
        directory = real.pop() if real else linked.pop()
        try:
            info = os.stat(directory)
            if (info.st_dev, info.st_ino) in seen_dirs:
                continue
            seen_dirs.add((info.st_dev, info.st_ino))
            entries = sorted(os.scandir(directory), key=lambda entry: os.fsencode(entry.name), reverse=True)
            if entries:  # a folder one may read but not search (mode 600) lists its names, yet opens none of them
                _look_into(entries[0].path)
        except OSError as e:
            report.unreadable.append((directory, e.strerror or str(e)))
            continue
        name = os.path.realpath(directory) if linked_to or directory in given else os.path.normpath(directory)
        if linked_to and not any(os.path.commonpath([name, top]) == top for top in tops_real):
            report.outside.append((directory, name))
        in_photos_library = os.path.basename(name).endswith(PHOTOS_LIBRARY_SUFFIXES)
        if in_photos_library:
            report.libraries.append(tidy_path(directory))
            if not any(entry.name in PHOTOS_LIBRARY_ORIGINALS and entry.is_dir() for entry in entries):
                report.without_originals.append(tidy_path(directory))
        for entry in entries:
            if ((info.st_dev, info.st_ino), entry.name) in leave_out:
                continue
            suffix = os.path.splitext(entry.name)[1].lower()
            if entry.name.startswith("."):
                if not in_photos_library:  # whose other folders are passed by with a note of their own
                    _hidden(entry, suffix, report)
                continue
            try:
                if entry.is_dir():
                    if _skipped_folder(entry):
                        report.skipped.append(tidy_path(entry.path))
                    elif not in_photos_library or entry.name in PHOTOS_LIBRARY_ORIGINALS:
                        (linked if entry.is_symlink() else real).append(entry.path)
                elif entry.is_file():
                    if suffix in IMAGE_SUFFIXES:
                        if entry.is_symlink():
                            report.links.append(tidy_path(entry.path))
                        yield (info.st_dev, info.st_ino), entry.name, tidy_path(entry.path)
                    else:
                        report.passed_over[suffix] += 1
                elif suffix in IMAGE_SUFFIXES:
                    report.not_files.append((tidy_path(entry.path), _kind(entry)))
                elif entry.is_symlink() and not os.path.exists(entry.path):  # not a link to a FIFO or socket
                    report.dangling.append((tidy_path(entry.path), os.readlink(entry.path)))
            except OSError as e:  # a symlink that loops or leads through a folder closed to this user; an entry gone
                if entry.is_symlink():
                    _unfollowed_link(entry, suffix, e, report)


def _hidden(entry: os.DirEntry, suffix: str, report: WalkReport) -> None:
    """Count a hidden entry the walk passes by, where it could hold a photo: a folder, or a file named like an
    image (not `.DS_Store`, nor our own lock and temporary files)."""
    try:
        is_folder = entry.is_dir()
    except OSError:  # gone since the folder was listed
        return
    if is_folder or suffix in IMAGE_SUFFIXES:
        report.hidden.append((tidy_path(entry.path), is_folder))


def _unfollowed_link(entry: os.DirEntry, suffix: str, error: OSError, report: WalkReport) -> None:
    """Say what a link the walk could not follow is, as its kind is said elsewhere: one named like an image is no
    file; one that loops (`a -> b`, `b -> a`) leads nowhere, as one to a missing folder does; one through a folder
    closed to this user is a folder that could not be listed. Said nowhere, a folder of photos went unseen."""
    path = tidy_path(entry.path)
    if suffix in IMAGE_SUFFIXES:
        report.not_files.append((path, _unfollowed(error)))
    elif error.errno == errno.ELOOP:
        try:
            report.dangling.append((path, os.readlink(entry.path)))
        except OSError:  # gone since the folder was listed
            return
        report.loops.add(path)
    elif not isinstance(error, FileNotFoundError):
        report.unreadable.append((path, error.strerror or str(error)))


def _look_into(path: str) -> None:
    """Raise PermissionError where `path`'s folder may not be searched; any other failure (an entry gone since the
    listing) is no sign of it, and is left to that entry."""
    try:
        os.lstat(path)
    except PermissionError as e:  # its names listed, but none of them may be opened: said so, not as unlistable
        raise PermissionError(e.errno, f"{e.strerror}: its names can be listed but its files not opened") from None
    except OSError:
        pass


def _kind(entry: os.DirEntry) -> str:
    """What a directory entry that is neither a file nor a folder is, in a few words: a link to a FIFO or a device
    is named so (`ln -s /dev/zero x.jpg`), not broken."""
    try:
        mode = entry.stat(follow_symlinks=True).st_mode
    except OSError as e:
        return _unfollowed(e)
    kind = "a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "a device"
    return f"a link to {kind}" if entry.is_symlink() else kind


def _unfollowed(error: OSError) -> str:
    """What a link that cannot be followed is: one that leads back to itself (`a.jpg -> b.jpg -> a.jpg`), or one
    whose target is missing."""
    return "a symlink loop" if error.errno == errno.ELOOP else "a broken link"


def read_path_list(source: str) -> list[str]:
    """Paths from a file (or `-` for stdin), one per line, or NUL-separated as `find -print0` writes them.

    A UTF-16 list is read as UTF-16 (Windows PowerShell 5's `>` writes one; split at its NUL bytes it would name
    `/` and `.`, the whole disk), known by its byte-order mark or its zeros (`_utf16`); a UTF-8 BOM is dropped.
    """
    if not source.strip():  # `--files-from "$LIST"` with the variable unset: Path("") is the current folder
        raise UserError("the path list's name is empty: give a file of paths, or - for stdin.")
    try:
        data = sys.stdin.buffer.read() if source == "-" else Path(source).read_bytes()
    except OSError as e:
        raise UserError(f"cannot read the path list {source}: {e.strerror}.") from None
    encoding = _utf16(data)
    if encoding:
        try:
            return [line for line in data.decode(encoding).splitlines() if line.strip()]
        except UnicodeDecodeError:
            raise UserError(f"the path list {source} looks like UTF-16 but is not valid UTF-16.") from None
    data = data.removeprefix(codecs.BOM_UTF8)
    parts = [part for part in (data.split(b"\0") if b"\0" in data else data.splitlines()) if part.strip()]
    # A photo given by mistake (`--files-from photo.jpg`) would split into hundreds of "paths" of binary bytes, each
    # an error row. Real names may hold a control character, but not most of a list's.
    if sum(1 for part in parts if _BINARY.search(part)) > len(parts) / 2:
        raise UserError(
            f"the path list {source} is not text: most of its lines hold control characters (an image? a listing "
            "with colour codes?); give a file of paths, one per line."
        )
    return [os.fsdecode(part) for part in parts]


_BINARY = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")  # control bytes no text file holds (tab and line ends aside)


def _utf16(data: bytes) -> str | None:
    """The UTF-16 codec a path list is written in, or None: by its byte-order mark, or, without one, by its zeros:
    paths, mostly ASCII, leave the high byte of nearly every UTF-16 unit zero and the low byte never; a
    `find -print0` list has its NULs only between whole paths. Only the list of one-character names (folders
    `0` … `9` of a dataset) has that pattern too: a UTF-16 list also has line breaks, which tells them apart."""
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return "utf-16"
    if len(data) >= 4 and len(data) % 2 == 0:
        for low, high, codec in ((data[0::2], data[1::2], "utf-16-le"), (data[1::2], data[0::2], "utf-16-be")):
            if 0 not in low and high.count(0) >= 0.75 * len(high) and (b"\n" in low or b"\r" in low):
                return codec
    return None


def is_regular_file(path: str) -> bool:
    """True for a regular file (after symlinks); a FIFO or device named like an image is never opened."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def _suffix_text(suffix: str) -> str:
    """A file name's extension as a note names it: quoted where it ends in a space (`IMG_2.jpeg `, which reads as a
    .jpeg passed over), never empty."""
    if not suffix:
        return "(no extension)"
    return f"'{suffix}'" if suffix != suffix.strip() else suffix


def path_fields(path: str, key: str = "path") -> dict[str, str]:
    """JSON fields naming a file, as the manifest names it: `key`, plus its exact bytes in base64
    (`<key>_bytes_b64`) when the name is not valid UTF-8."""
    raw = os.fsencode(path)
    try:
        return {key: raw.decode("utf-8")}
    except UnicodeDecodeError:
        return {key: raw.decode("utf-8", errors="replace"), f"{key}_bytes_b64": base64.b64encode(raw).decode()}


def path_from_fields(row: dict) -> str:
    """Inverse of `path_fields`."""
    if "path_bytes_b64" in row:
        return os.fsdecode(base64.b64decode(row["path_bytes_b64"]))
    return row["path"]
