"""A run's output files: their names, reading a finished one back, and writing the final files from its rows.

`OUT.safetensors` (or `OUT.npy` with `OUT.tokens.npy` and `OUT.meta.json`), the manifest `OUT.jsonl`, and
`OUT.errors.jsonl`. Each is written atomically, the manifest and errors file first and the embeddings file last,
so an existing embeddings file means the run that wrote it finished.
"""

from __future__ import annotations

import errno
import json
import os
import re
import stat
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, NamedTuple

import numpy as np
from safetensors import SafetensorError

from . import __version__, interrupts
from .config import json_kind
from .errors import UserError
from .files import expand_home, path_fields, path_from_fields, same_file
from .storage import (
    CHUNK_NAME,
    SHARD_NAME,
    NpyRows,
    RowReader,
    SafetensorsRows,
    Steps,
    TensorSpec,
    jsonl_digest,
    open_safetensors,
    read_jsonl,
    replaced_together,
    write_jsonl,
    write_npy,
    write_safetensors,
)
from .text import display_path

if TYPE_CHECKING:  # the weights module imports torch: 2.5 s that `siglip merge` has no use for
    from .checkpoints import Checkpoint


OUTPUT_DTYPES = {"float32": np.float32, "float16": np.float16}
BLOCK_BYTES = 32 << 20  # rows are copied into the final file in blocks of about this size
# Rows of one source this close are read in one read, the rows between them with them: reading 64 KiB costs about
# what opening the file again does (a local disk's 50 µs; a share's round trip, 1 ms, is more than its 0.6 ms at
# 100 MB/s), so a sparse source (an --update's earlier output where most photos changed) is read at most that much
# more than it needs.
GAP_BYTES = 64 << 10


@dataclass(frozen=True)
class OutputPaths:
    embeddings: Path
    manifest: Path
    errors: Path
    tokens: Path | None  # `.npy` outputs keep tokens (--tokens) in a file of their own
    meta: Path | None  # `.npy` has no header: the run's metadata goes beside it
    work: Path

    @classmethod
    def for_output(cls, output: str | os.PathLike) -> OutputPaths:
        output = Path(expand_home(output))
        if os.path.islink(output):  # written through, as `cp` does: the link stays, and the files sit by its target
            output = _link_target(output)
        suffix = output.suffix.lower()
        if _is_dir(output):
            raise UserError(f"output {output} is a folder; give a file name (ending in .safetensors or .npy) for -o.")
        if output.name.lower() in (".safetensors", ".npy"):
            raise UserError(f"output {output} has no name before its extension: give one, as in -o photos{output.name}.")
        if suffix not in (".safetensors", ".npy"):
            raise UserError(f"output {output} must end in .safetensors or .npy.")
        stem = output.with_suffix("")
        npy = suffix == ".npy"
        paths = cls(
            embeddings=output,
            manifest=output.with_suffix(".jsonl"),
            errors=stem.with_name(stem.name + ".errors.jsonl"),
            tokens=stem.with_name(stem.name + ".tokens.npy") if npy else None,
            meta=stem.with_name(stem.name + ".meta.json") if npy else None,
            work=output.with_name(output.name + ".partial"),
        )
        paths._check_name_lengths()
        return paths

    def _check_name_lengths(self) -> None:
        """Refuse an output name too long for the files written beside it (their temporaries add a dot, a process
        id and `.tmp`) before any work, not when the first of them is written."""
        names = [self.work.name] + [f".{p.name}.{2**22}.tmp" for p in self.files()]
        try:
            limit = os.pathconf(self.embeddings.parent if self.embeddings.parent.is_dir() else ".", "PC_NAME_MAX")
        except (OSError, ValueError):
            limit = 255
        longest = max(names, key=lambda name: len(os.fsencode(name)))
        if len(os.fsencode(longest)) > limit:
            raise UserError(
                f"output name {self.embeddings.name!r} is too long: files written beside it, such as {longest!r}, "
                f"would pass the {limit} bytes a file name may have there; choose a shorter -o."
            )

    @property
    def format(self) -> str:
        return "npy" if self.meta is not None else "safetensors"

    def files(self) -> list[Path]:
        """The final files a run writes (those of this format)."""
        return [p for p in (self.manifest, self.errors, self.tokens, self.meta, self.embeddings) if p is not None]

    def entries(self) -> frozenset[tuple[tuple[int, int], str]]:
        """The directory entries (folder's device and inode, name) of the run's files and work folder, for a folder
        walk to pass by: an output kept in the folder it embeds was "passed over" by every --update."""
        try:
            folder = os.stat(self.embeddings.parent)
        except OSError:  # not made yet: nothing of ours to meet
            return frozenset()
        return frozenset(((folder.st_dev, folder.st_ino), p.name) for p in [*self.files(), self.work])

    def work_kept(self) -> bool:
        """Whether the work area holds finished work that a rerun continues from: chunks of embedded batches, or
        a several-device run's finished shards and their chunks."""
        work = self.work
        chunks = [*work.glob("chunk-*"), *work.glob("shard-*/chunk-*")]
        shards = [p for p in work.glob("shard-*") if SHARD_NAME.match(p.name)]
        return any(CHUNK_NAME.fullmatch(p.name) for p in chunks) or any(p.is_file() for p in shards)

    def kept_work(self, rerun: str) -> str | None:
        """'finished work is kept in OUT.partial: {rerun} to continue', the clause of a stopped run's sentence where
        its work area holds finished work (`work_kept`); None where a rerun would start afresh."""
        return f"finished work is kept in {self.work}: {rerun} to continue" if self.work_kept() else None


def _link_target(link: Path) -> Path:
    """The output an `-o` link leads to. Not through a link into a folder that is missing (an unmounted drive: the
    output would land on the disk under its mount point), nor to a file of another kind."""
    target = Path(os.path.realpath(link))
    if not target.parent.is_dir():
        raise UserError(f"output {link} is a link to {target}, whose folder does not exist (an unmounted drive?).")
    kind = target.suffix.lower()
    if kind not in (".safetensors", ".npy") or (link.suffix and link.suffix.lower() != kind):  # `latest` → x.npy: fine
        raise UserError(f"output {link} is a link to {target}, a file of another kind: give -o a name of its own.")
    return target


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError:  # a name too long: said with its limit once the side files' names are known
        return False


def check_outputs(
    out: OutputPaths, *, interrupted: bool, overwrite: bool, update: bool, update_allowed: bool = True
) -> None:
    """Refuse to replace a finished output, or files beside it that are the user's, unless told to; and refuse
    always to take the manifest of the other format's output of the same name. `update_allowed`: whether the
    refusal may suggest --update (several devices take none)."""
    if other := _sharing_the_manifest(out):
        raise UserError(
            f"{other} has its manifest in {out.manifest}, which this run would replace: choose another -o, or "
            f"remove {other} first."
        )
    # Names that meet: `-o x.npy` keeps its tokens in x.tokens.npy, which may be an output of its own; `-o x` writes
    # (or removes) x.errors.jsonl, the manifest of `-o x.errors.safetensors`, and the other way round. Another
    # output's files are never ours to replace or remove, even with --overwrite.
    if claimed := _claimed_by_another(out):
        path, owner = claimed
        what = "another output" if path == owner else f"a file of another output, {owner}"
        ours = f", and {out.embeddings} would write or remove a file of its own under that name"
        ours = "" if path == out.embeddings else ours
        raise UserError(f"{path} is {what}{ours}: choose another -o, or remove {owner} first.")
    if overwrite or (update and out.embeddings.exists()):
        _refuse_files_only_their_owner_may_replace(out)
        return
    if out.embeddings.exists():
        refresh = ", or --update to refresh it" if update_allowed else " (--update runs on one device)"
        raise UserError(f"{out.embeddings} already exists: add --overwrite to replace it{refresh}.")
    # The manifest and errors files of an interrupted run are ours to replace, and so is the errors file of a run
    # that could embed nothing (the only file it writes); anything else is the user's.
    if not interrupted:
        for path in (out.manifest, out.errors, out.tokens, out.meta):
            if path is not None and path.exists() and not (path == out.errors and _only_errors_of_ours(path)):
                raise UserError(f"{path} already exists and would be replaced: add --overwrite, or choose another -o.")
    _refuse_files_only_their_owner_may_replace(out)  # an errors file of ours, an interrupted run's manifest


def _refuse_files_only_their_owner_may_replace(out: OutputPaths) -> None:
    """In a sticky folder (/tmp, a shared scratch folder: mode 1777) only a file's owner, or the folder's, may replace
    it. An output there that another user wrote was refused only at its last rename, once every file was embedded."""
    if not hasattr(os, "geteuid") or os.geteuid() == 0:
        return
    try:
        folder = os.stat(out.embeddings.parent)
    except OSError:
        return
    if not folder.st_mode & stat.S_ISVTX or folder.st_uid == os.geteuid():
        return
    for path in out.files():
        try:
            owner = os.stat(path).st_uid
        except OSError:
            continue
        if owner != os.geteuid():
            raise UserError(
                f"{path} belongs to another user, and in {path.parent}, a sticky folder (like /tmp), only its owner "
                "may replace it: choose another -o."
            )


def refuse_inputs_among_outputs(out: OutputPaths, paths: Iterable[str], *, every: bool = False) -> None:
    """A file named explicitly is taken whatever its name, so an input may be one of the files this run writes:
    `siglip embed img.npy -o img.npy --overwrite` replaced the image with its own embedding. Refused, naming it.

    Inputs named like one of the output's files (in any case: macOS's disks ignore it) are compared with them as
    files, one stat each: cheap over a million paths. With `every`, each of `paths` is: for those given on the
    command line and the links a walk met (`WalkReport.links`), where one may be another name for the output."""
    written: dict[tuple[int, int], Path] = {}
    for file in out.files():
        try:
            info = os.stat(file)
        except OSError:
            continue
        written[info.st_dev, info.st_ino] = file
    if not written:
        return
    names = tuple(file.name.casefold() for file in written.values())
    for path in paths:
        if not (every or path.casefold().endswith(names)):
            continue
        try:
            info = os.stat(path)
        except OSError:
            continue
        if (info.st_dev, info.st_ino) in written:
            raise UserError(
                f"{display_path(path)} is one of the inputs, and -o {out.embeddings} writes a file of its own there: "
                "choose another -o."
            )


# The files an output keeps beside it, by the end of their name, and the formats of the outputs that write each.
SIDE_FILES = {".errors.jsonl": (".safetensors", ".npy"), ".tokens.npy": (".npy",), ".meta.json": (".npy",)}


def _sharing_the_manifest(out: OutputPaths) -> Path | None:
    """Another output beside this one with the same manifest: of the other format (`x.npy` for `-o
    x.safetensors`), or of this one with its extension in another case (`x.NPY` for `-o x.npy`), all of which keep
    their rows' paths in x.jsonl."""
    folder = out.embeddings.parent
    names = {out.embeddings.stem.lower() + suffix for suffix in (".npy", ".safetensors")}
    try:
        with os.scandir(folder) as entries:  # one listing, however the extension is spelt
            found = [Path(folder, e.name) for e in entries if e.name.lower() in names and e.name != out.embeddings.name]
    except OSError:  # a folder yet to be made: nothing beside the output
        return None
    for other in found:
        manifest = other.with_suffix(".jsonl")  # the same name, or another for a disk blind to case (macOS)
        if (manifest == out.manifest or same_file(manifest, out.manifest)) and not same_file(other, out.embeddings):
            return other
    return None


def _claimed_by_another(out: OutputPaths) -> tuple[Path, Path] | None:
    """A file that this run writes or removes and that is one of another finished output's files (one with its
    manifest): (that file, that output's embeddings file)."""
    for path in out.files():  # the embeddings file too: `-o x.tokens.npy` beside `-o x.npy`
        name = path.name
        owners = [path, path.with_suffix(".safetensors"), path.with_suffix(".npy")]  # its embeddings, its manifest
        for role, formats in SIDE_FILES.items():  # or a side file of its own
            if name.endswith(role) and len(name) > len(role):
                owners += [path.with_name(name.removesuffix(role) + suffix) for suffix in formats]
        for owner in owners:
            if owner == out.embeddings or owner.suffix not in (".safetensors", ".npy") or not owner.is_file():
                continue
            try:
                theirs = OutputPaths.for_output(owner)
            except UserError:
                continue
            if path in theirs.files() and theirs.manifest.is_file():
                return path, owner
    return None


def _only_errors_of_ours(path: Path) -> bool:
    """Whether `path` reads as an errors file siglip wrote: JSON lines, each a file's path and its error."""
    try:
        rows = read_jsonl(path)
    except (OSError, ValueError):
        return False
    return bool(rows) and all(isinstance(r, dict) and "error" in r and ("path" in r or "path_bytes_b64" in r) for r in rows)


class Ref(NamedTuple):
    """Where a finished row lives: a reader over a chunk (or previous output) and the row's index there."""

    reader: RowReader
    index: int
    info: dict


# The rows of a run by the path of their file: a `Ref` for a file embedded, its error row for one that failed.
RowsByPath = dict[str, Ref | dict]


@contextmanager
def _reading(out: OutputPaths) -> Iterator[None]:
    """A finished output that cannot be read back (truncated, a file beside it deleted or damaged) is one sentence
    for `--update` and `merge`, not a traceback."""
    try:
        yield
    except (OSError, ValueError, IndexError, SafetensorError) as e:
        if isinstance(e, OSError) and e.filename is not None:
            failed = os.fsdecode(e.filename)
            reason = f"{display_path(failed)}: {e.strerror or e}" if Path(failed) != out.embeddings else e.strerror or e
        else:
            reason = re.sub(r"\s+", " ", str(e)).strip() or type(e).__name__
        # Of these the files are whole: embedding them again would not help.
        remedy = _NOT_THE_FILES.get(e.errno) if isinstance(e, OSError) else None
        if remedy:
            raise UserError(f"cannot read {out.embeddings} back ({reason}): {remedy}, and rerun.") from None
        raise UserError(
            f"cannot read {out.embeddings} back as a siglip output ({reason}): embed it again (--overwrite)."
        ) from None


_NOT_THE_FILES = {
    errno.EMFILE: "raise the limit of open files (ulimit -n)",
    errno.ENFILE: "close other programs' files (the system's limit of open files is reached)",
    errno.EACCES: "give this user read access to the output's files",
    errno.EPERM: "give this user read access to the output's files",
}


def read_output_metadata(out: OutputPaths) -> dict[str, str]:
    """The metadata a finished output was written with (its header, or the `.meta.json` beside a `.npy`)."""
    with _reading(out):
        if out.meta is not None:
            return read_jsonl(out.meta)[0]
        with open_safetensors(out.embeddings) as f:
            return f.metadata() or {}


def shard_text(shard: tuple[int, int] | None) -> str | None:
    """A --shard part as its metadata records it, `K/N`; None for a whole run."""
    return f"{shard[0]}/{shard[1]}" if shard else None


def read_output_state(out: OutputPaths, metadata: dict[str, str] | None = None) -> dict:
    """The run state (`run_states.run_state`) a finished output was made with; {} for a file siglip did not write.
    Outputs of versions whose state did not hold the pooling have it in their metadata beside it. `metadata`: the
    output's, where the caller has read it already."""
    metadata = read_output_metadata(out) if metadata is None else metadata
    with _reading(out):
        state = metadata.get("options", "{}")  # recorded as the output's "options"
        state = json.loads(state) if isinstance(state, str) else state  # a .meta.json may hold an object
        if not isinstance(state, dict):
            raise ValueError(f"its options are {json_kind(state)}, not a JSON object")
    if state and "pooling" not in state and "pooling" in metadata:
        state["pooling"] = metadata["pooling"]
    return state


def read_rows(out: OutputPaths) -> tuple[list[Ref], list[dict]]:
    """A finished output's rows: where each embedded file's row is (in manifest order), and its errors file's rows.
    Paths come back as found on disk, also where the manifest spells a non-UTF-8 name in base64."""
    if out.format == "npy":
        reader: RowReader = NpyRows({"embeddings": out.embeddings, "tokens": out.tokens})
    else:
        reader = SafetensorsRows(out.embeddings)
    with _reading(out):
        manifest = read_jsonl(out.manifest)
        metadata = read_output_metadata(out)  # once: its options, and the digest of its manifest
        held = {"embeddings": reader.count("embeddings")}
        if read_output_state(out, metadata).get("tokens"):
            held["tokens"] = reader.count("tokens")
        errors = _with_paths(read_jsonl(out.errors), out.errors) if out.errors.exists() else []
        manifest = _with_paths(manifest, out.manifest)
        written_with = metadata.get(MANIFEST_DIGEST)  # none in outputs of earlier versions
        digest = jsonl_digest(out.manifest) if written_with is not None else None
    for name, count in held.items():
        if count != len(manifest):
            where = out.tokens if name == "tokens" and out.tokens is not None else out.embeddings
            raise UserError(
                f"{out.manifest} lists {len(manifest):,} rows but {where} holds {count:,} {name}: they are not from "
                f"one run, so {out.embeddings} must be embedded again (siglip embed ... --overwrite)."
            )
    if digest != written_with:  # as many rows, of another run
        raise UserError(
            f"{out.manifest} is not the manifest {out.embeddings} was written with: they are not from one run (or the "
            f"manifest was edited), so {out.embeddings} must be embedded again (siglip embed ... --overwrite)."
        )
    return [Ref(reader, i, row) for i, row in enumerate(manifest)], errors


def _with_paths(rows: list[dict], source: Path) -> list[dict]:
    """The rows of a manifest or errors file with their paths as found on disk; a row naming none is a ValueError."""
    try:
        found = [{**row, "path": path_from_fields(row)} for row in rows]
    except (KeyError, TypeError, ValueError):  # no path, or bad base64 (a ValueError)
        found = None
    if found is None or not all(isinstance(row["path"], str) for row in found):
        raise ValueError(f"{display_path(str(source))}: a row names no file")
    return found


def public_row(info: dict) -> dict:
    """A manifest or errors row as users read it: the path made readable, then the facts."""
    return {**path_fields(info["path"]), **{k: v for k, v in info.items() if k not in ("path", "path_bytes_b64")}}


def row_blocks(refs: list[Ref], name: str, *, row_bytes: int) -> Iterator[np.ndarray]:
    """Rows of tensor `name` in order, ≤ ~32 MiB at a time.

    Each block's rows are read source by source, a span of nearby rows in one read, then put in order: the rows of
    a merge's parts interleave, a row or two from each in turn, and read run by run a merge of 100,000 rows opened
    its parts 75,000 times (on a network share, a round trip each). A span reads through gaps of up to `GAP_BYTES`
    and holds at most a block's rows."""
    max_rows = max(1, BLOCK_BYTES // max(row_bytes, 1))
    gap_rows = GAP_BYTES // max(row_bytes, 1)
    for begin in range(0, len(refs), max_rows):
        block = refs[begin : begin + max_rows]
        by_source: dict[int, list[int]] = {}  # a source's rows in this block, by position
        for position, ref in enumerate(block):
            by_source.setdefault(id(ref.reader), []).append(position)
        rows = None
        for positions in by_source.values():
            positions.sort(key=lambda position: block[position].index)
            indices = [block[position].index for position in positions]
            reader = block[positions[0]].reader
            for start, stop in _spans(indices, gap=gap_rows, most=max_rows):
                first = indices[start]
                read = reader.read(name, first, indices[stop - 1] + 1)
                if rows is None:
                    rows = np.empty((len(block), *read.shape[1:]), read.dtype)
                rows[positions[start:stop]] = read[[index - first for index in indices[start:stop]]]
        yield rows


def _spans(indices: list[int], *, gap: int, most: int) -> Iterator[tuple[int, int]]:
    """(start, stop) slices of the sorted `indices` whose values lie at most `gap` apart, each over at most `most`
    values from its first to its last."""
    start = 0
    for i in range(1, len(indices) + 1):
        if i == len(indices) or indices[i] - indices[i - 1] > gap + 1 or indices[i] - indices[start] >= most:
            yield start, i
            start = i


def output_metadata(
    checkpoint: Checkpoint, state: dict, *, shard: tuple[int, int] | None = None, inputs: tuple[str, ...] | None = None
) -> dict[str, str]:
    """The `.safetensors` header metadata (or `.meta.json` beside a `.npy`): what made these numbers, and for a
    part of a sharded run which part, and its inputs as given (`shards.shard_inputs`)."""
    return {
        **({"shard": shard_text(shard)} if shard else {}),
        **({"inputs": json.dumps(list(inputs))} if shard and inputs is not None else {}),
        "model": display_path(checkpoint.name),
        "revision": checkpoint.revision or "",
        "embedding_dim": str(checkpoint.vision.hidden_size),
        "dtype": state["output_dtype"],
        "compute_dtype": state["compute_dtype"],
        "normalized": str(state["normalized"]).lower(),
        "pooling": state["pooling"],
        "preprocessing": json.dumps(state["preprocessing"]),
        "decoder": state["preprocessing"]["decoder"],
        "tool": f"siglip {__version__}",
        "options": json.dumps(state, sort_keys=True),
        **_working_directory(),
    }


def _working_directory() -> dict[str, str]:
    """{"working_directory": the folder this run was started in}, where the manifest's relative paths start
    (`--update` from elsewhere is refused: `earlier_rows._refuse_update_from_elsewhere`); {} where it is gone, or its
    name is not UTF-8 (the metadata is text)."""
    try:
        folder = os.getcwd()
        folder.encode()
    except (OSError, UnicodeError):
        return {}
    return {"working_directory": folder}


# The key of the metadata that holds the digest of the manifest written with the embeddings (`assemble`). Rows are
# matched to vectors by their order alone: a manifest of another run beside these embeddings (an --update stopped
# between its renames, its work folder then removed by hand), rows as many, would give every photo another's vector.
MANIFEST_DIGEST = "manifest_blake2b"


def final_metadata(metadata: dict[str, str], rows: int) -> dict[str, str]:
    """The metadata `assemble` writes into the output of `rows` rows: the run's, and their count."""
    return {**metadata, "num_images": str(rows)}


def assemble(
    out: OutputPaths,
    good: list[Ref],
    bad: list[dict],
    metadata: dict[str, str],
    *,
    before_replacing: Callable[[Steps], None] = lambda steps: None,
) -> None:
    """Write the final files from the finished rows, all of them, then put them in place: manifest and errors
    first, the embeddings file last. `before_replacing(steps)` runs between the two (`storage.replaced_together`).
    Once they are in place, a stop signal no longer stops the run (`interrupts.mark_output_in_place`)."""
    state = json.loads(metadata["options"])
    D, T = state["embedding_dim"], state["num_tokens"]
    dtype = np.dtype(OUTPUT_DTYPES[state["output_dtype"]])
    metadata = final_metadata(metadata, len(good))
    with replaced_together(before=before_replacing, after=interrupts.mark_output_in_place) as staging:
        manifest = write_jsonl(out.manifest, (public_row(ref.info) for ref in good), staging=staging)
        metadata = {**metadata, MANIFEST_DIGEST: manifest}  # the embeddings say which manifest is theirs
        if bad:
            write_jsonl(out.errors, (public_row(info) for info in bad), staging=staging)
        else:
            staging.remove(out.errors)  # a stale errors file would describe another run
        embeddings = TensorSpec(dtype, (len(good), D), row_blocks(good, "embeddings", row_bytes=D * dtype.itemsize))
        tokens = None
        if state["tokens"]:
            tokens = TensorSpec(dtype, (len(good), T, D), row_blocks(good, "tokens", row_bytes=T * D * dtype.itemsize))
        if out.format == "npy":
            if tokens is not None:
                write_npy(out.tokens, tokens, staging=staging)
            else:
                staging.remove(out.tokens)  # stale tokens would sit beside embeddings they do not match
            write_jsonl(out.meta, [metadata], staging=staging)
            write_npy(out.embeddings, embeddings, staging=staging)
        else:
            tensors = {"embeddings": embeddings, **({"tokens": tokens} if tokens else {})}
            write_safetensors(out.embeddings, tensors, metadata, staging=staging)
