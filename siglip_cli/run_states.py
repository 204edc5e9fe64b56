"""A run's state: what it records of everything that changes the numbers in its output (`run_state`), in its work
area's `state.json` and in the output's metadata; and how two states are compared (`same_state`: may one run
continue, update or merge with the other's work?) and told apart in a refusal (`describe_difference`). What each key
means, and which option sets it, is said here."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from .config import VisionConfig
from .text import display_path

if TYPE_CHECKING:
    from .checkpoints import Checkpoint
    from .embed import EmbedOptions


def run_state(
    checkpoint: Checkpoint, options: EmbedOptions, *, compute_dtype: str, output_format: str, weights: str
) -> dict:
    """Everything that changes the numbers in the output: a resumed or updated run must match it exactly. The state
    is what a run records of its options: in its work area's `state.json`, and in the output's metadata as
    `options`. `weights`: the fingerprint of the weights as the model computes with them
    (`embed.weights_fingerprint`)."""
    local = Path(checkpoint.name).expanduser()
    state = {
        # As text: a checkpoint folder whose name is not UTF-8 must not make the metadata unwritable.
        "model": display_path(str(local.resolve()) if local.is_dir() else checkpoint.name),
        "revision": checkpoint.revision,
        "compute_dtype": compute_dtype,
        "normalized": options.normalize,
        "output_dtype": options.output_dtype,
        "tokens": options.tokens,
        "format": output_format,
        "preprocessing": {
            **checkpoint.preprocess.to_dict(),
            "exif_transpose": options.decode.exif_transpose,
            "fast_decode": options.decode.fast_decode,
            "decoder": options.decoder,
        },
        "embedding_dim": checkpoint.vision.hidden_size,
        "num_tokens": checkpoint.vision.num_patches,
        "pooling": pooling(checkpoint.vision),
        # What the weights do not show: a config.json corrected after a run (its activation, its heads, its
        # LayerNorm epsilon) changes the numbers with the same tensors. The activation as computed: gelu_new and
        # gelu_pytorch_tanh are one function.
        "architecture": {**asdict(checkpoint.vision), "hidden_act": checkpoint.vision.activation},
        # A checkpoint folder saved over (a fine-tune's next epoch) keeps its path, and a Hub id's revision says
        # nothing of a local folder: the weights themselves keep an --update or a resumed run from mixing two models.
        "weights": weights,
    }
    return json.loads(json.dumps(state))  # as it reads back from disk (tuples become lists)


def pooling(vision: VisionConfig) -> str:
    """How a row is pooled from the tower: its attention-pool head, or the mean of its tokens (headless towers)."""
    return "attention-pool head" if vision.vision_use_head else "mean of patch tokens (headless tower)"


_OPTION_NAMES = {
    "model": "--model",
    "revision": "--revision",
    "compute_dtype": "--dtype",
    "normalized": "--normalize/--no-normalize",
    "output_dtype": "--output-dtype",
    "tokens": "--tokens",
    "format": "the output format",
    "pooling": "the pooling (the checkpoint's vision_use_head)",
    "preprocessing": "the preprocessing (--no-exif-transpose, --fast-decode, --decode, or the model's preprocessor)",
    "embedding_dim": "the model's architecture",
    "num_tokens": "the model's architecture",
    "weights": "the model's weights",
    "architecture": "the model's architecture",
    "shard": "--shard",  # recorded in a work area only: its chunks are of that part
}
# What the checkpoint alone decides: another --model changes it too (and is named instead), and so does a checkpoint
# folder saved again (a fine-tune's next epoch, another architecture), which no option brings back.
_CHECKPOINTS_OWN = ("embedding_dim", "num_tokens", "pooling", "weights", "architecture")
# The preprocessing's parts that options set; the rest is the checkpoint's preprocessor (its size, its resize).
_PREPROCESSING_OPTIONS = ("exif_transpose", "fast_decode", "decoder")


class Difference(NamedTuple):
    """How two runs' states differ (`describe_difference`)."""

    options: str  # as the user spells them: '--dtype, --tokens'
    saved_over: bool  # the checkpoint alone differs: its folder was saved again since, or its config files corrected


def same_state(old: dict, new: dict) -> bool:
    """Whether two runs' states (`embed.run_state`) agree: a run may continue, update or merge with the other. The
    state of a version that did not record the weights' fingerprint or the architecture in full is taken at its
    word on them; between two that recorded the fingerprint, where the weights were loaded from does not count (a
    checkpoint folder copied or moved, a local copy of a Hub repo), the weights do."""
    old, new = _compared(old, new)
    return old == new


# Where a run's weights were loaded from: with both fingerprints, the weights themselves are compared instead.
_SOURCE = ("model", "revision")
# Recorded only by later versions: the weights' fingerprint, then the architecture in full (heads, activation).
_LATER = ("weights", "architecture")


def _compared(old: dict, new: dict) -> tuple[dict, dict]:
    """The parts of two runs' states that must agree."""
    old, new = _both_recorded(old, new)
    if "weights" in old:
        return _without(old, _SOURCE), _without(new, _SOURCE)
    return old, new


def _both_recorded(old: dict, new: dict) -> tuple[dict, dict]:
    """Two states less what only one of them records (`_LATER`)."""
    unknown = _not_recorded_by_all([old, new])
    return _without(old, unknown), _without(new, unknown)


def as_recorded_by_all(states: list[dict]) -> dict:
    """The first of `states`, less what not all of them record (`_LATER`): the state of a merge of their rows."""
    return _without(states[0], _not_recorded_by_all(states))


def _not_recorded_by_all(states: list[dict]) -> tuple[str, ...]:
    return tuple(key for key in _LATER if any(key not in state for state in states))


def _without(state: dict, keys: tuple[str, ...]) -> dict:
    return {key: value for key, value in state.items() if key not in keys}


def without_weights(state: dict) -> dict:
    """A run's state less the weights' fingerprint, as a version that did not record it wrote it."""
    return _without(state, ("weights",))


def describe_difference(old: dict, new: dict) -> Difference:
    """How two runs' states differ. The weights' fingerprint is named only when it alone can say why: it changes
    with --dtype too, other weights loaded from elsewhere are named by --model (or --revision), and a state of an
    earlier version has none; the model's architecture and pooling are named only where --model is not."""
    old, new = _both_recorded(old, new)
    other_dtype = old.get("compute_dtype") != new.get("compute_dtype")
    other_source = any(old.get(key) != new.get(key) for key in _SOURCE)
    if other_dtype or (old.get("weights") != new.get("weights") and other_source):
        old, new = without_weights(old), without_weights(new)
    else:
        old, new = _compared(old, new)  # the same weights from elsewhere: no difference
    changed = [key for key in {**new, **old} if old.get(key) != new.get(key)]  # a key either lacks too
    if other_source:
        changed = [key for key in changed if key not in _CHECKPOINTS_OWN]
    names = dict.fromkeys(_OPTION_NAMES.get(key, key) for key in changed)  # the architecture once
    saved_over = bool(changed) and all(_checkpoints_own(key, old, new) for key in changed)
    return Difference(", ".join(names) or "the options", saved_over)


def _checkpoints_own(key: str, old: dict, new: dict) -> bool:
    """Whether two states' difference in `key` is the checkpoint's alone, which no option brings back."""
    if key == "preprocessing":  # a 384-pixel fine-tune saved over a 224 one: its preprocessor's size
        before, after = old.get(key) or {}, new.get(key) or {}
        return all(before.get(part) == after.get(part) for part in _PREPROCESSING_OPTIONS)
    return key in _CHECKPOINTS_OWN
