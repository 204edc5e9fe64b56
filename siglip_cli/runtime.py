"""Where and how the tower runs: the device, the compute dtype, and `load`, which puts a checkpoint there."""

from __future__ import annotations

import functools
import logging
import os
import platform
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from .checkpoints import Checkpoint, resolve_checkpoint
from .config import CPU_BATCH_SIZE, CUDA_BATCH_SIZE, DEFAULT_MODEL, PreprocessConfig
from .cpus import fit_cpu_threads
from .errors import DeviceFault, UserError
from .kernels import fuse_gelu, onednn_linears
from .model import SiglipVision
from .weights import load_model


COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def out_of_memory(error: BaseException) -> bool:
    """Whether `error` is a device out of memory: CUDA's own error type, the CPU allocator's RuntimeError ("[enforce
    fail at alloc_cpu.cpp] DefaultCPUAllocator: can't allocate memory: you tried to allocate ..."), or cuBLAS's and
    cuDNN's failure to allocate their workspace, which comes as a "CUDA error" RuntimeError and would otherwise end
    the run as a fault of the GPU, not halve the batch."""
    if isinstance(error, torch.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and (
        "can't allocate memory" in str(error) or gpu_library_out_of_memory(error)
    )


def gpu_library_out_of_memory(error: BaseException) -> bool:
    return any(status in str(error) for status in ("CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED"))


def gpu_out_of_memory(error: BaseException) -> bool:
    """Whether an `out_of_memory` error is the GPU's, not the CPU allocator's."""
    return isinstance(error, torch.OutOfMemoryError) or gpu_library_out_of_memory(error)


def device_fault(error: BaseException) -> bool:
    """Whether `error` is a fault of the GPU, not of the run's inputs or the code: torch's AcceleratorError (from
    torch 2.8), the GPU decoder's `DeviceFault`, or a "CUDA error" RuntimeError (older torches, CUDA's libraries)."""
    return isinstance(error, (DeviceFault, getattr(torch, "AcceleratorError", ()))) or "CUDA error" in str(error)


@dataclass
class Embedder:
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


def resolve_device(device: str | torch.device) -> torch.device:
    """`auto` (CUDA when present), `cpu`, `cuda` or `cuda:N` → the device; one that is not there is a UserError.
    CUDA comes back with its index (`cuda` is the current GPU): calls made in other threads, whose current GPU is
    the first, then run on the model's, not on GPU 0."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise UserError(f"unknown device {device!r} (expected auto, cpu, cuda or cuda:N).") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device {device} was asked for but CUDA is not available on this machine.")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise UserError(f"device {device} does not exist: this machine has {torch.cuda.device_count()} GPU(s).")
        if resolved.index is None:
            resolved = torch.device("cuda", torch.cuda.current_device())
    elif resolved.type != "cpu":
        raise UserError(f"device {device!r} is not supported (expected auto, cpu, cuda or cuda:N).")
    elif resolved.index not in (None, 0):  # torch runs every "cpu:N" on the one CPU device: a typo for cuda:N?
        raise UserError(f"device {device} does not exist: the CPU is one device, `cpu` (cuda:N numbers GPUs).")
    return resolved


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """The compute dtype, the same rule for `embed` and `bench`. `auto`: bfloat16 on CUDA, where it keeps cosine
    ≥ 0.999 to float32 and doubles throughput; float32 on every CPU, the exact path, even one with native bf16
    (where `dtype_note` suggests it: faster, but no longer the reference's numbers). A torch dtype is taken by its
    name (`torch.bfloat16`: "bfloat16")."""
    if isinstance(dtype, torch.dtype):
        dtype = dtype_name(dtype)
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in COMPUTE_DTYPES:
        raise UserError(f"unknown dtype {dtype!r} (expected auto, {', '.join(COMPUTE_DTYPES)}).")
    return COMPUTE_DTYPES[dtype]


def dtype_name(dtype: torch.dtype) -> str:
    """`dtype` by the name options, metadata and messages give it: "bfloat16" for torch.bfloat16."""
    return str(dtype).removeprefix("torch.")


def cpu_has_native_bf16() -> bool:
    """True where the CPU multiplies bf16 in hardware (AVX512-BF16 or AMX).

    Without it PyTorch still runs bf16, but far slower than float32: on a 2-core Zen 3 (AVX2 only) a bf16 linear
    ran at 18 GFLOP/s against 153 for float32, and B/16 at 0.56 against 3.99 images/s. With it (a 2-core Zen 4),
    8.40 against 4.05 side by side (bench/RESULTS.md).
    """
    return bool(re.search(r"\b(avx512_bf16|amx_bf16)\b", cpuinfo()))


def cpu_is_intel() -> bool:
    """Whether the CPU is Intel's, for whose CPUs MKL (torch's float32 GEMMs) is written."""
    # Where there is no /proc/cpuinfo (Windows), what `platform` says; on Linux it would run `uname -p`.
    return "GenuineIntel" in (cpuinfo() or platform.processor())


@functools.cache
def cpuinfo() -> str:
    """/proc/cpuinfo, read once a process; "" where there is none (not Linux)."""
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


# A run shorter than this would gain a few seconds from bfloat16: not worth a line after every small run.
BF16_HINT_AFTER_S = 60.0


def cpu_prefers_onednn(dtype: torch.dtype) -> bool:
    """Whether the tower's CPU GEMMs go through oneDNN (`kernels.OneDnnLinear`, fc1 + GELU fused) in `dtype`, where
    it measured faster (bench/RESULTS.md): bfloat16 on CPUs with native bf16 (3.2% with the fusion alone, on a Zen 4;
    MKL has no bf16 GEMM), float32 on AMD CPUs with AVX-512 (8–12% on a 2-core Zen 4: oneDNN ran the four GEMM shapes
    1.10–1.15× faster than MKL's sgemm, and the GELU rides on fc1). Elsewhere float32 keeps MKL: on an Intel Xeon with
    AVX-512 oneDNN ran those shapes 8–22% slower than MKL, and on an AVX2-only EPYC it was slower too."""
    if dtype == torch.bfloat16:
        return cpu_has_native_bf16()
    return dtype == torch.float32 and torch.backends.cpu.get_cpu_capability() == "AVX512" and not cpu_is_intel()


def dtype_note(device: torch.device, dtype: torch.dtype, *, run_seconds: float | None = None) -> str | None:
    """What a user should know about running `dtype` on this CPU, if anything. The hint that bfloat16 would be
    faster comes after a run of `BF16_HINT_AFTER_S` or more, or always where `run_seconds` is None (`bench`)."""
    if device.type != "cpu":
        return None
    native = cpu_has_native_bf16()
    if dtype == torch.bfloat16 and not native:
        return "this CPU has no native bfloat16 (AVX512-BF16 or AMX): bfloat16 runs emulated, several times slower than float32."
    if dtype == torch.float32 and native and (run_seconds is None or run_seconds >= BF16_HINT_AFTER_S):
        # Measured (bench/RESULTS.md): 2.1× the float32 model with AVX512-BF16 (Zen 4), 3× with AMX (a Xeon).
        return ("this CPU has native bfloat16: with --dtype bfloat16 the model runs two to three times as fast, within "
                "cosine 0.999 of these float32 numbers.")
    return None


def default_batch_size(device: str) -> int:
    """32 on the CPU, which a batch of 32 keeps busy; 128 on CUDA, where B/16 ran 12,000 images/s at batch 64 and
    13,000 at 256 on an H200 (bench/RESULTS.md): 128 is most of that, and leaves memory for the full-size photos
    the GPU decoder holds while it works on a batch."""
    return CUDA_BATCH_SIZE if resolve_device(device).type == "cuda" else CPU_BATCH_SIZE


def prepare_model(
    model: SiglipVision, *, device: torch.device | str, dtype: torch.dtype, compile: bool = False
) -> SiglipVision:  # or its torch.compile wrapper
    """`model` as `siglip embed` runs it, changed in place: on `device` with its weights in `dtype` (bf16 end to
    end, no autocast), eval mode, no autograd, and fused. q/k/v as one GEMM (`fuse_qkv`): the same numbers, which the
    tests check against the plain path; fc1 + GELU too (`kernels.fuse_gelu`) on CUDA, which gpu_check checks against
    the float32 plain path. On the CPU, oneDNN's GEMMs (`kernels`) where `cpu_prefers_onednn` (tested against the
    plain path, and each image's bits in any batch). `compile`: `torch.compile` with torch's default shape
    handling, so a run's last, smaller batch recompiles once, with dynamic shapes (`benchmark.fast_model` compiles
    its own pooled-only wrapper, static).
    """
    onednn = torch.device(device).type == "cpu" and cpu_prefers_onednn(dtype)
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False).fuse_qkv()
    fuse_gelu(model, onednn=onednn)
    if onednn and dtype == torch.float32:  # bf16 linears take oneDNN's GEMM already (MKL has none for bf16)
        onednn_linears(model)
    return compiled(model) if compile else model


def compiled(module: Callable[..., Any], **options: Any) -> Callable[..., Any]:
    """`torch.compile(module, **options)`, for every model we compile (`prepare_model`, bench's own and its
    references'). On a machine without CUDA, a CUDA build of torch's C++ toolchain set-up warns as the first call
    compiles that no CUDA runtime was found: true, and nothing for the user to act on, printed between the run's own
    lines; that logger is kept to its errors."""
    if not torch.cuda.is_available():
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    return torch.compile(module, **options)


def load(
    model: str | os.PathLike = DEFAULT_MODEL,
    *,
    revision: str | None = None,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "auto",
    compile: bool = False,
) -> Embedder:
    """Load a checkpoint (Hub id or local directory) ready to embed.

    `model`: a Hub id or a checkpoint folder (a str or a path). `device`: auto, cpu, cuda or cuda:N (or a
    torch.device); on the CPU, torch's threads are brought down to the CPUs this process may use
    (`cpus.fit_cpu_threads`: a container's quota). `dtype`: auto (bfloat16 on CUDA, float32 on the CPU), float32,
    bfloat16 or float16 (or the torch dtype). `compile`: `torch.compile` the tower; on an H200 B/16 went from 12,500
    to 13,800 images/s after 15 s of compiling (so400m gained nothing), on our 2-core CPU it took 18-48 s for 0-5%
    (bench/RESULTS.md).
    """
    resolved = resolve_device(device)
    if resolved.type == "cpu":
        fit_cpu_threads()
    torch_dtype = resolve_dtype(dtype, resolved)
    checkpoint = resolve_checkpoint(model, revision=revision)
    tower = load_model(checkpoint, device=resolved, dtype=torch_dtype)
    tower = prepare_model(tower, device=resolved, dtype=torch_dtype, compile=compile)
    return Embedder(tower, checkpoint, resolved, torch_dtype)
