"""Where a run starts from: the work an earlier run left, continued or refused, and the earlier output's rows.

A run's work area (`<output>.partial/`) may hold an interrupted run's chunks (continued when its options are this
run's, refused or, with --overwrite, dropped when not), the mark of a run stopped between its final renames (finished
first), or the shards of a run on several devices. With --update, the earlier output's rows are read too, and
refused when they were made with other options or as another --shard part. Which rows are then reused, file by
file: `earlier_rows.settle`.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from . import earlier_rows
from .errors import UserError
from .outputs import (
    MANIFEST_DIGEST,
    OutputPaths,
    Ref,
    RowsByPath,
    check_outputs,
    final_metadata,
    public_row,
    read_output_metadata,
    read_output_state,
    read_rows,
    shard_text,
)
from .run_states import Difference, describe_difference, same_state
from .storage import WorkArea, remove_stale_temporaries
from .text import Note, counted


class EarlierWork(NamedTuple):
    """What a run starts from: its work area, the earlier output's rows (`_open_work`), what they and the
    interrupted run's chunks settle (`earlier_rows.settle`), and the number of the next chunk to write."""

    work: WorkArea
    previous: RowsByPath
    settled: earlier_rows.Settled
    next_seq: int


def earlier_work(
    out: OutputPaths,
    state: dict,
    paths: list[str],
    *,
    overwrite: bool,
    update: bool,
    keep_unlisted: bool,
    devices_work: Path | None,
    shard: tuple[int, int] | None,
    note: Note,
) -> EarlierWork:
    """Open the work area (`_open_work`) and settle `paths` against what earlier work left: the chunks of an
    interrupted run (damaged ones deleted, with a note) and, with --update, the earlier output's rows. A refused
    --update leaves no work area behind."""
    work, previous, made_in = _open_work(
        out, state, overwrite=overwrite, update=update, keep_unlisted=keep_unlisted, devices_work=devices_work,
        shard=shard,
    )
    remove_stale_temporaries(out.files())
    chunks, damaged = work.chunks()
    if damaged:
        note(
            f"{counted(len(damaged), 'chunk')} of the interrupted run in {out.work} could not be read (damaged "
            "since): their files are embedded again."
        )
    in_chunks = earlier_rows.chunk_rows(chunks)
    try:
        settled = earlier_rows.settle(
            paths, previous, in_chunks, made_in=made_in, keep_unlisted=keep_unlisted, note=note
        )
    except UserError:
        if not chunks:
            work.remove()
        raise
    if in_chunks:  # done: in the chunks, or (--update) kept from the earlier output
        done, total = len(settled.done), len(settled.paths)
        note(f"continuing the interrupted run in {out.work}: {done:,} of {total:,} files done.")
    next_seq = max((chunk.seq for chunk in chunks), default=-1) + 1  # a damaged chunk's number is free: it was deleted
    return EarlierWork(work, previous, settled, next_seq)


def _open_work(
    out: OutputPaths,
    state: dict,
    *,
    overwrite: bool,
    update: bool,
    keep_unlisted: bool,
    devices_work: Path | None,
    shard: tuple[int, int] | None,
) -> tuple[WorkArea, RowsByPath, str | None]:
    """The run's work area, continued or made anew, and the earlier output's rows to reuse (--update) with the
    folder it was made in (where known: `_previous_output`); a UserError refuses the run. An interrupted run with
    the same options continues, with --overwrite too (its rerun); one with other options is refused, or replaced
    with --overwrite. The work area's record of the options holds the --shard too: its chunks are of that part."""
    work = WorkArea(out.work)
    work_state = {**state, "shard": shard_text(shard)} if shard else state
    resuming, published = _tidy_earlier_work(work, out, work_state, overwrite=overwrite)
    reuse_output = update or published
    check_outputs(out, interrupted=resuming, overwrite=overwrite, update=reuse_output)
    if resuming:  # the advice follows the user's --update, not a several-device worker's (of its own shard)
        _refuse_to_continue_other_work(work, work_state, update=update and devices_work is None)
    # A run stopped while replacing the final files whose renames could not be finished (`finish_assembling`: its
    # new files gone, a mark of an earlier version) may have left a new manifest beside the old embeddings. The
    # earlier output is then read only if none of its files was replaced yet (`unreplaced`); else a run embeds again
    # what its chunks do not hold, and an --update, which would lose the rows of the files it is not given, is refused.
    trusted = not (resuming and work.assembling()) or work.unreplaced()
    if reuse_output and not trusted and keep_unlisted:
        raise UserError(
            f"{out.embeddings} was being replaced when a run stopped, and the files replacing it are gone: its rows "
            "cannot be trusted; embed all its inputs again, with --overwrite."
        )
    # Read (and so checked) before the work area is made: a refused --update must leave nothing behind.
    previous, made_in = {}, None
    if reuse_output and trusted:
        previous, made_in = _rows_to_reuse(
            out, state, shard, overwrite=overwrite, update=update, published=published, devices_work=devices_work
        )
    if not resuming:
        try:
            work.create(work_state)
        except OSError as e:
            raise UserError(f"cannot write beside {out.embeddings}: {e.strerror or e}.") from None
    return work, previous, made_in


def _rows_to_reuse(
    out: OutputPaths,
    state: dict,
    shard: tuple[int, int] | None,
    *,
    overwrite: bool,
    update: bool,
    published: bool,
    devices_work: Path | None,
) -> tuple[RowsByPath, str | None]:
    """`_previous_output`, with what becomes of an earlier output made with other options: none with --overwrite (a
    several-device shard takes both: it is replaced); refused otherwise, as "already exists" where its run had
    finished and no --update was asked, and for a several-device worker as an interrupted run of other options."""
    try:
        return _previous_output(out, state, shard)
    except _OtherOptions as e:
        if overwrite:
            return {}, None
        if published and not update:  # a finished output, made with other options: as if its run had ended
            check_outputs(out, interrupted=False, overwrite=False, update=False)  # "already exists"
            raise
        if devices_work is None:
            raise
        raise _interrupted_with_other_options(devices_work, e.difference) from None  # the user ran no --update


def _tidy_earlier_work(work: WorkArea, out: OutputPaths, state: dict, *, overwrite: bool) -> tuple[bool, bool]:
    """Tidy what an earlier run left in the work area, and say whether this run continues it (`resuming`) and whether
    it had put its output in place (`published`: its work area, stale, is removed). A work area without finished
    work is removed too; work of other options is removed with --overwrite; the shards of a run on several devices
    are refused without it."""
    work.refuse_if_closed()
    if overwrite and work.exists() and not same_state(work.state() or {}, state):
        work.remove()  # its options are others, or cannot be read: it is not this run's to continue
    work.finish_assembling()  # a run stopped between its final renames: its output is made whole, then published
    # Stopped after its last rename, before it removed its work folder (or while: `WorkArea.remove` deletes the mark
    # last): the output is whole. The rerun takes it as an --update does, so it ends as the first run would have.
    published = work.published(out.embeddings)
    devices = work.device_count()
    # A run stopped before it saved a batch (on one device or several) left nothing to continue: its options, a
    # record alone, must not hold this run to them.
    if published or ((work.exists() or devices) and not out.work_kept()):
        work.remove()
        return False, published
    if devices and not overwrite:  # its shards are not ours to throw away
        raise interrupted_on_other_devices(out.work, devices)
    return work.exists(), False


def _refuse_to_continue_other_work(work: WorkArea, state: dict, *, update: bool) -> None:
    """Refuse to continue an interrupted run whose options differ from this one's, or cannot be read."""
    earlier = work.state()
    if earlier is None:
        raise UserError(
            f"{work.directory} holds an interrupted run whose record of its options (state.json) cannot be read: "
            f"{_afresh(work.directory, update=update)}."
        )
    if not same_state(earlier, state):
        raise _interrupted_with_other_options(work.directory, describe_difference(earlier, state), update=update)


class _OtherOptions(UserError):
    def __init__(self, message: str, *, difference: Difference):
        super().__init__(message)
        self.difference = difference


def _previous_output(
    out: OutputPaths, state: dict, shard: tuple[int, int] | None
) -> tuple[RowsByPath, str | None]:
    """The rows of an existing output, for --update (refused if it was made with other options), and the folder it
    was made in: where its relative paths start (None from versions that did not say).

    An output stays the part it is: with another --shard than it was made with (or one where it had none), an
    --update would keep only the rows of the new part and drop the rest without a word (half a library, for a flag
    added by mistake), or turn one part into another."""
    if not out.embeddings.exists():
        return {}, None
    metadata = read_output_metadata(out)
    then, now = metadata.get("shard"), shard_text(shard)
    if then != now:
        made = f"made with --shard {then}" if then else "made without --shard"
        given = f"--shard {now}" if now else "no --shard"
        raise UserError(
            f"{out.embeddings} was {made}, and this --update has {given}: update it as it was made, or embed "
            "afresh with --overwrite."
        )
    old = read_output_state(out, metadata)
    if not same_state(old, state):
        difference = describe_difference(old, state)
        then = _what_to_do(
            difference, again="rerun --update with the same options", afresh="use --overwrite to embed everything again"
        )
        message = f"{out.embeddings} was made with other options ({difference.options}): {then}"
        raise _OtherOptions(message, difference=difference)
    return earlier_rows.by_path(*read_rows(out)), metadata.get("working_directory")


def as_it_was(
    out: OutputPaths, previous: RowsByPath, good: list[Ref], bad: list[dict], metadata: dict[str, str]
) -> bool:
    """Whether the output would be written again as it is (`previous`: its rows, --update): every row read from
    it, in its order and with its facts, the same failures, the same metadata. A nightly --update of a library
    that did not change then writes nothing: not 3 GB of B/16 embeddings for a million photos, nor a changed file
    for the backup to copy."""
    if not previous:
        return False
    kept = [row for row in previous.values() if isinstance(row, Ref)]
    failed = [row for row in previous.values() if not isinstance(row, Ref)]
    return (
        len(good) == len(kept)
        and all(a.reader is b.reader and a.index == b.index and a.info == b.info for a, b in zip(good, kept))
        and [public_row(row) for row in bad] == [public_row(row) for row in failed]
        # What `assemble` would write, but for the digest of the manifest, which the rows compared above settle.
        and _without_digest(read_output_metadata(out)) == final_metadata(metadata, len(good))
    )


def _without_digest(metadata: dict[str, str]) -> dict[str, str]:
    return {key: value for key, value in metadata.items() if key != MANIFEST_DIGEST}


def interrupted_on_other_devices(work: Path, devices: int) -> UserError:
    """The refusal of a rerun on another number of devices than the interrupted run in `work` had."""
    again = "on one --device" if devices == 1 else f"with {devices} --device"
    return UserError(
        f"{work} holds a run interrupted on {'one device' if devices == 1 else f'{devices} devices'}: rerun it "
        f"{again} to continue, or add --overwrite to start afresh."
    )


def _interrupted_with_other_options(work: Path, difference: Difference, *, update: bool = False) -> UserError:
    """The refusal of a run whose work area holds an interrupted one with other options. An --update cannot start
    afresh (--overwrite would drop the earlier output's rows too): its user deletes the work area instead."""
    then = _what_to_do(difference, again="rerun with the same options to continue", afresh=_afresh(work, update=update))
    return UserError(f"{work} holds an interrupted run whose options differ ({difference.options}): {then}")


def _afresh(work: Path, *, update: bool) -> str:
    """How to drop the interrupted run in `work`: --overwrite, which an --update cannot take (it would drop the
    earlier output's rows too), or deleting the folder."""
    return f"delete {work} to drop it" if update else "add --overwrite to start afresh"


def _what_to_do(difference: Difference, *, again: str, afresh: str) -> str:
    """The advice of a refusal of work made with other options (`describe_difference`): give them `again`, or start
    `afresh`; of a checkpoint saved over only the latter, since no option brings it back."""
    if difference.saved_over:
        return f"the checkpoint has changed since (saved again, or its config files corrected); {afresh}."
    return f"{again}, or {afresh}."
