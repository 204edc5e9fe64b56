"""The SigLIP vision tower: a pre-LN ViT with an attention-pool head, in plain PyTorch.

Module and parameter names are the Hub checkpoint keys (after the `vision_model.` prefix), so a checkpoint loads
with a strict `load_state_dict`. Every `forward` takes an optional `trace` dict: when given, each stage stores its
output under a readable name as the forward runs (what `siglip inspect` shows), and attention is computed
explicitly so its weights can be recorded. Without a trace the encoder's attention runs through
`F.scaled_dot_product_attention`; the pooling head's one query is always written out (`PoolAttention` says why).

This is the reference path, in public torch ops only. `runtime.prepare_model` fuses q/k/v (`fuse_qkv`) and swaps in
the faster modules of `kernels.py` (fc1 + GELU as one GEMM, oneDNN's matmul on the CPU).

Shapes: B batch, N patches, D hidden, H heads, Dh head dim.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import VisionConfig

# What a traced forward collects: each stage's output by its name ("layers.0.attn.q"), for `siglip inspect`.
Trace = dict[str, Tensor]

# The MLP's activation, by `VisionConfig.activation`; written as transformers computes each.
ACTIVATION_FUNCTIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu_tanh": functools.partial(F.gelu, approximate="tanh"),
    "gelu": F.gelu,
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "gelu_10": lambda x: F.gelu(x).clamp(-10, 10),
    "relu": F.relu,
    "relu2": lambda x: F.relu(x).square(),
    "relu6": F.relu6,
    "leaky_relu": F.leaky_relu,
    "silu": F.silu,
    "mish": F.mish,
    "hardswish": F.hardswish,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "identity": lambda x: x,
    # MEGA's: the normal CDF around mu = 0.707107 with sigma = 0.282095, written as transformers writes it.
    "laplace": lambda x: 0.5 * (1.0 + torch.erf((x - 0.707107).div(0.282095 * math.sqrt(2.0)))),
    "sqrtsoftplus": lambda x: F.softplus(x).sqrt(),
}


def _record(trace: Trace | None, name: str, x: Tensor) -> None:
    if trace is not None:
        trace[name] = x.detach()


def _attend(q: Tensor, k: Tensor, v: Tensor, trace: Trace | None, prefix: str, *, sdpa: bool = True) -> Tensor:
    """Multi-head attention of (B, H, Nq, Dh) queries over (B, H, N, Dh) keys and values: through torch's SDPA
    kernels with `sdpa` (but where a trace keeps the attention weights), written out otherwise."""
    if trace is None and sdpa:
        return F.scaled_dot_product_attention(q, k, v)
    weights = torch.softmax((q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5, dim=-1)  # (B, H, Nq, N)
    _record(trace, f"{prefix}.attn_weights", weights)
    return weights @ v


def _one_at_a_time(step: Callable[..., Tensor], *batches: Tensor) -> Tensor:
    """`step` over batches of one size, one image at a time. Not kept out of `torch.compile` (`torch.compiler.disable`
    imports torch._dynamo, 1.6 s and 150 MB of every run): compiled for the CPU, the passes are fused back into one."""
    return torch.cat([step(*image) for image in zip(*(batch.split(1) for batch in batches))])


class Embeddings(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        # No padding: with patch 14 at 384 px the last 6 pixel rows and columns are never seen.
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size)
        # Zeros, not torch's normal init: `normal_` on the meta device, where checkpoints are loaded, imports
        # torch._dynamo (1.3 s of every `siglip embed`). A checkpoint or `init_weights` sets the real values.
        zeros = torch.zeros(cfg.num_patches, cfg.hidden_size)
        self.position_embedding = nn.Embedding(cfg.num_patches, cfg.hidden_size, _weight=zeros)

    def forward(self, pixel_values: Tensor, trace: Trace | None = None) -> Tensor:
        # The patch conv computed as the matmul it is (kernel = stride = p, no padding: each output is one patch ·
        # one filter), which yields the tokens in (B, N, D) order. The conv's (B, D, h, w) output, transposed, left
        # the whole residual stream strided: every later add and LayerNorm paid for it, and the stride-16 conv
        # itself was slow on cuDNN (bench/RESULTS.md, the H200 runs).
        conv = self.patch_embedding
        p = conv.kernel_size[0]
        B, C, height, width = pixel_values.shape
        h, w = height // p, width // p  # patches down and across
        x = pixel_values[:, :, : h * p, : w * p].to(conv.weight.dtype)
        patches = x.reshape(B, C, h, p, w, p).permute(0, 2, 4, 1, 3, 5).reshape(B, h * w, C * p * p)
        x = F.linear(patches, conv.weight.flatten(1), conv.bias)  # (B, N, D)
        _record(trace, "patch_embedding", x.transpose(1, 2).view(B, -1, h, w))  # as the conv lays it out
        _record(trace, "patches", x)
        _record(trace, "position_embedding", self.position_embedding.weight[None])
        # SigLIP has no CLS token: the image embedding comes from the attention-pool head.
        x = x + self.position_embedding.weight
        _record(trace, "embeddings", x)
        return x


class Attention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.out_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        # Set by `fuse_qkv()`: one (3D, D) matmul instead of three, for speed. Not part of the checkpoint.
        self.qkv: nn.Linear | None = None

    def fuse_qkv(self) -> None:
        """Concatenate q/k/v into one projection (same numbers, one GEMM); drops the separate layers."""
        if self.qkv is not None:
            return
        q, k, v = self.q_proj, self.k_proj, self.v_proj
        # Made on the meta device, then given the concatenated tensors: a real one would first fill itself with a
        # random init that is thrown away (0.13 s of every B/16 run's start on our 2-core CPU, 0.7 s of so400m's).
        fused = nn.Linear(q.in_features, 3 * q.out_features, device="meta")
        with torch.no_grad():
            # As the layers it replaces: a frozen tower stays frozen, and one that trains only its biases trains them.
            fused.weight = nn.Parameter(torch.cat([q.weight, k.weight, v.weight]), q.weight.requires_grad)
            fused.bias = nn.Parameter(torch.cat([q.bias, k.bias, v.bias]), q.bias.requires_grad)
        self.qkv = fused
        del self.q_proj, self.k_proj, self.v_proj

    def forward(self, x: Tensor, trace: Trace | None = None, prefix: str = "attn") -> Tensor:
        B, N, D = x.shape
        if self.qkv is not None:
            q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)  # 3 × (B, H, N, Dh)
        else:
            q, k, v = (proj(x).view(B, N, self.num_heads, -1).transpose(1, 2) for proj in (self.q_proj, self.k_proj, self.v_proj))
        for name, t in (("q", q), ("k", k), ("v", v)):
            _record(trace, f"{prefix}.{name}", t)
        x = _attend(q, k, v, trace, prefix).transpose(1, 2).reshape(B, N, D)
        _record(trace, f"{prefix}.attn_output", x)
        x = self.out_proj(x)
        _record(trace, f"{prefix}.out_proj", x)
        return x


class MLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.activation = ACTIVATION_FUNCTIONS[cfg.activation]

    def forward(self, x: Tensor, trace: Trace | None = None, prefix: str = "mlp") -> Tensor:
        x = self.fc1(x)
        _record(trace, f"{prefix}.fc1", x)
        x = self._activate(x, in_place=trace is None)
        _record(trace, f"{prefix}.gelu", x)  # "gelu" whatever the activation: inspect's stage names are its API
        x = self.fc2(x)
        _record(trace, f"{prefix}.fc2", x)
        return x

    def _activate(self, x: Tensor, *, in_place: bool) -> Tensor:
        """The activation; on the CPU one image at a time, so that an image gets the same bits in any batch. Over
        a whole batch, torch's vectorized GELU leaves the last elements of the tensor, and of each thread's share,
        to its scalar code, whose tanh differs in the last bit: on AVX-512 (16 floats a vector), copies of one image
        in a batch of 3, 5 or 7 came out 1e-7 apart, with so400m-384 too (729 × 4304 values an image). In place,
        image by image, it is also faster: each image's values stay in the cache between the two passes
        (bench/RESULTS.md)."""
        if x.is_cuda:  # every element of a CUDA elementwise kernel runs the same code
            return self.activation(x)
        if not in_place or x.requires_grad:
            return _one_at_a_time(self.activation, x)
        for image in x:
            image.copy_(self.activation(image))
        return x


class EncoderLayer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = Attention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor, trace: Trace | None = None, prefix: str = "layer") -> Tensor:
        h = self.layer_norm1(x)
        _record(trace, f"{prefix}.layer_norm1", h)
        x = x + self.self_attn(h, trace, f"{prefix}.self_attn")
        _record(trace, f"{prefix}.residual1", x)
        h = self.layer_norm2(x)
        _record(trace, f"{prefix}.layer_norm2", h)
        x = x + self.mlp(h, trace, f"{prefix}.mlp")
        _record(trace, f"{prefix}.residual2", x)
        return x


class Encoder(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.num_hidden_layers))

    def forward(self, x: Tensor, trace: Trace | None = None) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x, trace, f"layers.{i}")
        return x


class PoolAttention(nn.Module):
    """`nn.MultiheadAttention`'s parameter layout (q, k, v packed in `in_proj_weight`), attention written out."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        # Zeros: see `Embeddings`. A checkpoint or `init_weights` (xavier, as `nn.MultiheadAttention`) sets them.
        self.in_proj_weight = nn.Parameter(torch.zeros(3 * cfg.hidden_size, cfg.hidden_size))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * cfg.hidden_size))
        self.out_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def keys_values(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The (B, N, D) tokens `x` → their keys and values, 2 × (B, H, N, Dh)."""
        B, N, D = x.shape
        w_kv, b_kv = self.in_proj_weight[D:], self.in_proj_bias[D:]
        k, v = F.linear(x, w_kv, b_kv).view(B, N, 2, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        return k, v

    def forward(self, query: Tensor, k: Tensor, v: Tensor, trace: Trace | None = None, prefix: str = "head") -> Tensor:
        """The (1, 1, D) probe `query` attends over the tokens' keys and values (`keys_values`) → (B, 1, D)."""
        B, D = k.shape[0], query.shape[-1]
        w_q, b_q = self.in_proj_weight[:D], self.in_proj_bias[:D]
        # The probe is the same for every image: projected once, so every image gets the very same query.
        q = F.linear(query, w_q, b_q).expand(B, -1, -1).view(B, 1, self.num_heads, -1).transpose(1, 2)  # (B, H, 1, Dh)
        # Written out, not SDPA: for one query it costs nothing, and its bits no longer depend on where the image
        # sits in the batch or on the thread count (CPU SDPA splits a lone query's work by threads, so two copies
        # of one photo in a batch got embeddings 1e-7 apart, and exact-match deduplication missed them).
        out = _attend(q, k, v, trace, prefix, sdpa=False).transpose(1, 2).reshape(B, -1, D)
        return self.out_proj(out)


class PoolingHead(nn.Module):
    """Attention pooling ("MAP"): a learned probe attends over the patch tokens, then a residual MLP."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.probe = nn.Parameter(torch.zeros(1, 1, cfg.hidden_size))  # zeros: see `Embeddings`
        self.attention = PoolAttention(cfg)
        self.layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor, trace: Trace | None = None) -> Tensor:
        # The keys and values of every token in one GEMM, as the encoder's projections (each row's bits are the same
        # wherever its image sits in the batch); the rest of the head on the CPU one image at a time, so that copies
        # of one photo in a batch get the same bits (exact-match deduplication relies on it): batched, a GEMM over
        # the B probes computes its last, partial block of rows with another kernel, and an elementwise op its last,
        # partial vector (widths no multiple of 8), so copies in a batch of 5, 7 or 9 were 1e-7 apart. CUDA runs
        # every row of a GEMM through the same kernel (bench/gpu_check.py checks).
        k, v = self.attention.keys_values(x)
        if x.is_cuda or trace is not None:
            return self._pool(k, v, trace)
        return _one_at_a_time(self._pool, k, v)

    def _pool(self, k: Tensor, v: Tensor, trace: Trace | None = None) -> Tensor:
        _record(trace, "head.probe", self.probe.expand(k.shape[0], -1, -1))
        # No residual around the pooling attention itself: the probe is a query, not a token stream.
        x = self.attention(self.probe, k, v, trace, "head")
        _record(trace, "head.attention", x)
        h = self.layernorm(x)
        _record(trace, "head.layernorm", h)
        x = x + self.mlp(h, trace, "head.mlp")
        return x[:, 0]


class VisionOutput(NamedTuple):
    # (B, D), not normalized: transformers' `pooler_output`; of a headless tower the tokens' mean (transformers: None)
    pooled: Tensor
    tokens: Tensor  # (B, N, D), after post_layernorm: transformers' `last_hidden_state`


class SiglipVision(nn.Module):
    """The vision tower. `pixel_values` (B, C, H, W) normalized pixels → pooled embedding and patch tokens."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = Embeddings(cfg)
        self.encoder = Encoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.head = PoolingHead(cfg) if cfg.vision_use_head else None

    def forward(self, pixel_values: Tensor, trace: Trace | None = None) -> VisionOutput:
        _record(trace, "pixel_values", pixel_values)
        x = self.embeddings(pixel_values, trace)
        x = self.encoder(x, trace)
        tokens = self.post_layernorm(x)
        _record(trace, "post_layernorm", tokens)
        # Headless towers (PaliGemma) have no pooled output of their own: we take the mean of the patch tokens.
        pooled = self.head(tokens, trace) if self.head is not None else tokens.mean(dim=1)
        _record(trace, "pooled", pooled)
        return VisionOutput(pooled, tokens)

    def fuse_qkv(self) -> SiglipVision:
        """Compute each encoder layer's q, k and v as one (3D, D) GEMM instead of three, on every device (the same
        numbers: tests compare it with the plain path). Drops the separate q/k/v layers, so the checkpoint layout
        (`references`' key maps, saving) must be read before fusing."""
        for layer in self.encoder.layers:
            layer.self_attn.fuse_qkv()
        return self


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def gflops_per_image(cfg: VisionConfig) -> float:
    """Forward GFLOPs for one image, counting a multiply-add as 2 FLOPs; matmuls and convs only.

    Per encoder layer over N tokens of width D with MLP width F: q/k/v/out projections 4·N·D², attention scores and
    weighted sum 2·N²·D, MLP 2·N·D·F (multiply-adds). The stem is a conv = N·(C·p²)·D. The head: k/v projections over
    N tokens 2·N·D², the probe's q and out projections 2·D², its scores and sum 2·N·D, its MLP 2·D·F.
    """
    D, F_, N, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_patches, cfg.num_hidden_layers
    macs = N * cfg.num_channels * cfg.patch_size**2 * D
    macs += L * (4 * N * D * D + 2 * N * N * D + 2 * N * D * F_)
    if cfg.vision_use_head:
        macs += 2 * N * D * D + 2 * D * D + 2 * N * D + 2 * D * F_
    return 2 * macs / 1e9


def init_weights(model: SiglipVision) -> SiglipVision:
    """Random weights for architecture-only use (presets), every parameter set, so a tower built on the meta
    device and materialised with `to_empty` is ready. Scaled by fan-in so activations stay sane."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                nn.init.normal_(module.weight, std=1 / math.sqrt(module.weight[0].numel()))
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=1 / math.sqrt(module.weight.shape[1]))
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, PoolAttention):
                nn.init.xavier_uniform_(module.in_proj_weight)
                nn.init.zeros_(module.in_proj_bias)
            elif isinstance(module, PoolingHead):
                nn.init.normal_(module.probe)
    return model


def random_model(cfg: VisionConfig, *, seed: int = 0) -> SiglipVision:
    """The tower with seeded random weights on the CPU, in eval mode (presets: architecture without a checkpoint).

    Built on the meta device: torch's default init of 400M parameters, overwritten anyway, costs seconds.
    """
    with torch.device("meta"):
        model = SiglipVision(cfg)
    model.to_empty(device="cpu")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        init_weights(model)
    return model.eval().requires_grad_(False)
