"""Batched JPEG decoding and SigLIP preprocessing on the GPU: nvJPEG through torchvision, resize on the device.

What the PIL path (`preprocess.load_pixels`) does, for a batch of JPEGs at once: decode to RGB, apply the EXIF
orientation, squash-resize to the model's (height, width) with the checkpoint's filter (antialiased, as PIL
always is when shrinking), round to 8 bits as PIL does, then rescale and normalize. It is close to the PIL path,
not bit-exact: libjpeg and nvJPEG round the IDCT and chroma upsampling differently, and torch's antialiased
bicubic differs from PIL's by a unit in the last 8-bit place here and there. Embeddings agree to a cosine
above 0.999 (tests/test_gpu_decode.py).

Two steps, as `decoding.py` runs them: `read_header` keeps a file's bytes and reads its JPEG header (in the
decoding workers), `decode_headers` decodes and preprocesses a batch of them on the device. Anything the GPU path
does not take (not a JPEG, a CMYK/YCCK JPEG, an image over the pixel limit, a file nvJPEG rejects) comes back
with its reason, and the caller decodes it on the CPU path, which also gives the user the proper error for a truly
broken file. Works with `device="cpu"` (libjpeg-turbo), which is how the tests check it.
"""

from __future__ import annotations

import functools
import io
import re
import threading
import warnings
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from .config import PreprocessConfig
from .errors import DeviceFault, UserError, first_line
from .preprocess import DecodeOptions

# torchvision 0.29 deprecates its decoders in favour of TorchCodec; they still work, and TorchCodec is optional. Set
# once here: `warnings.catch_warnings` around each call, in the look-ahead thread, would race the main thread's own.
warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torchvision\.io")

# PIL resample numbers → torch interpolation modes; both are antialiased when shrinking.
RESAMPLE_MODES = {2: "bilinear", 3: "bicubic"}
_ORIENTATION_TAG, _UNUSUAL = 0x0112, -1  # EXIF's orientation tag; an orientation the GPU path leaves to PIL
_INTEGER_SIZES = {3: 2, 4: 4, 8: 2, 9: 4}  # TIFF type numbers of SHORT, LONG, SSHORT, SLONG → their bytes
_XMP_HEADER = b"http://ns.adobe.com/xap/1.0/\x00"


@dataclass(frozen=True)
class JpegHeader:
    """A JPEG the device decoder can take: its bytes and what its header says."""

    data: Tensor  # the file's bytes, (n,) uint8 on the CPU
    orientation: int  # EXIF orientation 1..8; 1 when absent or ignored
    width: int  # of the oriented image
    height: int


def supported(cfg: PreprocessConfig) -> bool:
    """Whether the checkpoint's preprocessing has a GPU equivalent: its resize filter, if it resizes, and a resize
    straight to the model's size (no crop, no aspect kept)."""
    return (not cfg.do_resize or cfg.resample in RESAMPLE_MODES) and not cfg.center_crop and not cfg.keeps_aspect


@functools.cache
def fault(device: torch.device) -> str | None:
    """Why the device decoder cannot decode on `device` (torchvision built without nvJPEG, a ROCm build, a broken
    library), or None: it decodes a tiny JPEG there. Left to find out file by file, a run would send every JPEG
    through a failed batched call, a failed call of its own and then PIL in one thread, far slower than the CPU
    path's workers, and say nothing."""
    from torchvision.io import ImageReadMode, decode_jpeg

    tiny = io.BytesIO()
    Image.new("RGB", (16, 16), (90, 120, 150)).save(tiny, format="JPEG")
    data = torch.frombuffer(bytearray(tiny.getvalue()), dtype=torch.uint8)
    try:
        decode_jpeg([data], mode=ImageReadMode.RGB, device=device)
    except Exception as e:  # whatever a broken build raises: the CPU path is there either way
        return None if isinstance(e, RuntimeError) and _decoder_out_of_memory(e) else first_line(e)
    return None


def check_supported(cfg: PreprocessConfig) -> None:
    """Raise a `UserError` sentence when the checkpoint's preprocessing has no GPU equivalent."""
    if cfg.center_crop or cfg.keeps_aspect:
        step = "center-crops" if cfg.center_crop else "keeps the aspect"
        raise UserError(f"GPU decoding resizes straight to the model's size, but this checkpoint's preprocessing "
                        f"{step}; use the CPU decoder.")  # fmt: skip
    if not supported(cfg):
        raise UserError(
            f"GPU decoding supports bilinear and bicubic resizing, but this checkpoint asks for PIL filter "
            f"{cfg.resample}; use the CPU decoder."
        )


# A call of the decoder holds its full-size photos as 8-bit RGB and, while resizing, as float32: about 15 bytes a
# pixel on the device. A call takes photos up to a sixteenth of the device's memory in pixels (`pixels_per_call`),
# whatever the batch size: on an H200 a whole batch of 256 two-megapixel photos, on an 8 GB card 16 of them. Calls
# are ordered one after the other (`decode_headers`), so fewer, larger ones decode faster: on an H200, 2,666
# images/s with whole batches against 1,735 at 100 MP a call (bench/RESULTS.md).
BYTES_PER_DECODED_PIXEL = 15
PIXELS_PER_CALL: int | None = None  # fixed instead, where set (the tests)


def pixels_per_call(device: torch.device) -> int:
    """How many pixels of full-size photos one decoder call on `device` takes (`PIXELS_PER_CALL` where set)."""
    if PIXELS_PER_CALL is not None:
        return PIXELS_PER_CALL
    if device.type != "cuda":
        return 100_000_000
    return max(1, torch.cuda.get_device_properties(device).total_memory // 16 // BYTES_PER_DECODED_PIXEL)


# CUDA's antialiased resize keeps a side's filter weights in 48 KB of shared memory, and refuses a downscale past
# about 94× (bicubic; 188× bilinear): a 24,000 × 3,000 panorama for a 224-pixel model. Those go to the CPU path.
MAX_GPU_DOWNSCALE = 64


def decode_headers(
    headers: Sequence[JpegHeader], cfg: PreprocessConfig, *, device: torch.device | str
) -> tuple[Tensor, list[int], list[tuple[int, str]]]:
    """Decode and preprocess read JPEGs on `device`: (pixels (k, 3, H, W), the k indices decoded, (index, reason)
    of each left for the CPU path: rejected by the decoder, or out of device memory).

    The JPEGs go to the decoder in consecutive groups of at most `pixels_per_call` pixels (and at least one
    photo), each resized before the next is decoded, so memory does not grow with the batch or the photos.

    On CUDA the work runs on a stream of its own, which the caller's current stream then waits for. torchvision's
    decoder writes on a stream of its own into memory allocated on the current one, without waiting for that
    stream: on the caller's stream, queued behind the model, the resize of one group could still be reading memory
    that the next group's decode was already overwriting. On a stream of ours, waited for before each group, the
    memory the decoder reuses is no longer read."""
    device = torch.device(device)
    if device.type != "cuda":
        return _decode_groups(headers, cfg, device, before_each=lambda: None)
    if device.index is None:  # one name for it: torchvision builds its decoder anew when a call names another
        device = torch.device("cuda", torch.cuda.current_device())
    stream = _decoding_stream(device)
    # On the model's device: this runs in a look-ahead thread, whose current device is 0 whatever the main thread
    # set, and leaving `torch.cuda.stream` from device 0 made a context there (~500 MB) for a run on cuda:1.
    with torch.cuda.device(stream.device), torch.cuda.stream(stream):
        pixels, indices, rejected = _decode_groups(headers, cfg, device, before_each=stream.synchronize)
    consumer = torch.cuda.current_stream(device)
    consumer.wait_stream(stream)
    if pixels.numel():
        pixels.record_stream(consumer)  # allocated on our stream, read on the caller's: not reused before it is read
    return pixels, indices, rejected


_streams = threading.local()


def _decoding_stream(device: torch.device) -> torch.cuda.Stream:
    """This thread's stream on `device`: two threads on one stream could each reuse memory the other still reads."""
    if not hasattr(_streams, "by_device"):
        _streams.by_device = {}
    if device not in _streams.by_device:
        _streams.by_device[device] = torch.cuda.Stream(device)
    return _streams.by_device[device]


def _decode_groups(
    headers: Sequence[JpegHeader], cfg: PreprocessConfig, device: torch.device, *, before_each: Callable[[], None]
) -> tuple[Tensor, list[int], list[tuple[int, str]]]:
    out = torch.empty(len(headers), 3, cfg.height, cfg.width, device=device)
    indices: list[int] = []
    rejected: list[tuple[int, str]] = []
    for group in _groups(headers, pixels_per_call(device)):
        before_each()
        decoded: dict[int, Tensor] = {}  # (3, H, W) uint8 each, as stored
        out_of_memory = False
        try:
            decoded, refused = _decode({i: headers[i] for i in group}, device)
            done = sorted(decoded)
            if done:  # no local list of the images here: it would keep them alive after a failed resize
                orientations = [headers[i].orientation for i in done]
                out[device_index(done, device)] = _preprocess([decoded[i] for i in done], orientations, cfg, device)
        except RuntimeError as e:
            if _decoder_out_of_memory(e):  # the decoder's or the resize's
                out_of_memory = True
                done, refused = [], [(i, "out of GPU memory for the JPEG decoder") for i in group]
            elif "shared memory" in str(e):  # CUDA's antialiased resize refusing a downscale: the CPU path's
                done, refused = [], [(i, f"the GPU resize refused it: {first_line(e)}") for i in group]
            else:  # a device fault: not the files', and it would only recur, slowly, on every group after
                raise
        finally:
            decoded.clear()  # the group's full-size images: freed before the next group, after a failed resize too
        if out_of_memory:  # the cache is emptied here, once the traceback and the tensors it held are gone
            torch.cuda.empty_cache()
        indices += done
        rejected += refused
    return (out if len(indices) == len(headers) else out[device_index(indices, device)]), indices, sorted(rejected)


def _groups(headers: Sequence[JpegHeader], pixels: int) -> list[list[int]]:
    """Consecutive indices of `headers` in groups of at most `pixels` pixels, each group at least one photo."""
    groups: list[list[int]] = []
    total = pixels  # as if a full group were open: the first photo starts one
    for i, header in enumerate(headers):
        size = header.width * header.height
        if total + size > pixels:
            groups.append([])
            total = 0
        groups[-1].append(i)
        total += size
    return groups


def read_header(source: str | Path | bytes, cfg: PreprocessConfig, options: DecodeOptions) -> JpegHeader | str:
    """The bytes and header facts of one file, or the reason the GPU path cannot take it. Decodes no pixels."""
    try:
        data = source if isinstance(source, bytes) else Path(source).read_bytes()
    except OSError as e:
        return f"unreadable: {e}"
    header = jpeg_header(data)
    if isinstance(header, str):
        return header
    width, height, components, orientation = header
    if components not in (1, 3):  # 4: CMYK or YCCK, which nvJPEG does not turn into RGB as PIL does
        return f"JPEG with {components} colour components"
    if options.max_pixels is not None and width * height > options.max_pixels:
        return "over the pixel limit"
    orientation = orientation if options.exif_transpose and orientation in range(1, 9) else 1
    if not cfg.do_resize and ((height, width) if orientation >= 5 else (width, height)) != (cfg.width, cfg.height):
        return "size differs from the model's and resizing is off"
    if orientation >= 5:  # the four orientations that turn the picture by 90 degrees
        width, height = height, width
    if cfg.do_resize and max(width / cfg.width, height / cfg.height) > MAX_GPU_DOWNSCALE:
        return "too long a side for the GPU resize"
    return JpegHeader(torch.frombuffer(bytearray(data), dtype=torch.uint8), orientation, width, height)


# Start-of-frame markers nvJPEG decodes: baseline, extended and progressive Huffman, 8-bit. (Lossless, hierarchical
# and arithmetic-coded JPEGs are rare, and go to the CPU path.)
_SOF_OK = {0xC0, 0xC1, 0xC2}
_SOF_OTHER = {0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def jpeg_header(data: bytes) -> tuple[int, int, int, int] | str:
    """(width, height, colour components, EXIF orientation or 1) from a JPEG's markers, or why the GPU path
    cannot take the file. Walks the segments up to the first scan, as PIL does, but skips the tables: a few dozen
    bytes of Python per file, where PIL's parser cost 0.35 ms a file (the whole budget of a 3,000 images/s pipeline).
    """
    if data[:2] != b"\xff\xd8":
        return "not a JPEG"
    # The orientation as PIL reads it: the first EXIF block's tag, else the last XMP packet's, else 1.
    exif_block, exif, xmp, frame = False, None, None, None
    jfif, adobe_transform, component_ids = False, None, b""
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return "corrupt JPEG markers"
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            i += 2
            continue
        length = int.from_bytes(data[i + 2 : i + 4], "big")
        segment = data[i + 4 : i + 2 + length]
        if marker == 0xE1 and segment[:6] == b"Exif\x00\x00" and not exif_block:
            exif_block, exif = True, _exif_orientation(segment[6:])
        elif marker == 0xE1 and segment.startswith(_XMP_HEADER):
            found = re.search(rb'tiff:Orientation(="|>)([0-9])', segment)
            xmp = int(found[2]) if found else None
        elif marker == 0xE0 and segment.startswith(b"JFIF\x00"):
            jfif = True
        elif marker == 0xEE and segment.startswith(b"Adobe") and len(segment) >= 12:
            adobe_transform = segment[11]
        elif marker in _SOF_OK and frame is None:
            if len(segment) < 6 or segment[0] != 8:
                return "not an 8-bit JPEG"
            height, width = int.from_bytes(segment[1:3], "big"), int.from_bytes(segment[3:5], "big")
            if not (width and height):
                return "JPEG without a size"
            frame = (width, height, segment[5])
            component_ids = segment[6 : 6 + 3 * segment[5] : 3]
        elif marker in _SOF_OTHER:
            return "lossless, hierarchical or arithmetic-coded JPEG"
        elif marker == 0xDA:  # start of scan: the header ends here
            if frame is None:
                return "corrupt JPEG: no frame header"
            if exif == _UNUSUAL:
                return "EXIF orientation of an unusual type"  # PIL's reading of it is left to PIL
            # Three components stored as RGB, not YCbCr, as libjpeg tells them (no JFIF marker, and Adobe's transform
            # 0, or else components named R, G, B): left to PIL, since nvJPEG may take them for YCbCr.
            rgb = adobe_transform == 0 if adobe_transform is not None else component_ids == b"RGB"
            if frame[2] == 3 and not jfif and rgb:
                return "JPEG stored as RGB rather than YCbCr"
            if data.rfind(b"\xff\xd9", i) < 0:  # PIL refuses such a file ("image file is truncated"); nvJPEG may not
                return "no end-of-image marker (a truncated JPEG?)"
            return (*frame, exif if exif is not None else xmp if xmp is not None else 1)
        i += 2 + length
    return "truncated JPEG header"


def _exif_orientation(tiff: bytes) -> int | None:
    """Tag 0x0112 of IFD0 in a TIFF-structured EXIF block; None when absent or unreadable, `_UNUSUAL` when stored
    as other than a (signed) SHORT or LONG: PIL reads a BYTE as bytes (no turn) but a RATIONAL as 6.0 (a turn)."""
    order = {b"II": "little", b"MM": "big"}.get(tiff[:2])
    if order is None or len(tiff) < 8:
        return None
    ifd = int.from_bytes(tiff[4:8], order)
    if ifd + 2 > len(tiff):
        return None
    for entry in range(ifd + 2, min(ifd + 2 + 12 * int.from_bytes(tiff[ifd : ifd + 2], order), len(tiff) - 11), 12):
        if int.from_bytes(tiff[entry : entry + 2], order) == _ORIENTATION_TAG:
            # A SHORT as the standard says, or a LONG as some writers store it; left-justified in the value field.
            size = _INTEGER_SIZES.get(int.from_bytes(tiff[entry + 2 : entry + 4], order))
            if size is None:
                return _UNUSUAL
            return int.from_bytes(tiff[entry + 8 : entry + 8 + size], order, signed=True)
    return None


def _decode(headers: dict[int, JpegHeader], device: torch.device) -> tuple[dict[int, Tensor], list[tuple[int, str]]]:
    """All images in one batched call; if the decoder rejects the batch, one by one to find the culprits."""
    from torchvision.io import ImageReadMode, decode_jpeg

    positions = list(headers)
    if not positions:
        return {}, []
    try:
        images = decode_jpeg([headers[p].data for p in positions], mode=ImageReadMode.RGB, device=device)
        return dict(zip(positions, images)), []
    except RuntimeError as e:
        _raise_unless_the_files(e)
        # one bad file fails the whole batch: retry each on its own below
    decoded, rejected = {}, []
    for position in positions:
        try:
            decoded[position] = decode_jpeg([headers[position].data], mode=ImageReadMode.RGB, device=device)[0]
        except RuntimeError as e:
            _raise_unless_the_files(e)
            rejected.append((position, f"JPEG decoder error: {first_line(e)}"))
    return decoded, rejected


def _raise_unless_the_files(error: RuntimeError) -> None:
    """Out of memory goes up as it is, to `_decode_groups`; a device fault as one, which ends the run with its
    sentence (torchvision's words for it are not CUDA's); anything else is a file the decoder rejects."""
    if _decoder_out_of_memory(error):
        raise error
    if _device_fault(error):
        raise DeviceFault(first_line(error)) from error


# torchvision's nvJPEG decoder reports a failed call as "Failed to decode batch: N" with nvJPEG's status, and a
# failed wait as "Failed to synchronize CUDA stream: N" with CUDA's error code.
_NVJPEG_STATUS = re.compile(r"Failed to decode batch: (\d+)")
_STREAM_ERROR = re.compile(r"Failed to synchronize CUDA stream: (\d+)")
NVJPEG_ALLOCATOR_FAILURE, CUDA_ERROR_MEMORY_ALLOCATION = 5, 2


def _decoder_out_of_memory(error: RuntimeError) -> bool:
    """Out of memory is no bad file. torchvision's CUDA decoder wraps every failure, its allocations' included, in
    a plain RuntimeError ("Error while decoding JPEG images: ... out of memory"); nvJPEG allocates its own buffers
    outside torch's cache, and says so with its allocator's status. Broader than `runtime.out_of_memory`, which
    reads the errors of torch's own allocators: these are the decoder's words."""
    text = str(error)
    status, stream = _NVJPEG_STATUS.search(text), _STREAM_ERROR.search(text)
    return (
        isinstance(error, torch.cuda.OutOfMemoryError)
        or "out of memory" in text.lower()
        or (status is not None and int(status[1]) == NVJPEG_ALLOCATOR_FAILURE)
        or (stream is not None and int(stream[1]) == CUDA_ERROR_MEMORY_ALLOCATION)
    )


def _device_fault(error: RuntimeError) -> bool:
    """A fault of the device ("CUDA error: ...", or a decoder's stream that cannot be waited for), not of a file: it
    ends the run, rather than sending every file after it to the CPU path one by one, slowly and without a word."""
    stream_failed = _STREAM_ERROR.search(str(error)) is not None
    return "CUDA error" in str(error) or (stream_failed and not _decoder_out_of_memory(error))


def orient(image: Tensor, orientation: int) -> Tensor:
    """Apply an EXIF orientation (1..8) to a (C, H, W) image, as PIL's `ImageOps.exif_transpose` does."""
    if orientation in (5, 6, 7, 8):
        image = image.transpose(-2, -1)  # the four orientations that swap width and height start with a transpose
    flips = {2: (-1,), 3: (-2, -1), 4: (-2,), 5: (), 6: (-1,), 7: (-2, -1), 8: (-2,)}.get(orientation, ())
    return image.flip(flips) if flips else image


def _preprocess(images: list[Tensor], orientations: list[int], cfg: PreprocessConfig, device: torch.device) -> Tensor:
    """(3, H, W) uint8 images as stored → (B, 3, height, width) normalized float32, oriented.

    Each image is resized as stored, to the target size turned as its orientation turns it, and oriented after:
    turning a 224-pixel image costs nothing, turning a 2-MP one costs a strided copy. On CUDA images of one size
    and orientation are stacked and resized together; on the CPU, where stacking full-size images costs more than
    it saves, one by one.
    """
    out = torch.empty(len(images), 3, cfg.height, cfg.width, device=device)
    groups: dict[tuple[int, int, int], list[int]] = defaultdict(list)
    for i, (image, orientation) in enumerate(zip(images, orientations)):
        key = (*image.shape[-2:], orientation)
        groups[key if device.type == "cuda" else (i, *key)].append(i)
    mean = _to(device, torch.tensor(cfg.image_mean).view(1, 3, 1, 1))
    std = _to(device, torch.tensor(cfg.image_std).view(1, 3, 1, 1))
    for members in groups.values():
        orientation = orientations[members[0]]
        stacked = torch.stack([images[i] for i in members]) if len(members) > 1 else images[members[0]][None]
        x = orient(resize(stacked, cfg, transposed=orientation >= 5), orientation)  # (b, 3, height, width), 0..255
        if cfg.do_rescale:
            x = x * cfg.rescale_factor
        if cfg.do_normalize:
            x = (x - mean) / std
        out[device_index(members, device)] = x
    return out


def device_index(rows: list[int], device: torch.device | str) -> slice | Tensor:
    """`rows` as an index into a tensor on `device` that costs no wait: a slice where they follow one another, else
    a tensor copied from pinned memory. Indexing with the list itself copies it from pageable memory, which waits
    for all the work queued on the current stream: in the look-ahead thread, the model's forward in flight."""
    if rows and rows == list(range(rows[0], rows[0] + len(rows))):
        return slice(rows[0], rows[0] + len(rows))
    return _to(torch.device(device), torch.tensor(rows, dtype=torch.long))


def _to(device: torch.device, host: Tensor) -> Tensor:
    """A small host tensor on `device`, copied without blocking (from pinned memory) on CUDA."""
    return host.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else host.to(device)


def resize(images: Tensor, cfg: PreprocessConfig, *, transposed: bool = False, uint8: bool | None = None) -> Tensor:
    """(B, 3, H, W) uint8 → float32 holding whole numbers 0..255, resized as PIL resizes 8-bit images.

    The result is (B, 3, height, width), or (B, 3, width, height) for an image stored `transposed` (EXIF
    orientations 5 to 8) that is turned afterwards. PIL resizes the upright image's width first, then its height,
    through an 8-bit image; so do we (for a transposed image that is its stored height first), rounding between
    the passes, which keeps bicubic overshoot within a level of PIL's. `uint8` (default: on the CPU) uses torch's
    8-bit kernels, several times faster than float on the CPU; CUDA has no 8-bit kernels: float, rounded.
    """
    size = (cfg.width, cfg.height) if transposed else (cfg.height, cfg.width)
    H, W = images.shape[-2:]
    if (H, W) == size:  # also the only case when resizing is off
        return images.float()
    mode = RESAMPLE_MODES[cfg.resample]
    uint8 = images.device.type == "cpu" if uint8 is None else uint8
    x = images if uint8 else images.float()
    for pass_size in ((size[0], W) if transposed else (H, size[1]), size):
        if tuple(x.shape[-2:]) != pass_size:
            x = F.interpolate(x, size=pass_size, mode=mode, align_corners=False, antialias=True)
            x = x if uint8 else x.round_().clamp_(0, 255)
    return x.float()
