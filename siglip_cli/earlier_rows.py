"""Which rows of earlier work a run keeps: its files matched to the rows an interrupted run left in its chunks and,
with --update, to the rows of the output it updates.

A row is reused while its file is still the one that produced it: the same size and times, else the same content
hash (the output's error rows are not: their files are tried again). With --update the output keeps the rows of
its files that are still there though not given, keeps unchecked those of files that cannot be looked at now (a
drive not mounted), and drops those of files that are gone, unless the photo is found again under a new name
(moved or renamed: the same size and content hash). An --update that would read the output's relative paths from
another folder than the one it was made in is refused.

`settle` is what `embed` calls, with the rows `chunk_rows` and `by_path` give.
"""

from __future__ import annotations

import os
from collections import Counter
from stat import S_ISREG
from typing import Iterable, NamedTuple

from . import interrupts
from .concurrency import look_ahead
from .errors import UserError
from .files import below_mount_points, directory_entry, empty_folder, same_file
from .outputs import Ref, RowsByPath
from .reading import digest_of_file
from .storage import Chunk, SafetensorsRows
from .text import Note, counted, display_path


# --update reads the files whose mtime alone moved, to compare their content: reading waits on the disk (a NAS, a
# spinning disk) more than BLAKE2b on the CPU, and BLAKE2b lets go of the GIL, so threads overlap the waits.
HASHING_THREADS = 8
HASHING_NOTE_BYTES = 256 << 20  # reading more than this says so first (seconds on a fast disk, minutes on a NAS)


def chunk_rows(chunks: list[Chunk]) -> RowsByPath:
    """The rows an interrupted run left in its work area's chunks, by path (`by_path`)."""
    return {path: found for chunk in chunks for path, found in results_of(chunk).items()}


def results_of(chunk: Chunk) -> RowsByPath:
    """The rows of one chunk, by path: an interrupted run's, or one this run has just written."""
    reader = SafetensorsRows(chunk.path)
    return by_path((Ref(reader, i, row) for i, row in enumerate(chunk.rows)), chunk.errors)


def by_path(refs: Iterable[Ref], errors: Iterable[dict]) -> RowsByPath:
    """Finished rows by path: a `Ref` for each embedded file, the error row of each that failed."""
    found: RowsByPath = {ref.info["path"]: ref for ref in refs}
    found.update((row["path"], row) for row in errors)
    return found


class Status(NamedTuple):
    """What the checks of an earlier row need of its file's `os.stat`, kept for each file of the earlier output
    while a run settles them: about 220 bytes a file, where the whole `os.stat_result` (every field, and the times
    as floats too) takes 640."""

    st_size: int
    st_mode: int
    st_mtime_ns: int
    st_ctime_ns: int

    @classmethod
    def of(cls, stat: os.stat_result) -> Status:
        return cls(stat.st_size, stat.st_mode, stat.st_mtime_ns, stat.st_ctime_ns)


class Settled(NamedTuple):
    """A run's files (`paths`, in the output's order: `_with_earlier_rows`) and what earlier work settles of them:
    `done`, the rows that need no new work (this run's chunks, the earlier output's rows of unchanged files, of
    files it cannot look at now, of files that moved); `unchecked`, those of them kept without a look (their files
    out of reach); `removed`, how many rows of the earlier output are dropped (their files gone)."""

    paths: list[str]
    done: RowsByPath
    unchecked: RowsByPath
    removed: int


def settle(
    paths: list[str],
    previous: RowsByPath,
    in_chunks: RowsByPath,
    *,
    made_in: str | None,
    keep_unlisted: bool,
    note: Note,
) -> Settled:
    """What is left to do: see `Settled`. `previous`: the earlier output's rows (--update), `in_chunks` those of an
    interrupted run; `made_in`: the folder the earlier output was made in, where known; `keep_unlisted`: the rows of
    files not given are kept (a whole output's --update)."""
    if keep_unlisted:
        _refuse_update_from_elsewhere(previous, made_in)
    seen: dict[str, Status] = {}  # each earlier row's file is looked at once: twice is slow on a share
    paths, unchecked, dropped = _with_earlier_rows(paths, previous, keep_unlisted, note, seen)
    reused, unread = _reusable([p for p in paths if p not in unchecked], in_chunks, previous, note, seen)
    if unread:
        _note_unchecked(note, unread, "read", "its times changed, and a permission was taken away?")
    unchecked |= {path: reused[path] for path in unread}
    reused |= unchecked
    moved = _moved([p for p in paths if p not in reused], dropped, note)
    # A dropped row is found again when a moved file took its content; of n copies of a photo, as many as moved.
    left = Counter(_content(ref) for ref in dropped.values())
    left.subtract(_content(ref) for ref in moved.values())
    lost = [path for path, ref in dropped.items() if left[_content(ref)] > 0]  # their photos, found nowhere
    if keep_unlisted and (made_in is None or not os.path.isdir(made_in)):
        _refuse_relative_rows_all_lost(previous, dropped, lost)
    removed = sum(n for n in left.values() if n > 0)
    if keep_unlisted and removed:
        gone = min(lost, key=os.fsencode)
        one = removed == 1
        note(f"{counted(removed, 'file')} of the earlier output {'is' if one else 'are'} gone "
             f"({display_path(gone)}{'' if one else ', …'}): {'its row is' if one else 'their rows are'} "
             "dropped.")  # fmt: skip
    return Settled(paths, reused | moved, unchecked, removed)


def _refuse_update_from_elsewhere(previous: RowsByPath, made_in: str | None) -> None:
    """Refuse an --update run from another folder than the one the earlier output was made in (`made_in`, where
    known and still there) when it names files by relative paths: read from here they name other files or none.
    Even when every photo would be found again by content under the new spelling, the rows would change their
    paths, and flip back on the next --update from the first folder."""
    if made_in is None or not os.path.isdir(made_in) or same_file(made_in, os.curdir):
        return
    relative = [path for path in previous if not os.path.isabs(path)]
    if relative:
        raise UserError(
            f"the earlier output names {counted(len(relative), 'file')} by paths relative to the folder it was made "
            f"in, {display_path(made_in)}, not this one (such as {display_path(min(relative, key=os.fsencode))}): run "
            f"--update from {display_path(made_in)}."
        )


def _with_earlier_rows(
    paths: list[str],
    previous: RowsByPath,
    keep_unlisted: bool,
    note: Note,
    seen: dict[str, Status],
) -> tuple[list[str], RowsByPath, dict[str, Ref]]:
    """The files of a run over an earlier output: `paths`, each under the spelling the earlier output gave it (so
    that its row is reused); with `keep_unlisted` (the user's --update), also the files of the earlier rows that are
    still there though not among `paths`, and apart the earlier rows kept unchecked, of files that cannot be looked
    at now (`_whereabouts`). Last, the earlier rows dropped: of files that are gone, or not among `paths` without
    `keep_unlisted`.

    With `keep_unlisted` a row is dropped only when its file is gone (and then kept if it moved: `_moved`): an
    --update over one new folder adds it to the output, and a folder that cannot be read now (an unmounted drive,
    a permission) costs no rows. To leave files out of an output on purpose, start afresh with --overwrite."""
    if not previous:
        return paths, {}, {}
    folders: dict[str, object] = {}
    earlier = {directory_entry(path, folders): path for path in previous}
    given = {earlier.get(directory_entry(path, folders), path) for path in paths}
    still, unchecked, dropped = [], {}, {}
    for path, row in previous.items():
        if path in given and not keep_unlisted:
            continue
        # Without `keep_unlisted` (a shard, a device's part) a row not among `paths` is dropped unlooked-at.
        where = _whereabouts(path, seen) if keep_unlisted else "not listed"
        if where == "there":
            still.append(path)
        elif where == "unknown":
            given.discard(path)  # a listed file that cannot be looked at now: its row stays as it was
            unchecked[path] = row
        else:  # gone, or not listed
            given.discard(path)  # a stale line of a list: the file is gone, not failed (and may have moved)
            if isinstance(row, Ref):
                dropped[path] = row
    if unchecked:
        _note_unchecked(note, list(unchecked), "looked at", "a folder that cannot be read, or a drive not mounted")
    return sorted(given.union(still, unchecked), key=os.fsencode), unchecked, dropped


def _note_unchecked(note: Note, paths: list[str], looked: str, why: str) -> None:
    """The note on rows kept unchecked, since their files cannot be `looked` (at) now: the first path, and `why`."""
    one = len(paths) == 1
    note(
        f"kept {counted(len(paths), 'row')} of the earlier output unchecked: {'its file' if one else 'their files'} "
        f"cannot be {looked} now ({display_path(min(paths, key=os.fsencode))}: {why}); a later --update checks "
        f"{'it' if one else 'them'}."
    )


def _whereabouts(path: str, seen: dict[str, Status]) -> str:
    """Of a file an earlier row names: "there" (its stat kept in `seen`), "gone", or "unknown" when it cannot be
    looked at now. Unknown: a folder on its way cannot be read, or what is left of the way is a drive that is not
    mounted: a symlink whose target is missing, a mount point missing from where drives are mounted (with the
    folders above it: /run/media is gone after a reboot with the drive unplugged), or an empty mount point there.
    An empty folder elsewhere is only a folder whose photos moved away. When in doubt, unknown: the rows are kept,
    not dropped."""
    try:
        seen[path] = Status.of(os.stat(path))
        return "there"
    except (FileNotFoundError, NotADirectoryError):
        pass
    except OSError:
        return "unknown"
    absolute = os.path.abspath(path)
    folder = absolute  # the file itself first: a photo linked on its own into a drive not mounted is kept too
    while not os.path.lexists(folder):
        folder = os.path.dirname(folder)
    if os.path.islink(folder) and not os.path.exists(folder):
        return "unknown"
    if (place := below_mount_points(absolute)) is not None:
        _, depths = place
        below = -1 if (inside := below_mount_points(folder)) is None else inside[0]  # -1: above the root
        if below in depths and ((empty := empty_folder(folder)) or os.path.ismount(folder)):
            return "unknown" if empty else "gone"  # an empty mount point; a drive mounted, its files seen
        if below < max(depths):  # /media/USER, or what is above the mount point: not the drive
            return "unknown"
    return "gone"


def _reusable(
    paths: list[str],
    in_chunks: RowsByPath,
    previous: RowsByPath,
    note: Note,
    seen: dict[str, Status],
) -> tuple[RowsByPath, list[str]]:
    """The rows of `paths` that need no new work, where the file is still the one that produced the row: from this
    run's chunks, embedded or failed, else embedded in the earlier output (--update); and of them, those kept
    without a look at their content, which cannot be read now (`_still_current`).

    A file that failed in an earlier output is tried again: the cause may be gone (a permission, a full disk, a
    --max-pixels since raised). One that failed in this run's chunks is not: a resumed run batches exactly as the
    uninterrupted one, which keeps it byte-identical."""
    found: RowsByPath = {}
    for path in paths:
        if path in in_chunks:
            found[path] = in_chunks[path]
        elif isinstance(previous.get(path), Ref):
            found[path] = previous[path]
    infos, unread = _still_current(
        {path: row.info if isinstance(row, Ref) else row for path, row in found.items()}, note, seen
    )
    reusable = {
        path: _with_info(row, infos[path]) if isinstance(row, Ref) else infos[path]
        for path, row in found.items()
        if path in infos
    }
    return reusable, unread


def _with_info(ref: Ref, info: dict) -> Ref:
    """`ref` with `info`, its facts as of today: itself where they did not change (most rows: no new Ref each)."""
    return ref if info is ref.info else ref._replace(info=info)


def _still_current(
    infos: dict[str, dict], note: Note, seen: dict[str, Status]
) -> tuple[dict[str, dict], list[str]]:
    """Of `infos` (manifest rows by path), those whose file is still the one that produced them, with today's times;
    and apart the paths of rows kept as they were, unchecked, since their files cannot be read now. `seen`: files
    already looked at by this run, not asked again.

    Size, mtime and ctime first (rows of versions before the ctime have none to compare); when only the times
    moved (a copy, a restore, a sync, a chmod; a tag edited in place with the mtime kept) the content hash decides.
    Those files are read in `HASHING_THREADS` threads, after a note when there is much to read. One that cannot be
    read (a `chmod 000`, an ACL on a share) keeps its row and its old times, as a folder that cannot be read keeps
    its rows: a permission taken away for a while cost the row, and embedding the photo again once it was back."""
    current: dict[str, dict] = {}
    touched: dict[str, Status | os.stat_result] = {}
    for path, info in infos.items():
        try:
            stat = seen.get(path) or os.stat(path)
        except OSError:
            if "error" in info and "size" not in info:  # it failed before because it was missing, and it still is
                current[path] = info
            continue
        if stat.st_size != info.get("size"):
            continue
        if all(info.get(name) == time for name, time in _times(info, stat).items()):
            current[path] = info
        elif "blake2b" in info and S_ISREG(stat.st_mode):  # a FIFO put in a photo's place would block the read
            touched[path] = stat
    size = sum(infos[path]["size"] for path in touched)
    digests = _digests(list(touched), size, note,
                       "whose times changed but not their size, to see whether their content did")  # fmt: skip
    unread = []
    for (path, stat), digest in zip(touched.items(), digests, strict=True):
        if digest == infos[path]["blake2b"]:
            current[path] = {**infos[path], **_times(infos[path], stat)}
        elif digest is None:
            current[path] = infos[path]
            unread.append(path)
    return current, unread


def _moved(pending: list[str], gone: dict[str, Ref], note: Note) -> dict[str, Ref]:
    """Rows for files of `pending` that are photos of `gone` rows under a new name (a folder renamed, files
    reorganised): the same size and content hash, so the same pixels and the same embedding. Reading a file costs
    far less than embedding it; only files of a size some gone row has are read."""
    by_size: dict[int, dict[str, Ref]] = {}
    for ref in gone.values():
        if "blake2b" in ref.info:
            by_size.setdefault(ref.info["size"], {})[ref.info["blake2b"]] = ref
    candidates: dict[str, os.stat_result] = {}
    for path in pending if by_size else []:
        try:
            stat = os.stat(path)
        except OSError:
            continue
        if S_ISREG(stat.st_mode) and stat.st_size in by_size:
            candidates[path] = stat
    digests = _digests(list(candidates), sum(s.st_size for s in candidates.values()), note,
                       "of the same size as photos that are gone, to see whether they moved")  # fmt: skip
    found = {}
    for (path, stat), digest in zip(candidates.items(), digests, strict=True):
        ref = by_size[stat.st_size].get(digest)
        if ref is not None:
            found[path] = ref._replace(info={**ref.info, "path": path, **_times(ref.info, stat)})
    if found:
        rows = "its row reused" if len(found) == 1 else "rows reused"
        note(f"{counted(len(found), 'photo')} found under a new name (moved or renamed): {rows}.")
    return found


def _digests(paths: list[str], size: int, note: Note, why: str) -> list[str | None]:
    """The content hash of each file (None where it cannot be read now), read in `HASHING_THREADS` threads, after a
    note when there is much to read. Ctrl-C stops every read within a MiB."""
    if size >= HASHING_NOTE_BYTES:
        note(f"reading {len(paths):,} files ({size / 2**30:,.1f} GiB) {why}.")
    with interrupts.stop_flag() as stop:

        def digest_or_none(path: str) -> str | None:
            try:
                return digest_of_file(path, stop)
            except OSError:
                return None  # unreadable now

        return list(look_ahead(paths, digest_or_none, depth=4 * HASHING_THREADS, threads=HASHING_THREADS))


def _times(info: dict, stat: Status | os.stat_result) -> dict[str, int]:
    """The file's times as a row records them: its mtime, and its ctime where the row has one (`stat_facts`)."""
    return {"mtime_ns": stat.st_mtime_ns, **({"ctime_ns": stat.st_ctime_ns} if "ctime_ns" in info else {})}


def _content(ref: Ref) -> tuple[int | None, str | None]:
    """What tells a photo from others without its name: its size and content hash."""
    return ref.info.get("size"), ref.info.get("blake2b")


def _refuse_relative_rows_all_lost(previous: RowsByPath, dropped: dict[str, Ref], lost: list[str]) -> None:
    """Where the folder an earlier output was made in is unknown (an output of an earlier version) or gone: refuse
    an --update that finds none of its relative paths from here when some of them are lost (`lost`: the dropped
    rows whose photo was not found under a new name either). All of them found again under new names is a renamed
    folder. The test is on the dropped rows, not the lost ones: a photo found again elsewhere (one copy in a folder
    added) does not make the other relative paths found."""
    if all(os.path.isabs(path) for path in lost):
        return
    relative = [path for path, row in previous.items() if isinstance(row, Ref) and not os.path.isabs(path)]
    if all(path in dropped for path in relative):
        raise UserError(
            f"none of the {counted(len(relative), 'photo')} the earlier output names by relative path (such as "
            f"{display_path(min(relative, key=os.fsencode))}) is found from here: run --update from the folder it "
            "was made in, or use --overwrite if they are all gone."
        )
