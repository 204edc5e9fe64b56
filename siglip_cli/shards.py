"""Splitting a run into disjoint parts (shards) across machines or GPUs, and joining their outputs.

A file's shard is a hash of its path as found (`./photos/a.jpg` and `photos/a.jpg` alike), so its membership never
changes when other files come and go, and every machine that lists the same inputs agrees on the split without
talking to the others. Each part records its inputs as given: `merge` refuses parts that named them differently
(`photos` on one machine, `/data/photos` or `../photos` on another), whose rows would overlap and miss files.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

from .errors import UserError
from .files import WalkReport, directory_entry
from .locks import OutputBusy, exclusive, kept_from_writers
from .outputs import (
    OutputPaths,
    Ref,
    assemble,
    check_outputs,
    read_output_metadata,
    read_output_state,
    read_rows,
)
from .run_states import as_recorded_by_all, describe_difference, same_state
from .storage import Steps, WorkArea, remove_stale_temporaries
from .text import counted, display_path


def parse_shard(spec: str | None, num_shards: int | None, environ: Mapping[str, str] = os.environ) -> tuple[int, int] | None:
    """`K/N`, or `auto` (the index from Slurm or Kubernetes, the count from Slurm or `num_shards`) → (K, N).
    Under Slurm, an array of fewer tasks than `num_shards` is a rerun of some parts: see `_shard_from_environment`."""
    if spec is None:
        if num_shards is not None:
            raise UserError("--num-shards goes with --shard auto.")
        return None
    if spec == "auto":
        return _shard_from_environment(num_shards, environ)
    try:
        index, count = (int(part) for part in spec.split("/"))
    except ValueError:
        raise UserError(f"--shard {spec!r} is not of the form K/N (for example 0/4) or auto.") from None
    if num_shards is not None and num_shards != count:
        raise UserError(f"--shard {spec} says {count} shards but --num-shards says {num_shards}: give one of the two.")
    if count < 1:
        raise UserError(f"--shard {spec}: N, the number of shards, must be at least 1.")
    if not 0 <= index < count:
        raise UserError(f"--shard {spec}: K must be between 0 and N-1.")
    return index, count


def _shard_from_environment(num_shards: int | None, environ: Mapping[str, str]) -> tuple[int, int]:
    def number(name: str, default: int, least: int = 0) -> int:
        value = environ.get(name, str(default))
        if not value.strip().isdigit() or int(value) < least:
            raise UserError(f"--shard auto: {name} is {value!r}, not a whole number of at least {least}.")
        return int(value)

    if "SLURM_ARRAY_TASK_ID" in environ:
        # Array ids need not start at 0 (--array=1-8) nor step by 1 (--array=0-15:2).
        task = number("SLURM_ARRAY_TASK_ID", 0)
        first = number("SLURM_ARRAY_TASK_MIN", 0)
        step = number("SLURM_ARRAY_TASK_STEP", 1, least=1)
        tasks = number("SLURM_ARRAY_TASK_COUNT", 0)  # 0: not said
        index, count, source = (task - first) // step, num_shards or tasks, "SLURM_ARRAY_TASK_ID"
        if num_shards is not None and 0 < tasks < num_shards:
            # Fewer tasks than parts: a rerun of some (`--array=3,5` of 0-7), whose ids are the parts they redo.
            if task >= num_shards:
                raise UserError(
                    f"--shard auto: this array has {tasks} of the {num_shards} tasks --num-shards gives, so its task "
                    f"ids are taken as the parts they redo, and {task} is not below {num_shards} (rerun parts of an "
                    f"array numbered 0 to {num_shards - 1})."
                )
            index = task
        elif num_shards is not None and tasks > num_shards:
            raise UserError(f"--shard auto: the Slurm array has {tasks} tasks but --num-shards says {num_shards}.")
    elif "JOB_COMPLETION_INDEX" in environ:  # Kubernetes indexed Job; the count is the Job's `completions`
        index, count, source = number("JOB_COMPLETION_INDEX", 0), num_shards or 0, "JOB_COMPLETION_INDEX"
    else:
        raise UserError(
            "--shard auto found neither SLURM_ARRAY_TASK_ID nor JOB_COMPLETION_INDEX; pass --shard K/N instead."
        )
    if count < 1:
        raise UserError(f"--shard auto read the index from {source} but not the count: add --num-shards N.")
    if not 0 <= index < count:
        raise UserError(f"--shard auto: index {index} from {source} is not below the shard count {count}.")
    return index, count


def shard_of(path: str, count: int) -> int:
    digest = hashlib.blake2b(os.fsencode(os.path.normpath(path)), digest_size=8).digest()
    return int.from_bytes(digest, "big") % count


def shard_inputs(inputs: list[str], walk: WalkReport | None = None) -> tuple[str, ...]:
    """What a part records of its inputs: each as given, normalized as `shard_of` normalizes paths, in sorted order
    (the order does not change a file's part); of a --files-from list (`walk`), its paths' count and digest, not its
    name: `-` on every machine may be another list, and one list may have another name on each."""
    listed = sorted(os.path.normpath(name) for name in inputs)
    if walk is None or not walk.listed_digest:
        return tuple(listed)
    return (*listed, f"--files-from: {counted(walk.listed_distinct, 'path')} (blake2b {walk.listed_digest})")


def _check_same_inputs(opened: list[tuple[OutputPaths, dict[str, str]]]) -> None:
    """Refuse parts that named their inputs differently: each hashed other spellings of the same paths, so their
    rows overlap and miss files. Parts that record nothing (older, or several devices' own shards) are not checked."""
    recorded = [(out, meta["inputs"]) for out, meta in opened if "inputs" in meta]
    for out, inputs in recorded[1:]:
        first, theirs = recorded[0]
        if inputs != theirs:
            raise UserError(
                f"{out.embeddings} was made from other inputs ({_listed(inputs)}) than {first.embeddings} "
                f"({_listed(theirs)}): a file's part is a hash of its path as found, so every part must name the "
                "same inputs the same way (from the same folder), or their rows overlap and miss files."
            )


def _listed(inputs: str) -> str:
    return ", ".join(json.loads(inputs)) or "no inputs"


def select_shard(paths: list[str], index: int, count: int) -> list[str]:
    return [path for path in paths if shard_of(path, count) == index]


@dataclass
class MergeSummary:
    rows: int
    failed: int
    inputs: int
    output: str
    manifest: str
    errors: str | None

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _check_every_part(opened: list[tuple[OutputPaths, dict[str, str]]], *, allow_missing: bool) -> None:
    """Refuse a merge of `--shard K/N` outputs of different splits, or that holds a part twice, or (unless
    `allow_missing`) lacks one, or mixes parts with outputs that do not say which part they are. Those (whole runs,
    older versions) are not checked among themselves."""
    parts = [meta.get("shard") for _, meta in opened]
    if any(part is None for part in parts):
        if any(part is not None for part in parts):  # p0 of a split and another folder's run hid part 1 missing
            split, whole = next(i for i, part in enumerate(parts) if part is not None), parts.index(None)
            raise UserError(
                f"{opened[split][0].embeddings} is part {parts[split]} of a --shard run, and "
                f"{opened[whole][0].embeddings} is not a part (a whole run, or one of a version that did not record "
                "its part): merge the parts of one run."
            )
        return
    numbers = [re.fullmatch(r"(\d+)/(\d+)", part) for part in parts]
    for (out, _), part, match in zip(opened, parts, numbers):
        if not match:
            raise UserError(f"{out.embeddings}'s metadata gives its part as {part!r}, not K/N: it was not written by "
                            "siglip embed --shard.")  # fmt: skip
    splits = sorted({int(match[2]) for match in numbers})
    if len(splits) > 1:
        raise UserError(f"these outputs are parts of different splits (into {' and '.join(map(str, splits))}).")
    count = splits[0]
    given = [int(match[1]) for match in numbers]
    twice = sorted({k for k in given if given.count(k) > 1})
    if twice:
        raise UserError(f"part {twice[0]}/{count} is given twice: these outputs overlap.")
    missing = sorted(set(range(count)) - set(given))
    if missing and not allow_missing:
        names = ", ".join(f"{k}/{count}" for k in missing)
        what = f"parts {names} are" if len(missing) > 1 else f"part {names} is"
        raise UserError(f"{what} missing: merge all {count} parts, or add --allow-missing for a partial result.")


def _merged_start(opened: list[tuple[OutputPaths, dict[str, str]]]) -> tuple[str | None, bool]:
    """The folder the merge's relative paths start from (its `working_directory`; None for none), and whether the
    parts' relative paths are rebased onto it.

    Parts made in one folder keep it. The parts of one `--shard` run (the same inputs, recorded) name their files the
    same way from wherever each ran (another machine, the photos mounted elsewhere): their paths are kept as they are,
    from no one folder. Other outputs made in several folders name their files from each: `four.gif` made in
    `lib/b` beside `lib/one.jpg` made in `.` would read as a file gone to the next --update, which dropped its row.
    Their relative paths are rebased onto the first part's folder (`_rebased`). A part that did not record its
    folder (an older version, a folder whose name is not UTF-8) leaves its paths as they are."""
    starts = [metadata.get("working_directory") for _, metadata in opened]
    if len(set(starts)) == 1:
        return starts[0], False
    one_run = all("shard" in metadata and "inputs" in metadata for _, metadata in opened)
    if one_run or None in starts:
        return None, False
    return starts[0], True


def _rebased(path: str, start: str, onto: str) -> str:
    """`path`, relative to the folder `start` (or absolute), as named from the folder `onto`."""
    if os.path.isabs(path) or start == onto:
        return path
    joined = os.path.join(start, path)
    if ".." in path.split(os.sep):  # only the file system knows where `..` after a folder link leads (`tidy_path`)
        return joined
    try:
        return os.path.relpath(joined, onto)
    except ValueError:  # on another drive (Windows)
        return joined


def _disjoint_rows(
    opened: list[tuple[OutputPaths, dict[str, str]]], rebase_onto: str | None
) -> tuple[list[Ref], list[dict]]:
    """The parts' embedded rows and error rows, each sorted by path as a single run sorts them; a file in two parts
    is refused: the outputs are not disjoint shards of one run. A file is told apart as `embed` tells it (its
    folder's identity and its name, a relative path from where its part was made), so that it is one file in two
    spellings too: `photos/a.jpg` and `/home/me/photos/a.jpg`, or through a folder link. `rebase_onto`: the folder
    the relative paths of every part are rebased onto (`_merged_start`)."""
    owner: dict[tuple[object, str], tuple[str, Path]] = {}
    folders: dict[str, object] = {}
    good: list[Ref] = []
    bad: list[dict] = []
    for out, metadata in opened:
        refs, errors = read_rows(out)
        start = metadata.get("working_directory", "")
        for path in [ref.info["path"] for ref in refs] + [row["path"] for row in errors]:  # as its part names it
            entry = directory_entry(os.path.join(start, path), folders)
            if entry in owner:
                first, where = owner[entry]
                spelled = "" if first == path else f" (as {display_path(first)})"
                raise UserError(
                    f"{display_path(path)} is in both {where}{spelled} and {out.embeddings}: these outputs overlap, so "
                    "they are not disjoint shards of one run."
                )
            owner[entry] = (path, out.embeddings)
        if rebase_onto is not None:
            refs = [ref._replace(info={**ref.info, "path": _rebased(ref.info["path"], start, rebase_onto)})
                    for ref in refs]  # fmt: skip
            errors = [{**row, "path": _rebased(row["path"], start, rebase_onto)} for row in errors]
        good += refs
        bad += errors
    good.sort(key=lambda ref: os.fsencode(ref.info["path"]))
    bad.sort(key=lambda row: os.fsencode(row["path"]))
    if bad and not good:  # as `siglip embed` refuses a run that embedded nothing: a list that named no file here
        first = f"{display_path(bad[0]['path'])}: {bad[0]['error']}".removesuffix(".")
        failed = f"none of the {len(bad):,} files of these outputs could" if len(bad) > 1 else "the one file could not"
        raise UserError(f"{failed} be embedded ({first}): there is nothing to merge.")
    return good, bad


def open_output(path: Path) -> tuple[OutputPaths, dict[str, str]]:
    """A finished output's files and header metadata."""
    named = Path(os.path.realpath(path)) if os.path.islink(path) else path  # a link takes its target's format
    if named.suffix.lower() not in (".safetensors", ".npy"):  # OutputPaths would call it the output
        raise UserError(f"{path} is not a siglip output: give the .safetensors or .npy files of the shards.")
    out = OutputPaths.for_output(path)
    if not out.embeddings.is_file() or not out.manifest.is_file():
        raise UserError(f"{path} is not a finished siglip output (it or its manifest {out.manifest} is missing).")
    # A part whose run (an --update) was stopped between its renames may hold a new manifest beside its old
    # embeddings: read, two photos swapped kept each other's vectors in the merge. Its own rerun finishes it; the
    # merge does not write its inputs (they may be on a mount it cannot write).
    work = WorkArea(out.work)
    if work.assembling() and not work.published(out.embeddings) and not work.unreplaced():
        raise UserError(
            f"{path} was being replaced when its run stopped, and is half new, half old: rerun that run (siglip embed "
            f"... -o {path}, with the same options) to finish it, then merge."
        )
    metadata = read_output_metadata(out)
    if "options" not in metadata:
        raise UserError(f"{path} has no siglip metadata; it was not written by siglip embed.")
    return out, metadata


def merge_outputs(
    inputs: list[Path],
    output: Path,
    *,
    overwrite: bool = False,
    allow_missing: bool = False,
    before_replacing: Callable[[Steps], None] = lambda steps: None,
    hold_lock: bool = True,
) -> MergeSummary:
    """Join outputs of disjoint shards into one, equal to a single run over all their files.

    Outputs of `--shard K/N` say which part they are: a merge that lacks one of the N parts is refused unless
    `allow_missing` (a partial result, on purpose). `before_replacing`: as for `outputs.assemble`. The output's lock
    is held as a run's is (`hold_lock=False`: the caller holds it, a several-device run)."""
    if not inputs:
        raise UserError("give the shard outputs to merge.")
    target = OutputPaths.for_output(output)
    if not hold_lock:
        return _merge(inputs, target, overwrite, allow_missing, before_replacing)
    with exclusive(target.embeddings):
        area = _merge_work_area(target)

        def marked(steps: Steps) -> None:
            area.directory.mkdir(exist_ok=True)
            area.mark_assembling(steps)
            before_replacing(steps)

        summary = _merge(inputs, target, overwrite, allow_missing, marked)
        area.remove()  # its mark last
        return summary


def _merge_work_area(target: OutputPaths) -> WorkArea:
    """The work folder where a merge marks that it is replacing the final files, as a run marks it. A merge stopped
    between its renames (a `kill -9`, a power cut, a file that could not be replaced) leaves a new manifest beside
    the old embeddings, which an --update would take for the truth about them (the wrong photo's vector under a
    path): the mark makes the next merge, run or --update of the output finish those renames first
    (`finish_assembling`). An interrupted run's work there (its options and chunks, or a several-device run's
    shards) is not the merge's to throw away, and is refused."""
    area = WorkArea(target.work)
    area.refuse_if_closed()
    area.finish_assembling()
    if not area.published(target.embeddings) and (area.exists() or area.device_count()):
        raise UserError(
            f"{display_path(str(target.work))} holds the work of an interrupted siglip embed into {target.embeddings}: "
            f"rerun that embed to finish it, or remove {display_path(str(target.work))}, before merging into it."
        )
    area.remove()  # an earlier merge's mark, its renames done (or past finishing: this merge writes every file)
    return area


def _merge(
    inputs: list[Path],
    target: OutputPaths,
    overwrite: bool,
    allow_missing: bool,
    before_replacing: Callable[[Steps], None],
) -> MergeSummary:
    output = target.embeddings
    if any(Path(p).resolve() == output.resolve() for p in inputs):
        raise UserError(f"{output} is one of the inputs; write the merge to another file.")
    if output.exists() and not overwrite:
        raise UserError(f"{output} already exists: add --overwrite to replace it.")
    check_outputs(target, interrupted=False, overwrite=overwrite, update=False)  # another output's manifest, ...
    remove_stale_temporaries(target.files())
    with contextlib.ExitStack() as parts_held:
        held: set[Path] = set()
        for part in inputs:  # no run replaces a part's files while they are read (an --update of it, say)
            try:
                embeddings = OutputPaths.for_output(part).embeddings
            except UserError:  # no output's name: `open_output` says what it is instead
                continue
            # One missing is refused as such there, with no lock file (nor its folder) made for it; one given twice
            # is locked once, and refused as given twice.
            if not embeddings.exists() or (real := embeddings.resolve()) in held:
                continue
            held.add(real)
            try:
                parts_held.enter_context(kept_from_writers(embeddings))
            except OutputBusy:
                raise UserError(f"another siglip run is writing {part}: wait for it to finish, then merge.") from None
        return _merge_held(inputs, target, allow_missing, before_replacing)


def _merge_held(
    inputs: list[Path], target: OutputPaths, allow_missing: bool, before_replacing: Callable[[Steps], None]
) -> MergeSummary:
    opened = [open_output(Path(p)) for p in inputs]
    # The format is how the rows are stored, not how they were computed: .npy and .safetensors parts merge.
    states = [{**read_output_state(out), "format": None} for out, _ in opened]
    for (out, _), state in zip(opened[1:], states[1:]):
        if not same_state(states[0], state):
            raise UserError(
                f"{out.embeddings} and {opened[0][0].embeddings} were made with different options "
                f"({describe_difference(states[0], state).options}); only outputs of the same run can be merged."
            )
    _check_same_inputs(opened)
    _check_every_part(opened, allow_missing=allow_missing)
    start, rebased = _merged_start(opened)
    good, bad = _disjoint_rows(opened, start if rebased else None)
    metadata = dict(opened[0][1])
    metadata.pop("shard", None)  # the merge is the whole run
    metadata.pop("inputs", None)
    if start is None:  # no one folder for relative paths to start from
        metadata.pop("working_directory", None)
    metadata["options"] = json.dumps({**as_recorded_by_all(states), "format": target.format}, sort_keys=True)
    assemble(target, good, bad, metadata, before_replacing=before_replacing)
    return MergeSummary(
        rows=len(good),
        failed=len(bad),
        inputs=len(inputs),
        output=str(target.embeddings),
        manifest=str(target.manifest),
        errors=str(target.errors) if bad else None,
    )
