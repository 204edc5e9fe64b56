"""Faster stand-ins for the tower's MLPs and linear layers, swapped in by `runtime.prepare_model`.

Each takes the layers of the module it replaces, so the checkpoint keys stay the same, and each reaches a kernel
that torch offers only through a private op: fc1 + bias + tanh GELU as one GEMM (`FusedMLP`), and oneDNN's matmul
on the CPU (`OneDnnLinear`). Where the kernel does not apply (a trace, autograd, torch.compile, a dtype or CPU it
does not take) they run the plain module's path. The plain tower in `model.py` stays the reference that `inspect`
and the parity tests run. Measurements: bench/RESULTS.md.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .model import MLP, SiglipVision, Trace


def onednn_linear(x: Tensor, linear: nn.Linear, post_op: str = "none", algorithm: str = "") -> Tensor | None:
    """`linear(x)`, then `post_op`, through oneDNN's matmul on the CPU (`torch.ops.mkldnn._linear_pointwise`); None
    where it does not apply: not under torch.compile, whose CPU backend emits the op itself (with frozen weights
    only), nor with autograd, which the op lacks, nor in a dtype oneDNN does not multiply here."""
    if x.dtype not in (torch.float32, torch.bfloat16) or torch.compiler.is_compiling():
        return None
    trained = [x, *linear.parameters()]  # the op has no backward: a trainable bias would get no gradient
    if torch.is_grad_enabled() and any(t.requires_grad for t in trained):
        return None
    if x.dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return None
    try:
        return torch.ops.mkldnn._linear_pointwise(x, linear.weight, linear.bias, post_op, [], algorithm)
    except RuntimeError:  # a private op: a torch that lacks it, or refuses these shapes, runs the plain path
        return None


def fc1_gelu(x: Tensor, fc1: nn.Linear, *, onednn: bool) -> Tensor | None:
    """fc1, its bias and the tanh GELU as one GEMM where a kernel fuses them, else None: the (tokens, F) activation
    is written once instead of written, read and written again.

    - CUDA: cuBLASLt's GELU_BIAS epilogue. (On the CPU, `_addmm_activation` computes the exact GELU instead.)
    - The CPU with `onednn` (`prepare_model` asks for it where it measured faster): oneDNN's GEMM with a GELU
      post-op, the kernel torch.compile's CPU backend emits (`onednn_linear`). In bfloat16 the GELU comes before
      the one rounding to bf16, so it is closer to float32 than the plain path. Measurements: bench/RESULTS.md.
    """
    if x.is_cuda:
        h = torch._addmm_activation(fc1.bias, x.flatten(0, -2), fc1.weight.t(), use_gelu=True)
        return h.view(*x.shape[:-1], -1)
    return onednn_linear(x, fc1, "gelu", "tanh") if onednn else None


class FusedMLP(MLP):
    """`model.MLP` with fc1 + bias + GELU as one GEMM where a kernel fuses them (`fc1_gelu`). A trace records
    fc1 and the GELU apart, so a traced forward, like one no kernel takes, runs the plain MLP's path."""

    def __init__(self, mlp: MLP, *, onednn: bool):
        nn.Module.__init__(self)  # not `MLP.__init__`: the layers are the loaded ones, not new ones
        self.fc1, self.fc2, self.activation = mlp.fc1, mlp.fc2, mlp.activation
        self.onednn = onednn
        self.train(mlp.training)

    def forward(self, x: Tensor, trace: Trace | None = None, prefix: str = "mlp") -> Tensor:
        h = fc1_gelu(x, self.fc1, onednn=self.onednn) if trace is None else None
        if h is None:
            return super().forward(x, trace, prefix)
        return self.fc2(h)


class OneDnnLinear(nn.Linear):
    """`nn.Linear` through oneDNN's matmul on the CPU (`onednn_linear`). `nn.Linear` calls MKL's sgemm in
    float32, which oneDNN beat on the tower's four GEMM shapes on a Zen 4 with AVX-512 (bench/RESULTS.md). Its
    sums run in another order, so the results differ from it by float rounding only, within the 1e-5 of
    transformers that the tests hold both paths to; and each image gets the same bits in any batch (tested). Made by
    `onednn_linears` from a loaded layer, whose parameters it takes."""

    @classmethod
    def of(cls, linear: nn.Linear) -> OneDnnLinear:
        new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        new.weight, new.bias = linear.weight, linear.bias
        return new

    def forward(self, x: Tensor) -> Tensor:
        out = None if x.is_cuda else onednn_linear(x, self)
        return super().forward(x) if out is None else out


def fuse_gelu(model: SiglipVision, *, onednn: bool = False) -> SiglipVision:
    """Swap every MLP of `model` (in place) for a `FusedMLP`, fc1 + bias + GELU as one GEMM: on CUDA (the same
    cosine to the float32 plain path, which gpu_check checks; H200 runs in bench/RESULTS.md); with `onednn`, on the
    CPU too (`runtime.prepare_model` says where). Only for towers with the tanh GELU, the one both kernels fuse."""
    if model.config.activation == "gelu_tanh":
        for owner in list(model.modules()):
            for name, child in owner.named_children():
                if isinstance(child, MLP):
                    setattr(owner, name, FusedMLP(child, onednn=onednn))
    return model


def onednn_linears(model: SiglipVision) -> SiglipVision:
    """Run the encoder's linear layers through oneDNN on the CPU (`OneDnnLinear`), in place: q/k/v (fused or not),
    the attention output, and the MLP's (fc1 too, for where `FusedMLP` falls back to the plain path). The head, ~1%
    of the work, keeps `nn.Linear` but for its MLP's fc1 + GELU, which `fuse_gelu(onednn=True)` fuses. Call it after
    `fuse_qkv`, which makes a layer of its own."""
    for layer in model.encoder.layers:
        for owner in (layer.self_attn, layer.mlp):
            for name, child in owner.named_children():
                if type(child) is nn.Linear:
                    setattr(owner, name, OneDnnLinear.of(child))
    return model
