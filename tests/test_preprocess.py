"""Preprocessing: pixel for pixel what transformers' `SiglipImageProcessorPil` feeds the model, and beyond it
the fixes photo libraries need (EXIF orientation, 16-bit tones, first frame of animations, a pixel limit).

The reference processor is built with `from_pretrained(checkpoint_dir)`, so both sides read the same
`preprocessor_config.json` (bicubic for SigLIP, bilinear for SigLIP2).
"""

from __future__ import annotations

import io
import json
import re
import struct
import zlib
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from PIL import Image

from conftest import make_photo, reference_composites, save_animated_gif, save_png_claiming_size, save_sideways_jpeg
from siglip_cli import gpu_decode
from siglip_cli.checkpoints import resolve_checkpoint
from siglip_cli.config import ConfigError, PreprocessConfig
from siglip_cli.preprocess import BadImage, DecodeOptions, load_pixels, pixel_values, to_rgb
from siglip_cli.tracing import preprocessing_steps

MODES = ["RGB", "L", "RGBA", "LA", "P", "CMYK"]  # P: a palette with one transparent colour
# A format that stores each mode as it is (P keeps its transparency in PNG and GIF, CMYK stays CMYK in JPEG/TIFF).
SAVED = [
    ("RGB", "jpg"), ("RGB", "png"), ("RGB", "webp"), ("RGB", "bmp"),
    ("L", "png"), ("L", "jpg"),
    ("RGBA", "png"), ("RGBA", "webp"), ("LA", "png"),
    ("P", "png"), ("P", "gif"),
    ("CMYK", "jpg"), ("CMYK", "tif"),
]  # fmt: skip
NO_EXIF = DecodeOptions(exif_transpose=False)


@pytest.fixture(params=["tiny_siglip", "tiny_siglip2"], ids=["bicubic", "bilinear"])
def checkpoint(request: pytest.FixtureRequest) -> Path:
    return request.getfixturevalue(request.param)


@pytest.fixture
def cfg(checkpoint: Path) -> PreprocessConfig:
    return resolve_checkpoint(str(checkpoint)).preprocess


@pytest.fixture
def reference(checkpoint: Path):
    """`image → (3, H, W) float32 array` by transformers' PIL processor for this checkpoint."""
    from transformers import SiglipImageProcessorPil

    processor = SiglipImageProcessorPil.from_pretrained(checkpoint)

    def pixels(image: Image.Image) -> np.ndarray:
        if not reference_composites(image):
            pytest.skip("transformers < 5.21 (the newest for Python 3.10) drops transparency instead of compositing it")
        return processor(images=image, return_tensors="np")["pixel_values"][0]

    return pixels


def max_diff(ours: np.ndarray, theirs: np.ndarray) -> float:
    assert ours.shape == theirs.shape and ours.dtype == np.float32
    return float(np.abs(ours - theirs).max())


def same_bits(ours: np.ndarray, theirs: np.ndarray) -> bool:
    """Bit for bit, as the README promises: a rescale done in float32 rather than through float64, as the reference
    does, differs in the last bit (1e-7) of a third of the values, and any tolerance would let it through."""
    assert ours.shape == theirs.shape and ours.dtype == np.float32 and theirs.dtype == np.float32
    return np.array_equal(ours, theirs)


def pixels_of(image: Image.Image, cfg: PreprocessConfig) -> np.ndarray:
    return pixel_values(to_rgb(image), cfg)


# ------------------------------------------------------------------------------ parity with transformers


CROP = {"height": 32, "width": 32}
CROPPING_PROCESSORS = {  # CLIP-style preprocessing some fine-tunes carry, for a tower of 32 px
    "shortest-edge-then-crop": dict(size={"shortest_edge": 36}, do_center_crop=True, crop_size=CROP),
    "shortest-edge-below-the-crop": dict(size={"shortest_edge": 29}, do_center_crop=True, crop_size=32),  # padded
    "shortest-and-longest-edge-then-crop": dict(size={"shortest_edge": 36, "longest_edge": 60}, do_center_crop=True, crop_size=CROP),
    "resize-then-crop": dict(size={"height": 40, "width": 48}, do_center_crop=True, crop_size=CROP),
    "crop-without-resizing": dict(do_resize=False, do_center_crop=True, crop_size=CROP),
}  # fmt: skip


@pytest.mark.parametrize("settings", CROPPING_PROCESSORS.values(), ids=CROPPING_PROCESSORS.keys())
# (37, 113) passes a longest edge of 60 once resized; (61, 30) keeps its size under it, as transformers rounds.
@pytest.mark.parametrize("size", [(451, 300), (300, 451), (37, 113), (9, 7), (32, 32), (61, 30)])
def test_a_center_cropping_processor_gives_transformers_pixels(
    tmp_path: Path, settings: dict, size: tuple[int, int]
) -> None:
    # Refused before ("cropping is not supported"), though transformers runs them.
    from transformers import SiglipImageProcessorPil

    from siglip_cli.config import VisionConfig, preprocess_config_from_hub

    processor = SiglipImageProcessorPil(resample=3, **settings)
    processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    cfg = preprocess_config_from_hub(saved, VisionConfig(image_size=32))
    assert (cfg.height, cfg.width) == (32, 32) and cfg.center_crop
    image = make_photo(size)
    expected = processor(images=image, return_tensors="np")["pixel_values"][0]
    assert same_bits(pixels_of(image, cfg), expected)
    assert not gpu_decode.supported(cfg)  # the GPU decoder resizes straight to the model's size


def whole_patches(x: np.ndarray, p: int) -> np.ndarray:
    """The whole p px patches of a (C, H, W) array, in rows: (n, C, p, p), as a patch conv and its flattening see
    them."""
    c, h, w = x.shape[0], x.shape[1] // p, x.shape[2] // p
    return x[:, : h * p, : w * p].reshape(c, h, p, w, p).transpose(1, 3, 0, 2, 4).reshape(h * w, c, p, p)


KEEPING_THE_ASPECT = [32, {"shortest_edge": 32}, *({"shortest_edge": 32, "longest_edge": edge} for edge in (38, 64))]


@pytest.mark.parametrize("size", KEEPING_THE_ASPECT, ids=["one-number", "shortest", "capped-at-38", "capped-at-64"])
# 16 patches of 8 px once resized, as the 32 px tower's 4x4: (84, 80), (35, 37), (32, 32) and, under a longest edge
# of 64, (16, 64) and (130, 40) as 8x2 and 2x8. Others: (80, 60), (20, 90).
@pytest.mark.parametrize("image_size", [(84, 80), (35, 37), (32, 32), (16, 64), (130, 40), (80, 60), (20, 90)])
def test_a_shortest_edge_without_a_crop_gives_the_patches_the_patch_conv_sees_in_transformers(
    tmp_path: Path, size: int | dict, image_size: tuple[int, int]
) -> None:
    # What `SiglipImageProcessor(size=32)` saves ({"shortest_edge": 32}): transformers keeps the aspect and runs an
    # image whose whole patches then number the tower's, its patch conv dropping the rest (the 33rd column) and the
    # position embeddings going to the patches by index. We refused the checkpoint, and squashed the one-number
    # form. An image with another number of patches, which transformers fails on, is squashed.
    from transformers import SiglipImageProcessorPil

    from siglip_cli.config import VisionConfig, preprocess_config_from_hub

    processor = SiglipImageProcessorPil(resample=3, size=size)
    processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    cfg = preprocess_config_from_hub({**saved, "size": size}, VisionConfig(image_size=32, patch_size=8))
    assert (cfg.height, cfg.width, cfg.keeps_aspect) == (32, 32, True)
    image = make_photo(image_size)
    kept = processor(images=image, return_tensors="np")["pixel_values"][0]
    if len(whole_patches(kept, 8)) == 16:
        expected = whole_patches(kept, 8)
    else:
        squashed = SiglipImageProcessorPil(resample=3, size={"height": 32, "width": 32})
        expected = whole_patches(squashed(images=image, return_tensors="np")["pixel_values"][0], 8)
    assert kept.shape[1:] != (32, 32) or image_size == (32, 32)  # the aspect is kept: not the squash's size
    ours = pixels_of(image, cfg)
    assert ours.shape == (3, 32, 32) and same_bits(whole_patches(ours, 8), expected)
    assert not gpu_decode.supported(cfg)  # the GPU decoder resizes straight to the model's size
    assert "as the tower's 4×4 grid; squashed to 32×32 where they are not 16" in preprocessing_steps(cfg)["crop"]


def test_a_shortest_edge_without_a_crop_that_no_image_can_fit_is_refused() -> None:
    from siglip_cli.config import VisionConfig, preprocess_config_from_hub

    tower = VisionConfig(image_size=32, patch_size=8)
    for edge, rows in ((48, 6), (24, 3), (7, 0)):  # 16 patches in rows of 6 or 3 do not go; 0 rows make none
        with pytest.raises(ConfigError, match=rf"shorter side of {edge} px, {rows} rows of 8 px patches, makes no "):
            preprocess_config_from_hub({"size": {"shortest_edge": edge}}, tower)
    for size in ({"shortest_edge": 16}, {"shortest_edge": 48, "longest_edge": 32}):  # 4:1 photos; capped ones
        assert preprocess_config_from_hub({"size": size}, tower).keeps_aspect


def test_an_image_too_thin_for_a_longest_edge_cap_fails_in_words() -> None:
    # 1×2000 under a shortest edge of 36 capped at 60: 0×60 pixels (transformers fails too); the errors row said
    # "ValueError: height and width must be > 0".
    cfg = PreprocessConfig(32, 32, center_crop=True, shortest_edge=36, longest_edge=60)
    with pytest.raises(BadImage, match=r"^image is 1×2000: too thin to resize for this model \(to 0×60\)$"):
        pixels_of(make_photo((1, 2000)), cfg)


MINIMAL_CONFIGS = {  # written by hand: what they leave out is their class's default, not SigLIP's
    "CLIP": {"image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": 32}, "crop_size": 32},
    "ViT": {"image_processor_type": "ViTImageProcessorFast", "size": {"height": 32, "width": 32}},
    "BiT": {"image_processor_type": "BitImageProcessor", "size": {"shortest_edge": 40}, "crop_size": 32},
    # One number is a shortest edge before a crop, but for ViT's processor a square (save_pretrained writes neither).
    "SigLIP, one number": {"image_processor_type": "SiglipImageProcessor", "size": 40, "do_center_crop": True, "crop_size": 32},
    "ViT, one number": {"image_processor_type": "ViTImageProcessor", "size": 40, "do_center_crop": True, "crop_size": 32},
    "DeiT, one number": {"image_processor_type": "DeiTImageProcessor", "size": 40, "do_center_crop": True, "crop_size": 32,
                         "resample": 3, "image_mean": 0.5, "image_std": 0.5},  # a class unknown here: transformers' square
    # Older configs name a feature extractor, read as the image processor of that name.
    "CLIP, as a feature extractor": {"feature_extractor_type": "CLIPFeatureExtractor", "size": 32, "crop_size": 32},
    "ViT, as a feature extractor": {"feature_extractor_type": "ViTFeatureExtractor", "size": 32},
}


@pytest.mark.parametrize("settings", MINIMAL_CONFIGS.values(), ids=MINIMAL_CONFIGS.keys())
def test_a_config_silent_on_a_setting_gets_its_processor_classs_default(tmp_path: Path, settings: dict) -> None:
    # A CLIP processor's config without its mean and std was normalized with SigLIP's 0.5; a ViT one's resized bicubic.
    from transformers import AutoImageProcessor

    from siglip_cli.config import VisionConfig, preprocess_config_from_hub

    (tmp_path / "preprocessor_config.json").write_text(json.dumps(settings))
    processor = AutoImageProcessor.from_pretrained(tmp_path, backend="pil")
    cfg = preprocess_config_from_hub(settings, VisionConfig(image_size=32))
    image = make_photo((80, 45))
    assert same_bits(pixels_of(image, cfg), processor(images=image, return_tensors="np")["pixel_values"][0])


@pytest.mark.parametrize(("image_size", "patch_size", "side"), [(226, 16, 224), (32, 8, 32)], ids=["224", "tower"])
def test_a_siglip_config_without_a_size_resizes_as_transformers_does(
    tmp_path: Path, image_size: int, patch_size: int, side: int
) -> None:
    # transformers' SigLIP processor resizes to its own 224×224: a 226 px tower at patch 16 (a 14×14 grid either way)
    # ran at 226 px here, 0.06 away. Where 224 px gives another grid, transformers fails; the tower's size is meant.
    from transformers import AutoImageProcessor

    from siglip_cli.config import VisionConfig, preprocess_config_from_hub

    settings = {"image_processor_type": "SiglipImageProcessor"}
    cfg = preprocess_config_from_hub(settings, VisionConfig(image_size=image_size, patch_size=patch_size))
    assert (cfg.height, cfg.width) == (side, side)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(settings))
    processor = AutoImageProcessor.from_pretrained(tmp_path, backend="pil")
    image = make_photo((80, 45))
    expected = processor(images=image, return_tensors="np")["pixel_values"][0]
    if side == 224:
        assert same_bits(pixels_of(image, cfg), expected)
    else:
        assert expected.shape[1:] == (224, 224)  # which no 32 px tower at patch 8 takes
        at_the_towers_size = processor(images=image, size={"height": side, "width": side}, return_tensors="np")
        assert same_bits(pixels_of(image, cfg), at_the_towers_size["pixel_values"][0])


@pytest.mark.parametrize(
    ("settings", "tower"),
    [({"size": 32}, 32), ({"size": {"shortest_edge": 32}, "crop_pct": 0.75}, 32), ({"size": 384}, 384), ({}, 384)],
    ids=["crop-pct", "another-crop-pct", "warped-from-384", "the-class-defaults"],
)
@pytest.mark.parametrize("size", [(451, 300), (300, 451), (40, 40)])
def test_a_convnext_processor_gives_transformers_pixels(
    tmp_path: Path, settings: dict, tower: int, size: tuple[int, int]
) -> None:
    # The shorter side to size / crop_pct, then the middle size x size; squashed from 384 px. It was refused, and
    # then, read as a shortest edge without a crop, embedded 0.12 away from transformers.
    from transformers import ConvNextImageProcessorPil

    from siglip_cli.config import VisionConfig, preprocess_config_from_hub

    processor = ConvNextImageProcessorPil(**settings)
    processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    cfg = preprocess_config_from_hub(saved, VisionConfig(image_size=tower, patch_size=8))
    image = make_photo(size)
    expected = processor(images=image, return_tensors="np")["pixel_values"][0]
    assert same_bits(pixels_of(image, cfg), expected)
    assert cfg.center_crop == (tower < 384)


def test_a_convnext_processor_that_crops_twice_is_refused() -> None:
    from siglip_cli.config import VisionConfig, preprocess_config_from_hub

    config = {"image_processor_type": "ConvNextImageProcessor", "size": 32, "do_center_crop": True, "crop_size": 28}
    with pytest.raises(ConfigError, match="a ConvNeXT preprocessor that center-crops again after its own crop"):
        preprocess_config_from_hub(config, VisionConfig(image_size=32))


def test_a_config_of_an_unknown_processor_class_must_say_what_it_means() -> None:
    from siglip_cli.config import VisionConfig, preprocess_config_from_hub

    tower = VisionConfig(image_size=32)
    partial = {"image_processor_type": "PerceiverImageProcessor", "size": 32}
    with pytest.raises(ConfigError, match="is a PerceiverImageProcessor, whose defaults are unknown here, and its "
                                          "config leaves out resample, image_mean, image_std"):  # fmt: skip
        preprocess_config_from_hub(partial, tower)
    full = {**partial, "resample": 2, "image_mean": 0.5, "image_std": 0.5}
    assert preprocess_config_from_hub(full, tower) == PreprocessConfig(32, 32, resample=2)


def test_a_crop_of_the_whole_resized_image_is_siglips_own_preprocessing() -> None:
    from siglip_cli.config import VisionConfig, preprocess_config_from_hub

    raw = {"size": {"height": 32, "width": 32}, "do_center_crop": True, "crop_size": {"height": 32, "width": 32}}
    cfg = preprocess_config_from_hub(raw, VisionConfig(image_size=32))
    assert cfg == PreprocessConfig(32, 32) and "center_crop" not in cfg.to_dict()  # outputs record it as before


@pytest.mark.parametrize("size", [(80, 60), (20, 15)], ids=["downscale", "upscale"])
@pytest.mark.parametrize("mode", MODES)
def test_pixels_match_transformers_for_each_image_mode(mode: str, size, cfg, reference) -> None:
    image = make_photo(size, mode=mode)
    assert same_bits(pixels_of(image, cfg), reference(image))


@pytest.mark.parametrize("mode, suffix", SAVED, ids=[f"{m}-{s}" for m, s in SAVED])
def test_saved_file_decodes_to_transformers_pixels(mode: str, suffix: str, tmp_path: Path, cfg, reference) -> None:
    path = tmp_path / f"photo.{suffix}"
    make_photo((80, 60), mode=mode).save(path)
    with Image.open(path) as image:
        assert image.mode == mode  # the file really holds that mode
        expected = reference(image)
    pixels, width, height = load_pixels(path, cfg, NO_EXIF)
    assert same_bits(pixels, expected)
    assert (width, height) == (80, 60)


def test_transparency_is_composited_onto_white(cfg: PreprocessConfig) -> None:
    clear = Image.new("RGBA", (40, 40), (255, 0, 0, 0))  # fully transparent red
    assert np.array_equal(pixels_of(clear, cfg), np.ones((3, cfg.height, cfg.width), np.float32))  # white is +1 after normalizing


@pytest.mark.parametrize("mode", ["La", "RGBa"])
def test_premultiplied_alpha_is_composited_like_straight_alpha(mode: str, cfg: PreprocessConfig) -> None:
    # A TIFF with associated alpha opens as La or RGBa; PIL cannot convert La to RGB at all.
    straight = make_photo((40, 30)).convert(mode.upper())
    straight.putalpha(Image.linear_gradient("L").resize((40, 30)))
    premultiplied = straight.convert(mode)
    grey_level = 2 / 255  # on the normalized scale, which spans 2
    assert np.abs(pixels_of(premultiplied, cfg) - pixels_of(straight, cfg)).max() <= 2 * grey_level + 1e-6  # rounding


def test_rgb_png_with_a_transparent_colour_is_composited_like_the_reference(tmp_path: Path, cfg, reference) -> None:
    # An RGB PNG whose tRNS chunk makes one colour see-through: RGB, yet not to be passed through as it is.
    photo = make_photo((80, 60))
    photo.save(tmp_path / "keyed.png", transparency=photo.getpixel((0, 0)))
    with Image.open(tmp_path / "keyed.png") as image:
        assert image.mode == "RGB" and image.info.get("transparency") is not None
        expected = reference(image)
    pixels, _, _ = load_pixels(tmp_path / "keyed.png", cfg, NO_EXIF)
    assert same_bits(pixels, expected)
    assert max_diff(pixels, reference(photo)) > 0.1  # the keyed colour became white


def test_siglip2_resizes_bilinear_and_siglip_bicubic(tiny_siglip: Path, tiny_siglip2: Path) -> None:
    bicubic = resolve_checkpoint(str(tiny_siglip)).preprocess
    bilinear = resolve_checkpoint(str(tiny_siglip2)).preprocess
    assert (bicubic.resample, bilinear.resample) == (Image.Resampling.BICUBIC, Image.Resampling.BILINEAR)
    photo = make_photo((80, 60))
    assert not np.array_equal(pixels_of(photo, bicubic), pixels_of(photo, bilinear))  # the filter shows in the pixels


def test_pixels_are_a_normalized_channels_first_tensor(cfg: PreprocessConfig) -> None:
    pixels = pixels_of(make_photo((80, 60)), cfg)
    assert pixels.shape == (3, cfg.height, cfg.width) and pixels.dtype == np.float32
    assert -1.0 <= pixels.min() < 0 < pixels.max() <= 1.0


# ------------------------------------------------------------------------------ beyond the reference


@pytest.fixture
def bicubic() -> PreprocessConfig:
    return PreprocessConfig(height=32, width=32)


def test_exif_orientation_is_applied_by_default(tmp_path: Path, bicubic: PreprocessConfig) -> None:
    path = save_sideways_jpeg(tmp_path / "portrait.jpg", make_photo((80, 60)))
    with Image.open(path) as stored:
        assert stored.size == (60, 80)  # the pixels lie on their side
        upright = stored.convert("RGB").rotate(-90, expand=True)  # clockwise, as orientation 6 says
    pixels, width, height = load_pixels(path, bicubic, DecodeOptions())
    assert np.array_equal(pixels, pixels_of(upright, bicubic))
    assert (width, height) == (80, 60)  # the size a viewer shows


@pytest.mark.parametrize("orientation", [5, 6, 7, 8])
@pytest.mark.parametrize("mode", ["L", "RGBA"])
def test_an_uncompressed_tiff_turned_by_its_orientation_decodes_from_a_path_as_from_its_bytes(
    tmp_path: Path, bicubic: PreprocessConfig, orientation: int, mode: str
) -> None:
    # From a path Pillow 13 mapped the strips of an uncompressed TIFF unturned, and dropped the tag all the same:
    # `inspect` and load_pixels(path) got scrambled pixels (and the size on its side), `embed` the photo.
    exif = Image.Exif()
    exif[0x0112] = orientation
    photo = make_photo((80, 40)).convert(mode)
    photo.save(tmp_path / "plain.tif", exif=exif.tobytes())
    photo.save(tmp_path / "lzw.tif", exif=exif.tobytes(), compression="tiff_lzw")  # decoded alike from either
    plain, width, height = load_pixels(tmp_path / "plain.tif", bicubic, DecodeOptions())
    assert (width, height) == (40, 80)  # turned by a quarter
    assert np.array_equal(plain, load_pixels(tmp_path / "lzw.tif", bicubic, DecodeOptions())[0])
    with open(tmp_path / "plain.tif", "rb") as f:
        assert np.array_equal(plain, load_pixels(f, bicubic, DecodeOptions())[0])


def test_a_tiff_is_turned_by_its_orientation_without_exif_transpose_too_as_pillow_turns_it(
    tmp_path: Path, bicubic: PreprocessConfig
) -> None:
    # Pillow turns a TIFF as it loads it (README, Preprocessing): that is the reference's behaviour, and the size
    # said is the turned one.
    exif = Image.Exif()
    exif[0x0112] = 6
    make_photo((80, 40)).save(tmp_path / "scan.tif", exif=exif.tobytes(), compression="tiff_lzw")
    pixels, width, height = load_pixels(tmp_path / "scan.tif", bicubic, NO_EXIF)
    with Image.open(tmp_path / "scan.tif") as reference:
        assert np.array_equal(pixels, pixels_of(reference.convert("RGB"), bicubic))
    assert (width, height) == (40, 80) == reference.size


def test_exif_rotated_photo_looks_like_the_original(tmp_path: Path, bicubic: PreprocessConfig) -> None:
    original = make_photo((80, 60))
    path = save_sideways_jpeg(tmp_path / "portrait.jpg", original)
    pixels, _, _ = load_pixels(path, bicubic, DecodeOptions())
    close = np.abs(pixels - pixels_of(original, bicubic)).mean()
    other_way = np.abs(pixels - pixels_of(original.rotate(180), bicubic)).mean()
    assert close < 0.05 < other_way  # only JPEG loss separates it from the original


def test_rotated_photo_with_an_odd_exif_value_elsewhere_is_still_turned_upright(
    tmp_path: Path, bicubic: PreprocessConfig
) -> None:
    # Orientation 6 beside an XResolution of -1/0 (a signed rational with a zero denominator, as some cameras
    # write): Pillow's exif_transpose turns the photo, then fails writing the EXIF block back without the tag.
    upright = make_photo((80, 60))
    value_at = 8 + 2 + 2 * 12 + 4  # after the TIFF header, the two-entry IFD and its next-IFD offset
    entries = [(0x0112, 3, 1, struct.pack("<H", 6) + b"\0\0"), (0x011A, 10, 1, struct.pack("<I", value_at))]
    ifd = struct.pack("<H", len(entries)) + b"".join(struct.pack("<HHI", *entry[:3]) + entry[3] for entry in entries)
    tiff = b"II*\0" + struct.pack("<I", 8) + ifd + struct.pack("<I", 0) + struct.pack("<ii", -1, 0)
    stored = io.BytesIO()
    upright.rotate(90, expand=True).save(stored, format="JPEG", quality=95, exif=b"Exif\0\0" + tiff)
    (tmp_path / "odd.jpg").write_bytes(stored.getvalue())
    save_sideways_jpeg(tmp_path / "plain.jpg", upright)
    pixels, width, height = load_pixels(tmp_path / "odd.jpg", bicubic, DecodeOptions())
    assert np.array_equal(pixels, load_pixels(tmp_path / "plain.jpg", bicubic, DecodeOptions())[0])
    assert (width, height) == (80, 60)


def save_psd(path: Path, image: Image.Image) -> Path:
    """A flat RGB Photoshop file (no layers), which Pillow reads but cannot write."""
    width, height = image.size
    planes = np.asarray(image.convert("RGB")).transpose(2, 0, 1).tobytes()
    header = b"8BPS" + struct.pack(">H6xHIIHH", 1, 3, height, width, 8, 3)
    path.write_bytes(header + struct.pack(">IIIH", 0, 0, 0, 0) + planes)  # no colour data, resources, layers; raw
    return path


def test_photoshop_file_decodes_to_its_composite_image(tmp_path: Path, bicubic: PreprocessConfig) -> None:
    photo = make_photo((40, 30))
    pixels, width, height = load_pixels(save_psd(tmp_path / "edit.psd", photo), bicubic, DecodeOptions())
    assert np.array_equal(pixels, pixels_of(photo, bicubic)) and (width, height) == (40, 30)


def test_postscript_named_like_a_photo_is_refused_unopened(tmp_path: Path, bicubic: PreprocessConfig) -> None:
    # Pillow would hand an EPS file to Ghostscript, where `{} loop` never ends.
    path = tmp_path / "hang.jpg"
    path.write_text("%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n{} loop\n")
    with pytest.raises(BadImage, match="cannot identify image file"):
        load_pixels(path, bicubic, DecodeOptions())


FAST = DecodeOptions(fast_decode=True)


def test_fast_decode_reads_a_large_jpeg_at_reduced_size_close_to_exact(
    tmp_path: Path, bicubic: PreprocessConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    from siglip_cli import preprocess

    path = save_sideways_jpeg(tmp_path / "big.jpg", make_photo((320, 240)))  # 10× the model's 32 px, stored sideways
    exact, *exact_size = load_pixels(path, bicubic, DecodeOptions())
    resized, resize = [], preprocess.pixel_values
    def pixel_values(image: Image.Image, cfg: PreprocessConfig, **kw: object) -> np.ndarray:
        resized.append(image.size)
        return resize(image, cfg, **kw)

    monkeypatch.setattr(preprocess, "pixel_values", pixel_values)
    fast, *fast_size = load_pixels(path, bicubic, FAST)
    assert fast_size == exact_size == [320, 240]  # the manifest gives the original's size, upright
    assert resized == [(160, 120)]  # decoded at half size (160×120 upright), at least twice 32 px
    error = np.abs(fast - exact) * 127.5  # in 8-bit levels
    assert 0 < error.mean() < 2  # close, not exact


def test_fast_decode_keeps_the_aspect_of_the_full_size_photo(tmp_path: Path) -> None:
    # A shortest edge of 32 without a crop (a 4x4 tower of 8 px patches) takes 1280x1596 as 32x39: its 16 patches.
    # Decoded at an eighth, 160x200 (its sides rounded up) resized to 32x40, 20 patches: it was squashed instead.
    cfg = PreprocessConfig(32, 32, shortest_edge=32, patch_size=8)
    make_photo((1280, 1596)).save(tmp_path / "tall.jpg", quality=90)
    exact, *_ = load_pixels(tmp_path / "tall.jpg", cfg, DecodeOptions())
    fast, *_ = load_pixels(tmp_path / "tall.jpg", cfg, FAST)
    assert 0 < (np.abs(fast - exact) * 127.5).mean() < 2  # close, not exact: the same 16 patches
    assert cfg.resized(1280, 1596) == (32, 39) and cfg.resized(160, 200) == (32, 32)  # the squash it was


def test_fast_decode_reads_a_multi_picture_jpeg_at_reduced_size_too(tmp_path: Path, bicubic: PreprocessConfig) -> None:
    # Pillow opens a JPEG carrying an MPF preview or a gain map (Ultra HDR phones, many cameras) as "MPO".
    photo = make_photo((320, 240))
    photo.save(tmp_path / "hdr.jpg", format="MPO", save_all=True, append_images=[make_photo((80, 60))], quality=90)
    photo.save(tmp_path / "plain.jpg", quality=90)
    with Image.open(tmp_path / "hdr.jpg") as image:
        assert image.format == "MPO"
    assert np.array_equal(load_pixels(tmp_path / "hdr.jpg", bicubic, FAST)[0], load_pixels(tmp_path / "plain.jpg", bicubic, FAST)[0])
    assert not np.array_equal(load_pixels(tmp_path / "hdr.jpg", bicubic, FAST)[0], load_pixels(tmp_path / "hdr.jpg", bicubic, DecodeOptions())[0])


def test_fast_decode_leaves_small_jpegs_and_other_formats_exact(tmp_path: Path, bicubic: PreprocessConfig) -> None:
    photo = make_photo((60, 50))  # under twice the model's size: nothing to gain, decoded in full
    photo.save(tmp_path / "small.jpg", quality=95)
    make_photo((320, 240)).save(tmp_path / "big.png")
    for name in ("small.jpg", "big.png"):
        assert np.array_equal(load_pixels(tmp_path / name, bicubic, FAST)[0], load_pixels(tmp_path / name, bicubic, DecodeOptions())[0])


def test_no_exif_transpose_keeps_the_stored_orientation(tmp_path: Path, bicubic: PreprocessConfig) -> None:
    path = save_sideways_jpeg(tmp_path / "portrait.jpg", make_photo((80, 60)))
    with Image.open(path) as stored:
        sideways = stored.convert("RGB")
    pixels, width, height = load_pixels(path, bicubic, NO_EXIF)
    assert np.array_equal(pixels, pixels_of(sideways, bicubic))
    assert (width, height) == (60, 80)


def test_sixteen_bit_png_keeps_its_tones(tmp_path: Path, bicubic: PreprocessConfig) -> None:
    make_photo((80, 60), mode="I;16").save(tmp_path / "scan16.png")  # grey level g stored as g * 257
    make_photo((80, 60), mode="L").save(tmp_path / "scan8.png")
    with Image.open(tmp_path / "scan16.png") as image:
        assert image.mode.startswith("I") and image.getextrema()[1] > 255
    sixteen, _, _ = load_pixels(tmp_path / "scan16.png", bicubic, DecodeOptions())
    eight, _, _ = load_pixels(tmp_path / "scan8.png", bicubic, DecodeOptions())
    assert np.array_equal(sixteen, eight)  # (g * 257) >> 8 == g
    assert sixteen.min() < 0.5  # not clipped to a white page


def test_sixteen_bit_png_of_eight_bit_tones_keeps_them(tmp_path: Path, cfg: PreprocessConfig, reference) -> None:
    # Values of 255 or less in a 16-bit container (some scanners and converters write them): the high byte made
    # the picture black, where the reference reads the tones as they are.
    grey = make_photo((80, 60), mode="L")
    Image.fromarray(np.asarray(grey).astype(np.uint16)).save(tmp_path / "eight-in-sixteen.png")
    with Image.open(tmp_path / "eight-in-sixteen.png") as image:
        assert image.mode.startswith("I") and image.getextrema()[1] <= 255
        expected = reference(image)
    pixels, _, _ = load_pixels(tmp_path / "eight-in-sixteen.png", cfg, DecodeOptions())
    assert same_bits(pixels, expected) and np.array_equal(pixels, pixels_of(grey, cfg))


def test_sixteen_bit_grey_png_with_a_transparent_level_is_white_where_transparent(
    tmp_path: Path, bicubic: PreprocessConfig
) -> None:
    # A 16-bit PNG's tRNS chunk names one 16-bit grey level as transparent: composited onto white, as the
    # reference does, while the opaque pixels keep their tones (the high byte).
    levels = np.full((60, 80), 40_000, np.uint16)
    levels[:, :40] = 1234
    Image.fromarray(levels).save(tmp_path / "scan16.png", transparency=1234)
    expected = Image.new("L", (80, 60), 40_000 >> 8)
    expected.paste(255, (0, 0, 40, 60))
    pixels, _, _ = load_pixels(tmp_path / "scan16.png", bicubic, DecodeOptions())
    assert np.array_equal(pixels, pixels_of(expected.convert("RGB"), bicubic))


def test_float_image_of_tones_in_0_to_1_is_not_clipped_to_black(tmp_path: Path, bicubic: PreprocessConfig) -> None:
    grey = make_photo((80, 60), mode="L")
    Image.fromarray(np.asarray(grey, np.float32) / 255, mode="F").save(tmp_path / "hdr.tif")  # Photoshop's 32-bit
    grey.save(tmp_path / "scan8.png")
    with Image.open(tmp_path / "hdr.tif") as image:
        assert image.mode == "F"
    floats, _, _ = load_pixels(tmp_path / "hdr.tif", bicubic, DecodeOptions())
    eight, _, _ = load_pixels(tmp_path / "scan8.png", bicubic, DecodeOptions())
    assert np.array_equal(floats, eight)


def test_float_image_with_highlights_past_1_or_odd_pixels_is_scaled_too(tmp_path: Path, bicubic: PreprocessConfig) -> None:
    # One HDR highlight (or one NaN) turned the whole image black.
    grey = np.asarray(make_photo((80, 60), mode="L"), np.float32)
    tones = grey / 255
    tones[:3, :5], tones[10, 10], tones[20, 20], tones[30, 30] = 4.0, np.nan, np.inf, -1e-4  # a lamp, broken pixels
    Image.fromarray(tones, mode="F").save(tmp_path / "hdr.tif")
    expected = grey.copy()
    expected[:3, :5], expected[10, 10], expected[20, 20], expected[30, 30] = 255, 0, 255, 0
    pixels, _, _ = load_pixels(tmp_path / "hdr.tif", bicubic, DecodeOptions())
    assert np.array_equal(pixels, pixels_of(Image.fromarray(expected.astype(np.uint8)).convert("RGB"), bicubic))


def test_float_image_of_other_ranges_converts_as_in_the_reference(tmp_path: Path, bicubic: PreprocessConfig) -> None:
    levels = np.asarray(make_photo((80, 60), mode="L"), np.float32) * 1.5 - 40  # beyond [0, 255] both ways
    Image.fromarray(levels, mode="F").save(tmp_path / "wide.tif")
    pixels, _, _ = load_pixels(tmp_path / "wide.tif", bicubic, DecodeOptions())
    assert np.array_equal(pixels, pixels_of(Image.fromarray(levels, mode="F").convert("RGB"), bicubic))


def test_32_bit_integer_image_of_8_bit_values_is_not_shifted_to_black(tmp_path: Path, bicubic: PreprocessConfig) -> None:
    make_photo((80, 60), mode="L").convert("I").save(tmp_path / "scan32.tif")  # mode I, values 0..255
    make_photo((80, 60), mode="L").save(tmp_path / "scan8.png")
    with Image.open(tmp_path / "scan32.tif") as image:
        assert image.mode == "I"
    wide, _, _ = load_pixels(tmp_path / "scan32.tif", bicubic, DecodeOptions())
    eight, _, _ = load_pixels(tmp_path / "scan8.png", bicubic, DecodeOptions())
    assert np.array_equal(wide, eight)


@pytest.mark.parametrize("where", ["before", "after"])  # read when the file is opened, or when its pixels are
def test_png_with_megabytes_of_compressed_text_decodes_to_its_pixels(
    where: str, tmp_path: Path, bicubic: PreprocessConfig
) -> None:
    from PIL import PngImagePlugin

    photo = make_photo((80, 60))
    photo.save(tmp_path / "plain.png")
    workflow = PngImagePlugin.PngInfo()
    workflow.add_itxt("workflow", '{"nodes": []}' * 200_000, zip=True)  # 2.6 MB, as an image generator writes
    if where == "before":
        photo.save(tmp_path / "generated.png", pnginfo=workflow)
    else:  # an iTXt chunk after the pixels, as some editors append
        photo.save(tmp_path / "generated.png")
        data = (tmp_path / "generated.png").read_bytes()
        chunk = workflow.chunks[0]
        body = chunk[0] + chunk[1]
        end = data.rindex(b"IEND") - 4
        data = data[:end] + struct.pack(">I", len(chunk[1])) + body + struct.pack(">I", zlib.crc32(body)) + data[end:]
        (tmp_path / "generated.png").write_bytes(data)
    with_text, _, _ = load_pixels(tmp_path / "generated.png", bicubic, DecodeOptions())
    plain, _, _ = load_pixels(tmp_path / "plain.png", bicubic, DecodeOptions())
    assert np.array_equal(with_text, plain)


def test_32_bit_integer_image_of_wide_values_is_not_white(tmp_path: Path, bicubic: PreprocessConfig) -> None:
    # A scientific TIFF's 32-bit samples were clipped at 65535: a white picture, embedded without a word.
    grey = np.asarray(make_photo((80, 60), mode="L"))
    Image.fromarray(grey.astype(np.int32) << 23, mode="I").save(tmp_path / "wide.tif")  # 8-bit tones at 31 bits
    make_photo((80, 60), mode="L").save(tmp_path / "scan8.png")
    wide, _, _ = load_pixels(tmp_path / "wide.tif", bicubic, DecodeOptions())
    eight, _, _ = load_pixels(tmp_path / "scan8.png", bicubic, DecodeOptions())
    assert np.array_equal(wide, eight)


@pytest.mark.parametrize("bits", [8, 16, 17], ids=["8-bit tones", "16-bit tones", "17-bit tones"])
def test_32_bit_integer_image_with_a_hot_pixel_keeps_its_tones(bits: int) -> None:
    # Scaled by its brightest pixel, one hot pixel (or a no-data value) at 2**31 - 1 sent the rest to black.
    grey = np.asarray(make_photo((80, 60), mode="L")).astype(np.int64)
    values = grey << (bits - 8)
    values[0, 0] = 2**31 - 1
    converted = np.asarray(to_rgb(Image.fromarray(values.astype(np.int32), mode="I")))[..., 0].astype(np.int64)
    assert converted[0, 0] == 255 and np.array_equal(converted.ravel()[1:], grey.ravel()[1:])


def test_animated_gif_uses_its_first_frame(tmp_path: Path, bicubic: PreprocessConfig) -> None:
    first, second = (make_photo((80, 60), seed=s).quantize(64) for s in (0, 1))
    path = save_animated_gif(tmp_path / "clip.gif", [first, second])
    pixels, _, _ = load_pixels(path, bicubic, DecodeOptions())
    assert np.array_equal(pixels, pixels_of(first, bicubic))
    assert not np.array_equal(pixels, pixels_of(second, bicubic))


@pytest.mark.parametrize("suffix", ["heic", "avif"])
def test_phone_and_web_formats_decode_to_the_photo(tmp_path: Path, bicubic: PreprocessConfig, suffix: str) -> None:
    # HEIC through pillow-heif (registered by siglip_cli.preprocess), AVIF through Pillow itself. Both lossy.
    original = make_photo((80, 60))
    path = tmp_path / f"IMG_0001.{suffix}"
    original.save(path, quality=90)
    with Image.open(path) as stored:
        decoded = stored.convert("RGB")
    pixels, width, height = load_pixels(path, bicubic, DecodeOptions())
    assert np.array_equal(pixels, pixels_of(decoded, bicubic))
    assert np.abs(pixels - pixels_of(original, bicubic)).mean() < 0.05  # codec loss only
    assert (width, height) == (80, 60)


@pytest.mark.parametrize(
    "suffix, reason",
    [("heic", r"^image file is truncated \(libheif: .+\)$"),  # not "ValueError: Invalid input: Unexpected end of ..."
     ("webp", r"^could not create decoder object \(libwebp cannot read it: a damaged or truncated WebP\?\)$")],
)  # fmt: skip
def test_a_truncated_heic_or_webp_fails_in_plain_words(
    tmp_path: Path, bicubic: PreprocessConfig, suffix: str, reason: str
) -> None:
    from siglip_cli.preprocess import bad_file_reason

    path = tmp_path / f"half.{suffix}"
    make_photo((80, 60)).save(path, quality=90)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # a copy cut short
    with pytest.raises(Exception) as raised:
        load_pixels(path, bicubic, DecodeOptions())
    assert re.match(reason, bad_file_reason(raised.value))


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")  # Pillow's, of the TIFF cut inside its tags
@pytest.mark.parametrize("suffix", ["jpg", "png", "gif", "tif", "webp", "heic", "avif", "jp2"])
def test_a_file_cut_short_in_its_header_is_said_to_be_of_its_format(
    tmp_path: Path, bicubic: PreprocessConfig, suffix: str
) -> None:
    # Pillow cannot open what is left, and said "cannot identify image file (not an image ...)" of a half-synced
    # phone photo. (Some keep enough of a header to fail later, as truncated: either says what happened.)
    from siglip_cli.preprocess import bad_file_reason

    path = tmp_path / f"cut.{suffix}"
    make_photo((80, 60)).save(path)
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(Exception) as raised:
        load_pixels(path, bicubic, DecodeOptions())
    reason = bad_file_reason(raised.value)
    assert reason.endswith("header is damaged or cut short: it cannot be opened") or "truncated" in reason, reason
    assert "not an image" not in reason


def _float_rgb_tiff(width: int, height: int) -> bytes:
    """An uncompressed TIFF of float32 RGB pixels (a Photoshop 32-bit or HDR export): valid, and not for Pillow."""
    pixels = np.random.default_rng(0).random((height, width, 3), dtype=np.float32).tobytes()
    short, long = 3, 4
    count = 11
    bits_at = 8 + 2 + 12 * count + 4  # after the header and the one directory
    formats_at, pixels_at = bits_at + 6, bits_at + 12
    entries = [  # (tag, type, count, value: in place, or where its values are)
        (256, long, 1, width), (257, long, 1, height), (258, short, 3, bits_at), (259, short, 1, 1),
        (262, short, 1, 2), (273, long, 1, pixels_at), (277, short, 1, 3), (278, long, 1, height),
        (279, long, 1, len(pixels)), (284, short, 1, 1), (339, short, 3, formats_at),
    ]  # fmt: skip
    directory = struct.pack("<H", count)
    for tag, kind, n, value in entries:
        in_place = struct.pack("<HH", value, 0) if kind == short and n == 1 else struct.pack("<I", value)
        directory += struct.pack("<HHI", tag, kind, n) + in_place
    directory += struct.pack("<I", 0)  # no next directory
    values = struct.pack("<3H", 32, 32, 32) + struct.pack("<3H", 3, 3, 3)  # 32 bits a sample; IEEE floats
    return b"II*\x00" + struct.pack("<I", 8) + directory + values + pixels


def _twelve_bit_jpeg() -> bytes:
    """A JPEG whose frame header says 12 bits a sample (medical and some camera exports)."""
    buffer = io.BytesIO()
    make_photo((40, 30)).save(buffer, format="JPEG")
    data = bytearray(buffer.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 4] = 12  # the precision byte, after the marker and the segment's length
    return bytes(data)


@pytest.mark.filterwarnings("ignore:Truncated File Read")  # Pillow's, of the TIFF cut inside its tags
@pytest.mark.parametrize(
    ("name", "make", "reason"),
    [
        (
            "hdr.tif",
            lambda: _float_rgb_tiff(12, 8),
            r"it is a TIFF of a kind Pillow cannot read \(unknown pixel mode\)",
        ),
        ("scan.jpg", _twelve_bit_jpeg, r"it is a JPEG of a kind Pillow cannot read \(cannot handle 12-bit layers\)"),
        # Cut inside its header (its bits per sample gone), it fails as the same kind: it is called what it is.
        (
            "cut.tif",
            lambda: _float_rgb_tiff(12, 8)[:150],
            r"its TIFF header is damaged or cut short: it cannot be opened",
        ),
    ],
)
def test_a_whole_file_of_a_kind_pillow_cannot_read_is_not_called_damaged(
    tmp_path: Path, bicubic: PreprocessConfig, name: str, make: Callable[[], bytes], reason: str
) -> None:
    # Whole files were "its TIFF (JPEG) header is damaged or cut short", which had their owners look for a backup.
    path = tmp_path / name
    path.write_bytes(make())
    for source in (path, io.BytesIO(path.read_bytes())):  # as inspect reads it, and as embed does
        with pytest.raises(BadImage, match=f"^{reason}$"):
            load_pixels(source, bicubic, DecodeOptions())


def test_damaged_tiff_and_jpeg_cut_between_blocks_fail_in_plain_words(tmp_path: Path, bicubic: PreprocessConfig) -> None:
    # Pillow said "decoder error -2" of a damaged LZW TIFF, and "(0 bytes not processed)" of a JPEG cut short
    # between two of libjpeg's blocks, which read as if nothing were wrong.
    from siglip_cli.preprocess import bad_file_reason

    make_photo((64, 64)).save(tmp_path / "scan.tif", compression="tiff_lzw")
    with Image.open(tmp_path / "scan.tif") as scan:
        (start,), (length,) = scan.tag_v2[273], scan.tag_v2[279]  # StripOffsets, StripByteCounts
    data = bytearray((tmp_path / "scan.tif").read_bytes())
    for offset in range(start + length // 4, start + length // 2, 7):  # the pixels' LZW stream, not the header
        data[offset] ^= 0xFF
    (tmp_path / "scan.tif").write_bytes(data)
    with pytest.raises(OSError) as raised:
        load_pixels(tmp_path / "scan.tif", bicubic, DecodeOptions())
    assert bad_file_reason(raised.value) == "decoder error -2 (broken data stream: the image data is damaged)"

    make_photo((64, 64)).save(tmp_path / "full.jpg", quality=90)
    data = (tmp_path / "full.jpg").read_bytes()
    reasons = set()
    for end in range(len(data) // 4, len(data) - 2):
        (tmp_path / "cut.jpg").write_bytes(data[:end])
        with pytest.raises(Exception) as raised:  # cut in its header, a file no longer known as a JPEG
            load_pixels(tmp_path / "cut.jpg", bicubic, DecodeOptions())
        if "(0 bytes not processed)" in str(raised.value):
            reasons.add(bad_file_reason(raised.value))
    assert reasons == {"image file is truncated"}  # met at least once, and said plainly
    (tmp_path / "cut.jpg").write_bytes(data[:100])  # in its header: Pillow said "Truncated File Read"
    with pytest.raises(OSError) as raised:
        load_pixels(tmp_path / "cut.jpg", bicubic, DecodeOptions())
    assert bad_file_reason(raised.value) == "image file is truncated"


def test_running_out_of_memory_on_a_file_is_said_in_words() -> None:
    # Under `ulimit -v`, --max-pixels 0 and a huge image: the errors row said "MemoryError:".
    from siglip_cli.preprocess import bad_file_reason

    assert bad_file_reason(MemoryError()) == "not enough memory to decode it"
    assert bad_file_reason(MemoryError("100000×100000")) == "not enough memory to decode it (100000×100000)"


def test_rotated_heic_is_turned_upright_once(tmp_path: Path, bicubic: PreprocessConfig) -> None:
    # An iPhone portrait: pixels on their side, an `irot` rotation and EXIF orientation 6 (pillow-heif writes
    # both from EXIF bytes). libheif applies `irot` while decoding and pillow-heif resets the EXIF tag, so
    # exif_transpose must not turn the photo a second time. (HEIF's own transforms are authoritative: a file
    # with an EXIF tag but no `irot` is shown as stored, as libheif and ImageMagick show it.)
    original = make_photo((80, 60))
    exif = Image.Exif()
    exif[0x0112] = 6
    original.rotate(90, expand=True).save(tmp_path / "portrait.heic", quality=90, exif=exif.tobytes())
    pixels, width, height = load_pixels(tmp_path / "portrait.heic", bicubic, DecodeOptions())
    assert (width, height) == (80, 60)
    close = np.abs(pixels - pixels_of(original, bicubic)).mean()
    other_way = np.abs(pixels - pixels_of(original.rotate(180), bicubic)).mean()
    assert close < 0.05 < other_way


def test_pixel_limit_is_checked_from_the_header_before_decoding(tmp_path: Path, bicubic: PreprocessConfig) -> None:
    path = save_png_claiming_size(tmp_path / "bomb.png", 5_000, 5_000)
    with pytest.raises(BadImage, match=r"5000×5000 = 25,000,000 pixels exceeds the limit of 1,000,000") as error:
        load_pixels(path, bicubic, DecodeOptions(max_pixels=1_000_000))
    assert "decompression bomb" in str(error.value) and "--max-pixels" in str(error.value)


def test_image_at_the_pixel_limit_is_decoded(tmp_path: Path, bicubic: PreprocessConfig) -> None:
    make_photo((80, 60)).save(tmp_path / "photo.png")
    pixels, _, _ = load_pixels(tmp_path / "photo.png", bicubic, DecodeOptions(max_pixels=80 * 60))
    assert pixels.shape == (3, 32, 32)


@pytest.mark.parametrize("compression", [None, "tiff_lzw", "tiff_adobe_deflate"])
def test_a_tiff_past_pillows_own_limit_decodes_within_max_pixels(
    tmp_path: Path, bicubic: PreprocessConfig, monkeypatch: pytest.MonkeyPatch, compression: str | None
) -> None:
    # Pillow checks a TIFF's size again as its strips load, after the header is read: a scan of over 179 MP was
    # refused ("DecompressionBombError") whatever --max-pixels allowed. Here Pillow's limit is lowered to 1,000
    # pixels, which it enforces past twice that: the 50x50 scan stands for the large one.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    make_photo((50, 50)).save(tmp_path / "scan.tif", compression=compression)
    pixels, width, height = load_pixels(tmp_path / "scan.tif", bicubic, DecodeOptions(max_pixels=None))
    assert (width, height) == (50, 50) and pixels.shape == (3, 32, 32)
    assert Image.MAX_IMAGE_PIXELS == 1000  # Pillow's guard is back for everyone else


def test_an_icns_holding_a_picture_larger_than_its_header_is_refused_before_decoding(
    tmp_path: Path, bicubic: PreprocessConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Its header (type ic07) says 128x128, within --max-pixels; its PNG is 300x300. Pillow's guard refuses that PNG
    # before decoding it, and must stay on while an ICNS loads: off, a few MB of file made gigabytes of pixels.
    # Pillow's limit is lowered to 10,000 pixels here, so that a 300x300 PNG stands for the large one.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)
    png = io.BytesIO()
    Image.new("1", (300, 300)).save(png, "PNG")
    icon = b"ic07" + struct.pack(">I", 8 + len(png.getvalue())) + png.getvalue()
    (tmp_path / "icon.icns").write_bytes(b"icns" + struct.pack(">I", 8 + len(icon)) + icon)
    with pytest.raises(Image.DecompressionBombError, match="90000 pixels"):
        load_pixels(tmp_path / "icon.icns", bicubic, DecodeOptions())


def test_truncated_jpeg_is_an_error_not_a_grey_picture(tmp_path: Path, bicubic: PreprocessConfig) -> None:
    make_photo((200, 150)).save(tmp_path / "full.jpg", quality=95)
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(OSError, match="truncated"):
        load_pixels(tmp_path / "cut.jpg", bicubic, DecodeOptions())


def test_unreadable_file_gives_the_same_reason_every_time(bicubic: PreprocessConfig) -> None:
    reasons = set()
    for _ in range(2):  # embed decodes from an in-memory copy of the file: its repr must not leak into the reason
        with pytest.raises(BadImage, match="cannot identify image file") as error:
            load_pixels(io.BytesIO(b"shopping list: milk, eggs"), bicubic, DecodeOptions())
        reasons.add(str(error.value))
    assert len(reasons) == 1 and "0x" not in reasons.pop()


def test_wrong_size_without_resize_is_refused() -> None:
    fixed = PreprocessConfig(height=32, width=32, do_resize=False)
    with pytest.raises(BadImage, match="image is 80×60 but the model needs 32×32"):
        pixel_values(make_photo((80, 60)), fixed)


@pytest.mark.parametrize("missing", ["HEIF", "AVIF"])
def test_a_missing_optional_plugin_costs_only_its_own_format(missing: str, tmp_path: Path, monkeypatch) -> None:
    # Without pillow-heif, or with a Pillow older than 11.2 (no AVIF), every GIF, BMP and TIFF failed with KeyError.
    Image.init()
    monkeypatch.delitem(Image.OPEN, missing)
    for suffix in ("gif", "bmp", "tiff", "png"):
        make_photo((40, 30)).save(tmp_path / f"photo.{suffix}")
        assert load_pixels(tmp_path / f"photo.{suffix}", PreprocessConfig(16, 16), DecodeOptions())[0].shape == (3, 16, 16)
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(BadImage, match="cannot identify image file"):
        load_pixels(tmp_path / "notes.txt", PreprocessConfig(16, 16), DecodeOptions())
