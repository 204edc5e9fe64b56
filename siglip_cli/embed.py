"""The main job: images → embeddings, robust to bad files, resumable, streamed to disk.

Work is done in fixed batches of the pending files, in the order given (sorted when earlier rows are merged in).
Finished batches are flushed every few seconds as chunks into a work area beside the output (`<output>.partial/`);
the final files are assembled from the chunks at the end (manifest and errors first, the embeddings file last,
each atomically), so the presence of the output means the run finished; a run stopped between those renames is
finished by its rerun (`WorkArea.finish_assembling`). A rerun of an interrupted command reuses the chunks and embeds
only the rest; `--update` also reuses the rows of an existing output whose files did not change (what a run starts
from: `resuming`; which rows: `earlier_rows`).

The Python API: `load` (from runtime), `embed_paths` (in memory), `embed_to_file` (to files: what the CLI runs on
each device, through `devices.load_and_embed`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import time
from contextlib import closing, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple, NoReturn, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from . import earlier_rows, gpu_decode, interrupts, resuming
from .concurrency import look_ahead
from .config import CPU_BATCH_SIZE
from .decoding import Batch, batch_pixels, decoded_batches, default_workers, error_row
from .errors import UserError, first_line, whole_number
from .files import discover
from .locks import exclusive
from .outputs import (
    OUTPUT_DTYPES,
    OutputPaths,
    Ref,
    RowsByPath,
    assemble,
    output_metadata,
    public_row,
    refuse_inputs_among_outputs,
)
from .preprocess import DecodeOptions
from .run_states import run_state
from .runtime import Embedder, dtype_name, load, out_of_memory
from .storage import WorkArea, WriteError, write_jsonl
from .text import counted, display_path

__all__ = ["EmbedOptions", "EmbedResult", "Embedder", "Summary", "embed_paths", "embed_to_file", "load"]


# At most this much finished work is lost to a kill -9 or a power cut (SIGLIP_FLUSH_SECONDS to tune: `flush_interval`).
FLUSH_SECONDS = 5.0
CHUNK_BYTES = 64 << 20  # ...and a chunk is flushed sooner when its tensors reach this size (bounded memory)
# Batches the device decoder works on at once, each in a thread (and on a CUDA stream) of its own, while the model
# runs: the decoder is the loop's bottleneck on a GPU. On an H200 the loop ran at 1,448 images/s with one thread,
# 1,613 with two, and no faster with three or four (bench/RESULTS.md); each thread holds a call's memory.
DEVICE_DECODE_THREADS = 2


@dataclass(frozen=True)
class EmbedOptions:
    """How a run embeds, beyond the model: the options of `siglip embed` (README, "Options")."""

    normalize: bool = True
    tokens: bool = False
    output_dtype: str = "float32"
    batch_size: int = CPU_BATCH_SIZE
    workers: int = field(default_factory=default_workers)
    decode: DecodeOptions = DecodeOptions()  # how PIL decodes a file (EXIF, pixel limit, --fast-decode)
    # Which decoder reads the JPEGs (--decode). "cpu": PIL, pixel-exact with the reference. "gpu": in batches by
    # nvJPEG on the model's device (libjpeg-turbo through the same code on a CPU device), within cosine 0.999 of the
    # exact path. "auto": gpu when the model runs on CUDA.
    decoder: str = "cpu"
    # (K, N) when this run embeds part K of N (--shard): written into the metadata, so that `merge` can tell
    # when a part is missing. Not one of the run's options: the parts of one run differ only in it.
    shard: tuple[int, int] | None = None
    # With `shard`: the inputs as given (`shards.shard_inputs`), recorded so that `merge` can refuse parts that
    # named their files differently. None: not recorded.
    shard_inputs: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        """A value the command line would refuse, from a library caller: one sentence, before any work (unchecked, a
        batch size of -1 would give no rows and no error, and float64 a KeyError once the work folder is made)."""
        for name, least in (("batch_size", 1), ("workers", 0)):
            if not whole_number(value := getattr(self, name), least):
                raise UserError(f"{name} must be a whole number of at least {least}, not {value!r}.")
        for name in ("normalize", "tokens"):
            if not isinstance(getattr(self, name), bool):
                raise UserError(f"{name} must be True or False, not {getattr(self, name)!r}.")
        if self.output_dtype not in OUTPUT_DTYPES:
            raise UserError(f"output_dtype must be one of {', '.join(OUTPUT_DTYPES)}, not {self.output_dtype!r}.")
        if self.decoder not in ("auto", "cpu", "gpu"):
            raise UserError(f"decoder must be auto, cpu or gpu, not {self.decoder!r}.")
        if not isinstance(self.decode, DecodeOptions):
            raise UserError(f"decode must be a DecodeOptions, not {type(self.decode).__name__}.")
        if self.shard is not None and not _is_shard(self.shard):  # written into the metadata, which merge trusts
            raise UserError(f"shard must be (K, N), whole numbers with 0 <= K < N, not {self.shard!r}.")
        if self.shard_inputs is not None and (
            not isinstance(self.shard_inputs, tuple) or not all(isinstance(p, str) for p in self.shard_inputs)
        ):
            raise UserError(f"shard_inputs must be a tuple of paths as text, not {self.shard_inputs!r}.")


def _is_shard(value: object) -> bool:
    return isinstance(value, tuple) and len(value) == 2 and all(map(whole_number, value)) and value[0] < value[1]


class Progress(Protocol):
    """What a run reports as it goes; the command line draws it as a bar with images/s."""

    def start(self, total: int, done: int) -> None: ...  # `done`: rows kept from earlier work, not embedded now
    def advance(self, n: int) -> None: ...  # rows embedded (or failed) just now
    def note(self, message: str) -> None: ...


class Silent:
    """The progress of a run nobody watches: `Progress`, and `devices.DevicesProgress`'s `reused` too."""

    def start(self, total: int, done: int) -> None:
        pass

    def advance(self, n: int) -> None:
        pass

    def note(self, message: str) -> None:
        pass

    def reused(self, n: int) -> None:
        pass


@dataclass
class Summary:
    """What a run did, as `--json` prints it."""

    embedded: int  # images embedded by this run
    reused: int  # rows taken from earlier work (an interrupted run, or the previous output with --update)
    failed: int
    removed: int  # rows of the previous output whose files are gone (--update)
    unchecked: int  # rows of the previous output kept as they were: their files cannot be looked at now (--update)
    output: str
    manifest: str
    errors: str | None
    seconds: float
    unchanged: bool = False  # the output was left as it was: this run would have written it again, the same

    def to_dict(self) -> dict:
        rate = self.embedded / self.seconds if self.seconds > 0 else 0.0
        return {**asdict(self), "images_per_s": round(rate, 3), "seconds": round(self.seconds, 3)}


def weights_fingerprint(model: torch.nn.Module, samples: int = 4096) -> str:
    """A digest of `model`'s parameters as it computes with them (so the compute dtype counts too): each one's
    shape, dtype and `samples` of its values spread over the whole tensor. A few milliseconds, where hashing every
    byte would read so400m's 1.7 GB on each run; a fine-tune changes every value, so the samples see it."""
    digest = hashlib.blake2b(digest_size=16)
    with torch.no_grad():
        for parameter in model.parameters():
            flat = parameter.detach().reshape(-1)
            spread = torch.linspace(0, flat.numel() - 1, min(flat.numel(), samples), dtype=torch.float64).long()
            sampled = flat[spread.to(flat.device)].cpu()
            digest.update(f"{tuple(parameter.shape)} {parameter.dtype};".encode())
            digest.update(sampled.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def embed_to_file(
    embedder: Embedder,
    paths: str | os.PathLike | Iterable[str | os.PathLike],
    output: str | os.PathLike,
    *,
    options: EmbedOptions | None = None,
    overwrite: bool = False,
    update: bool = False,
    progress: Progress | None = None,
    devices_work: Path | None = None,
) -> Summary:
    """Embed `paths` (in this order; with `update`, sorted among the earlier rows: `earlier_rows.settle`) into
    `output` (.safetensors or .npy) plus its manifest and errors files.

    `devices_work`: the work folder of the several-device run this output is one shard of, named in its refusals.
    Of a whole run (no `options.shard`, no `devices_work`), inputs none of which could be embedded are an error
    (`refuse_empty_run`): an earlier output is left as it was, and with none only the errors file is written; a part
    may be empty or all bad, and the merge decides.
    """
    started = time.perf_counter()
    flush_seconds = flush_interval()
    paths, options, progress = _checked_arguments(paths, options, progress)
    options = dataclasses.replace(options, decoder=_decoder_for(embedder, options.decoder, progress))
    out = OutputPaths.for_output(Path(output))
    # A second run writing this output is refused, not interleaved; a full disk is one sentence.
    with exclusive(out.embeddings), _resumable_after_write_errors(out):
        interrupts.mark_output_in_place(False)  # a run before this one, in the same process, may have said True
        refuse_inputs_among_outputs(out, paths)
        state = run_state(
            embedder.checkpoint, options, compute_dtype=dtype_name(embedder.dtype), output_format=out.format,
            weights=weights_fingerprint(embedder.model),
        )
        # The user's --update of a whole output keeps the rows of files still there, whatever this run's inputs.
        # A shard (its inputs decide its part) and a several-device worker (its part of this run) keep only theirs.
        whole_run = options.shard is None and devices_work is None
        keep_unlisted = update and whole_run
        earlier = resuming.earlier_work(
            out, state, paths, overwrite=overwrite, update=update, keep_unlisted=keep_unlisted,
            devices_work=devices_work, shard=options.shard, note=progress.note,
        )  # fmt: skip
        work, settled = earlier.work, earlier.settled
        paths, done = settled.paths, settled.done
        pending = [p for p in paths if p not in done]
        progress.start(total=len(paths), done=len(done))
        new = _embed_pending(
            embedder, pending, work, options, progress, first_seq=earlier.next_seq, flush_seconds=flush_seconds
        )
        results = {**done, **new} if done else new  # no copy of every entry where nothing was done before
        if devices_work is None:  # a several-device worker's errors file is not the one the user gets
            _note_failing_since(earlier.previous, new, out, progress)
        good, bad = _split(paths, results)
        if not good and paths and whole_run:
            work.remove()
            refuse_empty_run(out, bad)
        interrupts.check()
        metadata = output_metadata(embedder.checkpoint, state, shard=options.shard, inputs=options.shard_inputs)
        unchanged = resuming.as_it_was(out, earlier.previous, good, bad, metadata)
        if unchanged:  # in place already: a stop signal from here on changes nothing, as after `assemble`
            interrupts.mark_output_in_place()
        else:
            assemble(out, good, bad, metadata, before_replacing=work.mark_assembling)
        work.remove()
        summary = _summary(out, settled, new, failed=len(bad), seconds=time.perf_counter() - started)
        return dataclasses.replace(summary, unchanged=unchanged)


def _checked_arguments(
    paths: str | os.PathLike | Iterable[str | os.PathLike], options: EmbedOptions | None, progress: Progress | None
) -> tuple[list[str], EmbedOptions, Progress]:
    """`embed_to_file`'s arguments as a Python caller may give them, checked: one sentence for a wrong type. Paths
    as text, each once (a path given twice is one row), a single path a list of one; the default options and a
    progress that says nothing where none are given."""
    paths = [paths] if isinstance(paths, (str, bytes, os.PathLike)) else list(paths)
    if not all(isinstance(p, (str, bytes, os.PathLike)) for p in paths):
        raise UserError("paths must be file paths (str or pathlib.Path), as `discover` gives them.")
    if options is not None and not isinstance(options, EmbedOptions):
        raise UserError(f"options must be an EmbedOptions, not {type(options).__name__}.")
    if progress is not None and not all(callable(getattr(progress, m, None)) for m in ("start", "advance", "note")):
        raise UserError(f"progress must have start, advance and note methods (embed.Progress), not {progress!r}.")
    return (
        list(dict.fromkeys(map(os.fsdecode, paths))),
        options or EmbedOptions(),  # made now: its worker count follows the memory available now
        Silent() if progress is None else progress,
    )


def _split(paths: list[str], results: RowsByPath) -> tuple[list[Ref], list[dict]]:
    """The rows of `paths` in order: those embedded, and the error rows of those that failed."""
    good: list[Ref] = []
    bad: list[dict] = []
    for path in paths:
        row = results[path]
        (good if isinstance(row, Ref) else bad).append(row)
    return good, bad


def _summary(
    out: OutputPaths, settled: earlier_rows.Settled, new: RowsByPath, *, failed: int, seconds: float
) -> Summary:
    """What the run did: rows embedded now (`new`), reused from earlier work (`settled`), failed, removed."""
    return Summary(
        embedded=sum(1 for r in new.values() if isinstance(r, Ref)),
        reused=sum(1 for p, r in settled.done.items() if isinstance(r, Ref) and p not in settled.unchecked),
        failed=failed,
        removed=settled.removed,
        unchecked=sum(1 for r in settled.unchecked.values() if isinstance(r, Ref)),
        output=str(out.embeddings),
        manifest=str(out.manifest),
        errors=str(out.errors) if failed else None,
        seconds=seconds,
    )


def flush_interval() -> float:
    """How often finished batches are saved to the work area: SIGLIP_FLUSH_SECONDS where set, else FLUSH_SECONDS."""
    value = os.environ.get("SIGLIP_FLUSH_SECONDS")
    if value is None:
        return FLUSH_SECONDS
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not 0 <= seconds < math.inf:
        raise UserError(f"SIGLIP_FLUSH_SECONDS is {value!r}, not a number of seconds (such as 5 or 0.5).")
    return seconds


def _note_failing_since(
    previous: RowsByPath, new: RowsByPath, out: OutputPaths, progress: Progress
) -> None:
    """Files the earlier output embedded that now fail (damaged since, a sync cut short) lose their rows to error
    rows: said, since in the summary's count of failures they read like new files."""
    broken = [p for p, row in new.items() if not isinstance(row, Ref) and isinstance(previous.get(p), Ref)]
    broken.sort(key=os.fsencode)
    if broken:
        one = len(broken) == 1
        progress.note(
            f"{counted(len(broken), 'file')} embedded in the earlier output now fail{'s' if one else ''} "
            f"({display_path(broken[0])}: {new[broken[0]]['error']}{'' if one else '; …'}): "
            f"{'its row is' if one else 'their rows are'} replaced by {'an error row' if one else 'error rows'} in "
            f"{display_path(str(out.errors))}."
        )


def refuse_empty_run(out: OutputPaths, bad: list[dict]) -> NoReturn:
    """None of the inputs could be embedded: one sentence with the first file's reason. An earlier, finished output
    is left untouched; otherwise the errors file is written, so that every reason can be read."""
    first = f"{display_path(bad[0]['path'])}: {bad[0]['error']}"
    if len(bad) == 1:
        failed = f"could not embed {first}"
    else:
        failed = f"none of the {len(bad):,} input files could be embedded (the first, {first})"
    if out.embeddings.exists():  # an --update whose files are all gone or fail: not emptied (a drive not mounted?)
        raise UserError(
            f"{failed.removesuffix('.')}; {display_path(str(out.embeddings))} is left as it was, with every row it had: "
            "a run that would leave no row does not replace it (remove it to start afresh)."
        )
    write_jsonl(out.errors, (public_row(r) for r in bad))
    raise UserError(f"{failed.rstrip('.')}." if len(bad) == 1 else f"{failed}: see {out.errors}.")  # Pillow's end in .


@contextmanager
def _resumable_after_write_errors(out: OutputPaths) -> Iterator[None]:
    """A file that cannot be written (a full disk, a folder made read-only) ends the run with a sentence that says
    whether the work so far is kept."""
    try:
        yield
    except WriteError as e:  # the chunks written before are on disk, fsynced
        if not out.work.is_dir():  # none made yet, or gone (the errors file of a run that embedded nothing)
            raise
        rerun = "once the files can be written, rerun the same command"
        then = out.kept_work(rerun) or rerun
        raise WriteError(f"{str(e).removesuffix('.')}; {then}.") from None  # one sentence


class Embedded(NamedTuple):
    """One batch's results, on the host: float32 rows in the order of `rows`."""

    count: int  # files in the batch, good and bad
    rows: list[dict]
    errors: list[dict]
    embeddings: np.ndarray | None  # (b, D), L2-normalized if asked
    tokens: np.ndarray | None  # (b, T, D) when asked


def embedded_batches(
    embedder: Embedder, paths: list[str], options: EmbedOptions, progress: Progress | None = None
) -> Iterator[Embedded]:
    """Files → embeddings, `options.batch_size` files at a time, in order: decoding workers, the device decoder, the
    model. A row not finite in `options.output_dtype`, the type it will be stored in, is an error row instead.
    `options.decoder`: "cpu" or "gpu", as `_decoder_for` resolved it."""
    gpu_decoder = options.decoder == "gpu"
    progress = Silent() if progress is None else progress
    batches = decoded_batches(
        paths,
        embedder.preprocess,
        options.decode,
        batch_size=options.batch_size,
        workers=options.workers,
        pin=embedder.device.type == "cuda",
        jpeg_to_device=gpu_decoder,
        note=progress.note,
    )
    halved = _Halving(progress)

    def prepare(batch: Batch) -> tuple[Batch, tuple[Tensor | None, list[dict], list[dict]]]:
        return batch, batch_pixels(batch, embedder.preprocess, embedder.device, options.decode)

    # The device decoder's host side (file bytes to nvJPEG, Huffman decoding) runs in threads a batch or two ahead,
    # while the model works on the GPU; its kernels run on a stream of their own, which the model's stream waits for
    # (`gpu_decode.decode_headers`).
    threads = DEVICE_DECODE_THREADS
    ahead = look_ahead(batches, prepare, depth=2 * threads if gpu_decoder else 0, threads=threads)
    try:
        for batch, (pixels, rows, errors) in ahead:
            if pixels is None:
                yield Embedded(len(batch), rows, batch.errors + errors, None, None)
                continue
            pooled, toks = halved.encode(embedder, pixels, keep_tokens=options.tokens)
            pooled = F.normalize(pooled, dim=-1) if options.normalize else pooled
            rows, pooled, toks, overflowed = _finite_rows(embedder, rows, pooled, toks, options.output_dtype)
            errors = batch.errors + errors + overflowed
            if not rows:
                yield Embedded(len(batch), rows, errors, None, None)
                continue
            toks = toks.float().cpu().numpy() if toks is not None else None
            yield Embedded(len(batch), rows, errors, pooled.cpu().numpy(), toks)
    finally:  # now, even when an error's traceback keeps this frame: the decoding workers stop with it
        ahead.close()
        batches.close()


def _finite_rows(
    embedder: Embedder, rows: list[dict], pooled: Tensor, tokens: Tensor | None, output_dtype: str
) -> tuple[list[dict], Tensor, Tensor | None, list[dict]]:
    """The rows whose embedding (and tokens) are finite, computed and as stored, and an error row for each of the
    others: float16 can overflow inside the tower or in the output file, and a row of NaNs or infinities stored
    as an embedding would poison every search it enters."""
    stored_dtype = getattr(torch, output_dtype)

    def finite(x: Tensor) -> Tensor:  # per row
        return torch.isfinite(x).flatten(1).all(dim=-1)

    inside = finite(pooled)  # as computed
    stored = finite(pooled.to(stored_dtype))
    if tokens is not None:
        inside &= finite(tokens)
        stored &= finite(tokens.to(stored_dtype))
    keep = inside & stored
    ok = keep.tolist()
    if all(ok):
        return rows, pooled, tokens, []
    computed = f"the model gave NaN or infinite values in {dtype_name(embedder.dtype)}"
    computed += ": try --dtype float32" if embedder.dtype != torch.float32 else ""
    too_large = f"values beyond {output_dtype}'s range: try --output-dtype float32"
    failed = [
        error_row(row, too_large if computed_ok else computed)
        for row, good, computed_ok in zip(rows, ok, inside.tolist())
        if not good
    ]
    kept = [row for row, good in zip(rows, ok) if good]
    return kept, pooled[keep], (tokens[keep] if tokens is not None else None), failed


def _embed_pending(
    embedder: Embedder,
    pending: list[str],
    work: WorkArea,
    options: EmbedOptions,
    progress: Progress,
    *,
    first_seq: int,
    flush_seconds: float,
) -> RowsByPath:
    results: RowsByPath = {}
    if not pending:
        return results
    out_dtype = OUTPUT_DTYPES[options.output_dtype]
    buffer = _ChunkBuffer()
    seq, last_flush = first_seq, time.monotonic()
    batches = embedded_batches(embedder, pending, options, progress)
    try:
        for batch in batches:
            interrupts.check()  # a Ctrl-C that a `__del__` swallowed stops the run here
            # Converted first: a batch joins the buffer whole, or not at all (a MemoryError in a conversion, a
            # Ctrl-C), and what a stopped run flushes is whole batches.
            embeddings = batch.embeddings.astype(out_dtype) if batch.embeddings is not None else None
            tokens = batch.tokens.astype(out_dtype) if embeddings is not None and batch.tokens is not None else None
            with interrupts.deferred():
                buffer.add(batch, embeddings, tokens)
            progress.advance(batch.count)
            if time.monotonic() - last_flush >= flush_seconds or buffer.nbytes() >= CHUNK_BYTES:
                results.update(buffer.flush(work, seq))
                seq, last_flush = seq + 1, time.monotonic()
    except BaseException:
        # Ctrl-C, SIGTERM or an error (CUDA, a full disk): the batches finished since the last flush are kept too, for
        # the rerun (a second Ctrl-C stops at once); a flush that fails in turn does not hide why the run stopped.
        try:
            buffer.flush(work, seq)
        except Exception as lost:
            why = first_line(lost).rstrip(".")
            progress.note(f"the batches embedded in the last few seconds could not be saved ({why}).")
        raise
    finally:
        batches.close()
    results.update(buffer.flush(work, seq))
    return results


def _decoder_for(embedder: Embedder, decoder: str, progress: Progress) -> str:
    """`auto` → `gpu` when the model runs on CUDA, the checkpoint's resize filter has a GPU equivalent and the
    device decoder works there (else `cpu`, the exact path, with a note where it is the decoder that fails). `gpu`
    that cannot be is a UserError, raised before any work is started: the work area records the decoder, so a run
    refused later could not be continued with `--decode cpu`."""
    on_cuda = embedder.device.type == "cuda"
    if decoder == "auto":
        if not (on_cuda and gpu_decode.supported(embedder.preprocess)):
            return "cpu"
        if (fault := gpu_decode.fault(embedder.device)) is not None:
            progress.note(f"the GPU JPEG decoder does not work here ({fault}): decoding on the CPU.")
            return "cpu"
        return "gpu"
    if decoder == "gpu":
        gpu_decode.check_supported(embedder.preprocess)
        if on_cuda and (fault := gpu_decode.fault(embedder.device)) is not None:
            raise UserError(f"the GPU JPEG decoder does not work here ({fault}): use --decode cpu or auto.")
        if not on_cuda:
            progress.note(
                "--decode gpu with the model on the CPU decodes through torchvision's libjpeg-turbo: not pixel-exact "
                "with the reference, and no faster than the default."
            )
    return decoder


class _Halving:
    """Out of memory (CUDA's, or the CPU allocator's for one huge tensor): run batches in pieces of half the size
    that failed, as small as needed; say so once.

    The piece size that fits is kept for the rest of the run, so later batches do not fail first. Each retry
    happens after the `except` block is left: inside it, the traceback still holds the failed forward's
    activations, and the retry would run short of the very memory it needs.
    """

    def __init__(self, progress: Progress):
        self.progress, self.piece = progress, None  # images per forward pass, once one ran out of memory

    def encode(self, embedder: Embedder, pixels: Tensor, *, keep_tokens: bool) -> tuple[Tensor, Tensor | None]:
        """Pooled (B, D) and, with `keep_tokens`, tokens (B, N, D): else not kept, where memory is short."""
        pooled, tokens, start = [], [], 0
        while start < len(pixels):
            piece = pixels[start : start + (self.piece or len(pixels))]
            out = self._forward(embedder, piece)
            if out is None:
                self._shrink(embedder, len(piece))
                continue
            pooled.append(out[0])
            if keep_tokens:
                tokens.append(out[1])
            del out
            start += len(piece)
        return _joined(pooled), _joined(tokens) if keep_tokens else None

    @staticmethod
    def _forward(embedder: Embedder, pixels: Tensor) -> tuple[Tensor, Tensor] | None:
        try:
            return embedder(pixels)
        except RuntimeError as e:
            if not out_of_memory(e):
                raise
            return None

    def _shrink(self, embedder: Embedder, failed: int) -> None:
        cuda = embedder.device.type == "cuda"
        if failed == 1:
            bf16 = "--dtype bfloat16, " if embedder.dtype == torch.float32 else ""
            elsewhere = "another GPU" if cuda else "a machine with more memory"
            raise UserError(
                f"{embedder.device} ran out of memory on a single image: try {bf16}{elsewhere}, or a smaller model."
            )
        if self.piece is None:
            what = "CUDA out of memory" if cuda else f"out of memory on {embedder.device}"
            self.progress.note(f"{what} at batch size {failed}: running batches in smaller pieces.")
        self.piece = failed // 2
        if cuda:
            with torch.cuda.device(embedder.device):  # without it, on cuda:1 a context was made on GPU 0
                torch.cuda.empty_cache()


def _joined(parts: list[Tensor]) -> Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts)  # one part, the usual case: no copy


@dataclass
class _Collected:
    """Embedded batches gathered: their rows, error rows and tensors, in order."""

    rows: list[dict] = field(default_factory=list)
    errors: list[dict] = field(default_factory=list)
    embeddings: list[np.ndarray] = field(default_factory=list)
    tokens: list[np.ndarray] = field(default_factory=list)

    def add(self, batch: Embedded, embeddings: np.ndarray | None, tokens: np.ndarray | None) -> None:
        """`batch`'s rows and errors, with its tensors as they are to be kept (`embeddings` None: no row)."""
        self.errors.extend(batch.errors)
        if embeddings is not None:
            self.rows.extend(batch.rows)
            self.embeddings.append(embeddings)
            if tokens is not None:
                self.tokens.append(tokens)

    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.embeddings) + sum(a.nbytes for a in self.tokens)


class _ChunkBuffer(_Collected):
    """The batches embedded since the last chunk was written, until `flush` writes them as the next."""

    def flush(self, work: WorkArea, seq: int) -> RowsByPath:
        if not self.rows and not self.errors:
            return {}
        tensors = {}
        if self.rows:
            tensors["embeddings"] = np.concatenate(self.embeddings)
            if self.tokens:
                tensors["tokens"] = np.concatenate(self.tokens)
        chunk = work.write_chunk(seq, self.rows, self.errors, tensors)
        self.rows, self.errors, self.embeddings, self.tokens = [], [], [], []
        return earlier_rows.results_of(chunk)


@dataclass
class EmbedResult:
    embeddings: np.ndarray  # (N, D) float32, rows in the order of `rows`
    tokens: np.ndarray | None  # (N, T, D) float32 with tokens=True
    rows: list[dict]  # path, width, height, ... of each embedded file
    errors: list[dict]  # path and error of each file that could not be embedded


def embed_paths(
    embedder: Embedder,
    inputs: str | os.PathLike | Iterable[str | os.PathLike],
    *,
    normalize: bool = True,
    tokens: bool = False,
    batch_size: int = CPU_BATCH_SIZE,
    workers: int = 0,
    decode: DecodeOptions = DecodeOptions(),
    decoder: str = "cpu",
) -> EmbedResult:
    """Embed image files and folders in memory (for a few thousand images; use `embed_to_file` for more).

    `workers`: decoding processes beside this one (0: decode here). `decode` and `decoder`: as in `EmbedOptions`.
    One path alone is taken as a list of one, not as the letters of its name."""
    options = EmbedOptions(  # its checks of the values first
        normalize=normalize, tokens=tokens, batch_size=batch_size, workers=workers, decode=decode, decoder=decoder
    )
    paths = discover(inputs)
    options = dataclasses.replace(options, decoder=_decoder_for(embedder, decoder, Silent()))
    found = _Collected()
    batches = embedded_batches(embedder, paths, options)
    with closing(batches):  # its decoding workers stop here, even when an error ends the loop
        for batch in batches:
            found.add(batch, batch.embeddings, batch.tokens)
    D, T = embedder.checkpoint.vision.hidden_size, embedder.checkpoint.vision.num_patches
    return EmbedResult(
        embeddings=np.concatenate(found.embeddings) if found.embeddings else np.zeros((0, D), np.float32),
        tokens=(np.concatenate(found.tokens) if found.tokens else np.zeros((0, T, D), np.float32)) if tokens else None,
        rows=[public_row(r) for r in found.rows],
        errors=[public_row(e) for e in found.errors],
    )
