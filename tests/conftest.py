"""Shared test fixtures: tiny random SigLIP checkpoints, an offline Hub cache, synthetic photos.

Nothing here touches the network. Checkpoints are built with transformers inside the test
session, seeded, and written in the exact on-disk layouts found on the Hugging Face Hub, so
the CLI's loader is exercised against the same files it meets in the wild.

Key names (checked with `safetensors.safe_open` against transformers 5.24):

* `SiglipModel.save_pretrained` writes `vision_model.embeddings...`, `vision_model.encoder...`,
  `vision_model.post_layernorm...`, `vision_model.head...`, plus `text_model...`,
  `logit_scale` and `logit_bias`. Same names as transformers 4.x checkpoints on the Hub.
* `SiglipVisionModel.save_pretrained` writes BARE keys: `embeddings...`, `encoder...`,
  `post_layernorm...`, `head...`. Transformers 5 made `SiglipVisionModel` flat (no inner
  `vision_model` module) and does not restore the prefix on save. Hub checkpoints saved by
  transformers 4.x use `vision_model.embeddings...` instead (layout "vision_legacy").
  Transformers 5 reads both (it strips `base_model_prefix = "vision_model"` when loading).
* A PaliGemma tower is stored as `vision_tower.vision_model.<...>` in the original Hub
  repos (layout "paligemma"), and as `model.vision_tower.vision_model.<...>` in newer saves
  (layout "paligemma_new"). Transformers 5.24's `PaliGemmaForConditionalGeneration.save_pretrained`
  writes a third variant: `vision_tower.<bare keys>`, `multi_modal_projector...`,
  `language_model.model...` (layout "paligemma_v5").

Import the plain helpers with `from conftest import build_checkpoint, make_photo,
reference_vision_model` (works because `tests/` has no `__init__.py`, so pytest puts it
on `sys.path`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner, Result

if TYPE_CHECKING:  # transformers is imported lazily: collecting tests that don't need it stays fast
    from transformers import SiglipVisionConfig, SiglipVisionModel

Layout = Literal["siglip", "vision", "vision_legacy", "paligemma", "paligemma_new", "paligemma_v5"]


def pytest_configure(config: pytest.Config) -> None:
    """The suite checks the CPU's behaviour on every machine: float32 by default, PIL decoding, byte-identical
    resumed runs. With a GPU, `--device auto` would pick it (bfloat16, nvJPEG) and those expectations would not hold,
    so the GPU is hidden before anything asks torch for one, here and in the subprocesses tests start. CUDA code is
    tested with torch.cuda patched; bench/gpu_check.sh measures and checks it on a real GPU."""
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    # FORCE_COLOR (common in CI) makes rich take a file for a terminal: colour codes and padded lines in the outputs
    # the tests read. Read when `siglip_cli.cli` makes its consoles, at import: the tests that want it set it.
    for name in ("FORCE_COLOR", "TTY_COMPATIBLE"):
        os.environ.pop(name, None)


@pytest.fixture(autouse=True)
def _unraisable_hook_put_back():
    """An interrupted run in this process leaves destructors quiet about Ctrl-C for the rest of it, as the command
    line wants (`interrupts.quiet_destructors`); the next test gets the hook it had."""
    hook = sys.unraisablehook
    yield
    sys.unraisablehook = hook


# A shell without job control (`pytest &` in a script) starts a job with SIGINT ignored, and Python then leaves it
# so; a run rightly keeps it ignored (`interrupts.stop_on_signals`), and every test that presses Ctrl-C would fail.
# The suite runs as from a terminal.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# The stop signals' handlers as the session started, before any run in this process.
_STOP_HANDLERS = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}


@pytest.fixture(autouse=True)
def _signal_handlers_put_back():
    """Every test starts and ends with the stop-signal handlers the session started with: one that a test (or a
    fixture, session-wide ones included) left changed would change what the next test's Ctrl-C does."""

    def put_back() -> None:
        for s, handler in _STOP_HANDLERS.items():
            if handler is not None:
                signal.signal(s, handler)

    put_back()
    yield
    put_back()


CONFIG_NAME = "config.json"
PREPROCESSOR_NAME = "preprocessor_config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
PICKLE_NAME = "pytorch_model.bin"
PICKLE_INDEX_NAME = "pytorch_model.bin.index.json"

SEED = 0
PALIGEMMA_DEFAULT_IMAGE_SIZE = 224  # what SiglipVisionConfig assumes when config.json has no image_size
# Every tiny checkpoint fixture below, with what it stands for: the parity and layout tests run over all of them.
TINY_CHECKPOINTS = {
    "tiny_siglip": "full SigLIP with its text tower",
    "tiny_vision": "vision-only, transformers 5 keys",
    "tiny_vision_legacy": "vision-only, transformers 4 keys",
    "tiny_sharded": "sharded full SigLIP",
    "tiny_p14": "patch 14 at 44 px (not a multiple of 14)",
    "tiny_odd_heads": "head_dim 9",
    "tiny_siglip2": "SigLIP2 fixed-resolution",
    "tiny_paligemma": "headless, PaliGemma layout",
    "tiny_paligemma_new_layout": "headless, model.vision_tower layout",
    "tiny_paligemma_v5_layout": "headless, transformers 5 PaliGemma layout",
    "tiny_paligemma_default_size": "headless at the implied 224 px",
}

# (vision tower prefix, language model prefix, projector prefix) for each PaliGemma layout.
PALIGEMMA_PREFIXES: dict[str, tuple[str, str, str]] = {
    "paligemma": ("vision_tower.vision_model.", "language_model.model.", "multi_modal_projector."),
    "paligemma_new": ("model.vision_tower.vision_model.", "model.language_model.", "model.multi_modal_projector."),
    "paligemma_v5": ("vision_tower.", "language_model.model.", "multi_modal_projector."),
}

# Tiny fake Gemma: only there so the loader has to skip non-vision tensors.
_LM_HIDDEN, _LM_VOCAB, _LM_INTERMEDIATE = 16, 64, 24


# --------------------------------------------------------------------------- checkpoints


def build_checkpoint(
    directory: str | os.PathLike[str],
    *,
    layout: Layout = "siglip",
    image_size: int | None = 32,
    patch_size: int = 8,
    hidden_size: int = 32,
    num_heads: int = 4,
    intermediate_size: int = 37,
    num_layers: int = 2,
    resample: int = 3,
    use_head: bool = True,
    max_shard_size: int | str | None = None,
) -> Path:
    """Write a seeded random checkpoint in one of the Hub layouts and return its directory.

    `image_size=None` builds the tower at transformers' default (224 px); the PaliGemma
    layouts then leave `image_size` out of `vision_config`, as the real PaliGemma repos do.
    `max_shard_size` (bytes or "50KB") shards the non-PaliGemma layouts via `save_pretrained`;
    layout "paligemma" is always two shards, the other PaliGemma layouts are one file.
    """
    from transformers import SiglipVisionConfig

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vision_config = SiglipVisionConfig(
        **({} if image_size is None else {"image_size": image_size}),
        patch_size=patch_size,
        hidden_size=hidden_size,
        num_attention_heads=num_heads,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        vision_use_head=use_head,
    )
    torch.manual_seed(SEED)
    if layout == "siglip":
        _save_siglip(directory, vision_config, max_shard_size)
    elif layout in ("vision", "vision_legacy"):
        _save_vision(directory, vision_config, max_shard_size, legacy=layout == "vision_legacy")
    elif layout in PALIGEMMA_PREFIXES:
        if max_shard_size is not None:
            raise ValueError(f"max_shard_size is not supported for layout {layout!r}")
        _save_paligemma(directory, vision_config, layout, omit_image_size=image_size is None)
    else:
        raise ValueError(f"unknown layout {layout!r}")
    _write_json(directory / PREPROCESSOR_NAME, _preprocessor_config(vision_config, resample, layout))
    return directory


def _perturb_(model: torch.nn.Module, scale: float = 0.1) -> None:
    """Add noise to every parameter, in place.

    Fresh init has zero biases and unit LayerNorm weights; a loader that forgot to load
    them would still match the reference. Noise makes every tensor count in parity tests.
    """
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter), alpha=scale)


def _new_vision_tower(vision_config: SiglipVisionConfig) -> SiglipVisionModel:
    from transformers import SiglipVisionModel

    model = SiglipVisionModel(vision_config)
    _perturb_(model)
    return model.eval()


def _save_siglip(directory: Path, vision_config: SiglipVisionConfig, max_shard_size: int | str | None) -> None:
    from transformers import SiglipConfig, SiglipModel

    text_config = {
        "vocab_size": 99,
        "hidden_size": vision_config.hidden_size,  # SiglipModel dots image and text embeddings
        "num_attention_heads": vision_config.num_attention_heads,
        "intermediate_size": vision_config.intermediate_size,
        "num_hidden_layers": vision_config.num_hidden_layers,
        "max_position_embeddings": 16,
        "bos_token_id": 97,  # defaults (49406/49407) lie outside the tiny vocab and warn
        "eos_token_id": 98,
    }
    config = SiglipConfig(text_config=text_config, vision_config=vision_config.to_dict())
    model = SiglipModel(config)
    _perturb_(model)
    model.save_pretrained(directory, **_shard_kwargs(max_shard_size))


def _save_vision(
    directory: Path, vision_config: SiglipVisionConfig, max_shard_size: int | str | None, *, legacy: bool
) -> None:
    _new_vision_tower(vision_config).save_pretrained(directory, **_shard_kwargs(max_shard_size))
    if legacy:  # transformers 4.x wrote the inner module's prefix
        _rename_saved_tensors(directory, lambda key: f"vision_model.{key}")


def _shard_kwargs(max_shard_size: int | str | None) -> dict[str, Any]:
    return {} if max_shard_size is None else {"max_shard_size": max_shard_size}


def _rename_saved_tensors(directory: Path, rename: Callable[[str], str]) -> None:
    """Rename every tensor key in a saved checkpoint, including the shard index."""
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(file, "pt") as handle:
            metadata = handle.metadata()
            tensors = {rename(key): handle.get_tensor(key) for key in handle.keys()}
        save_file(tensors, file, metadata=metadata)
    index_path = directory / INDEX_NAME
    if index_path.exists():
        index = json.loads(index_path.read_text())
        index["weight_map"] = {rename(key): file for key, file in index["weight_map"].items()}
        _write_json(index_path, index)


def _save_paligemma(
    directory: Path, vision_config: SiglipVisionConfig, layout: str, *, omit_image_size: bool
) -> None:
    vision_prefix, lm_prefix, projector_prefix = PALIGEMMA_PREFIXES[layout]
    tower = _new_vision_tower(vision_config)
    vision = {vision_prefix + key: value.contiguous() for key, value in tower.state_dict().items()}
    other = {
        f"{lm_prefix}embed_tokens.weight": torch.randn(_LM_VOCAB, _LM_HIDDEN),
        f"{lm_prefix}layers.0.self_attn.q_proj.weight": torch.randn(_LM_HIDDEN, _LM_HIDDEN),
        f"{lm_prefix}layers.0.mlp.gate_proj.weight": torch.randn(_LM_INTERMEDIATE, _LM_HIDDEN),
        f"{lm_prefix}norm.weight": torch.randn(_LM_HIDDEN),
        f"{projector_prefix}linear.weight": torch.randn(_LM_HIDDEN, vision_config.hidden_size),
        f"{projector_prefix}linear.bias": torch.randn(_LM_HIDDEN),
    }
    # The original repos are sharded; keeping the tower in the *last* shard catches loaders
    # that only open the first file.
    shards = [other, vision] if layout == "paligemma" else [{**other, **vision}]
    _save_shards(directory, shards)
    config = _paligemma_config(vision_config, layout, omit_image_size=omit_image_size)
    _write_json(directory / CONFIG_NAME, config)


def _save_shards(directory: Path, shards: list[dict[str, torch.Tensor]]) -> None:
    """Write tensors as `model.safetensors`, or as numbered shards plus an index like the Hub's."""
    if len(shards) == 1:
        save_file(shards[0], directory / WEIGHTS_NAME, metadata={"format": "pt"})
        return
    weight_map: dict[str, str] = {}
    total_size = 0
    for number, tensors in enumerate(shards, start=1):
        name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, directory / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
        total_size += sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    _write_json(directory / INDEX_NAME, index)


def _paligemma_config(vision_config: SiglipVisionConfig, layout: str, *, omit_image_size: bool) -> dict[str, Any]:
    """config.json in the style of google/paligemma-3b-pt-224, shrunk.

    Like the real file, vision_config lists only what differs from SiglipVisionConfig's
    defaults (no hidden_act, no layer_norm_eps), so loaders must fill in those defaults.
    """
    num_patches = (vision_config.image_size // vision_config.patch_size) ** 2
    vision: dict[str, Any] = {
        "hidden_size": vision_config.hidden_size,
        "intermediate_size": vision_config.intermediate_size,
        "model_type": "siglip_vision_model",
        "num_attention_heads": vision_config.num_attention_heads,
        "num_hidden_layers": vision_config.num_hidden_layers,
        "num_image_tokens": num_patches,
        "patch_size": vision_config.patch_size,
        "projection_dim": _LM_HIDDEN,
        "projector_hidden_act": "gelu_fast",
        "vision_use_head": vision_config.vision_use_head,
    }
    if not omit_image_size:
        vision["image_size"] = vision_config.image_size
    text = {
        "hidden_size": _LM_HIDDEN,
        "intermediate_size": _LM_INTERMEDIATE,
        "model_type": "gemma",
        "num_attention_heads": 2,
        "num_hidden_layers": 1,
        "num_image_tokens": num_patches,
        "num_key_value_heads": 1,
        "head_dim": _LM_HIDDEN // 2,
        "vocab_size": _LM_VOCAB,
    }
    dtype_key = "dtype" if layout == "paligemma_v5" else "torch_dtype"  # transformers 5 renamed it
    return {
        "architectures": ["PaliGemmaForConditionalGeneration"],
        "bos_token_id": 2,
        "eos_token_id": 1,
        "hidden_size": _LM_HIDDEN,
        "ignore_index": -100,
        "image_token_index": _LM_VOCAB - 1,
        "model_type": "paligemma",
        "pad_token_id": 0,
        "projection_dim": _LM_HIDDEN,
        "text_config": dict(sorted(text.items())),
        dtype_key: "float32",
        "vision_config": dict(sorted(vision.items())),
    }


def _preprocessor_config(vision_config: SiglipVisionConfig, resample: int, layout: str) -> dict[str, Any]:
    """preprocessor_config.json as the SigLIP (v1 and fixed-res v2) and PaliGemma repos have it."""
    size = vision_config.image_size
    config: dict[str, Any] = {
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": [0.5, 0.5, 0.5],
        "image_processor_type": "SiglipImageProcessor",
        "image_std": [0.5, 0.5, 0.5],
        "processor_class": "SiglipProcessor",
        "resample": resample,
        "rescale_factor": 1 / 255,  # serialises as 0.00392156862745098, as on the Hub
        "size": {"height": size, "width": size},
    }
    if layout in PALIGEMMA_PREFIXES:
        config["do_convert_rgb"] = None
        config["image_seq_length"] = (size // vision_config.patch_size) ** 2
        config["processor_class"] = "PaliGemmaProcessor"
    return dict(sorted(config.items()))


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


# --------------------------------------------------------------------------- reference model


def reference_vision_model(checkpoint_dir: str | os.PathLike[str]) -> SiglipVisionModel:
    """The transformers SiglipVisionModel for a checkpoint: float32, eval, eager attention.

    This is the parity reference. Every tensor must load: missing or unexpected vision
    keys raise instead of silently keeping random init.
    """
    from transformers import SiglipModel, SiglipVisionModel

    checkpoint_dir = Path(checkpoint_dir)
    model_type = json.loads((checkpoint_dir / CONFIG_NAME).read_text())["model_type"]
    kwargs: dict[str, Any] = {"attn_implementation": "eager", "dtype": torch.float32, "output_loading_info": True}
    if model_type == "siglip":
        full, info = SiglipModel.from_pretrained(checkpoint_dir, **kwargs)
        _check_loading_info(info, checkpoint_dir)
        model = full.vision_model
    elif model_type == "siglip_vision_model":
        model, info = SiglipVisionModel.from_pretrained(checkpoint_dir, **kwargs)
        _check_loading_info(info, checkpoint_dir)
    elif model_type == "paligemma":
        model = _paligemma_vision_model(checkpoint_dir)
    else:
        raise ValueError(f"no reference model for model_type {model_type!r}")
    return model.float().eval()


def _check_loading_info(info: dict[str, Any], checkpoint_dir: Path) -> None:
    problems = {name: info[name] for name in ("missing_keys", "unexpected_keys", "mismatched_keys") if info[name]}
    if problems or info["error_msgs"]:
        raise AssertionError(f"{checkpoint_dir} did not load cleanly: {problems} {info['error_msgs']}")


def _paligemma_vision_model(checkpoint_dir: Path) -> SiglipVisionModel:
    """Build the tower from `vision_config` and load its renamed tensors strictly, by hand."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    config = json.loads((checkpoint_dir / CONFIG_NAME).read_text())
    vision_config = SiglipVisionConfig.from_dict(config["vision_config"])
    model = SiglipVisionModel._from_config(vision_config, attn_implementation="eager", dtype=torch.float32)
    tensors = load_all_tensors(checkpoint_dir)
    prefix = _vision_tower_prefix(tensors)
    state = {key.removeprefix(prefix): value for key, value in tensors.items() if key.startswith(prefix)}
    model.load_state_dict(state, strict=True)
    return model


def _vision_tower_prefix(keys: Iterable[str]) -> str:
    keys = list(keys)
    # Longest first: "vision_tower." is also a prefix of "vision_tower.vision_model.".
    for prefix in sorted({p for p, _, _ in PALIGEMMA_PREFIXES.values()}, key=len, reverse=True):
        if any(key.startswith(prefix + "embeddings.") for key in keys):
            return prefix
    raise KeyError("no PaliGemma vision tower tensors found")


def checkpoint_files(checkpoint_dir: str | os.PathLike[str]) -> list[Path]:
    """The safetensors files of a checkpoint, as its index (if any) lists them."""
    checkpoint_dir = Path(checkpoint_dir)
    index_path = checkpoint_dir / INDEX_NAME
    if not index_path.exists():
        return [checkpoint_dir / WEIGHTS_NAME]
    weight_map = json.loads(index_path.read_text())["weight_map"]
    return [checkpoint_dir / name for name in sorted(set(weight_map.values()))]


def load_all_tensors(checkpoint_dir: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in checkpoint_files(checkpoint_dir):
        with safe_open(file, "pt") as handle:
            tensors.update({key: handle.get_tensor(key) for key in handle.keys()})
    return tensors


# --------------------------------------------------------------------------- checkpoint fixtures


def _build(factory: pytest.TempPathFactory, name: str, **kwargs: Any) -> Path:
    return build_checkpoint(factory.mktemp(name), **kwargs)


@pytest.fixture(scope="session")
def tiny_siglip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Full SiglipModel (vision + text, logit_scale/bias), one model.safetensors."""
    return _build(tmp_path_factory, "tiny_siglip")


@pytest.fixture(scope="session")
def tiny_siglip2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Same weights as tiny_siglip; bilinear resize (resample 2) like SigLIP2 fixed-res repos."""
    return _build(tmp_path_factory, "tiny_siglip2", resample=2)


@pytest.fixture(scope="session")
def tiny_vision(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SiglipVisionModel.save_pretrained: flat config, bare `embeddings...` keys (transformers 5)."""
    return _build(tmp_path_factory, "tiny_vision", layout="vision")


@pytest.fixture(scope="session")
def tiny_vision_legacy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SiglipVisionModel as transformers 4.x saved it: `vision_model.embeddings...` keys."""
    return _build(tmp_path_factory, "tiny_vision_legacy", layout="vision_legacy")


@pytest.fixture(scope="session")
def tiny_p14(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Patch 14 at 44 px: 3x3 patches, the conv drops the last 2 pixel rows/columns."""
    return _build(tmp_path_factory, "tiny_p14", image_size=44, patch_size=14)


@pytest.fixture(scope="session")
def tiny_odd_heads(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """head_dim 9 (hidden 36 / 4 heads): not a power of two."""
    return _build(tmp_path_factory, "tiny_odd_heads", hidden_size=36, num_heads=4)


@pytest.fixture(scope="session")
def tiny_sharded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Full SiglipModel in 5 shards (~180 kB total); vision tensors fill the last 3."""
    return _build(tmp_path_factory, "tiny_sharded", max_shard_size=45_000)


@pytest.fixture(scope="session")
def tiny_paligemma(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Headless tower as `vision_tower.vision_model.*`, 2 shards, only shard 2 holds vision."""
    return _build(tmp_path_factory, "tiny_paligemma", layout="paligemma", use_head=False)


@pytest.fixture(scope="session")
def tiny_paligemma_default_size(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """vision_config without image_size (so 224 px is implied); tower built at 224/14, 1 layer."""
    return _build(
        tmp_path_factory,
        "tiny_paligemma_default_size",
        layout="paligemma",
        image_size=None,
        patch_size=14,
        num_layers=1,
        use_head=False,
    )


@pytest.fixture(scope="session")
def tiny_paligemma_new_layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Headless tower as `model.vision_tower.vision_model.*`, one model.safetensors."""
    return _build(tmp_path_factory, "tiny_paligemma_new_layout", layout="paligemma_new", use_head=False)


@pytest.fixture(scope="session")
def tiny_paligemma_v5_layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Headless tower as `vision_tower.<bare>` (what transformers 5 saves), one file."""
    return _build(tmp_path_factory, "tiny_paligemma_v5_layout", layout="paligemma_v5", use_head=False)


# --------------------------------------------------------------------------- offline Hub cache

# huggingface_hub 2.x reads HF_HOME, HF_HUB_CACHE and HF_HUB_OFFLINE once, at import, into
# module globals of `huggingface_hub.constants`; `is_offline_mode()` returns the global and
# `hf_hub_download` falls back to `constants.HF_HUB_CACHE` at call time. So setting the env
# vars after import changes nothing in this process: the globals must be patched too
# (`utils._cache_manager` also copied HF_HUB_CACHE at import, for `scan_cache_dir`).
# transformers 5 calls `huggingface_hub.is_offline_mode()` and `constants.HF_HUB_CACHE`,
# so patching the globals covers it. The env vars are still set for subprocesses (the CLI).
# The classic per-repo layout below is what hub 2.x writes when it does not use its
# optional cache-wide `<cache>/blobs/<xx>/<xet-hash>` store; both are read the same way.

DEFAULT_REPO_ID = "google/siglip-tiny"
DEFAULT_REVISION = "5c1b0f3d2e4a69788796a5b4c3d2e1f00a1b2c3d"
_LFS_SUFFIXES = (".safetensors", ".bin", ".pt")  # stored via LFS on the Hub: etag is the sha256


@dataclass(frozen=True)
class HubCache:
    """Callable that publishes a checkpoint directory into a fake, offline HF cache."""

    root: Path  # the HF_HUB_CACHE directory

    def __call__(
        self,
        checkpoint_dir: str | os.PathLike[str],
        repo_id: str = DEFAULT_REPO_ID,
        revision_hash: str = DEFAULT_REVISION,
        *,
        absent: Iterable[str] = (),
    ) -> Path:
        """Lay the files out as huggingface_hub does; return the snapshot directory. `absent` names files the Hub
        said the commit lacks, marked as huggingface_hub marks them once it asked (`.no_exist/<commit>/<name>`)."""
        repo_dir = self.root / f"models--{repo_id.replace('/', '--')}"
        snapshot = repo_dir / "snapshots" / revision_hash
        for source in sorted(Path(checkpoint_dir).iterdir()):
            if source.is_file():
                _link_blob(source.read_bytes(), _etag(source), repo_dir / "blobs", snapshot / source.name)
        for name in absent:
            (repo_dir / ".no_exist" / revision_hash).mkdir(parents=True, exist_ok=True)
            (repo_dir / ".no_exist" / revision_hash / name).touch()
        (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
        (repo_dir / "refs" / "main").write_text(revision_hash)  # no trailing newline, like the hub
        return snapshot


def _etag(file: Path) -> str:
    """The blob name the hub uses: sha256 for LFS files, git blob sha1 for the rest."""
    data = file.read_bytes()
    if file.name.endswith(_LFS_SUFFIXES):
        return hashlib.sha256(data).hexdigest()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _link_blob(data: bytes, etag: str, blobs: Path, link: Path) -> None:
    blobs.mkdir(parents=True, exist_ok=True)
    link.parent.mkdir(parents=True, exist_ok=True)
    blob = blobs / etag
    if not blob.exists():
        blob.write_bytes(data)
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(os.path.relpath(blob, link.parent))  # relative, e.g. ../../blobs/<etag>


@pytest.fixture
def hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> HubCache:
    """An empty offline HF cache in tmp_path; call the result to publish checkpoints into it."""
    import huggingface_hub.constants as hub_constants
    import huggingface_hub.utils._cache_manager as hub_cache_manager

    home = tmp_path / "hf_home"
    cache = home / "hub"
    cache.mkdir(parents=True)
    for name, value in {"HF_HOME": home, "HF_HUB_CACHE": cache, "HF_HUB_OFFLINE": "1"}.items():
        monkeypatch.setenv(name, str(value))
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)  # legacy name, would win in subprocesses
    monkeypatch.setattr(hub_constants, "HF_HOME", str(home))
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_cache_manager, "HF_HUB_CACHE", str(cache))
    return HubCache(cache)


# --------------------------------------------------------------------------- synthetic photos


def with_preprocessing(checkpoint: Path, copy: Path, **settings: Any) -> Path:
    """A copy of `checkpoint` at `copy`, with `settings` changed in its preprocessor_config.json."""
    shutil.copytree(checkpoint, copy)
    config = copy / "preprocessor_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), **settings}))
    return copy


def with_bogus_huffman_table(jpeg: bytes) -> bytes:
    """`jpeg` with its first Huffman table's code counts overrun: its header reads whole (size, components), and
    every decoder refuses it (libjpeg: "Bogus Huffman table definition")."""
    data = bytearray(jpeg)
    table = data.index(b"\xff\xc4")
    data[table + 5 : table + 21] = b"\xff" * 16
    return bytes(data)


def reference_composites(image: Image.Image) -> bool:
    """Whether the installed transformers is a reference for `image`: from 5.21 its processors composite transparency
    onto white, as we do; 5.20, the last for Python 3.10, drops it (`image.convert("RGB")`)."""
    import transformers
    from packaging.version import Version

    transparent = "A" in image.getbands() or image.info.get("transparency") is not None
    return not transparent or Version(transformers.__version__) >= Version("5.21")


def make_photo(size: tuple[int, int] = (80, 60), mode: str = "RGB", seed: int = 0) -> Image.Image:
    """A smooth, non-symmetric test picture (width, height) in any PIL mode.

    Gradients along both axes plus an off-centre disc and a corner triangle: any flip,
    rotation or transpose changes it, and it has no high-frequency content, so resizing
    with different filters gives close (not identical) results.
    """
    rgb = _photo_rgb(size, seed)
    if mode == "RGB":
        return rgb
    if mode in ("RGBA", "LA"):
        base = rgb if mode == "RGBA" else rgb.convert("L")
        base.putalpha(_alpha_ramp(size))
        return base
    if mode == "P":
        palette = rgb.quantize(colors=64)
        palette.info["transparency"] = palette.getpixel((0, 0))  # top-left colour is see-through
        return palette
    if mode == "I;16":
        gray = np.asarray(rgb.convert("L"), dtype=np.uint16) * 257  # full 16-bit range
        return Image.fromarray(gray)
    return rgb.convert(mode)  # L, CMYK, I, F, 1, YCbCr, ...


def _photo_rgb(size: tuple[int, int], seed: int) -> Image.Image:
    width, height = size
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    u, v = x / max(width - 1, 1), y / max(height - 1, 1)
    cx, cy = rng.uniform(0.2, 0.4), rng.uniform(0.25, 0.45)  # off-centre: breaks symmetry
    red = 40 + 180 * u
    green = 30 + 200 * v**1.5
    blue = 200 * np.exp(-((u - cx) ** 2 + (v - cy) ** 2) * 6)
    image = Image.fromarray(np.stack([red, green, blue], axis=-1).clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    r = 0.18 * min(width, height)
    disc_x, disc_y = (0.65 + 0.1 * rng.random()) * width, 0.6 * height
    draw.ellipse((disc_x - r, disc_y - r, disc_x + r, disc_y + r), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    draw.polygon([(0, 0), (0.3 * width, 0), (0, 0.45 * height)], fill=(250, 240, 30))
    return image


def _alpha_ramp(size: tuple[int, int]) -> Image.Image:
    width, height = size
    x = np.linspace(255, 32, width, dtype=np.float32)
    return Image.fromarray(np.broadcast_to(x, (height, width)).astype(np.uint8), "L")


@pytest.fixture
def image_factory() -> Callable[..., Image.Image]:
    """`make_photo` as a fixture, for tests that prefer injection to imports."""
    return make_photo


# --------------------------------------------------------------------------- awkward image files
# Shared by test_preprocess.py and test_embed_cli.py: the files photo libraries are full of.

EXIF_ORIENTATION = 0x0112


def save_sideways_jpeg(path: str | os.PathLike[str], upright: Image.Image) -> Path:
    """Store `upright` as a phone stores a portrait: pixels turned 90° counter-clockwise, plus EXIF
    orientation 6 ("rotate 90° clockwise to view"). A viewer that honours EXIF shows `upright`."""
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    upright.rotate(90, expand=True).save(path, format="JPEG", quality=95, exif=exif)
    return Path(path)


def save_png_claiming_size(path: str | os.PathLike[str], width: int, height: int) -> Path:
    """A decompression-bomb stand-in: a 1×1 PNG whose header (IHDR) claims `width`×`height`.

    The file is tiny and its pixel data does not match the header, so only a check of the header
    size refuses it with a pixel-count message; anything that decodes first fails differently.
    """
    import io
    import zlib

    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    # 8-byte signature, then IHDR: length [8:12], type [12:16], width [16:20], height [20:24], ..., CRC [29:33].
    data[16:20] = width.to_bytes(4, "big")
    data[20:24] = height.to_bytes(4, "big")
    data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")
    Path(path).write_bytes(bytes(data))
    return Path(path)


def save_animated_gif(path: str | os.PathLike[str], frames: list[Image.Image]) -> Path:
    """An animated GIF of palette (`P`) frames; decoding frame i gives frames[i] back exactly."""
    frames[0].save(path, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return Path(path)


# --------------------------------------------------------------------------- hang guard


class Hung(BaseException):
    """Raised by `deadline`. A BaseException, so no per-file `except Exception` can swallow it."""


class deadline:
    """`with deadline(10):` turns a hang into a failure: a call blocked for that many seconds (say, opening
    a FIFO that nobody writes to) is interrupted by SIGALRM. Unix only, main thread only, in-process code only."""

    def __init__(self, seconds: int):
        self.seconds = seconds

    def __enter__(self) -> None:
        import signal

        def expire(signum: int, frame: Any) -> None:
            raise Hung(f"still blocked after {self.seconds} s")

        self.previous = signal.signal(signal.SIGALRM, expire)
        signal.alarm(self.seconds)

    def __exit__(self, *exc_info: Any) -> None:
        import signal

        signal.alarm(0)
        signal.signal(signal.SIGALRM, self.previous)


# --------------------------------------------------------------------------- a pickle that bites


class _WritesMarker:
    """Unpickling this object calls `open(marker, "w")`: the marker file is proof that a pickle was executed."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.marker), "w"))


def save_booby_trapped_pickle(
    path: str | os.PathLike[str], marker: str | os.PathLike[str], *, torch_format: bool = False
) -> Path:
    """A `pytorch_model.bin`-style pickle whose unpickling creates `marker` (and does nothing else): a plain pickle,
    or with `torch_format` a file of `torch.save` (a zip holding the pickle), as real `.bin` files are."""
    import pickle

    state = {"vision_model.post_layernorm.weight": _WritesMarker(Path(marker))}
    if torch_format:
        torch.save(state, path)
    else:
        Path(path).write_bytes(pickle.dumps(state))
    return Path(path)


def save_as_pickles(checkpoint: str | os.PathLike[str], destination: str | os.PathLike[str], **save: Any) -> Path:
    """A copy of `checkpoint` at `destination` with its weights as PyTorch pickles, as transformers 4 saved them with
    `safe_serialization=False` (transformers 5 writes safetensors only): the same tensors by `torch.save` (`save`:
    its keywords) in `pytorch_model.bin`, or in `pytorch_model-0000k-of-0000n.bin` with `pytorch_model.bin.index.json`
    for a sharded one."""
    checkpoint, destination = Path(checkpoint), Path(destination)
    destination.mkdir(parents=True)
    for config in checkpoint.glob("*.json"):
        if config.name != INDEX_NAME:
            shutil.copy(config, destination / config.name)
    renamed = {}  # safetensors file → pickle
    for weights in sorted(checkpoint.glob("*.safetensors")):
        renamed[weights.name] = "pytorch_" + weights.name.removesuffix(".safetensors") + ".bin"
        torch.save(load_file(weights), destination / renamed[weights.name], **save)
    if (checkpoint / INDEX_NAME).exists():
        index = json.loads((checkpoint / INDEX_NAME).read_text())
        index["weight_map"] = {key: renamed[shard] for key, shard in index["weight_map"].items()}
        _write_json(destination / PICKLE_INDEX_NAME, index)
    return destination


# ------------------------------------------------------------------------------------------ running the CLI

# rich wraps stderr at the terminal width, 80 columns when there is no terminal: a wide one keeps each message on
# one line, whatever its length, so tests can read messages line by line.
RUNNER = CliRunner(env={"COLUMNS": "1000"})


def siglip(*args: object, input: str | bytes | None = None) -> Result:
    """`siglip ARGS...` run in this process."""
    from siglip_cli.cli import app

    return RUNNER.invoke(app, [str(a) for a in args], input=input)


def ok(result: Result) -> Result:
    assert result.exit_code == 0, f"exit {result.exit_code}: {result.stderr}{result.exception!r}"
    return result


def the_error(result: Result, code: int = 2) -> str:
    """The one `error:` line of a failed run, after checking it failed cleanly: no traceback, nothing on stdout."""
    assert result.exit_code == code, result.output
    assert isinstance(result.exception, SystemExit), result.exception  # an uncaught exception would be a traceback
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    assert result.stderr.rstrip("\n").endswith(errors[0])
    return errors[0]
