"""The fixtures in conftest.py build what they claim: right files, key names, shapes, caches."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from safetensors import safe_open

from conftest import (
    CONFIG_NAME,
    DEFAULT_REPO_ID,
    DEFAULT_REVISION,
    INDEX_NAME,
    PREPROCESSOR_NAME,
    TINY_CHECKPOINTS,
    WEIGHTS_NAME,
    HubCache,
    build_checkpoint,
    checkpoint_files,
    load_all_tensors,
    make_photo,
    reference_vision_model,
)

CHECKPOINTS = list(TINY_CHECKPOINTS)
PALIGEMMA = [name for name in CHECKPOINTS if "paligemma" in name]

# Where the tower's patch-embedding weight lives in each layout.
PATCH_KEY = {
    "tiny_siglip": "vision_model.embeddings.patch_embedding.weight",
    "tiny_vision": "embeddings.patch_embedding.weight",
    "tiny_vision_legacy": "vision_model.embeddings.patch_embedding.weight",
    "tiny_paligemma": "vision_tower.vision_model.embeddings.patch_embedding.weight",
    "tiny_paligemma_new_layout": "model.vision_tower.vision_model.embeddings.patch_embedding.weight",
    "tiny_paligemma_v5_layout": "vision_tower.embeddings.patch_embedding.weight",
}


def _config(path: Path) -> dict:
    return json.loads((path / CONFIG_NAME).read_text())


def _vision_config(path: Path) -> dict:
    config = _config(path)
    return config.get("vision_config", config)


def _weight_map(path: Path) -> dict[str, str]:
    return json.loads((path / INDEX_NAME).read_text())["weight_map"]


def _is_vision_key(key: str) -> bool:
    return "vision_model." in key or "vision_tower." in key


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_checkpoint_has_hub_files(name: str, request: pytest.FixtureRequest) -> None:
    path: Path = request.getfixturevalue(name)
    assert (path / CONFIG_NAME).is_file() and (path / PREPROCESSOR_NAME).is_file()
    if (path / INDEX_NAME).exists():
        assert not (path / WEIGHTS_NAME).exists()
        weight_map = _weight_map(path)
        stored = {}
        for file in checkpoint_files(path):  # every shard exists and holds exactly what the index says
            with safe_open(file, "pt") as handle:
                stored.update(dict.fromkeys(handle.keys(), file.name))
        assert stored == weight_map
    else:
        assert (path / WEIGHTS_NAME).is_file()


@pytest.mark.parametrize("name", list(PATCH_KEY))
def test_key_names_match_layout(name: str, request: pytest.FixtureRequest) -> None:
    tensors = load_all_tensors(request.getfixturevalue(name))
    assert PATCH_KEY[name] in tensors
    prefix = PATCH_KEY[name].removesuffix("embeddings.patch_embedding.weight")
    assert f"{prefix}post_layernorm.weight" in tensors


def test_siglip_has_text_tower_and_logit_params(tiny_siglip: Path) -> None:
    tensors = load_all_tensors(tiny_siglip)
    assert {"logit_scale", "logit_bias", "text_model.embeddings.token_embedding.weight"} <= tensors.keys()
    config = _config(tiny_siglip)
    assert config["model_type"] == "siglip"
    assert config["vision_config"]["model_type"] == "siglip_vision_model"
    assert config["text_config"]["model_type"] == "siglip_text_model"


def test_vision_config_is_flat(tiny_vision: Path) -> None:
    config = _config(tiny_vision)
    assert config["model_type"] == "siglip_vision_model" and "vision_config" not in config
    assert config["vision_use_head"] is True


@pytest.mark.parametrize("name, resample", [("tiny_siglip", 3), ("tiny_siglip2", 2)])
def test_preprocessor_config_loads_in_transformers(name: str, resample: int, request: pytest.FixtureRequest) -> None:
    from transformers import SiglipImageProcessor

    path: Path = request.getfixturevalue(name)
    raw = json.loads((path / PREPROCESSOR_NAME).read_text())
    assert raw["resample"] == resample and raw["rescale_factor"] == pytest.approx(1 / 255)
    assert raw["size"] == {"height": 32, "width": 32} and raw["image_mean"] == [0.5, 0.5, 0.5]
    processor = SiglipImageProcessor.from_pretrained(path)
    pixels = processor(images=make_photo(), return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, 32, 32)
    assert _config(path)["model_type"] == "siglip"


def test_p14_drops_remainder_pixels(tiny_p14: Path) -> None:
    vision = _vision_config(tiny_p14)
    assert (vision["image_size"], vision["patch_size"]) == (44, 14)
    position = load_all_tensors(tiny_p14)["vision_model.embeddings.position_embedding.weight"]
    assert position.shape[0] == (44 // 14) ** 2 == 9


def test_odd_heads_head_dim_not_power_of_two(tiny_odd_heads: Path) -> None:
    vision = _vision_config(tiny_odd_heads)
    head_dim = vision["hidden_size"] // vision["num_attention_heads"]
    assert head_dim * vision["num_attention_heads"] == vision["hidden_size"]
    assert head_dim & (head_dim - 1) != 0


def test_sharded_spreads_vision_over_several_shards(tiny_sharded: Path) -> None:
    weight_map = _weight_map(tiny_sharded)
    assert len(set(weight_map.values())) >= 3
    assert len({file for key, file in weight_map.items() if key.startswith("vision_model.")}) >= 2


def test_paligemma_vision_lives_in_one_shard_only(tiny_paligemma: Path) -> None:
    weight_map = _weight_map(tiny_paligemma)
    vision_files = {file for key, file in weight_map.items() if _is_vision_key(key)}
    assert vision_files == {"model-00002-of-00002.safetensors"}
    other_files = {file for key, file in weight_map.items() if not _is_vision_key(key)}
    assert other_files == {"model-00001-of-00002.safetensors"}
    assert {"language_model.model.embed_tokens.weight", "multi_modal_projector.linear.weight"} <= weight_map.keys()


@pytest.mark.parametrize("name", PALIGEMMA)
def test_paligemma_config_is_headless(name: str, request: pytest.FixtureRequest) -> None:
    config = _config(request.getfixturevalue(name))
    assert config["model_type"] == "paligemma"
    vision = config["vision_config"]
    assert vision["model_type"] == "siglip_vision_model" and vision["vision_use_head"] is False
    assert ("image_size" in vision) == (name != "tiny_paligemma_default_size")
    tensors = load_all_tensors(request.getfixturevalue(name))
    assert not any(".head." in key for key in tensors)


def test_paligemma_default_size_is_224(tiny_paligemma_default_size: Path) -> None:
    tensors = load_all_tensors(tiny_paligemma_default_size)
    position = tensors["vision_tower.vision_model.embeddings.position_embedding.weight"]
    assert position.shape == ((224 // 14) ** 2, 32)
    preprocessor = json.loads((tiny_paligemma_default_size / PREPROCESSOR_NAME).read_text())
    assert preprocessor["size"] == {"height": 224, "width": 224} and preprocessor["image_seq_length"] == 256


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_reference_model_loads_and_runs(name: str, request: pytest.FixtureRequest) -> None:
    path: Path = request.getfixturevalue(name)
    model = reference_vision_model(path)
    vision = _vision_config(path)
    size = vision.get("image_size", 224)
    assert not model.training and model.config._attn_implementation == "eager"
    assert all(p.dtype == torch.float32 for p in model.parameters())
    with torch.no_grad():
        out = model(pixel_values=torch.randn(2, 3, size, size))
    tokens = (size // vision["patch_size"]) ** 2
    assert out.last_hidden_state.shape == (2, tokens, vision["hidden_size"])
    if vision["vision_use_head"]:
        assert out.pooler_output.shape == (2, vision["hidden_size"])
    assert torch.isfinite(out.last_hidden_state).all()


def test_reference_uses_checkpoint_weights(tiny_paligemma: Path) -> None:
    model = reference_vision_model(tiny_paligemma)
    stored = load_all_tensors(tiny_paligemma)["vision_tower.vision_model.encoder.layers.0.layer_norm1.bias"]
    assert torch.equal(model.encoder.layers[0].layer_norm1.bias, stored)
    assert stored.abs().sum() > 0  # perturbed: a zero-init bias would not prove anything


def test_paligemma_layouts_hold_identical_towers(
    tiny_paligemma: Path, tiny_paligemma_new_layout: Path, tiny_paligemma_v5_layout: Path
) -> None:
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        outputs = [reference_vision_model(p)(pixel_values=pixels).last_hidden_state for p in
                   (tiny_paligemma, tiny_paligemma_new_layout, tiny_paligemma_v5_layout)]
    assert torch.equal(outputs[0], outputs[1]) and torch.equal(outputs[0], outputs[2])


def test_build_is_deterministic(tmp_path: Path, tiny_vision: Path) -> None:
    again = build_checkpoint(tmp_path / "again", layout="vision")
    assert (again / WEIGHTS_NAME).read_bytes() == (tiny_vision / WEIGHTS_NAME).read_bytes()


def test_hf_cache_resolves_offline(hf_cache: HubCache, tiny_sharded: Path) -> None:
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    snapshot = hf_cache(tiny_sharded)
    assert constants.HF_HUB_OFFLINE and os.environ["HF_HUB_OFFLINE"] == "1"
    assert snapshot == hf_cache.root / "models--google--siglip-tiny" / "snapshots" / DEFAULT_REVISION
    assert (hf_cache.root / "models--google--siglip-tiny" / "refs" / "main").read_text() == DEFAULT_REVISION

    resolved = Path(hf_hub_download(DEFAULT_REPO_ID, CONFIG_NAME))
    assert resolved == snapshot / CONFIG_NAME
    assert resolved.is_symlink() and not os.path.isabs(os.readlink(resolved))
    assert resolved.read_bytes() == (tiny_sharded / CONFIG_NAME).read_bytes()

    shard = sorted(set(_weight_map(tiny_sharded).values()))[0]
    blob = Path(os.path.realpath(hf_hub_download(DEFAULT_REPO_ID, shard)))
    assert blob.parent.name == "blobs" and len(blob.name) == 64  # LFS files are named by sha256

    with pytest.raises(LocalEntryNotFoundError):  # offline: a missing file fails fast, no network
        hf_hub_download(DEFAULT_REPO_ID, "tokenizer.json")


def test_hf_cache_works_for_transformers(hf_cache: HubCache, tiny_siglip: Path) -> None:
    from transformers import AutoConfig, SiglipImageProcessor

    hf_cache(tiny_siglip, repo_id="google/siglip-base-patch16-224")
    assert AutoConfig.from_pretrained("google/siglip-base-patch16-224").model_type == "siglip"
    assert SiglipImageProcessor.from_pretrained("google/siglip-base-patch16-224").size == {"height": 32, "width": 32}


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "LA", "P", "CMYK", "I;16"])
def test_make_photo_modes(mode: str) -> None:
    image = make_photo((80, 60), mode=mode)
    assert image.mode == mode and image.size == (80, 60)
    if mode == "P":
        assert "transparency" in image.info and image.convert("RGBA").getextrema()[3][0] == 0
    if mode == "I;16":
        assert image.getextrema()[1] > 255  # really uses the 16-bit range


def test_make_photo_is_asymmetric_and_seeded() -> None:
    image = make_photo()
    assert make_photo().tobytes() == image.tobytes()
    assert make_photo(seed=1).tobytes() != image.tobytes()
    for changed in (ImageOps.mirror(image), ImageOps.flip(image), image.rotate(180)):
        assert changed.tobytes() != image.tobytes()
    square = make_photo((64, 64))
    for transposed in (square.rotate(90), square.rotate(270), square.transpose(Image.Transpose.TRANSPOSE)):
        assert transposed.tobytes() != square.tobytes()
    assert len(np.unique(np.asarray(image.convert("L")))) > 50  # smooth gradients: many grey levels
