"""Several devices on one machine: one process per device, each embedding its shard, then one merge.

Each worker is an ordinary `embed_to_file` run into `<output>.partial/shard-K-of-N.<suffix>` (with its own
work area), so an interrupted multi-GPU run continues like a single one: finished shards are kept, unfinished
ones resume from their chunks.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import signal
import sys
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from . import interrupts
from .checkpoints import Checkpoint, resolve_checkpoint
from .config import PIL_FILTERS
from .cpus import usable_cpus
from .embed import (
    EmbedOptions,
    Progress,
    Silent,
    Summary,
    embed_to_file,
    flush_interval,
    refuse_empty_run,
)
from .errors import RunFailed, UserError, first_line, signal_name
from .locks import exclusive
from .outputs import OutputPaths, check_outputs, read_rows, refuse_inputs_among_outputs
from .resuming import interrupted_on_other_devices
from .runtime import dtype_note, load, resolve_device, resolve_dtype
from .shards import merge_outputs, select_shard
from .storage import WorkArea, shard_name


def parse_devices(spec: str) -> list[str]:
    """`--device`: one device (`auto`, `cpu`, `cuda:1`), a list (`cuda:0,cuda:1`), or `cuda:all` → the devices."""
    devices = [d.strip() for d in spec.split(",")]
    if len(devices) > 1 and "" in devices:  # `cpu,` or `cuda:0,,cuda:1`: a device left out of the list?
        raise UserError(f"--device {spec.strip()} has an empty entry: give devices such as cuda:0,cuda:1.")
    if "cuda:all" in devices and len(devices) > 1:
        raise UserError(f"--device {spec.strip()}: cuda:all is every GPU already, and is given on its own.")
    if devices == ["cuda:all"]:
        count = torch.cuda.device_count()
        if count == 0:
            raise UserError("--device cuda:all was asked for but no CUDA device is available.")
        return [f"cuda:{i}" for i in range(count)]
    return devices


@dataclass(frozen=True)
class _Job:
    index: int
    model: str
    revision: str | None
    device: str
    dtype: str
    paths: list[str]
    output: Path
    options: EmbedOptions
    compile: bool
    overwrite: bool  # a shard left by an interrupted run with other options is replaced, not refused
    cpu_devices: int  # of the run's devices, those on the CPU: they share its cores


class DevicesProgress(Progress, Protocol):
    """A run's progress on several devices: each worker's rows kept from earlier work arrive after `start`."""

    def reused(self, n: int) -> None: ...


class _QueueProgress:
    """A worker's progress, sent to the parent, which draws one bar for all devices."""

    def __init__(self, channel: mp.Queue, index: int):
        self.channel, self.index = channel, index

    def start(self, total: int, done: int) -> None:  # the parent's bar counts the run's whole total already
        self.channel.put(("reused", self.index, done))

    def advance(self, n: int) -> None:
        self.channel.put(("advance", self.index, n))

    def note(self, message: str) -> None:
        self.channel.put(("note", self.index, message))


def _log_of(job: _Job) -> Path:
    return Path(job.output).with_name(f"device-{job.index}.log")


def _work(job: _Job, channel: mp.Queue) -> None:
    # Ended when the process that started it dies, even by `kill -9`: an orphan would go on writing into the work
    # area a rerun is using (elsewhere than Linux it stops at its next message to the parent, whose queue is gone).
    interrupts.die_with_parent(signal.SIGTERM)
    # What this process and its decoding workers would print themselves (a C++ runtime's last words as a stop
    # catches it starting threads, a crash's dump) goes to a log in the work folder, not after the parent's one
    # sentence; the parent names the log when this worker dies unexplained.
    log = os.open(_log_of(job), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log, 2)
    os.close(log)
    try:
        with interrupts.stop_on_signals():  # SIGTERM, from the parent: stop as Ctrl-C stops a run, cleanly
            _embed_job(job, channel)
    except UserError as e:
        channel.put(("error", job.index, str(e)))
    except KeyboardInterrupt:
        pass
    except Exception as e:  # a bug or a device failure: the parent's one sentence names it, the log has the rest
        os.write(2, traceback.format_exc().encode(errors="backslashreplace"))  # to the log
        what = f"{type(e).__name__}: {first_line(e)}" if str(e).strip() else type(e).__name__
        message = f"the worker on {job.device} failed ({what}); its traceback is in {_log_of(job)}."
        channel.put(("crash", job.index, message))


def _embed_job(job: _Job, channel: mp.Queue) -> None:
    device = resolve_device(job.device)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)  # else calls on the current device make a context on cuda:0 in every worker
    if device.type == "cpu":
        # Each CPU device's model gets its share of the cores: on all of them each, the workers' threads waited for one
        # another at every op's barrier (`--device cpu,cpu` on 2 cores took 19 s where one device took 6).
        torch.set_num_threads(max(1, usable_cpus() // job.cpu_devices))
    embedder = load(job.model, revision=job.revision, device=job.device, dtype=job.dtype, compile=job.compile)
    summary = embed_to_file(
        embedder, job.paths, job.output, options=job.options, update=True, overwrite=job.overwrite,
        progress=_QueueProgress(channel, job.index), devices_work=Path(job.output).parent,
    )  # fmt: skip
    channel.put(("done", job.index, summary))


@contextmanager
def _ctrl_c_left_to_this_process() -> Iterator[None]:
    """Processes started in the block, and theirs, have SIGINT and SIGHUP blocked for good (the mask outlives exec).
    A terminal's Ctrl-C or hang-up reaches every process of the run: the workers stopped with a traceback each (while
    they imported torch, or as their decoding workers died), when this process stops them itself (`_stop`). Here a
    Ctrl-C or hang-up that arrives during the block is delivered as the block ends."""
    if not hasattr(signal, "pthread_sigmask"):  # Windows
        yield
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, interrupts.TERMINAL_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, interrupts.TERMINAL_SIGNALS)


def check_device_options(devices: list[str], *, shard: tuple[int, int] | None, update: bool) -> None:
    """Several devices shard the work themselves (and bring their parts up to date on a rerun)."""
    if len(devices) > 1 and (shard or update):
        given = " and ".join(option for option, on in (("--shard", shard), ("--update", update)) if on)
        raise UserError(f"several devices split the work themselves: drop {given}, or give one --device.")


def load_and_embed(
    model: str,
    devices: list[str],
    paths: list[str],
    output: Path,
    *,
    revision: str | None = None,
    dtype: str = "auto",
    compile: bool = False,
    options: EmbedOptions | None = None,
    overwrite: bool = False,
    update: bool = False,
    progress: DevicesProgress | None = None,
) -> Summary:
    """What `siglip embed` runs: load `model` on the device and embed `paths` into `output`, or, given several
    devices, one worker each (`embed_on_devices`). Notes about the model and the dtype go to `progress`, once."""
    options = options or EmbedOptions()
    progress = Silent() if progress is None else progress
    check_device_options(devices, shard=options.shard, update=update)
    if len(devices) > 1:
        checkpoint = resolve_checkpoint(model, revision=revision)  # its configs, for the note: the workers load it
        _note_preprocessing(model, checkpoint, progress)
        summary = embed_on_devices(
            model, devices, paths, output, revision=revision, dtype=dtype, options=options, overwrite=overwrite,
            compile=compile, progress=progress,
        )
        device = resolve_device(devices[0])
        compute_dtype = resolve_dtype(dtype, device)
    else:
        embedder = load(model, revision=revision, device=devices[0], dtype=dtype, compile=compile)
        if embedder.device.type == "cuda":  # what acts on the current GPU (a library's own calls) acts on this one
            torch.cuda.set_device(embedder.device)
        _note_preprocessing(model, embedder.checkpoint, progress)
        summary = embed_to_file(
            embedder, paths, output, options=options, overwrite=overwrite, update=update, progress=progress
        )
        device, compute_dtype = embedder.device, embedder.dtype
    if hint := dtype_note(device, compute_dtype, run_seconds=summary.seconds):
        progress.note(hint)  # after the run: what the next one could do differently
    return summary


def _note_preprocessing(model: str, checkpoint: Checkpoint, progress: Progress) -> None:
    """A checkpoint without image settings is embedded with SigLIP's, which the user is told."""
    if not checkpoint.preprocess_source:
        pre = checkpoint.preprocess
        progress.note(
            f"{model} has no preprocessor_config.json: assuming SigLIP's preprocessing (resize to "
            f"{pre.width}×{pre.height}, {PIL_FILTERS[pre.resample]}; pixels scaled to [-1, 1])."
        )


def embed_on_devices(
    model: str,
    devices: list[str],
    paths: list[str],
    output: Path,
    *,
    revision: str | None = None,
    dtype: str = "auto",
    options: EmbedOptions | None = None,
    overwrite: bool = False,
    compile: bool = False,
    progress: DevicesProgress | None = None,
) -> Summary:
    """Embed `paths` into `output` with one worker process per device; the result equals a single-device run.

    Each device embeds a shard into `OUT.partial/`, and the shards are merged at the end. A rerun after an
    interruption continues every shard as an `--update` of itself: finished rows are kept, files changed since are
    embedded again, and a shard made with other options is refused as one device refuses its interrupted work.
    """
    options = options or EmbedOptions()
    progress = Silent() if progress is None else progress
    # Every device checked before any file is touched: `cpu,cuda:0` without CUDA left an empty work folder.
    cpu_devices = sum(1 for d in devices if resolve_device(d).type == "cpu")
    out = OutputPaths.for_output(output)  # an unsupported suffix is refused here, not in every worker
    flush_interval()  # so is a bad SIGLIP_FLUSH_SECONDS, not once each worker has loaded the model
    with exclusive(out.embeddings):
        interrupts.mark_output_in_place(False)  # a run before this one, in the same process, may have said True
        started = time.perf_counter()
        area, published = _tidy_work_of_devices(out, len(devices), overwrite=overwrite)
        check_outputs(
            out, interrupted=area.directory.is_dir(), overwrite=overwrite or published, update=False,
            update_allowed=False,
        )  # fmt: skip
        refuse_inputs_among_outputs(out, paths)
        area.directory.mkdir(parents=True, exist_ok=True)
        count = len(devices)
        jobs = [
            _Job(
                i, model, revision, device, dtype,
                paths=select_shard(paths, i, count),
                # Of the output's format: the link's target's, for an -o link.
                output=area.directory / shard_name(i, count, out.embeddings.suffix),
                options=options,
                compile=compile,
                overwrite=overwrite,
                cpu_devices=cpu_devices,
            )
            for i, device in enumerate(devices)
        ]
        progress.start(total=len(paths), done=0)
        summaries = _run_workers(jobs, progress)
        if paths and not any(s.embedded or s.reused for s in summaries):  # as one device would, in one sentence
            order = {path: i for i, path in enumerate(paths)}
            bad = sorted((row for job in jobs for row in read_rows(OutputPaths.for_output(job.output))[1]),
                         key=lambda row: order.get(row["path"], len(order)))  # fmt: skip
            area.remove()
            refuse_empty_run(out, bad)
        merged = merge_outputs(
            [job.output for job in jobs],
            output,
            overwrite=True,
            before_replacing=area.mark_assembling,
            hold_lock=False,  # held since the start of the run
        )
        area.remove()  # its assembling mark last, as one device's
        embedded = sum(s.embedded for s in summaries)
        return Summary(
            embedded=embedded,
            reused=merged.rows - embedded,  # rows of shards finished by an earlier, interrupted run
            failed=merged.failed,
            removed=0,
            unchecked=0,  # the workers' shards never keep rows unchecked: `--update` runs on one device
            output=merged.output,
            manifest=merged.manifest,
            errors=merged.errors,
            seconds=time.perf_counter() - started,
        )


def _tidy_work_of_devices(out: OutputPaths, devices: int, *, overwrite: bool) -> tuple[WorkArea, bool]:
    """The work area, tidied of what an earlier run left, and whether that run had put its output in place
    (`published`), as `resuming._tidy_earlier_work` does for one device. With --overwrite too, shards an interrupted run
    on as many devices left are continued (its rerun); each worker replaces its shard if it was made with other
    options. A run stopped after the merge had put the output in place still has its shards here: they are brought
    up to date and merged again. The work of a run on one device, or on another number of them, is removed with
    --overwrite (or where it holds nothing worth keeping), and refused otherwise."""
    area = WorkArea(out.work)
    area.refuse_if_closed()
    area.finish_assembling()  # a merge stopped between its renames
    published = area.published(out.embeddings)
    earlier = area.device_count()
    if (area.exists() or earlier not in (None, devices)) and not published:
        if overwrite or not out.work_kept():  # no stale shards are left to mislead a rerun; nor empty ones kept
            area.remove()
        else:  # work of a run on other devices is not ours to throw away
            raise interrupted_on_other_devices(out.work, 1 if area.exists() else earlier)
    return area, published


def _run_workers(jobs: list[_Job], progress: DevicesProgress) -> list[Summary]:
    # The resource tracker that the queue below starts inherits these warning filters. It removes what a worker
    # stopped mid-run could not (its decoding workers' semaphores), correctly, with a warning that would follow the
    # one sentence of a Ctrl-C: cleaned up, it is nothing for the user to act on.
    if _QUIET_TRACKER not in sys.warnoptions:
        sys.warnoptions.append(_QUIET_TRACKER)
    # spawn, not fork: CUDA cannot be initialised in a forked child, and each worker owns one device.
    context = mp.get_context("spawn")
    channel = context.Queue()
    processes = {job.index: context.Process(target=_work, args=(job, channel)) for job in jobs}
    summaries: dict[int, Summary] = {}
    try:
        # Inside the try: a Ctrl-C held back while they start is delivered as the block ends, and those started
        # must be stopped, not left to die on the queue this process takes away as it exits.
        with _ctrl_c_left_to_this_process():
            for process in processes.values():
                process.start()
        while len(summaries) < len(jobs):
            try:
                with interrupts.deferred():  # the queue's lock, as in `decoding`: Ctrl-C takes effect within a second
                    kind, index, payload = channel.get(timeout=1.0)
            except queue.Empty:
                _raise_if_a_worker_died(jobs, processes, summaries, channel)
                continue
            if kind == "done":
                summaries[index] = payload
            elif kind == "error":
                raise UserError(payload)
            elif kind == "crash":
                raise RunFailed(payload)
            elif kind == "reused":
                progress.reused(payload)
            elif kind == "advance":
                progress.advance(payload)
            elif kind == "note":
                progress.note(f"{jobs[index].device}: {payload}")
    finally:
        _stop([process for job_index, process in processes.items() if job_index not in summaries and process.is_alive()])
        for process in processes.values():
            if process.pid is not None:  # started
                process.join()
    return list(summaries.values())


def _raise_if_a_worker_died(
    jobs: list[_Job], processes: dict[int, mp.Process], done: dict[int, Summary], channel: mp.Queue
) -> None:
    """A worker's last message is in the pipe before it exits: dead, and nothing left to read after that, means it
    crashed. Its "done" may have come just after the wait timed out, and it exited since."""
    for index, process in processes.items():
        if index not in done and not process.is_alive() and channel.empty():
            code = process.exitcode
            how = f"killed by {signal_name(-code)}" if code < 0 else f"exit code {code}"
            log = _log_of(jobs[index])
            raise RunFailed(f"the worker on {jobs[index].device} stopped ({how}); what it printed is in {log}.")


_QUIET_TRACKER = "ignore::UserWarning:multiprocessing.resource_tracker"


def _stop(processes: list[mp.Process], *, grace_s: float = 10.0) -> None:
    """Stop unfinished workers with SIGTERM, which they take as Ctrl-C: each shuts its decoding workers down and
    leaves nothing behind (killed outright, they leaked semaphores, and a warning about them followed the one
    sentence). Those still running after `grace_s` are killed."""
    for process in processes:
        process.terminate()
    deadline = time.monotonic() + grace_s
    for process in processes:
        process.join(timeout=max(0.0, deadline - time.monotonic()))
        if process.is_alive():
            process.kill()
