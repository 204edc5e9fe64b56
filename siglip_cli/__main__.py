"""The `siglip` command: `python -m siglip_cli ...`, and the console script's entry point."""

import errno
import os
import sys

# stdout's writes fail with these when it is a file on a full disk (or a pipe whose reader left): outputs are written
# through `storage` and say so themselves, so an OSError with no file name that reaches here is stdout's.
_STDOUT_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO}


def main() -> None:
    """Run the CLI; Ctrl-C while torch is still being imported ends quietly too (the commands handle it later)."""
    try:
        from .cli import app

        app(prog_name="siglip")
    except KeyboardInterrupt:
        print("interrupted.", file=sys.stderr)
        sys.exit(130)
    except OSError as e:
        if e.filename is not None or e.errno not in _STDOUT_FULL:
            raise
        _silence_stdout()
        print(f"error: cannot write to stdout: {os.strerror(e.errno)}.", file=sys.stderr)
        sys.exit(1)


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's flush at exit does not fail again on what is still buffered."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


if __name__ == "__main__":
    main()
