"""`siglip inspect`: every stage in forward order with its shape and statistics, exact parameter counts, the FLOP
formula against the operations actually run, the JSON document, the pictures, and a real (tiny) checkpoint."""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from rich.console import Console
from torch.utils.flop_counter import FlopCounterMode
from typer.testing import CliRunner

from conftest import make_photo, reference_vision_model, save_png_claiming_size
from siglip_cli import cli, plots, tracing
from siglip_cli.config import ACTIVATIONS, PRESETS, PreprocessConfig, VisionConfig
from siglip_cli.errors import UserError
from siglip_cli.inspect_report import header, parameter_table, report, stage_table
from siglip_cli.model import SiglipVision, gflops_per_image, num_parameters
from siglip_cli.plots import write_plots
from siglip_cli.preprocess import pixel_values

BASE, SO400M = "siglip-base-patch16-224", "siglip-so400m-patch14-384"
LAYER_STAGES = [
    "layer_norm1",
    "self_attn.q",
    "self_attn.k",
    "self_attn.v",
    "self_attn.attn_weights",
    "self_attn.attn_output",
    "self_attn.out_proj",
    "residual1",
    "layer_norm2",
    "mlp.fc1",
    "mlp.gelu",
    "mlp.fc2",
    "residual2",
]
PLOTS = ["position_embedding_similarity.png", "patch_embedding_filters.png", "head_attention.png", "activation_norms.png"]
runner = CliRunner()


@pytest.fixture(scope="module")
def photo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("inspect") / "photo.png"
    make_photo((80, 60)).save(path)
    return path


@pytest.fixture(scope="module")
def base() -> tracing.Inspection:
    """The default run: B/16-224 preset (random weights) on the bundled sample photo."""
    return tracing.inspect_image(BASE)


def shapes(result: tracing.Inspection) -> dict[str, tuple[int, ...]]:
    return {stage.stage: stage.shape for stage in result.stages}


# --------------------------------------------------------------------------- stages


def test_base_stages_come_in_forward_order_with_layer_0_in_full(base: tracing.Inspection) -> None:
    names = [stage.stage for stage in base.stages]
    assert names == [
        "image",
        "resized_image",
        "rescaled_pixels",
        "pixel_values",
        "patch_embedding",
        "patches",
        "position_embedding",
        "embeddings",
        *(f"layers.0.{name}" for name in LAYER_STAGES),
        *(f"layers.{i}.residual2" for i in range(1, 12)),
        "post_layernorm",
        "head.probe",
        "head.attn_weights",
        "head.attention",
        "head.layernorm",
        "head.mlp.fc1",
        "head.mlp.gelu",
        "head.mlp.fc2",
        "pooled",
    ]


def test_base_224_stage_shapes(base: tracing.Inspection) -> None:
    expected = {
        "image": (300, 451, 3),  # the bundled sample is 451×300
        "resized_image": (224, 224, 3),
        "rescaled_pixels": (1, 3, 224, 224),
        "pixel_values": (1, 3, 224, 224),
        "patch_embedding": (1, 768, 14, 14),
        "patches": (1, 196, 768),
        "position_embedding": (1, 196, 768),
        "embeddings": (1, 196, 768),
        "layers.0.layer_norm1": (1, 196, 768),
        "layers.0.self_attn.q": (1, 12, 196, 64),
        "layers.0.self_attn.k": (1, 12, 196, 64),
        "layers.0.self_attn.v": (1, 12, 196, 64),
        "layers.0.self_attn.attn_weights": (1, 12, 196, 196),
        "layers.0.self_attn.attn_output": (1, 196, 768),
        "layers.0.self_attn.out_proj": (1, 196, 768),
        "layers.0.residual1": (1, 196, 768),
        "layers.0.layer_norm2": (1, 196, 768),
        "layers.0.mlp.fc1": (1, 196, 3072),
        "layers.0.mlp.gelu": (1, 196, 3072),
        "layers.0.mlp.fc2": (1, 196, 768),
        "layers.0.residual2": (1, 196, 768),
        "layers.11.residual2": (1, 196, 768),
        "post_layernorm": (1, 196, 768),
        "head.probe": (1, 1, 768),
        "head.attn_weights": (1, 12, 1, 196),
        "head.attention": (1, 1, 768),
        "head.layernorm": (1, 1, 768),
        "head.mlp.fc1": (1, 1, 3072),
        "head.mlp.gelu": (1, 1, 3072),
        "head.mlp.fc2": (1, 1, 768),
        "pooled": (1, 768),
    }
    assert {name: shape for name, shape in shapes(base).items() if name in expected} == expected
    assert {stage.stage: stage.dtype for stage in base.stages}["image"] == "uint8"
    assert {stage.dtype for stage in base.stages[2:]} == {"float32"}


def test_stage_statistics_describe_the_values(base: tracing.Inspection) -> None:
    stage = {s.stage: s for s in base.stages}
    assert stage["rescaled_pixels"].min >= 0 and stage["rescaled_pixels"].max <= 1
    assert -1 <= stage["pixel_values"].min < stage["pixel_values"].mean < stage["pixel_values"].max <= 1
    # Softmax rows sum to 1, so the mean weight is exactly 1/N.
    assert stage["layers.0.self_attn.attn_weights"].mean == pytest.approx(1 / 196, rel=1e-5)
    assert stage["head.attn_weights"].mean == pytest.approx(1 / 196, rel=1e-5)
    # Fresh LayerNorm (weight 1, bias 0) standardises every token.
    assert stage["layers.0.layer_norm1"].mean == pytest.approx(0, abs=1e-5)
    assert stage["layers.0.layer_norm1"].std == pytest.approx(1, abs=1e-3)
    assert stage["layers.0.mlp.gelu"].min >= -0.171  # GELU's minimum is about -0.17
    for s in base.stages:
        assert s.min <= s.mean <= s.max and s.std >= 0, s.stage


def test_so400m_384_stage_shapes_on_the_meta_device() -> None:
    """so400m/14 at 384 px traced shape-only: 27×27 = 729 patches, 1152 wide, MLP 4304, 16 heads of 72."""
    vision, preprocessing = PRESETS[SO400M]
    with torch.device("meta"):
        model = SiglipVision(vision)
    result = tracing.trace(model, make_photo(), preprocessing, layers="first")
    expected = {
        "pixel_values": (1, 3, 384, 384),
        "patch_embedding": (1, 1152, 27, 27),
        "patches": (1, 729, 1152),
        "position_embedding": (1, 729, 1152),
        "layers.0.self_attn.q": (1, 16, 729, 72),
        "layers.0.self_attn.attn_weights": (1, 16, 729, 729),
        "layers.0.mlp.fc1": (1, 729, 4304),
        "layers.26.residual2": (1, 729, 1152),
        "post_layernorm": (1, 729, 1152),
        "head.attn_weights": (1, 16, 1, 729),
        "pooled": (1, 1152),
    }
    assert {name: shape for name, shape in shapes(result).items() if name in expected} == expected
    assert len(result.stages) == 8 + len(LAYER_STAGES) + 26 + 9
    assert any("last 6 pixel rows and columns" in note for note in result.notes)


@pytest.mark.parametrize(
    "activation, said", [("gelu_python", "GELU"), ("gelu_new", "GELU (tanh approximation)"), ("swish", "SiLU")]
)
def test_the_gelu_stage_names_the_function_the_checkpoint_computes(activation: str, said: str) -> None:
    vision = VisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4,
                          image_size=32, patch_size=16, hidden_act=activation)  # fmt: skip
    result = tracing.trace(SiglipVision(vision), make_photo(), PreprocessConfig(32, 32), layers="first")
    assert {s.stage: s.note for s in result.stages}["layers.0.mlp.gelu"] == said


def test_every_activation_has_a_name_to_show() -> None:
    from siglip_cli.model import ACTIVATION_FUNCTIONS

    assert set(tracing.ACTIVATION_NAMES) == set(ACTIVATION_FUNCTIONS) == set(ACTIVATIONS.values())


def test_a_checkpoint_that_does_not_resize_refuses_a_photo_of_another_size_in_one_sentence() -> None:
    vision = VisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4,
                          image_size=32, patch_size=16)  # fmt: skip
    with pytest.raises(UserError, match="image is 80×60 but the model needs 32×32"):
        tracing.trace(SiglipVision(vision), make_photo((80, 60)), PreprocessConfig(32, 32, do_resize=False))
    facts = tracing.ImageFacts("p.jpg", "p.jpg", 80, 60, "JPEG", "RGB")  # named: it may not be the one the user gave
    with pytest.raises(UserError, match=r"^p\.jpg: image is 80×60 but the model needs 32×32\.$"):
        tracing.trace(SiglipVision(vision), make_photo((80, 60)), PreprocessConfig(32, 32, do_resize=False), image=facts)


@pytest.mark.parametrize(
    ("size", "said"),
    [((80, 60), ""), ((12, 8), "; upscaled 4×"), ((60, 400), "; was 6.7× taller than wide"),
     ((16, 4), "; upscaled 8×; was 4× wider than tall"), ((1, 500), "; upscaled 32×; was 500× taller than wide")],
)  # fmt: skip
def test_the_resized_image_says_when_the_squash_distorts_the_photo(size, said: str, tiny_vision: Path, tmp_path: Path) -> None:
    make_photo(size).save(tmp_path / "photo.png")  # the tiny tower's input is 32×32
    result = tracing.inspect_image(str(tiny_vision), tmp_path / "photo.png")
    note = next(stage.note for stage in result.stages if stage.stage == "resized_image")
    assert note == f"squashed to 32×32 (bicubic, no crop){said}"


@pytest.mark.parametrize(
    ("size", "grid", "dropped", "said"),
    [((84, 80), (4, 4), (0, 1), "; the top-left 32×32 (1 column dropped)"),
     ((16, 64), (8, 2), (0, 0), "; its 8×2 patches laid out as the tower's 4×4, in order"),
     ((80, 60), (4, 4), (0, 0), "; squashed: 42×32 would be 4×5 patches, not the tower's 16")],
)  # fmt: skip
def test_a_photo_whose_aspect_the_preprocessing_keeps_is_said_and_drawn_as_the_tower_sees_it(
    size: tuple[int, int], grid: tuple[int, int], dropped: tuple[int, int], said: str, tiny_vision: Path, tmp_path: Path
) -> None:
    # {"shortest_edge": 32, "longest_edge": 64}, no crop: the head-attention plot laid a 4×4 grid over a photo whose
    # 16 patches lie 8×2 on it, and said nothing of the column the patch conv drops.
    checkpoint = Path(shutil.copytree(tiny_vision, tmp_path / "keeps-aspect"))
    config = checkpoint / "preprocessor_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "size": {"shortest_edge": 32, "longest_edge": 64}}))
    make_photo(size).save(tmp_path / "photo.png")
    result = tracing.inspect_image(str(checkpoint), tmp_path / "photo.png")
    assert (result.patch_grid, result.dropped) == (grid, dropped)
    assert next(stage.note for stage in result.stages if stage.stage == "resized_image").endswith(said)
    assert plots.head_attention(result).width >= 600  # drawn over the patches where they lie


def test_the_header_says_the_preprocessing_as_the_stages_that_show_it_do(base: tracing.Inspection) -> None:
    # It said "resize to 224×224 (bicubic, squash, no crop)" and "(x − [0.5, 0.5, 0.5]) / [0.5, 0.5, 0.5]" above
    # rows that said "squashed to 224×224 (bicubic, no crop)" and "(x − 0.5) / 0.5".
    said = next(line.plain for line in header(base) if line.plain.startswith("preprocessing: "))
    assert said == "preprocessing: squashed to 224×224 (bicubic, no crop), then ÷ 255, then (x − 0.5) / 0.5"
    note = {stage.stage: stage.note for stage in base.stages}
    assert note["resized_image"] == "squashed to 224×224 (bicubic, no crop)"
    assert note["rescaled_pixels"] == "÷ 255, before normalization"
    assert note["pixel_values"] == "(x − 0.5) / 0.5: the model input"


def test_a_clip_style_crop_and_per_channel_mean_read_as_steps() -> None:
    pre = PreprocessConfig(
        32, 32, shortest_edge=40, center_crop=True, image_mean=(0.48, 0.46, 0.41), image_std=(0.27, 0.27, 0.27)
    )
    assert list(tracing.preprocessing_steps(pre).values()) == [
        "shorter side resized to 40 (bicubic)", "center-cropped to 32×32", "÷ 255", "(x − (0.48, 0.46, 0.41)) / 0.27"
    ]  # fmt: skip
    vision = VisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4,
                          image_size=32, patch_size=16)  # fmt: skip
    result = tracing.trace(SiglipVision(vision), make_photo((80, 60)), pre)
    note = next(stage.note for stage in result.stages if stage.stage == "resized_image")
    assert note == "shorter side resized to 40 (bicubic), to be center-cropped to 32×32"
    capped = dataclasses.replace(pre, longest_edge=64)
    assert tracing.preprocessing_steps(capped)["resize"] == "shorter side resized to 40, longer side at most 64 (bicubic)"


@pytest.mark.parametrize(("factor", "said"), [(1 / 255, "÷ 255"), (1 / 127.5, "× 0.00784314"), (0.5, "÷ 2")])
def test_the_rescale_step_reads_as_a_division_where_it_is_one(factor: float, said: str) -> None:
    assert tracing.rescaling(factor) == said


@pytest.mark.parametrize(
    ("spec", "expected"),
    [("first", (0,)), ("all", (0, 1, 2, 3)), ("3,1", (1, 3)), (" 2 ", (2,)), ("0,0", (0,)),
     (2, (2,)), ([3, 1], (1, 3)), ((0,), (0,))],  # from Python: 2 and [3, 1] failed on .strip()
)  # fmt: skip
def test_layers_option(spec: str, expected: tuple[int, ...]) -> None:
    assert tracing.parse_layers(spec, 4) == expected


@pytest.mark.parametrize(
    ("spec", "message"),
    [("4", "layer 4 does not exist: this tower has layers 0 to 3"), ("-1", "layer -1 does not exist"),
     ("last", "should be 'first', 'all' or layer numbers"), ("1,,2", "should be"), ("", "should be"),
     (None, "should be"), (True, "should be"), ([1.5], "should be")],
)  # fmt: skip
def test_layers_option_rejects_what_the_tower_lacks(spec: str, message: str) -> None:
    with pytest.raises(UserError, match=message):
        tracing.parse_layers(spec, 4)


def test_a_tower_without_layers_has_none_to_show() -> None:
    assert tracing.parse_layers("first", 0) == tracing.parse_layers("all", 0) == ()
    with pytest.raises(UserError, match="layer 0 does not exist: this tower has no encoder layers"):
        tracing.parse_layers("0", 0)


def test_layers_all_lists_every_stage_of_every_layer(tiny_vision: Path, photo: Path) -> None:
    result = tracing.inspect_image(str(tiny_vision), photo, layers="all")
    names = [stage.stage for stage in result.stages]
    for i in range(2):
        assert [n for n in names if n.startswith(f"layers.{i}.")] == [f"layers.{i}.{s}" for s in LAYER_STAGES]


# --------------------------------------------------------------------------- parameters and FLOPs


def _transformers_model(cfg: VisionConfig):
    from transformers import SiglipVisionConfig, SiglipVisionModel

    fields = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size", "patch_size")
    config = SiglipVisionConfig(**{name: getattr(cfg, name) for name in fields}, vision_use_head=cfg.vision_use_head)
    with torch.device("meta"):
        return SiglipVisionModel(config)


TINY = VisionConfig(hidden_size=36, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=44, patch_size=14)
CONFIGS = {
    name: PRESETS[name][0]
    for name in (BASE, SO400M, "siglip-large-patch16-256", "siglip2-base-patch32-256", "paligemma-3b-pt-448",
                 "siglip2-giant-opt-patch16-256")  # fmt: skip
} | {"tiny-p14-44": TINY}


@pytest.mark.parametrize("name", CONFIGS)
def test_parameter_count_equals_transformers(name: str) -> None:
    cfg = CONFIGS[name]
    with torch.device("meta"):
        ours = SiglipVision(cfg)
    expected = _transformers_model(cfg).num_parameters()
    assert num_parameters(ours) == expected
    assert sum(tracing.parameters_by_module(ours).values()) == expected


def test_parameter_counts_of_the_two_reference_towers() -> None:
    counts = {}
    for name in (BASE, SO400M):
        with torch.device("meta"):
            counts[name] = num_parameters(SiglipVision(PRESETS[name][0]))
    assert counts == {BASE: 92_884_224, SO400M: 428_225_600}


def test_parameters_by_module_names_the_parts(base: tracing.Inspection) -> None:
    by_module = base.parameters_by_module
    assert by_module["embeddings.patch_embedding"] == 768 * 3 * 16 * 16 + 768
    assert by_module["embeddings.position_embedding"] == 196 * 768
    assert by_module["encoder.layers.*.self_attn"] == 12 * 4 * (768 * 768 + 768)
    assert by_module["encoder.layers.*.mlp"] == 12 * (2 * 768 * 3072 + 3072 + 768)
    assert by_module["head.probe"] == 768
    assert sum(by_module.values()) == base.parameters == 92_884_224


@pytest.mark.parametrize("name", [BASE, SO400M, "siglip2-base-patch32-256", "paligemma-3b-pt-448", "tiny-p14-44"])
@pytest.mark.parametrize("traced", [False, True], ids=["sdpa", "traced"])
def test_flop_formula_equals_the_operations_run(name: str, traced: bool) -> None:
    """FlopCounterMode counts every matmul, conv and SDPA the forward runs (2 FLOPs per multiply-add)."""
    cfg = CONFIGS[name]
    with torch.device("meta"):
        model = SiglipVision(cfg)
        pixels = torch.empty(1, cfg.num_channels, cfg.image_size, cfg.image_size)
    with FlopCounterMode(display=False) as counter:
        model(pixels, {} if traced else None)
    assert counter.get_total_flops() == round(gflops_per_image(cfg) * 1e9)


def test_gflops_of_the_two_reference_towers() -> None:
    assert gflops_per_image(PRESETS[BASE][0]) == pytest.approx(35.4, abs=0.05)
    assert gflops_per_image(PRESETS[SO400M][0]) == pytest.approx(670, rel=0.005)


# --------------------------------------------------------------------------- a real checkpoint


def test_real_checkpoint_stats_match_transformers(tiny_vision: Path, photo: Path) -> None:
    result = tracing.inspect_image(str(tiny_vision), photo, layers="first")
    assert not result.random_weights
    stage = {s.stage: s for s in result.stages}
    reference = reference_vision_model(tiny_vision)
    image, _ = tracing.read_image(photo)
    with torch.no_grad():
        out = reference(torch.from_numpy(pixel_values(image, result.preprocessing))[None], output_hidden_states=True)
    expected = {
        "embeddings": out.hidden_states[0],
        "layers.0.residual2": out.hidden_states[1],
        "layers.1.residual2": out.hidden_states[2],
        "post_layernorm": out.last_hidden_state,
        "pooled": out.pooler_output,
    }
    for name, tensor in expected.items():
        got = stage[name]
        assert got.shape == tuple(tensor.shape), name
        want = (tensor.mean().item(), tensor.std(correction=0).item(), tensor.min().item(), tensor.max().item())
        assert (got.mean, got.std, got.min, got.max) == pytest.approx(want, abs=1e-4), name


def test_the_traced_forward_matches_transformers_element_by_element(tiny_vision: Path, photo: Path) -> None:
    # The trace writes attention out by hand (to keep its weights) where a plain forward calls SDPA: the statistics
    # above would not see values that moved about within a stage.
    from siglip_cli.checkpoints import resolve_checkpoint
    from siglip_cli.weights import load_model

    checkpoint = resolve_checkpoint(str(tiny_vision))
    image, _ = tracing.read_image(photo)
    x = torch.from_numpy(pixel_values(image, checkpoint.preprocess))[None]
    trace: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        ours = load_model(checkpoint)(x, trace=trace)
        out = reference_vision_model(tiny_vision)(x, output_hidden_states=True)
    expected = {
        "embeddings": out.hidden_states[0],
        **{f"layers.{i}.residual2": hidden for i, hidden in enumerate(out.hidden_states[1:])},
        "post_layernorm": out.last_hidden_state,
    }
    assert set(expected) <= set(trace) and len(out.hidden_states) > 2
    for name, tensor in expected.items():
        torch.testing.assert_close(trace[name], tensor, rtol=0, atol=1e-5, msg=name)
    torch.testing.assert_close(ours.pooled, out.pooler_output, rtol=0, atol=1e-5)


def test_headless_tower_has_no_head_stages_or_head_plot(
    tiny_paligemma: Path, photo: Path, base: tracing.Inspection, tmp_path: Path
) -> None:
    result = tracing.inspect_image(str(tiny_paligemma), photo)
    assert not [s.stage for s in result.stages if s.stage.startswith("head.")]
    assert result.stages[-1].stage == "pooled"
    assert any("no attention-pool head" in note for note in result.notes)
    write_plots(base, tmp_path)  # a tower with a head first, into the same folder
    assert [p.name for p in write_plots(result, tmp_path)] == [name for name in PLOTS if name != "head_attention.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(name for name in PLOTS if name != "head_attention.png")


# --------------------------------------------------------------------------- pictures


def test_plots_are_written_and_readable(base: tracing.Inspection, tmp_path: Path) -> None:
    paths = write_plots(base, tmp_path / "plots")
    assert [p.name for p in paths] == PLOTS
    for path in paths:
        with Image.open(path) as picture:
            assert picture.format == "PNG" and picture.width >= 600 and picture.height >= 400
            assert len(picture.convert("RGB").getcolors(1 << 24)) > 100, f"{path.name} is nearly blank"


def test_position_similarity_shows_each_position_alike_with_itself(base: tracing.Inspection) -> None:
    # Text alone gives a picture a hundred colours: the map itself is checked. Tile (r, c) has a +1 (the ramp's top
    # colour) at (r, c); random position embeddings are near 0 to one another, so those are the only ones.
    picture = np.asarray(plots.position_similarity(base))
    at_plus_one = np.all(picture == plots.VIRIDIS[-1], axis=-1).sum()
    scale = max(1, 900 // base.config.num_patches)  # each position drawn scale × scale pixels
    assert base.config.num_patches * scale**2 <= at_plus_one < 2 * base.config.num_patches * scale**2


def test_captions_wider_than_their_thumbnails_keep_apart() -> None:
    # A tall photo's thumbnails are 15 px wide: captions centred on slots that narrow ran into each other.
    thumbnail, caption = Image.new("RGB", (15, 150)), "head 10: peak 1.23x"
    row = plots._captioned_row([(thumbnail, caption)] * 6, per_row=6, colorbar=1.0)
    assert row.width >= 6 * plots._size(caption, plots._font(13))[0] + plots.COLORBAR_WIDTH


def test_the_norms_axis_of_a_tower_without_layers_says_so() -> None:
    assert plots.norms_axis_label(12) == "after the embeddings (emb) and after each encoder layer (0 to 11)"
    assert plots.norms_axis_label(0) == "after the embeddings (emb): the tower has no encoder layers"  # not "0 to -1"


def test_the_colour_bar_beside_a_panoramas_thin_row_is_whole() -> None:
    row = plots._captioned_row([(Image.new("RGB", (400, 2)), "mean over heads")], per_row=1, colorbar=1.0)
    assert row.height >= 100  # the ramp, its three labels and its title, not a sliver of them


def test_head_attention_of_a_tall_photo_lays_the_heads_out_in_rows(base: tracing.Inspection) -> None:
    # Laid out by the photo's width, a strip's twelve heads went two to a row, in a picture 2.5 times taller than wide.
    strip = dataclasses.replace(base, photo=make_photo((40, 400)))
    picture = plots.head_attention(strip)
    assert picture.height < 1.5 * picture.width


def test_plot_directory_that_is_a_file_is_a_user_error(base: tracing.Inspection, tmp_path: Path) -> None:
    file = tmp_path / "taken"
    file.write_text("")
    with pytest.raises(UserError, match="not a directory"):
        write_plots(base, file)


def test_plot_directory_under_a_file_names_the_file(base: tracing.Inspection, tmp_path: Path) -> None:
    (tmp_path / "taken").write_text("")
    with pytest.raises(UserError, match=f"^{tmp_path / 'taken'} is not a directory"):
        write_plots(base, tmp_path / "taken" / "plots")


@pytest.mark.parametrize("under", ["", "sub"])
def test_plot_directory_through_a_dangling_link_names_the_link(base: tracing.Inspection, tmp_path: Path, under: str) -> None:
    # `--plot dangling/sub` said "dangling/sub is not a directory", of a folder the user never named as one.
    (tmp_path / "dangling").symlink_to(tmp_path / "unmounted")
    message = f"^{tmp_path / 'dangling'} is a link to {tmp_path / 'unmounted'}, which does not exist"
    with pytest.raises(UserError, match=message):
        write_plots(base, tmp_path / "dangling" / under)
    assert not (tmp_path / "unmounted").exists()


def test_nan_activations_are_named_where_they_first_appear_and_not_plotted(
    tiny_vision: Path, photo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A damaged checkpoint: the table showed – from some layer on, without a word, and --plot ended in a traceback.
    load = tracing.load_tower

    def damaged(*args, **kwargs):
        tower, preprocess, random_weights = load(*args, **kwargs)
        with torch.no_grad():
            tower.encoder.layers[1].mlp.fc2.bias[0] = float("nan")
        return tower, preprocess, random_weights

    monkeypatch.setattr(tracing, "load_tower", damaged)
    result = tracing.inspect_image(str(tiny_vision), photo, layers="all")
    assert result.notes[0].startswith("layers.1.mlp.fc2: NaN or infinite values first appear here")
    first = [stage.stage for stage in result.stages].index("layers.1.mlp.fc2")
    assert first > 0 and tracing.first_non_finite(result.stages[:first]) is None
    with pytest.raises(UserError, match="NaN or infinite values from layers.1.mlp.fc2 on: there is nothing to draw"):
        write_plots(result, tmp_path / "plots")
    assert not (tmp_path / "plots").exists()
    collapsed = tracing.inspect_image(str(tiny_vision), photo)  # layer 1 in one line
    assert collapsed.notes[0].startswith("layer 1: NaN or infinite values first appear in it (--layers 1 shows where)")
    # The command still prints its report, the one thing a user with a damaged checkpoint needs, and no plots.
    from typer.testing import CliRunner

    from siglip_cli.cli import app

    done = CliRunner().invoke(app, ["inspect", str(photo), "-m", str(tiny_vision), "--plot", str(tmp_path / "p")])
    assert done.exit_code == 0 and "layer 1: NaN or infinite values first appear" in done.stdout
    assert f"no plots drawn in {tmp_path / 'p'}: the model gave NaN or infinite values" in done.stderr
    assert list((tmp_path / "p").iterdir()) == []
    (tmp_path / "p" / "activation_norms.png").write_bytes(b"an earlier run's")  # the note says whose they are
    done = CliRunner().invoke(app, ["inspect", str(photo), "-m", str(tiny_vision), "--plot", str(tmp_path / "p")])
    assert f"no plots drawn in {tmp_path / 'p'} (the pictures in it are an earlier run's): the model" in done.stderr
    done = CliRunner().invoke(app, ["inspect", str(photo), "-m", str(tiny_vision), "--plot", str(tmp_path / "p"),
                                    "--json"])  # fmt: skip
    document = json.loads(done.stdout)  # why "plots" is empty, where a script reads it: it was only on stderr
    assert document["plots"] == [] and document["notes"][-1].startswith(f"no plots drawn in {tmp_path / 'p'} (the")


def test_a_plot_that_cannot_be_written_is_one_sentence_and_leaves_nothing(
    base: tracing.Inspection, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A read-only folder or a full disk ended `inspect --plot` in a traceback, after half the pictures.
    import errno

    def full_disk(self, fp, format=None, **params):
        fp.write(b"\x89PNG")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", full_disk)
    with pytest.raises(UserError, match=r"cannot write .*position_embedding_similarity\.png: No space left on device"):
        write_plots(base, tmp_path / "plots")
    assert list((tmp_path / "plots").iterdir()) == []


def test_a_plot_that_fails_midway_leaves_the_earlier_runs_pictures_whole(
    base: tracing.Inspection, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The disk filled at the third picture: the first two were this run's, the others an earlier run's.
    import errno

    earlier = write_plots(base, tmp_path / "plots")
    before = {path.name: path.read_bytes() for path in earlier}
    saved = []

    def full_at_the_third(self, fp, format=None, **params):
        saved.append(fp)
        if len(saved) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        fp.write(b"this run's picture")

    monkeypatch.setattr(Image.Image, "save", full_at_the_third)
    with pytest.raises(UserError, match=r"No space left on device"):
        write_plots(base, tmp_path / "plots")
    assert {path.name: path.read_bytes() for path in (tmp_path / "plots").iterdir()} == before


def test_an_inspect_refused_leaves_no_plot_folder(tiny_vision: Path, tmp_path: Path) -> None:
    # The folder was made before the image was looked at, and left empty by the refusal.
    from typer.testing import CliRunner

    from siglip_cli.cli import app

    done = CliRunner().invoke(app, ["inspect", str(tmp_path / "missing.png"), "-m", str(tiny_vision), "--plot",
                                    str(tmp_path / "new" / "plots")])  # fmt: skip
    assert done.exit_code == 2 and "does not exist" in done.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_plot_folder_on_a_read_only_mount_is_one_sentence(
    base: tracing.Inspection, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An existing folder on a read-only mount: the temporary file's clean-up failed too (EROFS), in a traceback.
    import errno

    from siglip_cli import storage

    def refused(path, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(storage, "open", refused, raising=False)
    monkeypatch.setattr(Path, "unlink", refused)
    with pytest.raises(UserError, match=r"^cannot write .*position_embedding_similarity\.png: Read-only file system\.$"):
        write_plots(base, tmp_path)


def test_what_inspect_is_asked_that_cannot_be_is_refused_before_the_model_is_built(
    tiny_vision: Path, photo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `--layers 99` on so400m was refused after 7.6 s of building the tower; a plot folder that cannot be written,
    # after the whole trace, whose report was then lost.
    import errno
    import tempfile

    from siglip_cli import weights

    monkeypatch.setattr(weights, "load_model", lambda *args, **kwargs: pytest.fail("the model was built"))
    monkeypatch.setattr(weights, "random_model", lambda *args, **kwargs: pytest.fail("the model was built"))
    for model in (str(tiny_vision), "siglip-so400m-patch14-384"):
        done = invoke(str(photo), "--model", model, "--layers", "0,99")
        assert done.exit_code == 2 and "layer 99 does not exist: this tower has layers 0 to" in done.stderr

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "TemporaryFile", read_only)
    monkeypatch.setattr(tracing, "inspect_image", lambda *args, **kwargs: pytest.fail("the image was traced"))
    done = invoke(str(photo), "--model", str(tiny_vision), "--plot", str(tmp_path / "plots"))
    assert done.exit_code == 2
    assert f"cannot write in the plot directory {tmp_path / 'plots'}: Read-only file system." in done.stderr


# --------------------------------------------------------------------------- the command


def invoke(*args: str):
    return runner.invoke(cli.app, ["inspect", *args])


def test_report_into_a_file_has_no_padding_and_takes_columns_as_its_width(tiny_vision: Path, photo: Path) -> None:
    # rich padded every table row with spaces, in a table 164 columns wide whatever COLUMNS said.
    rules = {}
    for columns in ("100", None, "0"):  # None: unset, for 200 columns; 0 (or too narrow to use): as unset
        result = runner.invoke(cli.app, ["inspect", str(photo), "--model", str(tiny_vision)], env={"COLUMNS": columns})
        assert result.exit_code == 0, result.output
        lines = result.stdout.splitlines()
        assert not [line for line in lines if line.endswith(" ")]
        rules[columns] = next(len(line) for line in lines if line.strip().startswith("───"))  # the table's width
    assert rules["100"] <= 100 < rules[None] == rules["0"] <= 200


def test_a_path_with_square_brackets_is_printed_as_it_is(tiny_vision: Path, photo: Path, tmp_path: Path) -> None:
    odd = tmp_path / "[bold]photo[red].png"  # markup to rich, a file name to the user
    odd.write_bytes(photo.read_bytes())
    result = invoke(str(odd), "--model", str(tiny_vision))
    assert result.exit_code == 0, result.output
    assert f"on {odd} (80×60 PNG" in result.stdout


def test_json_document_schema(tiny_vision: Path, photo: Path, tmp_path: Path) -> None:
    result = invoke(str(photo), "--model", str(tiny_vision), "--json", "--plot", str(tmp_path))
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert {"stages", "parameters", "parameters_by_module", "gflops_per_image", "config", "preprocessing"} <= set(doc)
    for stage in doc["stages"]:
        assert {"stage", "shape", "dtype", "mean", "std", "min", "max"} <= set(stage)
        assert isinstance(stage["stage"], str) and isinstance(stage["dtype"], str)
        assert isinstance(stage["shape"], list) and all(type(n) is int for n in stage["shape"])
        assert all(type(stage[k]) is float for k in ("mean", "std", "min", "max"))
    assert type(doc["parameters"]) is int and doc["parameters"] == sum(doc["parameters_by_module"].values())
    assert isinstance(doc["gflops_per_image"], float)
    assert doc["config"]["hidden_size"] == 32 and doc["config"]["num_patches"] == 16
    assert doc["preprocessing"]["height"] == 32
    assert doc["random_weights"] is False
    assert [Path(p).name for p in doc["plots"]] == PLOTS
    image = {"path": str(photo), "width": 80, "height": 60, "format": "PNG", "mode": "RGB"}
    assert doc["image"] == {**image, "description": f"{photo} (80×60 PNG, mode RGB)"}


def test_json_names_the_image_as_the_manifest_does(tiny_vision: Path, photo: Path, tmp_path: Path) -> None:
    # A script finds the file again: the path as given, its bytes where the name is not UTF-8 (not the escaped
    # text the terminal shows); the bundled sample photo is no file of the user's.
    odd = os.fsdecode(bytes(tmp_path) + b"/caf\xe9\n.png")
    shutil.copy(photo, odd)
    doc = json.loads(invoke(odd, "--model", str(tiny_vision), "--json").stdout)
    assert os.fsdecode(base64.b64decode(doc["image"]["path_bytes_b64"])) == odd
    assert "\\x0a" in doc["image"]["description"]
    doc = json.loads(invoke("--model", str(tiny_vision), "--json").stdout)
    assert doc["image"]["path"] is None and doc["image"]["description"].startswith("the bundled sample photo (451×300")


def test_table_lists_stages_parameters_and_cost(tiny_vision: Path, photo: Path) -> None:
    result = invoke(str(photo), "--model", str(tiny_vision), "--layers", "1")
    assert result.exit_code == 0, result.output
    out = result.stdout
    for text in ("layers.1", "self_attn.attn_weights", "(1, 4, 16, 16)", "post_layernorm", "pooled", "total", "GFLOPs"):
        assert text in out
    assert "RANDOM WEIGHTS" not in out


def test_random_weights_are_said_plainly(base: tracing.Inspection) -> None:
    console = Console(record=True, width=200)
    console.print(report(base, width=200))
    assert f"RANDOM WEIGHTS: {BASE} is an architecture preset" in console.export_text()


def test_in_80_columns_layer_names_and_shapes_stay_whole(base: tracing.Inspection) -> None:
    # At 80 columns "layers.10" wrapped into "layers.1" over "0", and shapes broke as "(1, 3," / "224," / "224)".
    from siglip_cli.tracing import inspect_image

    deep = inspect_image(BASE, None, layers="0,10")
    console = Console(record=True, width=80)
    console.print(report(deep, width=80))
    lines = console.export_text().splitlines()
    assert max(map(len, lines)) <= 80
    rows = {line.split()[0]: line.split() for line in lines if line.startswith(" layers.")}
    assert set(rows) == {f"layers.{i}" for i in range(12)}
    assert rows["layers.5"][1] == "1×196×768" and len(rows["layers.5"]) == 6  # shape and the four numbers, whole
    # The longest names of a layer shown in full (`self_attn.attn_weights`) stay on one line with their numbers.
    inner = [line.split() for line in lines if line.startswith("   ") and line.strip()]
    assert {row[0] for row in inner} >= {"self_attn.attn_weights", "self_attn.attn_output", "self_attn.out_proj"}
    assert all(len(row) == 6 for row in inner), inner


def test_in_60_columns_rows_keep_mean_and_std_whole_and_say_where_min_and_max_went(base: tracing.Inspection) -> None:
    # Below about 78 columns the names were cut into 4-letter pieces over several lines a row.
    console = Console(record=True, width=60)
    console.print(stage_table(base, notes=False, compact=True, statistics=("mean", "std")))
    text = console.export_text()
    lines = text.splitlines()
    assert max(map(len, lines)) <= 60
    inner = [line.split() for line in lines if line.startswith("   ") and line.strip()]
    assert {row[0] for row in inner} >= {"self_attn.attn_weights", "mlp.fc1"}
    assert all(len(row) == 4 for row in inner), inner  # name, shape, mean, std: each on one line
    assert "min and max in a wider terminal or with --json" in " ".join(text.split())
    console = Console(record=True, width=60)
    console.print(report(base, width=60))
    text = console.export_text()
    header = next(line for line in text.splitlines() if line.lstrip().startswith("stage"))
    assert header.split() == ["stage", "shape", "mean", "std"]


def test_in_40_columns_the_stage_table_folds_names_never_shapes(base: tracing.Inspection) -> None:
    # `1×3×32×3` on one line and `2` on the next read as another shape.
    console = Console(record=True, width=40)
    console.print(report(base, width=40))
    cells = console.export_text().split()
    assert all("×".join(map(str, stage.shape)) in cells for stage in base.stages)


def test_in_a_narrow_terminal_the_parameter_table_folds_names_not_numbers(base: tracing.Inspection) -> None:
    # Below about 70 columns B/16's counts came out cut: "92,884,2…", "30…".
    console = Console(record=True, width=50)
    console.print(parameter_table(base))
    cells = console.export_text().split()
    for count in base.parameters_by_module.values():
        assert f"{count:,}" in cells and f"{100 * count / base.parameters:.1f}%" in cells
    assert f"{base.parameters:,}" in cells


def test_a_revision_of_a_preset_is_refused() -> None:
    result = invoke("--revision", "main")
    assert result.exit_code == 2 and "is a preset" in result.output and "no --revision" in result.output


def test_max_pixels_holds_for_the_bundled_photo_too(tiny_vision: Path) -> None:
    # It was traced whatever --max-pixels said: the option held only for an image given.
    result = invoke("--model", str(tiny_vision), "--max-pixels", "1000")
    assert result.exit_code == 2 and "Traceback" not in result.output
    said = " ".join(result.stderr.split())
    # Refused, as asked: not "cannot be decoded", as of a damaged file.
    assert "the bundled sample photo is refused: 451×300 = 135,300 pixels exceeds the limit of 1,000" in said


def test_dropped_pixels_are_said(tiny_p14: Path, photo: Path) -> None:
    result = invoke(str(photo), "--model", str(tiny_p14))
    assert result.exit_code == 0, result.output
    assert "the last 2 pixel rows and columns (bottom and right) are dropped" in result.stdout


def test_pixels_a_larger_processor_size_drops_are_said_and_drawn(tiny_p14: Path, photo: Path, tmp_path: Path) -> None:
    # 42 rows (3 whole patches of 14) and 55 columns (3, and 13 px over): the tower's own 44 px would drop 2 of each.
    import shutil

    from transformers import SiglipImageProcessorPil

    checkpoint = Path(shutil.copytree(tiny_p14, tmp_path / "resized"))
    SiglipImageProcessorPil(size={"height": 42, "width": 55}).save_pretrained(checkpoint)
    result = invoke(str(photo), "--model", str(checkpoint), "--plot", str(tmp_path / "plots"))
    assert result.exit_code == 0, result.output
    assert "55×42 px is not a multiple of the 14 px patch: the patch conv sees a 3×3 grid" in result.stdout
    assert "the last 13 pixel columns (right) are dropped" in result.stdout
    assert len(list((tmp_path / "plots").glob("*.png"))) == 4


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: d / "missing.jpg", "does not exist"),
        (lambda d: d, "is a directory"),
        (lambda d: (d / "notes.jpg").write_text("not a picture") and d / "notes.jpg", "not an image"),
        (lambda d: save_png_claiming_size(d / "huge.png", 20_000, 10_000), "possible decompression bomb"),
        (lambda d: half_synced_heic(d / "IMG_0001.HEIC"), "cannot be decoded: image file is truncated (libheif:"),
        (lambda d: os.mkfifo(d / "pipe.jpg") or d / "pipe.jpg", "is not a regular file (a pipe or a device)"),
        (lambda d: (d / "cut.jpg").write_bytes(b"") or d / "cut.jpg", "cut.jpg cannot be decoded: empty file (0 bytes)."),
        (lambda d: os.symlink("/nowhere/x.jpg", d / "x.jpg") or d / "x.jpg", "x.jpg is a link to /nowhere/x.jpg,"),
    ],
    ids=["missing", "directory", "not-an-image", "over-twice-pillows-limit", "cut-heic", "fifo", "empty", "dangling"],
)
def test_bad_image_is_one_sentence_and_exit_2(make, message: str, tmp_path: Path, tiny_vision: Path) -> None:
    result = invoke(str(make(tmp_path)), "--model", str(tiny_vision))
    assert result.exit_code == 2
    assert message in " ".join(result.stderr.split()) and "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()) <= 2  # one sentence (rich may wrap it)


def test_pillows_warnings_stay_off_the_terminal(tmp_path: Path, tiny_vision: Path) -> None:
    # An EXIF block pointing past its end: Pillow's "UserWarning: Corrupt EXIF data" and the line of its source
    # that raised it were printed above the report; the photo itself is fine.
    photo = tmp_path / "camera.jpg"
    make_photo((64, 48)).save(photo, exif=b"Exif\x00\x00MM\x00\x2a\xff\xff\xff\xff")
    process = subprocess.run(
        [sys.executable, "-m", "siglip_cli", "inspect", str(photo), "--model", str(tiny_vision)],
        capture_output=True, text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert process.returncode == 0, process.stderr
    assert "Warning" not in process.stderr and "camera.jpg (64×48 JPEG" in process.stdout


def test_the_photos_statistics_come_from_its_histogram_exactly() -> None:
    # A 150 MP photo's float64 copy took 3.6 GB of a 5 GB peak; the histogram gives the same numbers.
    photo = torch.randint(3, 250, (37, 41, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    stage = tracing._summarise("image", photo, "")
    std, mean = torch.std_mean(photo.double(), correction=0)
    assert stage.mean == pytest.approx(mean.item(), abs=1e-9) and stage.std == pytest.approx(std.item(), abs=1e-9)
    assert (stage.min, stage.max) == (photo.min().item(), photo.max().item())


def half_synced_heic(path: Path) -> Path:
    """The first half of a HEIC photo, as a half-synced cloud folder holds it: pillow-heif raises ValueError, which
    ended `inspect` in a traceback."""
    make_photo((160, 120)).save(path, format="HEIF")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def test_a_mistyped_preset_is_one_sentence_naming_the_preset() -> None:
    result = invoke("--model", "siglip-bas-patch16-224")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "did you mean siglip-base-patch16-224?" in " ".join(result.stderr.split())
    assert len(result.stderr.strip().splitlines()) <= 2  # one sentence (rich may wrap it)


def test_missing_layer_is_a_user_error(tiny_vision: Path, photo: Path) -> None:
    result = invoke(str(photo), "--model", str(tiny_vision), "--layers", "0,7")
    assert result.exit_code == 2
    assert "layer 7 does not exist" in result.stderr


def test_the_readme_names_every_preset() -> None:
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert [name for name in PRESETS if f"`{name}`" not in readme] == []


def test_an_odd_image_name_reaches_the_report_escaped(tiny_vision: Path, photo: Path, tmp_path: Path) -> None:
    # An escape sequence in a file name recoloured the terminal, and a newline split the header.
    odd = tmp_path / "a\x1b[31mRED\nb.jpg"
    odd.write_bytes(photo.read_bytes())
    result = tracing.inspect_image(str(tiny_vision), odd)
    assert str(result.image).startswith(f"{tmp_path}/a\\x1b[31mRED\\x0ab.jpg (")


def test_max_pixels_limits_the_inspected_image_as_it_does_in_embed(tiny_vision: Path, photo: Path) -> None:
    with pytest.raises(UserError, match="exceeds the limit of 100 "):
        tracing.inspect_image(str(tiny_vision), photo, max_pixels=100)
    assert tracing.inspect_image(str(tiny_vision), photo, max_pixels=None).stages


@pytest.mark.parametrize("given", ["-", "https://example.com/a.jpg"])
def test_inspect_of_stdin_or_a_url_says_what_it_reads(given: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # "- does not exist.": a user who piped an image in, or pasted a link, was told nothing of why.
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=r" does not exist: give an image file \(stdin and URLs are not read\)\.$"):
        tracing.read_image(Path(given))
