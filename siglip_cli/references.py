"""The towers `siglip bench --compare` measures ours against: transformers and timm, loaded with OUR weights.

transformers' `SiglipVisionModel` (sdpa attention) and timm's `VisionTransformer` are built for the same config and
loaded through explicit key maps (`transformers_state_dict`, `timm_state_dict`), so a speed ratio compares code, not
checkpoints. The tests check that each computes our function (tests/test_bench.py).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

from .errors import UserError, first_line
from .model import ACTIVATION_FUNCTIONS, SiglipVision
from .runtime import compiled

REFERENCES = ("transformers", "timm")

Forward = Callable[[Tensor], Tensor]  # (B, 3, H, W) pixels → (B, D) pooled embedding


def check_references(names: Iterable[str]) -> None:
    """Raise a `UserError` sentence for the first name that is not one of `REFERENCES`."""
    unknown = [name for name in names if name not in REFERENCES]
    if unknown:
        raise UserError(f"unknown comparison {unknown[0]!r} (expected one of {', '.join(REFERENCES)}).")


INSTALL_REFERENCES = "`pip install transformers timm` installs both references; in a clone of siglip, `.[bench]`"


def missing_package(name: str) -> str | None:
    """One sentence when the library behind comparison `name` is not installed, or does not import (a version that
    does not match torch's, an old one without what the reference needs), else None."""
    if importlib.util.find_spec(name) is None:
        return f"{name} comparison skipped: the {name} package is not installed ({INSTALL_REFERENCES})."
    needs = {"timm": ["timm.layers.GELUTanh", "timm.models.vision_transformer.VisionTransformer"],
             "transformers": ["transformers.SiglipVisionConfig", "transformers.SiglipVisionModel"]}  # fmt: skip
    try:
        for needed in needs[name]:  # what `timm_model` and `transformers_model` build with
            module, attribute = needed.rsplit(".", 1)
            getattr(importlib.import_module(module), attribute)
    except Exception as e:  # a broken install raises anything: AttributeError, RuntimeError, ImportError
        return f"{name} comparison skipped: importing {name} failed ({type(e).__name__}: {first_line(e)})."
    return None


def _load_exact(module: nn.Module, state: dict[str, Tensor], *, source: str) -> None:
    """Load `state` into `module` (on its device): every parameter set, nothing left over, every shape checked.

    Not `weights.load_state`, which is made for our tower: it reads `model.config.vision_use_head` (timm has no
    config), keeps only tensors under the tower's child modules (timm's `pos_embed` is a top-level parameter), and
    assigns the given tensors (a reference built on CUDA would end up holding our CPU tensors).
    """
    expected = module.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    misshaped = [key for key in sorted(set(state) & set(expected)) if state[key].shape != expected[key].shape]
    if missing:
        problem = f"leaves {source}'s {missing[0]} unset"
    elif unexpected:
        problem = f"makes {unexpected[0]}, which {source} does not have"
    elif misshaped:
        key = misshaped[0]
        problem = f"gives {key} shape {list(state[key].shape)} where {source} has {list(expected[key].shape)}"
    else:
        problem = None
    if problem:
        raise UserError(f"the {source} key map {problem}: this {source} version names or shapes its parameters "
                        "differently from the one siglip was written for.")  # fmt: skip
    module.load_state_dict(state, strict=True)


def _plain_state(model: SiglipVision) -> dict[str, Tensor]:
    """Our state dict in the checkpoint layout (separate q/k/v): the input of both key maps."""
    state = model.state_dict()
    if any(key.endswith("self_attn.qkv.weight") for key in state):
        raise ValueError("the key maps read an unfused model; map the model before calling fuse_qkv().")
    return state


def transformers_state_dict(model: SiglipVision) -> dict[str, Tensor]:
    """Our weights under transformers 5 `SiglipVisionModel` names.

    Our parameter names ARE the checkpoint keys transformers reads (`embeddings.patch_embedding.weight`,
    `encoder.layers.N.self_attn.q_proj.weight`, `head.attention.in_proj_weight`, ...), so the map is the identity;
    `_load_exact` still checks every key and shape.
    """
    return {key: tensor.clone() for key, tensor in _plain_state(model).items()}


def transformers_model(model: SiglipVision, *, device: torch.device | str = "cpu") -> nn.Module:
    """transformers' `SiglipVisionModel` with sdpa attention, same config, our weights; float32, built on `device`."""
    try:
        from transformers import SiglipVisionConfig, SiglipVisionModel
    except ImportError:
        raise UserError(f"--compare transformers needs the transformers package: {INSTALL_REFERENCES}.") from None
    config = SiglipVisionConfig(**dataclasses.asdict(model.config), attn_implementation="sdpa")  # the Hub's names
    with torch.device(device):
        reference = SiglipVisionModel(config)
    _load_exact(reference, transformers_state_dict(model), source="transformers")
    return reference.eval().requires_grad_(False)


def timm_state_dict(model: SiglipVision) -> dict[str, Tensor]:
    """Our weights under timm `VisionTransformer` names (q/k/v concatenated into `attn.qkv`, the probe's
    `in_proj` split into `attn_pool.q` and `attn_pool.kv`)."""
    ours = _plain_state(model)
    D = model.config.hidden_size

    def copy_linear(theirs: str, mine: str) -> dict[str, Tensor]:
        return {f"{theirs}.{p}": ours[f"{mine}.{p}"].clone() for p in ("weight", "bias")}

    state = {
        **copy_linear("patch_embed.proj", "embeddings.patch_embedding"),
        "pos_embed": ours["embeddings.position_embedding.weight"][None].clone(),  # (1, N, D)
        **copy_linear("norm", "post_layernorm"),
    }
    for i in range(model.config.num_hidden_layers):
        mine, theirs = f"encoder.layers.{i}", f"blocks.{i}"
        for p in ("weight", "bias"):
            state[f"{theirs}.attn.qkv.{p}"] = torch.cat([ours[f"{mine}.self_attn.{n}_proj.{p}"] for n in "qkv"])
        for t, m in (("norm1", "layer_norm1"), ("norm2", "layer_norm2"), ("attn.proj", "self_attn.out_proj"),
                     ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")):  # fmt: skip
            state.update(copy_linear(f"{theirs}.{t}", f"{mine}.{m}"))
    if model.config.vision_use_head:
        w, b = ours["head.attention.in_proj_weight"], ours["head.attention.in_proj_bias"]
        state |= {
            "attn_pool.latent": ours["head.probe"].clone(),
            "attn_pool.q.weight": w[:D].clone(), "attn_pool.q.bias": b[:D].clone(),
            "attn_pool.kv.weight": w[D:].clone(), "attn_pool.kv.bias": b[D:].clone(),
            **copy_linear("attn_pool.proj", "head.attention.out_proj"),
            **copy_linear("attn_pool.norm", "head.layernorm"),
            **copy_linear("attn_pool.mlp.fc1", "head.mlp.fc1"),
            **copy_linear("attn_pool.mlp.fc2", "head.mlp.fc2"),
        }  # fmt: skip
    return state


class _Activation(nn.Module):
    """One of `model.ACTIVATION_FUNCTIONS` as a module, for timm's MLP: towers with activations no SigLIP uses."""

    def __init__(self, name: str):
        super().__init__()
        self.name = name

    def forward(self, x: Tensor) -> Tensor:
        return ACTIVATION_FUNCTIONS[self.name](x)


def timm_model(model: SiglipVision, *, device: torch.device | str = "cpu") -> nn.Module:
    """timm's `VisionTransformer` configured like `vit_base_patch16_siglip_224` for our config, our weights; float32."""
    try:
        from timm.layers import GELUTanh
        from timm.models.vision_transformer import VisionTransformer
    except ImportError:
        raise UserError(f"--compare timm needs the timm package: {INSTALL_REFERENCES}.") from None
    cfg = model.config
    activation = {"gelu_tanh": GELUTanh, "gelu": nn.GELU}.get(cfg.activation) or functools.partial(_Activation, cfg.activation)
    with torch.device(device):
        reference = VisionTransformer(
            img_size=cfg.image_size,
            patch_size=cfg.patch_size,
            in_chans=cfg.num_channels,
            num_classes=0,
            # Headless towers (PaliGemma): we pool by the mean of the post-LayerNorm tokens, which is timm's "avg"
            # with the final norm kept before the pool (fc_norm=False).
            global_pool="map" if cfg.vision_use_head else "avg",
            fc_norm=False,
            embed_dim=cfg.hidden_size,
            depth=cfg.num_hidden_layers,
            num_heads=cfg.num_attention_heads,
            # timm sizes the MLP as int(D * ratio): the half keeps float error from rounding 4304 down to 4303.
            mlp_ratio=(cfg.intermediate_size + 0.5) / cfg.hidden_size,
            class_token=False,
            norm_layer=functools.partial(nn.LayerNorm, eps=cfg.layer_norm_eps),
            act_layer=activation,
            weight_init="skip",
        )
    _load_exact(reference, timm_state_dict(model), source="timm")
    return reference.eval().requires_grad_(False)


def reference_forward(backend: str, model: SiglipVision, *, device: torch.device, dtype: torch.dtype,
                      compile: bool = False) -> Forward:  # fmt: skip
    """transformers or timm on our weights as a `Forward` (pooled output), cast to `dtype` like ours."""
    check_references([backend])
    if backend == "transformers":
        reference = transformers_model(model, device=device).to(dtype=dtype)
        headless = not model.config.vision_use_head

        def forward(pixels: Tensor) -> Tensor:
            out = reference(pixel_values=pixels)
            return out.last_hidden_state.mean(dim=1) if headless else out.pooler_output

        module: Forward = forward
    else:
        module = timm_model(model, device=device).to(dtype=dtype)
    return compiled(module, dynamic=False) if compile else module
