"""Ctrl-C, SIGTERM and SIGHUP that always stop a run, and never hang it.

Python raises `KeyboardInterrupt` wherever the main thread happens to be, and two places make that unsafe:

- Inside a library's `with lock:`, such as the DataLoader's queues. The exception can leave between the lock's
  acquire and the block, so the lock stays held. The DataLoader's shutdown of its workers then waits for it forever:
  one Ctrl-C in about twenty hung `siglip embed` on 2 cores.
- Inside a `__del__` the garbage collector happens to run. The exception is printed as "Exception ignored" and lost,
  and the run goes on to finish with exit status 0. Once a run is stopping, a second Ctrl-C that lands in one (the
  DataLoader's, shutting its workers down) is not printed either (`quiet_destructors`): the stop is under way.

`deferred()` marks code of the first kind: a signal that arrives there takes effect as the block is left.
`stop_on_signals()`, around a whole run, remembers the signal it raised, so that `check()`, called at a safe point
between batches, raises it again if it was lost. Once the run's output is in place (`mark_output_in_place()`),
there is nothing left to stop: its signals are let go, and the run ends as finished rather than reported interrupted.
"""

from __future__ import annotations

import ctypes
import signal
import sys
import threading
from contextlib import contextmanager
from typing import Iterator

# SIGHUP: the terminal the run was started from closed (an ssh session dropped). `nohup` sets it to be ignored, and
# a signal found ignored stays ignored, as a shell leaves SIGINT ignored for a job started with `&`.
SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))
# What a terminal sends to every process of the run, not only to this one (Ctrl-C, a hang-up).
TERMINAL_SIGNALS = tuple(s for s in SIGNALS if s != signal.SIGTERM)

_received: int | None = None  # the signal `stop_on_signals` turned into KeyboardInterrupt, while it is installed
_in_place = False  # the output of the `stop_on_signals` block's run is in place: `mark_output_in_place`
_depth = 0  # `stop_on_signals` blocks the main thread is in
_deferring = False
_stop_flags: list[threading.Event] = []  # those of the `stop_flag` blocks running
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent(sig: int) -> None:
    """Linux: have the kernel send this process `sig` when its parent dies, even by `kill -9` or the out-of-memory
    killer (strictly: when the thread that started it ends). Elsewhere, nothing."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, sig)
        except (OSError, AttributeError):
            pass  # no libc to ask: the process ends as it otherwise would


def on_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()  # the only thread Python delivers signals to


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """SIGINT, SIGTERM (a scheduler, `kill`) and SIGHUP all raise KeyboardInterrupt in the block, unless found
    ignored, and `check()` raises it again after a `__del__` swallowed it. Blocks may nest (a run inside a command):
    an inner one's output in place (`mark_output_in_place`) stays so for the rest of the outer one."""
    global _received, _in_place, _depth

    def interrupt(signum: int, frame) -> None:
        global _received
        if _in_place:
            return
        _received = signum
        _raise_stop_flags()
        raise KeyboardInterrupt

    if not on_main_thread():
        yield
        return
    previous = {s: signal.signal(s, interrupt) for s in SIGNALS if signal.getsignal(s) is not signal.SIG_IGN}
    hook = sys.unraisablehook
    sys.unraisablehook = lambda unraisable: None if _stopping(unraisable) else hook(unraisable)
    _in_place, _depth = False, _depth + 1
    try:
        yield
    finally:
        _depth -= 1
        if not _depth:
            _received, _in_place = None, False
        sys.unraisablehook = hook
        for s, handler in previous.items():
            signal.signal(s, handler)


def _stopping(unraisable) -> bool:
    """A KeyboardInterrupt raised in a `__del__` while the run stops: a second Ctrl-C, nothing to report."""
    return _received is not None and issubclass(unraisable.exc_type, KeyboardInterrupt)


@contextmanager
def stop_flag() -> Iterator[threading.Event]:
    """An event set as soon as a signal asks for a stop during the block, held back or not: for long work in other
    threads to check (reading a 3 GB file to hash it), since the stop waits for what they are doing."""
    flag = threading.Event()
    _stop_flags.append(flag)
    try:
        yield flag
    finally:
        _stop_flags.remove(flag)


def quiet_destructors() -> None:
    """For the rest of the process, which is about to end after a stop: a KeyboardInterrupt raised in a `__del__` (a
    second Ctrl-C while the DataLoader's workers shut down, after the run's sentence) is not printed as "Exception
    ignored ... Traceback". Any other exception there still is. For the command line, not for library callers."""
    hook = sys.unraisablehook
    if getattr(hook, "quiet_about_ctrl_c", False):  # installed by an earlier stop in this process
        return

    def quiet(unraisable) -> None:
        if not issubclass(unraisable.exc_type, KeyboardInterrupt):
            hook(unraisable)

    quiet.quiet_about_ctrl_c = True
    sys.unraisablehook = quiet


def _raise_stop_flags() -> None:
    for flag in _stop_flags:
        flag.set()


def leave_to_parent() -> None:
    """In a helper process: the terminal's signals are for the process that started it, which stops it itself."""
    for s in TERMINAL_SIGNALS:
        signal.signal(s, signal.SIG_IGN)


def check() -> None:
    """Raise the KeyboardInterrupt of a signal that arrived during the run but was lost on the way."""
    if _received is not None and on_main_thread():
        raise KeyboardInterrupt


@contextmanager
def ignored() -> Iterator[None]:
    """Stop signals ignored in the block: for the few lines that report a run already stopped, whose sentence (with
    its "rerun the same command to continue") an impatient second Ctrl-C cut short."""
    if not on_main_thread():
        yield
        return
    previous = {s: h for s in SIGNALS if (h := signal.getsignal(s)) is not None}  # None: set outside Python
    for s in previous:
        signal.signal(s, signal.SIG_IGN)
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def mark_output_in_place(in_place: bool = True) -> None:
    """Say that the run's output is whole and in place: for the rest of the `stop_on_signals` block (removing its work
    folder, its last notes) a stop signal changes nothing, where it would report the finished run interrupted. A
    run that starts in the same block says `False` first."""
    global _in_place
    _in_place = in_place


@contextmanager
def deferred() -> Iterator[None]:
    """A signal that would raise KeyboardInterrupt inside the block takes effect as the block is left. A second one
    takes effect at once: the way out should the block itself hang. Blocks may nest; off the main thread, where no
    signal is delivered, this does nothing."""
    global _deferring
    if _deferring or not on_main_thread():
        yield
        return
    # SIG_IGN stays ignored; None is a handler set outside Python, which cannot be put back once replaced.
    previous = {s: h for s in SIGNALS if (h := signal.getsignal(s)) is not signal.SIG_IGN and h is not None}
    pending: list[tuple[int, object]] = []

    def restore() -> None:
        for s, handler in previous.items():
            signal.signal(s, handler)

    def deliver(signum: int, frame) -> None:
        handler = previous[signum]
        if callable(handler):
            handler(signum, frame)
        else:  # SIG_DFL (SIGTERM outside a run): what the signal would have done, now
            signal.raise_signal(signum)

    def hold(signum: int, frame) -> None:
        _raise_stop_flags()
        if pending:
            restore()
            deliver(signum, frame)
        pending.append((signum, frame))

    for s in previous:
        signal.signal(s, hold)
    _deferring = True
    try:
        yield
    finally:
        _deferring = False
        restore()
        if pending:
            deliver(*pending[0])
