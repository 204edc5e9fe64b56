"""Image decoding and SigLIP preprocessing in PIL + numpy.

Reproduces transformers' `SiglipImageProcessorPil` (transformers 5) to the bit: convert to RGB with
transparency composited onto white, PIL resize straight to (height, width) with the checkpoint's filter
(no crop; for a CLIP-style processor, resize then `center_crop`; for a shortest edge without a crop, the resized
image's whole patches as the tower's grid: `PreprocessConfig.keeps_aspect`), then
`float32(float64(x) * rescale_factor)`, then `(x - mean) / std` in float32. No torch: the head start (`headstart`)
runs it before torch is imported.

Beyond the reference, and on by default since photo libraries are full of them: EXIF orientation is applied
(phones store portraits sideways plus a rotation tag), 16-bit images keep their tones (>> 8 rather than
PIL's clip to white), animated images use their first frame, and the pixel count is checked from the header
before any decoding (decompression bombs). HEIC/HEIF photos (iPhones) decode through pillow-heif, registered
here as a Pillow plugin; libheif applies their rotation itself and resets the EXIF tag, so it is not applied twice.
"""

from __future__ import annotations

import math
import os
import re
import sys
import threading
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Generic, Iterator, TypeVar

import numpy as np
from PIL import Image, PngImagePlugin, UnidentifiedImageError

from .config import DEFAULT_MAX_PIXELS, PreprocessConfig
from .errors import UserError, whole_number

try:
    from pillow_heif import register_heif_opener
except ImportError:  # a platform without its wheel: HEIC files then fail one by one, with a hint
    HEIF_SUPPORT = False
else:
    register_heif_opener()
    HEIF_SUPPORT = True

# A PNG's compressed text chunk may hold up to all the text memory Pillow allows a file (64 MB), not its 1 MB per
# chunk: image generators (ComfyUI, Automatic1111) and editors' XMP histories store megabytes of text beside good
# pixels, and the photo was lost for text nothing reads. The total stays capped, so a zlib bomb is still refused.
# (Pillow bounds a PNG's compressed ICC profile by the same number; process-wide, as Pillow's own settings are.)
PngImagePlugin.MAX_TEXT_CHUNK = max(PngImagePlugin.MAX_TEXT_CHUNK, PngImagePlugin.MAX_TEXT_MEMORY)

# The raster formats Pillow may open for us. Not every plugin it has: EPS runs Ghostscript on the file (a `.jpg`
# holding `{} loop` hung a run), and the scientific and legacy ones (FITS, GRIB, McIdas, ...) are no photos.
READABLE_FORMATS = (
    "JPEG", "PNG", "WEBP", "AVIF", "HEIF", "GIF", "BMP", "DIB", "TIFF", "JPEG2000", "PSD", "ICO", "ICNS", "TGA",
    "PPM", "PCX", "SGI", "QOI", "DDS", "PCD",
)  # fmt: skip
# EXIF orientation → the transpose that turns the stored pixels upright.
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_SIXTEEN_BIT = {"I;16", "I;16L", "I;16B", "I;16N"}
T = TypeVar("T")


class BadImage(Exception):
    """A file that cannot be embedded; the message is the one-line reason written to the errors file."""


class TooManyPixels(BadImage):
    """A file refused for its size, read from its header (`--max-pixels`), before anything is decoded."""

    def __init__(self, width: int, height: int, limit: int):
        super().__init__(
            f"{width}×{height} = {width * height:,} pixels exceeds the limit of {limit:,} "
            "(possible decompression bomb; raise --max-pixels to allow it)"
        )
        self.pixels, self.limit = width * height, limit


def bad_file_reason(error: BaseException) -> str:
    """The reason a file failed, as one line of plain words for the errors file.

    The system's reason for a file that cannot be opened ("Permission denied"; the path is in the row already),
    Pillow's and ours as they are ("image file is truncated (129 bytes not processed)") but for the few that say
    little alone (`_PLAINER_REASONS`), anything else with its class name. libheif's reasons come as ValueError, and
    read as Pillow's do. Line breaks become spaces; other spacing is kept, since a reason may quote a file name.
    """
    if isinstance(error, OSError) and error.strerror:
        text = error.strerror
    elif isinstance(error, MemoryError):  # Python's says nothing: "MemoryError:" (under `ulimit -v`, a huge image)
        text = f"not enough memory to decode it{f' ({error})' if str(error) else ''}"
    elif isinstance(error, (BadImage, OSError)) or isinstance(error, ValueError) and _raised_in("pillow_heif", error):
        text = str(error)
    else:
        text = f"{type(error).__name__}: {error}"
    text = re.sub(r"[\r\n\t\v\f]+", " ", text).strip() or type(error).__name__
    for pattern, words in _PLAINER_PATTERNS:
        text = re.sub(pattern, words, text)
    return _PLAINER_REASONS.get(text, text)


# Decoders' reasons that say little alone, or mislead, in plainer words.
_PLAINER_REASONS = {
    # Pillow's WebP plugin
    "could not create decoder object": (
        "could not create decoder object (libwebp cannot read it: a damaged or truncated WebP?)"
    ),
    # Pillow's TIFF plugin, when libtiff fails (`ImageFile.ERRORS` names the codes)
    "decoder error -1": "decoder error -1 (buffer overrun: the image data is damaged)",
    "decoder error -2": "decoder error -2 (broken data stream: the image data is damaged)",
    "decoder error -8": "decoder error -8 (a TIFF layout libtiff cannot decode)",
    "decoder error -9": "decoder error -9 (out of memory)",
    # The data ended exactly between two of libjpeg's blocks: nothing is "not processed", the rest is missing.
    "image file is truncated (0 bytes not processed)": "image file is truncated",
    # A file cut off where Pillow reads it itself (a JPEG's header, a PNG's chunks): its words alone read as a disk's
    # fault.
    "Truncated File Read": "image file is truncated",
}


# Reasons with a detail in them, said as the others of their kind are: a cut-off file is "truncated" whatever reads it.
_PLAINER_PATTERNS = (
    # libheif, of a HEIC a phone's sync left half-written
    (r"^Invalid input: Unexpected end of file: (.*)$", r"image file is truncated (libheif: \1)"),
    # Pillow, where a header (a JPEG 2000's boxes) ends before its fields
    (r"^Expected to read (\d+) bytes but only got (\d+)\.$", r"image file is truncated (a header of \1 bytes has \2)"),
)
# The first bytes of the formats photo libraries hold, and the Pillow format each is: a file that starts as one of
# them but that Pillow cannot open is that format damaged or cut short (a sync stopped early), not "not an image".
_SIGNATURES = (
    (b"\xff\xd8\xff", "JPEG"), (b"\x89PNG\r\n\x1a\n", "PNG"), (b"GIF87a", "GIF"), (b"GIF89a", "GIF"),
    (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"), (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "JPEG2000"),
    (b"\xff\x4f\xff\x51", "JPEG2000"),
)  # fmt: skip
_HEIF_BRANDS = (b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1")


# What Pillow's plugins say of a file of their format whose kind they do not read, where a damaged or cut-off header
# fails otherwise: a floating-point colour or half-float TIFF ("unknown pixel mode"), a 12-bit JPEG.
_KINDS_NOT_READ = re.compile(r"unknown pixel mode|unknown data organization|cannot handle \d+-(bit|layer)")


def _why_not_opened(source: str | Path | BinaryIO, name: str) -> str:
    """What Pillow's plugin for `name` says as it fails to open `source` (Image.open keeps only "cannot identify
    image file"), where the header it read was whole; "" otherwise. A TIFF cut inside its header can fail as one of
    a kind not read ("unknown pixel mode": its bits-per-sample tag beyond the end), after a warning that a tag's
    values were missing."""
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        try:
            if not isinstance(source, (str, os.PathLike)):
                source.seek(0)
            Image.OPEN[name][0](source, "").close()
        except Exception as e:  # noqa: BLE001 - each plugin raises its own classes (SyntaxError, struct.error, ...)
            return "" if warned else " ".join(str(e).split())
    return ""


def _started_as(head: bytes) -> str | None:
    """The Pillow format whose signature `head`, a file's first 16 bytes, starts with; None for none of ours."""
    for signature, name in _SIGNATURES:
        if head.startswith(signature):
            return name
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head[4:8] == b"ftyp":  # ISO base media: the brand says which
        return "AVIF" if head[8:12] in (b"avif", b"avis") else "HEIF" if head[8:12] in _HEIF_BRANDS else None
    return None


def _first_bytes(source: str | Path | BinaryIO, count: int = 16) -> bytes:
    """A file's first `count` bytes, read where a file object is left as it was found; b"" where they cannot be."""
    try:
        if isinstance(source, (str, os.PathLike)):
            with open(source, "rb") as f:
                return f.read(count)
        at = source.tell()
        source.seek(0)
        head = source.read(count)
        source.seek(at)
        return head
    except (OSError, ValueError):
        return b""


def _is_empty(source: str | Path | BinaryIO) -> bool:
    """Whether the file holds no byte at all; False where that cannot be told."""
    try:
        if isinstance(source, (str, os.PathLike)):
            return os.path.getsize(source) == 0
        at = source.tell()
        end = source.seek(0, os.SEEK_END)
        source.seek(at)
        return end == 0
    except (OSError, ValueError):
        return False


def _raised_in(package: str, error: BaseException) -> bool:
    """Whether `error` was raised by the code of `package` (its traceback's last frame)."""
    tb = error.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    module = tb.tb_frame.f_globals.get("__name__", "") if tb is not None else ""
    return module == package or module.startswith(package + ".")


@dataclass(frozen=True)
class DecodeOptions:
    exif_transpose: bool = True
    max_pixels: int | None = DEFAULT_MAX_PIXELS
    # Opt-in: let libjpeg decode at 1/2, 1/4 or 1/8 scale when the photo is over twice the model input.
    # Faster on large JPEGs, but not pixel-exact with the reference.
    fast_decode: bool = False

    def __post_init__(self) -> None:
        """A value of the wrong kind from a library caller, in one sentence (unchecked, max_pixels="1000000" would fail
        every file, and exif_transpose="no" would turn photos all the same)."""
        for name in ("exif_transpose", "fast_decode"):
            if not isinstance(getattr(self, name), bool):
                raise UserError(f"{name} must be True or False, not {getattr(self, name)!r}.")
        pixels = self.max_pixels
        if pixels is not None and not whole_number(pixels, 1):
            raise UserError(f"max_pixels must be a whole number of at least 1, or None for no limit, not {pixels!r}.")


def open_rgb(
    source: str | Path | BinaryIO, options: DecodeOptions, *, target: tuple[int, int] | None = None
) -> tuple[Image.Image, tuple[int, int]]:
    """Decode an image file to an 8-bit RGB PIL image, oriented as its EXIF says (unless disabled).

    Returns the image and the (width, height) of the full-size oriented original. `target` is the
    (width, height) the image will be resized to; only `fast_decode` uses it.
    """
    if isinstance(source, (str, os.PathLike)):
        # Read through a file object, as `siglip embed` reads: from a path, Pillow (13) decodes an uncompressed TIFF
        # whose orientation turns it (5 to 8) wrong, its strips mapped from the file unturned and the tag dropped
        # all the same, so `inspect` and `load_pixels(path)` gave scrambled pixels where `embed` gave the photo.
        with open(source, "rb") as f:
            return open_rgb(f, options, target=target)
    with c_messages_dropped(), open_checked(source, options) as image:
        size = image.size
        # Image.open leaves an animation or a multi-page TIFF at its first frame, a PSD at its composite image.
        # MPO: a JPEG with a preview or a gain map after it (many cameras, Ultra HDR phones), decoded as one.
        if options.fast_decode and target is not None and image.format in ("JPEG", "MPO"):
            # libjpeg's scaled decoding (1/2, 1/4, 1/8), kept at least twice the model's size: on 2-MP photos
            # 3.9× faster than a full decode, 0.17 levels of mean error after the resize (straight to the model's
            # size: 5.6×, but 0.48 levels).
            image.draft("RGB", (2 * target[0], 2 * target[1]))
        # Pillow checks a TIFF's size again as its strips load: the header's, which `open_checked` has held to
        # --max-pixels (over 179 MP, Pillow's own limit refused it whatever --max-pixels said). Other formats keep
        # Pillow's guard: an ICNS can hold a PNG far larger than its header says, which the guard alone refuses.
        with _without_pillow_guard() if image.format == "TIFF" else nullcontext():
            image.load()
        orientation = _orientation(image) if options.exif_transpose else 1
        if orientation in _UPRIGHT:
            image = image.transpose(_UPRIGHT[orientation])
            if orientation >= 5:  # turned by 90 degrees
                size = size[::-1]
        return to_rgb(image), size


class _WhileAnyBlock(Generic[T]):
    """A process-wide change in force while any of its blocks runs: blocks in several threads overlap (the decoding
    threads of `--decode gpu --workers 0`), so the first in makes the change and the last out undoes it."""

    def __init__(self, make: Callable[[], T], undo: Callable[[T], None]):
        self._make, self._undo = make, undo
        self._lock, self._blocks, self._saved = threading.Lock(), 0, None  # `make`'s value, for `undo`

    @contextmanager
    def held(self) -> Iterator[None]:
        with self._lock:
            if self._blocks == 0:
                self._saved = self._make()
            self._blocks += 1
        try:
            yield
        finally:
            with self._lock:
                self._blocks -= 1
                if self._blocks == 0:
                    self._undo(self._saved)


def _descriptor_2_away() -> int:
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)
    return saved


def _descriptor_2_back(saved: int) -> None:
    os.dup2(saved, 2)
    os.close(saved)


_DESCRIPTOR_2_AWAY = _WhileAnyBlock(_descriptor_2_away, _descriptor_2_back)


@contextmanager
def c_messages_dropped() -> Iterator[None]:
    """File descriptor 2 to /dev/null for the block, where Python's stderr has a descriptor of its own (the command
    line gives it one in `__main__`; a decoding worker, `decoding._quiet_c_libraries`). What C decoders print there
    themselves (libtiff, a line per bad scanline of a damaged scan) then stays off the terminal and its progress
    bar: the file's row or its line in the errors file says what happened. Elsewhere (a library caller, whose
    stderr is descriptor 2) nothing changes."""
    try:
        own = sys.stderr.fileno() != 2
    except (AttributeError, OSError, ValueError):  # no stderr, or one without a descriptor (a test's capture)
        own = False
    with _DESCRIPTOR_2_AWAY.held() if own else nullcontext():
        yield


def _registered_formats() -> tuple[str, ...]:
    """`READABLE_FORMATS` that this Pillow has a plugin for: `Image.open` raises KeyError for any other it is
    given, whatever the file (a GIF failed with KeyError 'HEIF' without pillow-heif, 'AVIF' before Pillow 11.2)."""
    Image.init()  # every plugin Pillow has registered, pillow-heif's included
    return tuple(name for name in READABLE_FORMATS if name in Image.OPEN)


def open_checked(source: str | Path | BinaryIO, options: DecodeOptions) -> Image.Image:
    """The file opened lazily (its header read, no pixels decoded) as one of `READABLE_FORMATS` and within
    `options.max_pixels`; a `BadImage` otherwise."""
    try:
        with _without_pillow_guard():
            image = Image.open(source, formats=_registered_formats())
    except UnidentifiedImageError:
        if _is_empty(source):  # an interrupted copy or download, often: Pillow says only "cannot identify"
            raise BadImage("empty file (0 bytes)") from None
        # Pillow's own message ends with repr(path): for the in-memory file embed reads, an object address.
        started_as = _started_as(_first_bytes(source))
        if started_as in _registered_formats():
            name = {"JPEG2000": "JPEG 2000", "WEBP": "WebP"}.get(started_as, started_as)
            reason = _why_not_opened(source, started_as)
            if _KINDS_NOT_READ.search(reason):  # a whole file: "damaged" would have its owner look for a backup
                raise BadImage(f"it is a {name} of a kind Pillow cannot read ({reason})") from None
            raise BadImage(f"its {name} header is damaged or cut short: it cannot be opened") from None
        hint = "" if HEIF_SUPPORT else "; HEIC photos need pillow-heif"
        raise BadImage(f"cannot identify image file (not an image, or a format Pillow cannot read{hint})") from None
    width, height = image.size
    if options.max_pixels is not None and width * height > options.max_pixels:
        image.close()
        raise TooManyPixels(width, height, options.max_pixels)
    return image


def _orientation(image: Image.Image) -> int:
    """The EXIF orientation (1-8, or the `tiff:Orientation` of XMP, as Pillow reads it); 1 when there is none.

    Read, never rewritten: Pillow's `exif_transpose` also writes the EXIF block back without the tag, which fails on
    odd values elsewhere in it (a rational with a zero denominator, as some cameras write): a photo was lost for a
    tag nothing reads. A block too broken to read has no orientation to give, and the photo is embedded as stored.
    """
    try:
        return image.getexif().get(0x0112, 1)
    except Exception:  # whatever Pillow's EXIF parser raises on a damaged block: the pixels are still good
        return 1


def _pillow_guard_off() -> int | None:
    saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    return saved


def _pillow_guard_back(saved: int | None) -> None:
    Image.MAX_IMAGE_PIXELS = saved


# Pillow's own pixel guard, off for the block (`_WhileAnyBlock`: process-wide). Pillow refuses images over twice its
# limit, at open and again as some formats load (a TIFF's strips): a user who raised --max-pixels would still be
# refused. `open_checked` checks the header's size against --max-pixels itself, before decoding; `open_rgb` says
# which loads may go unguarded.
_without_pillow_guard = _WhileAnyBlock(_pillow_guard_off, _pillow_guard_back).held


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB; transparency composited onto white exactly as transformers' `convert_to_rgb` does."""
    if image.mode == "RGB" and image.info.get("transparency") is None:
        return image  # most photos: `convert` would copy all their pixels for nothing
    if image.mode in ("La", "RGBa"):  # premultiplied alpha (some TIFFs): PIL converts it to RGB only through LA/RGBA
        image = image.convert(image.mode.upper())
    if image.mode in _SIXTEEN_BIT or image.mode == "I":
        image = _integers_to_grey(image)
    if image.mode == "F":
        image = _unit_floats_to_255(image)
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def _integers_to_grey(image: Image.Image) -> Image.Image:
    """A 16-bit or 32-bit integer image as 8-bit grey ("L", or "LA" with a PNG's tRNS grey level as transparency).

    PIL's convert clips 16-bit values to 255 (a white image); the tones are kept by taking the high byte. None
    above 255: 8-bit tones in a 16-bit container, kept as they are (by the reference too), not made black. Mode "I"
    (32-bit integers, e.g. some TIFFs) holds 16-bit samples, or 8-bit ones, or wider ones (32-bit scientific
    TIFFs, which came out white): shifted to keep the top 8 bits of the bright end, its 99.9th percentile, so that
    a few hot pixels go white rather than the rest black.
    """
    values = np.asarray(image).astype(np.int64).clip(0, None)
    peak = int(values.max(initial=0))
    if 255 < peak <= 65535:
        shift = 8
    elif peak > 65535:  # what the bright end needs: none for 8-bit tones beside a no-data value of 2**31 - 1
        shift = max(0, int(np.quantile(values, 0.999)).bit_length() - 8)
    else:
        shift = 0
    grey = Image.fromarray((values >> shift).clip(0, 255).astype(np.uint8), mode="L")
    transparent = image.info.get("transparency")  # a PNG's tRNS: one grey level, in the 16-bit values
    if isinstance(transparent, int):
        alpha = Image.fromarray(np.where(values == transparent, 0, 255).astype(np.uint8), mode="L")
        grey = Image.merge("LA", (grey, alpha))
    return grey


def _unit_floats_to_255(image: Image.Image) -> Image.Image:
    """A 32-bit float image ("F") whose tones are in [0, 1], scaled to 0-255; any other returned as it is.

    Photoshop's 32-bit mode, HDR and scientific TIFFs hold tones in [0, 1] by convention, which PIL's convert would
    clip to a black image: scaled when 80% of the finite values are in [0, 1] (an HDR highlight may pass 1, noise
    dip below 0: clipped; a NaN is black, an infinity white). Other ranges are clipped by PIL, as in the reference.
    """
    values = np.asarray(image)
    finite = values[np.isfinite(values)]
    if finite.size and np.quantile(finite, 0.1) >= 0 and np.quantile(finite, 0.9) <= 1:
        values = np.nan_to_num(values, nan=0.0, posinf=1.0, neginf=0.0).clip(0, 1)
        return Image.fromarray(np.rint(values * np.float32(255)), mode="F")
    return image


def pixel_values(image: Image.Image, cfg: PreprocessConfig, *, original: tuple[int, int] | None = None) -> np.ndarray:
    """RGB PIL image → normalized (3, height, width) float32 array, as the reference computes it. `original`: as
    `resize` takes it."""
    return resized_to_pixels(resize(image, cfg, original=original), cfg)


def resize(image: Image.Image, cfg: PreprocessConfig, *, original: tuple[int, int] | None = None) -> Image.Image:
    """The image resized as the reference resizes it (to the model's size, or its shortest edge before a crop); as
    it is where the preprocessor does not resize. `original`: the (width, height) of the file's full-size picture,
    where `image` was decoded at a reduced size (--fast-decode), whose sides are rounded: the size kept for the
    aspect is the original's."""
    if not cfg.do_resize:
        return image
    width, height = cfg.resized(*(original or image.size))
    if not (width and height):  # a sliver under a longest-edge cap (1×2000): transformers fails on it too
        raise BadImage(
            f"image is {image.width}×{image.height}: too thin to resize for this model (to {width}×{height})"
        )
    return image.resize((width, height), resample=cfg.resample)


def resized_to_pixels(image: Image.Image, cfg: PreprocessConfig) -> np.ndarray:
    """A `resize`d RGB image → (3, height, width) float32 array: cropped, rescaled and normalized as `cfg` says."""
    if not (cfg.center_crop or cfg.keeps_aspect) and image.size != (cfg.width, cfg.height):
        raise BadImage(f"image is {image.width}×{image.height} but the model needs {cfg.width}×{cfg.height}")
    x = np.asarray(image)  # (H, W, 3) uint8
    if cfg.center_crop:
        x = center_crop(x, cfg.height, cfg.width)
    elif cfg.keeps_aspect:
        x = _as_the_towers_grid(x, cfg.patch_size, cfg.height // cfg.patch_size, cfg.width // cfg.patch_size)
    # The reference rescales in float64 and then casts: doing it in float32 directly differs in the last bit.
    x = (x.astype(np.float64) * cfg.rescale_factor).astype(np.float32) if cfg.do_rescale else x.astype(np.float32)
    if cfg.do_normalize:
        x = (x - np.asarray(cfg.image_mean, np.float32)) / np.asarray(cfg.image_std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def _as_the_towers_grid(x: np.ndarray, p: int, rows: int, cols: int) -> np.ndarray:
    """The whole p px patches of an (H, W, C) image, which number rows × cols, laid out in that grid in the same
    order: the tower computes on them as on the image (`PreprocessConfig.keeps_aspect`). Its patch conv drops what
    lies past the last whole patch, and gives each patch, in rows, the position embedding of its index."""
    h, w, c = x.shape[0] // p, x.shape[1] // p, x.shape[2]
    if (h, w) == (rows, cols):
        return x[: h * p, : w * p]
    patches = x[: h * p, : w * p].reshape(h, p, w, p, c).transpose(0, 2, 1, 3, 4)  # (h, w, p, p, C)
    return patches.reshape(rows, cols, p, p, c).transpose(0, 2, 1, 3, 4).reshape(rows * p, cols * p, c)


def center_crop(x: np.ndarray, height: int, width: int) -> np.ndarray:
    """The (height, width) middle of an (H, W, C) image, padded with black first where it is smaller, as
    transformers' `center_crop` takes it: an odd margin cut leaves its extra row or column at the bottom and right,
    an odd margin padded puts its extra one at the top and left."""
    if x.shape[0] < height or x.shape[1] < width:
        padded = np.zeros((max(x.shape[0], height), max(x.shape[1], width), x.shape[2]), x.dtype)
        top = math.ceil((padded.shape[0] - x.shape[0]) / 2)
        left = math.ceil((padded.shape[1] - x.shape[1]) / 2)
        padded[top : top + x.shape[0], left : left + x.shape[1]] = x
        x = padded
    top, left = (x.shape[0] - height) // 2, (x.shape[1] - width) // 2
    return x[top : top + height, left : left + width]


def load_pixels(
    source: str | Path | BinaryIO, cfg: PreprocessConfig, options: DecodeOptions
) -> tuple[np.ndarray, int, int]:
    """Decode and preprocess one file (a path, or its bytes in a file object): ((3, H, W) float32 pixels, width,
    height of the oriented original)."""
    # The least size --fast-decode may draft a JPEG down to: the model's input (a shortest edge: its square).
    target = (cfg.shortest_edge,) * 2 if cfg.shortest_edge else cfg.resized(cfg.width, cfg.height)
    image, (width, height) = open_rgb(source, options, target=target if cfg.do_resize else None)
    drafted = image.width < width and image.height < height  # decoded at a reduced size (--fast-decode)
    return pixel_values(image, cfg, original=(width, height) if drafted else None), width, height
