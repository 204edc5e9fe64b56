"""A head start for the first batches: their photos decoded while torch is imported and the model loaded.

`siglip embed` spends its first 1.5-2 s importing torch and loading the model, on one core, and its decoding
workers start only once the model is ready: on a small machine the model then waited for its first batch (0.7 s of
an 11 s run of 48 photos on 2 cores). Before torch is imported, `begin` forks one process (cheap then, and safe: no
other Python thread runs, and torch's thread pools are not made yet) that does what the run will do first: it
lists the inputs, reads the checkpoint's preprocessing from this machine (a folder, or the Hub's cache), and decodes
the first files (`siglip embed` asks for two batches, as many as fit in `PIXEL_BYTES`), each as a decoding worker
would (`reading.pixels_and_facts`), into memory it shares with this process. When the model is ready, `decoding`
calls `take`: the process is stopped, and the files it finished are the run's, if they are the first the run has to
embed and were decoded with the run's settings. The workers decode everything else, as before.

It is a guess, checked when taken, so it never changes an output: a checkpoint whose settings differ once resolved
(a newer commit on the Hub), a run that continues earlier work, anything unexpected in the process, and nothing is
taken. It is started only where it can pay: the model on the CPU (a GPU's machine has cores to spare), two usable
CPUs at least, decoding workers wanted, on Linux; not for paths read from stdin (read once, by the run), nor for
inputs that take over `WALK_SECONDS` to list. `siglip embed` asks for none with --update, --shard or --decode gpu.
"""

from __future__ import annotations

import atexit
import fcntl
import hashlib
import mmap
import os
import pickle
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from multiprocessing.connection import Connection

import numpy as np

from . import interrupts
from .checkpoints import local_preprocessing
from .config import PreprocessConfig
from .cpus import usable_cpus
from .files import discover
from .preprocess import DecodeOptions
from .reading import failure_reason, pixels_and_facts

# Shared memory for the decoded pixels, reserved but not used until written (an anonymous mapping): two batches of
# 32 at 384 x 384 (113 MB), 42 images at 512 x 512; fewer files are decoded where fewer fit.
PIXEL_BYTES = 128 << 20
# Device files of NVIDIA's driver, ROCm's and WSL2's GPU: where they are, `--device auto` is likely to mean a GPU.
GPU_NODES = ("/dev/nvidiactl", "/dev/kfd", "/dev/dxg")
# A tree that takes longer to list is one where a second won at the start does not count, and its list would cost
# this process memory the run needs (a path is about 150 bytes; the run lists them too).
WALK_SECONDS = 5.0
REAP_SECONDS = 1.0  # a process killed amid a read of a hung network share dies only once the read returns
PIPE_BYTES = 1 << 20  # room for the files' facts, so the process never waits on this one to read them
_F_SETPIPE_SZ = 1031  # <linux/fcntl.h>


@dataclass
class _Process:
    pid: int
    messages: Connection  # the process's plan, then each file's facts (or why it failed), as they are done
    pixels: mmap.mmap  # the files' pixels, one slot each, in order
    options: DecodeOptions


_running: _Process | None = None


def begin(
    inputs: list[str],
    *,
    files_from: str | None,
    model: str,
    revision: str | None,
    device: str,
    count: int,
    options: DecodeOptions,
) -> None:
    """Start decoding the first `count` files of `inputs` (and `files_from`) for `model`, as many as fit in
    `PIXEL_BYTES`, where it can pay (see above); `take` or `stop` ends it. Call before torch is imported."""
    if _running is None and _pays(device, files_from):
        _start(inputs, files_from, model, revision, count, options)


def _pays(device: str, files_from: str | None) -> bool:
    """Whether a head start can pay here, and the process can be forked safely."""
    return (
        (device == "cpu" or (device == "auto" and not any(os.path.exists(node) for node in GPU_NODES)))
        and sys.platform.startswith("linux")
        and "torch" not in sys.modules  # imported already: no time left to win (and its threads may not be forked)
        and threading.active_count() == 1  # no Python thread holds a lock the process would inherit held
        and usable_cpus() >= 2
        and (files_from is None or (files_from != "-" and os.path.isfile(files_from)))  # stdin, a pipe: read once
    )


def _start(
    inputs: list[str], files_from: str | None, model: str, revision: str | None, count: int, options: DecodeOptions
) -> None:
    global _running
    try:
        pixels = mmap.mmap(-1, PIXEL_BYTES)
        reading, writing = os.pipe()
    except OSError:
        return
    try:
        fcntl.fcntl(writing, _F_SETPIPE_SZ, PIPE_BYTES)
    except OSError:  # a smaller pipe only lets the process wait sooner, for `take`
        pass
    parent = os.getpid()
    # Ctrl-C held back over the fork: the new process ignores it before it can arrive, and this one gets it after.
    held = signal.pthread_sigmask(signal.SIG_BLOCK, interrupts.TERMINAL_SIGNALS)
    try:
        with warnings.catch_warnings():
            # Python 3.12+ warns of any fork beside other threads: numpy's BLAS has idle ones, which the new process
            # never calls (it decodes and rescales; no matrix product).
            warnings.simplefilter("ignore", DeprecationWarning)
            pid = os.fork()
    except OSError:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)
        os.close(reading)
        os.close(writing)
        return
    if pid == 0:  # the head start itself, which ends here whatever happens (an error included: the run reports it)
        try:
            interrupts.leave_to_parent()  # Ctrl-C is for the run, which stops this process itself
            signal.pthread_sigmask(signal.SIG_SETMASK, held)
            os.close(reading)
            _decode_first_files(inputs, files_from, model, revision, count, options, Connection(writing), pixels, parent)
        finally:
            os._exit(0)
    os.close(writing)
    _running = _Process(pid, Connection(reading), pixels, options)
    atexit.unregister(stop)
    atexit.register(stop)  # a run that ends before taking it (an error, Ctrl-C) stops it too
    signal.pthread_sigmask(signal.SIG_SETMASK, held)  # a Ctrl-C held back arrives now, with the process known


def take(paths: list[str], cfg: PreprocessConfig, options: DecodeOptions) -> list[tuple[np.ndarray | None, dict | str]]:
    """Stop the head start, and give what it finished of `paths`' first files, decoded with `cfg` and `options`:
    for each, from the first on, its pixels and its manifest facts, or None and why it failed. Empty when there is
    no head start, or it guessed other files or settings."""
    process = _stopped()
    if process is None:
        return []
    done: list[tuple[np.ndarray | None, dict | str]] = []
    try:
        with process.messages:  # what is in the pipe: all it sent, or (not yet dead) what it sent so far
            plan = pickle.loads(process.messages.recv_bytes()) if process.messages.poll() else {}
            if (plan.get("cfg"), process.options) != (cfg, options) or plan["paths"] != _digest(paths[: plan["count"]]):
                return []
            while process.messages.poll():
                index, facts = pickle.loads(process.messages.recv_bytes())
                if index != len(done):
                    return done
                if isinstance(facts, str):  # why the file failed
                    done.append((None, facts))
                else:
                    done.append((_slot(process.pixels, index, cfg).copy(), facts))  # no view may outlive the memory
    except (EOFError, OSError, pickle.UnpicklingError, KeyError, TypeError, ValueError):  # the end of what it did
        pass
    finally:
        process.pixels.close()
    return done


def stop() -> None:
    """Stop the head start, if one is running, and give its memory back."""
    process = _stopped()
    if process is not None:
        process.messages.close()
        process.pixels.close()


def _stopped() -> _Process | None:
    global _running
    process, _running = _running, None
    if process is not None:
        try:
            os.kill(process.pid, signal.SIGKILL)  # what it has not finished, the workers decode
            deadline = time.monotonic() + REAP_SECONDS
            while os.waitpid(process.pid, os.WNOHANG) == (0, 0) and time.monotonic() < deadline:
                time.sleep(0.005)
        except (ProcessLookupError, ChildProcessError):  # reaped already
            pass
    return process


def _slot(pixels: mmap.mmap, index: int, cfg: PreprocessConfig) -> np.ndarray:
    """File `index`'s (3, height, width) float32 pixels in the shared memory: a view of it."""
    size = 3 * cfg.height * cfg.width
    return np.frombuffer(pixels, np.float32, size, index * size * 4).reshape(3, cfg.height, cfg.width)


def _digest(paths: list[str]) -> str:
    return hashlib.blake2b("\0".join(paths).encode("utf-8", "surrogateescape"), digest_size=16).hexdigest()


def _decode_first_files(
    inputs: list[str],
    files_from: str | None,
    model: str,
    revision: str | None,
    count: int,
    options: DecodeOptions,
    messages: Connection,
    pixels: mmap.mmap,
    parent: int,
) -> None:
    """The head start's process: the plan (which files, with which settings), then each file's pixels into its slot
    and its facts. Silent whatever happens: the run itself reports every problem. Its caller ends the process."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the run's handler, copied with the process
    interrupts.die_with_parent(signal.SIGKILL)  # and it dies with the run
    if os.getppid() != parent:  # the run ended before that was set
        return
    try:  # short of memory, the kernel stops this process before the run: what it did, the workers can redo
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("1000")
    except OSError:
        pass
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)  # C decoders' messages
    sys.stdout = sys.stderr = open(devnull, "w")  # Python's (stderr has a descriptor of its own: `__main__`)
    warnings.simplefilter("ignore")
    cfg = local_preprocessing(model, revision)
    if cfg is None:
        return
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    signal.setitimer(signal.ITIMER_REAL, WALK_SECONDS)  # SIGALRM, which ends the process
    paths = discover(inputs, files_from=files_from)[: min(count, PIXEL_BYTES // (3 * cfg.height * cfg.width * 4))]
    signal.setitimer(signal.ITIMER_REAL, 0)
    messages.send_bytes(pickle.dumps({"cfg": cfg, "count": len(paths), "paths": _digest(paths)}))
    for index, path in enumerate(paths):
        try:
            array, facts, _ = pixels_and_facts(path, cfg, options)
        except Exception as e:  # per file, as in the workers
            messages.send_bytes(pickle.dumps((index, failure_reason(e, path))))
            continue
        _slot(pixels, index, cfg)[:] = array
        messages.send_bytes(pickle.dumps((index, {"path": path, **facts})))
