"""Durable files: atomic writes, a work area of finished chunks, and streaming `.safetensors` / `.npy` writers.

Nothing here holds all the tensors in memory: chunks are written as the run goes, and the final file is streamed
from them slice by slice, so a run over millions of images holds their manifest rows (under 1 KB each, with the
rest of a row's bookkeeping: README, Memory), not their embeddings.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import json
import os
import re
import shutil
import stat
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Iterator, NamedTuple, Protocol

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save as safetensors_bytes

from . import interrupts
from .errors import UserError, os_reason
from .text import display_path


SAFETENSORS_DTYPES = {np.dtype("float32"): "F32", np.dtype("float16"): "F16"}


def fsync_dir(directory: Path) -> None:
    """Make the renames in `directory` durable. Where a folder cannot be synced (some FUSE and SMB mounts refuse with
    EINVAL; a folder this user may write in but not read cannot be opened), the renames are done all the same, and
    are left to the file system's own guarantees rather than reported as a file that could not be written."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in _CANNOT_SYNC_FOLDERS:  # EIO, ENOSPC: the writes themselves failed
            raise
    finally:
        os.close(fd)


_CANNOT_SYNC_FOLDERS = {errno.EINVAL, errno.EROFS, errno.EBADF, errno.EACCES, errno.EPERM, errno.EOPNOTSUPP}


def _temporary(path: Path, pid: int) -> Path:
    return path.with_name(f".{path.name}.{pid}.tmp")


class WriteError(UserError):
    """A file that could not be written: a full disk, a quota, a folder made read-only."""


# The files of one `replaced_together` block, in order: each written one (source: its temporary; target: its final
# name), and each one to remove (source: its name; target: None).
Steps = list[tuple[Path, Path | None]]


class Staging:
    """What a `replaced_together` block does once its files are written: its `steps`."""

    def __init__(self) -> None:
        self.steps: Steps = []

    def rename(self, tmp: Path, path: Path) -> None:
        """Give `tmp`, written whole, the name `path` with the block's other files."""
        self.steps.append((tmp, path))

    def remove(self, path: Path) -> None:
        """Remove `path` as the new files take their names (a stale file that would describe another run)."""
        self.steps.append((path, None))


@contextmanager
def atomic_write(path: Path, staging: Staging | None = None) -> Iterator[BinaryIO]:
    """Write `path` through a temporary file in the same folder: fsync, rename. Readers see old or new, never half.
    A failure of the system (no space left, ...) is a `WriteError` naming the file; nothing is left behind.
    With `staging`, the rename waits for the end of its `replaced_together` block."""
    tmp = _temporary(path, os.getpid())
    try:
        with open(tmp, "wb") as f:
            _keep_permissions(path, f)
            yield f
            f.flush()
            os.fsync(f.fileno())
        if staging is not None:
            staging.rename(tmp, path)
            return
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as e:
        written = _size_if_any(tmp)  # at `ulimit -f`, a file too large stops at the limit
        _remove_if_can(tmp)
        ours = (str(tmp), str(path), str(path.parent))  # the error of another file, read for this one, is its own
        if e.errno is None or (e.filename is not None and os.fsdecode(e.filename) not in ours):
            raise
        raise WriteError(f"cannot write {path}: {os_reason(e, written=written)}.") from None
    except BaseException:
        _remove_if_can(tmp)
        raise


def _keep_permissions(path: Path, new: BinaryIO) -> None:
    """Give the `new` file that replaces `path` the permissions `path` has: a manifest kept private (600) or read-only
    (444) stays so after an --update, and does not come back as the umask makes a new file (644)."""
    try:
        info = os.stat(path)
    except OSError:  # nothing there yet: a new file, as the umask has it
        return
    if not stat.S_ISREG(info.st_mode):  # a folder in the way (its rename fails) has modes no file should take: 755
        return
    with contextlib.suppress(OSError):  # a file system without modes (FAT, some network shares)
        os.fchmod(new.fileno(), stat.S_IMODE(info.st_mode))


def _size_if_any(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:  # gone, or the file system failing: the error to tell is the one that got us here
        return None


def _remove_if_can(path: Path) -> None:
    """Remove a temporary file after a failure, if the file system lets us: on a read-only mount (EROFS) its removal
    fails too, and the error to tell is the one that got us here."""
    with contextlib.suppress(OSError):
        path.unlink(missing_ok=True)


@contextmanager
def replaced_together(*, before: Callable[[Steps], None], after: Callable[[], None]) -> Iterator[Staging]:
    """Files written in the block with its `Staging` take their names only once all are written and fsynced:
    `before(staging.steps)`, then one rename after another, in the order written, then `after()`. So a failure
    while they are written (a full disk) leaves every earlier file as it was, and the files never mix two runs.
    A stop signal waits for `after`, which can say that it changes nothing any more."""
    staging = Staging()
    try:
        yield staging
        before(staging.steps)
    except BaseException:
        for source, target in staging.steps:
            if target is not None:
                _remove_if_can(source)
        raise
    with interrupts.deferred():  # a Ctrl-C waits for the renames: a moment, and the output is whole
        take_their_names(staging.steps)
        after()


def take_their_names(steps: Steps) -> None:
    """Do a `Staging`'s steps: rename each temporary to its final name, remove each file to remove; then fsync."""
    for source, target in steps:
        try:
            if target is None:
                source.unlink(missing_ok=True)
            else:
                os.replace(source, target)
        except OSError as e:
            doing = "remove" if target is None else "write"
            raise WriteError(f"cannot {doing} {target or source}: {e.strerror}.") from None
    for folder in {(target or source).parent for source, target in steps}:
        fsync_dir(folder)


def remove_stale_temporaries(paths: Iterable[Path]) -> None:
    """Delete what `atomic_write` left of `paths` in processes that are gone (`kill -9`, a power cut): a half-written
    embeddings file can be gigabytes. A live process's temporary file is left alone."""
    for path in paths:
        for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
            pid = tmp.name[len(path.name) + 2 : -len(".tmp")]
            if pid.isdigit() and not _alive(int(pid)):  # on a read-only mount, left: the run's write tells of it
                _remove_if_can(tmp)


def _identity(path: Path) -> list[int] | None:
    """What tells a file from another written in its place, as a JSON list: its inode number, size and mtime. Not
    its device number, which a remount may change (a USB disk back as another sdX, an NFS share after a reboot)."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    return [info.st_ino, info.st_size, info.st_mtime_ns]


def _json_object(path: Path) -> dict | None:
    """The JSON object in `path`; None where it cannot be read or is no object (damaged)."""
    try:
        value = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def write_jsonl(path: Path, rows: Iterable[dict], *, staging: Staging | None = None) -> str:
    """Write the rows one JSON object a line; the `jsonl_digest` of what was written."""
    digest = hashlib.blake2b(digest_size=16)
    with atomic_write(path, staging) as f:
        for row in rows:
            line = json.dumps(row, ensure_ascii=False).encode("utf-8", "surrogateescape") + b"\n"
            f.write(line)
            digest.update(line)
    return digest.hexdigest()


def jsonl_digest(path: Path) -> str:
    """The blake2b digest (16 bytes, in hex) of a file's bytes, as `write_jsonl` gives it of what it wrote."""
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_jsonl(path: Path) -> list[dict]:
    """The objects of a JSON-lines file; a line that is not a JSON object is a ValueError naming the file and the
    line. Read line by line, the rows sharing their keys: an --update holds every row of its earlier manifest, 550
    bytes each this way, 930 with a copy of the keys in each row (and 1.2 KB at the peak, the file read whole)."""
    rows = []
    keys: dict[str, str] = {}
    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            if line.strip():
                try:
                    row = json.loads(line)
                except ValueError:
                    row = None
                if not isinstance(row, dict):
                    raise ValueError(f"{display_path(str(path))}: line {number} is not a JSON object")
                rows.append({keys.setdefault(key, key): value for key, value in row.items()})
    return rows


@dataclass(frozen=True)
class TensorSpec:
    """A 2-D or 3-D array written row-block by row-block: `blocks` yields arrays of shape (n, *shape[1:])."""

    dtype: np.dtype
    shape: tuple[int, ...]
    blocks: Iterable[np.ndarray]


def _write_blocks(f: BinaryIO, name: str, spec: TensorSpec, dtype: np.dtype) -> None:
    """`spec`'s rows as raw `dtype` data (its byte order: the format's)."""
    written = 0
    for block in spec.blocks:
        block = np.ascontiguousarray(block, dtype=dtype)
        f.write(block.tobytes())
        written += block.shape[0]
    if written != spec.shape[0]:
        raise RuntimeError(f"{name}: wrote {written} rows, expected {spec.shape[0]}")


def write_safetensors(
    path: Path, tensors: dict[str, TensorSpec], metadata: dict[str, str], *, staging: Staging | None = None
) -> None:
    """Stream tensors into a `.safetensors` file (the format: u64 header size, JSON header, raw little-endian data)."""
    header: dict = {"__metadata__": dict(sorted(metadata.items()))}  # sorted: the same content, the same bytes
    offset = 0
    for name, spec in tensors.items():
        size = int(np.prod(spec.shape)) * spec.dtype.itemsize
        header[name] = {"dtype": SAFETENSORS_DTYPES[spec.dtype], "shape": list(spec.shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, ensure_ascii=False).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    with atomic_write(path, staging) as f:
        f.write(len(encoded).to_bytes(8, "little") + encoded)
        for name, spec in tensors.items():
            _write_blocks(f, name, spec, spec.dtype.newbyteorder("<"))


def write_npy(path: Path, spec: TensorSpec, *, staging: Staging | None = None) -> None:
    """Stream one array into a `.npy` file."""
    header = {"descr": np.lib.format.dtype_to_descr(spec.dtype), "fortran_order": False, "shape": spec.shape}
    with atomic_write(path, staging) as f:
        np.lib.format.write_array_header_1_0(f, header)
        _write_blocks(f, path.name, spec, spec.dtype)  # the byte order its header gives


class RowReader(Protocol):
    def read(self, name: str, start: int, stop: int) -> np.ndarray: ...

    def count(self, name: str) -> int:
        """Rows of tensor `name`: 0 where a .safetensors file holds no such tensor (`SafetensorsRows`), while an
        `NpyRows` without its file raises, as for a file missing or broken."""


class _Layout(NamedTuple):
    """Where a tensor's rows lie in its file: C-ordered from `offset`."""

    dtype: np.dtype
    shape: tuple[int, ...]
    offset: int

    @property
    def rows(self) -> int:
        return self.shape[0]


class SafetensorsRows:
    """Row slices of the tensors in a `.safetensors` file, read without loading the rest.

    The header is read once, on the first call: a chunk's header lists its rows (megabytes of JSON for a GPU's
    chunk), and an `--update` reads a chunk as many short runs of rows as there are changed files between kept ones.
    Parsed on every read, an --update of 9,933 changes in a 20,000-photo library took 3× as long (bench/RESULTS.md)."""

    def __init__(self, path: Path):
        self.path = path
        self._tensors: dict[str, _Layout] | None = None

    def read(self, name: str, start: int, stop: int) -> np.ndarray:
        layout = self._layout()
        if name not in layout:
            raise ValueError(f"{display_path(self.path)} holds no tensor {name!r}")
        return _rows_at(self.path, name, layout[name], start, stop)

    def count(self, name: str) -> int:
        layout = self._layout()
        return layout[name].rows if name in layout else 0

    def _layout(self) -> dict[str, _Layout]:
        if self._tensors is None:
            with open_safetensors(self.path):  # refuses a damaged file as safetensors does
                pass
            with open(self.path, "rb") as f:
                size = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(size))
            kinds = {kind: dtype.newbyteorder("<") for dtype, kind in SAFETENSORS_DTYPES.items()}
            self._tensors = {}
            for name, spec in header.items():
                if name == "__metadata__":
                    continue
                if spec["dtype"] not in kinds:
                    raise ValueError(f"{display_path(self.path)} holds {name} as {spec['dtype']}, which siglip does not write")
                offset = 8 + size + spec["data_offsets"][0]
                self._tensors[name] = _Layout(kinds[spec["dtype"]], tuple(spec["shape"]), offset)
        return self._tensors


def _rows_at(path: Path, name: str, layout: _Layout, start: int, stop: int) -> np.ndarray:
    """Rows `start` to `stop` of tensor `name`, where `layout` says they lie in `path`: read there, with no file
    left open."""
    dtype, shape, offset = layout
    if not 0 <= start <= stop <= layout.rows:
        raise ValueError(f"{display_path(path)} holds {layout.rows} rows of {name}, not rows {start} to {stop}")
    per_row = int(np.prod(shape[1:], dtype=np.int64))
    rows = np.fromfile(path, dtype=dtype, count=(stop - start) * per_row, offset=offset + start * per_row * dtype.itemsize)
    return rows.reshape(stop - start, *shape[1:])  # a file cut short since gives fewer values: a ValueError


class NpyRows:
    """Row slices of `.npy` files (one per tensor name). Each file's header is read once (a merge reads its parts,
    whose rows interleave, as runs of a row or two), and no file is held open between reads: a merge of a thousand
    parts would hold a thousand, past `ulimit -n`."""

    def __init__(self, files: dict[str, Path]):
        self.files = files
        self._layouts: dict[str, _Layout] = {}

    def read(self, name: str, start: int, stop: int) -> np.ndarray:
        return _rows_at(self.files[name], name, self._layout(name), start, stop)

    def count(self, name: str) -> int:
        return self._layout(name).rows

    def _layout(self, name: str) -> _Layout:
        if name not in self._layouts:
            mapped = np.load(self.files[name], mmap_mode="r")  # refuses a damaged or short file as before
            if not mapped.flags.c_contiguous or mapped.ndim == 0:
                raise ValueError(f"{display_path(self.files[name])} is not an array of rows siglip writes")
            self._layouts[name] = _Layout(mapped.dtype, mapped.shape, mapped.offset)
            del mapped  # its mapping, and the descriptor that goes with it, closed now
        return self._layouts[name]


@dataclass(frozen=True)
class Chunk:
    """A durable batch of finished work: embedded rows with their tensors, and files that failed."""

    path: Path
    rows: list[dict]
    errors: list[dict]

    @property
    def seq(self) -> int:
        """Its place in the run: `chunk-<seq>.safetensors`."""
        return int(self.path.stem.removeprefix("chunk-"))


@contextmanager
def open_safetensors(path: Path) -> Iterator:
    """safetensors' `safe_open` (numpy), opened by the system first: safetensors says "No such file or directory" of
    a file this user may not read, whose remedy is another."""
    with open(path, "rb"), safe_open(path, framework="np") as f:
        yield f


def _read_chunk(path: Path) -> Chunk:
    """A chunk whose rows are listed and held whole: safetensors checks the file's length against its header."""
    with open_safetensors(path) as f:
        meta = f.metadata()
        rows, errors = json.loads(meta["rows"]), json.loads(meta["errors"])
        held = {name: f.get_slice(name).get_shape()[0] for name in f.keys()}
    if not (isinstance(rows, list) and isinstance(errors, list) and all(n == len(rows) for n in held.values())):
        raise ValueError(f"{path} does not hold the rows it lists")
    return Chunk(path, rows, errors)


# The name of a chunk, as the run writes it: a copy a sync tool made beside one
# (`chunk-….sync-conflict-….safetensors`) would hold the same rows a second time.
CHUNK_NAME = re.compile(r"chunk-\d+\.safetensors")
# The output of device K of a several-device run on N devices, in that run's work area (`devices`).
SHARD_NAME = re.compile(r"shard-\d+-of-(\d+)\.")


def shard_name(index: int, count: int, suffix: str) -> str:
    """The file name of device `index`'s output in a run on `count` devices (`SHARD_NAME`)."""
    return f"shard-{index}-of-{count}{suffix}"


def _user_name(uid: int) -> str:
    try:
        import pwd

        return pwd.getpwuid(uid).pw_name
    except (ImportError, KeyError):  # no such module (Windows), or a user only a container's host knows
        return f"user {uid}"


class WorkArea:
    """`<output>.partial/`: the options of the run (`state.json`) and its finished chunks, one file each; while the
    final files are being replaced, the `assembling` mark. A run on several devices keeps its shards here instead
    (`shard-K-of-N.*`, each with a work area of its own, and `device-K.log`).

    A chunk is a `.safetensors` file whose header metadata also lists its rows, written atomically, so a chunk
    either exists whole or not at all whenever the process dies.
    """

    def __init__(self, directory: Path):
        self.directory = directory
        self.state_path = directory / "state.json"

    def exists(self) -> bool:
        return self.state_path.is_file()

    def refuse_if_closed(self) -> None:
        """Refuse, in one sentence, a file where the work area goes, and a work area this user cannot write in: one
        left by another user's run (under sudo, interrupted) can be neither continued nor replaced: a rerun would embed
        every file again, then fail to write its chunks, and so would every rerun after it."""
        try:
            info = os.stat(self.directory)
        except OSError:  # none: nothing in the way
            return
        if not stat.S_ISDIR(info.st_mode):
            raise UserError(
                f"{display_path(str(self.directory))} is in the way of this run's work folder: it is not a folder, so "
                "not siglip's; move it away, or choose another -o."
            )
        owner = info.st_uid
        if not hasattr(os, "geteuid") or os.access(self.directory, os.W_OK | os.X_OK):
            return
        if owner != os.geteuid():
            raise UserError(
                f"{display_path(str(self.directory))} holds the work of a run by another user ({_user_name(owner)}), "
                "which this user cannot write in: remove it as that user, or choose another -o."
            )
        if not os.statvfs(self.directory).f_flag & os.ST_RDONLY:  # on a read-only mount the write says why itself
            raise UserError(f"cannot write in {display_path(str(self.directory))}: give this user write access to it.")

    def state(self) -> dict | None:
        """The options of the run that made the work area; None when its record cannot be read (damaged)."""
        return _json_object(self.state_path)

    def create(self, state: dict) -> None:
        self.remove()
        self.directory.mkdir(parents=True)
        with atomic_write(self.state_path) as f:
            f.write(json.dumps(state, indent=1, sort_keys=True).encode())

    def chunks(self) -> tuple[list[Chunk], list[Path]]:
        """The finished chunks in order, and those that cannot be read (cut short or damaged since: a disk error, a
        copy that failed), which are deleted: their files are embedded again."""
        chunks, damaged = [], []
        names = sorted(name for name in os.listdir(self.directory) if CHUNK_NAME.fullmatch(name))
        for path in (self.directory / name for name in names):
            try:
                chunks.append(_read_chunk(path))
            except (ValueError, KeyError, TypeError, SafetensorError):
                damaged.append(path)
                _remove_if_can(path)
            except OSError as e:  # the disk or the system's reason, not the chunk's: nothing is deleted
                raise UserError(f"cannot read {path}: {e.strerror or e}.") from None
        return chunks, damaged

    def write_chunk(self, seq: int, rows: list[dict], errors: list[dict], tensors: dict[str, np.ndarray]) -> Chunk:
        path = self.directory / f"chunk-{seq:08d}.safetensors"
        metadata = {"rows": json.dumps(rows), "errors": json.dumps(errors)}
        with atomic_write(path) as f:
            f.write(safetensors_bytes({k: np.ascontiguousarray(v) for k, v in tensors.items()}, metadata=metadata))
        return Chunk(path, rows, errors)

    def device_count(self) -> int | None:
        """How many devices the several-device run that left its shards here (`shard-K-of-N.*`, no state.json) had;
        None when there are none."""
        try:
            names = [entry.name for entry in os.scandir(self.directory)]
        except OSError:
            return None
        counts = [int(m[1]) for name in names if (m := SHARD_NAME.match(name))]
        return max(counts, default=None)

    def mark_assembling(self, steps: Steps) -> None:
        """Say, durably, that the final files are being replaced (`replaced_together`'s steps, each new file
        written and fsynced): until `remove`, they may be half old, half new. The mark lists the steps, each new
        file by its identity, for a rerun to finish them (`finish_assembling`); the files they replace, as they
        were (`unreplaced`); and the last file renamed, the embeddings (`published`)."""
        listed, before = [], {}
        for source, target in steps:
            if source.parent != self.directory.parent or (target is not None and target.parent != source.parent):
                raise ValueError(f"{source} is not beside {self.directory}")  # the mark names files by name alone
            replaced = source if target is None else target
            before[os.fsdecode(replaced.name)] = _identity(replaced)
            if target is None:
                listed.append({"remove": os.fsdecode(source.name)})
            else:
                names = {"from": os.fsdecode(source.name), "to": os.fsdecode(target.name)}
                listed.append({**names, "file": _identity(source)})
        last = [step for step in listed if "to" in step][-1]
        with atomic_write(self.directory / "assembling") as f:
            f.write(json.dumps({"file": last["file"], "steps": listed, "before": before}).encode())

    def assembling(self) -> bool:
        return (self.directory / "assembling").is_file()

    def _mark(self) -> dict:
        return _json_object(self.directory / "assembling") or {}

    def finish_assembling(self) -> None:
        """Finish the renames of a run stopped part-way through them (`kill -9`, a power cut): each file it renames
        was written and fsynced before it marked itself assembling, so its output ends as it would have. Nothing is
        done where the mark lists no steps (an earlier version's), or a new file is under neither of its names.
        A Ctrl-C waits for the renames, as in the run that began them."""
        folder, left = self.directory.parent, []
        for step in self._mark().get("steps", []):
            if "remove" in step:
                left.append((folder / step["remove"], None))
                continue
            source, target = folder / step["from"], folder / step["to"]
            if _identity(source) == step["file"]:
                left.append((source, target))
            elif _identity(target) != step["file"]:  # neither renamed nor waiting: gone, or something else moved it
                return
        with interrupts.deferred():
            take_their_names(left)

    def unreplaced(self) -> bool:
        """Whether the run that marked itself assembling was stopped before it replaced or removed any final file:
        each is as the mark found it (or still absent), so the earlier output is whole and may be read."""
        before = self._mark().get("before")
        folder = self.directory.parent
        return isinstance(before, dict) and all(_identity(folder / name) == was for name, was in before.items())

    def published(self, embeddings: Path) -> bool:
        """Whether the run that marked itself assembling renamed all its files (the embeddings file, the last, is
        the one the mark names) and was stopped only before it removed this folder."""
        mark = self._mark()
        if "file" in mark:
            return _identity(embeddings) == mark["file"]
        try:  # the mark of an earlier version: the device and inode numbers of the new embeddings file
            identity = os.stat(embeddings)
        except OSError:
            return False
        return (mark.get("dev"), mark.get("ino")) == (identity.st_dev, identity.st_ino)

    def remove(self) -> None:
        """Delete the folder, its `assembling` mark last: a run stopped while it removes the folder of an output it
        published (`kill -9`, a power cut) leaves the mark for as long as anything else, and the rerun sees that."""
        try:
            names = sorted(os.listdir(self.directory), key=lambda name: name == "assembling")
        except OSError:
            return
        for name in names:
            path = self.directory / name
            if path.is_dir() and not path.is_symlink():  # a several-device run's shards keep work folders of their own
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    path.unlink()
        shutil.rmtree(self.directory, ignore_errors=True)
