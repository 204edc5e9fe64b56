"""The errors the CLI turns into one sentence and a non-zero exit (`UserError`, and `RunFailed` among them), the
device fault a run stops on (`DeviceFault`), and the words of errors."""

import errno
import signal

from .limits import file_size_limit


class UserError(Exception):
    """Something the user can fix (a path, an option, a checkpoint); the message is one sentence."""

    exit_code = 2


class RunFailed(UserError):
    """A run that failed for a reason of its own (a crashed worker), told in one sentence that says where the
    details are; exit status 1, as for a run with failed files under --strict."""

    exit_code = 1


class DeviceFault(RuntimeError):
    """The accelerator failed, as its libraries report it in their own words (torchvision's JPEG decoder: "Failed
    to synchronize CUDA stream: 700"): not a file's fault nor the user's; the run stops, its finished work kept."""


def whole_number(value: object, least: int = 0) -> bool:
    """Whether a library caller's `value` is an int (not a bool) of at least `least`: the check behind each "must be
    a whole number" sentence."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def signal_name(number: int) -> str:
    """The name of signal `number`: "SIGSEGV" for 11; for a real-time signal, which `signal.Signals` does not name
    (35 to 63 but its first and last), "signal 40"."""
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def first_line(error: BaseException) -> str:
    """The first line of an error's message (CUDA's and torch's go on for lines), or its class name if it has none."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def os_reason(error: OSError, *, written: int | None = None) -> str:
    """Why an OS call failed, as a message's clause. A file over this process's size limit names the limit (set by
    `ulimit -f` in a shell or a batch job's script): "File too large" alone points at the disk. `written`: the
    size the file reached, where known; one short of the limit was refused by its file system (FAT32's 4 GB)."""
    limit = file_size_limit() if error.errno == errno.EFBIG else None
    if limit is not None and (written is None or written >= limit):
        return f"{error.strerror}: `ulimit -f` allows {limit // 1024:,} KB"
    return error.strerror or str(error)
