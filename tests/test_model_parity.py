"""Parity with transformers: our tower (and the whole image → embedding path) computes what `SiglipVisionModel`
computes, for every checkpoint shape and layout we support.

Reference: `reference_vision_model(dir)` (float32, eager attention). Pooled output is transformers'
`pooler_output`; headless towers (PaliGemma) have none, and ours is the mean of the patch tokens.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from typer.testing import CliRunner

from conftest import TINY_CHECKPOINTS, build_checkpoint, make_photo, reference_composites, reference_vision_model
from siglip_cli import runtime
from siglip_cli.checkpoints import resolve_checkpoint
from siglip_cli.cli import app
from siglip_cli.config import ACTIVATIONS
from siglip_cli.embed import embed_paths, load
from siglip_cli.kernels import OneDnnLinear
from siglip_cli.runtime import cpu_has_native_bf16
from siglip_cli.weights import load_model

TOLERANCE = 1e-5  # float32, max |Δ|
BF16_COSINE = 0.999

CHECKPOINTS = TINY_CHECKPOINTS
HEADLESS = [name for name in CHECKPOINTS if "paligemma" in name]
HEADED = [name for name in CHECKPOINTS if name not in HEADLESS]


def random_pixels(checkpoint: Path, batch: int = 3) -> torch.Tensor:
    size = resolve_checkpoint(str(checkpoint)).vision.image_size
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))


def reference_outputs(checkpoint: Path, pixels: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
    with torch.no_grad():
        out = _reference_model(checkpoint)(pixel_values=pixels)
    return out.pooler_output, out.last_hidden_state


@functools.cache
def _reference_model(checkpoint: Path):
    return reference_vision_model(checkpoint)  # loading is the slow part; fixtures never change a checkpoint


def our_outputs(checkpoint: Path, pixels: torch.Tensor, *, fused: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """`fused`: the model as `siglip embed` runs it (q/k/v fused); otherwise as loaded."""
    if fused:
        return load(str(checkpoint), device="cpu", dtype="float32")(pixels)
    with torch.no_grad():
        return load_model(resolve_checkpoint(str(checkpoint)))(pixels)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a.float() - b.float()).abs().max().item()


@pytest.fixture(params=list(CHECKPOINTS))
def any_checkpoint(request: pytest.FixtureRequest) -> Path:
    return request.getfixturevalue(request.param)


@pytest.fixture(params=HEADED)
def headed_checkpoint(request: pytest.FixtureRequest) -> Path:
    return request.getfixturevalue(request.param)


@pytest.fixture(params=HEADLESS)
def headless_checkpoint(request: pytest.FixtureRequest) -> Path:
    return request.getfixturevalue(request.param)


# ------------------------------------------------------------------------------------------ the tower


@pytest.mark.parametrize("fused", [False, True], ids=["as-loaded", "fused-qkv"])
def test_patch_tokens_match_transformers(any_checkpoint: Path, fused: bool) -> None:
    pixels = random_pixels(any_checkpoint)
    _, expected = reference_outputs(any_checkpoint, pixels)
    _, tokens = our_outputs(any_checkpoint, pixels, fused=fused)
    assert max_diff(tokens, expected) <= TOLERANCE


@pytest.mark.parametrize("fused", [False, True], ids=["as-loaded", "fused-qkv"])
def test_pooled_output_matches_transformers_pooler_output(headed_checkpoint: Path, fused: bool) -> None:
    pixels = random_pixels(headed_checkpoint)
    expected, _ = reference_outputs(headed_checkpoint, pixels)
    pooled, _ = our_outputs(headed_checkpoint, pixels, fused=fused)
    assert max_diff(pooled, expected) <= TOLERANCE


@pytest.mark.parametrize("onednn", [False, True], ids=["nn-linear", "onednn"])
def test_either_cpu_gemm_path_matches_transformers(
    any_checkpoint: Path, onednn: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `siglip embed` takes oneDNN's GEMMs in float32 on CPUs with AVX-512 (`runtime.cpu_prefers_onednn`); either
    # path is held to transformers on every machine.
    monkeypatch.setattr(runtime, "cpu_prefers_onednn", lambda dtype: onednn)
    pixels = random_pixels(any_checkpoint)
    expected_pooled, expected_tokens = reference_outputs(any_checkpoint, pixels)
    embedder = load(str(any_checkpoint), device="cpu", dtype="float32")
    assert isinstance(embedder.model.encoder.layers[0].mlp.fc2, OneDnnLinear) == onednn
    pooled, tokens = embedder(pixels)
    assert max_diff(tokens, expected_tokens) <= TOLERANCE
    expected = expected_tokens.mean(dim=1) if expected_pooled is None else expected_pooled
    assert max_diff(pooled, expected) <= TOLERANCE


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_every_activation_name_runs_as_transformers_runs_it(tmp_path: Path, activation: str) -> None:
    checkpoint = build_checkpoint(tmp_path, layout="vision")
    config = json.loads((checkpoint / "config.json").read_text())
    (checkpoint / "config.json").write_text(json.dumps({**config, "hidden_act": activation}))
    pixels = random_pixels(checkpoint)
    expected_pooled, expected_tokens = reference_outputs(checkpoint, pixels)
    pooled, tokens = our_outputs(checkpoint, pixels, fused=True)
    assert max_diff(pooled, expected_pooled) <= TOLERANCE and max_diff(tokens, expected_tokens) <= TOLERANCE


def test_headless_pooled_output_is_the_mean_of_the_patch_tokens(headless_checkpoint: Path) -> None:
    pixels = random_pixels(headless_checkpoint)
    pooler_output, expected_tokens = reference_outputs(headless_checkpoint, pixels)
    assert pooler_output is None  # transformers has no pooled output for these towers
    pooled, _ = our_outputs(headless_checkpoint, pixels, fused=True)
    assert max_diff(pooled, expected_tokens.mean(dim=1)) <= TOLERANCE


def test_one_image_alone_gives_the_same_numbers_as_in_a_batch(tiny_siglip: Path) -> None:
    pixels = random_pixels(tiny_siglip)
    embedder = load(str(tiny_siglip), device="cpu", dtype="float32")
    batched, _ = embedder(pixels)
    alone, _ = embedder(pixels[1:2])
    assert max_diff(alone[0], batched[1]) <= TOLERANCE


@pytest.fixture(scope="module")
def odd_tower(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """49 patches of 37 MLP values: an image's activations fill no whole vector of any width."""
    return build_checkpoint(tmp_path_factory.mktemp("odd_tower"), image_size=56, patch_size=8, intermediate_size=37)


@pytest.mark.parametrize("onednn", [False, True], ids=["nn-linear", "onednn"])
@pytest.mark.parametrize("batch", [2, 3, 5, 7, 9, 12, 17, 64])
def test_copies_of_one_image_in_a_batch_get_the_same_bits(
    odd_tower: Path, batch: int, onednn: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Deduplication by exact match. The pooling head's SDPA split its lone query's work across threads by batch
    # row (copies 1e-7 apart at 64); a GEMM over the head's B rows computes its last, partial block of rows with
    # another kernel (copies apart at 5, 7, 9); the MLP's GELU over a batch computes its last, partial vector, and
    # each thread's, with scalar code (apart at 3, 5, 7 on AVX-512). Both CPU GEMM paths.
    monkeypatch.setattr(runtime, "cpu_prefers_onednn", lambda dtype: onednn)
    embedder = load(str(odd_tower), device="cpu", dtype="float32")
    copies = random_pixels(odd_tower, batch=1).expand(batch, -1, -1, -1).contiguous()
    pooled, tokens = embedder(copies)
    assert (tokens == tokens[0]).all() and (pooled == pooled[0]).all()
    alone, _ = embedder(copies[:1])
    assert (alone == pooled[0]).all()


@pytest.mark.skipif(not cpu_has_native_bf16(), reason="bfloat16 is emulated on this CPU (no AVX512-BF16 or AMX)")
@pytest.mark.parametrize("batch", [3, 5, 7, 17])
def test_copies_of_one_image_get_the_same_bits_in_bfloat16_too(odd_tower: Path, batch: int) -> None:
    # On such CPUs bfloat16 runs fc1 + GELU as one oneDNN GEMM (`kernels.fc1_gelu`).
    embedder = load(str(odd_tower), device="cpu", dtype="bfloat16")
    copies = random_pixels(odd_tower, batch=1).expand(batch, -1, -1, -1).contiguous()
    pooled, tokens = embedder(copies)
    assert (tokens == tokens[0]).all() and (pooled == pooled[0]).all()


@pytest.mark.parametrize("use_head", [True, False])
def test_paligemma_config_silent_on_the_head_follows_the_weights(tmp_path: Path, use_head: bool) -> None:
    # transformers gives a tower whose vision_config does not say `vision_use_head` a head (the default, and
    # save_pretrained leaves a default out): with head tensors in the weights, its pooled output is theirs.
    checkpoint = build_checkpoint(tmp_path / "checkpoint", layout="paligemma", use_head=use_head)
    config = json.loads((checkpoint / "config.json").read_text())
    del config["vision_config"]["vision_use_head"]
    (checkpoint / "config.json").write_text(json.dumps(config))
    assert resolve_checkpoint(str(checkpoint)).vision.vision_use_head is use_head
    if use_head:
        pixels = random_pixels(checkpoint)
        expected, _ = reference_outputs(checkpoint, pixels)
        pooled, _ = our_outputs(checkpoint, pixels, fused=True)
        assert max_diff(pooled, expected) <= TOLERANCE


def test_bfloat16_embedding_keeps_cosine_to_float32_reference(any_checkpoint: Path) -> None:
    pixels = random_pixels(any_checkpoint)
    expected, expected_tokens = reference_outputs(any_checkpoint, pixels)
    if expected is None:
        expected = expected_tokens.mean(dim=1)
    pooled, _ = load(str(any_checkpoint), device="cpu", dtype="bfloat16")(pixels)
    assert F.cosine_similarity(pooled, expected, dim=-1).min() >= BF16_COSINE


# ------------------------------------------------------------------------------ image file → embedding


def reference_from_photos(checkpoint: Path, photos: list[Path]) -> tuple[torch.Tensor, torch.Tensor]:
    """The transformers pipeline end to end: PIL processor, then the model (pooled, tokens)."""
    from PIL import Image
    from transformers import SiglipImageProcessorPil

    # PaliGemma repos say `do_convert_rgb: null`, which makes transformers choke on RGBA; we always convert.
    processor = SiglipImageProcessorPil.from_pretrained(checkpoint, do_convert_rgb=True)
    pixels = processor(images=[Image.open(p) for p in photos], return_tensors="pt")["pixel_values"]
    pooled, tokens = reference_outputs(checkpoint, pixels)
    return (tokens.mean(dim=1) if pooled is None else pooled), tokens


@pytest.fixture
def photos(tmp_path: Path) -> list[Path]:
    folder = tmp_path / "photos"
    folder.mkdir()
    sizes = [(80, 60), (45, 70), (20, 20)]
    for i, size in enumerate(sizes):
        make_photo(size, seed=i).save(folder / f"photo{i}.png")
    transparent = make_photo((64, 48), mode="RGBA", seed=3)
    if reference_composites(transparent):  # transformers >= 5.21; 5.20 (Python 3.10) drops transparency
        transparent.save(folder / "photo3.png")
    return sorted(folder.iterdir())


@pytest.mark.parametrize("name", ["tiny_siglip", "tiny_siglip2", "tiny_p14", "tiny_odd_heads", "tiny_paligemma"])
def test_photos_embed_like_the_transformers_pipeline(
    name: str, photos: list[Path], request: pytest.FixtureRequest
) -> None:
    checkpoint = request.getfixturevalue(name)
    expected_pooled, expected_tokens = reference_from_photos(checkpoint, photos)
    embedder = load(str(checkpoint), device="cpu", dtype="float32")
    result = embed_paths(embedder, photos, normalize=False, tokens=True)
    assert [row["path"] for row in result.rows] == [str(p) for p in photos]
    assert max_diff(torch.from_numpy(result.embeddings), expected_pooled) <= TOLERANCE
    assert max_diff(torch.from_numpy(result.tokens), expected_tokens) <= TOLERANCE


@pytest.mark.parametrize(
    "settings",
    [
        {"do_resize": False, "size": {"height": 224, "width": 224}},  # a leftover size, ignored without resizing
        {"do_rescale": None},  # null: the processor skips the step
        {"do_normalize": None},
        {"do_resize": None},  # the 32-pixel photos then go in as they are
    ],
    ids=["no-resize-leftover-size", "rescale-null", "normalize-null", "resize-null"],
)
def test_preprocessor_settings_read_as_transformers_reads_them(tmp_path: Path, settings: dict) -> None:
    checkpoint = build_checkpoint(tmp_path / "checkpoint", layout="vision")  # a 32-pixel tower
    processor = json.loads((checkpoint / "preprocessor_config.json").read_text())
    (checkpoint / "preprocessor_config.json").write_text(json.dumps({**processor, **settings}))
    photos = []
    for i in range(2):
        make_photo((32, 32), seed=i).save(tmp_path / f"photo{i}.png")
        photos.append(tmp_path / f"photo{i}.png")
    expected_pooled, expected_tokens = reference_from_photos(checkpoint, photos)
    result = embed_paths(load(str(checkpoint), device="cpu", dtype="float32"), photos, normalize=False, tokens=True)
    assert result.errors == []
    assert max_diff(torch.from_numpy(result.embeddings), expected_pooled) <= TOLERANCE
    assert max_diff(torch.from_numpy(result.tokens), expected_tokens) <= TOLERANCE


def assert_pooled_like_transformers(checkpoint: Path, photos: list[Path]) -> None:
    expected_pooled, _ = reference_from_photos(checkpoint, photos)
    result = embed_paths(load(str(checkpoint), device="cpu", dtype="float32"), photos, normalize=False)
    assert max_diff(torch.from_numpy(result.embeddings), expected_pooled) <= TOLERANCE


def test_processor_config_alone_is_read_as_transformers_reads_it(
    tiny_siglip2: Path, photos: list[Path], tmp_path: Path
) -> None:
    # transformers 5's SiglipProcessor.save_pretrained writes the image settings into processor_config.json
    # and no preprocessor_config.json: bilinear here, where the defaults would resize bicubic.
    import json
    import shutil

    checkpoint = tmp_path / "fine-tuned"
    shutil.copytree(tiny_siglip2, checkpoint)
    settings = json.loads((checkpoint / "preprocessor_config.json").read_text())
    (checkpoint / "preprocessor_config.json").unlink()
    (checkpoint / "processor_config.json").write_text(json.dumps({"image_processor": settings, "processor_class": "SiglipProcessor"}))
    assert resolve_checkpoint(str(checkpoint)).preprocess.resample == settings["resample"] == 2
    assert_pooled_like_transformers(checkpoint, photos)


def test_processor_config_comes_before_preprocessor_config_as_in_transformers(
    tiny_siglip2: Path, photos: list[Path], tmp_path: Path
) -> None:
    # A downloaded folder saved over by SiglipProcessor.save_pretrained keeps the old preprocessor_config.json
    # beside the new processor_config.json. transformers reads the new one; we read the old one, silently (cosine
    # 0.92 on a photo when the two disagree).
    import json
    import shutil

    checkpoint = tmp_path / "saved-over"
    shutil.copytree(tiny_siglip2, checkpoint)
    settings = json.loads((checkpoint / "preprocessor_config.json").read_text())
    changed = {**settings, "resample": 3, "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}
    (checkpoint / "processor_config.json").write_text(json.dumps({"image_processor": changed, "processor_class": "SiglipProcessor"}))
    assert resolve_checkpoint(str(checkpoint)).preprocess.resample == 3
    assert_pooled_like_transformers(checkpoint, photos)


def test_a_fine_tune_with_a_clip_style_processor_embeds_as_transformers_runs_it(
    tiny_siglip: Path, photos: list[Path], tmp_path: Path
) -> None:
    # Shorter side to 36, then the middle 32×32: the pixels are test_preprocess's; this is the whole way through.
    import shutil

    from transformers import SiglipImageProcessorPil

    checkpoint = Path(shutil.copytree(tiny_siglip, tmp_path / "fine-tuned"))
    crop = dict(size={"shortest_edge": 36}, do_center_crop=True, crop_size={"height": 32, "width": 32}, resample=3)
    SiglipImageProcessorPil(**crop).save_pretrained(checkpoint)
    assert resolve_checkpoint(str(checkpoint)).preprocess.shortest_edge == 36
    assert_pooled_like_transformers(checkpoint, photos)


@pytest.mark.parametrize(
    ("name", "processor"),
    [
        ("tiny_siglip", dict(size={"height": 35, "width": 35})),  # 32 px at patch 8: a 4x4 grid both
        ("tiny_p14", dict(size={"height": 42, "width": 55})),  # 44 px at patch 14: 3x3, from less and more
        ("tiny_siglip", dict(size={"shortest_edge": 40}, do_center_crop=True, crop_size={"height": 39, "width": 33})),
    ],
    ids=["larger", "smaller-and-larger", "cropped"],
)
def test_a_processor_size_that_gives_the_towers_patch_grid_embeds_as_transformers_runs_it(
    name: str, processor: dict, photos: list[Path], tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    # The patch conv drops what lies past the last whole patch, so transformers runs an input of another size
    # than image_size as long as its grid is the tower's; we used to refuse the checkpoint.
    import shutil

    from transformers import SiglipImageProcessorPil

    checkpoint = Path(shutil.copytree(request.getfixturevalue(name), tmp_path / "resized"))
    SiglipImageProcessorPil(resample=3, **processor).save_pretrained(checkpoint)
    expected_pooled, expected_tokens = reference_from_photos(checkpoint, photos)
    result = embed_paths(load(str(checkpoint), device="cpu", dtype="float32"), photos, normalize=False, tokens=True)
    assert result.errors == []
    assert max_diff(torch.from_numpy(result.embeddings), expected_pooled) <= TOLERANCE
    assert max_diff(torch.from_numpy(result.tokens), expected_tokens) <= TOLERANCE


@pytest.mark.parametrize(
    "size",
    [32, {"shortest_edge": 32}, {"shortest_edge": 32, "longest_edge": 64}],
    ids=["one-number", "shortest", "capped"],
)
def test_a_shortest_edge_without_a_crop_embeds_as_transformers_runs_it(
    size: int | dict, tiny_siglip: Path, tmp_path: Path
) -> None:
    # What `SiglipImageProcessor(size=32)` saves: transformers keeps the aspect, and runs the photos whose whole
    # patches then number the tower's 16 (its patch conv drops the 33rd column; under a longest edge of 64, a 1:4
    # photo is 2x8 patches). We refused the checkpoint, and read the one number as the tower's square: cosine 0.74 to
    # transformers on such photos. One with other patches, which transformers fails on, is squashed, as SigLIP's own
    # processor resizes.
    import shutil

    checkpoint = Path(shutil.copytree(tiny_siglip, tmp_path / "shortest-edge"))
    config = checkpoint / "preprocessor_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "size": size}))
    squashing = Path(shutil.copytree(tiny_siglip, tmp_path / "squashing"))  # its size is {"height": 32, "width": 32}
    folder = tmp_path / "photos"
    folder.mkdir()
    capped = isinstance(size, dict) and "longest_edge" in size
    for i, dims in enumerate([(84, 80), (35, 37), (50, 50), *([(16, 64), (130, 40)] if capped else []), (80, 60)]):
        make_photo(dims, seed=i).save(folder / f"photo{i}.png")
    *running, failing = sorted(folder.iterdir())  # the last, (80, 60), resizes to 42x32: 4x5 patches
    with pytest.raises(RuntimeError):  # the position embedding: 20 patches against 16
        reference_from_photos(checkpoint, [failing])
    expected = [reference_from_photos(checkpoint, [photo]) for photo in running]  # sizes differ: one at a time
    expected.append(reference_from_photos(squashing, [failing]))
    result = embed_paths(load(str(checkpoint), device="cpu", dtype="float32"), [folder], normalize=False, tokens=True)
    assert result.errors == []
    assert max_diff(torch.from_numpy(result.embeddings), torch.cat([pooled for pooled, _ in expected])) <= TOLERANCE
    assert max_diff(torch.from_numpy(result.tokens), torch.cat([tokens for _, tokens in expected])) <= TOLERANCE


def test_cli_no_normalize_output_is_transformers_pooler_output(
    tiny_siglip: Path, photos: list[Path], tmp_path: Path
) -> None:
    output = tmp_path / "embeddings.safetensors"
    args = [
        "embed",
        str(photos[0].parent),
        "-o",
        str(output),
        "--model",
        str(tiny_siglip),
        "--workers",
        "0",
        "--no-normalize",
        "--tokens",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    expected_pooled, expected_tokens = reference_from_photos(tiny_siglip, photos)
    with safe_open(output, "pt") as f:
        assert max_diff(f.get_tensor("embeddings"), expected_pooled) <= TOLERANCE
        assert max_diff(f.get_tensor("tokens"), expected_tokens) <= TOLERANCE


def test_cli_default_output_is_the_normalized_pooler_output(
    tiny_siglip: Path, photos: list[Path], tmp_path: Path
) -> None:
    output = tmp_path / "embeddings.npy"
    args = ["embed", str(photos[0].parent), "-o", str(output), "--model", str(tiny_siglip), "--workers", "0"]
    assert CliRunner().invoke(app, args).exit_code == 0
    expected_pooled, _ = reference_from_photos(tiny_siglip, photos)
    assert max_diff(torch.from_numpy(np.load(output)), F.normalize(expected_pooled, dim=-1)) <= TOLERANCE
