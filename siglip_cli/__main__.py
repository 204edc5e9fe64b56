"""The `siglip` command: `python -m siglip_cli ...`, and the console script's entry point."""

import os
import sys


class StdoutError(OSError):
    """stdout could not take what was written (a file on a full disk): one sentence, not a traceback."""


class _Stdout:
    """sys.stdout, with its write errors told apart from every other file's."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except OSError as e:
            raise StdoutError(e.errno, e.strerror) from None

    def flush(self) -> None:
        try:
            self._stream.flush()
        except OSError as e:
            raise StdoutError(e.errno, e.strerror) from None

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def main() -> None:
    """Run the CLI; Ctrl-C while torch is still being imported ends quietly too (the commands handle it later)."""
    sys.stdout = _Stdout(sys.stdout)
    try:
        from .cli import app

        app(prog_name="siglip")
    except KeyboardInterrupt:
        print("interrupted.", file=sys.stderr)
        sys.exit(130)
    except StdoutError as e:
        devnull = os.open(os.devnull, os.O_WRONLY)  # so the flush at exit does not fail again on what is buffered
        os.dup2(devnull, sys.stdout.fileno())
        print(f"error: cannot write to stdout: {e.strerror}.", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
