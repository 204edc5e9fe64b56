"""Model and preprocessing configuration: Hub `config.json` / `preprocessor_config.json` readers and presets.

Field names are the Hub's, so a config reads like the `vision_config` block of the checkpoint it came from.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, NamedTuple

from .errors import UserError


class ConfigError(UserError):
    """A checkpoint configuration we cannot run."""


# transformers' activation names (its ACT2FN) → the function, as `model.ACTIVATION_FUNCTIONS` names it. SigLIP trains
# with the tanh GELU; "gelu_new", "gelu_fast", "gelu_accurate" and "gelu_python_tanh" are other implementations of
# it, as "gelu_python" is of the exact (erf) GELU. No SigLIP checkpoint uses the others; transformers builds towers
# with them (fine-tunes, tiny test towers), and so do we, laplace and sqrtsoftplus (written for attention and routers)
# too. Left out: prelu and xielu, which have weights of their own (a tensor in each MLP our key map does not read).
ACTIVATIONS = {
    **dict.fromkeys(["gelu_pytorch_tanh", "gelu_new", "gelu_fast", "gelu_accurate", "gelu_python_tanh"], "gelu_tanh"),
    **dict.fromkeys(["gelu", "gelu_python"], "gelu"),
    "quick_gelu": "quick_gelu",
    "gelu_10": "gelu_10",
    "relu": "relu",
    "relu2": "relu2",
    "relu6": "relu6",
    "leaky_relu": "leaky_relu",
    "silu": "silu",
    "swish": "silu",
    "mish": "mish",
    "hardswish": "hardswish",
    "tanh": "tanh",
    "sigmoid": "sigmoid",
    "linear": "identity",
    "laplace": "laplace",
    "sqrtsoftplus": "sqrtsoftplus",
}


def _check_int(name: str, value: Any, *, least: int = 1) -> None:
    """A config value read from JSON must be a whole number (not a string, float or bool) of at least `least`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        kind = "a positive integer" if least == 1 else f"a whole number ≥ {least}"
        raise ConfigError(f"{name} must be {kind}, not {value!r}.")


_INT_FIELDS = (
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_channels", "image_size",
    "patch_size",
)


@dataclass(frozen=True)
class VisionConfig:
    """The SigLIP vision tower. Defaults are transformers' `SiglipVisionConfig` defaults (B/16 at 224 px)."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 16
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6
    # PaliGemma's tower has no attention-pool head: the language model reads the patch tokens.
    vision_use_head: bool = True

    @property
    def activation(self) -> str:
        """The function `hidden_act` names: "gelu_tanh" (SigLIP's), "gelu" (exact, erf), or one of `ACTIVATIONS`'."""
        return ACTIVATIONS[self.hidden_act]

    def __post_init__(self) -> None:
        for name in _INT_FIELDS:
            # No layers: transformers allows it, so do we.
            _check_int(name, getattr(self, name), least=0 if name == "num_hidden_layers" else 1)
        if isinstance(self.layer_norm_eps, bool) or not isinstance(self.layer_norm_eps, (int, float)):
            raise ConfigError(f"layer_norm_eps must be a number, not {self.layer_norm_eps!r}.")
        if not isinstance(self.vision_use_head, bool):
            raise ConfigError(f"vision_use_head must be true or false, not {self.vision_use_head!r}.")
        if not isinstance(self.hidden_act, str) or self.hidden_act not in ACTIVATIONS:
            raise ConfigError(f"hidden_act {self.hidden_act!r} is not supported (expected one of {', '.join(ACTIVATIONS)}).")
        if self.num_channels != 3:
            raise ConfigError(f"num_channels {self.num_channels} is not supported: photos are embedded as RGB (3 channels).")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}."
            )
        if self.image_size < self.patch_size:
            raise ConfigError(f"image_size {self.image_size} is smaller than patch_size {self.patch_size}.")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def grid_size(self) -> int:
        # The patch conv has no padding: pixels past the last whole patch are dropped (384 // 14 = 27).
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def dropped_pixels(self) -> int:
        """Pixel rows (and columns) at the bottom (right) edge of an image_size input that no patch covers."""
        return self.image_size - self.grid_size * self.patch_size

    def dropped_from(self, height: int, width: int) -> tuple[int, int] | None:
        """The pixel rows (bottom) and columns (right) of a height × width input that no patch covers; None where
        its whole patches do not make this tower's grid. The input need not be image_size: the patch conv drops
        what lies past the last whole patch, so transformers runs a preprocessor's 35 px for a 32 px tower at patch
        8 (a 4×4 grid both), and so do we."""
        p, g = self.patch_size, self.grid_size
        if (height // p, width // p) != (g, g):
            return None
        return height - g * p, width - g * p


PIL_FILTERS = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
# What `siglip inspect` and `siglip bench` run when given no --model: B/16's shape, random weights, no download.
DEFAULT_PRESET = "siglip-base-patch16-224"
DEFAULT_MODEL = "google/siglip-base-patch16-224"  # what `siglip embed` runs when given none
# `siglip embed`'s batch on the CPU and on CUDA, when not given (`runtime.default_batch_size` says why).
CPU_BATCH_SIZE, CUDA_BATCH_SIZE = 32, 128
# Where Pillow itself refuses an image (twice `Image.MAX_IMAGE_PIXELS`, above which it only warns): ~179 MP. 100 MP
# cameras (Fujifilm GFX100, Hasselblad X2D) and phones' 108 MP mode are ordinary photos, which transformers embeds.
DEFAULT_MAX_PIXELS = 2 * (1024 * 1024 * 1024 // 4 // 3)


@dataclass(frozen=True)
class PreprocessConfig:
    """Squash-resize to (height, width), then x * rescale_factor, then (x - mean) / std, channel by channel.

    (height, width) is what the model takes. SigLIP's processors resize straight to it; CLIP-style ones, which some
    fine-tunes carry, resize to `resize_to` (height, width), or so that the shorter side is `shortest_edge` (aspect
    kept; smaller where the longer side would pass `longest_edge`), and then `center_crop` to it.

    A shortest edge with no crop after it (`keeps_aspect`: what `SiglipImageProcessor(size=N)` saves, as
    {"shortest_edge": N}) leaves images of several sizes, which transformers runs where their whole `patch_size` px
    patches number the tower's: the patch conv drops what lies past the last whole patch, and the patches, in rows,
    get the position embeddings by their index, so a 2×8 grid runs on a 4×4 tower (as a longest edge can make it).
    Here the model takes those patches laid out as its (height, width) grid in the same order (`preprocess`), which
    it computes on as transformers does on theirs. An image whose patches do not number the tower's, which
    transformers fails on, is squashed to (height, width) instead, as SigLIP's own processors resize."""

    height: int = 224
    width: int = 224
    # PIL resampling filter numbers: 2 bilinear (SigLIP2 repos), 3 bicubic (SigLIP v1 and PaliGemma repos).
    resample: int = 3
    do_resize: bool = True
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    center_crop: bool = False
    resize_to: tuple[int, int] | None = None
    shortest_edge: int | None = None
    longest_edge: int | None = None
    patch_size: int | None = None  # the tower's, where `keeps_aspect`: the patches an image's resized size must make

    @property
    def keeps_aspect(self) -> bool:
        """A shortest edge with no crop after it: the model takes each image's whole patches (class docstring)."""
        return self.shortest_edge is not None and not self.center_crop

    def resized(self, width: int, height: int) -> tuple[int, int]:
        """The (width, height) an image of (width, height) is resized to: as transformers computes it, but for an
        image that `keeps_aspect` would leave with another number of patches than the tower's (transformers fails
        on it): (self.width, self.height)."""
        if self.shortest_edge is None:
            return (self.resize_to[1], self.resize_to[0]) if self.resize_to is not None else (self.width, self.height)
        size = aspect_kept(width, height, self.shortest_edge, self.longest_edge)
        p = self.patch_size
        if self.keeps_aspect and (size[0] // p) * (size[1] // p) != (self.width // p) * (self.height // p):
            return self.width, self.height
        return size

    def __post_init__(self) -> None:
        if isinstance(self.resample, bool) or not isinstance(self.resample, int) or self.resample not in PIL_FILTERS:
            # A string is refused though transformers 5 runs it: its PIL processor resizes with bilinear whatever
            # the string says ("bicubic" included). Read as named, we would not match transformers; read as there,
            # not what the config's author meant: the user should choose, by writing the number.
            string = isinstance(self.resample, str)
            named = ": transformers would resize with bilinear whatever it says" if string else ""
            raise ConfigError(
                f"resample {self.resample!r} is not a PIL filter number "
                f"({', '.join(f'{n} {name}' for n, name in PIL_FILTERS.items())}){named}."
            )
        for name in ("height", "width"):
            _check_int(f"preprocessor {name}", getattr(self, name))
        for name in ("do_resize", "do_rescale", "do_normalize"):
            if not isinstance(getattr(self, name), bool):  # bool("false") is True: a string must not pass
                raise ConfigError(f"preprocessor {name} must be true or false, not {getattr(self, name)!r}.")
        if isinstance(self.rescale_factor, bool) or not isinstance(self.rescale_factor, (int, float)):
            raise ConfigError(f"preprocessor rescale_factor must be a number, not {self.rescale_factor!r}.")
        for name in ("shortest_edge", "longest_edge"):
            if getattr(self, name) is not None:
                _check_int(f"preprocessor {name}", getattr(self, name))
        if self.longest_edge is not None and self.shortest_edge is None:
            raise ConfigError("preprocessor longest_edge is read only with a shortest_edge.")
        for side in self.resize_to or ():
            _check_int("preprocessor size", side)
        if not self.center_crop and self.resize_to is not None:
            raise ConfigError("a resize to another size than the model's needs a center crop after it.")
        if self.keeps_aspect:
            _check_int("preprocessor patch_size (the tower's, for a shortest edge without a crop)", self.patch_size)
            if (self.height % self.patch_size, self.width % self.patch_size) != (0, 0):
                raise ConfigError("a shortest edge without a crop takes whole patches: height and width too.")

    def to_dict(self) -> dict[str, Any]:
        """As recorded with an output: the crop's fields only where it crops, and a longest edge only where there is
        one, so that outputs of the same preprocessing read as those of versions without them."""
        fields = dataclasses.asdict(self)
        if not self.center_crop:
            cropping = ("center_crop", "resize_to") + (() if self.keeps_aspect else ("shortest_edge",))
            fields = {k: v for k, v in fields.items() if k not in cropping}
        for name in ("longest_edge", "patch_size"):
            if fields.get(name, 0) is None:
                fields.pop(name)
        return fields


def aspect_kept(width: int, height: int, shortest_edge: int, longest_edge: int | None = None) -> tuple[int, int]:
    """The (width, height) transformers resizes an image of (width, height) to for a shortest edge: the aspect kept,
    smaller where the longer side would pass `longest_edge`."""
    short, long = sorted((width, height))
    shorter, longer = shortest_edge, int(shortest_edge * long / short)
    if longest_edge is not None and long / short * shortest_edge > longest_edge:
        # transformers' `get_size_with_aspect_ratio`: the short side rounded, the long one from the unrounded, and an
        # image whose short side that already is keeps its size.
        exact = longest_edge * short / long
        shorter, longer = round(exact), int(exact * long / short)
        if shorter == short:
            return width, height
    return (shorter, longer) if width <= height else (longer, shorter)


_BASE = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
_LARGE = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16)
_SO400M = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16)
_GIANT = dict(hidden_size=1536, intermediate_size=6144, num_hidden_layers=40, num_attention_heads=16)
_BICUBIC, _BILINEAR = 3, 2


def _preset(shape: dict, patch: int, size: int, resample: int, head: bool = True) -> tuple[VisionConfig, PreprocessConfig]:
    vision = VisionConfig(**shape, patch_size=patch, image_size=size, vision_use_head=head)
    return vision, PreprocessConfig(height=size, width=size, resample=resample)


# Every public fixed-resolution tower, named like its Hub repo without the organisation.
PRESETS: dict[str, tuple[VisionConfig, PreprocessConfig]] = {
    **{f"siglip-base-patch16-{s}": _preset(_BASE, 16, s, _BICUBIC) for s in (224, 256, 384, 512)},
    "siglip-base-patch16-256-multilingual": _preset(_BASE, 16, 256, _BICUBIC),
    **{f"siglip-large-patch16-{s}": _preset(_LARGE, 16, s, _BICUBIC) for s in (256, 384)},
    **{f"siglip-so400m-patch14-{s}": _preset(_SO400M, 14, s, _BICUBIC) for s in (224, 384)},
    "siglip-so400m-patch16-256-i18n": _preset(_SO400M, 16, 256, _BICUBIC),
    **{f"siglip2-base-patch16-{s}": _preset(_BASE, 16, s, _BILINEAR) for s in (224, 256, 384, 512)},
    "siglip2-base-patch32-256": _preset(_BASE, 32, 256, _BILINEAR),
    **{f"siglip2-large-patch16-{s}": _preset(_LARGE, 16, s, _BILINEAR) for s in (256, 384, 512)},
    **{f"siglip2-so400m-patch14-{s}": _preset(_SO400M, 14, s, _BILINEAR) for s in (224, 384)},
    **{f"siglip2-so400m-patch16-{s}": _preset(_SO400M, 16, s, _BILINEAR) for s in (256, 384, 512)},
    **{f"siglip2-giant-opt-patch16-{s}": _preset(_GIANT, 16, s, _BILINEAR) for s in (256, 384)},
    **{f"paligemma-3b-pt-{s}": _preset(_SO400M, 14, s, _BICUBIC, head=False) for s in (224, 448, 896)},
    **{f"paligemma2-3b-pt-{s}": _preset(_SO400M, 14, s, _BICUBIC, head=False) for s in (224, 448, 896)},
}


def json_kind(value: object) -> str:
    """What a parsed JSON value is, in JSON's words: 'a string', 'an array', 'null'."""
    kinds = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "a number"}
    return kinds.get(type(value), "a number" if isinstance(value, float) else "null")


# The tower transformers' PaliGemmaConfig builds when config.json gives no vision_config.
PALIGEMMA_DEFAULT_TOWER = {
    "hidden_size": 1152, "intermediate_size": 4096, "num_hidden_layers": 27, "num_attention_heads": 16,
    "patch_size": 14, "image_size": 224,
}  # fmt: skip


# Fields only a vision config has: a config.json without model_type that holds one describes a tower (hidden_size or
# num_hidden_layers alone could be a text model's).
_TOWER_FIELDS = ("patch_size", "image_size")


def vision_config_from_hub(config: dict[str, Any]) -> VisionConfig:
    """Read the vision tower out of a Hub `config.json` (already parsed), filling transformers' defaults."""
    model_type = config.get("model_type")
    if model_type is None:
        model_type = _implied_model_type(config)
    if model_type == "siglip_vision_model":
        fields, default_head = config, True
    elif model_type == "siglip":  # a missing vision_config means transformers' defaults, as transformers reads it
        fields, default_head = config.get("vision_config") or {}, True
    elif model_type == "paligemma":
        fields, default_head = config.get("vision_config"), False
        if fields is None:  # transformers then builds PaliGemma's own tower, not SigLIP's default one
            fields = PALIGEMMA_DEFAULT_TOWER
    elif model_type in ("siglip2", "siglip2_vision_model"):
        raise ConfigError(
            f"SigLIP2 NaFlex checkpoints (model_type {model_type!r}, variable resolution) are a different model and are not "
            "supported; use a fixed-resolution SigLIP2 repo such as google/siglip2-base-patch16-224."
        )
    else:
        raise ConfigError(
            f"model_type {model_type!r} is not a SigLIP vision tower (supported: siglip, siglip_vision_model, paligemma)."
        )
    if not isinstance(fields, dict):
        raise ConfigError(f"its vision_config is {json_kind(fields)}, not a JSON object.")
    known = {f.name for f in dataclasses.fields(VisionConfig)}
    values = {name: fields[name] for name in known if name in fields}
    values.setdefault("vision_use_head", default_head)
    for name in ("image_size", "patch_size"):
        values[name] = _square(name, values.get(name, getattr(VisionConfig, name)))
    return VisionConfig(**values)


def _implied_model_type(config: dict[str, Any]) -> str:
    """The model_type a config.json without one is read as.

    transformers' AutoModel cannot load such a folder, but `SiglipVisionModel.from_pretrained` can, and that is how
    towers exported by hand or by conversion scripts that leave model_type out are loaded: it reads the file with its
    own config class, `SiglipVisionConfig`, which takes the `vision_config` entry where there is one and the whole
    file where not. We read it the same way, as `siglip` (a vision_config) or `siglip_vision_model` (the file itself),
    but only where the file says it describes a tower: the whole file must hold a tower's own field (_TOWER_FIELDS)
    and no text_config. Anything else (an empty file, a text model's) is refused: SiglipVisionConfig's defaults would
    make it a B/16 tower at 224 px that the weights merely might fit.
    """
    if config.get("vision_config") is not None:  # one that is not an object is refused by the caller, naming it
        return "siglip"
    if "text_config" not in config and any(field in config for field in _TOWER_FIELDS):
        return "siglip_vision_model"
    raise ConfigError(
        f"config.json has no model_type, and neither a vision_config nor a vision tower's {' or '.join(_TOWER_FIELDS)}."
    )


def _square(name: str, value: int | list[int]) -> int:
    """A size given as one value or as a square pair; whether it is a whole number is VisionConfig's check."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ConfigError(f"{name} {list(value)} is not square; only square images and patches are supported.")
        return value[0]
    return value


# What the image processor classes of transformers 5 assume where their config is silent, by the name a config
# gives as `image_processor_type` ("...Fast" and "...Pil" alike). SigLIP's are PreprocessConfig's own but for the
# size (`_default_size`): a config written by hand often leaves them out. Another class's are its own: a CLIP
# processor's config without its mean and std was normalized as SigLIP's, silently.
_OPENAI_CLIP = {"image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}
_SHORTEST_EDGE_THEN_CROP = {
    "size": {"shortest_edge": 224}, "resample": _BICUBIC, "do_center_crop": True, "crop_size": 224, **_OPENAI_CLIP
}  # fmt: skip
PROCESSOR_DEFAULTS: dict[str, dict[str, Any]] = {
    "SiglipImageProcessor": {},
    "CLIPImageProcessor": _SHORTEST_EDGE_THEN_CROP,
    "BitImageProcessor": _SHORTEST_EDGE_THEN_CROP,
    "ViTImageProcessor": {"size": {"height": 224, "width": 224}, "resample": _BILINEAR},
    "ConvNextImageProcessor": {"size": {"shortest_edge": 384}, "resample": _BICUBIC, "crop_pct": 224 / 256},
}
# The settings whose defaults differ from class to class: a config naming a class we do not know must give them.
_CLASS_SETTINGS = ("size", "resample", "image_mean", "image_std")


def preprocess_config_from_hub(config: dict[str, Any] | None, vision: VisionConfig) -> PreprocessConfig:
    """Read a Hub `preprocessor_config.json` (parsed), or derive SigLIP's defaults from the tower when absent."""
    if config is None:
        return PreprocessConfig(height=vision.image_size, width=vision.image_size)
    config = _as_convnext_resizes(_with_class_defaults(config))
    do_resize = _flag(config.get("do_resize", True))  # null: transformers' processor skips the step, as for false
    do_center_crop = _flag(config.get("do_center_crop", False))
    if not isinstance(do_center_crop, bool):  # bool("false") is True: a string must not pass
        raise ConfigError(f"preprocessor do_center_crop must be true or false, not {do_center_crop!r}.")
    resize = _Resize()
    if do_resize is not False:  # else `size` is ignored (by transformers too)
        resize = _resize_target(config, vision, crop=do_center_crop)
    resize_to = resize.to
    crop = False  # whether a crop is left to do once the image is resized
    patch_size = None  # the tower's, where the resize keeps the aspect with no crop after it
    if do_center_crop:
        height, width = _crop_size(config.get("crop_size"))
        resize_to = None if resize_to == (height, width) else resize_to  # a crop that takes the whole image
        crop = resize_to is not None or resize.shortest_edge is not None or do_resize is False
    elif resize.shortest_edge is not None:  # `PreprocessConfig.keeps_aspect`: the tower's grid of whole patches
        height = width = vision.grid_size * vision.patch_size
        patch_size = vision.patch_size
    else:  # without resizing, images must come at the tower's size
        height, width = resize_to or (vision.image_size, vision.image_size)
        resize_to = None
    defaults = PreprocessConfig()
    # null: skipped, as do_resize above.
    do_rescale, do_normalize = _flag(config.get("do_rescale", True)), _flag(config.get("do_normalize", True))

    def setting(name: str, used: bool) -> Any:
        """A step's setting; a null one of a step switched off is the default (transformers' own
        `save_pretrained` writes `"image_mean": null` beside `"do_normalize": false`)."""
        value = config.get(name)
        return getattr(defaults, name) if value is None and (name not in config or not used) else value

    return PreprocessConfig(
        height=height,
        width=width,
        resample=setting("resample", do_resize is not False),
        do_resize=do_resize,
        do_rescale=do_rescale,
        rescale_factor=setting("rescale_factor", do_rescale is not False),
        do_normalize=do_normalize,
        image_mean=_triple("image_mean", setting("image_mean", do_normalize is not False)),
        image_std=_triple("image_std", setting("image_std", do_normalize is not False)),
        center_crop=crop,
        resize_to=resize_to,
        shortest_edge=resize.shortest_edge,
        longest_edge=resize.longest_edge,
        patch_size=patch_size,
    )


def _with_class_defaults(config: dict[str, Any]) -> dict[str, Any]:
    """`config` with the defaults of the processor class it names (`PROCESSOR_DEFAULTS`) where it is silent, and
    that class as its `image_processor_type`. A config older than image processors names a feature extractor
    instead ("CLIPFeatureExtractor"), which transformers reads as the image processor of that name."""
    kind = config.get("image_processor_type")
    legacy = config.get("feature_extractor_type")
    if kind is None and isinstance(legacy, str):
        kind = legacy.replace("FeatureExtractor", "ImageProcessor")
        config = {**config, "image_processor_type": kind}
    if kind is None:
        return config
    if not isinstance(kind, str):
        raise ConfigError(f"preprocessor image_processor_type must be a class name, not {kind!r}.")
    name = _class_name(kind)
    if name in PROCESSOR_DEFAULTS:
        return {**PROCESSOR_DEFAULTS[name], **config}
    missing = [setting for setting in _CLASS_SETTINGS if setting not in config]
    if missing:
        raise ConfigError(
            f"the preprocessor is a {kind}, whose defaults are unknown here, and its config leaves out "
            f"{', '.join(missing)}: write them in, as transformers' save_pretrained does."
        )
    return config


def _as_convnext_resizes(config: dict[str, Any]) -> dict[str, Any]:
    """A config of ConvNeXT's processor, which resizes its own way, in the forms read here (a fine-tune may carry
    it): below 384 px, the shorter side to `size / crop_pct` and then the middle `size` × `size`; from 384 px,
    squashed to `size` × `size`, as transformers' `ConvNextImageProcessor` does. Any other config as it is."""
    if _class_name(config.get("image_processor_type") or "") != "ConvNextImageProcessor":
        return config
    if _flag(config.get("do_resize", True)) is False:
        return config
    size = config.get("size")
    edge = size.get("shortest_edge") if isinstance(size, dict) and set(size) == {"shortest_edge"} else size
    if isinstance(edge, bool) or not isinstance(edge, int):
        raise ConfigError(f"preprocessor size {size!r} is not a ConvNeXT processor's: a shortest_edge.")
    _check_int("preprocessor shortest_edge", edge)
    if _flag(config.get("do_center_crop", False)):
        raise ConfigError("a ConvNeXT preprocessor that center-crops again after its own crop is not read here.")
    if edge >= 384:  # warped, not cropped, from 384 px
        return {**config, "size": {"height": edge, "width": edge}}
    crop_pct = config.get("crop_pct")
    crop_pct = 224 / 256 if crop_pct is None else crop_pct  # null: the class's, as transformers reads it
    if isinstance(crop_pct, bool) or not isinstance(crop_pct, (int, float)) or not 0 < crop_pct:
        raise ConfigError(f"preprocessor crop_pct must be a positive number, not {crop_pct!r}.")
    return {**config, "size": {"shortest_edge": int(edge / crop_pct)}, "do_center_crop": True, "crop_size": edge}


class _Resize(NamedTuple):
    """What a preprocessor config resizes to: a fixed (height, width), or a shorter side of `shortest_edge` with the
    aspect kept (and the longer side at most `longest_edge`)."""

    to: tuple[int, int] | None = None
    shortest_edge: int | None = None
    longest_edge: int | None = None


# The processor classes of transformers 5 that read a `size` of one number as a shortest edge (their
# `default_to_square` is False); the others read it as a square.
_ONE_NUMBER_IS_A_SHORTEST_EDGE = ("SiglipImageProcessor", "CLIPImageProcessor", "BitImageProcessor")

# The forms of `size` a fixed-size tower can use, as transformers 5 reads them: by their keys exactly, even where a
# value is null (transformers refuses {"height", "width", "shortest_edge"} rather than choose one). Its others
# ({"longest_edge"}, {"max_height", "max_width"}, pixel counts) are for towers of any size.
_SIZE_FORMS = ({"height", "width"}, {"shortest_edge"}, {"shortest_edge", "longest_edge"})


def _class_name(kind: str) -> str:
    """A processor class's name without its backend's suffix: "CLIPImageProcessorFast" is "CLIPImageProcessor"."""
    return kind.removesuffix("Fast").removesuffix("Pil")


_SIGLIP_SIZE = 224  # SiglipImageProcessor's own size in transformers 5


def _default_size(vision: VisionConfig) -> dict[str, int]:
    """The size of a SigLIP preprocessor config that gives none: transformers' class default, 224×224, where its
    patches make the tower's grid (transformers runs it, so we must too: a 226 px tower at patch 16 sees 224 px
    there); else the tower's `image_size`, where transformers fails on the position embedding."""
    side = _SIGLIP_SIZE if vision.dropped_from(_SIGLIP_SIZE, _SIGLIP_SIZE) is not None else vision.image_size
    return {"height": side, "width": side}


def _resize_target(config: dict[str, Any], vision: VisionConfig, *, crop: bool) -> _Resize:
    size = config.get("size", _default_size(vision))
    if size is None:
        raise ConfigError("preprocessor size is null: it must be the model's (height, width).")
    if isinstance(size, int) and not isinstance(size, bool):
        # A bare number: a shortest edge for the classes that say so (`_ONE_NUMBER_IS_A_SHORTEST_EDGE`), a square
        # for the rest, transformers' default. The class: a str, or null read as absent (as `_with_class_defaults`
        # reads it).
        kind = _class_name(config.get("image_processor_type") or "SiglipImageProcessor")
        shortest = kind in _ONE_NUMBER_IS_A_SHORTEST_EDGE
        size = {"shortest_edge": size} if shortest else {"height": size, "width": size}
    if isinstance(size, (list, tuple)) and len(size) == 2:  # (height, width), as transformers reads a pair
        size = {"height": size[0], "width": size[1]}
    form = set(size) if isinstance(size, dict) else None
    if form == {"height", "width"}:
        return _Resize(to=(size["height"], size["width"]))
    if form not in _SIZE_FORMS:
        raise ConfigError(
            f"preprocessor size {size} is none of the forms read here: {{height, width}}, {{shortest_edge}}, "
            "{shortest_edge, longest_edge}."
        )
    _check_int("preprocessor shortest_edge", size["shortest_edge"])  # a null one transformers fails on too
    if size.get("longest_edge") is not None:
        _check_int("preprocessor longest_edge", size["longest_edge"])
    resize = _Resize(shortest_edge=size["shortest_edge"], longest_edge=size.get("longest_edge"))
    # `PreprocessConfig.keeps_aspect`. Without a longest edge every image's shorter side gives N // p rows (or
    # columns) of patches, which must go into the tower's g × g a whole number of times, at least as often.
    rows, p, g = resize.shortest_edge // vision.patch_size, vision.patch_size, vision.grid_size
    if not crop and resize.longest_edge is None and not (0 < rows <= g and g * g % rows == 0):
        raise ConfigError(
            f"preprocessor size {size} keeps the aspect with no crop after it, and its shorter side of "
            f"{resize.shortest_edge} px, {rows} rows of {p} px patches, makes no image the tower's {g * g} patches: "
            "transformers fails on every image."
        )
    return resize


def _crop_size(crop: Any) -> tuple[int, int]:
    """A center crop's (height, width): {"height": h, "width": w}, a pair (as `size` may be), or one number for a
    square."""
    if isinstance(crop, int) and not isinstance(crop, bool):
        return crop, crop
    if isinstance(crop, (list, tuple)) and len(crop) == 2:
        return crop[0], crop[1]
    if isinstance(crop, dict) and "height" in crop and "width" in crop:
        return crop["height"], crop["width"]
    raise ConfigError(f"preprocessor crop_size {crop!r} is not a (height, width).")


def _flag(value: Any) -> Any:
    """A config's `do_...` setting, where null means off (transformers' processors skip a step set to null)."""
    return False if value is None else value


def _triple(name: str, value: float | list[float]) -> tuple[float, float, float]:
    """A per-channel setting: three numbers, or one for all three."""
    values = [value] * 3 if isinstance(value, (int, float)) else value
    if (
        not isinstance(values, (list, tuple))
        or len(values) != 3
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    ):
        raise ConfigError(f"preprocessor {name} must be a list of 3 numbers, one per channel, or one number for all "
                          f"three, not {value!r}.")
    return tuple(float(v) for v in values)
