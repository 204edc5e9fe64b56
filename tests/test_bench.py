"""`siglip bench` and the fast paths it measures: each fast path computes what the plain path computes.

Fast paths: fused q/k/v, bf16 weights, `torch.compile`, the transformers and timm references on our weights (key
maps, `references.py`), and `siglip embed --decode gpu` end to end (its decoder, `gpu_decode`, has its own tests in
test_gpu_decode.py). Timings are never asserted.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import make_photo, reference_vision_model, save_png_claiming_size, with_preprocessing
from siglip_cli import benchmark, config, references
from siglip_cli.checkpoints import resolve_checkpoint
from siglip_cli.cli import app
from siglip_cli.config import PreprocessConfig, VisionConfig
from siglip_cli.errors import UserError
from siglip_cli.kernels import FusedMLP, OneDnnLinear, fc1_gelu, fuse_gelu, onednn_linears
from siglip_cli.model import SiglipVision, random_model
from siglip_cli.weights import load_model, load_tower

RUNNER = CliRunner(env={"COLUMNS": "200"})
TINY = VisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8)


def _tiny_model(cfg: VisionConfig = TINY, seed: int = 0) -> SiglipVision:
    """Random weights with every bias and LayerNorm perturbed, so a key map that drops one cannot pass."""
    model, generator = random_model(cfg, seed=seed), torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator), alpha=0.1)
    return model


def _pixels(cfg: VisionConfig = TINY, batch: int = 3) -> torch.Tensor:
    return torch.randn(batch, 3, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(1))


# --------------------------------------------------------------------------- fast paths vs the plain path


def test_fused_qkv_matches_plain() -> None:
    model, x = _tiny_model(), _pixels()
    with torch.no_grad():
        torch.testing.assert_close(benchmark.fast_model(model)(x), model(x).pooled, rtol=0, atol=1e-5)
    assert model.encoder.layers[0].self_attn.qkv is None  # the plain model is left as it was


def test_bf16_fast_path_keeps_cosine() -> None:
    model, x = _tiny_model(), _pixels()
    with torch.no_grad():
        fast = benchmark.fast_model(model, dtype=torch.bfloat16)(x.bfloat16())
    assert fast.dtype == torch.bfloat16
    assert benchmark.cosine(fast, model(x).pooled) >= 0.999


@pytest.mark.slow  # the first compile on a machine takes 40 s on 2 cores (3 s once inductor's cache is warm)
def test_compiled_matches_plain() -> None:
    model, x = _tiny_model(), _pixels()
    with torch.no_grad():
        torch.testing.assert_close(benchmark.fast_model(model, compile=True)(x), model(x).pooled, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("build", ["prepare_model", "fast_model", "transformers", "timm"])
def test_compiling_on_a_machine_without_cuda_says_nothing_of_cuda(build: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # `bench --compile` on the CPU printed torch's "No CUDA runtime is found, using CUDA_HOME=..." between its lines:
    # only `prepare_model`'s own compile silenced it, and bench compiles its models apart.
    import logging

    from siglip_cli import runtime

    logger, said = logging.getLogger("torch.utils.cpp_extension"), []
    handler = logging.Handler()
    handler.emit = said.append

    def compile(module, **kwargs):  # no compiler here: the first call warns, as inductor's toolchain set-up does
        def first_call(*args, **kwargs):
            logger.warning("No CUDA runtime is found, using CUDA_HOME='/usr/local'")
            return module(*args, **kwargs)
        return first_call

    monkeypatch.setattr(torch, "compile", compile)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    level = logger.level
    logger.setLevel(logging.NOTSET)  # as a process starts, whatever an earlier test compiled
    logger.addHandler(handler)
    try:
        model, x = _tiny_model(), _pixels()
        if build == "prepare_model":
            runtime.prepare_model(model, device="cpu", dtype=torch.float32, compile=True)(x)
        elif build == "fast_model":
            benchmark.fast_model(model, compile=True)(x)
        else:
            references.reference_forward(build, model, device=torch.device("cpu"), dtype=torch.float32, compile=True)(x)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert said == []


@pytest.mark.parametrize("cfg", [TINY, VisionConfig(**{**TINY.__dict__, "image_size": 44, "patch_size": 14})], ids=["p8", "p14-drops-pixels"])
def test_patch_matmul_is_the_checkpoint_conv(cfg: VisionConfig) -> None:
    """The model embeds patches with one matmul; the checkpoint's weights are a conv's: they must agree."""
    model, x = _tiny_model(cfg), _pixels(cfg)
    conv = model.embeddings.patch_embedding
    with torch.no_grad():
        expected = conv(x).flatten(2).transpose(1, 2) + model.embeddings.position_embedding.weight
        got = model.embeddings(x)
    assert got.is_contiguous()  # the point of the matmul: the residual stream is not a strided view
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_fused_gelu_leaves_the_cpu_path_exact() -> None:
    """Without oneDNN (`onednn=False`, a CPU that does not prefer it), `fuse_gelu`'s CUDA kernel has nothing to run
    on the CPU: the MLP takes the plain path, bit for bit. Its oneDNN fusion is checked below and in test_model_parity."""
    model, x = _tiny_model(), _pixels()
    fused = fuse_gelu(copy.deepcopy(model))
    assert all(isinstance(layer.mlp, FusedMLP) for layer in fused.encoder.layers)
    with torch.no_grad():
        torch.testing.assert_close(fused(x).pooled, model(x).pooled, rtol=0, atol=0)


ONEDNN_BF16 = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def _bf16_outputs(model: SiglipVision, x: torch.Tensor, *, onednn: bool) -> torch.Tensor:
    tower = fuse_gelu(copy.deepcopy(model).to(torch.bfloat16), onednn=onednn)
    with torch.no_grad():
        return tower(x.bfloat16()).pooled.float()


@pytest.mark.skipif(not ONEDNN_BF16, reason="oneDNN runs no bf16 GEMMs on this CPU (it lacks AVX-512 and AMX)")
def test_fused_gelu_in_bfloat16_on_the_cpu_agrees_with_the_plain_path() -> None:
    """fc1 + GELU as one oneDNN GEMM in bfloat16 (`kernels.fc1_gelu`): the GELU comes before the rounding to bf16,
    so the op is closer to float32 than the plain one; the tower's output within bf16's cosine."""
    model, x = _tiny_model(), _pixels()
    with torch.no_grad():
        exact = model(x).pooled
    fused, plain = _bf16_outputs(model, x, onednn=True), _bf16_outputs(model, x, onednn=False)
    assert not torch.equal(fused, plain)  # the fused kernel ran
    assert torch.nn.functional.cosine_similarity(fused, exact).min() >= 0.999
    generator = torch.Generator().manual_seed(0)
    tokens, fc1 = torch.randn(2, 196, 768, generator=generator), torch.nn.Linear(768, 3072).requires_grad_(False)
    with torch.no_grad():
        want = torch.nn.functional.gelu(fc1.double()(tokens.double()), approximate="tanh")
        fc1 = fc1.bfloat16()
        one_gemm = fc1_gelu(tokens.bfloat16(), fc1, onednn=True).double()
        two_steps = torch.nn.functional.gelu(fc1(tokens.bfloat16()), approximate="tanh").double()
    assert (one_gemm - want).abs().mean() < (two_steps - want).abs().mean()


def test_a_traced_forward_of_a_fused_mlp_records_what_the_plain_one_does() -> None:
    # `siglip inspect` traces the plain tower; a fused one, traced, must not skip the stages a kernel fuses.
    model, x = _tiny_model(), _pixels()
    fused = fuse_gelu(copy.deepcopy(model), onednn=True)
    plain_trace, fused_trace = {}, {}
    with torch.no_grad():
        model(x, plain_trace), fused(x, fused_trace)
    assert fused_trace.keys() == plain_trace.keys()
    assert all(torch.equal(fused_trace[name], plain_trace[name]) for name in plain_trace)


def test_fused_gelu_in_bfloat16_falls_back_where_onednn_has_no_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)  # an AVX2 CPU
    model, x = _tiny_model(), _pixels()
    assert torch.equal(_bf16_outputs(model, x, onednn=True), _bf16_outputs(model, x, onednn=False))


def test_prepare_model_asks_for_onednn_only_where_the_cpu_has_native_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    from siglip_cli import runtime

    for native in (False, True):
        monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: native)
        tower = runtime.prepare_model(_tiny_model(), device="cpu", dtype=torch.bfloat16)
        assert all(layer.mlp.onednn == native for layer in tower.encoder.layers)


def test_prepare_model_takes_onednn_gemms_in_float32_only_on_avx512_outside_intel(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from siglip_cli import runtime

    for capability, intel, onednn in (("AVX2", False, False), ("AVX512", False, True), ("AVX512", True, False)):
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
        monkeypatch.setattr(runtime, "cpu_is_intel", lambda: intel)
        tower = runtime.prepare_model(_tiny_model(), device="cpu", dtype=torch.float32)
        layer = tower.encoder.layers[0]
        assert isinstance(layer.self_attn.qkv, OneDnnLinear) == onednn
        assert isinstance(layer.mlp.fc2, OneDnnLinear) == onednn and layer.mlp.onednn == onednn


def test_onednn_linears_run_onednn_and_agree_with_the_plain_path(monkeypatch: pytest.MonkeyPatch) -> None:
    model, x = _tiny_model(), _pixels()
    tower = onednn_linears(fuse_gelu(copy.deepcopy(model).fuse_qkv(), onednn=True))
    assert tower.state_dict().keys() == copy.deepcopy(model).fuse_qkv().state_dict().keys()
    calls, pointwise = [], torch.ops.mkldnn._linear_pointwise

    def counted(*args):
        calls.append(args[3])
        return pointwise(*args)

    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", counted)
    with torch.no_grad():
        torch.testing.assert_close(tower(x).pooled, model(x).pooled, rtol=0, atol=1e-5)
    # q/k/v, the attention output, fc1 + GELU and fc2 in each layer; the head's fc1 + GELU once an image
    assert calls == ["none", "none", "gelu", "none"] * TINY.num_hidden_layers + ["gelu"] * len(x)


def test_onednn_linears_fall_back_to_nn_linear_where_the_op_refuses(monkeypatch: pytest.MonkeyPatch) -> None:
    def refused(*args):
        raise RuntimeError("mkldnn_linear_pointwise: unsupported")  # a torch built without oneDNN, say

    model, x = _tiny_model(), _pixels()
    tower = onednn_linears(fuse_gelu(copy.deepcopy(model).fuse_qkv(), onednn=True))
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", refused)
    with torch.no_grad():
        assert torch.equal(tower(x).pooled, copy.deepcopy(model).fuse_qkv()(x).pooled)


def test_onednn_linear_leaves_a_trainable_bias_to_autograd() -> None:
    # The op has no backward: with the weights frozen and the biases trained (BitFit), the bias got no gradient.
    linear = torch.nn.Linear(8, 4)
    linear.weight.requires_grad_(False)
    fast = OneDnnLinear.of(linear)
    fast(torch.randn(3, 8)).sum().backward()
    assert linear.bias.grad is not None


def test_fuse_qkv_keeps_which_parameters_train() -> None:
    model = _tiny_model().requires_grad_(False)
    for layer in model.encoder.layers:
        for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
            proj.bias.requires_grad_(True)
    qkv = model.fuse_qkv().encoder.layers[0].self_attn.qkv
    assert (qkv.weight.requires_grad, qkv.bias.requires_grad) == (False, True)


def test_fuse_gelu_skips_towers_with_the_exact_gelu() -> None:
    model = _tiny_model(VisionConfig(**{**TINY.__dict__, "hidden_act": "gelu"}))
    assert not any(isinstance(layer.mlp, FusedMLP) for layer in fuse_gelu(model).encoder.layers)


# --------------------------------------------------------------------------- the references on our weights

HEADLESS = VisionConfig(**{**TINY.__dict__, "vision_use_head": False})
ODD = VisionConfig(hidden_size=36, intermediate_size=43, num_hidden_layers=1, num_attention_heads=4, image_size=44, patch_size=14)
EXACT_GELU = VisionConfig(**{**TINY.__dict__, "hidden_act": "gelu_python"})  # transformers' other exact GELU
QUICK_GELU = VisionConfig(**{**TINY.__dict__, "hidden_act": "quick_gelu"})  # no SigLIP's: timm gets it as a module


@pytest.mark.parametrize("backend", ["transformers", "timm"])
@pytest.mark.parametrize(
    "cfg", [TINY, HEADLESS, ODD, EXACT_GELU, QUICK_GELU], ids=["head", "headless", "p14-odd-heads", "exact-gelu", "quick-gelu"]
)
def test_reference_key_maps_compute_our_function(backend: str, cfg: VisionConfig) -> None:
    model, x = _tiny_model(cfg), _pixels(cfg)
    forward = references.reference_forward(backend, model, device=torch.device("cpu"), dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(forward(x), model(x).pooled, rtol=0, atol=1e-5)


def test_transformers_map_agrees_with_transformers_own_loader(tiny_vision: Path) -> None:
    """Our loader + our key map give the model transformers builds from the same checkpoint file."""
    ours = load_model(resolve_checkpoint(str(tiny_vision)))
    mapped = references.transformers_model(ours)
    own = reference_vision_model(tiny_vision)
    for key, tensor in own.state_dict().items():
        assert torch.equal(mapped.state_dict()[key], tensor), key


def test_key_maps_refuse_a_fused_model() -> None:
    with pytest.raises(ValueError, match="unfused"):
        references.timm_state_dict(_tiny_model().fuse_qkv())


def test_timm_mlp_width_is_exact_for_so400m() -> None:
    # 4304 / 1152 is not exact in floating point: timm must still build a 4304-wide MLP.
    cfg = VisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=1, num_attention_heads=16, image_size=28, patch_size=14)
    assert references.timm_model(random_model(cfg)).blocks[0].mlp.fc1.out_features == 4304


@pytest.mark.parametrize("backend", ["transformers", "timm"])
def test_a_key_map_that_misses_a_tensor_names_it(backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A reference library that renamed a parameter is one sentence naming it, not a half-loaded model."""
    key_map = getattr(references, f"{backend}_state_dict")
    dropped = "post_layernorm.bias" if backend == "transformers" else "norm.bias"

    def renamed(model: SiglipVision) -> dict[str, torch.Tensor]:
        return {key: tensor for key, tensor in key_map(model).items() if key != dropped}

    monkeypatch.setattr(references, f"{backend}_state_dict", renamed)
    with pytest.raises(UserError, match=rf"the {backend} key map leaves {backend}'s {dropped} unset"):
        getattr(references, f"{backend}_model")(_tiny_model())


# --------------------------------------------------------------------------- presets


def test_a_preset_is_the_seeded_random_model_in_bench_and_inspect(monkeypatch: pytest.MonkeyPatch) -> None:
    """`siglip bench` and `siglip inspect` both take their model from `load_tower`: a preset draws these weights."""
    monkeypatch.setitem(config.PRESETS, "tiny-preset", (TINY, PreprocessConfig(32, 32)))
    model, preprocess, random_weights = load_tower("tiny-preset")
    assert random_weights and preprocess == PreprocessConfig(32, 32)
    state = model.state_dict()
    for key, tensor in random_model(TINY).state_dict().items():
        assert torch.equal(state[key], tensor), key
    assert not torch.equal(load_tower("tiny-preset", seed=1)[0].head.probe, model.head.probe)


def test_a_mistyped_preset_is_one_sentence_naming_the_preset() -> None:
    """As `siglip inspect` says it (test_inspect.py): not "neither a local checkpoint directory nor a Hub id"."""
    result = RUNNER.invoke(app, ["bench", "-m", "siglip-bas-patch16-224", "--device", "cpu"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "did you mean siglip-base-patch16-224?" in " ".join(result.stderr.split())
    assert len(result.stderr.strip().splitlines()) <= 2  # one sentence (rich may wrap it)


# --------------------------------------------------------------------------- the command

RESULT_FIELDS = {"backend": str, "stage": str, "batch_size": int, "images_per_s": float, "ms_per_image": float}


def _bench_json(*args: str) -> dict:
    result = RUNNER.invoke(app, ["bench", "--device", "cpu", "--iters", "1", "--warmup", "0", "--json", *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_bench_json_schema(tiny_vision: Path) -> None:
    document = _bench_json("--model", str(tiny_vision), "--batch-size", "1,2", "--dtype", "float32")
    assert document["machine"]["torch_version"] == torch.__version__
    assert document["machine"]["dtype"] == "float32" and document["machine"]["device"]
    assert [r["batch_size"] for r in document["results"]] == [1, 2]
    for row in document["results"]:
        for name, kind in RESULT_FIELDS.items():
            assert isinstance(row[name], kind), name
        assert row["backend"] == "siglip" and row["stage"] == "model"
        assert row["images_per_s"] > 0 and row["ms_per_image"] == pytest.approx(1000 / row["images_per_s"])
        # Read from /proc on Linux (the peak resident size of the process); None only where there is no /proc.
        assert row["peak_mem_mb"] > 0 if Path("/proc/self/status").exists() else row["peak_mem_mb"] is None
    assert document["results"][0]["cosine"] == pytest.approx(1.0, abs=1e-6)
    assert all(row["spread"] is None for row in document["results"])  # --iters 1: one call has no spread


def test_bench_compare_transformers_on_a_tiny_checkpoint(tiny_siglip: Path) -> None:
    document = _bench_json("--model", str(tiny_siglip), "--batch-size", "2", "--compare", "transformers,timm")
    rows = {row["backend"]: row for row in document["results"]}
    assert set(rows) == {"siglip", "transformers", "timm"}
    for row in rows.values():  # the same function in all three: only the speed may differ
        assert row["cosine"] == pytest.approx(1.0, abs=1e-6)
    assert {r["reference"] for r in document["ratios"]} == {"transformers", "timm"}


def test_every_backends_row_names_the_dtype_it_ran_in(tiny_siglip: Path) -> None:
    # The references ran in bfloat16 too, under "sdpa" and "timm" alone.
    document = _bench_json("--model", str(tiny_siglip), "--batch-size", "2", "--dtype", "bfloat16",
                           "--compare", "transformers,timm")  # fmt: skip
    variants = {row["backend"]: row["variant"] for row in document["results"]}
    assert variants == {"siglip": "fused+bfloat16", "transformers": "sdpa+bfloat16", "timm": "timm+bfloat16"}


def test_bench_missing_timm_is_one_note(tiny_vision: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "timm", None)  # `import timm` now fails as if it were not installed
    result = RUNNER.invoke(app, ["bench", "-m", str(tiny_vision), "--device", "cpu", "--iters", "1", "--warmup", "0",
                                 "--batch-size", "1", "--compare", "timm"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "timm comparison skipped: the timm package is not installed" in result.stderr
    assert "Traceback" not in result.output


def test_bench_broken_timm_is_one_note_naming_the_cause(
    tiny_vision: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A timm built for another torch fails on import with whatever: the AttributeError was a traceback, an
    # ImportError the sentence "needs the timm package", with timm installed.
    (tmp_path / "timm").mkdir()
    (tmp_path / "timm" / "__init__.py").write_text("raise AttributeError(\"module 'torch' has no attribute 'xyz'\")\n")
    for name in [name for name in sys.modules if name == "timm" or name.startswith("timm.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.syspath_prepend(str(tmp_path))
    result = RUNNER.invoke(app, ["bench", "-m", str(tiny_vision), "--device", "cpu", "--iters", "1", "--warmup", "0",
                                 "--batch-size", "1", "--compare", "transformers,timm", "--json"])  # fmt: skip
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert {row["backend"] for row in document["results"]} == {"siglip", "transformers"}
    assert "timm comparison skipped: importing timm failed (AttributeError: module 'torch' has no attribute 'xyz')." \
        in document["notes"]


@pytest.mark.parametrize("args, message", [
    (["--compare", "onnx"], "unknown comparison 'onnx'"),
    (["--compare", " , "], "--compare: ',' names no reference"),  # it compared nothing, silently
    (["--batch-size", "8,x"], "batch sizes"),
    (["--batch-size", ""], "batch sizes must be positive integers"),
    (["--batch-size", "0"], "(got '0')"),
    (["--batch-size", "99999999999999999999999"], "does not fit in any device's memory"),  # a traceback before
    (["--dtype", "float64"], "--dtype: 'float64' is not one of auto, float32, bfloat16, float16 (see siglip bench -h)."),
])  # fmt: skip
def test_bench_bad_options_are_one_sentence(tiny_vision: Path, args: list[str], message: str) -> None:
    result = RUNNER.invoke(app, ["bench", "-m", str(tiny_vision), "--device", "cpu", *args])
    assert result.exit_code == 2 and message in result.stderr and "Traceback" not in result.output


@pytest.mark.parametrize("text, message", [
    ("8,x", "batch sizes must be positive integers, e.g. --batch-size 1,8,32 (got '8,x')."),
    ("", "(got '')"),
    ("1,0", "(got '1,0')"),
])  # fmt: skip
def test_batch_sizes_are_checked_in_one_place(text: str, message: str) -> None:
    with pytest.raises(benchmark.BenchError) as raised:
        benchmark.parse_batch_sizes(text)
    assert message in str(raised.value)
    assert benchmark.parse_batch_sizes("2,1,2") == (2, 1)


@pytest.mark.parametrize("sizes, got", [((1, 0), "'1,0'"), ((), "''"), ((8, 1.5), "'8,1.5'"), ((True,), "'True'")])
def test_batch_size_numbers_are_checked_by_the_same_rule(sizes: tuple, got: str) -> None:
    with pytest.raises(benchmark.BenchError, match=rf"batch sizes must be positive integers.*\(got {got}\)"):
        benchmark.check_batch_sizes(sizes)
    assert benchmark.check_batch_sizes((2, 1, 2)) == (2, 1)


def test_run_benchmark_refuses_what_the_command_refuses(tiny_vision: Path) -> None:
    """The library says what `siglip bench` says, for callers that do not go through the command."""
    with pytest.raises(benchmark.BenchError, match=r"batch sizes must be positive integers.*\(got '0'\)"):
        benchmark.run_benchmark(benchmark.BenchOptions(model=str(tiny_vision), batch_sizes=(0,)))
    with pytest.raises(UserError, match="unknown comparison 'onnx'"):
        benchmark.run_benchmark(benchmark.BenchOptions(model=str(tiny_vision), compare=("onnx",)))
    for given, message in [({"iters": 0}, "--iters must be a whole number of at least 1, not 0"),
                           ({"warmup": -1}, "--warmup must be a whole number of at least 0, not -1"),
                           ({"max_images": 0}, "max_images must be a whole number of at least 1, not 0"),
                           ({"iters": "3"}, "--iters must be a whole number of at least 1, not '3'"),  # a TypeError
                           ({"iters": 1.5}, "--iters must be a whole number of at least 1, not 1.5")]:  # fmt: skip
        with pytest.raises(benchmark.BenchError, match=message):
            benchmark.run_benchmark(benchmark.BenchOptions(model=str(tiny_vision), **given))


def test_run_benchmark_takes_a_path_and_comma_separated_text_as_the_command_does(tiny_siglip: Path) -> None:
    # "1,2" was read letter by letter ("got '1,,,2'"), "transformers" as "unknown comparison 't'", a Path refused.
    options = benchmark.BenchOptions(model=tiny_siglip, batch_sizes="1,2", compare="transformers", iters=1, warmup=0)
    report = benchmark.run_benchmark(options)
    assert report.model == str(tiny_siglip)
    assert sorted({(r.backend, r.batch_size) for r in report.results}) == [
        ("siglip", 1), ("siglip", 2), ("transformers", 1), ("transformers", 2)
    ]


def test_an_unknown_dtype_from_a_library_caller_is_one_sentence(tiny_vision: Path) -> None:
    # `siglip bench --dtype` never gets this far: typer checks its value against the choices.
    with pytest.raises(UserError, match=r"unknown dtype 'float64' \(expected auto, float32, bfloat16, float16\)"):
        benchmark.run_benchmark(benchmark.BenchOptions(model=str(tiny_vision), dtype="float64"))


def test_a_bad_images_folder_is_refused_before_any_timing(
    tiny_vision: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # It was found out after every batch size had been timed: minutes, on a CPU with a base model.
    def timed(*args, **kwargs):
        raise AssertionError("timed before the images were checked")

    monkeypatch.setattr(benchmark, "time_interleaved", timed)
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.jpg").write_bytes(b"")
    (tmp_path / "loop").symlink_to("loop")  # it was "does not exist"
    (tmp_path / "dead").mkdir()
    (tmp_path / "dead" / "a.jpg").symlink_to("/mnt/not-mounted/a.jpg")  # it was only "holds no image files"
    for images, what in (
        ("missing", "does not exist"), ("empty", "holds no image files"), ("file.jpg", "is not a directory"),
        ("dead", r"holds no image files \(.*; 1 entry named like an image is not a file: .*a\.jpg \(a broken link\)\)"),
        ("loop", "cannot be read: Too many levels of symbolic links"),
    ):  # fmt: skip
        with pytest.raises(UserError, match=f"--images {tmp_path / images} {what}"):
            benchmark.run_benchmark(benchmark.BenchOptions(model=str(tiny_vision), images=tmp_path / images))


def test_a_batch_too_large_for_memory_is_one_sentence(tiny_vision: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def out_of_memory(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: you tried")

    monkeypatch.setattr(benchmark, "time_interleaved", out_of_memory)
    with pytest.raises(benchmark.BenchError, match=r"^batch size 4 does not fit in the memory of cpu: try a smaller"):
        benchmark.run_benchmark(benchmark.BenchOptions(model=str(tiny_vision), device="cpu", batch_sizes=(4,)))


@pytest.mark.parametrize("command", ["bench", "inspect"])
def test_ctrl_c_during_bench_or_inspect_is_one_line(
    command: str, tiny_vision: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import siglip_cli.tracing as tracing

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(benchmark, "time_interleaved", interrupted)
    monkeypatch.setattr(tracing, "trace", interrupted)
    result = RUNNER.invoke(app, [command, "--model", str(tiny_vision)] + (["--device", "cpu"] if command == "bench" else []))
    assert result.exit_code == 130
    assert result.stderr.strip().splitlines()[-1] == "error: interrupted."


@pytest.mark.parametrize("seconds, noisy", [([0.010, 0.011, 0.010], False), ([0.010, 0.020, 0.010], True)])
def test_timings_that_vary_widely_are_said_to_be_rough(
    tiny_vision: Path, monkeypatch: pytest.MonkeyPatch, seconds: list[float], noisy: bool
) -> None:
    calls = iter(seconds * 2)  # one backend, three timed calls after the warm-up
    monkeypatch.setattr(benchmark, "_timed_call", lambda fn, device: (next(calls), None))
    options = benchmark.BenchOptions(model=str(tiny_vision), device="cpu", batch_sizes=(2,), iters=3, warmup=0)
    report = benchmark.run_benchmark(options)
    (result,) = report.results
    assert result.spread == pytest.approx((max(seconds) - min(seconds)) / sorted(seconds)[1], abs=1e-3)
    # One backend: no ratios to speak of; the note names it and what is rough.
    said = [n for n in report.notes if "batch 2: the timed calls of siglip varied by 100%" in n]
    assert (len(said) == 1 and "its images/s is rough" in said[0]) == noisy


def test_every_backend_whose_timings_vary_widely_is_named(tiny_siglip: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Only the widest was named: a siglip row as rough as could be went unsaid beside a rougher transformers one.
    calls = iter([0.010, 0.010, 0.020, 0.040, 0.010, 0.010])  # rounds of (siglip, transformers), interleaved
    monkeypatch.setattr(benchmark, "_timed_call", lambda fn, device: (next(calls), None))
    options = benchmark.BenchOptions(
        model=str(tiny_siglip), device="cpu", batch_sizes=(2,), iters=3, warmup=0, compare=("transformers",)
    )
    said = [n for n in benchmark.run_benchmark(options).notes if n.startswith("batch 2:")]
    assert said == [
        "batch 2: the timed calls of transformers varied by 300% around their median, those of siglip by 100% (a busy "
        "machine, or too few --iters): ratios from this run are rough."
    ]


def test_bench_batch_size_given_twice_is_measured_once(tiny_vision: Path) -> None:
    document = _bench_json("--model", str(tiny_vision), "--batch-size", "2,1,2")
    assert [r["batch_size"] for r in document["results"] if r["backend"] == "siglip"] == [2, 1]


def test_a_comparison_named_twice_is_built_and_measured_once(tiny_vision: Path) -> None:
    said = []
    options = benchmark.BenchOptions(
        model=str(tiny_vision), device="cpu", iters=1, warmup=0, batch_sizes=(1,), compare=("transformers", "transformers")
    )  # fmt: skip
    report = benchmark.run_benchmark(options, progress=said.append)
    assert [r.backend for r in report.results] == ["siglip", "transformers"]
    assert said.count("building the transformers reference on the same weights") == 1


def test_bench_table_names_the_machine(tiny_vision: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    from rich.console import Console

    from siglip_cli import cli

    terminal = Console(width=160, file=io.StringIO(), soft_wrap=False, record=True)  # as a terminal's (`_data_console`)
    monkeypatch.setattr(cli, "_data_console", lambda: terminal)
    result = RUNNER.invoke(app, ["bench", "-m", str(tiny_vision), "--device", "cpu", "--iters", "1", "--batch-size", "1"])
    assert result.exit_code == 0, result.output
    # On one line, as wide as the terminal lets it: as the table's title it wrapped to the table's width.
    printed = terminal.export_text()
    title = printed.splitlines()[0]
    assert title.startswith(f"{tiny_vision} · {benchmark.cpu_name()}") and title.endswith(" MB")
    assert f" · torch {torch.__version__} · float32 · weights " in title
    assert "img/s" in printed and "model only" in printed


def test_the_weights_size_is_rounded_once_where_it_is_printed(tiny_vision: Path) -> None:
    # Rounded to 0.1 MB in the report and printed with two decimals: 0.123 MB showed as "0.10".
    from siglip_cli.bench_report import heading

    options = benchmark.BenchOptions(model=str(tiny_vision), device="cpu", iters=1, warmup=0, batch_sizes=(1,))
    report = benchmark.run_benchmark(options)
    tower, _, _ = load_tower(str(tiny_vision))
    exact = sum(p.numel() for p in tower.parameters()) * 4 / 2**20
    assert report.weights_mb == exact and report.to_dict()["weights_mb"] == round(exact, 3)
    assert heading(report).endswith(f" · weights {exact:#.3g} MB")
    for mb, printed in ((0.1234130859375, "0.123"), (5.3, "5.30"), (351.5625, "352"), (1603.2, "1,603")):
        assert heading(dataclasses.replace(report, weights_mb=mb)).endswith(f" · weights {printed} MB")


def test_bench_table_keeps_every_number_whole_in_80_columns(tiny_vision: Path) -> None:
    # At 80 columns the names were cut into 2-letter pieces (mo/de/l) across three lines a row.
    import io

    from rich.console import Console

    from siglip_cli.bench_report import stage_table

    options = benchmark.BenchOptions(
        model=str(tiny_vision), device="cpu", iters=1, batch_sizes=(1, 8), compare=("transformers",)
    )  # fmt: skip
    report = benchmark.run_benchmark(options)
    console = Console(width=80, file=io.StringIO(), record=True)
    console.print(stage_table(report))
    lines = console.export_text().splitlines()
    assert max(map(len, lines)) <= 80
    rows = [line.split() for line in lines if line.strip().startswith(("siglip fused", "transformers sdpa"))]
    assert [(row[0], row[2]) for row in rows] == [("siglip", "1"), ("transformers", "1"), ("siglip", "8"), ("transformers", "8")]
    assert all(float(row[3].replace(",", "")) > 0 and float(row[4]) > 0 for row in rows)  # img/s, ms/img whole
    # Below 76 columns the backend names were cut into 2-letter pieces again: peak MB and setup s make room.
    console = Console(width=56, file=io.StringIO(), record=True)
    console.print(stage_table(report, width=56))
    text = console.export_text()
    assert max(map(len, text.splitlines())) <= 56
    assert "peak MB and setup s in a wider terminal or with --json" in " ".join(text.split())  # the caption, wrapped
    rows = [line.split() for line in text.splitlines() if line.strip().startswith("siglip fused")]
    assert [len(row) for row in rows] == [6, 5]  # siglip fused, batch, img/s, ms/img, and the cosine at batch 1
    # At 40 the table was 48 wide: a terminal cut its cosine column off. The labels fold instead.
    console = Console(width=40, file=io.StringIO(), record=True)
    console.print(stage_table(report, width=40))
    lines = console.export_text().splitlines()
    assert max(map(len, lines)) <= 40 and any(line.endswith(" cosine") for line in lines[:3])  # the header's
    cosines = [r.cosine for r in report.results if r.cosine is not None]
    assert [float(line.split()[-1]) for line in lines if re.search(r" [01]\.\d{6}$", line)] == pytest.approx(cosines, abs=1e-6)


def test_bench_images_reports_each_stage(tiny_siglip: Path, tmp_path: Path) -> None:
    for i, size in enumerate([(96, 64), (64, 96), (50, 50), (480, 360)]):  # the last one big enough for draft()
        make_photo(size, seed=i).save(tmp_path / f"photo{i}.jpg", quality=95)
    make_photo((40, 30), mode="RGBA").save(tmp_path / "logo.png")  # left to the PIL path by the batched decoder
    (tmp_path / "broken.jpg").write_bytes(b"not a picture")  # left out, and said so, rather than ending the run
    (tmp_path / "copying.jpg").write_bytes(b"")  # why, as `siglip embed` says it: Pillow says "cannot identify"
    os.mkfifo(tmp_path / "stream.jpg")  # passed over without a word, as `siglip embed` never does
    document = _bench_json("-m", str(tiny_siglip), "--batch-size", "4", "--images", str(tmp_path))
    fifo = f"--images: 1 entry named like an image is not a file: {tmp_path / 'stream.jpg'} (a FIFO); not embedded."
    assert fifo in document["notes"]
    assert any("left out 2 files that cannot be read" in note for note in document["notes"])
    assert any(f"{tmp_path / 'copying.jpg'} (empty file (0 bytes))" in note for note in document["notes"])
    assert any("starts `siglip embed`'s decoding workers, a cost paid once per run" in note for note in document["notes"])
    stages = [(r["stage"], r["variant"]) for r in document["results"]]
    assert [s for s, _ in stages] == ["model", "decode", "preprocess", "preprocess", "end_to_end", "end_to_end", "end_to_end"]
    exact, fast, torchvision_row = document["results"][-3:]
    assert exact["cosine"] is None and "fast-decode" not in exact["variant"]
    assert "fast-decode" in fast["variant"] and 0.9 <= fast["cosine"] < 1  # the price of reduced-size decoding
    assert "torchvision" in torchvision_row["variant"] and torchvision_row["cosine"] >= 0.999
    assert "(4 of 5 files, the rest PIL)" in torchvision_row["variant"]  # logo.png went through PIL
    assert all(r["setup_s"] is None for r in document["results"])  # --warmup 0: none warmed up, none says 0.0


def test_bench_image_rows_warm_up_and_say_when_they_are_rough(
    tiny_siglip: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The decode, preprocess and end-to-end rows ignored --warmup (their setup_s was 0.0) and never made the note
    # on a spread that the model rows make.
    for i in range(2):
        make_photo((96, 64), seed=i).save(tmp_path / f"photo{i}.jpg", quality=95)
    options = benchmark.BenchOptions(model=str(tiny_siglip), device="cpu", batch_sizes=(2,), iters=2, warmup=1,
                                     images=tmp_path)  # fmt: skip
    report = benchmark.run_benchmark(options)
    images = [r for r in report.results if r.stage != "model"]
    assert {r.stage for r in images} == {"decode", "preprocess", "end_to_end"}
    assert all(r.setup_s is not None for r in images), images  # made, if too quick to read: decode 2 files in 0.4 ms
    assert all(r.setup_s > 0 for r in images if r.stage == "end_to_end"), images  # a batch through the model
    time_interleaved = benchmark.time_interleaved

    def unsteady(fns, **kwargs):
        timings = time_interleaved(fns, **kwargs)
        return {name: dataclasses.replace(t, spread=0.6) if "exact" in name else t for name, t in timings.items()}

    monkeypatch.setattr(benchmark, "time_interleaved", unsteady)
    notes = benchmark.run_benchmark(options).notes
    assert "preprocess (PIL, 1 core): the timed passes varied by 60% around their median (a busy machine, or too few " \
           "--iters): its images/s is rough." in notes  # fmt: skip
    assert not any(note.startswith("end_to_end (") for note in notes)  # one pass on the CPU: no spread to tell


def test_bench_says_why_the_torchvision_way_is_left_out_for_a_resize_it_cannot_match(tmp_path: Path) -> None:
    # A checkpoint resizing with Lanczos: its end-to-end row through torchvision went missing without a word.
    make_photo((64, 48)).save(tmp_path / "a.jpg")
    notes = benchmark._image_notes([str(tmp_path / "a.jpg")], [], PreprocessConfig(32, 32, resample=1),
                                   device=torch.device("cpu"), iters=1)  # fmt: skip
    assert "--images: the end-to-end way through torchvision's JPEG decoder is left out: it cannot resize as this " \
           "checkpoint does (its PIL filter 1, a crop or a kept aspect), so `siglip embed` decodes its photos on " \
           "the CPU." in notes  # fmt: skip


def test_bench_says_when_other_processes_took_its_cpus(tiny_siglip: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Beside a test suite on 1.1 of 2 cores, a tiny model ran at 59 images/s where it runs at 4,400 on a quiet
    # machine: every call as slow, the spread note never fired, and nothing said that the rates were low.
    from siglip_cli.cpus import CpuClock

    clocks = iter([CpuClock(busy=100.0, total=200.0, ours=1.0), CpuClock(busy=160.0, total=300.0, ours=11.0)])
    monkeypatch.setattr(benchmark, "cpu_clock", lambda: next(clocks))
    options = benchmark.BenchOptions(model=str(tiny_siglip), device="cpu", batch_sizes=(1,), iters=1, warmup=0)
    assert "other processes took 50% of this process's CPUs while it timed: every rate is lower than on a quiet " \
           "machine; ratios measured side by side in one run hold better." in benchmark.run_benchmark(options).notes


def test_bench_images_names_the_files_it_leaves_out_and_why(tiny_siglip: Path, tmp_path: Path) -> None:
    # "none of its image files decode", for one photo past the pixel limit, said nothing of the limit.
    save_png_claiming_size(tmp_path / "poster.png", 20_000, 20_000)
    result = RUNNER.invoke(app, ["bench", "-m", str(tiny_siglip), "--device", "cpu", "--images", str(tmp_path)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert f"none of its image files decode: {tmp_path / 'poster.png'} (" in result.stderr
    # The limit named, and no advice to raise --max-pixels, an option `bench` does not have.
    assert "(400,000,000 pixels, over the 178,956,970 siglip embed takes without --max-pixels)" in result.stderr
    assert "raise --max-pixels" not in result.stderr
    make_photo((64, 48)).save(tmp_path / "photo.jpg")
    document = _bench_json("-m", str(tiny_siglip), "--batch-size", "8", "--images", str(tmp_path))
    assert any(note.startswith(f"--images: left out 1 file that cannot be read (`siglip embed` would list them as "
                               f"errors): {tmp_path / 'poster.png'} (") for note in document["notes"])  # fmt: skip
    # One photo: the end-to-end rows ran batches of 1, not of 8.
    assert {r["batch_size"] for r in document["results"] if r["stage"] == "end_to_end"} == {1}


def test_end_to_end_ways_are_compared_file_by_file() -> None:
    # A file one way embeds and the other does not (a NaN in bf16, a JPEG one decoder refuses) shifted every later
    # row: the cosine compared other photos' embeddings, or was left out for unequal counts.
    exact = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
    assert benchmark._cosine_by_path(exact[[0, 2]], ["a", "c"], exact, ["a", "b", "c"]) == pytest.approx(1.0)
    assert benchmark._cosine_by_path(exact[[0]], ["z"], exact, ["a", "b", "c"]) is None  # nothing in common


def test_the_torchvision_way_is_tried_before_anything_is_timed_on_the_cpu_too(
    tiny_siglip: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # With --warmup 0 its first timed pass imported torchvision (2 s): 636 ms an image where warm runs took 104.
    from siglip_cli import gpu_decode

    make_photo((64, 48)).save(tmp_path / "a.jpg")
    events, fault, time_interleaved = [], gpu_decode.fault, benchmark.time_interleaved
    monkeypatch.setattr(gpu_decode, "fault", lambda device: events.append(f"tried on {device.type}") or fault(device))
    monkeypatch.setattr(
        benchmark, "time_interleaved", lambda fns, **kw: events.append(sorted(fns)) or time_interleaved(fns, **kw)
    )
    benchmark.run_benchmark(benchmark.BenchOptions(model=str(tiny_siglip), device="cpu", batch_sizes=(1,), iters=1,
                                                   warmup=0, images=tmp_path))  # fmt: skip
    assert events.index("tried on cpu") < events.index(["exact", "fast", "gpu"])
    monkeypatch.setattr(gpu_decode, "fault", lambda device: "no decoder in this build")
    document = _bench_json("-m", str(tiny_siglip), "--batch-size", "1", "--warmup", "0", "--images", str(tmp_path))
    assert not any("torchvision" in r["variant"] for r in document["results"])  # a decoder that fails: left out
    assert "--images: the end-to-end way through torchvision's JPEG decoder is left out: it does not work on cpu " \
           "(no decoder in this build)." in document["notes"]  # fmt: skip
    (tmp_path / "a.jpg").unlink()  # no JPEG left: none for it to decode
    make_photo((64, 48)).save(tmp_path / "photo.png")
    monkeypatch.setattr(gpu_decode, "fault", lambda device: None)
    document = _bench_json("-m", str(tiny_siglip), "--batch-size", "1", "--warmup", "0", "--images", str(tmp_path))
    assert not any("torchvision" in r["variant"] for r in document["results"])
    assert "--images: the end-to-end way through torchvision's JPEG decoder is left out: none of the files is a " \
           "JPEG it takes (other formats, CMYK JPEGs and photos turned by 90 degrees go to PIL)." in document["notes"]
    assert "--images: each end-to-end pass over the 1 file starts" in " ".join(document["notes"])


def test_bench_images_without_jpegs_it_takes_has_no_torchvision_row(
    tiny_siglip: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # It measured PIL under torchvision's name.
    from siglip_cli import decoding

    # The default is read from the memory available at the time: read again here, it may have changed.
    monkeypatch.setattr(decoding, "default_workers", lambda: 1)
    make_photo((64, 48)).save(tmp_path / "a.png")
    make_photo((64, 48)).convert("CMYK").save(tmp_path / "b.jpg")  # a JPEG the device decoder leaves to PIL
    document = _bench_json("-m", str(tiny_siglip), "--batch-size", "2", "--images", str(tmp_path))
    assert [r["variant"] for r in document["results"] if r["stage"] == "end_to_end"] == [
        "PIL decode, workers=1", "PIL --fast-decode, workers=1"
    ]


def test_bench_images_for_a_filter_the_gpu_lacks_has_no_torchvision_row(tiny_siglip: Path, tmp_path: Path) -> None:
    # Its `--decode gpu` pass was refused in a sentence that ended the whole benchmark.
    lanczos = with_preprocessing(tiny_siglip, tmp_path / "lanczos", resample=1)
    make_photo((64, 48)).save(tmp_path / "a.jpg")
    document = _bench_json("-m", str(lanczos), "--batch-size", "2", "--images", str(tmp_path))
    variants = [r["variant"] for r in document["results"] if r["stage"] == "end_to_end"]
    assert len(variants) == 2 and not any("torchvision" in v for v in variants)


def test_bench_of_a_model_that_gives_nan_says_so_in_valid_json(
    tiny_siglip: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # float16 overflow or a damaged checkpoint: "cosine": NaN (no JSON), then a traceback with --images; then, with
    # --images, an error that threw the model-only rows away, and another exit status than without.
    load = benchmark.load_tower

    def broken(*args, **kwargs):
        tower, preprocess, random_weights = load(*args, **kwargs)
        with torch.no_grad():
            tower.post_layernorm.bias.fill_(float("nan"))
        return tower, preprocess, random_weights

    monkeypatch.setattr(benchmark, "load_tower", broken)
    result = RUNNER.invoke(app, ["bench", "-m", str(tiny_siglip), "--device", "cpu", "--iters", "1", "--warmup", "0",
                                 "-b", "2", "--json"])  # fmt: skip
    document = json.loads(result.stdout, parse_constant=lambda name: pytest.fail(f"{name} in the JSON"))
    assert document["results"][0]["cosine"] is None
    assert "the model gives NaN or infinite values even in float32: its numbers are no embeddings (a damaged " \
           "checkpoint?)." in document["notes"]  # fmt: skip
    make_photo((64, 48)).save(tmp_path / "a.jpg")
    result = RUNNER.invoke(app, ["bench", "-m", str(tiny_siglip), "--device", "cpu", "--iters", "1", "--warmup", "0",
                                 "-b", "2", "--images", str(tmp_path), "--json"])  # fmt: skip
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout, parse_constant=lambda name: pytest.fail(f"{name} in the JSON"))
    assert {r["stage"] for r in document["results"]} == {"model", "decode", "preprocess", "end_to_end"}
    assert all(r["cosine"] is None for r in document["results"] if r["stage"] in ("model", "end_to_end"))
    assert "the model gave NaN or infinite values for every image in float32 (a damaged checkpoint?): the " \
           "end-to-end rows time runs in which every file failed." in document["notes"]  # fmt: skip


# --------------------------------------------------------------------------- the GPU script, smoke-run on the CPU


@pytest.mark.slow  # half a minute: every section of the GPU script, on a tiny model
def test_gpu_check_smoke_runs_on_cpu(tmp_path: Path) -> None:
    import subprocess

    script = Path(__file__).parents[1] / "bench" / "gpu_check.py"
    done = subprocess.run([sys.executable, str(script), "--smoke", "--workdir", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "model only" in done.stdout and "end to end" in done.stdout
    assert "failed:" not in done.stdout and "skipped:" not in done.stdout  # every row measured
    assert "the 7 rows: identical" in done.stdout  # copies of one image in a batch embed to the same bits


def test_gpu_check_fails_on_a_fast_path_that_changes_the_embeddings(monkeypatch: pytest.MonkeyPatch) -> None:
    # Below 0.999 a row was only left out of the speed verdict, and the script exited 0: the CUDA fast paths, which
    # no CPU test runs, could be wrong with nothing to say so.
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check", Path(__file__).parents[1] / "bench" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_check", gpu_check)  # where its dataclasses look themselves up
    spec.loader.exec_module(gpu_check)
    Row = gpu_check.Row
    rows = [
        Row("model only", "B/16-224", "siglip", "fused+compiled", 256, 13_000.0, cosine=0.9981),
        Row("model only", "B/16-224", "siglip", "eager", 256, 11_000.0, cosine=0.99995),
        Row("model only", "B/16-224", "transformers", "sdpa", 256, 7_500.0, cosine=0.998),  # not ours to fail
        Row("end to end", "B/16-224", "siglip", "PIL --fast-decode", 128, 300.0, cosine=0.995),  # its asked-for price
    ]
    assert gpu_check.wrong_rows(rows) == ["B/16-224 model only fused+compiled batch 256: COSINE 0.99810 BELOW 0.999"]
    assert gpu_check.wrong_rows(rows) == [line for line in gpu_check.verdicts(rows) if "COSINE" in line]


def test_compile_keeps_one_warm_up_call(tiny_vision: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # With --warmup 0 the first, compiling call was timed: 7,570 ms an image where the model takes 130.
    calls = []
    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: calls.append(model) or model)  # no compiler here
    options = benchmark.BenchOptions(
        model=str(tiny_vision), device="cpu", batch_sizes=(1,), iters=1, warmup=0, compile=True
    )
    report = benchmark.run_benchmark(options)
    assert calls and any("one warm-up call is kept, the one that compiles" in note for note in report.notes)
    assert report.results[0].setup_s is not None and report.results[0].setup_s > 0


@pytest.mark.parametrize("flag", ["--compile", "--no-compile"])
def test_the_compile_flag_reaches_every_backend_from_the_command_line(
    tiny_siglip: Path, monkeypatch: pytest.MonkeyPatch, flag: str
) -> None:
    calls = []
    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: calls.append(model) or model)  # no compiler here
    document = _bench_json("--model", str(tiny_siglip), "--batch-size", "1", "--compare", "transformers", flag)
    variants = {row["backend"]: row["variant"] for row in document["results"]}
    compiled = flag == "--compile"
    assert variants == {"siglip": "fused+compiled" if compiled else "fused",
                        "transformers": "sdpa+compiled" if compiled else "sdpa"}  # fmt: skip
    assert bool(calls) == compiled


def test_every_batch_size_gets_a_compiled_graph(tiny_vision: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Static shapes compile a graph per batch size; past dynamo's limit of 8 the rest ran uncompiled, labelled compiled.
    import torch._dynamo

    limits = []
    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: model)  # no compiler here
    monkeypatch.setattr(benchmark, "_time_batch", lambda *a, **k: limits.append(torch._dynamo.config.recompile_limit))
    sizes = tuple(range(1, 13))
    for compile in (True, False):
        options = benchmark.BenchOptions(model=str(tiny_vision), device="cpu", batch_sizes=sizes, compile=compile)
        benchmark.run_benchmark(options)
    assert limits[:12] == [13] * 12 and limits[12:] == [torch._dynamo.config.recompile_limit] * 12
