"""`siglip bench`: throughput of the vision tower (and of the image pipeline), beside transformers and timm.

Library side only: it builds the models, times them and returns a `Report`; `cli.py` renders it.

Method. Every measurement warms up first (`warmup` calls; in the image pipeline one pass, end to end one batch), the
first call also paying for `torch.compile`, reported as `setup_s`; it synchronizes the device around each timed call,
and reports the median over `iters` calls. Model-only runs feed random pixels already on the device in the run's
dtype, so they time the forward pass alone.

Same function, three implementations. With `compare`, transformers and timm run on OUR weights (`references.py`),
so the ratios compare code, not checkpoints. Each backend's pooled output is checked against our plain float32
forward (`cosine` in the results).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import numbers
import os
import platform
import re
import stat
import statistics
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .checkpoints import Checkpoint
from .config import DEFAULT_PRESET, PreprocessConfig
from .cpus import cpu_clock, fit_cpu_threads, others_share
from .errors import UserError, whole_number
from .files import WalkReport
from .model import SiglipVision, num_parameters
from .references import Forward, check_references, missing_package, reference_forward
from .runtime import (
    Embedder,
    compiled,
    cpu_has_native_bf16,
    cpuinfo,
    dtype_name,
    dtype_note,
    out_of_memory,
    prepare_model,
    resolve_device,
    resolve_dtype,
)
from .text import Note, counted, first_of, no_note
from .weights import load_tower


# Timed calls that spread wider than this around their median make a note: the ratios of such a run are rough.
NOISY_SPREAD = 0.25
# Over this share of this process's CPUs taken by other processes while it timed (another job, a VM's neighbours),
# its rates are said to be low: timings spread little when they are uniformly slow, and no spread note would fire.
BUSY_SHARE = 0.2
FEW_FILES = 200  # end to end over fewer: the decoding workers' start-up (~0.5 s) weighs on the rate


class BenchError(UserError):
    """A benchmark that cannot run as asked (batch sizes, an image folder without images that decode)."""


# --------------------------------------------------------------------------- the machine


def cpu_name() -> str:
    """The CPU model as /proc/cpuinfo names it (Linux), else what `platform` knows."""
    match = re.search(r"^model name\s*:\s*(.+)$", cpuinfo(), re.MULTILINE)
    return match.group(1).strip() if match else (platform.processor() or platform.machine())


@dataclass(frozen=True)
class Machine:
    device: str  # "NVIDIA H200" or "AMD EPYC 9R14 (2 threads)"
    device_type: str  # "cuda" or "cpu"
    torch_version: str
    dtype: str
    threads: int
    native_bf16: bool


def describe_machine(device: torch.device, dtype: torch.dtype) -> Machine:
    threads = torch.get_num_threads()
    if device.type == "cuda":
        # bf16 in hardware from Ampere (8.0) on; `torch.cuda.is_bf16_supported` counts emulation, on the current GPU.
        name, native = torch.cuda.get_device_name(device), torch.cuda.get_device_capability(device) >= (8, 0)
    else:
        name, native = f"{cpu_name()} ({threads} threads)", cpu_has_native_bf16()
    return Machine(name, device.type, torch.__version__, dtype_name(dtype), threads, native)


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on `device` (CUDA); nothing to wait for on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------- our model


class _Pooled(nn.Module):
    """Our model with the pooled embedding as its only output: what `torch.compile` and the timers see."""

    def __init__(self, model: SiglipVision):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: Tensor) -> Tensor:
        return self.model(pixel_values).pooled


def fast_model(
    model: SiglipVision,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    compile: bool = False,
) -> Forward:
    """Our model as `siglip embed` runs it, on a copy of `model` (left untouched): pixels (B, 3, H, W) → pooled.

    Always, as in `runtime.load`: `runtime.prepare_model` (fused q/k/v, fused fc1 + GELU where a kernel fuses them,
    weights in `dtype`, eval mode, no autograd). Optional: `torch.compile`, of the pooled-only wrapper with static
    shapes (every timed batch has one shape) rather than `prepare_model`'s compile of the whole tower. Attention is
    PyTorch's SDPA, which picks its kernel on the GPU by itself.
    """
    module = _Pooled(prepare_model(copy.deepcopy(model), device=device, dtype=dtype))
    return compiled(module, dynamic=False) if compile else module


# --------------------------------------------------------------------------- timing


def _peak_rss_reset() -> bool:
    """Reset the process's peak resident memory (Linux: /proc/self/clear_refs); False where that is impossible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_rss_mb() -> float | None:
    """This process's peak resident set since the last `_peak_rss_reset` in MB (VmHWM of /proc/self/status)."""
    try:
        match = re.search(r"^VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) / 1024 if match else None


@dataclass(frozen=True)
class Timing:
    median_s: float  # per call
    setup_s: float | None  # the warm-up calls together, the first of which compiles; None: none was made
    peak_mem_mb: float | None  # CUDA: peak allocated above what was in use before; CPU: peak RSS (see _timed_call)
    spread: float = 0.0  # (slowest - fastest) / median of the timed calls: how far the median can be trusted
    calls: int = 1  # how many were timed


def _timed_call(fn: Callable[[], Any], device: torch.device) -> tuple[float, float | None]:
    """(seconds, peak memory in MB) of one call, the device synchronized before and after.

    CUDA: the call's working memory, the peak of allocated tensors above what was allocated before it
    (activations and workspace; weights, and other models loaded for comparison, do not count). CPU: the process's
    peak resident set during the call, everything loaded included: freed activations stay resident in the
    allocator's pools, so an increase over the call would read 0. None where it cannot be measured (needs Linux).
    """
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device) / 2**20
    else:
        before = 0.0 if _peak_rss_reset() else None
    start = time.perf_counter()
    fn()
    synchronize(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else _peak_rss_mb()
    return seconds, None if before is None or peak is None else peak - before


def time_interleaved(
    fns: dict[str, Callable[[], Any]], *, device: torch.device, iters: int, warmup: int
) -> dict[str, Timing]:
    """Median time of each `fn()` over `iters` rounds, after `warmup` calls of each (the first may compile).

    Rounds interleave the candidates (A B C, A B C, ...) so that a neighbour's load on a shared machine, or a
    GPU's clock drifting, falls on all of them alike instead of on whichever ran last.
    """
    setup = {}
    for name, fn in fns.items():
        start = time.perf_counter()
        for _ in range(warmup):
            fn()
        synchronize(device)
        setup[name] = time.perf_counter() - start if warmup else None
    calls: dict[str, list[tuple[float, float | None]]] = {name: [] for name in fns}
    for _ in range(iters):
        for name, fn in fns.items():
            calls[name].append(_timed_call(fn, device))
    timings = {}
    for name, measured in calls.items():
        peaks = [peak for _, peak in measured if peak is not None]
        seconds = [s for s, _ in measured]
        median = statistics.median(seconds)
        spread = (max(seconds) - min(seconds)) / median if median > 0 else 0.0
        timings[name] = Timing(median, setup[name], max(peaks) if peaks else None, spread, len(seconds))
    return timings


def time_calls(fn: Callable[[], Any], *, device: torch.device, iters: int, warmup: int) -> Timing:
    """Median wall time of `fn()` over `iters` calls after `warmup` calls, the device synchronized around each."""
    return time_interleaved({"fn": fn}, device=device, iters=iters, warmup=warmup)["fn"]


def cosine(a: Tensor, b: Tensor) -> float | None:
    """The smallest row-wise cosine similarity of two (B, D) batches, computed in float32; None where either holds a
    value that is not finite (NaN is no number for JSON, nor a cosine)."""
    a, b = a.float().cpu(), b.float().cpu()
    if not (len(a) and torch.isfinite(a).all() and torch.isfinite(b).all()):
        return None
    return min(1.0, F.cosine_similarity(a, b, dim=-1).min().item())  # float32 rounding gave 1.0000001


# --------------------------------------------------------------------------- the report


@dataclass(frozen=True)
class Result:
    backend: str  # "siglip", "transformers" or "timm"
    stage: str  # "model", or with --images: "decode", "preprocess", "end_to_end"
    batch_size: int
    images_per_s: float
    ms_per_image: float
    peak_mem_mb: float | None  # CUDA: a call's working memory (weights excluded); CPU: the process's peak RSS
    variant: str = ""  # what was applied: "fused+compiled", "sdpa", "PIL", ...
    setup_s: float | None = None  # warm-up time, compilation included
    cosine: float | None = None  # smallest cosine of the pooled output to our plain float32 forward
    spread: float | None = None  # (slowest - fastest) / median of the timed calls


@dataclass
class Report:
    machine: Machine
    model: str
    weights_mb: float  # our model's parameters in the run's dtype (each backend holds the same), unrounded
    results: list[Result] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # skipped comparisons and dtype decisions, one sentence each

    def ratios(self) -> list[tuple[int, str, float]]:
        """(batch size, reference, ours / reference images/s) for every model-only measurement pair."""
        ours = {r.batch_size: r.images_per_s for r in self.results if r.stage == "model" and r.backend == "siglip"}
        return [
            (r.batch_size, r.backend, ours[r.batch_size] / r.images_per_s)
            for r in self.results
            if r.stage == "model" and r.backend != "siglip" and r.batch_size in ours
        ]

    def to_dict(self) -> dict[str, Any]:
        return {
            "machine": asdict(self.machine),
            "model": self.model,
            "weights_mb": round(self.weights_mb, 3),  # to the KB: a tiny model's 0.103 MB stays 0.103
            "results": [asdict(r) for r in self.results],
            "ratios": [{"batch_size": b, "reference": ref, "speedup": s} for b, ref, s in self.ratios()],
            "notes": self.notes,
        }


# What a BenchOptions left None gets, by device type (`siglip bench --help` says them too). A GPU's throughput still
# grows past 64 (B/16 on an H200: 12,013 images/s at 64, 13,077 at 256).
DEFAULT_BATCH_SIZES = {"cuda": (1, 32, 256), "cpu": (1, 8, 32)}
DEFAULT_ITERS = {"cuda": 10, "cpu": 3}
DEFAULT_WARMUP = {"cuda": 3, "cpu": 1}


@dataclass(frozen=True)
class BenchOptions:
    model: str | os.PathLike = DEFAULT_PRESET
    revision: str | None = None  # of a Hub id
    device: str = "cpu"
    dtype: str | None = None  # None: auto, as `siglip embed` (bf16 on CUDA, float32 on the CPU)
    batch_sizes: tuple[int, ...] | str | None = None  # or "1,8,32" as --batch-size takes them
    iters: int | None = None
    warmup: int | None = None
    compile: bool | None = None  # None: on for CUDA, off for CPU (see `default_compile`)
    compare: tuple[str, ...] | str = ()  # "transformers,timm" as --compare
    images: Path | None = None
    max_images: int = 64  # per image-pipeline measurement
    seed: int = 0


def default_compile(device: torch.device) -> bool:
    """Whether `bench` compiles when not told: on CUDA, not on the CPU.

    CPU, measured on the 2-core EPYC of bench/RESULTS.md (2026-11-28, torch 2.14.1, fp32): the first compiled call
    took 40 s for the 2-layer test model and 48 s for B/16-224 with an empty inductor cache, 2.6 s and 18 s with a
    warm one; and the compiled B/16 forward was no faster (3.16 vs 3.33 images/s eager at batch 8, interleaved).
    A default 3-call CPU run would pay the compile and gain nothing; --compile is there for those who want it.
    CUDA: the forward is milliseconds, a one-off compile is amortised over any real job, and it is where
    transformers' B/16 went from 7,476 to 11,346 images/s on an H200 (bench/RESULTS.md).
    """
    return device.type == "cuda"


MAX_BATCH_SIZE = 1 << 24  # 16.7 million 224-pixel images: 10 TB of float32 pixels


def check_batch_sizes(sizes: Iterable[int], *, given: str | None = None) -> tuple[int, ...]:
    """Each size once, in the order given; none, or anything but positive integers, is a `BenchError` sentence
    naming `given` (the text the sizes were read from; by default the sizes joined by commas). One rule, one
    message, for `--batch-size` (`parse_batch_sizes`) and for `run_benchmark`'s callers."""
    sizes = tuple(sizes)
    if not sizes or not all(isinstance(s, numbers.Integral) and not isinstance(s, bool) and s >= 1 for s in sizes):
        given = ",".join(map(str, sizes)) if given is None else given
        raise BenchError(f"batch sizes must be positive integers, e.g. --batch-size 1,8,32 (got {given!r}).")
    if too_large := [s for s in sizes if s > MAX_BATCH_SIZE]:  # past it, torch's size arithmetic overflows first
        raise BenchError(
            f"batch size {too_large[0]:,} does not fit in any device's memory: try a smaller --batch-size."
        )
    return tuple(dict.fromkeys(int(s) for s in sizes))


def parse_batch_sizes(text: str) -> tuple[int, ...]:
    """`--batch-size` text "1,8,32" → (1, 8, 32), as `check_batch_sizes` checks them."""
    try:
        sizes = [int(s) for s in text.split(",")]
    except ValueError:
        sizes = []  # refused there, with the text as given
    return check_batch_sizes(sizes, given=text)


def parse_references(text: str) -> tuple[str, ...]:
    """`--compare` text "transformers, timm" → ("transformers", "timm"); text that names none (",") is a
    `BenchError`, where it would compare nothing without a word. Which names exist: `check_references`."""
    references = tuple(name.strip() for name in text.split(",") if name.strip())
    if text.strip() and not references:
        raise BenchError(
            f"--compare: {text.strip()!r} names no reference: give transformers, timm or both, comma-separated."
        )
    return references


def run_benchmark(options: BenchOptions, *, progress: Note | None = None) -> Report:
    """Model-only throughput for each batch size (ours, then each reference), and the image pipeline with `images`.
    `progress`: told what is being measured, a line at a time; what the reader of the results should know is in
    the report's `notes`."""
    say = progress or no_note
    device = resolve_device(options.device)  # the same rules as `siglip embed --device`
    if device.type == "cpu":
        fit_cpu_threads()  # as `siglip embed` does; every backend compared runs on these threads
    dtype = resolve_dtype(options.dtype or "auto", device)  # the same rule as `siglip embed --dtype`
    notes = [hint] if (hint := dtype_note(device, dtype)) else []
    compile = default_compile(device) if options.compile is None else options.compile
    kind = "cuda" if device.type == "cuda" else "cpu"
    iters = DEFAULT_ITERS[kind] if options.iters is None else options.iters
    warmup = DEFAULT_WARMUP[kind] if options.warmup is None else options.warmup
    for name, value, least in (("--iters", iters, 1), ("--warmup", warmup, 0), ("max_images", options.max_images, 1)):
        if not whole_number(value, least):  # as the command checks them: else a traceback after minutes of building
            raise BenchError(f"{name} must be a whole number of at least {least}, not {value!r}.")
    if compile and warmup == 0:  # the first call compiles: timed, it would be the compiler's speed
        warmup = 1
        notes.append("--compile: one warm-up call is kept, the one that compiles (--warmup 0 would time the compiler).")
    # Each once, in the order given (`--compare timm,timm` builds one); one string is read as --compare reads it.
    given = parse_references(options.compare) if isinstance(options.compare, str) else options.compare
    compare = tuple(dict.fromkeys(given))
    check_references(compare)
    if isinstance(options.batch_sizes, str):  # "1,8,32", as --batch-size takes them
        batch_sizes = parse_batch_sizes(options.batch_sizes)
    else:
        batch_sizes = check_batch_sizes(DEFAULT_BATCH_SIZES[kind] if options.batch_sizes is None else options.batch_sizes)
    if options.images is not None:  # before minutes of model timing: a wrong folder fails at once
        walk = WalkReport()
        paths, skipped = decodable_images(options.images, limit=options.max_images, report=walk)

    model = os.fsdecode(options.model)  # a pathlib.Path from a Python caller
    say(f"loading {model}")
    # A preset: seeded random weights, no download, the same as `siglip inspect` draws for the seed.
    plain, preprocess, _ = load_tower(model, revision=options.revision, seed=options.seed)
    weights_mb = num_parameters(plain) * dtype.itemsize / 2**20
    report = Report(describe_machine(device, dtype), model, weights_mb, notes=notes)

    forwards = _forwards(plain, compare, device=device, dtype=dtype, compile=compile, report=report, say=say)
    clock = cpu_clock()
    with torch.inference_mode(), _a_graph_for_each(batch_sizes) if compile else contextlib.nullcontext():
        for i, batch_size in enumerate(batch_sizes):
            timed = counted(iters, "interleaved round" if len(forwards) > 1 else "timed call")
            say(f"batch {batch_size}: {', '.join(forwards)}, {timed} after {counted(warmup, 'warm-up call')}")
            _time_batch(forwards, plain, batch_size, report, device=device, dtype=dtype, iters=iters, warmup=warmup,
                        seed=options.seed, first=i == 0)  # fmt: skip

    if options.images is not None:
        report.notes += [f"--images: {note}" for note in walk.notes(quiet=True)]
        report.notes += _image_notes(paths, skipped, preprocess, device=device, iters=iters)
        say(f"image pipeline on {counted(len(paths), 'file')} from {options.images}")
        images = image_results(paths, plain, preprocess, device=device, dtype=dtype,
                               batch_size=min(max(batch_sizes), len(paths)), iters=iters, warmup=warmup,
                               notes=report.notes)  # fmt: skip
        report.results += images
        report.notes += [_rough(f"{r.stage} ({r.variant})", [("passes", r.spread)], "its images/s is rough")
                         for r in images if r.spread is not None and r.spread > NOISY_SPREAD]  # fmt: skip
    if (share := others_share(clock, cpu_clock())) is not None and share > BUSY_SHARE:
        report.notes.append(f"other processes took {share:.0%} of this process's CPUs while it timed: every rate is "
                            "lower than on a quiet machine; ratios measured side by side in one run hold "
                            "better.")  # fmt: skip
    return report


def _image_notes(
    paths: list[str], skipped: list[str], preprocess: PreprocessConfig, *, device: torch.device, iters: int
) -> list[str]:
    """What a reader of the `--images` results should know: files left out, passes that are not `iters`, worker
    start-up weighing on a small folder, and why the way through torchvision's JPEG decoder is left out, where it
    is (`_end_to_end_ways`)."""
    from . import gpu_decode

    notes = []
    if skipped:
        notes.append(f"--images: left out {counted(len(skipped), 'file')} that cannot be read (`siglip embed` would "
                     f"list them as errors): {first_of(skipped, 3)}.")  # fmt: skip
    if device.type == "cpu" and iters > 1:
        notes.append("--images on the CPU: each end-to-end way is timed over one pass of the files (a minute for a "
                     "base model over 64 images); --iters applies to the others.")  # fmt: skip
    if len(paths) < FEW_FILES:
        notes.append(
            f"--images: each end-to-end pass over the {counted(len(paths), 'file')} starts `siglip embed`'s "
            "decoding workers, a cost paid once per run: on a fast model a large folder runs at a higher rate."
        )
    from .gpu_decode import JpegHeader, read_header
    from .preprocess import DecodeOptions

    torchvision = "--images: the end-to-end way through torchvision's JPEG decoder is left out"
    if not gpu_decode.supported(preprocess):
        notes.append(f"{torchvision}: it cannot resize as this checkpoint does (its PIL filter {preprocess.resample}, "
                     "a crop or a kept aspect), so `siglip embed` decodes its photos on the CPU.")  # fmt: skip
    elif fault := gpu_decode.fault(device):
        notes.append(f"{torchvision}: it does not work on {device} ({fault}).")
    elif not any(isinstance(read_header(path, preprocess, DecodeOptions()), JpegHeader) for path in paths):
        notes.append(f"{torchvision}: none of the files is a JPEG it takes (other formats, CMYK JPEGs and photos "
                     "turned by 90 degrees go to PIL).")  # fmt: skip
    return notes


def _a_graph_for_each(batch_sizes: tuple[int, ...]) -> contextlib.AbstractContextManager:
    """Compiled with static shapes, each batch size is a graph of its own: past dynamo's limit of graphs per
    function (8), the other sizes would run uncompiled under a "+compiled" label. One graph to spare."""
    import torch._dynamo

    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"  # its name before 2.7
    return config.patch(**{name: max(getattr(config, name), len(batch_sizes) + 1)})


def _forwards(
    plain: SiglipVision, compare: tuple[str, ...], *, device: torch.device, dtype: torch.dtype, compile: bool,
    report: Report, say: Note,
) -> dict[str, tuple[Forward, str]]:  # fmt: skip
    """The forwards to time, by backend, with each one's variant: ours, then each reference asked for and installed
    (one that is not is a note in `report`), all on `plain`'s weights."""
    # The same dtype and compilation for every backend, in every row's name: "sdpa+bfloat16+compiled".
    applied = (f"+{dtype_name(dtype)}" if dtype != torch.float32 else "") + ("+compiled" if compile else "")
    forwards = {"siglip": (fast_model(plain, device=device, dtype=dtype, compile=compile), "fused" + applied)}
    for name in compare:
        if missing := missing_package(name):
            report.notes.append(missing)  # said once, with the results
            continue
        say(f"building the {name} reference on the same weights")
        forwards[name] = (
            reference_forward(name, plain, device=device, dtype=dtype, compile=compile),
            ("sdpa" if name == "transformers" else "timm") + applied,
        )
    return forwards


def _time_batch(
    forwards: dict[str, tuple[Forward, str]], plain: SiglipVision, batch_size: int, report: Report, *,
    device: torch.device, dtype: torch.dtype, iters: int, warmup: int, seed: int, first: bool,
) -> None:  # fmt: skip
    """Time every forward on one batch of random pixels, interleaved, into `report`: its results, and notes on
    numbers that are no embeddings or timings too noisy to compare. With `first`, each backend's agreement with
    our plain float32 forward too."""
    cfg = plain.config
    with _memory_for(batch_size, device):
        pixels = torch.randn(batch_size, cfg.num_channels, cfg.image_size, cfg.image_size,
                             generator=torch.Generator().manual_seed(seed)).to(device, dtype)  # fmt: skip
        calls = {backend: functools.partial(forward, pixels) for backend, (forward, _) in forwards.items()}
        timings = time_interleaved(calls, device=device, iters=iters, warmup=warmup)
    # Agreement, once: the first rows of each backend's output against our plain float32 forward on the same
    # (dtype-rounded) pixels. The timed shape again, so no compiled forward compiles anew.
    rows = min(batch_size, 2)
    expected = plain(pixels[:rows].float().cpu()).pooled if first else None
    if expected is not None and not torch.isfinite(expected).all():
        report.notes.append("the model gives NaN or infinite values even in float32: its numbers are no embeddings "
                            "(a damaged checkpoint?).")  # fmt: skip
        expected = None
    for backend, (forward, label) in forwards.items():
        agreement = None
        if expected is not None:
            agreement = cosine(forward(pixels)[:rows], expected)
            if agreement is None:
                report.notes.append(f"{backend} gave NaN or infinite values in {dtype_name(dtype)}: its numbers are "
                                    f"no embeddings {_nan_hint(dtype)}.")  # fmt: skip
        report.results.append(_result(backend, "model", batch_size, timings[backend], label, agreement))
    if iters == 1 and first and len(timings) > 1:
        report.notes.append("--iters 1: one timed call each, whose spread cannot be told: ratios from this run are "
                            "rough.")  # fmt: skip
    # Every backend whose calls spread too far, the widest first: naming only the widest left a rough siglip row
    # unsaid beside a rougher transformers one.
    noisy = sorted((b for b in timings if timings[b].spread > NOISY_SPREAD), key=lambda b: -timings[b].spread)
    if iters > 1 and noisy:
        rough = "ratios from this run are rough" if len(timings) > 1 else "its images/s is rough"
        spreads = [(f"calls of {b}" if i == 0 else b, timings[b].spread) for i, b in enumerate(noisy)]
        report.notes.append(_rough(f"batch {batch_size}", spreads, rough))


def _rough(row: str, spreads: list[tuple[str, float]], what: str) -> str:
    """The note on timed calls that spread over `NOISY_SPREAD` around their median: `spreads` names each kind of
    call so spread (the first as "calls of siglip", the others by their backend alone) and how far."""
    (timed, spread), others = spreads[0], spreads[1:]
    also = "".join(f", those of {name} by {other:.0%}" for name, other in others)
    return (f"{row}: the timed {timed} varied by {spread:.0%} around their median{also} (a busy machine, or too few "
            f"--iters): {what}.")  # fmt: skip


@contextlib.contextmanager
def _memory_for(batch_size: int, device: torch.device) -> Iterator[None]:
    """A batch too large for the device is a sentence: torch.OutOfMemoryError on CUDA, the allocator's RuntimeError
    on the CPU."""
    try:
        yield
    except RuntimeError as e:
        if not out_of_memory(e):
            raise
        raise BenchError(
            f"batch size {batch_size} does not fit in the memory of {device}: try a smaller --batch-size."
        ) from None


def _result(backend: str, stage: str, batch_size: int, timing: Timing, variant: str,
            agreement: float | None = None, images: int | None = None) -> Result:  # fmt: skip
    images = images or batch_size
    return Result(
        backend=backend,
        stage=stage,
        batch_size=batch_size,
        images_per_s=images / timing.median_s,
        ms_per_image=1000 * timing.median_s / images,
        peak_mem_mb=None if timing.peak_mem_mb is None else round(timing.peak_mem_mb, 1),
        variant=variant,
        setup_s=None if timing.setup_s is None else round(timing.setup_s, 3),
        cosine=agreement,
        spread=round(timing.spread, 3) if timing.calls > 1 else None,  # one call has no spread to tell
    )


def image_results(
    paths: list[str],
    model: SiglipVision,
    preprocess: PreprocessConfig,
    *,
    device: torch.device,
    dtype: torch.dtype,
    batch_size: int,
    iters: int,
    warmup: int = 1,
    notes: list[str] | None = None,
) -> list[Result]:
    """Where the time goes between files and embeddings: decode, preprocess, then the whole way; what a reader of
    them should know is added to `notes`.

    decode: PIL open + load, one core. preprocess: `preprocess.load_pixels` (decode, orient, resize, normalize), one
    core, exact and with `--fast-decode` (libjpeg's reduced-size decoding). Each is the median of `iters` passes
    over `paths`, after one untimed pass where `warmup` asks for any (the files' first read from disk; a pass is
    seconds, and a second would warm nothing more). end_to_end: `_end_to_end_results`.
    """
    from PIL import Image

    from .preprocess import DecodeOptions, load_pixels

    n = len(paths)

    def decode_all() -> None:
        for path in paths:
            with Image.open(path) as image:
                image.load()

    def preprocess_all(options: DecodeOptions) -> Callable[[], None]:
        return lambda: [load_pixels(path, preprocess, options) for path in paths]

    cpu = torch.device("cpu")
    passes = min(warmup, 1)
    decode = time_calls(decode_all, device=cpu, iters=iters, warmup=passes)
    exact, fast = preprocess_all(DecodeOptions()), preprocess_all(DecodeOptions(fast_decode=True))
    prep = time_interleaved({"exact": exact, "fast": fast}, device=cpu, iters=iters, warmup=passes)
    embedder = _embedder(model, preprocess, device=device, dtype=dtype)
    return [_result("siglip", "decode", 1, decode, "PIL, 1 core", images=n),
            _result("siglip", "preprocess", 1, prep["exact"], "PIL, 1 core", images=n),
            _result("siglip", "preprocess", 1, prep["fast"], "PIL --fast-decode, 1 core", images=n),
            *_end_to_end_results(paths, embedder, batch_size=batch_size, iters=iters, warm=passes > 0,
                                 notes=[] if notes is None else notes)]  # fmt: skip


def _embedder(
    model: SiglipVision, preprocess: PreprocessConfig, *, device: torch.device, dtype: torch.dtype
) -> Embedder:
    """A copy of `model` as `siglip embed` runs it. An Embedder carries the checkpoint it came from; a preset has
    none, so one without weight files stands in (`embed_paths` reads only its configs)."""
    checkpoint = Checkpoint(
        name="benchmark", revision=None, vision=model.config, preprocess=preprocess, weight_files=(), prefix="",
        preprocess_source="",
    )
    return Embedder(prepare_model(copy.deepcopy(model), device=device, dtype=dtype), checkpoint, device, dtype)


def _end_to_end_results(
    paths: list[str], embedder: Embedder, *, batch_size: int, iters: int, warm: bool, notes: list[str]
) -> list[Result]:
    """`embed.embed_paths` timed as `siglip embed` runs it, with its decoding workers: the exact PIL path, the same
    with `--fast-decode`, and `--decode gpu` (JPEGs decoded in batches through torchvision: nvJPEG on CUDA, libjpeg
    on the CPU; the PIL path for the files it leaves). A model that gives no finite row is said in `notes`. The two
    inexact paths carry their cosine to the exact one:
    what their speed costs. After one warm-up batch each (where `warm`; its time is the row's `setup_s`), the median
    of `iters` passes over `paths`; a single pass on the CPU, where one pass of a base model over 64 images takes most
    of a minute.
    """
    from .decoding import default_workers
    from .embed import embed_paths

    n, device, dtype = len(paths), embedder.device, embedder.dtype
    workers = default_workers()
    ways, taken = _end_to_end_ways(paths, embedder.preprocess, device=device, workers=workers)
    embeddings: dict[str, tuple[Tensor, list[str]]] = {}  # way: (rows, the path of each)

    def end_to_end(name: str) -> Callable[[], None]:
        def run() -> None:
            done = embed_paths(embedder, paths, batch_size=batch_size, workers=workers, **ways[name][1])
            embeddings[name] = torch.from_numpy(done.embeddings), [row["path"] for row in done.rows]

        return run

    setup: dict[str, float | None] = dict.fromkeys(ways)  # none without a warm-up
    with torch.inference_mode():
        for name, (_, given) in ways.items():  # a first batch each, untimed: imports (torchvision's 2 s), first calls
            if warm:
                first = taken[:batch_size] if name == "gpu" else paths[:batch_size]  # files it decodes itself
                start = time.perf_counter()
                embed_paths(embedder, first, batch_size=batch_size, workers=0, **given)
                synchronize(device)
                setup[name] = time.perf_counter() - start
        passes = 1 if device.type == "cpu" else iters
        timings = time_interleaved({name: end_to_end(name) for name in ways}, device=device, iters=passes, warmup=0)
        timings = {name: replace(timing, setup_s=setup[name]) for name, timing in timings.items()}
    exact, exact_paths = embeddings["exact"]
    if not len(exact):  # said as the model-only rows say it, the timings kept
        notes.append(f"the model gave NaN or infinite values for every image in {dtype_name(dtype)} "
                     f"{_nan_hint(dtype)}: the end-to-end rows time runs in which every file failed.")  # fmt: skip
    results = []
    for name, (variant, _) in ways.items():
        agreement = None if name == "exact" else _cosine_by_path(*embeddings[name], exact, exact_paths)
        results.append(_result("siglip", "end_to_end", batch_size, timings[name], variant, agreement, images=n))
    return results


def _end_to_end_ways(
    paths: list[str], preprocess: PreprocessConfig, *, device: torch.device, workers: int
) -> tuple[dict[str, tuple[str, dict[str, Any]]], list[str]]:
    """The ways `siglip embed` can take `paths`, each by name: (variant, what it is given beyond the batch size and
    workers); and the files `--decode gpu` decodes itself, its JPEGs. That way is left out where it would decode
    none, or cannot match the checkpoint's resize."""
    from . import gpu_decode
    from .gpu_decode import JpegHeader, read_header
    from .preprocess import DecodeOptions

    ways = {
        "exact": (f"PIL decode, workers={workers}", {}),
        "fast": (f"PIL --fast-decode, workers={workers}", {"decode": DecodeOptions(fast_decode=True)}),
        "gpu": (f"torchvision decode on {device.type}", {"decoder": "gpu"}),  # `siglip embed --decode gpu`
    }
    taken = [path for path in paths if isinstance(read_header(path, preprocess, DecodeOptions()), JpegHeader)]
    jpegs, n = len(taken), len(paths)  # what the device decoder takes; the rest, PIL
    if jpegs < n:  # the rest take the PIL path: said, or left out when there is nothing for torchvision to decode
        ways["gpu"] = (f"{ways['gpu'][0]} ({jpegs} of {n} files, the rest PIL)", ways["gpu"][1])
    # The decoder tried on a tiny JPEG on the CPU too: that imports torchvision (2 s) before anything is timed, which
    # with --warmup 0 (no untimed batch) the way's first timed pass paid.
    if not jpegs or not gpu_decode.supported(preprocess) or gpu_decode.fault(device):
        del ways["gpu"]  # nothing to decode there, a resize it cannot match, or a decoder that does not work here
    return ways, taken


def _cosine_by_path(out: Tensor, paths: list[str], exact: Tensor, exact_paths: list[str]) -> float | None:
    """The cosine of a way's rows to the exact way's, file by file: a file one way could embed and the other not (a
    NaN in one dtype, a JPEG one decoder refuses) leaves the others' rows where they are, not shifted by one."""
    where = {path: i for i, path in enumerate(exact_paths)}
    pairs = [(i, where[path]) for i, path in enumerate(paths) if path in where]
    if not pairs:
        return None
    return cosine(out[[i for i, _ in pairs]], exact[[j for _, j in pairs]])


def _nan_hint(dtype: torch.dtype) -> str:
    return "(a damaged checkpoint?)" if dtype == torch.float32 else "(try --dtype float32)"


def decodable_images(
    directory: Path, *, limit: int, report: WalkReport | None = None
) -> tuple[list[str], list[str]]:
    """The first `limit` image files under `directory` that decode, found as `siglip embed` finds them (sorted,
    recursive), and those passed over because they do not, each with why: timings of a file that fails mean
    nothing. `report` collects what the walk met besides image files (a FIFO named `x.jpg`, a broken link, a folder
    that cannot be listed), for the notes `siglip embed` would give."""
    from .files import IMAGE_SUFFIXES, discover
    from .text import display_path
    from .preprocess import BadImage, DecodeOptions, TooManyPixels, bad_file_reason, open_rgb

    try:  # os.stat, not pathlib: Python 3.14's `is_dir` says False of a folder closed to this user
        if not stat.S_ISDIR(os.stat(directory).st_mode):
            raise BenchError(f"--images {directory} is not a directory.")
    except FileNotFoundError:
        raise BenchError(f"--images {directory} does not exist.") from None
    except OSError as e:  # a folder on its way closed to this user, a link loop, a name too long
        raise BenchError(f"--images {directory} cannot be read: {e.strerror or e}.") from None
    report = WalkReport() if report is None else report
    found = discover([str(directory)], report=report)
    if not found:  # and why, where the walk met entries it could not take (a FIFO, a link into a drive not mounted)
        met = "".join(f"; {clause}" for clause in report.unreached())
        raise BenchError(f"--images {directory} holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))}{met}).")
    paths, skipped = [], []
    for path in found:
        if len(paths) == limit:
            break
        try:
            open_rgb(path, DecodeOptions())
            paths.append(path)
        except TooManyPixels as e:  # `bench` has no --max-pixels: it times photos `siglip embed` takes as it is
            skipped.append(f"{display_path(path)} ({e.pixels:,} pixels, over the {e.limit:,} siglip embed takes "
                           "without --max-pixels)")  # fmt: skip
        except (BadImage, OSError, ValueError) as e:
            skipped.append(f"{display_path(path)} ({bad_file_reason(e)})")
    if not paths:
        raise BenchError(f"--images {directory}: none of its image files decode: {skipped[0]}.")
    return paths, skipped
