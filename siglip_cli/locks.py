"""One run per output: `exclusive` holds a lock file beside it for the run, and a second run writing the same output
is refused in one sentence, never interleaved with the first."""

from __future__ import annotations

import contextlib
import os
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator

from .errors import UserError, os_reason
from .files import refuse_an_unreachable_folder
from .text import display_path

try:
    import fcntl
except ImportError:  # Windows: no advisory locks, so no refusal of a second run either
    fcntl = None


# Lock files held by `exclusive`. A forked child (a decoding worker) shares their open files, and so the locks: one
# that outlives its run (a kill -9 of the main process) would keep the rerun out until it exits. Children let go.
_held_locks: set[int] = set()


def _let_go_of_locks() -> None:
    if _held_locks:
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in _held_locks:
            os.dup2(devnull, fd)  # the child's copy of the descriptor now points elsewhere; the parent's lock stays
        os.close(devnull)
        _held_locks.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_let_go_of_locks)


@contextmanager
def exclusive(output: Path) -> Iterator[None]:
    """Hold `.STEM.lock` beside `output` for the duration: a second run writing the same output is refused in one
    sentence, never interleaved with the first (each would overwrite the other's chunks and final files)."""
    if fcntl is None:
        yield
        return
    lock = output.with_name(f".{output.stem}.lock")  # by stem: OUT.npy and OUT.safetensors share OUT.jsonl
    refuse_an_unreachable_folder(output)
    with _open_lock_file(lock, output) as handle:
        try:
            locked = _locked(handle, lock)
        except OSError as e:  # EBADF: another user's lock file, on NFS; ENOLCK: a share without a lock service
            raise UserError(
                f"cannot lock {display_path(str(lock))} ({os_reason(e)}): if no siglip run is writing {output}, "
                "delete that file; or choose another -o."
            ) from None
        if not locked:
            raise OutputBusy(f"another siglip run is writing {output}: wait for it, or choose another -o.")
        _held_locks.add(handle.fileno())
        try:
            yield
        finally:
            _held_locks.discard(handle.fileno())
            # Before the lock is released: a run that opens it later makes a new one. A folder made read-only
            # meanwhile keeps the file: the run's own error, if any, is the one to tell.
            with contextlib.suppress(OSError):
                lock.unlink(missing_ok=True)


def _locked(handle: BinaryIO, lock: Path) -> bool:
    """Lock `handle`, the open file `lock`, without waiting; False where another run holds the lock."""
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    # The file locked may be one a finishing run has just unlinked; a run that made a new one then holds that, and
    # both would write. Only the lock on the file still named `lock` counts.
    try:
        return os.path.samestat(os.fstat(handle.fileno()), os.stat(lock))
    except FileNotFoundError:
        return False


class OutputBusy(UserError):
    """Another run holds the lock of the output (`exclusive`)."""


@contextmanager
def kept_from_writers(output: Path) -> Iterator[None]:
    """Hold `output`'s lock while it is read (a part a merge joins), so that no run replaces its files meanwhile (an
    --update of that part); `OutputBusy` where a run holds it now. Where no lock can be made beside it (a part on a
    read-only share, which no run writes either), it is read without one."""
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(exclusive(output))
        except OutputBusy:
            raise
        except UserError:
            pass
        yield


def _open_lock_file(lock: Path, output: Path) -> BinaryIO:
    """Open (or make) `lock`, beside `output`, with its folders; a UserError naming what is in the way where it
    cannot be: a file, or a link to a drive not mounted, where a folder should be."""
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        try:  # for writing: NFS takes an exclusive lock only on a file open for writing
            return os.fdopen(os.open(lock, os.O_RDWR | os.O_CREAT, 0o666), "r+b")
        except PermissionError:
            if not os.path.lexists(lock):
                raise
            # One that another user's run left (under sudo, killed): open for reading, it locks as well, but on NFS.
            return os.fdopen(os.open(lock, os.O_RDONLY), "rb")
    except OSError as e:
        raise UserError(_no_lock_file(e, lock, output)) from None


def _no_lock_file(error: OSError, lock: Path, output: Path) -> str:
    """Why `lock` could not be opened or made, in one sentence: where this user may not go, or another user's lock.
    (Something on the way that is no folder was refused before: `exclusive`.)"""
    if isinstance(error, PermissionError) and (refused := _refused_on_the_way(lock.parent)):
        return f"cannot write {display_path(str(output))}: {refused} ({error.strerror})."
    if isinstance(error, PermissionError) and os.path.lexists(lock):  # another user's, closed to this one
        return (f"cannot open {display_path(str(lock))}, the lock of another user's run on "
                f"{display_path(str(output))} ({error.strerror}): if no such run is writing it now, delete that file.")
    return f"cannot write beside {output}: {error.strerror or error}."


def _refused_on_the_way(folder: Path) -> str | None:
    """What stands on the way down to `folder`, which this user could not make or enter: the first folder missing
    (to be made, in one that refuses it) or the first closed to this user; None when the way is open."""
    for step in reversed([folder, *folder.parents]):  # from the root down
        try:
            os.stat(step)
        except FileNotFoundError:
            return f"cannot make the folder {display_path(str(step))}"
        except PermissionError:  # what is in a folder without x cannot be looked at
            if os.path.islink(step):  # the link is there: the folder closed is on the way to its target
                return _refused_on_the_way(Path(os.path.realpath(step)))
            return f"the folder {display_path(str(step.parent))} is closed to this user"
        except OSError:
            return None
    return None
