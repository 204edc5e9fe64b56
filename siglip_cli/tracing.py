"""`siglip inspect`: run the vision tower once on one image and describe every stage it computes.

The model records its intermediates into a trace dict as the forward runs (see `model.py`). Here that dict is a
`_Recorder` whose `__setitem__` turns each tensor into a `Stage` (shape, dtype, mean / std / min / max) as it
arrives and keeps only the few small tensors the plots need, so memory stays at about one activation at a time
even for so400m. Library code: it returns an `Inspection` and never prints.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from .config import DEFAULT_MAX_PIXELS, DEFAULT_PRESET, PIL_FILTERS, PreprocessConfig, VisionConfig, aspect_kept
from .errors import UserError
from .files import expand_home, is_regular_file, path_fields
from .model import SiglipVision, gflops_per_image, num_parameters
from .preprocess import (
    BadImage,
    DecodeOptions,
    TooManyPixels,
    bad_file_reason,
    open_checked,
    open_rgb,
    resize,
    resized_to_pixels,
)
from .text import counted, display_path
from .weights import load_tower

SAMPLE_IMAGE = "sample.jpg"  # in siglip_cli/assets: chelsea.jpg from sample_images/ (CC0)
NUM_FILTERS = 64  # patch-embedding filters kept for the plot

ACTIVATION_NAMES = {  # `VisionConfig.activation` as a stage's note says it
    "gelu_tanh": "GELU (tanh approximation)", "gelu": "GELU", "quick_gelu": "quick GELU: x · sigmoid(1.702 x)",
    "gelu_10": "GELU clipped to [-10, 10]", "relu": "ReLU", "relu2": "ReLU squared", "relu6": "ReLU6",
    "leaky_relu": "leaky ReLU", "silu": "SiLU", "mish": "Mish", "hardswish": "hard swish", "tanh": "tanh",
    "sigmoid": "sigmoid", "identity": "none (linear)", "laplace": "Laplace (MEGA's)", "sqrtsoftplus": "√softplus",
}
_LAYER_STAGE = re.compile(r"layers\.(\d+)\.(.+)")


@dataclass(frozen=True)
class Stage:
    """One intermediate result: what it is, its shape and dtype, and summary statistics of its values."""

    stage: str  # the trace name, e.g. "layers.0.self_attn.attn_weights"
    shape: tuple[int, ...]
    dtype: str  # "float32", "uint8"
    mean: float
    std: float  # population standard deviation
    min: float
    max: float
    note: str = ""  # what the stage is, in the architecture's words

    def to_dict(self) -> dict[str, Any]:
        values = {name: _finite_or_none(getattr(self, name)) for name in ("mean", "std", "min", "max")}
        return {"stage": self.stage, "shape": list(self.shape), "dtype": self.dtype, **values, "note": self.note}


@dataclass(frozen=True)
class ImageFacts:
    """The image traced: its header as the terminal shows it (`str`) and as `--json` gives it (`to_dict`)."""

    path: str | None  # as the user gave it; None for the bundled sample photo
    label: str  # the path as a terminal shows it (control characters escaped), or "the bundled sample photo"
    width: int  # after EXIF orientation, as a viewer shows it
    height: int
    format: str | None  # Pillow's name: "JPEG", "PNG"
    mode: str  # as stored: "RGB", "P", "I;16"

    def __str__(self) -> str:
        return f"{self.label} ({self.width}×{self.height} {self.format}, mode {self.mode})"

    def to_dict(self) -> dict[str, Any]:
        """The path as the manifest of `siglip embed` gives one (with its bytes where not UTF-8), then the header."""
        where = path_fields(self.path) if self.path is not None else {"path": None}
        header = {"width": self.width, "height": self.height, "format": self.format, "mode": self.mode}
        return {**where, **header, "description": str(self)}


@dataclass(frozen=True)
class Inspection:
    """Everything `siglip inspect` reports about one forward pass, plus the tensors its plots draw."""

    model: str  # as the user named it
    random_weights: bool  # an architecture preset: statistics describe an untrained tower
    image: ImageFacts | None  # the image traced; None where `trace` was given only a decoded photo
    config: VisionConfig
    preprocessing: PreprocessConfig
    stages: list[Stage]
    parameters: int
    parameters_by_module: dict[str, int]  # encoder layers summed under "encoder.layers.*.<module>"
    gflops_per_image: float  # multiply-add = 2 FLOPs; see `model.gflops_per_image`
    layers_in_full: tuple[int, ...]  # encoder layers listed stage by stage; the others get one line
    notes: tuple[str, ...]  # facts a reader should not miss (dropped pixels, no head)
    # For the plots, all on the CPU as float32:
    photo: Image.Image  # the decoded RGB input, EXIF-oriented
    position_embedding: Tensor  # (N, D)
    patch_filters: Tensor  # (K, C, p, p): the first K of the D patch-embedding filters
    head_attention: Tensor | None  # (H, N): the probe's attention over the patches; None without a head
    token_norms: Tensor  # (L + 1, N): L2 norm of every token after the embeddings and after each layer
    # How the N patches lie on the resized photo, in rows and columns: the tower's grid, but where the preprocessing
    # `keeps_aspect` (a 2×8 for a 4×4 tower, say); and the pixel rows (bottom) and columns (right) no patch covers.
    patch_grid: tuple[int, int]
    dropped: tuple[int, int]

    def to_dict(self) -> dict[str, Any]:
        """The `--json` document: plain, JSON-ready values (non-finite statistics become null)."""
        cfg = self.config
        derived = {"head_dim": cfg.head_dim, "grid_size": cfg.grid_size, "num_patches": cfg.num_patches}
        return {
            "model": self.model,
            "random_weights": self.random_weights,
            "image": self.image.to_dict() if self.image else None,
            "stages": [stage.to_dict() for stage in self.stages],
            "parameters": self.parameters,
            "parameters_by_module": dict(self.parameters_by_module),
            "gflops_per_image": self.gflops_per_image,
            "config": {**dataclasses.asdict(cfg), **derived, "dropped_pixels": cfg.dropped_pixels},
            "preprocessing": self.preprocessing.to_dict(),
            "layers_in_full": list(self.layers_in_full),
            "notes": list(self.notes),
        }


def inspect_image(
    model: str | os.PathLike = DEFAULT_PRESET,
    image: str | Path | None = None,
    *,
    layers: str = "first",
    revision: str | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> Inspection:
    """Load `model` (a preset: random weights; a Hub id or checkpoint directory: real weights), trace `image`.

    `image` defaults to the bundled sample photo. `layers` is "first", "all" or comma-separated layer numbers.
    `max_pixels`: larger images are refused (decompression bombs), None for no limit, as `siglip embed`'s.
    """
    model = os.fsdecode(model)  # a pathlib.Path from a Python caller: named as text in the report
    if image is None:
        with resources.as_file(resources.files("siglip_cli") / "assets" / SAMPLE_IMAGE) as path:
            photo, facts = read_image(path, label="the bundled sample photo", max_pixels=max_pixels)  # as any image
        facts = dataclasses.replace(facts, path=None)  # a file inside the installed package: not the user's
    else:
        photo, facts = read_image(image, max_pixels=max_pixels)  # before the model: a bad path fails at once
    tower, preprocessing, random_weights = load_tower(
        model, revision=revision, check=lambda cfg: parse_layers(layers, cfg.num_hidden_layers)
    )
    return trace(
        tower, photo, preprocessing, layers=layers, model_name=model, image=facts, random_weights=random_weights
    )


def read_image(
    path: str | Path, *, label: str | None = None, max_pixels: int | None = DEFAULT_MAX_PIXELS
) -> tuple[Image.Image, ImageFacts]:
    """Decode an image file to RGB (EXIF-oriented) and read its header: "photo.png (640×480 PNG, mode RGBA)"."""
    given = expand_home(path)  # "~/photo.jpg" from a Python caller, as a shell would have given it
    path = Path(given)
    name = label or display_path(str(path))  # as text for a terminal and for JSON: not UTF-8, control characters
    if path.is_dir():
        raise UserError(f"{name} is a directory; pass one image file.")
    if path.exists() and not is_regular_file(str(path)):  # opened, a FIFO without a writer would wait forever
        raise UserError(f"{name} is not a regular file (a pipe or a device); save the image to a file and pass that.")
    try:
        options = DecodeOptions(max_pixels=max_pixels)
        # Decoded first, as `embed` decodes: a bad file fails with its sentence, the C libraries' messages dropped.
        photo, _ = open_rgb(path, options)
        with open_checked(path, options) as raw:  # then the header of a file known to decode: mode and format
            file_format, mode = raw.format, raw.mode
    except FileNotFoundError:
        if path.is_symlink():  # as `embed` says it
            raise UserError(f"{name} is a link to {display_path(os.readlink(path))}, which does not exist.") from None
        if str(given) == "-" or re.match(r"[A-Za-z][A-Za-z0-9+.-]*:/", str(given)):  # a pipe or a URL, meant
            raise UserError(f"{name} does not exist: give an image file (stdin and URLs are not read).") from None
        raise UserError(f"{name} does not exist.") from None
    except TooManyPixels as e:  # not a file that fails: one refused, as asked
        raise UserError(f"{name} is refused: {e}.") from None
    except Exception as e:  # whatever the decoder raises (pillow-heif: ValueError, RuntimeError), as embed reports it
        raise UserError(f"{name} cannot be decoded: {bad_file_reason(e)}.") from None
    return photo, ImageFacts(given, name, photo.width, photo.height, file_format, mode)


def rescaling(factor: float) -> str:
    """The rescale step as a reader writes it: "÷ 255" for SigLIP's 1/255 (printed "× 0.00392157"), else "× f"."""
    if factor > 0 and abs(1 / factor - round(1 / factor)) < 1e-6:
        return f"÷ {round(1 / factor)}"
    return f"× {factor:.6g}"


def preprocessing_steps(pre: PreprocessConfig) -> dict[str, str]:
    """The steps `pre` takes, in order, as `inspect` says them in its header and against the stages that show them:
    "resize" ("squashed to 224×224 (bicubic, no crop)"), "crop", "rescale" ("÷ 255") and "normalize"
    ("(x − 0.5) / 0.5": a mean or std the same for all three channels written once). A step it skips is absent."""
    steps = {}
    resample = PIL_FILTERS.get(pre.resample, f"PIL filter {pre.resample}")
    if pre.do_resize and pre.shortest_edge:
        longest = f", longer side at most {pre.longest_edge}" if pre.longest_edge else ""
        steps["resize"] = f"shorter side resized to {pre.shortest_edge}{longest} ({resample})"
    elif pre.do_resize:
        width, height = pre.resized(pre.width, pre.height)
        steps["resize"] = f"squashed to {width}×{height} ({resample}{'' if pre.center_crop else ', no crop'})"
    if pre.center_crop:
        steps["crop"] = f"center-cropped to {pre.width}×{pre.height}"
    elif pre.keeps_aspect:
        rows, cols = pre.height // pre.patch_size, pre.width // pre.patch_size
        steps["crop"] = (
            f"its whole {pre.patch_size} px patches, as the tower's {rows}×{cols} grid; squashed to "
            f"{pre.width}×{pre.height} where they are not {rows * cols} (transformers fails there)"
        )
    if pre.do_rescale:
        steps["rescale"] = rescaling(pre.rescale_factor)
    if pre.do_normalize:
        steps["normalize"] = f"(x − {_channels_text(pre.image_mean)}) / {_channels_text(pre.image_std)}"
    return steps


def parse_layers(spec: str | int | Iterable[int], num_layers: int) -> tuple[int, ...]:
    """ "first" → (0,), "all" → every layer, "3,0" → (0, 3) (from Python, 3 or [3, 0] too); a layer the tower lacks
    is a `UserError`."""
    if isinstance(spec, int) and not isinstance(spec, bool):
        spec = str(spec)
    elif not isinstance(spec, str):
        spec = ",".join(map(str, spec)) if isinstance(spec, Iterable) else repr(spec)
    spec = spec.strip().lower()
    if spec == "first":
        return (0,) if num_layers else ()  # a tower of no layers (config.json allows it, as transformers does)
    if spec == "all":
        return tuple(range(num_layers))
    try:
        chosen = sorted({int(part) for part in spec.split(",")})
    except ValueError:
        raise UserError(f"layers {spec!r} should be 'first', 'all' or layer numbers such as 0,5,11.") from None
    missing = [i for i in chosen if not 0 <= i < num_layers]
    if missing:
        has = f"layers 0 to {num_layers - 1}" if num_layers else "no encoder layers"
        raise UserError(f"layer {missing[0]} does not exist: this tower has {has}.")
    return tuple(chosen)


def trace(
    model: SiglipVision,
    photo: Image.Image,
    preprocessing: PreprocessConfig,
    *,
    layers: str = "first",
    model_name: str = "",
    image: ImageFacts | None = None,
    random_weights: bool = False,
) -> Inspection:
    """Preprocess `photo`, run one traced forward, and summarise every stage.

    Works on a meta-device model too (shapes only, statistics NaN): how tests check so400m cheaply.
    """
    cfg = model.config
    dropped = cfg.dropped_from(preprocessing.height, preprocessing.width)
    if dropped is None:
        raise UserError(
            f"the preprocessor resizes to {preprocessing.width}×{preprocessing.height} but the model was built for "
            f"{cfg.image_size}×{cfg.image_size} images ({cfg.grid_size}×{cfg.grid_size} patches of "
            f"{cfg.patch_size} px)."
        )
    full = parse_layers(layers, cfg.num_hidden_layers)
    describe = _Describer(cfg, preprocessing)
    resized = resize(photo, preprocessing)  # once: what the model is given, and what the stages show of it
    pixels = _pixels(resized, preprocessing, image)  # first: an image the preprocessing refuses is one sentence
    stages = _image_stages(photo, resized, preprocessing, describe)

    device = model.embeddings.patch_embedding.weight.device
    pixels = pixels[None].to(device)  # (1, C, H, W)
    recorder = _Recorder(frozenset(full), describe)
    with torch.inference_mode():
        model(pixels, recorder)
    stages += recorder.stages

    conv = model.embeddings.patch_embedding.weight
    found = () if conv.is_meta else _non_finite_note(stages, full)
    p, patch_grid, unseen = cfg.patch_size, (cfg.grid_size, cfg.grid_size), dropped
    if preprocessing.keeps_aspect:  # the resized photo's whole patches, which may lie in another grid
        patch_grid = (resized.height // p, resized.width // p)
        unseen = (resized.height - patch_grid[0] * p, resized.width - patch_grid[1] * p)
    return Inspection(
        model=model_name,
        random_weights=random_weights,
        image=image,
        config=cfg,
        preprocessing=preprocessing,
        stages=stages,
        parameters=num_parameters(model),
        parameters_by_module=parameters_by_module(model),
        gflops_per_image=gflops_per_image(cfg),
        layers_in_full=full,
        notes=found + _notes(cfg, preprocessing, dropped),
        photo=photo,
        position_embedding=_cpu(model.embeddings.position_embedding.weight),
        patch_filters=_cpu(conv[:NUM_FILTERS]),
        head_attention=recorder.head_attention,
        token_norms=torch.stack(recorder.token_norms),
        patch_grid=patch_grid,
        dropped=unseen,
    )


def _non_finite_note(stages: list[Stage], full: tuple[int, ...]) -> tuple[str, ...]:
    """The note naming where NaN or infinity first appears, if it does: what a trace is for, when a checkpoint is
    damaged or a dtype overflows. In a layer shown in one line, only the layer is known."""
    broken = first_non_finite(stages)
    if broken is None:
        return ()
    where = f"{broken}: NaN or infinite values first appear here"
    if (layer := layer_of(broken)) is not None and layer not in full:
        where = f"layer {layer}: NaN or infinite values first appear in it (--layers {layer} shows where)"
    return (f"{where}; statistics that hold them are left out (– in the table, null in --json).",)


def parameters_by_module(model: SiglipVision) -> dict[str, int]:
    """Parameter counts by module; encoder layers summed per sub-module as "encoder.layers.*.self_attn" etc."""
    counts: dict[str, int] = {}
    for name, parameter in model.named_parameters():
        # The owning module ("head.mlp.fc1"), or the parameter itself when it is a bare one ("head.probe").
        path = name.rsplit(".", 1)[0] if name.endswith((".weight", ".bias")) else name
        parts = path.split(".")
        key = f"encoder.layers.*.{parts[3]}" if parts[0] == "encoder" else ".".join(parts[:2])
        counts[key] = counts.get(key, 0) + parameter.numel()
    return counts


def layer_of(stage: str) -> int | None:
    """The encoder layer a stage belongs to ("layers.3.mlp.fc1" → 3); None outside the encoder."""
    match = _LAYER_STAGE.fullmatch(stage)
    return int(match[1]) if match else None


class _Recorder(dict):
    """A trace dict that summarises each tensor on arrival instead of storing it."""

    def __init__(self, full_layers: frozenset[int], describe: _Describer):
        super().__init__()
        self.full_layers, self.describe = full_layers, describe
        self.stages: list[Stage] = []
        self.token_norms: list[Tensor] = []  # (N,) per entry
        self.head_attention: Tensor | None = None

    def __setitem__(self, name: str, x: Tensor) -> None:  # the model does `trace[name] = x`
        layer = _LAYER_STAGE.fullmatch(name)
        if name == "embeddings" or (layer and layer[2] == "residual2"):
            self.token_norms.append(_cpu(x[0].norm(dim=-1)))
        if name == "head.attn_weights":
            self.head_attention = _cpu(x[0, :, 0])  # (H, N)
        if layer is None or int(layer[1]) in self.full_layers or layer[2] == "residual2":
            self.stages.append(_summarise(name, x, self.describe(name)))


def _image_stages(
    photo: Image.Image, resized: Image.Image, pre: PreprocessConfig, describe: _Describer
) -> list[Stage]:
    """The stages before the model: decoded image, resized image (`preprocess.resize`), pixels before
    normalization."""
    stages = [_summarise("image", _hwc(photo), describe("image"))]
    if pre.do_resize:
        squashed = not pre.center_crop and resized.size == (pre.width, pre.height)
        distortion = _distortion(photo, pre) if squashed else ""
        if pre.keeps_aspect:
            distortion += _patches_taken(photo, resized, pre)
        stages.append(_summarise("resized_image", _hwc(resized), describe("resized_image") + distortion))
    if pre.do_normalize:
        unnormalized = torch.from_numpy(resized_to_pixels(resized, dataclasses.replace(pre, do_normalize=False)))
        stages.append(_summarise("rescaled_pixels", unnormalized[None], describe("rescaled_pixels")))
    return stages


def _patches_taken(photo: Image.Image, resized: Image.Image, pre: PreprocessConfig) -> str:
    """Where the preprocessing `keeps_aspect`, what the model takes of this photo: "; squashed: 48×32 would be 4×6
    patches, not the tower's 16", "; the top-left 32×32 (1 column dropped)", "; its 2×8 patches laid out as the
    tower's 4×4, in order"."""
    p, (rows, cols) = pre.patch_size, (pre.height // pre.patch_size, pre.width // pre.patch_size)
    width, height = aspect_kept(*photo.size, pre.shortest_edge, pre.longest_edge)
    if (width, height) != resized.size:
        patches = f"{height // p}×{width // p} patches"
        return f"; squashed: {width}×{height} would be {patches}, not the tower's {rows * cols}"
    if (height // p, width // p) != (rows, cols):
        return f"; its {height // p}×{width // p} patches laid out as the tower's {rows}×{cols}, in order"
    lost = (height - rows * p, width - cols * p)
    said = [counted(n, side) for n, side in zip(lost, ("row", "column")) if n]
    return f"; the top-left {pre.width}×{pre.height}" + (f" ({' and '.join(said)} dropped)" if said else "")


def _distortion(photo: Image.Image, pre: PreprocessConfig) -> str:
    """What the squash does to this photo when a reader should know: "; upscaled 19×" for a thumbnail the model
    sees blurred, "; was 6.7× taller than wide" for a strip whose shapes it sees stretched. Empty otherwise."""
    notes = []
    scale = max(pre.width / photo.width, pre.height / photo.height)
    if scale >= 2:
        notes.append(f"upscaled {_factor(scale)}×")
    stretch = (photo.width / photo.height) / (pre.width / pre.height)  # > 1: the photo is the wider
    if max(stretch, 1 / stretch) >= 2:
        shape = "wider than tall" if stretch > 1 else "taller than wide"
        notes.append(f"was {_factor(max(stretch, 1 / stretch))}× {shape}")
    return "".join(f"; {note}" for note in notes)


def _factor(x: float) -> str:
    """6.7, 19, 500, 3,840: two digits, or the whole number (never 5e+02)."""
    return f"{x:,.0f}" if x >= 10 else f"{x:.2g}"


def _pixels(resized: Image.Image, pre: PreprocessConfig, image: ImageFacts | None) -> Tensor:
    """The model's input; an image the preprocessing refuses (off-size, with `do_resize: false`) is one sentence
    that names it."""
    try:
        return torch.from_numpy(resized_to_pixels(resized, pre))
    except BadImage as e:
        raise UserError(f"{image.label}: {e}." if image is not None else f"{e}.") from None


def _hwc(image: Image.Image) -> Tensor:
    return torch.from_numpy(np.asarray(image).copy())  # (H, W, 3) uint8


def _summarise(name: str, x: Tensor, note: str) -> Stage:
    dtype = str(x.dtype).removeprefix("torch.")
    if x.is_meta:  # a shape-only run
        stats = (math.nan,) * 4
    elif x.dtype == torch.uint8:  # the decoded photo: from its histogram, not a float64 copy (3.6 GB at 150 MP)
        counts = torch.bincount(x.flatten(), minlength=256).double()
        levels = torch.arange(256, dtype=torch.float64)
        mean = (counts * levels).sum() / counts.sum()
        std = ((counts * (levels - mean) ** 2).sum() / counts.sum()).sqrt()
        present = counts.nonzero()
        stats = (mean.item(), std.item(), float(present[0]), float(present[-1]))
    else:
        values = x.detach() if x.is_floating_point() else x.detach().double()
        std, mean = torch.std_mean(values, correction=0)
        low, high = torch.aminmax(values)
        stats = (mean.item(), std.item(), low.item(), high.item())
    return Stage(name, tuple(x.shape), dtype, *stats, note=note)


def _cpu(x: Tensor) -> Tensor:
    return x.detach().float() if x.is_meta else x.detach().float().cpu()


def first_non_finite(stages: list[Stage]) -> str | None:
    """The name of the first stage holding NaN or an infinity, if any."""
    for stage in stages:
        if not all(math.isfinite(v) for v in (stage.mean, stage.std, stage.min, stage.max)):
            return stage.stage
    return None


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _notes(cfg: VisionConfig, pre: PreprocessConfig, dropped: tuple[int, int]) -> tuple[str, ...]:
    notes = []
    if any(dropped):
        g, covered = cfg.grid_size, cfg.grid_size * cfg.patch_size
        size = f"{pre.height} px" if pre.height == pre.width else f"{pre.width}×{pre.height} px"
        rows, columns = dropped
        if rows == columns:
            lost = f"{rows} pixel rows and columns (bottom and right)"
        else:
            sides = ((rows, "rows (bottom)"), (columns, "columns (right)"))
            lost = " and ".join(f"{n} pixel {side}" for n, side in sides if n)
        notes.append(
            f"{size} is not a multiple of the {cfg.patch_size} px patch: the patch conv sees a {g}×{g} grid "
            f"({covered}×{covered} px) and the last {lost} are dropped."
        )
    if not cfg.vision_use_head:
        notes.append(
            "this tower has no attention-pool head (vision_use_head: false, as in PaliGemma): the head stages and "
            "the head-attention plot are skipped, and 'pooled' is the mean of the patch tokens."
        )
    return tuple(notes)


class _Describer:
    """What each stage is, worded so that a reader of the architecture recognises it."""

    def __init__(self, cfg: VisionConfig, pre: PreprocessConfig):
        D, F, H, Dh, g, p = (
            cfg.hidden_size,
            cfg.intermediate_size,
            cfg.num_attention_heads,
            cfg.head_dim,
            cfg.grid_size,
            cfg.patch_size,
        )
        N = cfg.num_patches
        steps = preprocessing_steps(pre)
        resized = steps.get("resize", "")  # the resized_image stage is there only where the checkpoint resizes
        pooled = "the image embedding (not L2-normalized)" if cfg.vision_use_head else "mean of the patch tokens (no head)"
        self.fixed = {
            "image": "decoded to 8-bit RGB (transparency onto white), EXIF orientation applied",
            "resized_image": resized + (f", to be {steps['crop']}" if "crop" in steps else ""),
            "rescaled_pixels": f"{steps.get('rescale', 'not rescaled')}, before normalization",
            "pixel_values": f"{steps.get('normalize', 'not normalized')}: the model input",
            "patch_embedding": f"Conv2d {cfg.num_channels}→{D}, {p}×{p} kernel, stride {p}: a {g}×{g} grid",
            "patches": f"grid flattened to {N} tokens of width {D} (no CLS token)",
            "position_embedding": f"learned, one vector per patch position ({N} × {D})",
            "embeddings": "patches + position embeddings",
            "post_layernorm": "final LayerNorm: the patch tokens",
            "head.probe": "learned query of the attention-pool head",
            "head.attn_weights": f"the probe's attention over the {N} patches, per head",
            "head.attention": "attention-pooled vector, before the head's residual MLP",
            "head.layernorm": "the head's LayerNorm",
            "head.mlp.fc1": f"{D} → {F}",
            "head.mlp.gelu": ACTIVATION_NAMES[cfg.activation],
            "head.mlp.fc2": f"{F} → {D}",
            "pooled": f"{pooled}: head.attention + head.mlp.fc2" if cfg.vision_use_head else pooled,
        }
        self.in_layer = {
            "layer_norm1": "pre-attention LayerNorm",
            "self_attn.q": f"queries, split into {H} heads of {Dh}",
            "self_attn.k": f"keys, split into {H} heads of {Dh}",
            "self_attn.v": f"values, split into {H} heads of {Dh}",
            "self_attn.attn_weights": f"softmax(q·kᵀ / √{Dh}): each row sums to 1",
            "self_attn.attn_output": f"weights · v, {H} heads merged back to {D}",
            "self_attn.out_proj": "attention output projection",
            "residual1": "x + attention",
            "layer_norm2": "pre-MLP LayerNorm",
            "mlp.fc1": f"{D} → {F}",
            "mlp.gelu": ACTIVATION_NAMES[cfg.activation],
            "mlp.fc2": f"{F} → {D}",
            "residual2": "x + MLP: the layer's output",
        }

    def __call__(self, name: str) -> str:
        layer = _LAYER_STAGE.fullmatch(name)
        return self.in_layer.get(layer[2], "") if layer else self.fixed.get(name, "")


def _channels_text(values: tuple[float, float, float]) -> str:
    """A per-channel mean or std as written in a report: one number when the three agree."""
    return f"{values[0]:g}" if len(set(values)) == 1 else "(" + ", ".join(f"{v:g}" for v in values) + ")"
