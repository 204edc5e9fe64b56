"""The one exception type the CLI turns into a one-sentence message and a non-zero exit."""


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


def first_line(error: BaseException) -> str:
    """The first line of an error's message (CUDA's and torch's go on for lines), or its class name if it has none."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__
