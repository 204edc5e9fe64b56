"""The whole GPU measurement in one command (--budget seconds of measuring, 240 by default), printed as one table.

    bash bench/gpu_check.sh OUT_DIR                       # on the GPU machine: table, JSON, profiles in OUT_DIR
    python bench/gpu_check.py --end-to-end-only --budget 150  # the end-to-end rows alone: a second, short run
    python bench/gpu_check.py --smoke                     # tiny sizes on the CPU: checks that the script runs

Model only, bf16, random weights (no download), every backend on the same weights:
  B/16-224 at batch 256 and so400m/14-384 at batch 64: ours as `siglip embed` runs it (SDPA's own choice of
  kernel, then flash / cuDNN forced), ours + CUDA graphs, ours compiled (+ CUDA graphs), transformers sdpa (eager
  and compiled), timm (eager). Each row's cosine is to our plain float32 forward on the same pixels.
End to end, B/16-224, on synthetic 2-MP JPEGs it writes: the nvJPEG decoder alone, the CPU workers with
  `--fast-decode` alone and both side by side, nvJPEG feeding our fastest forward, the pieces of `siglip embed`'s
  loop one by one, the loop itself with GPU decoding (1, 2 or 4 decoding threads; 4 or 8 reading workers) and with
  CPU (PIL workers) decoding, and the `siglip embed` command; cosine to the exact CPU/PIL pixels through the float32
  model.

Medians of --iters timed calls after --warmup, synchronized. Steps that would overrun --budget are skipped with a
note, so the script always finishes and prints what it has. A step that fails prints its error in its row and the
script moves on: one missing kernel must not cost the whole run.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import faulthandler
import json
import os
import sys
import tempfile
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from multiprocessing import Pool
from pathlib import Path
from unittest import mock

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from siglip_cli import benchmark as B
from siglip_cli.config import PreprocessConfig, VisionConfig
from siglip_cli.decoding import default_workers
from siglip_cli.errors import first_line
from siglip_cli.gpu_decode import decode_headers, read_header
from siglip_cli.model import SiglipVision, random_model
from siglip_cli.preprocess import DecodeOptions, load_pixels
from siglip_cli.references import Forward, reference_forward

GOALS = {"B/16-224": 15_000, "so400m/14-384": 800, "end to end": 3_000}
GOAL_BATCH = {"B/16-224": 256}  # B/16's goal (15,000 images/s) is set at batch 256; so400m's names no batch
# The end-to-end goal is `siglip embed`'s: its loop and the command count, not the decoder experiments.
END_TO_END_GOAL_ROWS = ("siglip embed loop, --decode", "`siglip embed")
PHOTO_SIZE = (1632, 1224)  # 2.0 MP, 4:3 like a phone photo
# Copies of one image in a batch, which must embed to the same bits: 7 rows, no whole number of a GEMM's row blocks.
COPIES = 7
COPIES_VARIANT = f"eager, one image {COPIES} times"


@dataclass
class Row:
    section: str  # "model only" or "end to end"
    model: str
    backend: str
    variant: str
    batch: int
    images_per_s: float | None = None
    ms_per_image: float | None = None
    cosine: float | None = None
    setup_s: float | None = None
    peak_mem_mb: float | None = None
    note: str = ""


@dataclass(frozen=True)
class Spec:
    label: str  # "B/16-224"
    vision: VisionConfig
    preprocess: PreprocessConfig
    batch: int


def specs(smoke: bool) -> list[Spec]:
    from siglip_cli.config import PRESETS

    if smoke:
        tiny = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
        return [
            Spec("tiny-p16-64", VisionConfig(**tiny, image_size=64, patch_size=16), PreprocessConfig(64, 64), 4),
            Spec("tiny-p14-56", VisionConfig(**tiny, image_size=56, patch_size=14), PreprocessConfig(56, 56), 2),
        ]
    return [
        Spec("B/16-224", *PRESETS["siglip-base-patch16-224"], 256),
        Spec("so400m/14-384", *PRESETS["siglip-so400m-patch14-384"], 64),
    ]


class Clock:
    """The --budget: a step that would not fit is skipped with a note instead of run."""

    def __init__(self, budget_s: float):
        self.start, self.budget = time.monotonic(), budget_s

    def left(self) -> float:
        return self.budget - (time.monotonic() - self.start)

    def fits(self, estimate_s: float) -> bool:
        return self.left() > estimate_s


def sdpa(backend: str | None) -> contextlib.AbstractContextManager:
    """Force one SDPA kernel (flash / cudnn / efficient), or leave PyTorch's choice (None)."""
    if backend is None:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    kernel = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
              "efficient": SDPBackend.EFFICIENT_ATTENTION}[backend]  # fmt: skip
    return sdpa_kernel([kernel])


class CudaGraphForward:
    """Replays a CUDA graph captured once per input shape: no per-kernel launch cost, for fixed-shape batches.

    The returned tensor is the graph's static output, overwritten by the next call: copy it before calling again.
    """

    def __init__(self, forward: Forward, *, warmup: int = 3):
        self.forward, self.warmup = forward, warmup
        self.graphs: dict[tuple[tuple[int, ...], torch.dtype], tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        key = (tuple(pixels.shape), pixels.dtype)
        if key not in self.graphs:
            self.graphs[key] = self._capture(pixels)
        graph, static_in, static_out = self.graphs[key]
        static_in.copy_(pixels)
        graph.replay()
        return static_out

    def _capture(self, pixels: torch.Tensor) -> tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]:
        static_in = pixels.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up on a side stream, as capture requires
            for _ in range(self.warmup):
                self.forward(static_in)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = self.forward(static_in)
        return graph, static_in, static_out


def measure(row: Row, make: Callable[[], Forward], pixels: torch.Tensor, check: torch.Tensor, expected: torch.Tensor,
            *, device: torch.device, iters: int, warmup: int, attention: str | None = None) -> tuple[Row, Forward | None]:  # fmt: skip
    """Build one candidate, time it on `pixels`, and compare its output on `check` with `expected`."""
    try:
        with sdpa(attention), torch.inference_mode():
            started = time.perf_counter()
            forward = make()
            build_s = time.perf_counter() - started
            timing = B.time_calls(lambda: forward(pixels), device=device, iters=iters, warmup=warmup)
            row.cosine = B.cosine(_in_batches(forward, check, pixels.shape[0]), expected)
        row.images_per_s = pixels.shape[0] / timing.median_s
        row.ms_per_image = 1000 * timing.median_s / pixels.shape[0]
        row.setup_s = build_s + (timing.setup_s or 0.0)  # building, compiling or capturing, and any warm-up calls
        row.peak_mem_mb = timing.peak_mem_mb
        return row, forward
    except Exception as e:  # a benchmark row, not a library call: report the failure and keep measuring
        row.note = _failed(e)
        if os.environ.get("GPU_CHECK_TRACEBACK"):
            traceback.print_exc()
        return row, None
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _in_batches(forward: Forward, x: torch.Tensor, batch: int) -> torch.Tensor:
    """Run `forward` on `x` in the timed batch shape (compiled and graphed forwards are shape-specialised)."""
    outputs = []
    for start in range(0, x.shape[0], batch):
        chunk = x[start : start + batch]
        padded = torch.cat([chunk, chunk[:1].expand(batch - chunk.shape[0], -1, -1, -1)]) if chunk.shape[0] < batch else chunk
        outputs.append(forward(padded)[: chunk.shape[0]].float().clone())
    return torch.cat(outputs)


@contextlib.contextmanager
def exact_float32() -> Iterator[None]:
    """float32 matmuls in float32, not TF32: the reference every cosine is taken against."""
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def model_only(
    spec: Spec, args: argparse.Namespace, device: torch.device, clock: Clock
) -> tuple[list[Row], dict[str, Forward], SiglipVision | None]:
    """Every backend and lever on one config: the rows, our forwards by variant, and the float32 plain model."""
    dtype = torch.bfloat16
    if not clock.fits(10):  # building so400m and its float32 reference costs seconds the budget no longer has
        return [Row("model only", spec.label, "all", "all rows", spec.batch, note="skipped: over the time budget")], {}, None
    plain = random_model(spec.vision).to(device)  # the weights `siglip bench` and `siglip inspect` draw
    torch.manual_seed(0)
    cfg = spec.vision
    pixels = torch.randn(spec.batch, 3, cfg.image_size, cfg.image_size, device=device).to(dtype)
    check = torch.randn(min(spec.batch, 16), 3, cfg.image_size, cfg.image_size, device=device).to(dtype)
    with torch.inference_mode(), exact_float32():
        expected = plain(check.float()).pooled.float()  # the pixels every candidate gets, in float32
    cuda = device.type == "cuda"
    run = dict(device=device, iters=args.iters, warmup=args.warmup)
    rows: list[Row] = []
    ours: dict[str, Forward] = {}

    def add(backend: str, variant: str, make: Callable[[], Forward], *, estimate_s: float, attention: str | None = None,
            batch: int | None = None) -> None:  # fmt: skip
        batch = batch or spec.batch
        row = Row("model only", spec.label, backend, variant, batch)
        if not clock.fits(estimate_s):
            row.note = f"skipped: {clock.left():.0f} s left of the budget, needs ~{estimate_s:.0f} s"
            rows.append(row)
            return
        timed = pixels if batch == spec.batch else torch.randn(batch, *pixels.shape[1:], device=device).to(dtype)
        row, forward = measure(row, make, timed, check, expected, attention=attention, **run)
        del timed
        if "CUDA graphs" in variant and row.images_per_s and not row.note:
            row.note = "peak MB leaves out the graph's memory pool, taken when it was captured"
        rows.append(row)
        if forward is not None and backend == "siglip" and batch == spec.batch and attention is None:
            ours[variant] = forward  # a forced SDPA kernel holds only inside `measure`: not one to reuse
        print(f"  {spec.label} {backend} {variant}: {_rate(row)}", file=sys.stderr, flush=True)

    def fast(*, compile: bool = False, mode: str | None = None, graphs: bool = False) -> Callable[[], Forward]:
        """Our forward as `siglip bench` builds it; compiled in torch's `mode`, replayed as CUDA graphs."""

        def make() -> Forward:
            forward = B.fast_model(plain, device=device, dtype=dtype)
            forward = torch.compile(forward, dynamic=False, mode=mode) if compile else forward
            return CudaGraphForward(forward) if graphs else forward

        return make

    reference = lambda backend, compile=False: lambda: reference_forward(  # noqa: E731
        backend, plain, device=device, dtype=dtype, compile=compile)
    # Cheap rows first (eager: seconds each), then what compiles (a minute each), so a short budget keeps the most.
    add("siglip", "eager", fast(), estimate_s=10)
    if "eager" in ours:  # exact-match deduplication needs copies of a photo in one batch to get the same bits
        copies = check[:1].expand(COPIES, -1, -1, -1).contiguous()
        with torch.inference_mode():
            pooled = ours["eager"](copies)
        same = "identical" if bool((pooled == pooled[0]).all()) else "NOT identical: see model._per_image"
        rows.append(Row("model only", spec.label, "siglip", COPIES_VARIANT, COPIES, note=f"the {COPIES} rows: {same}"))
        print(f"  {spec.label} copies of one image in a batch of {COPIES}: {same}", file=sys.stderr, flush=True)
    add("siglip", "eager, 4× the batch", fast(), estimate_s=10, batch=4 * spec.batch)  # does a bigger batch pay?
    if cuda:
        add("siglip", "eager + CUDA graphs", fast(graphs=True), estimate_s=10)
        for attention in ("flash", "cudnn"):
            add("siglip", f"eager, SDPA {attention}", fast(), estimate_s=10, attention=attention)
    add("transformers", "sdpa", reference("transformers"), estimate_s=10)
    add("timm", "eager", reference("timm"), estimate_s=10)
    if cuda or args.compile:
        add("siglip", "compiled", fast(compile=True), estimate_s=45)
        if cuda and "compiled" in ours:
            add("siglip", "compiled + CUDA graphs", lambda: CudaGraphForward(ours["compiled"]), estimate_s=10)
    if (cuda and not args.no_compile_references) or args.compile:
        add("transformers", "sdpa compiled", reference("transformers", compile=True), estimate_s=45)
    if args.autotune:
        add("siglip", "compiled max-autotune", fast(compile=True, mode="max-autotune-no-cudagraphs"), estimate_s=300)
    if args.profile_dir and clock.fits(20):
        for variant in ("eager", "compiled"):
            if variant in ours:
                profile(ours[variant], pixels, device, args.profile_dir / f"profile-{_slug(spec.label)}-{variant}.txt",
                        f"{spec.label} {variant}")  # fmt: skip
    return rows, ours, plain


def _rate(row: Row) -> str:
    if not row.images_per_s:
        return row.note
    parts = [f"{row.images_per_s:,.0f} images/s"] + ([f"cosine {row.cosine:.5f}"] if row.cosine is not None else [])
    return ", ".join(parts + ([row.note] if row.note else []))


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text).strip("-")


KERNEL_KINDS = (  # kernel-name patterns → what the time is spent on, first match wins
    ("conv", ("conv", "implicit", "fprop_optimized", "nchwtonhwc", "nhwctonchw")),  # cuDNN's convs and layouts
    ("attention", ("flash", "fmha", "attention", "sdpa")),
    ("GEMM", ("gemm", "cutlass", "xmma", "nvjet", "cublas", "sm90_", "sm80_", "addmm", "mm_")),
    ("LayerNorm", ("layer_norm", "layernorm")),
    ("GELU", ("gelu",)),
    ("copy / layout", ("copy", "transpose", "contiguous", "cat")),
    ("fused (Triton)", ("triton",)),
)


def profile(forward: Forward, pixels: torch.Tensor, device: torch.device, path: Path, label: str) -> None:
    """Where one forward's device time goes: every kernel to `path`, a one-line share by kind to stderr."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    try:
        cuda = device.type == "cuda"
        with torch.inference_mode():
            for _ in range(2):
                forward(pixels)
            B.synchronize(device)
            with torch_profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
                for _ in range(3):
                    forward(pixels)
                B.synchronize(device)
        kind_of_time = torch.autograd.DeviceType.CUDA if cuda else torch.autograd.DeviceType.CPU
        self_time = (lambda e: e.self_device_time_total) if cuda else (lambda e: e.self_cpu_time_total)  # noqa: E731
        events = [e for e in prof.key_averages() if e.device_type == kind_of_time and self_time(e) > 0]
        total = sum(self_time(e) for e in events) or 1.0
        shares: dict[str, float] = {}
        for e in events:
            name = e.key.lower()
            kind = next((k for k, patterns in KERNEL_KINDS if any(p in name for p in patterns)), "other")
            shares[kind] = shares.get(kind, 0.0) + self_time(e) / total
        path.parent.mkdir(parents=True, exist_ok=True)
        sort_by = "self_cuda_time_total" if cuda else "self_cpu_time_total"
        path.write_text(prof.key_averages().table(sort_by=sort_by, row_limit=40, max_name_column_width=90))
        summary = ", ".join(f"{k} {v:.0%}" for k, v in sorted(shares.items(), key=lambda kv: -kv[1]))
        where = "kernels" if cuda else "CPU ops"
        print(f"  profile {label}: {total / 3 / 1000:.2f} ms of {where} per batch: {summary}", file=sys.stderr, flush=True)
    except Exception as e:  # a report, not a measurement: say what went wrong and go on
        print(f"  profile {label} failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- end to end


def _write_photo(args: tuple[Path, int, tuple[int, int]]) -> None:
    """A synthetic photo: smooth colour fields plus sensor-like noise, so the JPEG is as dense as a real one."""
    path, seed, (width, height) = args
    rng = np.random.default_rng(seed)
    y, x = np.ogrid[0:height, 0:width]
    phase = rng.uniform(0, 6.28, 3)
    channels = [127 + 100 * np.sin(x / (40 + 30 * c) + y / (55 + 20 * c) + phase[c], dtype=np.float32) for c in range(3)]
    pixels = np.stack(channels, -1) + rng.standard_normal((height, width, 3), dtype=np.float32) * 12
    exif = Image.Exif()
    if seed % 8 == 7:
        exif[0x0112] = 6  # a few phone portraits: the GPU path must rotate them like the PIL path
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path, quality=90, exif=exif)


def odd_jpegs(directory: Path, cfg: PreprocessConfig, device: torch.device) -> None:
    """JPEGs a photo library holds beside the usual ones, through the device decoder and the exact PIL path, one
    line each on stderr: how far apart their pixels are (in 8-bit levels), or which path refused them. nvJPEG has
    had corruption bugs, and a truncated file the PIL path refuses must not be embedded from half its pixels."""
    directory.mkdir(parents=True, exist_ok=True)
    _write_photo((directory / "base.jpg", 1, (1600, 1200)))
    photo = Image.open(directory / "base.jpg").convert("RGB")
    photo.save(directory / "progressive.jpg", quality=90, progressive=True)
    photo.convert("L").save(directory / "grey.jpg", quality=90)
    photo.save(directory / "444-q100.jpg", quality=100, subsampling=0)
    photo.resize((12000, 300)).save(directory / "panorama-40x.jpg", quality=90)  # resized on the device
    photo.resize((24000, 300)).save(directory / "panorama-107x.jpg", quality=90)  # past MAX_GPU_DOWNSCALE: the CPU's
    photo.crop((0, 0, 1601, 1199)).save(directory / "420-odd-size.jpg", quality=90)  # half a chroma block at the edges
    photo.save(directory / "restart-markers.jpg", quality=90, restart_marker_blocks=4)  # as some cameras write them
    photo.convert("CMYK").save(directory / "cmyk.jpg", quality=90)  # left to PIL: the device decoder takes YCbCr
    data = (directory / "base.jpg").read_bytes()
    (directory / "truncated.jpg").write_bytes(data[: len(data) * 6 // 10])  # an interrupted copy
    # Bytes of the scan overwritten, its end marker intact: nvJPEG may embed garbage where PIL warns or refuses.
    middle = len(data) // 2
    (directory / "scan-corrupted.jpg").write_bytes(data[:middle] + bytes(range(7, 247, 3)) + data[middle + 80 :])
    for path in sorted(directory.glob("*.jpg")):
        try:
            exact = torch.from_numpy(load_pixels(path, cfg, DecodeOptions())[0])
        except Exception as e:  # the PIL path's verdict on the file
            exact, cpu = None, f"PIL path refuses it ({str(e)[:60]})"
        else:
            cpu = "PIL path decodes it"
        header = read_header(path, cfg, DecodeOptions())
        if isinstance(header, str):
            gpu = f"left to PIL ({header})"
        else:
            try:
                pixels, decoded, rejected = decode_headers([header], cfg, device=device)
            except Exception as e:
                gpu = f"DEVICE DECODER RAISED {type(e).__name__}: {str(e)[:80]}"
            else:
                if rejected:
                    gpu = f"device decoder rejects it ({rejected[0][1][:60]})"
                elif exact is None:
                    gpu = "DEVICE DECODER EMBEDS A FILE THE PIL PATH REFUSES"
                else:
                    levels = float((pixels[0].cpu() - exact).abs().max()) * 127.5
                    gpu = f"device decoder within {levels:.1f} levels of PIL"
        print(f"  odd JPEG {path.name}: {cpu}; {gpu}", file=sys.stderr, flush=True)


def write_photos(directory: Path, count: int, size: tuple[int, int]) -> list[str]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = [directory / f"photo-{i:05d}.jpg" for i in range(count)]
    todo = [(p, i, size) for i, p in enumerate(paths) if not p.exists()]
    if todo:
        with Pool(min(len(todo), os.cpu_count() or 1)) as pool:
            pool.map(_write_photo, todo, chunksize=8)
    return [str(p) for p in paths]


def save_checkpoint(model: SiglipVision, directory: Path) -> Path:
    """`model` (unfused, float32) as a local checkpoint in the Hub layout that `siglip embed -m DIR` loads."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    state = {f"vision_model.{k}": v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, directory / "model.safetensors", metadata={"format": "pt"})
    config = {"model_type": "siglip_vision_model", **asdict(model.config)}
    (directory / "config.json").write_text(json.dumps(config, indent=1))
    return directory


def device_decoded(files: list[str], cfg: PreprocessConfig, device: torch.device, *, batch: int,
                   threads: int) -> Iterator[torch.Tensor]:  # fmt: skip
    """The device decoder alone, as `siglip embed --decode gpu` runs it (`read_header`, then `decode_headers`),
    `batch` files at a time with `threads` batches on their way: no workers, no model. Each batch's pixels, in
    order; every file must decode there (the synthetic JPEGs do). Reading files and the decoder release the GIL.

    Not `concurrency.look_ahead`, which `siglip embed` uses: its one background thread decodes one batch at a time
    (`depth` only queues more). Here `threads` batches (--decode-threads) decode at once: the decoder's rate with
    more threads than `siglip embed` gives it."""

    def decode(chunk: list[str]) -> torch.Tensor:
        headers = [read_header(path, cfg, DecodeOptions()) for path in chunk]
        refused = [header for header in headers if isinstance(header, str)]
        if refused:
            raise RuntimeError(f"the device decoder does not take a synthetic JPEG: {refused[0]}")
        pixels, _, rejected = decode_headers(headers, cfg, device=device)
        if rejected:
            raise RuntimeError(f"the device decoder rejected a synthetic JPEG: {rejected[0][1]}")
        return pixels

    with ThreadPoolExecutor(max_workers=threads) as pool:
        pending: deque = deque()
        for start in range(0, len(files), batch):
            pending.append(pool.submit(decode, files[start : start + batch]))
            if len(pending) > threads:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def end_to_end(spec: Spec, plain: SiglipVision, forward: Forward, variant: str, args: argparse.Namespace,
               device: torch.device, workdir: Path, clock: Clock) -> list[Row]:  # fmt: skip
    """Files → L2-normalized embeddings on the host, B/16-224 bf16. Cosine to the exact PIL pixels through `plain` in
    float32. Rows, each timed after a warm-up on the first two batches:
      - the decoder alone (nvJPEG batches, threads ahead), the ceiling of everything after it;
      - that decoder feeding our fastest forward (`forward`, built from `plain`);
      - `siglip embed`'s own loop (`embedded_batches` with a loaded checkpoint, eager bf16), GPU and CPU decoding;
      - the `siglip embed` command itself as a subprocess: its own images/s (after loading) and the whole wall time.
    The photo list names each file --repeat times (page cache warm), so a run is long enough to time."""
    from siglip_cli import embed as embed_module
    from siglip_cli import gpu_decode
    from siglip_cli.concurrency import look_ahead
    from siglip_cli.decoding import batch_pixels, decoded_batches
    from siglip_cli.embed import EmbedOptions, embedded_batches, load

    size = (96, 72) if args.smoke else PHOTO_SIZE
    if not clock.fits(60):  # writing the photos alone takes ~30 s on 16 cores
        return [Row("end to end", spec.label, "siglip", "all rows", spec.batch, note="skipped: over the time budget")]
    started = time.perf_counter()
    photo_dir = workdir / f"photos-{size[0]}x{size[1]}"
    paths = write_photos(photo_dir, args.photos, size)
    listed = paths * args.repeat
    print(f"  {len(paths)} JPEGs of {size[0]}x{size[1]} ready in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    batch, cfg = spec.batch, spec.preprocess
    cuda = device.type == "cuda"
    workers = 2 if args.smoke else default_workers()

    @torch.inference_mode()  # as when the forward was built (a CUDA graph's input is an inference tensor)
    def embed(pixels: torch.Tensor) -> torch.Tensor:
        n = pixels.shape[0]
        if n < batch:  # a shape-specialised forward sees only full batches
            pixels = torch.cat([pixels, pixels[:1].expand(batch - n, -1, -1, -1)])
        return F.normalize(forward(pixels.to(device, torch.bfloat16, non_blocking=True))[:n].float(), dim=-1)

    def decode_only(files: list[str]) -> None:
        for _ in device_decoded(files, cfg, device, batch=batch, threads=args.decode_threads):
            pass

    def cpu_fast_decode_only(files: list[str]) -> None:
        """PIL with `--fast-decode` in the loop's workers, no model: what the CPU can add beside the GPU decoder."""
        for _ in decoded_batches(files, cfg, DecodeOptions(fast_decode=True), batch_size=batch, workers=workers, pin=cuda):
            pass

    def side_by_side(files: list[str]) -> None:
        """An experiment for the 3,000 images/s goal: nvJPEG (threads) on part of the files while the CPU workers
        decode the rest with `--fast-decode`, at once, no model. The split follows the two rates measured above."""
        gpu_rate = next((r.images_per_s for r in rows if r.variant.startswith("decode only")), None) or 1.0
        cpu_rate = next((r.images_per_s for r in rows if r.variant.startswith("CPU workers")), None) or 1.0
        cut = round(len(files) * gpu_rate / (gpu_rate + cpu_rate))
        # The workers are forked before the decoder's thread starts: a fork while a thread is inside CUDA can hang.
        on_cpu = decoded_batches(files[cut:], cfg, DecodeOptions(fast_decode=True), batch_size=batch, workers=workers, pin=cuda)
        next(on_cpu, None)
        with ThreadPoolExecutor(1) as pool:
            on_gpu = pool.submit(decode_only, files[:cut])
            for _ in on_cpu:
                pass
            on_gpu.result()

    def decoder_and_forward(files: list[str]) -> torch.Tensor:
        out = []
        for pixels in device_decoded(files, cfg, device, batch=batch, threads=args.decode_threads):
            out.append(embed(pixels).cpu())
        return torch.cat(out)

    checkpoint = save_checkpoint(plain, workdir / "checkpoint")
    embedder = load(str(checkpoint), device=str(device), dtype="bfloat16")

    def loader_only(files: list[str]) -> None:
        """The loop's first piece: workers read the files and parse JPEG headers, bytes cross to this process."""
        for _ in decoded_batches(files, cfg, DecodeOptions(), batch_size=batch, workers=workers, pin=cuda, jpeg_to_device=True):
            pass

    def loader_and_decoder(files: list[str]) -> None:
        """...then the device decoder, a thread ahead, as in the loop; no model."""
        batches = decoded_batches(files, cfg, DecodeOptions(), batch_size=batch, workers=workers, pin=cuda, jpeg_to_device=True)
        for _ in look_ahead(batches, lambda b: batch_pixels(b, cfg, device, DecodeOptions()), depth=2):
            pass

    def embed_loop(decoder: str, threads: int | None = None, processes: int | None = None) -> Callable[[list[str]], torch.Tensor]:
        """`siglip embed`'s loop with `threads` device decoding threads (default: `embed.DEVICE_DECODE_THREADS`) and
        `processes` reading workers (default: `siglip embed`'s)."""

        def run(files: list[str]) -> torch.Tensor:
            with mock.patch.object(embed_module, "DEVICE_DECODE_THREADS", threads or embed_module.DEVICE_DECODE_THREADS):
                options = EmbedOptions(batch_size=batch, workers=processes or workers, decoder=decoder)
                done = embedded_batches(embedder, files, options)
                return torch.cat([torch.from_numpy(d.embeddings) for d in done])

        return run

    def decode_whole_batches(files: list[str]) -> None:
        """The decoder alone with a whole batch per call, whatever `gpu_decode.pixels_per_call` says."""
        with mock.patch.object(gpu_decode, "PIXELS_PER_CALL", 1 << 62):
            decode_only(files)

    # The photos checked against the exact path are spread over the list, and every listing of them is checked: a
    # decoder race shows where the GPU has work queued ahead, which the first group of the first batch never has.
    check = paths[:: max(1, len(paths) // 32)]
    odd_jpegs(workdir / "odd", cfg, device)
    rows = []
    with torch.inference_mode():
        exact_pixels = torch.stack([torch.from_numpy(load_pixels(p, cfg, DecodeOptions())[0]) for p in check]).to(device)
        with exact_float32():
            exact = F.normalize(plain(exact_pixels).pooled.float(), dim=-1).cpu()
    decoder_name = "nvJPEG" if cuda else "libjpeg, CPU"
    timed = (  # name, run, files, estimate in s
        (f"decode only ({decoder_name}, batched)", decode_only, listed, 10),
        (f"decode only ({decoder_name}, a whole batch per call)", decode_whole_batches, listed, 10),
        ("CPU workers, PIL --fast-decode, no model", cpu_fast_decode_only, listed, 10),
        (f"decode side by side: {decoder_name} + CPU workers --fast-decode, no model", side_by_side, listed, 10),
        (f"{decoder_name} batches + model {variant}", decoder_and_forward, listed, 10),
        ("siglip embed loop, workers reading JPEGs only", loader_only, listed, 10),
        ("siglip embed loop, workers + device decoder, no model", loader_and_decoder, listed, 10),
        *((f"siglip embed loop, --decode gpu, eager, {n} decoding thread{'s' * (n > 1)}", embed_loop("gpu", n), listed, 15)
          for n in (1, 2, 4)),
        # The workers only read JPEG bytes on this path, and nvJPEG's host side (Huffman decoding) runs in the
        # decoding threads: do fewer workers leave it more of the CPU? (Unmeasured: 2026-11-29's rows ran 15.)
        *((f"siglip embed loop, --decode gpu, eager, {n} workers", embed_loop("gpu", processes=n), listed, 15)
          for n in (4, 8) if n < workers),
        ("siglip embed loop, --decode cpu (PIL workers), eager", embed_loop("cpu"), paths, 15),
    )
    for name, run, files, estimate_s in timed:
        row = Row("end to end", spec.label, "siglip", name, batch)
        if not clock.fits(estimate_s):
            row.note = "skipped: over the time budget"
            rows.append(row)
            continue
        try:
            run(files[: 2 * batch])  # warm-up: workers, decoder, caches, kernels
            B.synchronize(device)
            started = time.perf_counter()
            embeddings = run(files)
            B.synchronize(device)
            seconds = time.perf_counter() - started
            row.images_per_s, row.ms_per_image = len(files) / seconds, 1000 * seconds / len(files)
            if embeddings is not None:
                row.cosine = cosine_to_exact(embeddings, files, check, exact)
            row.note = f"{len(files)} images"
        except Exception as e:  # a benchmark row: report the failure, keep measuring
            row.note = _failed(e)
            if os.environ.get("GPU_CHECK_TRACEBACK"):
                traceback.print_exc()
        print(f"  end to end {row.variant}: {_rate(row)}", file=sys.stderr, flush=True)
        rows.append(row)
    for options in (["--decode", "gpu"], ["--decode", "cpu"], ["--decode", "cpu", "--fast-decode"]):
        row = Row("end to end", spec.label, "siglip", f"`siglip embed {' '.join(options)}` command", spec.batch)
        try:
            command_row(row, checkpoint, photo_dir, options, check, exact, device, workdir, clock)
        except Exception as e:  # as above: one row's failure is reported in it
            row.note = _failed(e)
        print(f"  end to end {row.variant}: {_rate(row)}", file=sys.stderr, flush=True)
        rows.append(row)
    return rows


def cosine_to_exact(embeddings: torch.Tensor, files: list[str], check: list[str], exact: torch.Tensor) -> float:
    """The smallest cosine between a row of `embeddings` (one per entry of `files`) for a photo in `check` and
    that photo's exact embedding (`exact`, one row per photo of `check`), over every listing of the photo."""
    where = {path: i for i, path in enumerate(check)}
    rows = [(i, where[path]) for i, path in enumerate(files) if path in where]
    return B.cosine(embeddings[[i for i, _ in rows]], exact[[j for _, j in rows]])


def command_row(row: Row, checkpoint: Path, photo_dir: Path, options: list[str], check: list[str], exact: torch.Tensor,
                device: torch.device, workdir: Path, clock: Clock) -> None:  # fmt: skip
    """`siglip embed PHOTOS -m CHECKPOINT OPTIONS` as a user runs it, into `row`: its own rate and the whole wall time."""
    import subprocess

    if not clock.fits(30):
        row.note = "skipped: over the time budget"
        return
    output = workdir / f"embed-{_slug(' '.join(options))}.npy"
    command = [sys.executable, "-m", "siglip_cli", "embed", str(photo_dir), "-o", str(output), "-m", str(checkpoint),
               "--device", str(device), "--dtype", "bfloat16", "--batch-size", str(row.batch), *options,
               "--overwrite", "--json", "--quiet"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH")]))}
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=max(30, clock.left()))
    wall = time.perf_counter() - started
    if done.returncode != 0:
        row.note = f"failed: exit {done.returncode}: {(done.stderr.strip().splitlines() or [''])[-1][:150]}"
        return
    summary = json.loads(done.stdout)
    row.images_per_s = summary["images_per_s"]
    row.ms_per_image = 1000 / row.images_per_s if row.images_per_s else None
    manifest = [os.path.abspath(json.loads(line)["path"]) for line in Path(summary["manifest"]).read_text().splitlines()]
    row.cosine = cosine_to_exact(torch.from_numpy(np.load(output)), manifest, [os.path.abspath(p) for p in check], exact)
    row.note = f"{summary['embedded']} images; whole command {wall:.1f} s with start-up and model load"


# --------------------------------------------------------------------------- report


def print_table(rows: list[Row], header: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=header, title_justify="left")
    for column in ("section", "model", "backend", "variant", "batch", "images/s", "ms/image", "cosine vs fp32",
                   "setup s", "peak MB", "note"):  # fmt: skip
        table.add_column(column, justify="right" if column in ("batch", "images/s", "ms/image", "setup s", "peak MB") else "left")
    fmt = lambda value, spec: "" if value is None else format(value, spec)  # noqa: E731
    for r in rows:
        table.add_row(r.section, r.model, r.backend, r.variant, str(r.batch), fmt(r.images_per_s, ",.0f"),
                      fmt(r.ms_per_image, ".3f"), fmt(r.cosine, ".5f"), fmt(r.setup_s, ".1f"), fmt(r.peak_mem_mb, ",.0f"),
                      r.note)  # fmt: skip
    Console(width=250).print(table)


def wrong_rows(rows: list[Row]) -> list[str]:
    """Our rows whose embeddings are not those of the plain float32 forward (cosine below 0.999): a fast path (the
    CUDA fc1+GELU, bf16, nvJPEG) that no CPU test can run. Said in capitals, and the script exits 1. A
    --fast-decode row's cosine is the price of reduced-size decoding, asked for: reported, not a failure."""
    return [f"{r.model} {r.section} {r.variant} batch {r.batch}: COSINE {r.cosine:.5f} BELOW 0.999"
            for r in rows if r.backend == "siglip" and r.cosine is not None and r.cosine < 0.999
            and "fast-decode" not in r.variant]  # fmt: skip


def verdicts(rows: list[Row]) -> list[str]:
    lines = [f"{r.model}: copies of one image in a batch NOT identical (see model._per_image)"
             for r in rows if r.variant == COPIES_VARIANT and "NOT" in r.note]  # fmt: skip
    lines += wrong_rows(rows)
    for key, goal in GOALS.items():
        section = "end to end" if key == "end to end" else "model only"
        candidates = [r for r in rows if r.section == section and r.backend == "siglip" and r.images_per_s
                      and (section == "end to end" or r.model == key) and (r.cosine or 0) >= 0.999
                      and r.batch == GOAL_BATCH.get(key, r.batch)
                      and (section == "model only" or r.variant.startswith(END_TO_END_GOAL_ROWS))]  # fmt: skip
        if not candidates:
            lines.append(f"{key}: no measurement")
            continue
        best = max(candidates, key=lambda r: r.images_per_s)
        status = "met" if best.images_per_s >= goal else "NOT met"
        lines.append(f"{key}: best {best.images_per_s:,.0f} images/s ({best.variant}, batch {best.batch}) vs goal {goal:,}: {status}")
    return lines


def _failed(error: Exception) -> str:
    """A row's note for a measurement that raised: reported in the row, and the measuring goes on."""
    return f"failed: {type(error).__name__}: {first_line(error)[:120]}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny models and images on the CPU: checks the script runs")
    parser.add_argument("--workdir", type=Path, default=None, help="where the synthetic JPEGs go [a temp dir]")
    parser.add_argument("--photos", type=int, default=None, help="synthetic JPEGs for end to end [512; smoke 8]")
    parser.add_argument("--repeat", type=int, default=None, help="times each photo is listed in the GPU end-to-end runs [8; smoke 2]")
    parser.add_argument("--iters", type=int, default=None, help="timed calls per row [10; smoke 2]")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls first [3; smoke 1]")
    parser.add_argument("--budget", type=float, default=240, help="seconds for the measurements; later steps that do not fit are skipped")
    parser.add_argument("--decode-threads", type=int, default=3, help="chunks decoded ahead on the GPU")
    parser.add_argument("--compile", action="store_true", help="also compile on the CPU (slow: ~40 s per model)")
    parser.add_argument("--no-compile-references", action="store_true", help="skip compiling transformers (saves ~2 min)")
    parser.add_argument("--end-to-end-only", action="store_true", help="only the end-to-end rows, B/16 eager (a second, short run)")
    parser.add_argument("--autotune", action="store_true", help="also compile ours with max-autotune (several minutes)")
    parser.add_argument("--json-out", type=Path, default=None, help="also write the rows as JSON here (after each section)")
    parser.add_argument("--profile-dir", type=Path, default=None, help="profile our eager and compiled forwards; kernel tables here")
    args = parser.parse_args()
    args.photos = args.photos or (8 if args.smoke else 512)
    args.repeat = args.repeat or (2 if args.smoke else 8)
    args.iters = args.iters or (2 if args.smoke else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.smoke else 3)

    if torch.cuda.is_available() and not args.smoke:
        device = torch.device("cuda")
        name = torch.cuda.get_device_name()
    elif args.smoke:
        device, name = torch.device("cpu"), f"{B.cpu_name()} ({torch.get_num_threads()} threads)"
    else:
        sys.exit("gpu_check: no CUDA GPU here. On a CPU, run `python bench/gpu_check.py --smoke` to check the script.")
    header = (f"gpu_check {datetime.date.today()} · {name} · torch {torch.__version__} · CUDA {torch.version.cuda} · bf16 · "
              f"{os.cpu_count()} CPUs · {' '.join(sys.argv)}")  # fmt: skip
    print(header, file=sys.stderr, flush=True)
    clock = Clock(args.budget)
    # A hang (a driver, a forked worker) must not eat the device session: past the budget and the longest step (a
    # compile, ~a minute) with room to spare, print where every thread is and stop; finished sections are in --json-out.
    # With gpu_check.sh's 90 s for `siglip bench` after it, the whole stays within budget + 240 s.
    faulthandler.dump_traceback_later(args.budget + 150, exit=True)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="gpu_check-"))

    rows: list[Row] = []

    def save() -> None:  # after each section: a run stopped by a time limit keeps what it measured
        if args.json_out:
            args.json_out.write_text(json.dumps({"header": header, "rows": [asdict(r) for r in rows]}, indent=1))

    if args.end_to_end_only:
        spec = specs(args.smoke)[0]
        plain = random_model(spec.vision).to(device)
        rows += end_to_end(spec, plain, B.fast_model(plain, device=device, dtype=torch.bfloat16), "eager", args, device,
                           workdir, clock)  # fmt: skip
        save()
    for i, spec in enumerate([] if args.end_to_end_only else specs(args.smoke)):
        spec_rows, ours, plain = model_only(spec, args, device, clock)
        rows += spec_rows
        save()
        if i == 0:  # end to end on B/16-224, with our fastest forward that kept the cosine
            good = [r for r in spec_rows if r.variant in ours and r.backend == "siglip" and r.images_per_s and (r.cosine or 0) >= 0.999]
            if good:
                best = max(good, key=lambda r: r.images_per_s).variant
                rows += end_to_end(spec, plain, ours[best], best, args, device, workdir, clock)
                save()
        del ours, plain
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print_table(rows, header)
    said = verdicts(rows) if not args.smoke else ["smoke run: tiny models on the CPU, no verdicts.", *wrong_rows(rows)]
    for line in said:
        print(line)
    if wrong_rows(rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
