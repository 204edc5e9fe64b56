"""The GPU decoder (`gpu_decode`), run on the CPU (torchvision's libjpeg path): it computes what the PIL path does.

`read_header` decides which files the device decoder takes and reads their headers; `decode_headers` decodes and
preprocesses them; whatever either leaves goes to the CPU path (`decoding.batch_pixels`, tested end to end in
test_embed_cli.py and by `siglip bench --images` in test_bench.py).
"""

from __future__ import annotations

import contextlib
import io
import struct
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from conftest import make_photo, with_bogus_huffman_table
from siglip_cli import gpu_decode
from siglip_cli.config import PreprocessConfig, VisionConfig
from siglip_cli.errors import UserError
from siglip_cli.gpu_decode import JpegHeader, check_supported, decode_headers, jpeg_header, orient, read_header, resize
from siglip_cli.model import random_model
from siglip_cli.preprocess import DecodeOptions, load_pixels

CFG = PreprocessConfig(height=32, width=32)
TINY = VisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8)
PIL_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
                 5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
                 8: Image.Transpose.ROTATE_90}  # fmt: skip


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orient_matches_pil(orientation: int) -> None:
    image = make_photo((24, 16))
    expected = image.transpose(PIL_TRANSPOSE[orientation]) if orientation > 1 else image
    tensor = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)
    assert np.array_equal(orient(tensor, orientation).permute(1, 2, 0).numpy(), np.asarray(expected))


def _save_with_orientation(path: Path, upright: Image.Image, orientation: int) -> Path:
    """A JPEG whose pixels are `upright` un-oriented, tagged so that a viewer honouring EXIF shows `upright`."""
    inverse = {6: 8, 8: 6}.get(orientation, orientation)  # every orientation is its own inverse except 6 and 8
    stored = upright.transpose(PIL_TRANSPOSE[inverse]) if orientation > 1 else upright
    exif = Image.Exif()
    exif[0x0112] = orientation
    stored.save(path, format="JPEG", quality=95, exif=exif)
    assert ImageOps.exif_transpose(Image.open(path)).size == upright.size
    return path


@pytest.fixture
def mixed_files(tmp_path: Path) -> list[Path]:
    """JPEGs of several sizes, EXIF orientations and modes, plus files the GPU decoder must leave to the CPU."""
    files = [
        _save_with_orientation(tmp_path / "plain.jpg", make_photo((120, 90), seed=0), 1),
        _save_with_orientation(tmp_path / "portrait.jpg", make_photo((90, 120), seed=1), 6),
        _save_with_orientation(tmp_path / "flipped.jpg", make_photo((120, 90), seed=2), 4),
        _save_with_orientation(tmp_path / "transverse.jpg", make_photo((70, 100), seed=3), 7),
        _save_with_orientation(tmp_path / "same-size.jpg", make_photo((120, 90), seed=4), 1),
    ]
    make_photo((64, 48), mode="L").save(tmp_path / "gray.jpg", quality=95)
    make_photo((64, 48), mode="CMYK").save(tmp_path / "cmyk.jpg", quality=95)
    make_photo((64, 48)).save(tmp_path / "image.png")
    whole = (tmp_path / "plain.jpg").read_bytes()
    (tmp_path / "broken.jpg").write_bytes(with_bogus_huffman_table(whole))  # its header whole: the decoder finds out
    (tmp_path / "cut.jpg").write_bytes(whole[: whole.index(b"\xff\xda") + 20])  # its header, then nothing
    return files + [tmp_path / n for n in ("gray.jpg", "cmyk.jpg", "image.png", "broken.jpg", "cut.jpg")]


def _taken(files: list[Path], cfg: PreprocessConfig, options: DecodeOptions = DecodeOptions()) -> dict[str, JpegHeader]:
    """The headers of the files the GPU path takes, by file name, in file order."""
    headers = {path.name: read_header(path, cfg, options) for path in files}
    return {name: header for name, header in headers.items() if isinstance(header, JpegHeader)}


def test_read_header_leaves_what_the_device_decoder_cannot_take(mixed_files: list[Path]) -> None:
    reasons = {path.name: read_header(path, CFG, DecodeOptions()) for path in mixed_files}
    assert reasons["cmyk.jpg"] == "JPEG with 4 colour components"
    assert reasons["image.png"] == "not a JPEG"
    # Cut short: PIL refuses it ("image file is truncated"), where nvJPEG might give a half-grey photo.
    assert reasons["cut.jpg"] == "no end-of-image marker (a truncated JPEG?)"
    taken = _taken(mixed_files, CFG)
    assert set(taken) == {p.name for p in mixed_files} - {"cmyk.jpg", "image.png", "cut.jpg"}
    for path in mixed_files:
        if path.name in taken and path.name != "broken.jpg":  # the broken one's header is whole: the decoder finds out
            with Image.open(path) as image:
                assert (taken[path.name].width, taken[path.name].height) == ImageOps.exif_transpose(image).size


def test_read_header_reads_bytes_as_it_reads_files(mixed_files: list[Path]) -> None:
    portrait = mixed_files[1]
    from_file, from_bytes = (read_header(source, CFG, DecodeOptions()) for source in (portrait, portrait.read_bytes()))
    assert (from_file.orientation, from_file.width, from_file.height) == (6, 90, 120)
    assert (from_bytes.orientation, from_bytes.width, from_bytes.height) == (6, 90, 120)
    assert torch.equal(from_file.data, from_bytes.data)


def test_read_header_refuses_over_the_pixel_limit(mixed_files: list[Path]) -> None:
    assert read_header(mixed_files[0], CFG, DecodeOptions(max_pixels=120 * 90 - 1)) == "over the pixel limit"


def test_read_header_without_exif_keeps_stored_orientation(mixed_files: list[Path]) -> None:
    taken = _taken(mixed_files[:2], CFG, DecodeOptions(exif_transpose=False))
    assert [(h.width, h.height, h.orientation) for h in taken.values()] == [(120, 90, 1), (120, 90, 1)]  # sideways


@pytest.mark.parametrize("resample", [3, 2], ids=["bicubic", "bilinear"])
def test_gpu_decode_matches_the_pil_path_on_cpu(mixed_files: list[Path], resample: int) -> None:
    cfg = PreprocessConfig(height=32, width=32, resample=resample)
    taken = _taken(mixed_files, cfg)
    names = list(taken)
    pixels, decoded, rejected = decode_headers(list(taken.values()), cfg, device="cpu")
    assert [names[i] for i, _ in rejected] == ["broken.jpg"]
    assert rejected[0][1].startswith("JPEG decoder error")
    assert [names[i] for i in decoded] == [n for n in names if n != "broken.jpg"]
    folder = mixed_files[0].parent
    exact = [load_pixels(folder / names[i], cfg, DecodeOptions()) for i in decoded]
    assert [(taken[names[i]].width, taken[names[i]].height) for i in decoded] == [(w, h) for _, w, h in exact]
    expected = torch.stack([torch.from_numpy(p) for p, _, _ in exact])
    difference = (pixels - expected).abs()
    level = 2 / 255  # one 8-bit level in normalized units
    assert difference.max() <= 3 * level and difference.mean() < 0.1 * level
    model = random_model(TINY)
    with torch.no_grad():
        assert F.cosine_similarity(model(pixels).pooled, model(expected).pooled).min() >= 0.99999  # 1 - 2e-7 here


def test_gpu_decode_in_bounded_groups_gives_the_same_pixels(mixed_files: list[Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """The decoder takes at most PIXELS_PER_CALL pixels at a time (at least one photo): memory does not grow with
    the batch; the groups change nothing else."""
    headers = list(_taken(mixed_files, CFG).values())
    whole = decode_headers(headers, CFG, device="cpu")
    calls = []
    decode = gpu_decode._decode
    monkeypatch.setattr(gpu_decode, "_decode", lambda headers, device: calls.append(list(headers)) or decode(headers, device))
    monkeypatch.setattr(gpu_decode, "PIXELS_PER_CALL", 2 * 120 * 90)  # two of the larger photos
    grouped = decode_headers(headers, CFG, device="cpu")
    taken = [i for call in calls for i in call]  # indices of the headers, group after group
    assert len(calls) > 2 and taken == list(range(len(headers)))
    assert grouped[1:] == whole[1:]
    assert torch.equal(grouped[0], whole[0])


@pytest.mark.parametrize("gigabytes, photos", [(8, 16), (24, 50), (80, 166), (141, 294)])
def test_a_call_takes_a_sixteenth_of_the_device_memory_in_photos(
    gigabytes: int, photos: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """How many 2-megapixel photos one decoder call takes on a card of `gigabytes` (15 bytes a pixel held): 16 on an
    8 GB card, a whole batch of 256 on an H200, where fewer, larger calls decoded 1.5× faster."""
    total = gigabytes * 10**9
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(total_memory=total))
    pixels = gpu_decode.pixels_per_call(torch.device("cuda", 0))
    assert pixels * 16 * gpu_decode.BYTES_PER_DECODED_PIXEL <= total
    header = SimpleNamespace(width=1632, height=1224)
    assert len(gpu_decode._groups([header] * 1000, pixels)[0]) == photos
    monkeypatch.setattr(gpu_decode, "PIXELS_PER_CALL", 5)  # set: it is the bound, on any device
    assert gpu_decode.pixels_per_call(torch.device("cuda", 0)) == gpu_decode.pixels_per_call(torch.device("cpu")) == 5


def test_on_cuda_each_group_waits_for_the_decoding_stream_and_the_caller_waits_for_it(
    mixed_files: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CUDA branch's stream discipline, with the streams stood in for (no GPU here) and the work itself done on
    the CPU: nvJPEG writes on a stream of its own into memory allocated on the current one, so our stream must be
    idle before each group's decode, and the caller's stream must wait for ours before it reads the pixels."""
    headers = list(_taken(mixed_files, CFG).values())
    expected = decode_headers(headers, CFG, device="cpu")
    events: list[str] = []

    class Stream:
        def __init__(self, name: str):
            self.name, self.device = name, torch.device("cuda", 1)

        def synchronize(self) -> None:
            events.append(f"{self.name} synchronize")

        def wait_stream(self, other: "Stream") -> None:
            events.append(f"{self.name} waits for {other.name}")

    ours, callers = Stream("ours"), Stream("caller's")
    monkeypatch.setattr(gpu_decode, "_decoding_stream", lambda device: ours)
    monkeypatch.setattr(torch.cuda, "device", lambda device: events.append(f"on {device}") or contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: events.append(f"on {stream.name}") or contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: callers)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda self, stream: events.append(f"pixels read on {stream.name}"))
    decode = gpu_decode._decode
    monkeypatch.setattr(gpu_decode, "_decode", lambda headers, device: events.append("decode") or decode(headers, "cpu"))
    groups = gpu_decode._decode_groups
    monkeypatch.setattr(gpu_decode, "_decode_groups", lambda h, cfg, device, **kw: groups(h, cfg, torch.device("cpu"), **kw))
    monkeypatch.setattr(gpu_decode, "PIXELS_PER_CALL", 2 * 120 * 90)  # several groups

    pixels, decoded, rejected = decode_headers(headers, CFG, device="cuda:1")
    assert torch.equal(pixels, expected[0]) and (decoded, rejected) == expected[1:]
    calls = events.count("decode")
    assert calls > 2
    # On the model's device first: the look-ahead thread's own current device is 0 (a context there, on cuda:1).
    assert events == ["on cuda:1", "on ours"] + ["ours synchronize", "decode"] * calls + [
        "caller's waits for ours", "pixels read on caller's"
    ]


def test_decoder_out_of_memory_is_not_mistaken_for_bad_files(mixed_files: list[Path], monkeypatch: pytest.MonkeyPatch) -> None:
    # torch's out-of-memory error is a RuntimeError, which is also what the decoder raises for a bad file.
    import torchvision.io

    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory.")

    monkeypatch.setattr(torchvision.io, "decode_jpeg", out_of_memory)
    _, _, rejected = decode_headers(list(_taken(mixed_files, CFG).values()), CFG, device="cpu")
    reasons = {why for _, why in rejected}
    assert reasons == {"out of GPU memory for the JPEG decoder"}


def test_gpu_decoder_out_of_memory_leaves_the_batch_to_the_cpu_path(
    mixed_files: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    def out_of_memory(headers, device):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory.")

    monkeypatch.setattr(gpu_decode, "_decode", out_of_memory)
    headers = list(_taken(mixed_files, CFG).values())
    pixels, decoded, rejected = decode_headers(headers, CFG, device="cpu")
    assert decoded == [] and pixels.shape == (0, 3, 32, 32)
    assert rejected == [(i, "out of GPU memory for the JPEG decoder") for i in range(len(headers))]  # every JPEG it took


def test_a_resize_out_of_memory_frees_the_groups_images_before_the_cache_is_emptied(
    mixed_files: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    # They stayed referenced from the group loop: the cache could not release them, and the next group, decoded on
    # top of them, ran out of memory in turn.
    import weakref

    decode, images, alive = gpu_decode._decode, [], []

    def decoding(headers, device):
        decoded, refused = decode(headers, device)
        images.extend(weakref.ref(image) for image in decoded.values())
        return decoded, refused

    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory.")

    monkeypatch.setattr(gpu_decode, "_decode", decoding)
    monkeypatch.setattr(gpu_decode, "_preprocess", out_of_memory)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: alive.append(sum(ref() is not None for ref in images)))
    _, decoded, rejected = decode_headers(list(_taken(mixed_files, CFG).values()), CFG, device="cpu")
    assert decoded == [] and {why for _, why in rejected} == {"out of GPU memory for the JPEG decoder"}
    assert images and alive == [0]


def test_rows_index_a_device_tensor_without_a_list() -> None:
    # A list is copied to the device from pageable memory, which waits for the model's forward in flight.
    assert gpu_decode.device_index([3, 4, 5], "cpu") == slice(3, 6)
    assert torch.equal(gpu_decode.device_index([0, 2], "cpu"), torch.tensor([0, 2]))
    assert gpu_decode.device_index([], "cpu").numel() == 0


@pytest.mark.parametrize(
    "message",
    ["Error while decoding JPEG images: CUDA error: out of memory", "Failed to decode batch: 5",
     "Failed to synchronize CUDA stream: 2"],
    ids=["wrapped", "nvjpeg-allocator", "stream-allocation"],
)  # fmt: skip
def test_decoder_out_of_memory_wrapped_in_a_runtime_error_is_still_out_of_memory(
    mixed_files: list[Path], monkeypatch: pytest.MonkeyPatch, message: str
) -> None:
    # torchvision's CUDA decoder wraps every failure in a RuntimeError: an out-of-memory one was taken for a bad file,
    # each group's files then retried one by one and left to PIL, the cache never emptied.
    import torchvision.io

    def wrapped(*args, **kwargs):
        raise RuntimeError(message)

    monkeypatch.setattr(torchvision.io, "decode_jpeg", wrapped)
    _, _, rejected = decode_headers(list(_taken(mixed_files, CFG).values()), CFG, device="cpu")
    assert {why for _, why in rejected} == {"out of GPU memory for the JPEG decoder"}


def test_a_group_the_device_cannot_resize_goes_to_the_cpu_path(
    mixed_files: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    # CUDA's antialiased resize refuses a downscale past its shared memory: the whole run ended.
    def refuse(*args, **kwargs):
        raise RuntimeError("Too much shared memory required: 49172 vs 49152")

    monkeypatch.setattr(gpu_decode.F, "interpolate", refuse)
    headers = list(_taken(mixed_files, CFG).values())
    pixels, decoded, rejected = decode_headers(headers, CFG, device="cpu")
    assert decoded == [] and len(pixels) == 0
    assert rejected == [(i, "the GPU resize refused it: Too much shared memory required: 49172 vs 49152") for i in range(len(headers))]


@pytest.mark.parametrize(
    "where, message",
    [("resize", "CUDA error: too many resources requested for launch"),
     ("JPEG decoder", "CUDA error: too many resources requested for launch"),
     ("JPEG decoder", "Failed to synchronize CUDA stream: 700")],  # an illegal address
)  # fmt: skip
def test_a_device_fault_ends_the_run_rather_than_leaving_every_file_to_the_cpu(
    where: str, message: str, mixed_files: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Caught like a file's fault (the decoder's retried file by file), it moved a whole run to slow CPU decoding
    # without a word, its metadata saying gpu.
    import torchvision.io

    def fault(*args, **kwargs):
        raise RuntimeError(message)

    monkeypatch.setattr(*((gpu_decode.F, "interpolate") if where == "resize" else (torchvision.io, "decode_jpeg")), fault)
    with pytest.raises(RuntimeError, match=message.split(": ")[-1]):
        decode_headers(list(_taken(mixed_files, CFG).values()), CFG, device="cpu")


def test_a_panorama_too_long_for_the_gpu_resize_is_left_to_the_cpu(tmp_path: Path) -> None:
    wide = tmp_path / "panorama.jpg"
    make_photo((32 * 65, 32)).save(wide, quality=80)  # 65 times the 32-pixel model across
    make_photo((32 * 60, 32)).save(tmp_path / "long.jpg", quality=80)
    assert read_header(wide, CFG, DecodeOptions()) == "too long a side for the GPU resize"
    assert isinstance(read_header(tmp_path / "long.jpg", CFG, DecodeOptions()), JpegHeader)


def test_check_supported_refuses_filters_the_gpu_lacks() -> None:
    check_supported(PreprocessConfig(resample=3))
    check_supported(PreprocessConfig(resample=2))
    check_supported(PreprocessConfig(resample=0, do_resize=False))  # no resizing, no filter to match
    with pytest.raises(UserError, match="supports bilinear and bicubic resizing.*PIL filter 0"):
        check_supported(PreprocessConfig(resample=0))
    with pytest.raises(UserError, match="this checkpoint's preprocessing keeps the aspect; use the CPU decoder"):
        check_supported(PreprocessConfig(shortest_edge=224, patch_size=16))


@pytest.mark.parametrize("device, resample, expected", [("cuda", 3, "gpu"), ("cuda", 1, "cpu"), ("cpu", 3, "cpu")])
def test_auto_decodes_on_the_gpu_only_where_it_can_match_the_checkpoints_filter(
    device: str, resample: int, expected: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from types import SimpleNamespace

    from siglip_cli.embed import Silent, _decoder_for

    monkeypatch.setattr(gpu_decode, "fault", lambda device: None)  # a device decoder that works
    embedder = SimpleNamespace(device=torch.device(device), preprocess=PreprocessConfig(resample=resample))
    assert _decoder_for(embedder, "auto", Silent()) == expected


@pytest.mark.parametrize("resample", [3, 2], ids=["bicubic", "bilinear"])
@pytest.mark.parametrize("uint8", [True, False], ids=["uint8-cpu-kernel", "float-cuda-kernel"])
@pytest.mark.parametrize("size", [(200, 150), (20, 15)], ids=["shrink", "enlarge"])
def test_resize_follows_pil(resample: int, uint8: bool, size: tuple[int, int]) -> None:
    image = make_photo(size)
    cfg = PreprocessConfig(height=48, width=64, resample=resample)
    expected = np.asarray(image.resize((64, 48), resample=resample)).astype(np.float32)
    got = resize(torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)[None], cfg, uint8=uint8)[0]
    difference = np.abs(got.permute(1, 2, 0).numpy() - expected)
    assert difference.max() <= 1 and difference.mean() < 0.1  # in 8-bit levels


def _jpeg_variants() -> dict[str, bytes]:
    photo, variants = make_photo((80, 60)), {}
    for name, mode, kwargs in [("baseline", "RGB", {}), ("progressive", "RGB", {"progressive": True}),
                               ("gray", "L", {}), ("cmyk", "CMYK", {})]:  # fmt: skip
        buffer = io.BytesIO()
        photo.convert(mode).save(buffer, "JPEG", **kwargs)
        variants[name] = buffer.getvalue()
    for endian in "<>":  # phones write both byte orders
        exif = Image.Exif()
        exif.endian = endian
        exif[0x010F], exif[0x0112] = "Maker", 6
        buffer = io.BytesIO()
        photo.save(buffer, "JPEG", exif=exif.tobytes())
        variants[f"exif-{'little' if endian == '<' else 'big'}-endian"] = buffer.getvalue()
    baseline = variants["baseline"]
    for endian, order in (("<", "little"), (">", "big")):  # orientation 6 typed LONG, as some writers store it
        mark = b"II" if endian == "<" else b"MM"
        ifd = struct.pack(f"{endian}HHHI", 1, 0x0112, 4, 1) + (6).to_bytes(4, order) + bytes(4)
        variants[f"exif-long-{order}-endian"] = _with_app1(baseline, b"Exif\0\0" + mark + struct.pack(f"{endian}HI", 42, 8) + ifd)
    xmp = b'http://ns.adobe.com/xap/1.0/\0<x:xmpmeta><rdf:Description tiff:Orientation="8"/></x:xmpmeta>'
    variants["xmp-only"] = _with_app1(baseline, xmp)  # PIL reads XMP's orientation where EXIF has none
    exif = Image.Exif()
    exif[0x0112] = 1  # present, so XMP's 6 is not read
    variants["exif-1-beside-xmp-6"] = _with_app1(_with_app1(baseline, xmp.replace(b'"8"', b'"6"')), exif.tobytes())
    plain_xmp = b"http://ns.adobe.com/xap/1.0/\0<x:xmpmeta/>"
    variants["xmp-6-then-none"] = _with_app1(_with_app1(baseline, plain_xmp), xmp.replace(b'"8"', b'"6"'))  # PIL keeps the last
    frame = baseline.index(b"\xff\xc0")
    after_frame = frame + 2 + int.from_bytes(baseline[frame + 2 : frame + 4], "big")  # PIL reads on to the scan
    variants["exif-after-frame"] = baseline[:after_frame] + _app1(_orientation_block(6)) + baseline[after_frame:]
    return variants


def _orientation_block(orientation: int, *, kind: int = 3) -> bytes:
    """An EXIF APP1 payload whose IFD0 holds only the orientation, stored as TIFF type `kind` (3: SHORT)."""
    ifd = struct.pack("<HHHI", 1, 0x0112, kind, 1) + struct.pack("<I", orientation) + bytes(4)
    return b"Exif\0\0II" + struct.pack("<HI", 42, 8) + ifd


def _app1(payload: bytes) -> bytes:
    return b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload


def _with_app1(jpeg: bytes, payload: bytes) -> bytes:
    """`jpeg` with an APP1 segment holding `payload` right after its start marker (before any other APP1)."""
    return jpeg[:2] + _app1(payload) + jpeg[2:]


@pytest.mark.parametrize("name, data", list(_jpeg_variants().items()))
def test_jpeg_header_reads_what_pil_reads(name: str, data: bytes) -> None:
    with Image.open(io.BytesIO(data)) as image:
        expected = (*image.size, len(image.getbands()), image.getexif().get(0x0112, 1))
    assert jpeg_header(data) == expected


def test_an_orientation_stored_as_an_odd_type_is_left_to_pil() -> None:
    # PIL reads a RATIONAL orientation as 6.0 (and turns the photo) but a BYTE one as bytes (and does not).
    baseline = _jpeg_variants()["baseline"]
    for kind in (1, 5, 7, 11):  # BYTE, RATIONAL, UNDEFINED, FLOAT
        assert jpeg_header(_with_app1(baseline, _orientation_block(6, kind=kind))) == "EXIF orientation of an unusual type"
    assert jpeg_header(_with_app1(baseline, _orientation_block(6)))[3] == 6


def test_a_jpeg_stored_as_rgb_is_left_to_pil() -> None:
    # libjpeg (so PIL) reads three components without a JFIF marker as RGB when Adobe's APP14 says transform 0, or
    # when they are named R, G, B; nvJPEG may take them for YCbCr and give other colours.
    baseline = _jpeg_variants()["baseline"]
    assert baseline[2:4] == b"\xff\xe0"
    without_jfif = baseline[:2] + baseline[4 + int.from_bytes(baseline[4:6], "big") :]
    adobe = b"Adobe" + struct.pack(">HHHB", 100, 0, 0, 0)
    adobe_rgb = without_jfif[:2] + b"\xff\xee" + struct.pack(">H", len(adobe) + 2) + adobe + without_jfif[2:]
    named_rgb = bytearray(without_jfif)
    frame, scan = without_jfif.index(b"\xff\xc0") + 10, without_jfif.index(b"\xff\xda") + 5  # the first ids
    named_rgb[frame : frame + 9 : 3] = named_rgb[scan : scan + 6 : 2] = b"RGB"  # in the frame and the scan header
    for data in (adobe_rgb, bytes(named_rgb)):
        with Image.open(io.BytesIO(data)) as as_rgb, Image.open(io.BytesIO(baseline)) as as_ycbcr:
            assert np.abs(np.asarray(as_rgb, np.int16) - np.asarray(as_ycbcr, np.int16)).max() > 50  # not YCbCr
        assert jpeg_header(data) == "JPEG stored as RGB rather than YCbCr"
    assert jpeg_header(without_jfif) == jpeg_header(baseline) == (80, 60, 3, 1)  # components 1, 2, 3: YCbCr


def test_jpeg_header_names_what_it_refuses() -> None:
    assert jpeg_header(b"\x89PNG\r\n\x1a\n") == "not a JPEG"
    assert jpeg_header(_jpeg_variants()["baseline"][:40]) == "truncated JPEG header"


@pytest.fixture
def broken_decoder(monkeypatch: pytest.MonkeyPatch) -> None:
    """torchvision's JPEG decoder failing on every call, as a build without nvJPEG does on CUDA."""
    import torchvision.io

    def broken(*args, **kwargs):
        raise RuntimeError("decode_jpegs_cuda: torchvision not compiled with nvJPEG support\nmore")

    monkeypatch.setattr(torchvision.io, "decode_jpeg", broken)
    gpu_decode.fault.cache_clear()
    yield
    gpu_decode.fault.cache_clear()


def test_a_decoder_that_works_has_no_fault() -> None:
    gpu_decode.fault.cache_clear()
    assert gpu_decode.fault(torch.device("cpu")) is None


@pytest.mark.usefixtures("broken_decoder")
def test_a_device_decoder_that_cannot_work_is_found_before_the_run() -> None:
    # Found file by file, it sent every JPEG through two failed calls and then PIL in one thread, without a word.
    from types import SimpleNamespace

    from siglip_cli.embed import Silent, _decoder_for

    assert gpu_decode.fault(torch.device("cpu")) == "decode_jpegs_cuda: torchvision not compiled with nvJPEG support"
    on_cuda = SimpleNamespace(device=torch.device("cuda"), preprocess=CFG)  # the probe decodes there: patched
    notes: list[str] = []
    assert _decoder_for(on_cuda, "auto", SimpleNamespace(note=notes.append)) == "cpu"
    assert notes == ["the GPU JPEG decoder does not work here (decode_jpegs_cuda: torchvision not compiled with "
                     "nvJPEG support): decoding on the CPU."]  # fmt: skip
    with pytest.raises(UserError, match=r"^the GPU JPEG decoder does not work here \(.*\): use --decode cpu or auto\.$"):
        _decoder_for(on_cuda, "gpu", Silent())
    assert _decoder_for(SimpleNamespace(device=torch.device("cpu"), preprocess=CFG), "gpu", Silent()) == "gpu"  # no probe


@pytest.mark.usefixtures("broken_decoder")
def test_bench_leaves_out_the_way_of_a_device_decoder_that_cannot_work(tmp_path: Path) -> None:
    from siglip_cli.benchmark import _end_to_end_ways

    make_photo((40, 30)).save(tmp_path / "a.jpg")
    paths = [str(tmp_path / "a.jpg")]
    # Probed on the CPU too: that also imports torchvision before anything is timed (benchmark._end_to_end_ways).
    assert "gpu" not in _end_to_end_ways(paths, CFG, device=torch.device("cpu"), workers=1)[0]
    assert "gpu" not in _end_to_end_ways(paths, CFG, device=torch.device("cuda"), workers=1)[0]
