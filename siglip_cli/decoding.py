"""Files → pixel batches for the model: decoding worker processes, and JPEGs left for the device's decoder.

Workers decode and preprocess `PARCEL_SIZE` consecutive files at a time; the main process puts their parcels
together into the run's fixed batches, in file order. The first files may come decoded already, by the head start
that `siglip embed` begins before torch is imported (`headstart`). A file that cannot be decoded becomes an error
row, whatever the exception, and never stops the batch.
"""

from __future__ import annotations

import dataclasses
import errno
import gc
import io
import math
import multiprocessing
import multiprocessing.queues
import os
import pickle
import signal
import sys
import tempfile
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Generator, Iterator, NamedTuple

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, get_worker_info

try:  # torch's private check of its loader's workers (what its own SIGCHLD handler runs): see `_worker_deaths_raised_here`
    from torch.utils.data._utils.signal_handling import _error_if_any_worker_fails
except ImportError:  # moved in some torch release: the loader still notices a dead worker, within 5 s

    def _error_if_any_worker_fails() -> None:
        pass


from . import headstart, interrupts
from .config import PreprocessConfig
from .cpus import usable_cpus
from .errors import first_line, os_reason, signal_name
from .limits import available_memory, file_size_limit, open_files_limit, open_files_now, raising_open_files
from .gpu_decode import JpegHeader, decode_headers, device_index, read_header
from .preprocess import DecodeOptions, bad_file_reason, load_pixels
from .reading import error_facts, failure_reason, pixels_and_facts
from .text import Note, counted, display_path, no_note


class Item(NamedTuple):
    index: int
    pixels: Tensor | None  # (3, H, W), or None for a bad file or a JPEG left for the device decoder
    info: dict  # manifest fields of a good file, or the error row of a bad one (`error_row`)
    jpeg: JpegHeader | None = None  # a JPEG the model's device will decode (--decode gpu)

    @property
    def failed(self) -> bool:
        return self.pixels is None and self.jpeg is None


def decode_file(
    path: str, cfg: PreprocessConfig, options: DecodeOptions, *, jpeg_to_device: bool = False
) -> tuple[Tensor | None, dict, JpegHeader | None]:
    """One file → (pixels, facts for the manifest, None); with `jpeg_to_device`, a JPEG the device decoder takes
    comes back as (None, facts, its header) instead. Raises on any problem with the file."""

    def for_device(data: bytes) -> JpegHeader | None:
        header = read_header(data, cfg, options)
        return header if isinstance(header, JpegHeader) else None

    pixels, facts, jpeg = pixels_and_facts(path, cfg, options, for_device=for_device if jpeg_to_device else None)
    return (torch.from_numpy(pixels) if pixels is not None else None), facts, jpeg


class ImageFiles(Dataset):
    """Decodes and preprocesses files by index; a bad file becomes an error item, never an exception."""

    def __init__(self, paths: list[str], cfg: PreprocessConfig, options: DecodeOptions, *, jpeg_to_device: bool):
        self.paths, self.cfg, self.options, self.jpeg_to_device = paths, cfg, options, jpeg_to_device

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: int | tuple[int, str]) -> Item:
        """The item of file `key`: its index, or (index, path) as `_ParcelSampler` hands it to a worker."""
        index, path = key if isinstance(key, tuple) else (key, self.paths[key])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow's corrupt-EXIF and palette warnings: the file either works or fails
            try:
                pixels, facts, jpeg = decode_file(path, self.cfg, self.options, jpeg_to_device=self.jpeg_to_device)
                return Item(index, pixels, {"path": path, **facts}, jpeg)
            except Exception as e:  # per file, whatever the class: one bad file never stops a run
                return _failed_item(index, path, failure_reason(e, path))


def _failed_item(index: int, path: str, reason: str) -> Item:
    """The item of a file that could not be decoded: its error row, with its size and mtime where known."""
    return Item(index, None, error_row({"path": path, **error_facts(path)}, reason))


def error_row(info: dict, reason: str) -> dict:
    """The errors file's row of a file that failed: its path, why, and its size and mtime where known (by which a
    later --update tells whether it changed)."""
    return {"path": info["path"], "error": reason, **{k: info[k] for k in ("size", "mtime_ns") if k in info}}


# How decoding workers start. Where they can be (Linux, the BSDs), they are forked: they start at once, with what this
# process has imported (torch among it), and as children of this process, which `_worker_init` relies on. Python
# 3.14 made `forkserver` the default there: each worker then imported torch again, was a child of the server, and
# `_worker_init` took the server for a dead parent, so every file was decoded again one process each (360 photos: 6
# minutes, and 296 of them failed). macOS (where forking a process that uses its system libraries is unsafe) and
# Windows start them their default way, `spawn`.
_FORKED = sys.platform != "darwin" and "fork" in multiprocessing.get_all_start_methods()
WORKER_CONTEXT = multiprocessing.get_context("fork" if _FORKED else None)


def _worker_init(_: int) -> None:
    # A run killed (kill -9, the out-of-memory killer) takes its workers with it at once: the loader's own check
    # would end them only 5 s on, decoding and holding memory meanwhile.
    interrupts.die_with_parent(signal.SIGKILL)
    parent = multiprocessing.parent_process()
    if parent is not None and os.getppid() != parent.pid:  # it died before that was asked
        os._exit(0)
    interrupts.leave_to_parent()  # a Ctrl-C or a hang-up stops the main process, which then shuts this one down
    torch.set_num_threads(1)  # decoding workers must not fight the model for cores
    _sockets_where_they_fit()
    _parcels_never_dropped()
    sys.excepthook = _quiet_if_the_main_process_left
    _quiet_c_libraries()


# A Unix socket's path holds at most 107 bytes. A worker hands its pixels over through one that multiprocessing makes
# in the worker's temporary folder, as `<TMPDIR>/pymp-XXXXXXXX/listener-XXXXXXXX`: 32 bytes more than TMPDIR.
SOCKET_TMPDIR_MAX = 107 - 32


def _sockets_where_they_fit() -> None:
    """In a decoding worker, before it hands anything over: where TMPDIR is too long for those sockets, this process's
    temporary files go to /tmp. Under a longer TMPDIR (a cluster's per-job scratch folder) the socket could not be
    made, the worker's queue thread printed why and dropped the parcel, and the run waited for it forever."""
    if len(tempfile.gettempdir()) > SOCKET_TMPDIR_MAX and os.access("/tmp", os.W_OK | os.X_OK):
        tempfile.tempdir = "/tmp"


def _parcels_never_dropped() -> None:
    """In a decoding worker: a parcel that its queue's thread cannot send ends the worker, which the loader then
    takes for any worker that died (`_parcels`). multiprocessing's own handling prints the error and drops the
    parcel, and the run waited for it forever: no thread left for the socket that passes the pixels' file
    descriptors over (`ulimit -u`, a container's pids limit), or a parcel that cannot be pickled."""

    def ended(error: Exception, parcel: object) -> None:  # one line: the run goes on, this is no crash of ours
        # The one print outside the entry points (cli.py, __main__.py): a worker's last words, said where they can
        # still be said (before `_exit`).
        print(f"note: a decoding worker cannot hand its files over ({type(error).__name__}: {first_line(error)}): it "
              "stops, and they are decoded again.", file=sys.stderr, flush=True)
        os._exit(1)

    multiprocessing.queues.Queue._on_queue_feeder_error = staticmethod(ended)  # the hook it keeps for subclasses


def _quiet_c_libraries() -> None:
    """Let C decoders write to /dev/null, not over the progress bar. libtiff writes to file descriptor 2 itself: a
    line per bad scanline of a damaged scan ("Fax4Decode: Bad code word at line 4 of strip 0"), naming no file or
    a temporary one. A file that fails still gets its row in the errors file; Python's own stderr keeps the
    terminal, so a worker's traceback is still seen."""
    try:
        terminal = os.dup(2)
        sys.stderr = open(terminal, "w", buffering=1, encoding=sys.stderr.encoding or "utf-8", errors="backslashreplace")
        devnull = os.open(os.devnull, os.O_WRONLY)
    except OSError:  # no stderr at all (closed by the caller): nothing to protect
        return
    os.dup2(devnull, 2)
    os.close(devnull)


def _quiet_if_the_main_process_left(kind: type[BaseException], value: BaseException, tb) -> None:
    # A worker hands its tensors over through a thread that serves file descriptors and reports its errors through
    # sys.excepthook. After Ctrl-C the main process may hang up mid-handshake: a broken pipe in the worker, whose
    # traceback would follow the one sentence the user gets. Anything else is printed as usual.
    if not issubclass(kind, (ConnectionError, EOFError)):
        sys.__excepthook__(kind, value, tb)


# Files per unit of worker work. The model's batch is assembled from such parcels, so every worker is busy from the
# first batch on. With a whole batch per worker, one worker decodes each batch alone: on an H200 host's 16 cores
# (15 workers, 256-image batches) that embedded 35 images/s with the CPU decoder, where reading the JPEG bytes
# alone ran at 831 images/s.
PARCEL_SIZE = 16

# A decoder stuck in a loop on one malformed file would hang the run, and every rerun, at that file. A worker that
# has been on one file this long is stopped, and the file becomes an error row (`_Watch`). A real decode takes a
# small part of it: 1 to 3 s for a 108-MP JPEG or PNG on one Zen 4 core, and Pillow's own limit is 179 MP
# (`--max-pixels`); a 30 MB photo read at 1 MB/s from a slow share, 30 s.
STUCK_AFTER_S = 300
# A wait of a second that took longer than this: the run was stopped meanwhile (Ctrl-Z, a Slurm suspend, `docker
# pause`), its decoders with it, and the time its files seem to have taken is not theirs. (A machine's sleep does not
# count: the monotonic clock stops with it.)
PAUSED_AFTER_S = 60


def _pause(last: float, now: float) -> float:
    """How long the run was stopped between two readings of the monotonic clock about a second apart; 0 if not."""
    return now - last if now - last > PAUSED_AFTER_S else 0.0


class _Watch:
    """Which file each decoding worker is on, and since when, in memory the workers share with the main process,
    whose thread (`_stuck_workers_stopped`) stops a worker that has been on one file for `STUCK_AFTER_S`."""

    def __init__(self, workers: int):
        self.pids = WORKER_CONTEXT.RawArray("q", workers)
        self.since = WORKER_CONTEXT.RawArray("d", workers)  # time.monotonic(), one clock for every process
        self.files = WORKER_CONTEXT.RawArray("q", [-1] * workers)  # -1: between files

    def start(self, worker: int, index: int) -> None:
        self.pids[worker], self.since[worker] = os.getpid(), time.monotonic()
        self.files[worker] = index  # last: a file seen here has its start time set

    def done(self, worker: int) -> None:
        self.files[worker] = -1

    def restart_clocks(self) -> None:
        """Count each worker's time on its file from now: after a pause of the run (`PAUSED_AFTER_S`)."""
        now = time.monotonic()
        for worker in range(len(self.since)):
            self.since[worker] = now

    def stuck(self) -> Iterator[tuple[int, int]]:
        """(pid, file index) of each worker on one file for longer than `STUCK_AFTER_S`."""
        now = time.monotonic()
        for worker, index in enumerate(self.files):
            # Read again after the time: a worker that moved on meanwhile may have left a file's time to another.
            if index >= 0 and now - self.since[worker] > STUCK_AFTER_S and self.files[worker] == index:
                yield self.pids[worker], index


class _Watched(Dataset):
    """`files` as the workers of one DataLoader decode them, each noting in `watch` which file it is on. Made with
    its loader, before the workers fork, so that they share that loader's `watch`."""

    def __init__(self, files: ImageFiles, watch: _Watch):
        self.files, self.watch = files, watch

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, key: tuple[int, str]) -> Item:
        worker = get_worker_info().id  # only workers decode it: a loader without workers has no watch
        self.watch.start(worker, key[0])
        try:
            return self.files[key]
        finally:
            self.watch.done(worker)


def _stuck_reason() -> str:
    return f"its decoding took longer than {STUCK_AFTER_S} s and was stopped (a decoder stuck in a loop?)"


@contextmanager
def _stuck_workers_stopped(watch: _Watch | None, stuck: set[int], note: Note,
                           paths: list[str]) -> Iterator[None]:  # fmt: skip
    """While the block runs, a thread kills the decoding workers `watch` finds stuck, and adds their files to
    `stuck`. The loader then fails as for any worker that died, and `_parcels` recovers."""
    if watch is None:
        yield
        return
    finished = threading.Event()

    def watching() -> None:
        last = time.monotonic()
        while not finished.wait(1.0):
            now = time.monotonic()
            if _pause(last, now):
                watch.restart_clocks()
            last = now
            for pid, index in watch.stuck():
                if index in stuck:
                    continue
                stuck.add(index)
                note(f"a decoder was stuck on {display_path(paths[index])} for {STUCK_AFTER_S} s: it is stopped, "
                     "and the file listed in the errors file.")  # fmt: skip
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:  # it ended by itself meanwhile
                    pass

    thread = threading.Thread(target=watching, name="siglip-stuck-decoders", daemon=True)
    thread.start()
    try:
        yield
    finally:
        finished.set()
        thread.join()


@dataclass(frozen=True)
class Parcel:
    """What a worker hands over for a few consecutive files: pixels decoded on the CPU stacked into one tensor, and
    the JPEGs for the device decoder as one buffer of bytes (one shared-memory block crosses over, not one per file).

    A dataclass, not a NamedTuple: `__len__` counts files, and a NamedTuple's `_replace` (the copy `pin_memory`
    makes) checks its field count with `len`, so every pinned parcel (CUDA) would fail."""

    rows: list[dict]  # manifest facts of the good files, in order
    errors: list[dict]  # the error rows of the bad ones (`error_row`)
    pixels: Tensor | None  # (b, 3, H, W) for the rows at `cpu_rows`
    cpu_rows: list[int]
    jpeg_bytes: Tensor | None  # the files at `jpeg_rows`, end to end
    jpeg_facts: list[JpegFacts]  # of each
    jpeg_rows: list[int]

    def __len__(self) -> int:
        return len(self.rows) + len(self.errors)

    def pin_memory(self) -> Parcel:  # called by the DataLoader's pinning thread when the model runs on CUDA
        return dataclasses.replace(self, pixels=self.pixels.pin_memory()) if self.pixels is not None else self


class JpegFacts(NamedTuple):
    """A `JpegHeader` less its bytes, which a parcel carries end to end in one buffer: how many they are."""

    size: int
    orientation: int
    width: int
    height: int


class SharedMemoryFull(RuntimeError):
    """A worker could not put its parcel in shared memory (/dev/shm): containers often get 64 MB of it."""


def _collate(items: list[Item]) -> Parcel:
    good = [item for item in items if not item.failed]
    cpu_rows = [i for i, item in enumerate(good) if item.pixels is not None]
    jpeg_rows = [i for i, item in enumerate(good) if item.jpeg is not None]
    jpegs = [good[i].jpeg for i in jpeg_rows]
    parcel = Parcel(
        rows=[item.info for item in good],
        errors=[item.info for item in items if item.failed],
        pixels=torch.stack([good[i].pixels for i in cpu_rows]) if cpu_rows else None,
        cpu_rows=cpu_rows,
        jpeg_bytes=torch.cat([j.data for j in jpegs]) if jpegs else None,
        jpeg_facts=[JpegFacts(len(j.data), j.orientation, j.width, j.height) for j in jpegs],
        jpeg_rows=jpeg_rows,
    )
    if get_worker_info() is not None:
        # Moved to shared memory here, as sending would do anyway: a failure here reaches the main process through
        # the loader, where `_parcels` recovers; in the worker's sending thread it would lose the parcel, and the
        # run would wait for it forever.
        try:
            for tensor in (parcel.pixels, parcel.jpeg_bytes):
                if tensor is not None:
                    tensor.share_memory_()
        except RuntimeError as e:
            raise SharedMemoryFull(first_line(e)) from None
    return parcel


@dataclass(frozen=True)
class Batch:
    """The files of one model batch, in order: the parcels of its files put together (no pixels are copied)."""

    rows: list[dict]
    errors: list[dict]
    pixels: list[Tensor]  # each parcel's CPU-decoded pixels, in the order of `cpu_rows`
    cpu_rows: list[int]
    jpegs: list[JpegHeader]  # views into the parcels' byte buffers, for the rows at `jpeg_rows`
    jpeg_rows: list[int]

    def __len__(self) -> int:
        return len(self.rows) + len(self.errors)

    @classmethod
    def of(cls, parcels: list[Parcel]) -> Batch:
        rows, errors, pixels, cpu_rows, jpegs, jpeg_rows = [], [], [], [], [], []
        for parcel in parcels:
            offset = len(rows)
            rows += parcel.rows
            errors += parcel.errors
            if parcel.pixels is not None:
                pixels.append(parcel.pixels)
            cpu_rows += [offset + i for i in parcel.cpu_rows]
            if parcel.jpeg_bytes is not None:
                files = parcel.jpeg_bytes.split([facts.size for facts in parcel.jpeg_facts])
                for data, facts in zip(files, parcel.jpeg_facts):
                    jpegs.append(JpegHeader(data, facts.orientation, facts.width, facts.height))
            jpeg_rows += [offset + i for i in parcel.jpeg_rows]
        return cls(rows, errors, pixels, cpu_rows, jpegs, jpeg_rows)


def batch_pixels(
    batch: Batch, cfg: PreprocessConfig, device: torch.device, options: DecodeOptions
) -> tuple[Tensor | None, list[dict], list[dict]]:
    """The batch's pixels on `device` (the model's), with its good rows and any new errors.

    JPEGs are decoded here on the device, in groups sized to its memory (`gpu_decode.decode_headers`); one the
    device decoder rejects, or one too large for its memory, gets the CPU path, which also gives a truly broken
    file its proper error."""
    # Pinned on CUDA: the copies do not hold this thread up (they run in order on the current stream, the model's).
    cpu_pixels = [p.to(device, non_blocking=True) for p in batch.pixels]
    if not batch.jpegs:
        return (torch.cat(cpu_pixels) if cpu_pixels else None), batch.rows, []
    pixels = torch.empty(len(batch.rows), 3, cfg.height, cfg.width, device=device)
    if cpu_pixels:
        pixels[device_index(batch.cpu_rows, device)] = torch.cat(cpu_pixels)
    on_device, decoded, rejected = decode_headers(batch.jpegs, cfg, device=device)
    pixels[device_index([batch.jpeg_rows[i] for i in decoded], device)] = on_device
    failed, errors = set(), []
    for i, _ in rejected:
        row = batch.jpeg_rows[i]
        try:
            on_cpu = torch.from_numpy(load_pixels(io.BytesIO(batch.jpegs[i].data.numpy().tobytes()), cfg, options)[0])
        except Exception as e:  # per file, as in the workers (a device error below is not the file's fault)
            failed.add(row)
            errors.append(error_row(batch.rows[row], bad_file_reason(e)))
        else:  # pinned, so that the copy does not wait behind the forward queued on the device
            pixels[row] = on_cpu.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else on_cpu
    if not failed:
        return pixels, batch.rows, errors
    keep = [i for i in range(len(batch.rows)) if i not in failed]
    if not keep:
        return None, [], errors
    return pixels[device_index(keep, device)], [batch.rows[i] for i in keep], errors


# What one decoding worker may hold at its peak: an 89 MP photo took 1.0-1.5 GB. One at the default pixel limit
# (179 MP) may take more (a CMYK JPEG: 1.9 GB); budgeting for those would halve the workers of a mid-size machine
# for photos few libraries hold, and a worker the kernel kills for memory costs only its file (`_parcels`).
WORKER_PEAK_BYTES = 1_500_000_000
# The most decoding processes started by default: a host of many cores would otherwise start one per core, each
# with its start-up and memory, to feed one model. `--workers N` takes more.
MAX_WORKERS = 16


def default_workers() -> int:
    """Decoding processes: one per usable CPU (`cpus.usable_cpus`) but the one the model's main process needs, at
    most `MAX_WORKERS`, and no more than the memory available now can hold at their peak (16 on panoramas could need
    24 GB)."""
    by_cpus = max(1, min(MAX_WORKERS, usable_cpus() - 1))
    available = available_memory()
    return by_cpus if available is None else max(1, min(by_cpus, available // WORKER_PEAK_BYTES))


@dataclass(frozen=True)
class _ParcelSampler:
    """The DataLoader's batch sampler: the files of each batch span in parcels of `size`, made as they are needed
    (a list of them would cost ~40 bytes per file, 400 MB for ten million photos).

    With `paths`, each file goes to its worker as (index, path). A worker that took the path from the list it
    inherited at the fork wrote to the memory of each string it touched (its reference count), which the kernel then
    copied for it, page by page: each of two workers ended with a copy of nearly every path, 40 MB each for 400,000
    photos."""

    spans: list[tuple[int, int]]
    size: int
    paths: list[str] | None = None

    def __iter__(self) -> Iterator[range | list[tuple[int, str]]]:
        for start, end in self.spans:
            for first in range(start, end, self.size):
                parcel = range(first, min(first + self.size, end))
                yield parcel if self.paths is None else [(index, self.paths[index]) for index in parcel]

    def __len__(self) -> int:
        return sum(math.ceil((end - start) / self.size) for start, end in self.spans)


def decoded_batches(
    paths: list[str],
    cfg: PreprocessConfig,
    options: DecodeOptions,
    *,
    batch_size: int,
    workers: int,
    pin: bool,
    jpeg_to_device: bool = False,
    note: Note = no_note,
) -> Iterator[Batch]:
    """Batches of `batch_size` files in order (fixed slices of `paths`), decoded by `workers` processes ahead of
    the model, `PARCEL_SIZE` files at a time, with about two batches in flight, but for the first files the head start
    decoded (`headstart.take`). `note` hears of a change of plan."""
    spans = [(start, min(start + batch_size, len(paths))) for start in range(0, len(paths), batch_size)]
    files = ImageFiles(paths, cfg, options, jpeg_to_device=jpeg_to_device)
    head = _head_start(paths, cfg, options, jpeg_to_device)
    parcels = _parcels(files, spans, batch_size, workers, pin, note, head)
    try:
        for start, end in spans:
            parts: list[Parcel] = []
            while sum(map(len, parts)) < end - start:
                parts.append(next(parcels))
            batch = Batch.of(parts)
            _named_by(batch, paths[start:end])
            yield batch
        next(parcels, None)  # asked once more, the finished loader shuts its workers down, in ordinary code
    finally:
        parcels.close()  # now, even if a traceback keeps this frame: the loader's workers stop with it


def _named_by(batch: Batch, paths: list[str]) -> None:
    """Name `batch`'s rows with the strings of `paths` (its files), not the copies that came back from the workers:
    a run keeps every row to its end, and each path would be held twice (its length + 49 bytes a photo)."""
    ours = {path: path for path in paths}
    for row in (*batch.rows, *batch.errors):
        row["path"] = ours.get(row["path"], row["path"])


def _head_start(paths: list[str], cfg: PreprocessConfig, options: DecodeOptions, jpeg_to_device: bool) -> list[Item]:
    """The items of `paths`' first files that the head start decoded (`headstart`), if any; it is stopped."""
    if jpeg_to_device:  # the JPEGs are the device decoder's
        headstart.stop()
        return []
    items = []
    for index, (pixels, facts_or_why) in enumerate(headstart.take(paths, cfg, options)):
        if pixels is None:
            items.append(_failed_item(index, paths[index], facts_or_why))
        else:
            items.append(Item(index, torch.from_numpy(pixels), facts_or_why))
    return items


def _parcels(
    files: ImageFiles, spans: list[tuple[int, int]], batch_size: int, workers: int, pin: bool,
    note: Note, head: list[Item],
) -> Iterator[Parcel]:  # fmt: skip
    """The parcels of `spans`, in order, from a DataLoader; never one parcel across two spans. `head`: the items
    of the first files (from file 0), decoded already by the head start, which no worker decodes again: handed over,
    a parcel a span, once the workers have started, so that they decode what follows while the model runs these.

    A worker that dies (a native decoder's crash, the kernel's out-of-memory killer) would end the run, and every
    rerun, at the same file; one stuck on a file would hang it. A stuck worker is killed (`_stuck_workers_stopped`),
    and for a worker that died the files it may have held, those of the parcels in flight, are decoded again one
    process each (but a stuck one), so that the culprit alone becomes an error row; a fresh DataLoader takes the
    rest.
    Where the workers cannot start, or cannot hand parcels over (shared memory, open files), the rest is decoded in
    this process.
    """
    size = min(PARCEL_SIZE, batch_size)
    waiting = iter([_collate(head[a:b]) for a, b in _clip(spans, 0, len(head))])  # a parcel a batch
    done = len(head)  # files handed over, or about to be: `spans` is what is left, from here on
    spans = _clip(spans, done, len(files))
    stuck: set[int] = set()  # files whose decoding was stopped

    def prefetch(workers: int) -> int:
        """Parcels each worker has in flight: about two batches in all, capped at the number of parcels (2 at the
        least). The loader starts by asking for every one of its prefetch slots: uncapped, `-b 1000000000` on ten
        files would spend minutes asking."""
        return max(2, min(math.ceil(2 * batch_size / (size * workers)), len(_ParcelSampler(spans, size))))

    workers = _workers_within_open_files(workers, prefetch, note)
    while spans:
        prefetch_factor = prefetch(workers) if workers else None
        stop = yield from _loader_parcels(files, spans, size, workers, prefetch_factor, pin, waiting, stuck, note)
        done += stop.handed_over
        if stop.worker_died:
            # At most this far: the loader hands each worker that many parcels at most, and a parcel at a batch's end
            # holds fewer than `size` files. Counting too far costs only files decoded one process each, never one lost.
            in_flight = done + size * prefetch_factor * workers
            for first, end in _clip(spans, done, in_flight):
                yield _collate(_each_alone(files, range(first, end), workers, stuck))
            done = in_flight
        elif stop.without_workers:
            note(stop.without_workers)
            workers = 0
        else:
            return  # every parcel handed over
        spans = _clip(spans, done, len(files))
    yield from waiting  # the head start decoded every file


class _LoaderStop(NamedTuple):
    """Where one DataLoader stopped: after `handed_over` files of its parcels (not counting the head start's), at the
    end of its spans unless one of the failures below."""

    handed_over: int
    worker_died: bool = False  # the files it may have held are lost with it
    without_workers: str = ""  # its workers cannot go on: the note that says why, and that this process takes the rest


def _loader_parcels(
    files: ImageFiles, spans: list[tuple[int, int]], size: int, workers: int, prefetch_factor: int | None, pin: bool,
    waiting: Iterator[Parcel], stuck: set[int], note: Note,
) -> Generator[Parcel, None, _LoaderStop]:  # fmt: skip
    """The parcels of `spans` from one DataLoader with `workers` workers, in order, after what is left of the head
    start's, `waiting`, once the workers have started (they decode the spans while the model runs those). Returns how
    far it went, and why it stopped short where it did, for the failures `_parcels` recovers from; any other error
    is raised."""
    # The loader's own code runs with signals deferred: a Ctrl-C inside it could leave one of its queue locks
    # held, and the shutdown of its workers would wait for that lock forever (see `interrupts`).
    with warnings.catch_warnings(), interrupts.deferred(), _sigchld_left_as_it_was():
        warnings.filterwarnings("ignore", message="This DataLoader will create")  # more workers than CPUs: as asked
        try:
            watch = _Watch(workers) if workers else None  # in shared memory too
            loader = DataLoader(
                _Watched(files, watch) if watch else files,
                batch_sampler=_ParcelSampler(spans, size, files.paths if workers else None),
                num_workers=workers,
                collate_fn=_collate,
                worker_init_fn=_worker_init if workers else None,
                multiprocessing_context=WORKER_CONTEXT if workers else None,
                prefetch_factor=prefetch_factor,
                pin_memory=pin,
            )
            arriving = iter(loader)
        except OSError as e:  # its queues' semaphores live in /dev/shm: full, read-only; or no process to fork
            if not workers:
                raise
            _drop_half_made(e)
            return _LoaderStop(0, without_workers=_cannot_start(e, workers))
    handed_over = 0
    try:
        with _stuck_workers_stopped(watch, stuck, note, files.paths):
            yield from waiting
            for _ in range(len(loader)):
                with interrupts.deferred(), _worker_deaths_raised_here():
                    parcel = next(arriving)
                handed_over += len(parcel)
                yield parcel
        with interrupts.deferred():
            next(arriving, None)  # the finished iterator shuts its workers down (not in a `__del__`, see `interrupts`)
        return _LoaderStop(handed_over)
    except RuntimeError as e:
        if (stop := _stop_after(e, handed_over, workers)) is None:
            raise
        return stop
    except (ConnectionError, EOFError):  # a parcel's shared memory was being handed over as its worker died
        if not workers:
            raise
        return _LoaderStop(handed_over, worker_died=True)
    finally:
        with interrupts.deferred():
            del arriving  # the workers stop as the iterator goes


def _cannot_start(error: OSError, workers: int) -> str:
    """The note of a loader whose `workers` could not start (`_LoaderStop.without_workers`)."""
    reason = os_reason(error)
    if error.errno in (errno.ENOSPC, errno.EROFS, errno.EACCES):
        reason += "; their queues need a writable /dev/shm"
    return f"cannot start {counted(workers, 'decoding worker')} ({reason}): decoding in this process, which is slower."


def _stop_after(error: RuntimeError, handed_over: int, workers: int) -> _LoaderStop | None:
    """Where a loader that raised `error` after `handed_over` files stopped, for the failures `_parcels` recovers
    from: a dead worker, or workers that cannot hand parcels over (shared memory, open files). None: any other
    error, for the caller to raise."""
    decoding_workers = counted(workers, "decoding worker")
    if isinstance(error, SharedMemoryFull):
        limit = file_size_limit() if os.strerror(errno.EFBIG) in str(error) else None
        if limit is not None:  # a parcel is a file, which `ulimit -f` limits as any other
            return _LoaderStop(handed_over, without_workers=(
                f"the file size limit (`ulimit -f` allows {limit // 1024:,} KB) is too small for the parcels of "
                f"{decoding_workers}: decoding in this process from here on, which is slower."
            ))  # fmt: skip
        return _LoaderStop(handed_over, without_workers=(
            f"the shared memory (/dev/shm) is too small for the parcels of {decoding_workers} "
            f"({_raised_in_worker(error)}): decoding in this process from here on, which is slower (in a container, "
            "give it more: docker run --shm-size=2g)."
        ))  # fmt: skip
    if workers and str(error).startswith("Too many open files"):  # a parcel in transit holds descriptors
        return _LoaderStop(handed_over, without_workers=(
            f"too many open files for {decoding_workers} (`ulimit -n` is {open_files_limit()}): decoding in this "
            f"process from here on, which is slower ({raising_open_files()})."
        ))  # fmt: skip
    if str(error).startswith("DataLoader worker"):
        return _LoaderStop(handed_over, worker_died=True)
    return None


def _workers_within_open_files(workers: int, prefetch: Callable[[int], int], note: Note) -> int:
    """As many of `workers` as `ulimit -n` lets hand their parcels over (`open_files_needed`, with `prefetch(w)`
    parcels in flight each), raising the soft limit first where the hard one allows; a note when fewer."""
    opened = open_files_now() if workers else 0  # a parent (a shell, a wrapper script) may have left some open to us
    limit = open_files_limit(wanted=opened + open_files_needed(workers, prefetch(workers))) if workers else None
    if not limit:
        return workers
    fitting = next((w for w in range(workers, 0, -1) if open_files_needed(w, prefetch(w)) <= limit - opened), 0)
    if fitting < workers:
        instead = f"taking {fitting} instead, which is slower" if fitting else "decoding in this process instead"
        note(f"`ulimit -n` is {limit}, too few open files for {counted(workers, 'decoding worker')}: {instead} "
             f"({raising_open_files()}).")  # fmt: skip
    return fitting


def _raised_in_worker(error: BaseException) -> str:
    """The message of an error a decoding worker raised. The loader raises it again here with the worker's
    traceback as its message ("Caught X in DataLoader worker process 0. Original Traceback ..."), which ends with
    the original's line, `module.X: message`."""
    return str(error).strip().splitlines()[-1].partition(": ")[2] or str(error)


# Open files a run may hold: each parcel in transit from a decoding worker is a few descriptors. Runs failed mid-way
# with `ulimit -n` at 20 (one worker, 8 parcels in flight), 32 (four, 8), 40 (one, 32), 48 (two, 32; eight, 16):
# about 12 + one a parcel in flight + four a worker. These leave about twice that.
OPEN_FILES_PER_RUN = 32
OPEN_FILES_PER_PARCEL = 2
OPEN_FILES_PER_WORKER = 8


def open_files_needed(workers: int, prefetch: int) -> int:
    """Open files a run may hold with `workers` decoding workers, each with `prefetch` parcels in flight."""
    return OPEN_FILES_PER_RUN + (OPEN_FILES_PER_PARCEL * prefetch + OPEN_FILES_PER_WORKER) * workers


def _drop_half_made(error: BaseException) -> None:
    """Free what the frames of `error`'s traceback hold, quietly: a DataLoader iterator that failed in its
    `__init__` fails again in its `__del__`, on attributes it never set, and Python prints that as a traceback."""
    hook = sys.unraisablehook
    sys.unraisablehook = lambda unraisable: None
    try:
        error.__traceback__ = None
        gc.collect()
    finally:
        sys.unraisablehook = hook


def _clip(spans: list[tuple[int, int]], start: int, end: int) -> list[tuple[int, int]]:
    """The parts of `spans` between file `start` and file `end`."""
    return [(max(a, start), min(b, end)) for a, b in spans if b > start and a < end]


# The DataLoader's SIGCHLD handler raises its "worker killed" error wherever the main thread happens to be: in the
# model, or halfway through writing a file. We keep it to `next`, the one place that recovers; a worker that died
# in between is found as `next` is called (without the check, the loader would notice it only after 5 s). These two
# keep it so.
@contextmanager
def _sigchld_left_as_it_was() -> Iterator[None]:
    """Put back the SIGCHLD handler set before the block: the DataLoader installs its own as its workers start."""
    if not interrupts.on_main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGCHLD)
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGCHLD, previous)


@contextmanager
def _worker_deaths_raised_here() -> Iterator[None]:
    """The DataLoader's check for dead workers, inside the block only (around `next`, the one place that recovers);
    a worker that died before it is found as the block starts."""
    if not interrupts.on_main_thread():  # where no signal handler can be set, the loader notices within 5 s on its own
        yield
        return
    _error_if_any_worker_fails()
    previous = signal.signal(signal.SIGCHLD, lambda signum, frame: _error_if_any_worker_fails())
    try:
        yield
    finally:
        signal.signal(signal.SIGCHLD, previous)


def _each_alone(files: ImageFiles, indices: range, workers: int, stuck: set[int]) -> list[Item]:
    """`files[i]` for each index, each decoded in a process of its own, `workers` at a time; a file whose process
    dies, or takes longer than `STUCK_AFTER_S`, becomes an error item that says how, as does one already `stuck`
    without being decoded again."""

    def one(index: int, stop: threading.Event) -> Item:
        if index in stuck:  # its worker was stopped on it: not tried again
            return _failed_item(index, files.paths[index], _stuck_reason())
        return _decode_alone(files, index, stop)

    with interrupts.stop_flag() as stop:
        with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="siglip-decode-alone") as pool:
            return list(pool.map(lambda index: one(index, stop), indices))


def _decode_alone(files: ImageFiles, index: int, stop: threading.Event) -> Item:
    path = files.paths[index]
    receiver, sender = WORKER_CONTEXT.Pipe(duplex=False)
    child = WORKER_CONTEXT.Process(
        target=_decode_for_parent, args=(sender, path, files.cfg, files.options, files.jpeg_to_device)
    )
    child.start()
    sender.close()
    last = time.monotonic()
    given_up_at = last + STUCK_AFTER_S
    try:
        while not receiver.poll(0.5):  # in slices: a Ctrl-C stops the run now, not when the decoder is done
            if stop.is_set():
                raise KeyboardInterrupt
            now = time.monotonic()
            given_up_at += _pause(last, now)
            last = now
            if now > given_up_at:
                return _failed_item(index, path, _stuck_reason())
        item = pickle.loads(receiver.recv_bytes())._replace(index=index)
    except EOFError:  # the process died before it answered
        child.join()
        # A process started by another thread first polls every child multiprocessing knows, and may reap this one
        # between our poll and its own: the exit code is then ours to read a moment later, not at once.
        deadline = time.monotonic() + 5
        while child.exitcode is None and time.monotonic() < deadline:
            time.sleep(0.01)
        return _failed_item(index, path, _death(child.exitcode))
    finally:
        receiver.close()
        child.join(timeout=0 if stop.is_set() or time.monotonic() > given_up_at else 10)  # a stuck one is killed
        if child.is_alive():
            child.kill()
            child.join()
    return item


def _death(exit_code: int | None) -> str:
    """Why a file's decoding process ended without an answer, for the errors file."""
    if exit_code == -signal.SIGKILL:
        return "its decoding process was killed (SIGKILL: out of memory?)"
    if exit_code is not None and exit_code < 0:
        return f"its decoding process crashed ({signal_name(-exit_code)})"
    return f"its decoding process exited without an answer (exit code {exit_code})"


def _decode_for_parent(sender, path: str, cfg: PreprocessConfig, options: DecodeOptions, jpeg_to_device: bool) -> None:
    _worker_init(0)
    # Plain pickle: the tensors travel in the bytes. multiprocessing's own pickler would pass them as shared memory,
    # which the parent could no longer map once this process has exited.
    sender.send_bytes(pickle.dumps(ImageFiles([path], cfg, options, jpeg_to_device=jpeg_to_device)[0]))
    sender.close()
