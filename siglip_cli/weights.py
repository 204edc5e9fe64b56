"""Load a checkpoint's vision tensors (`checkpoints` finds it and reads its configs) into our tower, strictly."""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from . import interrupts
from .checkpoints import Checkpoint, CheckpointError, open_weights, resolve_checkpoint
from .config import DEFAULT_PRESET, PRESETS, PreprocessConfig, VisionConfig
from .errors import UserError
from .model import SiglipVision, random_model


def read_vision_tensors(checkpoint: Checkpoint) -> dict[str, Tensor]:
    """The tower's tensors with the prefix stripped, read lazily: other towers and models are never loaded.

    With Ctrl-C deferred to the end of the reading (a second one stops it at once): landing inside safetensors'
    `get_tensor`, which calls back into torch, it came out as "ValueError: could not determine the shape of object
    type 'torch.storage.UntypedStorage'", in a traceback."""
    prefix, tensors = checkpoint.prefix, {}
    with interrupts.deferred():
        for file in checkpoint.weight_files:
            with open_weights(file, framework="pt") as f:
                for key in f.keys():
                    if key.startswith(prefix):
                        tensors[key[len(prefix) :]] = f.get_tensor(key)
    return tensors


def load_state(model: SiglipVision, tensors: dict[str, Tensor], *, source: str) -> None:
    """Strict load that names the culprit: a missing, unexpected or mis-shaped tensor is an error.

    Strict within the tower's own modules, where a stray tensor means the config does not describe the weights.
    Ignored, as transformers ignores them: tensors outside those modules (in a checkpoint saved without a prefix,
    e.g. an adapter beside the tower), the `position_ids` buffer older transformers saved, and a head's
    tensors when the config says the tower has none.
    """
    expected = model.state_dict()
    modules = {name for name, _ in model.named_children()} | {"head"}
    tensors = {
        key: tensor
        for key, tensor in tensors.items()
        if key.split(".", 1)[0] in modules
        and key != "embeddings.position_ids"
        and (model.config.vision_use_head or not key.startswith("head."))
    }
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing:
        raise CheckpointError(f"{source} is missing tensor {missing[0]}" + _and_more(missing) + ".")
    if unexpected:
        raise CheckpointError(f"{source} has unexpected tensor {unexpected[0]}" + _and_more(unexpected) + ".")
    for key, tensor in tensors.items():
        if tensor.shape != expected[key].shape:
            raise CheckpointError(
                f"{source}: tensor {key} has shape {list(tensor.shape)} but the config needs {list(expected[key].shape)}."
            )
    # An integer tensor (a file written by hand, or quantized without its scales) is cast, as transformers casts it:
    # kept as it is, it stopped the load in a traceback.
    tensors = {key: t if t.is_floating_point() else t.to(expected[key].dtype) for key, t in tensors.items()}
    model.load_state_dict(tensors, strict=True, assign=True)


def _and_more(names: list[str]) -> str:
    return f" (and {len(names) - 1} more)" if len(names) > 1 else ""


def load_model(
    checkpoint: Checkpoint, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> SiglipVision:
    """Build the tower for `checkpoint`, load its weights strictly, and move it to `device` / `dtype` in eval mode."""
    with torch.device("meta"):
        model = SiglipVision(checkpoint.vision)
    load_state(model, read_vision_tensors(checkpoint), source=checkpoint.name)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def load_tower(
    name: str | os.PathLike,
    *,
    revision: str | None = None,
    seed: int = 0,
    check: Callable[[VisionConfig], object] | None = None,
) -> tuple[SiglipVision, PreprocessConfig, bool]:
    """(tower, preprocessing, random_weights) for `name`, float32 on the CPU in eval mode, as `siglip inspect` and
    `siglip bench` take it: a preset gets seeded random weights (`model.random_model`, no download), a Hub id or a
    checkpoint directory is loaded. A name that is none of these, a mistyped preset most often, is one sentence.
    `check` is given the tower's config before the tower is built (seconds for so400m): what the caller asked of the
    tower (`inspect --layers 99`) is refused at once."""
    name = os.fsdecode(name)  # a pathlib.Path from a Python caller
    check = check or (lambda cfg: None)
    if name in PRESETS:
        if revision is not None:
            raise UserError(f"{name} is a preset (an architecture with random weights): it has no --revision.")
        vision, preprocessing = PRESETS[name]
        check(vision)
        return random_model(vision, seed=seed), preprocessing, True
    if "/" not in name and not Path(name).expanduser().exists():
        # A preset's beginning ("siglip-base") means its first size, as PRESETS lists them; else the closest spelling.
        close = [p for p in PRESETS if p.startswith(name)][:1] or difflib.get_close_matches(name, PRESETS, n=1)
        hint = (f"did you mean {close[0]}?" if close else
                f"presets are named as the Hub repos without google/, such as {DEFAULT_PRESET} (README: siglip inspect).")  # fmt: skip
        raise UserError(f"{name} is not a preset, a Hub id (org/name) or a checkpoint directory; {hint}")
    checkpoint = resolve_checkpoint(name, revision=revision)
    check(checkpoint.vision)
    return load_model(checkpoint), checkpoint.preprocess, False
