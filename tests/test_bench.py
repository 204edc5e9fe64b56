"""`siglip bench` and the fast paths it measures: each fast path computes what the plain path computes.

Fast paths: fused q/k/v, bf16 weights, `torch.compile`, the transformers and timm references on our weights (key
maps), and the batched torchvision decoder (`gpu_decode`, run on the CPU here). Timings are never asserted.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from typer.testing import CliRunner

from conftest import make_photo, reference_vision_model
from siglip_cli import benchmark
from siglip_cli.cli import app
from siglip_cli.config import PreprocessConfig, VisionConfig
from siglip_cli.gpu_decode import decode_batch, orient
from siglip_cli.model import SiglipVision, init_weights
from siglip_cli.preprocess import DecodeOptions, load_pixels
from siglip_cli.weights import load_model, resolve_checkpoint

RUNNER = CliRunner(env={"COLUMNS": "200"})
TINY = VisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8)


def _tiny_model(cfg: VisionConfig = TINY, seed: int = 0) -> SiglipVision:
    """Random weights with every bias and LayerNorm perturbed, so a key map that drops one cannot pass."""
    torch.manual_seed(seed)
    model = init_weights(SiglipVision(cfg)).eval().requires_grad_(False)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter), alpha=0.1)
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
    """`fuse_gelu` is a CUDA lever (torch's fused op computes the exact GELU on the CPU): the CPU must not take it."""
    model, x = _tiny_model(), _pixels()
    fused = copy.deepcopy(model).fuse_gelu()
    assert all(layer.mlp.fused_gelu for layer in fused.encoder.layers)
    with torch.no_grad():
        torch.testing.assert_close(fused(x).pooled, model(x).pooled, rtol=0, atol=0)


def test_fuse_gelu_skips_towers_with_the_exact_gelu() -> None:
    model = _tiny_model(VisionConfig(**{**TINY.__dict__, "hidden_act": "gelu"}))
    assert not any(layer.mlp.fused_gelu for layer in model.fuse_gelu().encoder.layers)


# --------------------------------------------------------------------------- the references on our weights

HEADLESS = VisionConfig(**{**TINY.__dict__, "vision_use_head": False})
ODD = VisionConfig(hidden_size=36, intermediate_size=43, num_hidden_layers=1, num_attention_heads=4, image_size=44, patch_size=14)


@pytest.mark.parametrize("backend", ["transformers", "timm"])
@pytest.mark.parametrize("cfg", [TINY, HEADLESS, ODD], ids=["head", "headless", "p14-odd-heads"])
def test_reference_key_maps_compute_our_function(backend: str, cfg: VisionConfig) -> None:
    model, x = _tiny_model(cfg), _pixels(cfg)
    forward = benchmark.reference_forward(backend, model, device=torch.device("cpu"), dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(forward(x), model(x).pooled, rtol=0, atol=1e-5)


def test_transformers_map_agrees_with_transformers_own_loader(tiny_vision: Path) -> None:
    """Our loader + our key map give the model transformers builds from the same checkpoint file."""
    ours = load_model(resolve_checkpoint(str(tiny_vision)))
    mapped = benchmark.transformers_model(ours)
    own = reference_vision_model(tiny_vision)
    for key, tensor in own.state_dict().items():
        assert torch.equal(mapped.state_dict()[key], tensor), key


def test_key_maps_refuse_a_fused_model() -> None:
    with pytest.raises(ValueError, match="unfused"):
        benchmark.timm_state_dict(_tiny_model().fuse_qkv())


def test_timm_mlp_width_is_exact_for_so400m() -> None:
    # 4304 / 1152 is not exact in floating point: timm must still build a 4304-wide MLP.
    cfg = VisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=1, num_attention_heads=16, image_size=28, patch_size=14)
    assert benchmark.timm_model(init_weights(SiglipVision(cfg))).blocks[0].mlp.fc1.out_features == 4304


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
        assert row["peak_mem_mb"] is None or row["peak_mem_mb"] > 0
    assert document["results"][0]["cosine"] == pytest.approx(1.0, abs=1e-6)


def test_bench_compare_transformers_on_a_tiny_checkpoint(tiny_siglip: Path) -> None:
    document = _bench_json("--model", str(tiny_siglip), "--batch-size", "2", "--compare", "transformers,timm")
    rows = {row["backend"]: row for row in document["results"]}
    assert set(rows) == {"siglip", "transformers", "timm"}
    for row in rows.values():  # the same function in all three: only the speed may differ
        assert row["cosine"] > 0.9999
    assert {r["reference"] for r in document["ratios"]} == {"transformers", "timm"}


def test_bench_missing_timm_is_one_note(tiny_vision: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "timm", None)  # `import timm` now fails as if it were not installed
    result = RUNNER.invoke(app, ["bench", "-m", str(tiny_vision), "--device", "cpu", "--iters", "1", "--warmup", "0",
                                 "--batch-size", "1", "--compare", "timm"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "timm comparison skipped: the timm package is not installed" in result.stderr
    assert "Traceback" not in result.output


@pytest.mark.parametrize("args, message", [
    (["--compare", "onnx"], "unknown comparison 'onnx'"),
    (["--batch-size", "8,x"], "batch sizes"),
    (["--batch-size", ""], "batch sizes must be positive integers"),
    (["--batch-size", "0"], "(got '0')"),
    (["--dtype", "float64"], "unknown dtype 'float64' (expected auto, float32, bfloat16, float16)"),
])  # fmt: skip
def test_bench_bad_options_are_one_sentence(tiny_vision: Path, args: list[str], message: str) -> None:
    result = RUNNER.invoke(app, ["bench", "-m", str(tiny_vision), "--device", "cpu", *args])
    assert result.exit_code == 2 and message in result.stderr and "Traceback" not in result.output


def test_bench_batch_size_given_twice_is_measured_once(tiny_vision: Path) -> None:
    document = _bench_json("--model", str(tiny_vision), "--batch-size", "2,1,2")
    assert [r["batch_size"] for r in document["results"] if r["backend"] == "siglip"] == [2, 1]


def test_bench_table_names_the_machine(tiny_vision: Path) -> None:
    result = RUNNER.invoke(app, ["bench", "-m", str(tiny_vision), "--device", "cpu", "--iters", "1", "--batch-size", "1"])
    assert result.exit_code == 0, result.output
    assert benchmark.cpu_name() in result.stdout and f"torch {torch.__version__}" in result.stdout
    assert "images/s" in result.stdout


def test_bench_images_reports_each_stage(tiny_siglip: Path, tmp_path: Path) -> None:
    for i, size in enumerate([(96, 64), (64, 96), (50, 50), (480, 360)]):  # the last one big enough for draft()
        make_photo(size, seed=i).save(tmp_path / f"photo{i}.jpg", quality=95)
    make_photo((40, 30), mode="RGBA").save(tmp_path / "logo.png")  # left to the PIL path by the batched decoder
    (tmp_path / "broken.jpg").write_bytes(b"not a picture")  # left out, and said so, rather than ending the run
    document = _bench_json("-m", str(tiny_siglip), "--batch-size", "4", "--images", str(tmp_path))
    assert any("left out 1 file(s) that do not decode" in note for note in document["notes"])
    stages = [(r["stage"], r["variant"]) for r in document["results"]]
    assert [s for s, _ in stages] == ["model", "decode", "preprocess", "preprocess", "end_to_end", "end_to_end", "end_to_end"]
    exact, fast, torchvision_row = document["results"][-3:]
    assert exact["cosine"] is None and "fast-decode" not in exact["variant"]
    assert "fast-decode" in fast["variant"] and 0.9 <= fast["cosine"] < 1  # the price of reduced-size decoding
    assert "torchvision" in torchvision_row["variant"] and torchvision_row["cosine"] >= 0.999


# --------------------------------------------------------------------------- gpu_decode, run on the CPU

PIL_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
                 5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
                 8: Image.Transpose.ROTATE_90}  # fmt: skip


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orient_matches_pil(orientation: int) -> None:
    image = make_photo((24, 16))
    expected = image.transpose(PIL_TRANSPOSE[orientation]) if orientation > 1 else image
    tensor = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)
    assert np.array_equal(orient(tensor, orientation).permute(1, 2, 0).numpy(), np.asarray(expected))


def _save_with_orientation(path: Path, upright: Image.Image, orientation: int) -> Path:
    """A JPEG whose pixels are `upright` un-oriented, tagged so that a viewer honouring EXIF shows `upright`."""
    inverse = {6: 8, 8: 6}.get(orientation, orientation)  # every orientation is its own inverse except 6 and 8
    stored = upright.transpose(PIL_TRANSPOSE[inverse]) if orientation > 1 else upright
    exif = Image.Exif()
    exif[0x0112] = orientation
    stored.save(path, format="JPEG", quality=95, exif=exif)
    assert ImageOps.exif_transpose(Image.open(path)).size == upright.size
    return path


@pytest.fixture
def mixed_files(tmp_path: Path) -> list[Path]:
    """JPEGs of several sizes, EXIF orientations and modes, plus files the GPU decoder must leave to the CPU."""
    files = [
        _save_with_orientation(tmp_path / "plain.jpg", make_photo((120, 90), seed=0), 1),
        _save_with_orientation(tmp_path / "portrait.jpg", make_photo((90, 120), seed=1), 6),
        _save_with_orientation(tmp_path / "flipped.jpg", make_photo((120, 90), seed=2), 4),
        _save_with_orientation(tmp_path / "transverse.jpg", make_photo((70, 100), seed=3), 7),
        _save_with_orientation(tmp_path / "same-size.jpg", make_photo((120, 90), seed=4), 1),
    ]
    make_photo((64, 48), mode="L").save(tmp_path / "gray.jpg", quality=95)
    make_photo((64, 48), mode="CMYK").save(tmp_path / "cmyk.jpg", quality=95)
    make_photo((64, 48)).save(tmp_path / "image.png")
    (tmp_path / "broken.jpg").write_bytes((tmp_path / "plain.jpg").read_bytes()[:300])
    return files + [tmp_path / n for n in ("gray.jpg", "cmyk.jpg", "image.png", "broken.jpg")]


@pytest.mark.parametrize("resample", [3, 2], ids=["bicubic", "bilinear"])
def test_gpu_decode_matches_the_pil_path_on_cpu(mixed_files: list[Path], resample: int) -> None:
    cfg = PreprocessConfig(height=32, width=32, resample=resample)
    batch = decode_batch(mixed_files, cfg, device="cpu")
    names = [p.name for p in mixed_files]
    assert {names[i] for i, _ in batch.failures} == {"cmyk.jpg", "image.png", "broken.jpg"}
    assert [names[i] for i in batch.indices] == [n for n in names if n not in ("cmyk.jpg", "image.png", "broken.jpg")]
    exact = [load_pixels(mixed_files[i], cfg, DecodeOptions()) for i in batch.indices]
    assert batch.sizes == [(w, h) for _, w, h in exact]
    expected = torch.stack([pixels for pixels, _, _ in exact])
    difference = (batch.pixels - expected).abs()
    level = 2 / 255  # one 8-bit level in normalized units
    assert difference.max() <= 3 * level and difference.mean() < 0.1 * level
    model = _tiny_model()
    with torch.no_grad():
        assert benchmark.cosine(model(batch.pixels).pooled, model(expected).pooled) >= 0.999


def test_gpu_decode_in_bounded_groups_gives_the_same_pixels(mixed_files: list[Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """The decoder takes at most PIXELS_PER_CALL pixels at a time (at least one photo): memory does not grow with
    the batch; the groups change nothing else."""
    from siglip_cli import gpu_decode

    cfg = PreprocessConfig(height=32, width=32)
    whole = decode_batch(mixed_files, cfg, device="cpu")
    calls = []
    decode = gpu_decode._decode
    monkeypatch.setattr(gpu_decode, "_decode", lambda headers, device: calls.append(list(headers)) or decode(headers, device))
    monkeypatch.setattr(gpu_decode, "PIXELS_PER_CALL", 2 * 120 * 90)  # two of the larger photos
    grouped = decode_batch(mixed_files, cfg, device="cpu")
    taken = [i for call in calls for i in call]  # positions among the JPEGs the decoder takes, group after group
    assert len(calls) > 2 and taken == list(range(len(taken)))
    assert (grouped.indices, grouped.sizes, grouped.failures) == (whole.indices, whole.sizes, whole.failures)
    assert torch.equal(grouped.pixels, whole.pixels)


def test_decoder_out_of_memory_is_not_mistaken_for_bad_files(mixed_files: list[Path], monkeypatch: pytest.MonkeyPatch) -> None:
    # torch's out-of-memory error is a RuntimeError, which is also what the decoder raises for a bad file.
    import torchvision.io

    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory.")

    monkeypatch.setattr(torchvision.io, "decode_jpeg", out_of_memory)
    batch = decode_batch(mixed_files, PreprocessConfig(height=32, width=32), device="cpu")
    reasons = {why for _, why in batch.failures}
    assert "out of GPU memory for the JPEG decoder" in reasons
    assert not any(why.startswith("JPEG decoder error") for why in reasons)


def test_gpu_decoder_out_of_memory_leaves_the_batch_to_the_cpu_path(
    mixed_files: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from siglip_cli import gpu_decode

    def out_of_memory(headers, device):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory.")

    monkeypatch.setattr(gpu_decode, "_decode", out_of_memory)
    batch = decode_batch(mixed_files, PreprocessConfig(height=32, width=32), device="cpu")
    assert batch.indices == [] and batch.pixels.shape == (0, 3, 32, 32)
    names = [p.name for p in mixed_files]
    out_of_memory_names = {names[i] for i, why in batch.failures if "out of GPU memory" in why}
    assert len(batch.failures) == len(mixed_files)
    assert out_of_memory_names == set(names) - {"cmyk.jpg", "image.png"}  # every JPEG it would have taken


def test_gpu_decode_without_exif_keeps_stored_orientation(mixed_files: list[Path]) -> None:
    cfg = PreprocessConfig(height=32, width=32)
    batch = decode_batch(mixed_files[:2], cfg, device="cpu", options=DecodeOptions(exif_transpose=False))
    assert batch.sizes == [(120, 90), (120, 90)]  # the portrait as stored: sideways


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


@pytest.mark.parametrize("resample", [3, 2], ids=["bicubic", "bilinear"])
@pytest.mark.parametrize("uint8", [True, False], ids=["uint8-cpu-kernel", "float-cuda-kernel"])
@pytest.mark.parametrize("size", [(200, 150), (20, 15)], ids=["shrink", "enlarge"])
def test_resize_follows_pil(resample: int, uint8: bool, size: tuple[int, int]) -> None:
    from siglip_cli.gpu_decode import resize

    image = make_photo(size)
    cfg = PreprocessConfig(height=48, width=64, resample=resample)
    expected = np.asarray(image.resize((64, 48), resample=resample)).astype(np.float32)
    got = resize(torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)[None], cfg, uint8=uint8)[0]
    difference = np.abs(got.permute(1, 2, 0).numpy() - expected)
    assert difference.max() <= 1 and difference.mean() < 0.1  # in 8-bit levels


def _jpeg_variants() -> dict[str, bytes]:
    import io

    photo, variants = make_photo((80, 60)), {}
    for name, mode, kwargs in [("baseline", "RGB", {}), ("progressive", "RGB", {"progressive": True}),
                               ("gray", "L", {}), ("cmyk", "CMYK", {})]:  # fmt: skip
        buffer = io.BytesIO()
        photo.convert(mode).save(buffer, "JPEG", **kwargs)
        variants[name] = buffer.getvalue()
    for endian in "<>":  # phones write both byte orders
        exif = Image.Exif()
        exif.endian = endian
        exif[0x010F], exif[0x0112] = "Maker", 6
        buffer = io.BytesIO()
        photo.save(buffer, "JPEG", exif=exif.tobytes())
        variants[f"exif-{'little' if endian == '<' else 'big'}-endian"] = buffer.getvalue()
    return variants


@pytest.mark.parametrize("name, data", list(_jpeg_variants().items()))
def test_jpeg_header_reads_what_pil_reads(name: str, data: bytes) -> None:
    import io

    from siglip_cli.gpu_decode import jpeg_header

    with Image.open(io.BytesIO(data)) as image:
        expected = (*image.size, len(image.getbands()), image.getexif().get(0x0112, 1))
    assert jpeg_header(data) == expected


def test_jpeg_header_names_what_it_refuses() -> None:
    from siglip_cli.gpu_decode import jpeg_header

    assert jpeg_header(b"\x89PNG\r\n\x1a\n") == "not a JPEG"
    assert jpeg_header(_jpeg_variants()["baseline"][:40]) == "truncated JPEG header"
