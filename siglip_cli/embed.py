"""The main job: images → embeddings, robust to bad files, resumable, streamed to disk.

Work is done in fixed batches of the pending files, in sorted order. Finished batches are flushed every few
seconds as chunks into a work area beside the output (`<output>.partial/`); the final files are assembled
from the chunks at the end (manifest and errors first, the embeddings file last, each atomically), so the
presence of the output means the run finished. A rerun of an interrupted command reuses the chunks and embeds
only the rest; `--update` also reuses the rows of an existing output whose files did not change.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import os
import re
import sys
import time
import warnings
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, NamedTuple, Protocol, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from . import __version__
from .config import PreprocessConfig
from .errors import UserError
from .files import display_path, is_regular_file, path_fields, path_from_fields
from .model import SiglipVision
from .gpu_decode import JpegHeader, check_supported, decode_headers, read_header
from .preprocess import BadImage, DecodeOptions, load_pixels
from .storage import (
    NpyRows,
    RowReader,
    SafetensorsRows,
    TensorSpec,
    WorkArea,
    exclusive,
    read_jsonl,
    remove_stale_temporaries,
    write_jsonl,
    write_npy,
    write_safetensors,
)
from .weights import DEFAULT_MODEL, Checkpoint, load_model, resolve_checkpoint

# At most this much finished work is lost to a kill -9 or a power cut (SIGLIP_FLUSH_SECONDS to tune).
FLUSH_SECONDS = float(os.environ.get("SIGLIP_FLUSH_SECONDS", 5.0))
CHUNK_BYTES = 64 << 20  # ...and a chunk is flushed sooner when its tensors reach this size (bounded memory)
BLOCK_BYTES = 32 << 20  # rows are copied into the final file in blocks of about this size
OUTPUT_DTYPES = {"float32": np.float32, "float16": np.float16}
T, U = TypeVar("T"), TypeVar("U")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# --------------------------------------------------------------------------------------------- the model


@dataclass
class Encoder:
    """A loaded tower on its device, with the checkpoint it came from."""

    model: SiglipVision  # or its torch.compile wrapper
    checkpoint: Checkpoint
    device: torch.device
    dtype: torch.dtype

    @property
    def preprocess(self) -> PreprocessConfig:
        return self.checkpoint.preprocess

    @torch.inference_mode()
    def __call__(self, pixels: Tensor) -> tuple[Tensor, Tensor]:
        """(B, 3, H, W) normalized pixels → pooled (B, D) float32 and tokens (B, N, D) in the compute dtype."""
        pooled, tokens = self.model(pixels.to(self.device, self.dtype, non_blocking=True))
        return pooled.float(), tokens


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise UserError(f"unknown device {device!r} (expected auto, cpu, cuda or cuda:N).") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device {device} was asked for but CUDA is not available on this machine.")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise UserError(f"device {device} does not exist: this machine has {torch.cuda.device_count()} GPU(s).")
    elif resolved.type != "cpu":
        raise UserError(f"device {device!r} is not supported (expected auto, cpu, cuda or cuda:N).")
    return resolved


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        # bfloat16 keeps cosine ≥ 0.999 to float32 and doubles GPU throughput; CPUs default to the exact path.
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r} (expected auto, {', '.join(DTYPES)}).")
    return DTYPES[dtype]


def load(
    model: str = DEFAULT_MODEL,
    *,
    revision: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    compile: bool = False,
) -> Encoder:
    """Load a checkpoint (Hub id or local directory) ready to embed.

    `compile`: `torch.compile` the tower. It pays on GPUs for long runs (transformers' B/16 went from 7,550 to
    11,464 images/s on an H200) after a compile of a minute or so; on our CPUs it took 25-48 s and gained 0-12%.
    """
    resolved = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, resolved)
    checkpoint = resolve_checkpoint(model, revision=revision)
    # Fused q/k/v: one GEMM instead of three, the same numbers (tests check it against the plain path); on CUDA
    # also fc1 + GELU (gpu_check checks it against the float32 plain path).
    tower = load_model(checkpoint, device=resolved, dtype=torch_dtype).fuse_qkv().fuse_gelu()
    if compile:
        tower = torch.compile(tower)
    return Encoder(tower, checkpoint, resolved, torch_dtype)


# --------------------------------------------------------------------------------------- decoding files


class Item(NamedTuple):
    index: int
    pixels: Tensor | None  # (3, H, W), or None for a bad file or a JPEG left for the device decoder
    info: dict  # manifest fields of a good file, or `path` and `error` of a bad one
    jpeg: JpegHeader | None = None  # a JPEG the model's device will decode (--decode gpu)


def file_digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def decode_file(
    path: str, cfg: PreprocessConfig, options: DecodeOptions, *, jpeg_to_device: bool = False
) -> tuple[Tensor | None, dict, JpegHeader | None]:
    """One file → (pixels, facts for the manifest, None); with `jpeg_to_device`, a JPEG the device decoder takes
    comes back as (None, facts, its header) instead. Raises on any problem with the file."""
    info = os.stat(path)
    if not is_regular_file(path):
        raise BadImage("not a regular file")
    with open(path, "rb") as f:
        data = f.read()
    facts = {"size": info.st_size, "mtime_ns": info.st_mtime_ns, "blake2b": file_digest(data)}
    if jpeg_to_device:
        header = read_header(data, cfg, options)
        if isinstance(header, JpegHeader):
            return None, {"width": header.width, "height": header.height, **facts}, header
    pixels, width, height = load_pixels(io.BytesIO(data), cfg, options)
    return pixels, {"width": width, "height": height, **facts}, None


def one_line(error: BaseException) -> str:
    """The reason a file failed, as one line of plain words for the errors file.

    The system's reason for a file that cannot be opened ("Permission denied"; the path is in the row already),
    Pillow's and ours as they are ("image file is truncated (129 bytes not processed)"), anything else with its
    class name. Line breaks become spaces; other spacing is kept, since a reason may quote a file name.
    """
    if isinstance(error, OSError) and error.strerror:
        text = error.strerror
    elif isinstance(error, (BadImage, OSError)):
        text = str(error)
    else:
        text = f"{type(error).__name__}: {error}"
    return re.sub(r"[\r\n\t\v\f]+", " ", text).strip() or type(error).__name__


class ImageFiles(Dataset):
    """Decodes and preprocesses files by index; a bad file becomes an error item, never an exception."""

    def __init__(self, paths: list[str], cfg: PreprocessConfig, options: DecodeOptions, *, jpeg_to_device: bool):
        self.paths, self.cfg, self.options, self.jpeg_to_device = paths, cfg, options, jpeg_to_device

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Item:
        path = self.paths[index]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow's corrupt-EXIF and palette warnings: the file either works or fails
            try:
                pixels, facts, jpeg = decode_file(path, self.cfg, self.options, jpeg_to_device=self.jpeg_to_device)
                return Item(index, pixels, {"path": path, **facts}, jpeg)
            except Exception as e:  # per file, whatever the class: one bad file never stops a run
                return Item(index, None, {"path": path, "error": one_line(e), **_stat_fields(path)})


def _stat_fields(path: str) -> dict:
    try:
        info = os.stat(path)
        return {"size": info.st_size, "mtime_ns": info.st_mtime_ns}
    except OSError:
        return {}


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # decoding workers must not fight the model for cores
    sys.excepthook = _quiet_if_the_main_process_left


def _quiet_if_the_main_process_left(kind: type[BaseException], value: BaseException, tb) -> None:
    # A worker hands its tensors over through a thread that serves file descriptors and reports its errors through
    # sys.excepthook. After Ctrl-C the main process may hang up mid-handshake: a broken pipe in the worker, whose
    # traceback would follow the one sentence the user gets. Anything else is printed as usual.
    if not issubclass(kind, (ConnectionError, EOFError)):
        sys.__excepthook__(kind, value, tb)


# Files per unit of worker work. The model's batch is assembled from such chunks, so every worker is busy from the
# first batch on: with whole batches per worker, 15 workers and a 256-image batch, one worker decoded each batch
# alone (an H200's 16 cores embedded 35 images/s on the CPU decoder, and read JPEG bytes at 831 images/s).
WORKER_CHUNK = 16


@dataclass(frozen=True)
class Chunk:
    """What a worker hands over for a few consecutive files: pixels decoded on the CPU stacked into one tensor, and
    the JPEGs for the device decoder as one buffer of bytes (one shared-memory block crosses over, not one per file).

    A dataclass, not a NamedTuple: `__len__` counts files, and a NamedTuple's `_replace` (the copy `pin_memory`
    makes) checks its field count with `len`, which failed every pinned batch on CUDA."""

    rows: list[dict]  # manifest facts of the good files, in order
    errors: list[dict]  # path and error of the bad ones
    pixels: Tensor | None  # (b, 3, H, W) for the rows at `cpu_rows`
    cpu_rows: list[int]
    jpeg_bytes: Tensor | None  # the files at `jpeg_rows`, end to end
    jpeg_facts: list[tuple[int, int, int, int]]  # (byte count, orientation, width, height) of each
    jpeg_rows: list[int]

    def __len__(self) -> int:
        return len(self.rows) + len(self.errors)

    def pin_memory(self) -> Chunk:  # called by the DataLoader's pinning thread when the model runs on CUDA
        return dataclasses.replace(self, pixels=self.pixels.pin_memory()) if self.pixels is not None else self


def _collate(items: list[Item]) -> Chunk:
    good = [item for item in items if item.pixels is not None or item.jpeg is not None]
    cpu_rows = [i for i, item in enumerate(good) if item.pixels is not None]
    jpeg_rows = [i for i, item in enumerate(good) if item.jpeg is not None]
    jpegs = [good[i].jpeg for i in jpeg_rows]
    return Chunk(
        rows=[item.info for item in good],
        errors=[item.info for item in items if item.pixels is None and item.jpeg is None],
        pixels=torch.stack([good[i].pixels for i in cpu_rows]) if cpu_rows else None,
        cpu_rows=cpu_rows,
        jpeg_bytes=torch.cat([j.data for j in jpegs]) if jpegs else None,
        jpeg_facts=[(len(j.data), j.orientation, j.width, j.height) for j in jpegs],
        jpeg_rows=jpeg_rows,
    )


@dataclass(frozen=True)
class Batch:
    """The files of one model batch, in order: the chunks of its files put together (no pixels are copied)."""

    rows: list[dict]
    errors: list[dict]
    pixels: list[Tensor]  # each chunk's CPU-decoded pixels, in the order of `cpu_rows`
    cpu_rows: list[int]
    jpegs: list[JpegHeader]  # views into the chunks' byte buffers, for the rows at `jpeg_rows`
    jpeg_rows: list[int]

    def __len__(self) -> int:
        return len(self.rows) + len(self.errors)

    @classmethod
    def of(cls, chunks: list[Chunk]) -> Batch:
        rows, errors, pixels, cpu_rows, jpegs, jpeg_rows = [], [], [], [], [], []
        for chunk in chunks:
            offset = len(rows)
            rows += chunk.rows
            errors += chunk.errors
            if chunk.pixels is not None:
                pixels.append(chunk.pixels)
            cpu_rows += [offset + i for i in chunk.cpu_rows]
            if chunk.jpeg_bytes is not None:
                files = chunk.jpeg_bytes.split([size for size, *_ in chunk.jpeg_facts])
                jpegs += [JpegHeader(data, *facts) for data, (_, *facts) in zip(files, chunk.jpeg_facts)]
            jpeg_rows += [offset + i for i in chunk.jpeg_rows]
        return cls(rows, errors, pixels, cpu_rows, jpegs, jpeg_rows)


def batch_pixels(
    batch: Batch, cfg: PreprocessConfig, device: torch.device, options: DecodeOptions
) -> tuple[Tensor | None, list[dict], list[dict]]:
    """The batch's pixels on `device` (the model's), with its good rows and any new errors.

    JPEGs are decoded here, all at once on the device; one the device decoder rejects gets the CPU path, which
    also gives a truly broken file its proper error."""
    cpu_pixels = [p.to(device, non_blocking=True) for p in batch.pixels]  # pinned on CUDA: copies overlap
    if not batch.jpegs:
        return (torch.cat(cpu_pixels) if cpu_pixels else None), batch.rows, []
    pixels = torch.empty(len(batch.rows), 3, cfg.height, cfg.width, device=device)
    if cpu_pixels:
        pixels[batch.cpu_rows] = torch.cat(cpu_pixels)
    decoded_pixels, decoded, rejected = decode_headers(batch.jpegs, cfg, device=device)
    pixels[[batch.jpeg_rows[i] for i in decoded]] = decoded_pixels
    failed, errors = set(), []
    for i, _ in rejected:
        row = batch.jpeg_rows[i]
        try:
            decoded = load_pixels(io.BytesIO(batch.jpegs[i].data.numpy().tobytes()), cfg, options)[0]
        except Exception as e:  # per file, as in the workers (a device error below is not the file's fault)
            failed.add(row)
            info = batch.rows[row]
            errors.append({"path": info["path"], "error": one_line(e), "size": info["size"], "mtime_ns": info["mtime_ns"]})
        else:
            pixels[row] = decoded.to(device)
    keep = [i for i in range(len(batch.rows)) if i not in failed]
    if not keep:
        return None, [], errors
    return pixels[keep], [batch.rows[i] for i in keep], errors


def default_batch_size(device: str) -> int:
    """32 on the CPU, which a batch of 32 keeps busy; 128 on CUDA, where B/16 ran 12,000 images/s at batch 64 and
    13,000 at 256 on an H200 (bench/RESULTS.md): 128 is most of that, and leaves memory for the full-size photos
    the GPU decoder holds while it works on a batch."""
    return 128 if resolve_device(device).type == "cuda" else 32


def default_workers() -> int:
    return max(1, min(16, (os.cpu_count() or 2) - 1))


@dataclass(frozen=True)
class _Chunks:
    """The DataLoader's batch sampler: the files of each batch span in chunks of `size`, made as they are needed
    (a list of them would cost ~40 bytes per file, 400 MB for ten million photos)."""

    spans: list[tuple[int, int]]
    size: int

    def __iter__(self) -> Iterator[range]:
        for start, end in self.spans:
            for first in range(start, end, self.size):
                yield range(first, min(first + self.size, end))

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
) -> Iterator[Batch]:
    """Batches of `batch_size` files in order (fixed slices of `paths`), decoded by `workers` processes ahead of
    the model, `WORKER_CHUNK` files at a time, with about two batches in flight."""
    spans = [(start, min(start + batch_size, len(paths))) for start in range(0, len(paths), batch_size)]
    size = min(WORKER_CHUNK, batch_size)
    loader = DataLoader(
        ImageFiles(paths, cfg, options, jpeg_to_device=jpeg_to_device),
        batch_sampler=_Chunks(spans, size),
        num_workers=workers,
        collate_fn=_collate,
        worker_init_fn=_worker_init if workers else None,
        prefetch_factor=max(2, math.ceil(2 * batch_size / (size * workers))) if workers else None,
        pin_memory=pin,
    )
    arriving = iter(loader)
    try:
        for start, end in spans:
            parts: list[Chunk] = []
            while sum(map(len, parts)) < end - start:
                parts.append(next(arriving))
            yield Batch.of(parts)
    finally:
        # The worker processes stop when their iterator is dropped: now, even if a traceback keeps this frame.
        del arriving


# ------------------------------------------------------------------------------------------ the job


@dataclass(frozen=True)
class EmbedOptions:
    normalize: bool = True
    tokens: bool = False
    output_dtype: str = "float32"
    batch_size: int = 32
    workers: int = field(default_factory=default_workers)
    decode: DecodeOptions = DecodeOptions()
    # "cpu": PIL, pixel-exact with the reference. "gpu": JPEGs decoded in batches by nvJPEG on the model's device
    # (libjpeg-turbo through the same code on a CPU device), within cosine 0.999 of the exact path.
    # "auto": gpu when the model runs on CUDA.
    decoder: str = "cpu"
    # (K, N) when this run embeds part K of N (--shard): written into the metadata, so that `merge` can tell
    # when a part is missing. Not one of the run's options: the parts of one run differ only in it.
    shard: tuple[int, int] | None = None


@dataclass(frozen=True)
class OutputPaths:
    embeddings: Path
    manifest: Path
    errors: Path
    tokens: Path | None  # `.npy` outputs keep tokens (--tokens) in a file of their own
    meta: Path | None  # `.npy` has no header: the run's metadata goes beside it
    work: Path

    @classmethod
    def for_output(cls, output: Path) -> OutputPaths:
        suffix = output.suffix.lower()
        if suffix not in (".safetensors", ".npy"):
            raise UserError(f"output {output} must end in .safetensors or .npy.")
        if output.is_dir():
            raise UserError(f"output {output} is a folder; give a file name (ending in {suffix}) for -o.")
        stem = output.with_suffix("")
        npy = suffix == ".npy"
        return cls(
            embeddings=output,
            manifest=output.with_suffix(".jsonl"),
            errors=stem.with_name(stem.name + ".errors.jsonl"),
            tokens=stem.with_name(stem.name + ".tokens.npy") if npy else None,
            meta=stem.with_name(stem.name + ".meta.json") if npy else None,
            work=output.with_name(output.name + ".partial"),
        )

    @property
    def format(self) -> str:
        return "npy" if self.meta is not None else "safetensors"

    def files(self) -> list[Path]:
        """The final files a run writes (those of this format)."""
        return [p for p in (self.manifest, self.errors, self.tokens, self.meta, self.embeddings) if p is not None]


class Progress(Protocol):
    """What a run reports as it goes; the command line draws it as a bar with images/s."""

    def start(self, total: int, done: int) -> None: ...  # `done`: rows kept from earlier work, not embedded now
    def advance(self, n: int) -> None: ...  # rows embedded (or failed) just now
    def reused(self, n: int) -> None: ...  # more rows kept from earlier work, found after `start` (several devices)
    def note(self, message: str) -> None: ...


@dataclass
class Summary:
    embedded: int  # images embedded by this run
    reused: int  # rows taken from earlier work (an interrupted run, or the previous output with --update)
    failed: int
    removed: int  # rows of the previous output whose files are gone (--update)
    output: str
    manifest: str
    errors: str | None
    seconds: float

    def to_dict(self) -> dict:
        rate = self.embedded / self.seconds if self.seconds > 0 else 0.0
        return {**asdict(self), "images_per_s": round(rate, 3), "seconds": round(self.seconds, 3)}


class Ref(NamedTuple):
    """Where a finished row lives: a reader over a chunk (or previous output) and the row's index there."""

    reader: RowReader
    index: int
    info: dict


def run_options(encoder: Encoder, options: EmbedOptions, output_format: str) -> dict:
    """Everything that changes the numbers in the output: a resumed or updated run must match it exactly."""
    ckpt = encoder.checkpoint
    local = Path(ckpt.name).expanduser()
    state = {
        # As text: a checkpoint folder whose name is not UTF-8 must not make the metadata unwritable.
        "model": display_path(str(local.resolve()) if local.is_dir() else ckpt.name),
        "revision": ckpt.revision,
        "compute_dtype": str(encoder.dtype).removeprefix("torch."),
        "normalized": options.normalize,
        "output_dtype": options.output_dtype,
        "tokens": options.tokens,
        "format": output_format,
        "preprocessing": {
            **ckpt.preprocess.to_dict(),
            "exif_transpose": options.decode.exif_transpose,
            "fast_decode": options.decode.fast_decode,
            "decoder": options.decoder,
        },
        "embedding_dim": ckpt.vision.hidden_size,
        "num_tokens": ckpt.vision.num_patches,
    }
    return json.loads(json.dumps(state))  # as it reads back from disk (tuples become lists)


_OPTION_NAMES = {
    "model": "--model",
    "revision": "--revision",
    "compute_dtype": "--dtype",
    "normalized": "--normalize/--no-normalize",
    "output_dtype": "--output-dtype",
    "tokens": "--tokens",
    "format": "the output format",
    "preprocessing": "the preprocessing (--no-exif-transpose, --fast-decode, --decode, or the model's preprocessor)",
}


def describe_difference(old: dict, new: dict) -> str:
    changed = [_OPTION_NAMES.get(k, k) for k in new if old.get(k) != new.get(k)]
    return ", ".join(changed) or "the options"


def embed_to_file(
    encoder: Encoder,
    paths: list[str],
    output: Path,
    *,
    options: EmbedOptions = EmbedOptions(),
    overwrite: bool = False,
    update: bool = False,
    progress: Progress | None = None,
    require_rows: bool = True,
) -> Summary:
    """Embed `paths` (in this order) into `output` (.safetensors or .npy) plus its manifest and errors files.

    With `require_rows`, inputs of which none could be embedded are an error and leave no output behind.
    """
    started = time.perf_counter()
    if options.decoder == "auto":
        options = dataclasses.replace(options, decoder="gpu" if encoder.device.type == "cuda" else "cpu")
    out = OutputPaths.for_output(output)
    with exclusive(out.embeddings):  # a second run writing this output is refused, not interleaved
        state = run_options(encoder, options, out.format)
        work = WorkArea(out.work)
        if overwrite:
            work.remove()
        resuming = work.exists()
        check_outputs(out, interrupted=resuming, overwrite=overwrite, update=update)
        if resuming and work.state() != state:
            raise UserError(
                f"{out.work} holds an interrupted run whose options differ "
                f"({describe_difference(work.state(), state)}): "
                "rerun with the same options to continue, or add --overwrite to start afresh."
            )
        # A run that died while replacing the final files may have left a new manifest beside the old embeddings:
        # then the earlier output cannot be trusted row by row, and what the chunks do not hold is embedded again.
        # Read (and so checked) before the work area is made: a refused --update must leave nothing behind.
        previous = _previous_output(out, state) if update and not (resuming and work.assembling()) else {}
        if not resuming:
            try:
                work.create(state)
            except OSError as e:
                raise UserError(f"cannot write beside {out.embeddings}: {e.strerror or e}.") from None
        remove_stale_temporaries(out.files())

        done: dict[str, Ref | dict] = {}
        chunks = work.chunks()
        for chunk in chunks:
            reader = SafetensorsRows(chunk.path)
            done.update((row["path"], Ref(reader, i, row)) for i, row in enumerate(chunk.rows))
            done.update((row["path"], row) for row in chunk.errors)
        wanted = set(paths)
        removed = sum(1 for path, found in previous.items() if path not in wanted and isinstance(found, Ref))
        reused: dict[str, Ref | dict] = {}
        for path in paths:
            found = done.get(path) or previous.get(path)
            # A file that failed in an earlier output is tried again (--update): the cause may be gone (a permission,
            # a full disk, a --max-pixels since raised). One that failed in this run's chunks is not: a resumed run
            # batches exactly as the uninterrupted one, which keeps it byte-identical.
            if found is None or not (isinstance(found, Ref) or path in done):
                continue
            info = _still_current(path, found.info if isinstance(found, Ref) else found)
            if info is not None:
                reused[path] = found._replace(info=info) if isinstance(found, Ref) else info

        pending = [p for p in paths if p not in reused]
        if progress:
            progress.start(total=len(paths), done=len(reused))
        new = _embed_pending(encoder, pending, work, options, progress, first_seq=len(chunks))
        results = {**reused, **new}

        ordered = [results[p] for p in paths]
        good = [r for r in ordered if isinstance(r, Ref)]
        bad = [r for r in ordered if not isinstance(r, Ref)]
        if not good and paths and require_rows:
            work.remove()
            first = f"{display_path(bad[0]['path'])}: {bad[0]['error']}"
            if out.embeddings.exists():  # an earlier, finished output: its files stay together, untouched
                raise UserError(
                    f"none of the {len(paths)} input files could be embedded (the first, {first}); "
                    f"{out.embeddings} is left as it was."
                )
            write_jsonl(out.errors, (public_row(r) for r in bad))
            if len(bad) == 1:
                raise UserError(f"could not embed {first}.")
            raise UserError(
                f"none of the {len(paths)} input files could be embedded (the first, {first}): see {out.errors}."
            )
        work.mark_assembling()
        assemble(out, good, bad, output_metadata(encoder.checkpoint, state, shard=options.shard))
        work.remove()
        embedded = sum(1 for r in new.values() if isinstance(r, Ref))
        reused_rows = sum(1 for r in reused.values() if isinstance(r, Ref))
        return Summary(
            embedded=embedded,
            reused=reused_rows,
            failed=len(bad),
            removed=removed,
            output=str(out.embeddings),
            manifest=str(out.manifest),
            errors=str(out.errors) if bad else None,
            seconds=time.perf_counter() - started,
        )


def check_outputs(out: OutputPaths, *, interrupted: bool, overwrite: bool, update: bool) -> None:
    """Refuse to replace a finished output, or files beside it that are the user's, unless told to."""
    if overwrite or update:
        return
    if out.embeddings.exists():
        raise UserError(f"{out.embeddings} already exists: add --overwrite to replace it, or --update to refresh it.")
    # The manifest and errors files of an interrupted run are ours to replace; anything else is the user's.
    if not interrupted:
        for path in (out.manifest, out.errors, out.tokens):
            if path is not None and path.exists():
                raise UserError(f"{path} already exists and would be replaced: add --overwrite, or choose another -o.")


def _still_current(path: str, info: dict) -> dict | None:
    """`info` (with today's mtime) if the file is still the one that produced it, else None.

    Size and mtime first; when only the mtime moved (a copy, a touch) the content hash decides.
    """
    try:
        stat = os.stat(path)
    except OSError:
        # It failed before because it was missing, and it still is.
        return info if "error" in info and "size" not in info else None
    if stat.st_size != info.get("size"):
        return None
    if stat.st_mtime_ns == info.get("mtime_ns"):
        return info
    try:
        with open(path, "rb") as f:
            same = "blake2b" in info and file_digest(f.read()) == info["blake2b"]
    except OSError:
        return None
    return {**info, "mtime_ns": stat.st_mtime_ns} if same else None


class Embedded(NamedTuple):
    """One batch's results, on the host: float32 rows in the order of `rows`."""

    count: int  # files in the batch, good and bad
    rows: list[dict]
    errors: list[dict]
    embeddings: np.ndarray | None  # (b, D), L2-normalized if asked
    tokens: np.ndarray | None  # (b, T, D) when asked


def embedded_batches(
    encoder: Encoder,
    paths: list[str],
    *,
    batch_size: int,
    workers: int,
    decode: DecodeOptions,
    decoder: str = "cpu",
    normalize: bool = True,
    tokens: bool = False,
    progress: Progress | None = None,
) -> Iterator[Embedded]:
    """Files → embeddings, `batch_size` files at a time, in order: decoding workers, the device decoder, the model."""
    if decoder == "gpu":
        check_supported(encoder.preprocess)
    batches = decoded_batches(
        paths,
        encoder.preprocess,
        decode,
        batch_size=batch_size,
        workers=workers,
        pin=encoder.device.type == "cuda",
        jpeg_to_device=decoder == "gpu",
    )
    halved = _Halving(progress)
    # The device decoder's host side (file bytes to nvJPEG, Huffman decoding) runs in a thread a batch or two ahead,
    # while the model works on the GPU; its kernels queue on the same stream, so the order of work is kept.
    prepare = lambda batch: (batch, batch_pixels(batch, encoder.preprocess, encoder.device, decode))  # noqa: E731
    for batch, (pixels, rows, errors) in look_ahead(batches, prepare, depth=2 if decoder == "gpu" else 0):
        if pixels is None:
            yield Embedded(len(batch), rows, batch.errors + errors, None, None)
            continue
        pooled, toks = halved.encode(encoder, pixels)
        pooled = F.normalize(pooled, dim=-1) if normalize else pooled
        toks = toks.float().cpu().numpy() if tokens else None
        yield Embedded(len(batch), rows, batch.errors + errors, pooled.cpu().numpy(), toks)


def look_ahead(items: Iterable[T], fn: Callable[[T], U], *, depth: int) -> Iterator[U]:
    """`fn(item)` for each item, in order, computed by one background thread up to `depth` items ahead of the
    consumer (inline when `depth` is 0). An exception in `fn` is raised where its result would have been yielded;
    items not yet started are dropped when the consumer stops."""
    if depth == 0:
        yield from map(fn, items)
        return
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="siglip-look-ahead")
    try:
        pending: deque[Future[U]] = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) > depth:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _embed_pending(
    encoder: Encoder,
    pending: list[str],
    work: WorkArea,
    options: EmbedOptions,
    progress: Progress | None,
    *,
    first_seq: int,
) -> dict[str, Ref | dict]:
    results: dict[str, Ref | dict] = {}
    if not pending:
        return results
    out_dtype = OUTPUT_DTYPES[options.output_dtype]
    buffer = _ChunkBuffer()
    seq, last_flush = first_seq, time.monotonic()
    batches = embedded_batches(
        encoder,
        pending,
        batch_size=options.batch_size,
        workers=options.workers,
        decode=options.decode,
        decoder=options.decoder,
        normalize=options.normalize,
        tokens=options.tokens,
        progress=progress,
    )
    for done in batches:
        buffer.errors.extend(done.errors)
        if done.embeddings is not None:
            buffer.rows.extend(done.rows)
            buffer.embeddings.append(done.embeddings.astype(out_dtype))
            if done.tokens is not None:
                buffer.tokens.append(done.tokens.astype(out_dtype))
        if progress:
            progress.advance(done.count)
        if time.monotonic() - last_flush >= FLUSH_SECONDS or buffer.nbytes() >= CHUNK_BYTES:
            results.update(buffer.flush(work, seq))
            seq, last_flush = seq + 1, time.monotonic()
    results.update(buffer.flush(work, seq))
    return results


class _Halving:
    """CUDA out of memory: run batches in pieces of half the size that failed, as small as needed; say so once.

    The piece size that fits is kept for the rest of the run, so later batches do not fail first. Each retry
    happens after the `except` block is left: inside it, the traceback still holds the failed forward's
    activations, and the retry would run short of the very memory it needs.
    """

    def __init__(self, progress: Progress | None):
        self.progress, self.piece = progress, None  # images per forward pass, once one ran out of memory

    def encode(self, encoder: Encoder, pixels: Tensor) -> tuple[Tensor, Tensor]:
        pooled, tokens, start = [], [], 0
        while start < len(pixels):
            piece = pixels[start : start + (self.piece or len(pixels))]
            out = self._forward(encoder, piece)
            if out is None:
                self._shrink(encoder, len(piece))
                continue
            pooled.append(out[0])
            tokens.append(out[1])
            start += len(piece)
        if len(pooled) == 1:
            return pooled[0], tokens[0]
        return torch.cat(pooled), torch.cat(tokens)

    @staticmethod
    def _forward(encoder: Encoder, pixels: Tensor) -> tuple[Tensor, Tensor] | None:
        try:
            return encoder(pixels)
        except torch.cuda.OutOfMemoryError:
            return None

    def _shrink(self, encoder: Encoder, failed: int) -> None:
        if failed == 1:
            raise UserError(
                f"{encoder.device} ran out of memory on a single image: try --dtype bfloat16, another GPU, or a "
                "smaller model."
            )
        if self.piece is None and self.progress:
            self.progress.note(f"CUDA out of memory at batch size {failed}: running batches in smaller pieces.")
        self.piece = failed // 2
        torch.cuda.empty_cache()


@dataclass
class _ChunkBuffer:
    rows: list[dict] = field(default_factory=list)
    errors: list[dict] = field(default_factory=list)
    embeddings: list[np.ndarray] = field(default_factory=list)
    tokens: list[np.ndarray] = field(default_factory=list)

    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.embeddings) + sum(a.nbytes for a in self.tokens)

    def flush(self, work: WorkArea, seq: int) -> dict[str, Ref | dict]:
        if not self.rows and not self.errors:
            return {}
        tensors = {}
        if self.rows:
            tensors["embeddings"] = np.concatenate(self.embeddings)
            if self.tokens:
                tensors["tokens"] = np.concatenate(self.tokens)
        chunk = work.write_chunk(seq, self.rows, self.errors, tensors)
        reader = SafetensorsRows(chunk.path)
        results: dict[str, Ref | dict] = {row["path"]: Ref(reader, i, row) for i, row in enumerate(chunk.rows)}
        results.update((row["path"], row) for row in chunk.errors)
        self.rows, self.errors, self.embeddings, self.tokens = [], [], [], []
        return results


def _previous_output(out: OutputPaths, state: dict) -> dict[str, Ref | dict]:
    """The rows of an existing output, for --update (refused if it was made with other options)."""
    if not out.embeddings.exists():
        return {}
    old = read_output_options(out)
    if old != state:
        raise UserError(
            f"{out.embeddings} was made with other options ({describe_difference(old, state)}): "
            "rerun --update with the same options, or use --overwrite to start afresh."
        )
    if out.format == "npy":
        reader: RowReader = NpyRows({"embeddings": out.embeddings, "tokens": out.tokens})
    else:
        reader = SafetensorsRows(out.embeddings)
    found: dict[str, Ref | dict] = {}
    for i, row in enumerate(read_jsonl(out.manifest)):
        path = path_from_fields(row)
        found[path] = Ref(reader, i, {**row, "path": path})
    if out.errors.exists():
        for row in read_jsonl(out.errors):
            found[path_from_fields(row)] = {**row, "path": path_from_fields(row)}
    return found


def read_output_metadata(out: OutputPaths) -> dict[str, str]:
    """The metadata a finished output was written with (its header, or the `.meta.json` beside a `.npy`)."""
    if out.meta is not None:
        return read_jsonl(out.meta)[0] if out.meta.exists() else {}
    with safe_open(out.embeddings, framework="np") as f:
        return f.metadata() or {}


def read_output_options(out: OutputPaths) -> dict:
    return json.loads(read_output_metadata(out).get("options", "{}"))


def public_row(info: dict) -> dict:
    """A manifest or errors row as users read it: the path made readable, then the facts."""
    return {**path_fields(info["path"]), **{k: v for k, v in info.items() if k not in ("path", "path_bytes_b64")}}


def row_blocks(refs: list[Ref], name: str, *, row_bytes: int) -> Iterator[np.ndarray]:
    """Rows of tensor `name` in order, read as runs of consecutive rows from one source, ≤ ~32 MiB at a time."""
    max_rows = max(1, BLOCK_BYTES // max(row_bytes, 1))
    start = 0
    while start < len(refs):
        stop = start + 1
        while (
            stop < len(refs)
            and stop - start < max_rows
            and refs[stop].reader is refs[start].reader
            and refs[stop].index == refs[stop - 1].index + 1
        ):
            stop += 1
        yield refs[start].reader.read(name, refs[start].index, refs[stop - 1].index + 1)
        start = stop


def output_metadata(checkpoint: Checkpoint, state: dict, *, shard: tuple[int, int] | None = None) -> dict[str, str]:
    """The `.safetensors` header metadata (or `.meta.json` beside a `.npy`): what made these numbers."""
    return {
        **({"shard": f"{shard[0]}/{shard[1]}"} if shard else {}),
        "model": display_path(checkpoint.name),
        "revision": checkpoint.revision or "",
        "embedding_dim": str(checkpoint.vision.hidden_size),
        "dtype": state["output_dtype"],
        "compute_dtype": state["compute_dtype"],
        "normalized": str(state["normalized"]).lower(),
        "pooling": "attention-pool head" if checkpoint.vision.vision_use_head else "mean of patch tokens (headless tower)",
        "preprocessing": json.dumps(state["preprocessing"]),
        "decoder": state["preprocessing"]["decoder"],
        "tool": f"siglip {__version__}",
        "options": json.dumps(state, sort_keys=True),
    }


def assemble(out: OutputPaths, good: list[Ref], bad: list[dict], metadata: dict[str, str]) -> None:
    """Write the final files from the finished rows: manifest and errors first, the embeddings file last."""
    state = json.loads(metadata["options"])
    D, T = state["embedding_dim"], state["num_tokens"]
    dtype = np.dtype(OUTPUT_DTYPES[state["output_dtype"]])
    metadata = {**metadata, "num_images": str(len(good))}
    write_jsonl(out.manifest, (public_row(ref.info) for ref in good))
    if bad:
        write_jsonl(out.errors, (public_row(info) for info in bad))
    else:
        out.errors.unlink(missing_ok=True)  # a stale errors file would describe another run
    embeddings = TensorSpec(dtype, (len(good), D), row_blocks(good, "embeddings", row_bytes=D * dtype.itemsize))
    tokens = None
    if state["tokens"]:
        tokens = TensorSpec(dtype, (len(good), T, D), row_blocks(good, "tokens", row_bytes=T * D * dtype.itemsize))
    if out.format == "npy":
        if tokens is not None:
            write_npy(out.tokens, tokens)
        else:
            out.tokens.unlink(missing_ok=True)  # stale tokens would sit beside embeddings they do not match
        write_jsonl(out.meta, [metadata])
        write_npy(out.embeddings, embeddings)
    else:
        write_safetensors(out.embeddings, {"embeddings": embeddings, **({"tokens": tokens} if tokens else {})}, metadata)


# ----------------------------------------------------------------------------------- the Python API


@dataclass
class EmbedResult:
    embeddings: np.ndarray  # (N, D) float32, rows in the order of `rows`
    tokens: np.ndarray | None  # (N, T, D) float32 with tokens=True
    rows: list[dict]  # path, width, height, ... of each embedded file
    errors: list[dict]  # path and error of each file that could not be embedded


def embed_paths(
    encoder: Encoder,
    inputs: Iterable[str | os.PathLike],
    *,
    normalize: bool = True,
    tokens: bool = False,
    batch_size: int = 32,
    workers: int = 0,
    decode: DecodeOptions = DecodeOptions(),
) -> EmbedResult:
    """Embed image files and folders in memory (for a few thousand images; use `embed_to_file` for more)."""
    from .files import discover

    paths = discover([os.fspath(p) for p in inputs])
    embeddings, token_blocks, rows, errors = [], [], [], []
    batches = embedded_batches(
        encoder, paths, batch_size=batch_size, workers=workers, decode=decode, normalize=normalize, tokens=tokens
    )
    for done in batches:
        errors.extend(done.errors)
        if done.embeddings is not None:
            embeddings.append(done.embeddings)
            rows.extend(done.rows)
            if done.tokens is not None:
                token_blocks.append(done.tokens)
    D, T = encoder.checkpoint.vision.hidden_size, encoder.checkpoint.vision.num_patches
    return EmbedResult(
        embeddings=np.concatenate(embeddings) if embeddings else np.zeros((0, D), np.float32),
        tokens=(np.concatenate(token_blocks) if token_blocks else np.zeros((0, T, D), np.float32)) if tokens else None,
        rows=[public_row(r) for r in rows],
        errors=[public_row(e) for e in errors],
    )
