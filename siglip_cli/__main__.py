"""The `siglip` command: `python -m siglip_cli ...`, and the console script's entry point."""

import signal
import sys


def _stopped_while_starting(signum: int, frame: object) -> None:
    print("error: interrupted.", file=sys.stderr)
    raise SystemExit(130)  # through the imports under way, without a traceback


# A Ctrl-C from here until `main` takes it over ends as one sentence, not a KeyboardInterrupt's traceback through
# the imports below. Only where the program starts (`python -m siglip_cli`, the console script), not where a test or
# a library caller imports this module; one found ignored stays ignored (a job started with `&`).
_STARTING = __name__ == "__main__" or sys.argv[0].replace("\\", "/").rsplit("/", 1)[-1] in ("siglip", "siglip.exe")
if _STARTING and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    signal.signal(signal.SIGINT, _stopped_while_starting)

import atexit  # noqa: E402
import ctypes  # noqa: E402
import errno  # noqa: E402
import os  # noqa: E402
import threading  # noqa: E402
import warnings  # noqa: E402
from typing import NoReturn  # noqa: E402


class StdoutError(Exception):
    """stdout could not take what was written (a file on a full disk, a reader gone): one sentence, not a traceback.
    Not an OSError, which click would turn into a silent exit 1 for a closed pipe."""

    def __init__(self, code: int | None, strerror: str | None):
        super().__init__(strerror)
        self.errno, self.strerror = code, strerror


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


class _Stderr:
    """sys.stderr, for people: once it cannot be written (a reader that went away, `2>&-`), it is dropped, and the
    run goes on; its exit status still tells how it ended."""

    def __init__(self, stream):
        self._stream, self._broken = stream, False

    def write(self, text: str) -> int:
        if not self._broken:
            try:
                self._stream.write(text)
            except OSError:
                self._broken = True
        return len(text)

    def flush(self) -> None:
        if not self._broken:
            try:
                self._stream.flush()
            except OSError:
                self._broken = True

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


# The /dev/null files that stand in for closed standard streams, kept open for the whole run: each holds the
# descriptor (0, 1 or 2) of the stream it stands in for. Once stderr's was let go (`_own_descriptor`), descriptor 2
# was free again, and the next file opened took it: `embed`'s lock file, which the first photo decoded in this
# process then closed (`preprocess.c_messages_dropped` points 2 at /dev/null), freeing the lock for a second run;
# and where no file had taken it, `inspect` failed on every photo ("Bad file descriptor").
_STAND_INS: list = []


def _standard_streams() -> None:
    """Streams any shell can hand us: closed ones (`>&-`: None in Python) read as empty or write to nowhere, and
    characters a stream cannot encode (an ASCII locale, a non-UTF-8 file name) are escaped, never a traceback."""
    for name, mode in (("stdin", "r"), ("stdout", "w"), ("stderr", "w")):
        if getattr(sys, name) is None:
            _STAND_INS.append(open(os.devnull, mode))
            setattr(sys, name, _STAND_INS[-1])
        elif mode == "w" and hasattr(getattr(sys, name), "reconfigure"):
            getattr(sys, name).reconfigure(errors="backslashreplace")
    sys.stdout, sys.stderr = _Stdout(sys.stdout), _Stderr(_own_descriptor(sys.stderr))


def _own_descriptor(stream):
    """`stream` (stderr) on a copy of its file descriptor. C libraries write to descriptor 2 themselves (libtiff, a
    line per bad scanline of a damaged scan); with Python's stderr apart, `preprocess.c_messages_dropped` can send
    theirs to /dev/null while a photo decodes in this process, and the progress bar and our sentences still show."""
    try:
        if stream.fileno() != 2:
            return stream
        copy = os.dup(2)
    except (AttributeError, OSError, ValueError):
        return stream
    return open(copy, "w", buffering=1, encoding=stream.encoding, errors="backslashreplace")


def _exit_now(status: int) -> NoReturn:
    """End the process with `status`, skipping the interpreter's teardown: with torch loaded, freeing every module
    and running libtorch's static destructors took 0.35 s (0.54 s of a 2.5 s one-photo run, bench/RESULTS.md), and
    nothing of ours waits for it. What comes before that teardown still happens, in Python's order: the threads that are not
    daemons are joined, the atexit callbacks run (multiprocessing's cleanup, logging's flush, `weakref.finalize`),
    and the standard streams are flushed. Our files are written and closed by then (`storage`). Under a profiler or
    a debugger (a trace or profile function set), the ordinary exit, which they may need to write their report."""
    # What Py_Finalize calls first: joins the threads that are not daemons. Private: where a Python lacks it (or
    # the atexit hook), the ordinary exit, never one that cuts a thread short.
    shutdown, run_exit_functions = getattr(threading, "_shutdown", None), getattr(atexit, "_run_exitfuncs", None)
    if shutdown is None or run_exit_functions is None or sys.gettrace() is not None or sys.getprofile() is not None:
        sys.exit(status)
    shutdown()
    run_exit_functions()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError, StdoutError):  # a reader gone, a closed stream: as the interpreter's exit ignores
            pass
    try:  # what a native library printed through C's stdio (exit() flushes it; _exit does not)
        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError, TypeError):  # no C library to load this way (Windows)
        pass
    os._exit(status)


def _ctrl_c_typer_silenced(stop: SystemExit) -> bool:
    """Whether `stop` is typer's silent status 130 for a Ctrl-C that came while it read the command line, before any
    command ran (each command reports its own: `cli._Command.invoke`). Typer raises it `from` the KeyboardInterrupt;
    our sentences come from `cli.fail`, raised while handling one, not from it."""
    return stop.code == 130 and isinstance(getattr(stop.__context__, "__cause__", None), KeyboardInterrupt)


def main() -> None:
    """Run the CLI; Ctrl-C while torch is still being imported ends quietly too (the commands handle it later)."""
    _standard_streams()
    # Pillow warns of what it reads past (a corrupt EXIF block, a palette's transparency): a file either decodes or
    # fails with its own sentence, and the warning's two lines of source location are noise to a user.
    warnings.filterwarnings("ignore", module=r"PIL\.")
    try:  # torch's import fails there too, with oneMKL's "FATAL ERROR: Cannot load libtorch_cpu.so"
        os.getcwd()
    except FileNotFoundError:
        print("error: the current folder no longer exists: cd to one that does.", file=sys.stderr)
        sys.exit(2)
    try:
        if signal.getsignal(signal.SIGINT) is _stopped_while_starting:  # a KeyboardInterrupt, caught below
            signal.signal(signal.SIGINT, signal.default_int_handler)
        from .cli import app

        try:
            try:
                app(prog_name="siglip")
            except SystemExit as e:
                status = e.code
                if _ctrl_c_typer_silenced(e):
                    print("error: interrupted.", file=sys.stderr)
            else:
                status = 0
        finally:
            sys.stdout.flush()  # here, where a failure is caught, not at exit
            # The command is over, whatever its status; the exit (threads joined, atexit callbacks) is not to be
            # stopped: a Ctrl-C there turned exit 0 into 130, or printed a traceback from an atexit hook.
            # SIGTERM keeps its default: a scheduler can still end an exit that hangs.
            for name in ("SIGINT", "SIGHUP"):
                if hasattr(signal, name):
                    signal.signal(getattr(signal, name), signal.SIG_IGN)
        if status is None or isinstance(status, int):  # click's statuses; a message (a str) takes the ordinary exit
            _exit_now(status or 0)
        sys.exit(status)
    except KeyboardInterrupt:
        print("error: interrupted.", file=sys.stderr)
        sys.exit(130)
    except StdoutError as e:
        devnull = os.open(os.devnull, os.O_WRONLY)  # so the flush at exit does not fail again on what is buffered
        os.dup2(devnull, sys.stdout.fileno())
        if e.errno == errno.EPIPE:  # the reader went away (`| head`): quiet, with a shell's status for SIGPIPE
            sys.exit(128 + signal.SIGPIPE)
        print(f"error: cannot write to stdout: {e.strerror}.", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
